"""``zsnr_kernels.diffusers``: each scheduler against the diffusers scheduler of the same name, and exactness at zero
terminal SNR (sigma = inf), where diffusers can only approximate (alphas_cumprod[-1] = 2**-24, sigma_max = 4096).

The loop is a pipeline's (StableDiffusionPipeline without guidance): start from ``noise * init_noise_sigma``, then
per timestep ``scale_model_input``, the model, ``step``.  Both schedulers get the same network (conftest's TinyNet
on the timestep the pipeline passes), the same noise and, for the stochastic ones, generators with the same seed.
What is compared: the timesteps, every model input (ours: the sample itself; diffusers: its ``scale_model_input``)
and the final sample.

Tolerances.  diffusers builds its tables in float32 (alphas_cumprod by a float32 cumprod, Euler-family sigmas cast
to float32) and its Euler family, Euler ancestral and DPM-Solver compute ``step`` in float32 whatever the sample's
dtype.  So:

* tables built by each library (``test_parity*``): float32 rounding of diffusers' tables, relatively up to 1.3e-5
  in its smallest sigmas (0.029 on SD's table, where abar = 0.99915 leaves 1 - abar few digits), amplified by
  sigma (up to 15) for epsilon-prediction, where D = sqrt(1 + sigma^2) y - sigma F.  Measured on 10 steps: at most
  8e-5 (epsilon) and 5e-5 (v, sample); bound 3e-4 and 1e-4.
* the same tables in both (``test_*_exact``, diffusers' tables cast to float64 after building, ours replaced by
  them, as in tests/math/test_steps_vs_diffusers.py): DDIM, DDPM and Heun compute in float64 and agree to 1e-10 (measured
  about 1e-14); DDPM's clamp of its posterior variance to 1e-20 adds 1e-10 * z at its last step, so 1e-8 there.
  The Euler family and DPM-Solver agree to float32 rounding of the update: 1e-5, 5e-5 for epsilon-prediction,
  whose x = D + sigma F of order 15 carries float32 rounding of 1e-6 per step.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from conftest import TinyNet

import zsnr_kernels as zk

diffusers = pytest.importorskip("diffusers")
zd = pytest.importorskip("zsnr_kernels.diffusers")

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
STOCHASTIC = {"EulerAncestralDiscreteScheduler", "DDPMScheduler", "KDPM2AncestralDiscreteScheduler",
              "DPMSolverSDEScheduler", "LCMScheduler", "TCDScheduler"}
#: consistency-model schedulers: their timesteps come from the distillation schedule (original_inference_steps, T // n
#: apart, always starting at T - 1), not timestep_spacing; diffusers keeps alphas_cumprod[-1] = 0 there (exact at
#: zero SNR for v/x0 models, as its DDIM)
CONSISTENCY = {"LCMScheduler", "TCDScheduler"}
#: the schedulers on a discrete training table (the EDM ones step on continuous grids: test_diffusers_edm.py)
DISCRETE = [name for name in zd.SCHEDULERS if not name.startswith("EDM")]
#: namesakes without rescale_betas_zero_snr, which the classes here add
ADDS_ZERO_SNR = {"HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler",
                 "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler", "DPMSolverSinglestepScheduler"}
#: schedulers with midpoint evaluations, whose timesteps are interpolated from float64 sigmas here: diffusers' float32
#: moves them by up to 3e-3, and by 1e-2 where its ancestral sigma_down = sqrt(sigma'^2 - sigma_up^2) cancels (a
#: two-step schedule); the net barely feels that
MIDPOINTS = {"KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler"}
MIDPOINT_ATOL = 1e-2
#: diffusers' namesakes that refuse prediction_type="sample" at step (these take it)
NO_SAMPLE = {"EulerAncestralDiscreteScheduler", *MIDPOINTS}
#: namesakes without ``timestep_spacing`` and ``steps_offset`` (diffusers' singlestep DPM-Solver spaces its timesteps as
#: DPM-Solver's ``linspace`` only, reaching the last training timestep): those keys are left out of their configs
NO_SPACING = {"DPMSolverSinglestepScheduler"}
F64 = torch.float64


def _noise(dtype=torch.float32, seed=0, shape=(2, 4, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _loop(sched, net, noise, *, seed=None, **step_kw):
    """A pipeline's loop over ``sched.timesteps`` (set_timesteps already called): (final sample, model inputs).
    A generator seeded with ``seed`` goes to ``step`` where it takes one, as pipelines do; a scheduler with a
    ``noise_sampler`` (DPMSolverSDE: a Brownian tree by default, over its own float32 table) gets the same one on
    both sides instead: independent normals from that generator, one per call."""
    if seed is not None and "generator" in inspect.signature(sched.step).parameters:
        step_kw["generator"] = torch.Generator().manual_seed(seed)
    if seed is not None and hasattr(sched, "noise_sampler"):
        g = torch.Generator().manual_seed(seed)
        sched.noise_sampler = lambda s, sn: torch.randn(noise.shape, generator=g, dtype=noise.dtype)
    sample = noise * sched.init_noise_sigma
    inputs = []
    for t in sched.timesteps:
        x_in = sched.scale_model_input(sample, t)
        inputs.append(x_in)
        sample = sched.step(net(x_in, t), t, sample, **step_kw).prev_sample
    return sample, inputs


def _pair(name, steps, **config):
    """(diffusers scheduler, ours from its config), both with ``steps`` timesteps set."""
    ref = getattr(diffusers, name)(**_own(name, config, getattr(diffusers, name)))
    ours = zd.SCHEDULERS[name].from_config(ref.config)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    return ref, ours


def _own(name, config, cls=None):
    """``config`` without the keys the scheduler (the class here, or ``cls``) does not have: the spacing keys of
    :data:`NO_SPACING`'s namesakes, which the tests pass every scheduler."""
    if name not in NO_SPACING:
        return dict(config)
    params = inspect.signature((cls or zd.SCHEDULERS[name]).__init__).parameters
    return {k: v for k, v in config.items() if k in params}


