"""Parity with diffusers' schedulers and its guidance rescale (docs/design.md §2.4, §2.7, §4).

diffusers keeps ``alphas_cumprod`` (DDIM, DDPM) and ``sigmas`` (DPM-Solver) in float32 and forms its step
coefficients from them.  To compare at float64 precision, each test casts those tables of the diffusers
scheduler to float64 *after* building it and derives our sigmas from the very same values; what is compared
is then the update formulas, not float32 rounding of the tables.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TinyNet

import zsnr_kernels as zk

diffusers = pytest.importorskip("diffusers")


def _run_diffusers(sched, net, noise, generator=None, **step_kw):
    sample = noise.clone()
    for t in sched.timesteps:
        out = net(sample, t.reshape(1).to(torch.float64).expand(noise.shape[0]))
        sample = sched.step(out, t, sample, generator=generator, **step_kw).prev_sample
    return sample


def _model_on_timesteps(net, sigmas, timesteps):
    """Our model: the network conditioned on the timestep whose sigma we are called at."""
    lookup = {float(s): float(t) for s, t in zip(sigmas, timesteps)}

    def model(y, sigma):
        return net(y, torch.full((y.shape[0],), lookup[float(sigma[0])], dtype=torch.float64))

    return model


def _vp_sigmas(alphas_cumprod, timesteps):
    ac = alphas_cumprod[timesteps.long()]
    return zk.schedules.sigmas_from_alphas_cumprod(ac)


def _ddim_float64(sched, net, noise, eta, generator):
    """diffusers' ``DDIMScheduler.step`` (v-prediction, no clipping) re-derived in float64, drawing its noise in the
    same order, with one change: the weight of the predicted noise, sqrt(1 - a_prev - std^2), is written as
    sqrt((1 - a_prev) (1 - eta^2 (1 - a_t / a_prev) / (1 - a_t))), which is exactly 0 at a_t = 0 and eta = 1.

    diffusers subtracts there two float64 numbers that are equal in exact arithmetic, so it takes the square
    root of a rounding error: a few ulps of 1 give up to sqrt(4 * 2**-53) ~ 2.1e-8 times the predicted noise,
    and a negative one gives NaN.  Which of the two comes out depends on how PyTorch rounds ``variance ** 0.5``
    on the CPU it runs on (seen: 1.7e-9 with AVX2 and AVX-512 kernels at 25 steps, NaN with the baseline ones at 10
    steps); this re-derivation is what diffusers computes without that rounding."""
    sample = noise.clone()
    ac, step = sched.alphas_cumprod, sched.config.num_train_timesteps // sched.num_inference_steps
    for t in sched.timesteps:
        out = net(sample, t.reshape(1).to(torch.float64).expand(noise.shape[0]))
        a_t = float(ac[t])
        a_prev = float(ac[t - step]) if t - step >= 0 else float(sched.final_alpha_cumprod)
        x0 = a_t ** 0.5 * sample - (1 - a_t) ** 0.5 * out
        eps = a_t ** 0.5 * out + (1 - a_t) ** 0.5 * sample
        ratio = (1 - a_t / a_prev) / (1 - a_t)                  # variance / (1 - a_prev)
        std = eta * ((1 - a_prev) * ratio) ** 0.5
        sample = a_prev ** 0.5 * x0 + ((1 - a_prev) * max(0.0, 1 - eta * eta * ratio)) ** 0.5 * eps
        if eta > 0:
            sample = sample + std * torch.randn(out.shape, generator=generator, dtype=out.dtype)
    return sample


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("eta", [0.0, 1.0, 0.5])
def test_ddim_zero_snr_trailing(steps, eta):
    """DDIMScheduler with rescale_betas_zero_snr=True and trailing spacing starts at alphas_cumprod = 0 exactly
    (sigma = inf).  Step counts divide 1000: diffusers' DDIM steps to t - 1000 // S, which for other S is not
    the next timestep of its own trailing list.

    The oracle is diffusers' step re-derived in float64 (:func:`_ddim_float64`), itself checked against diffusers:
    equal to 1e-12 where diffusers has no rounding to take the square root of (eta < 1), and at eta = 1, where
    diffusers is finite, within that square root's bound: 2.1e-8 times the predicted noise of the first step (the
    start sample itself at a_t = 0), with a factor 4 for its way through the later steps."""
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True,
                                    timestep_spacing="trailing", prediction_type="v_prediction",
                                    clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(steps)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    assert sched.alphas_cumprod[-1] == 0.0 and sched.timesteps[0] == 999
    net = TinyNet(4, seed=3)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sig = torch.cat([_vp_sigmas(sched.alphas_cumprod, sched.timesteps), torch.zeros(1, dtype=torch.float64)])
    assert sig[0] == float("inf")
    expected = _ddim_float64(sched, net, noise, eta, torch.Generator().manual_seed(5))
    theirs = _run_diffusers(sched, net, noise, generator=torch.Generator().manual_seed(5), eta=eta)
    if eta < 1:
        assert (theirs - expected).abs().max().item() <= 1e-12
    elif torch.isfinite(theirs).all():
        assert (theirs - expected).abs().max().item() <= 4 * 2.1e-8 * noise.abs().max().item()
    g = torch.Generator().manual_seed(5)
    got = zk.sample(_model_on_timesteps(net, sig, sched.timesteps), noise, sig, sampler="ddim", eta=eta,
                    noise_sampler=lambda s, sn: torch.randn(noise.shape, generator=g, dtype=noise.dtype))
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max().item() <= 1e-10


def test_ddpm_zero_snr_trailing():
    """DDPMScheduler, trailing, zero SNR.  diffusers clamps the final posterior variance to 1e-20 and so adds
    1e-10 * z at the last step, where the exact posterior (and this library) adds nothing: tolerance 1e-8."""
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True,
                                    timestep_spacing="trailing", prediction_type="v_prediction", clip_sample=False)
    sched.set_timesteps(20)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    net = TinyNet(4, seed=4)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sig = torch.cat([_vp_sigmas(sched.alphas_cumprod, sched.timesteps), torch.zeros(1, dtype=torch.float64)])
    expected = _run_diffusers(sched, net, noise, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    got = zk.sample(_model_on_timesteps(net, sig, sched.timesteps), noise, sig, sampler="ddpm",
                    noise_sampler=lambda s, sn: torch.randn(noise.shape, generator=g, dtype=noise.dtype))
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max().item() <= 1e-8


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_dpm_solver_multistep_2m(spacing):
    """DPMSolverMultistepScheduler (dpmsolver++, order 2) equals dpmpp_2m on its own sigmas.  20 steps: below 15
    diffusers also lowers the order of the second-to-last step, which k-diffusion's 2M does not.  Its ``step``
    casts the sample to float32 (``sample.to(torch.float32)``), so the comparison is at float32 precision."""
    sched = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction",
                                                  timestep_spacing=spacing, steps_offset=1)
    sched.set_timesteps(20)
    sched.sigmas = sched.sigmas.double()
    net = TinyNet(4, seed=5)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sig = sched.sigmas.clone()
    assert sig[-1] == 0.0
    y0 = noise * float(sig[0] / (sig[0] ** 2 + 1).sqrt())  # diffusers' init_noise_sigma is 1 (VP)
    expected = _run_diffusers(sched, net, y0)
    got = zk.sample(_model_on_timesteps(net, sig, sched.timesteps), noise, sig, sampler="dpmpp_2m")
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_guidance_rescale_equals_rescale_noise_cfg(phi):
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    g = torch.Generator().manual_seed(3)
    y = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
    f_c = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64) * 1.5 + 0.2
    f_u = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
    w, sigma = 7.5, 3.0
    r = zk.euler_step(y, (f_c, f_u), sigma, 1.0, guidance_scale=w, guidance_rescale=phi)
    f_cfg = rescale_noise_cfg(f_u + w * (f_c - f_u), f_c, guidance_rescale=phi)
    p, q = zk.parameterization("v").denoise_coeffs(sigma)
    torch.testing.assert_close(r.denoised, p * y + q * f_cfg, atol=1e-12, rtol=0)