def _compare(ref, ours, net, noise, *, seed=None, **step_kw):
    """Run both; return (max |final difference|, max |model input difference|) after checking the timesteps."""
    if type(ref).__name__ in MIDPOINTS:
        torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=MIDPOINT_ATOL)
    else:
        assert torch.equal(ours.timesteps, ref.timesteps), (ours.timesteps, ref.timesteps)
    a, ins_a = _loop(ref, net, noise, seed=seed, **step_kw)
    b, ins_b = _loop(ours, net, noise, seed=seed, **step_kw)
    assert len(ins_a) == len(ins_b)
    assert torch.isfinite(b).all()
    return (a - b).abs().max().item(), max((u - v).abs().max().item() for u, v in zip(ins_a, ins_b))


def _abar(sigmas):
    """alphas_cumprod of noise levels, 1 / (1 + sigma^2): compared instead of sigma, whose float32 rounding near
    abar = 1 (sigma ~ 0.03 on SD's table) is relatively 1e-5 where abar's is 1e-7."""
    return 1.0 / (1.0 + sigmas * sigmas)


def _step_sigmas(ref) -> torch.Tensor:
    """diffusers' sigmas of a two-evaluation scheduler with each step's sigma once, as here (float64)."""
    sig = ref.sigmas.double()
    if isinstance(ref, diffusers.HeunDiscreteScheduler):  # every inner sigma repeated once
        return torch.cat([sig[:1], sig[1::2]])
    if isinstance(ref, diffusers.DPMSolverSDEScheduler):  # every inner sigma repeated once
        return torch.cat([sig[:1], sig[1:-1:2], sig[-1:]])
    if type(ref).__name__ in MIDPOINTS:  # every sigma after the first repeated once, the final one twice
        return torch.cat([sig[:1], sig[1:-1:2]])
    return sig


def _share_tables(ref, ours):
    """Make both schedulers step on the same float64 tables: diffusers' float32 ones, cast after building."""
    if hasattr(ref, "alphas_cumprod") and not hasattr(ref, "sigmas"):  # DDIM, DDPM: tables by timestep
        ref.alphas_cumprod = ref.alphas_cumprod.double()
        ours.alphas_cumprod = ref.alphas_cumprod.clone()
        if hasattr(ref, "final_alpha_cumprod"):  # DDIM's last target (set_alpha_to_one=False: abar_0)
            ref.final_alpha_cumprod = ref.final_alpha_cumprod.double()
            ours.final_alpha_cumprod = ref.final_alpha_cumprod.clone()
    elif isinstance(ref, diffusers.HeunDiscreteScheduler):  # diffusers repeats every inner sigma once
        ref.sigmas = ref.sigmas.double()
        ours.sigmas = torch.cat([ref.sigmas[:1], ref.sigmas[1::2]])
    else:
        ref.sigmas = ref.sigmas.double()
        ours.sigmas = ref.sigmas.clone()


# ---------------------------------------------------------------------------------------------- tables and setup


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("rescale", [False, True])
def test_training_tables_match_diffusers(beta_schedule, rescale):
    """alphas_cumprod from zsnr_kernels.schedules equals diffusers' float32 cumprod to its rounding, and the
    zero-SNR rescale ends at exactly 0 (diffusers' DDIM too; its Euler family then sets 2**-24)."""
    cfg = {"beta_schedule": beta_schedule, "rescale_betas_zero_snr": rescale}
    ref, ours = diffusers.DDIMScheduler(**cfg), zd.ZSNRDDIMScheduler(**cfg)
    assert ours.alphas_cumprod.dtype == F64
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.double(), rtol=2e-5, atol=1e-9)
    if rescale:
        assert ours.alphas_cumprod[-1] == 0.0 == ref.alphas_cumprod[-1]


@pytest.mark.parametrize("name", DISCRETE)
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_timesteps_and_sigmas_match_diffusers(name, spacing):
    """Same timesteps for every step count in 1..40 (where numpy's arange does not add diffusers' spurious
    timestep -1 to trailing; midpoint timesteps to float32 rounding), and for the sigma-walking schedulers the same
    sigmas to float32 rounding."""
    ref, ours = _pair(name, 1, timestep_spacing=spacing, steps_offset=1, **SD)  # (diffusers' KDPM2 builds in 1 s)
    for steps in range(1, 41):
        for s in (ref, ours):
            s.set_timesteps(steps)
        if name in MIDPOINTS:
            torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=MIDPOINT_ATOL)
        else:
            assert torch.equal(ours.timesteps, ref.timesteps), (steps, ours.timesteps, ref.timesteps)
        if hasattr(ref, "sigmas"):
            torch.testing.assert_close(_abar(ours.sigmas), _abar(_step_sigmas(ref)), rtol=2e-5, atol=0)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler"])
@pytest.mark.parametrize("grid", ["use_karras_sigmas", "use_exponential_sigmas"])
@pytest.mark.parametrize("betas", [SD, {}], ids=["sd", "linear"])
def test_karras_and_exponential_grids_match_diffusers(name, grid, betas):
    """Karras/exponential sigmas equal diffusers' to float32 rounding of the grid's ends: its smallest sigma is
    relatively off by up to 3e-4 (linear betas: abar_0 = 0.9999 leaves 1 - abar four float32 digits), and the
    geometric grid carries that through, so rtol 5e-4 on sigma.  The timesteps come from float64 log sigmas here
    (diffusers' float32 table moves them by up to 1e-2).  DPM-Solver's are integers: rounded for Karras (equal),
    truncated for exponential, which can put them 1 apart where t is within 1e-2 of an integer; diffusers also
    truncates t(sigma_max) = 998.9999997 to 998 on SD's table, where the timestep of sigma_max is 999."""
    ref, ours = _pair(name, 12, **{grid: True}, **betas)
    sig_ref = ref.sigmas.double()
    if name == "HeunDiscreteScheduler":
        sig_ref = torch.cat([sig_ref[:1], sig_ref[1::2]])
    torch.testing.assert_close(ours.sigmas, sig_ref, rtol=5e-4, atol=0)
    if name == "DPMSolverMultistepScheduler":
        assert ours.timesteps[0] == 999
        atol = 1 if grid == "use_exponential_sigmas" else 0
    else:
        atol = 1e-2
    torch.testing.assert_close(ours.timesteps.double(), ref.timesteps.double(), rtol=0, atol=atol)


# ------------------------------------------------------------------------------------------- parity, own tables


@pytest.mark.parametrize("name", DISCRETE)
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_parity(name, spacing, prediction):
    """Each scheduler built from the diffusers scheduler's config gives its model inputs and result (float32)."""
    if name in NO_SAMPLE and prediction == "sample":
        pytest.skip(f"diffusers' {name} does not implement prediction_type='sample'")
    cfg = dict(timestep_spacing=spacing, prediction_type=prediction, steps_offset=1, **SD)
    if name in ("DDIMScheduler", "DDPMScheduler"):
        cfg["clip_sample"] = False
    ref, ours = _pair(name, 10, **cfg)
    seed = 5 if name in STOCHASTIC else None
    d_final, d_inputs = _compare(ref, ours, TinyNet(4, seed=3, dtype=torch.float32), _noise(), seed=seed)
    tol = 3e-4 if prediction == "epsilon" else 1e-4
    assert d_final <= tol and d_inputs <= tol, (d_final, d_inputs)


@pytest.mark.parametrize("name", DISCRETE)
def test_parity_zero_snr_leading(name):
    """rescale_betas_zero_snr=True with ``leading`` spacing never reaches the last timestep: a finite schedule on the
    rescaled table, where diffusers' 2**-24 substitute plays no part.  Namesakes without rescale_betas_zero_snr
    (Heun, LMS, KDPM2) get the rescaled betas as trained_betas.  The consistency schedulers (LCM, TCD) ignore the
    spacing and start at 999, sigma = inf, where diffusers' are exact too (alphas_cumprod 0): compared there.
    Singlestep DPM-Solver has no spacing but DPM-Solver's ``linspace``, which starts at 999 (where diffusers' table
    has no noise level): test_singlestep_zero_snr_is_the_limit_of_diffusers_substitute instead."""
    if name in NO_SPACING:
        pytest.skip(f"{name} has no leading spacing")
    cfg = dict(timestep_spacing="leading", prediction_type="v_prediction", rescale_betas_zero_snr=True, **SD)
    if name in ADDS_ZERO_SNR:
        ours = zd.SCHEDULERS[name](**cfg)
        del cfg["rescale_betas_zero_snr"]
        ref = getattr(diffusers, name)(trained_betas=ours.betas.tolist(), **cfg)
        ref.set_timesteps(10)
        ours.set_timesteps(10)
    else:
        ref, ours = _pair(name, 10, **cfg)
    assert ours.timesteps.max() < 999 or (name in CONSISTENCY and ours.alphas_cumprod[ours.timesteps[0]] == 0)
    seed = 5 if name in STOCHASTIC else None
    d_final, d_inputs = _compare(ref, ours, TinyNet(4, seed=4), _noise(), seed=seed)
    assert d_final <= 1e-4 and d_inputs <= 1e-4, (d_final, d_inputs)


# ----------------------------------------------------------------------------------------- parity, shared tables


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [10, 7])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_exact(spacing, prediction, steps, eta):
    """DDIM in float64 on shared tables, with diffusers' step to t - T // steps (7 does not divide 1000)."""
    ref, ours = _pair("DDIMScheduler", steps, timestep_spacing=spacing, prediction_type=prediction,
                      clip_sample=False, **SD)
    _share_tables(ref, ours)
    d_final, d_inputs = _compare(ref, ours, TinyNet(4, seed=1), _noise(F64), seed=7, eta=eta)
    assert d_final <= 1e-10 and d_inputs <= 1e-10, (d_final, d_inputs)


@pytest.mark.parametrize("clipped", [False, True])
@pytest.mark.parametrize("thresholding", [False, True])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_ddim_clip_threshold_exact(clipped, thresholding, set_alpha_to_one, steps_offset):
    """clip_sample / dynamic thresholding of D, with the noise direction from the clipped or the raw prediction
    (``use_clipped_model_output``), and the final alpha of set_alpha_to_one.  The output is scaled so that D
    exceeds [-1, 1] and the clipping acts.  steps_offset=0 with set_alpha_to_one=False ends with a step from t = 0
    to abar_0 itself: zero length, yet diffusers still moves the sample by the clipping correction."""
    ref, ours = _pair("DDIMScheduler", 10, prediction_type="epsilon", clip_sample=True, thresholding=thresholding,
                      set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset, **SD)
    _share_tables(ref, ours)
    net = TinyNet(4, seed=2)

    def loud(y, t):
        return 3.0 * net(y, t)

    d_final, d_inputs = _compare(ref, ours, loud, _noise(F64) * 3, seed=3, eta=0.5,
                                 use_clipped_model_output=clipped)
    assert d_final <= 1e-10 and d_inputs <= 1e-10, (d_final, d_inputs)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip_sample", [False, True])
def test_ddpm_exact(spacing, prediction, clip_sample):
    """DDPM (variance fixed_small) in float64 on shared tables.  diffusers clamps the posterior variance to 1e-20
    and so adds 1e-10 * z at its last step where the exact posterior adds nothing: 1e-8."""
    ref, ours = _pair("DDPMScheduler", 10, timestep_spacing=spacing, prediction_type=prediction,
                      clip_sample=clip_sample, **SD)
    _share_tables(ref, ours)
    d_final, d_inputs = _compare(ref, ours, TinyNet(4, seed=6), _noise(F64), seed=11)
    assert d_final <= 1e-8 and d_inputs <= 1e-10, (d_final, d_inputs)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip_sample", [False, True])
def test_heun_exact(spacing, prediction, clip_sample):
    """Heun in float64 on shared sigmas: both evaluations of every step, the Euler last step, clip_sample."""
    ref, ours = _pair("HeunDiscreteScheduler", 8, timestep_spacing=spacing, prediction_type=prediction,
                      clip_sample=clip_sample, **SD)
    _share_tables(ref, ours)
    d_final, d_inputs = _compare(ref, ours, TinyNet(4, seed=8), _noise(F64))
    assert d_final <= 1e-10 and d_inputs <= 1e-10, (d_final, d_inputs)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_euler_family_exact(name, spacing, prediction):
    """Euler and Euler ancestral on shared sigmas: diffusers' float32 update, so float32 agreement."""
    ref, ours = _pair(name, 10, timestep_spacing=spacing, prediction_type=prediction, **SD)
    _share_tables(ref, ours)
    seed = 5 if name in STOCHASTIC else None
    d_final, d_inputs = _compare(ref, ours, TinyNet(4, seed=9), _noise(F64), seed=seed)
    tol = 5e-5 if prediction == "epsilon" else 1e-5
    assert d_final <= tol and d_inputs <= tol, (d_final, d_inputs)


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [8, 20])
def test_dpm_solver_exact(algorithm, solver_type, order, steps):
    """DPM-Solver++ orders 1-3 with diffusers' order schedule (fewer than 15 steps lower the last two orders) on
    shared sigmas.  Not compared: the SDE at order 3, where diffusers' update has a sign error (module
    docstring); see test_dpm_sde_order_3_is_k_diffusions."""
    if algorithm == "sde-dpmsolver++" and order == 3:
        pytest.skip("diffusers' third-order SDE-DPM-Solver++ update is wrong; ours follows k-diffusion")
    ref, ours = _pair("DPMSolverMultistepScheduler", steps, algorithm_type=algorithm, solver_type=solver_type,
                      solver_order=order, prediction_type="v_prediction", **SD)
    _share_tables(ref, ours)
    seed = 13 if algorithm.startswith("sde") else None
    d_final, d_inputs = _compare(ref, ours, TinyNet(4, seed=10), _noise(F64), seed=seed)
    assert d_final <= 1e-5 and d_inputs <= 1e-5, (d_final, d_inputs)


@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("euler_at_final", [False, True])
@pytest.mark.parametrize("grid", ["use_karras_sigmas", "use_exponential_sigmas"])
def test_dpm_solver_grids_and_final_sigma(final_sigmas_type, euler_at_final, grid):
    """DPM++ 2M Karras/exponential with both final sigma types, on shared sigmas and timesteps."""
    ref, ours = _pair("DPMSolverMultistepScheduler", 12, final_sigmas_type=final_sigmas_type,
                      euler_at_final=euler_at_final, prediction_type="epsilon", **{grid: True}, **SD)
    _share_tables(ref, ours)
    ours.timesteps = ref.timesteps.clone()
    d_final, d_inputs = _compare(ref, ours, TinyNet(4, seed=12), _noise(F64))
    assert d_final <= 1e-5 and d_inputs <= 1e-5, (d_final, d_inputs)


def test_dpm_sde_order_3_is_k_diffusions(kdiff):
    """sde-dpmsolver++ with solver_order=3 (20 steps: no lowered orders but the last) equals k-diffusion's
    sample_dpmpp_3m_sde on the same sigmas and noise, in float64 (solver_type="heun": k-diffusion's second step,
    with one remembered prediction, is the heun-type update)."""
    sampling, _ = kdiff
    sched = zd.ZSNRDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3,
                                               solver_type="heun", prediction_type="v_prediction", **SD)
    sched.set_timesteps(20)
    net, noise = TinyNet(4, seed=14), _noise(F64)
    sigmas = sched.sigmas.clone()
    t_of = {float(s): t for s, t in zip(sigmas, sched.timesteps)}
    draws = torch.Generator().manual_seed(15)
    start = noise * zk.parameterization("v").noise_scale(float(sigmas[0]))  # k-diffusion's x = sigma_0 noise
    ours, _ = _loop(sched, net, start, seed=15)

    def denoiser(x, sigma):  # k-diffusion's VE state x; the network takes y = x / sqrt(sigma^2 + 1)
        s = float(sigma[0])
        c = 1.0 / math.sqrt(s * s + 1.0)
        return c * c * x - s * c * net(x * c, t_of[s])

    ref = sampling.sample_dpmpp_3m_sde(
        denoiser, noise * sigmas[0], sigmas, disable=True,
        noise_sampler=lambda s, sn: torch.randn(noise.shape, generator=draws, dtype=torch.float32).double())
    assert (ours - ref).abs().max().item() <= 1e-10


# ---------------------------------------------------------------------------------------------- zero terminal SNR

ZERO_SNR = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction", **SD)


@pytest.mark.parametrize("name", DISCRETE)
def test_zero_snr_starts_at_inf(name):
    """The first model call is at sigma = inf, timestep 999, with the noise itself as model input; all finite."""
    sched = zd.SCHEDULERS[name](**_own(name, ZERO_SNR))
    sched.set_timesteps(10)
    assert sched.timesteps[0] == 999
    if hasattr(sched, "sigmas"):
        assert sched.sigmas[0] == math.inf and sched.init_noise_sigma == 1.0
    noise = _noise()
    seen = []

    def net(y, t):
        seen.append(y)
        return TinyNet(4, seed=16, dtype=torch.float32)(y, t)

    out, _ = _loop(sched, net, noise, seed=17)
    assert torch.equal(seen[0], noise)
    assert all(torch.isfinite(y).all() for y in seen) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler"])
@pytest.mark.parametrize("grid", ["use_karras_sigmas", "use_exponential_sigmas"])
def test_zero_snr_grids(name, grid):
    """A Karras/exponential grid of a zero-SNR model starts at inf (timestep 999) and continues from the largest
    finite training sigma (diffusers: from 4096); one step is the start alone, as in diffusers."""
    sched = zd.SCHEDULERS[name](**ZERO_SNR, **{grid: True})
    largest_finite = zk.schedules.sigmas_from_alphas_cumprod(sched.alphas_cumprod)[-2]
    for steps in (1, 2, 6):
        sched.set_timesteps(steps)
        assert sched.sigmas[0] == math.inf and sched.timesteps[0] == 999
        assert steps == 1 or torch.isclose(sched.sigmas[1], largest_finite, rtol=1e-12, atol=0)
        out, inputs = _loop(sched, TinyNet(4, seed=30, dtype=torch.float32), _noise())
        assert torch.isfinite(out).all() and all(torch.isfinite(y).all() for y in inputs)


_SAMPLER_OF = {"EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_ancestral",
               "DPMSolverMultistepScheduler": "dpmpp_2m", "DDIMScheduler": "ddim", "HeunDiscreteScheduler": "heun",
               "LMSDiscreteScheduler": "lms", "KDPM2DiscreteScheduler": "dpm_2",
               "KDPM2AncestralDiscreteScheduler": "dpm_2_ancestral", "UniPCMultistepScheduler": "unipc",
               "DPMSolverSDEScheduler": "dpmpp_sde"}


@pytest.mark.parametrize("name", list(_SAMPLER_OF))
def test_zero_snr_equals_sample(name):
    """At zero SNR each scheduler's loop is zsnr_kernels.sample on its own sigmas (inf first), in float64: the
    model called at each evaluation's timestep (midpoints included), the two-stage samplers' placeholder evaluation
    after the step from inf changing nothing."""
    sampler = _SAMPLER_OF[name]
    sched = zd.SCHEDULERS[name](**ZERO_SNR, **({"clip_sample": False} if name == "DDIMScheduler" else {}))
    sched.set_timesteps(10)
    net, noise = TinyNet(4, seed=18), _noise(F64)
    if name == "DDIMScheduler":
        sigmas = zk.schedules.sigmas_from_alphas_cumprod(sched.alphas_cumprod[sched.timesteps])
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        t_of = {float(s): t for s, t in zip(sigmas, sched.timesteps.unique(sorted=True).flip(0))}
    else:
        sigmas = sched.sigmas
        t_of = {sched._eval_sigma(k): t for k, t in reversed(list(enumerate(sched.timesteps)))}
    ours, _ = _loop(sched, net, noise, seed=19)
    draws = torch.Generator().manual_seed(19)
    def t_at(sigma):  # (the library forms a midpoint sigma its own way: the nearest evaluation's, to rounding)
        return t_of[sigma if sigma in t_of else min(t_of, key=lambda s: abs(s - sigma))]

    ref = zk.sample(lambda y, s: net(y, t_at(float(s[0]))), noise, sigmas, sampler=sampler,
                    eta=0.0 if sampler == "ddim" else 1.0,
                    noise_sampler=lambda s, sn: torch.randn(noise.shape, generator=draws, dtype=F64))
    assert sigmas[0] == math.inf
    assert (ours - ref).abs().max().item() <= 1e-12


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                  "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_zero_snr_is_the_limit_of_diffusers_substitute(name):
    """diffusers replaces alphas_cumprod[-1] = 0 by delta (2**-24, sigma_max = 4096).  As delta shrinks (sigma_max
    256, 1024, 4096) its run approaches ours from sigma = inf: by about 4x per step for the single-step samplers
    (error ~ 1/sigma_max), monotonically for DPM++ 2M and UniPC (~ 1/log sigma_max, docs/design.md §2.3).  diffusers computes in
    float32, whose rounding of x ~ 4096 z sets the floor."""
    ours = zd.SCHEDULERS[name](**ZERO_SNR)
    ours.set_timesteps(10)
    net, noise = TinyNet(4, seed=20, dtype=torch.float32), _noise()
    exact, _ = _loop(ours, net, noise, seed=21)
    errors = []
    for delta in (2.0**-16, 2.0**-20, 2.0**-24):
        ref = getattr(diffusers, name)(**ZERO_SNR)
        ref.alphas_cumprod[-1] = delta
        ref.set_timesteps(10)
        approx, _ = _loop(ref, net, noise, seed=21)
        errors.append((approx - exact).abs().max().item())
    assert errors[0] > errors[1] > errors[2], errors
    if name not in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):  # multistep: ~ 1/log sigma_max
        assert errors[2] < errors[0] / 8, errors


def test_zero_snr_heun_is_euler_then_diffusers_heun():
    """Heun from sigma = inf: an Euler step to sigma_1 (its trapezoid has no limit there), then diffusers' Heun on
    the rest of the schedule (finite), on the same float64 sigmas."""
    ours = zd.ZSNRHeunDiscreteScheduler(**ZERO_SNR)
    ours.set_timesteps(8)
    net, noise = TinyNet(4, seed=22), _noise(F64)
    final, inputs = _loop(ours, net, noise)
    s1 = float(ours.sigmas[1])
    y1 = zk.euler_step(noise, net(noise, ours.timesteps[0]), math.inf, s1, backend="torch").y
    ref = diffusers.HeunDiscreteScheduler(**{k: v for k, v in ZERO_SNR.items() if k != "rescale_betas_zero_snr"},
                                          trained_betas=ours.betas.tolist())
    assert len(ours.timesteps) == 2 * 8 - 1  # diffusers' layout: the step from inf keeps a no-op second evaluation
    assert torch.equal(inputs[1], y1.to(inputs[1].dtype))  # ... whose step leaves the sample as it is
    ref.set_timesteps(timesteps=ours.timesteps[2::2].tolist())
    rest = ours.sigmas[1:]
    ref.sigmas = torch.cat([rest[:1], rest[1:-1].repeat_interleave(2), rest[-1:]])
    x, ref_inputs = y1 * math.sqrt(s1 * s1 + 1.0), []
    for t in ref.timesteps:
        x_in = ref.scale_model_input(x, t)
        ref_inputs.append(x_in)
        x = ref.step(net(x_in, t), t, x).prev_sample
    assert torch.equal(ref.timesteps, ours.timesteps[2:])
    assert max((u - v).abs().max().item() for u, v in zip(inputs[2:], ref_inputs)) <= 1e-10
    assert (final - x).abs().max().item() <= 1e-10


@pytest.mark.parametrize("strength", [0.3, 0.5, 0.9, 1.0])
def test_zero_snr_heun_img2img_indexing(strength):
    """img2img and inpainting pipelines slice ``timesteps[t_start * order:]`` and call
    ``set_begin_index(t_start * order)``: with diffusers' layout kept at zero SNR that lands on the first
    evaluation of step t_start, and the run is finite."""
    sched = zd.ZSNRHeunDiscreteScheduler(**ZERO_SNR)
    n = 10
    sched.set_timesteps(n)
    t_start = max(n - min(int(n * strength), n), 0)
    timesteps = sched.timesteps[t_start * sched.order:]
    sched.set_begin_index(t_start * sched.order)
    net, x0, noise = TinyNet(4, seed=30), _noise(F64) * 0.5, _noise(F64)
    y = sched.add_noise(x0, noise, timesteps[:1])
    assert torch.equal(y, noise) if t_start == 0 else not torch.equal(y, noise)
    for t in timesteps:
        y = sched.step(net(sched.scale_model_input(y, t), t), t, y).prev_sample
    assert torch.isfinite(y).all()


def test_zero_snr_ddim_exact_vs_diffusers():
    """diffusers' DDIM keeps alphas_cumprod[-1] = 0 exactly; with v-prediction it is exact there too, and equal."""
    ref, ours = _pair("DDIMScheduler", 10, clip_sample=False, **ZERO_SNR)
    _share_tables(ref, ours)
    d_final, d_inputs = _compare(ref, ours, TinyNet(4, seed=23), _noise(F64), seed=24, eta=1.0)
    assert d_final <= 1e-10 and d_inputs <= 1e-10, (d_final, d_inputs)


@pytest.mark.parametrize("name", DISCRETE)
def test_epsilon_at_inf_is_refused(name):
    sched = zd.SCHEDULERS[name](**_own(name, {**ZERO_SNR, "prediction_type": "epsilon"}))
    sched.set_timesteps(5)
    t = sched.timesteps[0]
    with pytest.raises(ValueError, match="epsilon-prediction model has no denoised prediction"):
        sched.step(torch.zeros(1, 4, 2, 2), t, torch.ones(1, 4, 2, 2))


# ---------------------------------------------------------------------------------------------- config and API


@pytest.mark.parametrize("name", DISCRETE)
def test_config_round_trip(name, tmp_path):
    """save_config / from_pretrained keep every key; the config holds diffusers' keys (plus rescale_betas_zero_snr
    where the namesake has none) and a diffusers scheduler loads it back."""
    sched = zd.SCHEDULERS[name](**_own(name, ZERO_SNR))
    def keys(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    sched.save_config(tmp_path)
    loaded = zd.SCHEDULERS[name].from_pretrained(tmp_path)
    assert keys(loaded.config) == keys(sched.config)
    extra = {"rescale_betas_zero_snr"} if name in ADDS_ZERO_SNR else set()
    assert set(keys(sched.config)) == set(keys(getattr(diffusers, name)().config)) | extra
    loaded.set_timesteps(6)
    sched.set_timesteps(6)
    assert torch.equal(loaded.timesteps, sched.timesteps)
    back = getattr(diffusers, name).from_config(sched.config)
    assert back.config.get("timestep_spacing", "trailing") == "trailing"
    assert back.config.prediction_type == "v_prediction"


def test_switch_between_families_keeps_the_model_config():
    """from_config of another scheduler's config takes the shared keys (betas, prediction, spacing)."""
    ddim = diffusers.DDIMScheduler(**ZERO_SNR, clip_sample=False, steps_offset=1)
    euler = zd.ZSNREulerDiscreteScheduler.from_config(ddim.config)
    for key in ("beta_schedule", "beta_start", "beta_end", "prediction_type", "timestep_spacing",
                "rescale_betas_zero_snr", "steps_offset"):
        assert euler.config[key] == ddim.config[key]
    assert diffusers.DDIMScheduler in euler.compatibles


@pytest.mark.parametrize(("name", "option"), [
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True}),
    ("DDIMScheduler", {"beta_schedule": "cosine"}),
    ("DDIMScheduler", {"prediction_type": "flow_prediction"}),
])
def test_unsupported_options_are_named(name, option):
    """(Every option diffusers takes and these refuse: tests/integrations/test_diffusers_contract.py.)"""
    (key, value), = option.items()
    with pytest.raises(ValueError, match=f"{key}={value!r}"):
        zd.SCHEDULERS[name](**option)


def test_euler_churn_is_refused_with_the_alternative():
    sched = zd.ZSNREulerDiscreteScheduler(**SD)
    sched.set_timesteps(4)
    t = sched.timesteps[0]
    with pytest.raises(ValueError, match="zsnr_kernels.sample"):
        sched.step(torch.zeros(1, 4, 2, 2), t, torch.ones(1, 4, 2, 2), s_churn=1.0)


@pytest.mark.parametrize("name", ["DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_step_before_set_timesteps_and_past_the_end(name):
    """DDIM and DPM-Solver need set_timesteps before step, as in diffusers (the Euler family steps over the training
    schedule then: test_diffusers_contract.py); a step past the end of the schedule says to start a new run."""
    sched = zd.SCHEDULERS[name](**SD)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(torch.zeros(1, 4, 2, 2), 999, torch.ones(1, 4, 2, 2))
    sched = zd.ZSNREulerDiscreteScheduler(**SD)
    sched.set_timesteps(2)
    y = torch.ones(1, 4, 2, 2)
    for t in sched.timesteps:
        y = sched.step(torch.zeros_like(y), t, y).prev_sample
    with pytest.raises(ValueError, match="call set_timesteps again"):
        sched.step(torch.zeros_like(y), sched.timesteps[-1], y)


@pytest.mark.parametrize("name", DISCRETE)
def test_add_noise_gives_the_model_input(name):
    """add_noise returns sqrt(abar) x0 + sqrt(1 - abar) noise: diffusers' for the VP schedulers, its
    scale_model_input of diffusers' (variance-exploding) add_noise for the Euler family; the noise at zero SNR."""
    ref, ours = _pair(name, 10, **SD)
    x0, z = _noise(F64, seed=25), _noise(F64, seed=26)
    t = ref.timesteps[2:3]  # a step's first evaluation (diffusers' KDPM2 gives a midpoint timestep a step's sigma)
    got = ours.add_noise(x0, z, t)
    want = ref.add_noise(x0, z, t)
    if not isinstance(ref, (diffusers.DDIMScheduler, diffusers.DDPMScheduler, diffusers.DPMSolverMultistepScheduler)):
        want = ref.scale_model_input(want, t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    zsnr = zd.SCHEDULERS[name](**_own(name, ZERO_SNR))
    zsnr.set_timesteps(10)
    assert torch.equal(zsnr.add_noise(x0, z, zsnr.timesteps[:1]), z)


def test_img2img_begin_index():
    """A pipeline starting mid-schedule (set_begin_index, add_noise at the first timestep it runs) equals
    diffusers' Euler there."""
    ref, ours = _pair("EulerDiscreteScheduler", 10, prediction_type="v_prediction", **SD)
    net, x0, z = TinyNet(4, seed=27, dtype=torch.float32), _noise(seed=28), _noise(seed=29)
    results = []
    for sched in (ref, ours):
        sched.set_timesteps(10)
        sched.set_begin_index(4)
        ts = sched.timesteps[4:]
        sample = sched.add_noise(x0, z, ts[:1])
        for t in ts:
            sample = sched.step(net(sched.scale_model_input(sample, t), t), t, sample).prev_sample
        results.append(sample)
    assert (results[0] - results[1]).abs().max().item() <= 2e-5


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler"])
def test_get_velocity_matches_diffusers(name):
    """The v-prediction training target, as diffusers' training scripts call it (exact -x0 at zero SNR)."""
    ref = getattr(diffusers, name)(rescale_betas_zero_snr=True, beta_schedule="scaled_linear")
    ours = zd.SCHEDULERS[name](rescale_betas_zero_snr=True, beta_schedule="scaled_linear")
    x0, noise = _noise(F64), _noise(F64) * 0.5
    ts = torch.tensor([999, 500])
    want = ref.get_velocity(x0[:2], noise[:2], ts)
    torch.testing.assert_close(ours.get_velocity(x0[:2], noise[:2], ts), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(ours.get_velocity(x0[:1], noise[:1], torch.tensor([999])), -x0[:1])


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
def test_euler_refuses_integer_indices_as_diffusers_does(name):
    ref = getattr(diffusers, name)()
    ours = zd.SCHEDULERS[name]()
    for s in (ref, ours):
        s.set_timesteps(5)
    x = torch.zeros(1, 4, 2, 2)
    for index in (0, torch.tensor(0)):
        with pytest.raises(ValueError, match="integer indices"):
            ref.step(x, index, x)
        with pytest.raises(ValueError, match="integer indices"):
            ours.step(x, index, x)


# ------------------------------------------------------------------------------------- the rest of the contract


@pytest.mark.parametrize("name", DISCRETE)
def test_prediction_type_set_on_a_live_scheduler_takes_effect(name):
    """diffusers' steps read ``config.prediction_type`` when they run (training scripts set it in place)."""
    extra = {"clip_sample": False} if name in ("DDIMScheduler", "DDPMScheduler") else {}
    net = TinyNet(4, seed=1)
    mutated = zd.SCHEDULERS[name](**SD, **extra)
    mutated.register_to_config(prediction_type="v_prediction")
    fresh = zd.SCHEDULERS[name](**SD, **extra, prediction_type="v_prediction")
    outs = []
    for s in (mutated, fresh):
        s.set_timesteps(10)
        outs.append(_loop(s, net, _noise(seed=3), seed=0)[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", DISCRETE)
def test_numpy_and_tensor_step_counts_are_taken(name):
    sched = zd.SCHEDULERS[name](**SD)
    sched.set_timesteps(12)
    want = sched.timesteps.clone()
    for n in (np.int64(12), torch.tensor(12)):
        sched.set_timesteps(n)
        assert torch.equal(sched.timesteps, want)
    for bad in (12.0, True, "12", 0):
        with pytest.raises(ValueError, match="num_inference_steps must be an int"):
            sched.set_timesteps(bad)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                  "HeunDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_add_noise_before_set_timesteps_uses_the_training_schedule(name):
    """As diffusers (training: a noise scheduler used only for add_noise), in this module's state space: diffusers'
    Euler family returns x0 + sigma noise, ours the model input (x0 + sigma noise) c_in(sigma)."""
    ref, ours = getattr(diffusers, name)(**SD), zd.SCHEDULERS[name](**SD)
    x0, noise = _noise(F64, seed=1), _noise(F64, seed=2)
    t = torch.tensor([999, 3])
    got = ours.add_noise(x0, noise, t)
    abar = ours.alphas_cumprod[t].double()[:, None, None, None]  # float64 tables (diffusers' are float32)
    torch.testing.assert_close(got, abar.sqrt() * x0 + (1 - abar).sqrt() * noise, rtol=1e-12, atol=1e-12)
    sigma = ((1 - abar) / abar).sqrt()
    if name != "DPMSolverMultistepScheduler":  # its add_noise needs sigmas diffusers builds only in set_timesteps
        x_ve = ref.add_noise(x0, noise, t).double()
        torch.testing.assert_close(got, x_ve / (sigma**2 + 1).sqrt(), rtol=1e-5, atol=1e-5)


def test_a_step_that_leaves_the_sample_returns_a_new_tensor():
    """DDIM with set_alpha_to_one=False ends at t = 0 on its own noise level: the sample is unchanged, but
    prev_sample is a new tensor, as in diffusers (editing it must not edit the caller's latents)."""
    sched = zd.ZSNRDDIMScheduler(**SD, set_alpha_to_one=False, clip_sample=False)
    sched.set_timesteps(5)
    x = _noise()
    out = sched.step(torch.zeros_like(x), sched.timesteps[-1], x).prev_sample
    assert out is not x and out.data_ptr() != x.data_ptr()


def test_heun_takes_latents_a_pipeline_replaced_between_its_two_evaluations():
    """Inpainting pipelines blend the known region into the latents after every ``step`` (and a
    ``callback_on_step_end`` may return new latents), so the second evaluation of a Heun step gets a tensor other
    than the predictor state it returned: diffusers' Heun takes the derivative at the sample given, and so does
    this scheduler (the step functions themselves refuse such a ``y``; the scheduler hands the given sample on as
    the predictor state).  Scaling the latents by 1.01 is the same edit in both state spaces."""
    ref, ours = _pair("HeunDiscreteScheduler", 6, prediction_type="v_prediction", **SD)
    _share_tables(ref, ours)
    net, noise = TinyNet(4, seed=8), _noise(F64)
    finals = []
    for sched in (ref, ours):
        sample = noise * sched.init_noise_sigma
        for t in sched.timesteps:
            if not sched.state_in_first_order:
                sample = sample * 1.01  # a new tensor, as a blend makes
            sample = sched.step(net(sched.scale_model_input(sample, t), t), t, sample).prev_sample
        finals.append(sample)
    assert (finals[0] - finals[1]).abs().max().item() <= 1e-10


def test_heun_refuses_latents_edited_in_place_between_its_two_evaluations():
    """Edited in place, the predictor state the Heun step finishes from is gone: refused with the fix (out of
    place, the test above), where the result would otherwise differ from diffusers' by the edit."""
    ours = zd.ZSNRHeunDiscreteScheduler(prediction_type="v_prediction", **SD)
    ours.set_timesteps(4)
    net, sample = TinyNet(4, seed=8), _noise(F64)
    t0, t1 = ours.timesteps[0], ours.timesteps[1]
    sample = ours.step(net(sample, t0), t0, sample).prev_sample
    assert not ours.state_in_first_order
    sample.mul_(1.01)
    with pytest.raises(ValueError, match="edited in place between the two evaluations of a Heun step"):
        ours.step(net(sample, t1), t1, sample)


# ------------------------------------------------------------------------------------ guidance inside the step


@pytest.mark.parametrize("name", list(zd.SCHEDULERS))
def test_guidance_in_the_step_is_the_pipelines_eager_guidance(name):
    """step((cond, uncond), guidance_scale=w, guidance_rescale=phi) gives the run of step(F) with F as diffusers'
    pipelines form it: uncond + w (cond - uncond), then ``rescale_noise_cfg(F, cond, phi)`` (the rescale in the
    model output's own space).  DDIM keeps its default clip_sample=True: there F is formed eagerly, as D is
    clipped."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    cfg = {} if name.startswith("EDM") else dict(prediction_type="v_prediction", **SD)
    w, phi = 7.5, 0.7
    cond_net, uncond_net = TinyNet(4, seed=30, dtype=torch.float32), TinyNet(4, seed=31, dtype=torch.float32)

    def eager(y, t):
        fc, fu = cond_net(y, t), uncond_net(y, t)
        return rescale_noise_cfg(fu + w * (fc - fu), fc, guidance_rescale=phi)

    runs = []
    for net, kw in ((eager, {}), (lambda y, t: (cond_net(y, t), uncond_net(y, t)),
                                  {"guidance_scale": w, "guidance_rescale": phi})):
        sched = zd.SCHEDULERS[name](**cfg)
        sched.set_timesteps(6)
        runs.append(_loop(sched, net, _noise(), seed=32, **kw))
    (a, ins_a), (b, ins_b) = runs
    for u, v in [(a, b), *zip(ins_a, ins_b)]:
        assert (u - v).abs().max().item() <= 1e-5 * max(u.abs().max().item(), 1.0)


def test_guidance_keywords_need_the_pair():
    sched = zd.ZSNREulerDiscreteScheduler(**SD)
    sched.set_timesteps(4)
    y = torch.ones(1, 4, 2, 2)
    with pytest.raises(ValueError, match=r"model_output=\(noise_pred_cond, noise_pred_uncond\)"):
        sched.step(torch.zeros_like(y), sched.timesteps[0], y, guidance_scale=7.5)
    with pytest.raises(ValueError, match="guidance_rescale must be <= 1"):
        sched.step((y, y), sched.timesteps[0], y, guidance_scale=7.5, guidance_rescale=2.0)


# ------------------------------------------------------------------------------------------------- DPMSolverSDE


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_dpm_solver_sde_default_brownian_tree_is_diffusers(monkeypatch, prediction):
    """No noise sampler given: diffusers' Brownian tree of ``noise_sampler_seed``.  On diffusers' own float32 sigmas
    (ours replaced by them) the tree spans the same interval and is queried at the same float32 times, in the same
    order (recorded), so both runs add the same noise: float32 agreement.  (On each library's own table the tree's
    ends move by float32 rounding, which moves a Brownian path by more: test_parity gives both the same sampler.)"""
    from diffusers.schedulers import scheduling_dpmsolver_sde as dsde

    queries = []
    real = dsde.BrownianTreeNoiseSampler.__call__
    monkeypatch.setattr(dsde.BrownianTreeNoiseSampler, "__call__",
                        lambda self, s, sn: queries.append((s.dtype, float(s), float(sn))) or real(self, s, sn))
    ref, ours = _pair("DPMSolverSDEScheduler", 10, prediction_type=prediction, noise_sampler_seed=8, **SD)
    ours.sigmas = _step_sigmas(ref)
    levels = ours.sigmas.tolist()
    ours._mids = [zk.coefficients.dpmpp_sde_midpoint(s, sn) if sn else math.nan for s, sn in zip(levels, levels[1:])]
    net, noise = TinyNet(4, seed=3, dtype=torch.float32), _noise()
    a, _ = _loop(ref, net, noise)
    n_ref = len(queries)
    b, _ = _loop(ours, net, noise)
    assert queries[:n_ref] == queries[n_ref:] and n_ref == 2 * 9
    err = (a - b).abs().max().item()
    assert err <= (3e-4 if prediction == "epsilon" else 1e-4), err


def test_dpm_solver_sde_zero_snr_is_the_limit_of_diffusers_substitute():
    """diffusers' DPMSolverSDE on the rescaled table with alphas_cumprod[-1] = delta (sigma_max 256, 1024, 4096)
    approaches ours from sigma = inf, given the same noise sampler: like sigma_max^(-1/2), the weight of the start
    noise in the first stage (docs/design.md §2.3 and zsnr_kernels.coefficients.dpmpp_sde)."""
    ours = zd.ZSNRDPMSolverSDEScheduler(**ZERO_SNR)
    ours.set_timesteps(10)
    net, noise = TinyNet(4, seed=20, dtype=torch.float32), _noise()
    exact, _ = _loop(ours, net, noise, seed=21)
    assert torch.isfinite(exact).all()
    cfg = {k: v for k, v in ZERO_SNR.items() if k != "rescale_betas_zero_snr"}
    errors = []
    for delta in (2.0**-16, 2.0**-20, 2.0**-24):
        ref = diffusers.DPMSolverSDEScheduler(trained_betas=ours.betas.tolist(), **cfg)
        ref.alphas_cumprod[-1] = delta
        ref.set_timesteps(10)
        approx, _ = _loop(ref, net, noise, seed=21)
        errors.append((approx - exact).abs().max().item())
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < errors[0] / 3, errors


def test_dpm_solver_sde_takes_latents_a_pipeline_replaced_between_its_two_evaluations():
    """Inpainting blends the known region into the latents after every step: the second evaluation then gets other
    latents than the first returned.  diffusers takes the model's prediction at the latents given and updates the
    sample it stored at the first evaluation; so does this scheduler (its second stage reads that sample).  Scaling
    the latents by 1.01 is the same edit in both state spaces."""
    ref, ours = _pair("DPMSolverSDEScheduler", 6, prediction_type="v_prediction", **SD)
    net, noise = TinyNet(4, seed=9, dtype=torch.float32), _noise()
    outs = []
    for s in (ref, ours):
        g = torch.Generator().manual_seed(2)
        s.noise_sampler = lambda a, b, g=g: torch.randn(noise.shape, generator=g)
        sample = noise * s.init_noise_sigma
        for t in s.timesteps:
            if not s.state_in_first_order:
                sample = sample * 1.01  # a new tensor, as a blend makes
            sample = s.step(net(s.scale_model_input(sample, t), t), t, sample).prev_sample
        outs.append(sample)
    ours.set_timesteps(6)
    unedited, _ = _loop(ours, net, noise, seed=2)
    assert (outs[1] - unedited).abs().max().item() > 1e-3  # the edit matters
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-4
