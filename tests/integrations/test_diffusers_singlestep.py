"""``ZSNRDPMSolverSinglestepScheduler`` against diffusers' ``DPMSolverSinglestepScheduler`` (the tests every class
gets, parity on each library's tables, the config walk, switching, guidance inside the step, are in
test_diffusers_schedulers.py and test_diffusers_contract.py, which walk ``zsnr_kernels.diffusers.SCHEDULERS``).

Here: diffusers' order list, float64 parity on shared sigmas for every algorithm, solver type, order and final sigma
(diffusers computes the update in the sample's dtype from float32 sigmas: cast to float64, both agree to 1e-12), the
grids and custom timesteps, img2img's begin index and latents a pipeline edits between steps (the step integrates
from the state its group started at, as diffusers' ``self.sample``), the start at sigma = inf and its limit, the
row of the sampler table it steps with, the backends, and real pipelines built from tiny random models.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from conftest import TinyNet
from test_diffusers_schedulers import SD, _loop, _noise

import zsnr_kernels as zk
from zsnr_kernels import coefficients as co

diffusers = pytest.importorskip("diffusers")
zd = pytest.importorskip("zsnr_kernels.diffusers")

NAME = "DPMSolverSinglestepScheduler"
F64 = torch.float64
ZERO_SNR = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", **SD)


def _pair(steps, **config):
    ref = diffusers.DPMSolverSinglestepScheduler(**config)
    ours = zd.ZSNRDPMSolverSinglestepScheduler.from_config(ref.config)
    for s in (ref, ours):
        s.set_timesteps(steps)
    return ref, ours


def _shared(ref, ours):
    """Both on diffusers' float32 sigmas cast to float64 (and its timesteps)."""
    ref.sigmas = ref.sigmas.double()
    ours.sigmas = ref.sigmas.clone()
    ours.timesteps = ref.timesteps.clone()


def _diff(ref, ours, net, noise, seed=None, **kw):
    a, ins_a = _loop(ref, net, noise, seed=seed, **kw)
    b, ins_b = _loop(ours, net, noise, seed=seed, **kw)
    assert torch.isfinite(b).all()
    return max((a - b).abs().max().item(), *((u - v).abs().max().item() for u, v in zip(ins_a, ins_b)))


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("lower_order_final", [False, True])
@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
def test_order_list_and_lower_order_final_are_diffusers(order, lower_order_final, final_sigmas_type):
    """get_order_list for 1..40 steps, and set_timesteps turning lower_order_final on (in the config) where
    diffusers does: a step count no multiple of the order, or a final sigma of 0."""
    cfg = dict(solver_order=order, lower_order_final=lower_order_final, final_sigmas_type=final_sigmas_type)
    ref, ours = diffusers.DPMSolverSinglestepScheduler(**cfg), zd.ZSNRDPMSolverSinglestepScheduler(**cfg)
    for n in range(1, 41):
        try:
            want = ref.get_order_list(n)
        except IndexError:  # fewer steps than the order without lower_order_final: diffusers' list is empty
            assert ours.get_order_list(n) == [] and n < order
            continue
        assert ours.get_order_list(n) == want, n
    for n in (6, 7, 9, 12):
        ref, ours = _pair(n, **cfg)
        assert ours.order_list == ref.order_list and ours.config.lower_order_final == ref.config.lower_order_final


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [8, 9])
@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
def test_exact_on_shared_sigmas(algorithm, solver_type, order, steps, final_sigmas_type):
    """Every update in float64 (the SDE's noise from the same generator: diffusers' randn_tensor calls).  The SDE's
    third-order heun update: test_sde_third_order_heun_is_the_integral."""
    if algorithm == "sde-dpmsolver++" and solver_type == "heun" and order == 3:
        pytest.skip("diffusers' third-order SDE heun update has a sign error; see the test below")
    ref, ours = _pair(steps, algorithm_type=algorithm, solver_type=solver_type, solver_order=order,
                      final_sigmas_type=final_sigmas_type, prediction_type="v_prediction", **SD)
    _shared(ref, ours)
    seed = 13 if algorithm.startswith("sde") else None
    assert _diff(ref, ours, TinyNet(4, seed=10), _noise(F64), seed=seed) <= 1e-12


def test_sde_third_order_heun_is_the_integral(monkeypatch):
    """diffusers' sde-dpmsolver++ of order 3 with solver_type="heun" weighs its second difference D2 by
    (B - 2h)/(2h)^2 - 1/2 where the integral gives + 1/2 (its multistep SDE update has the same sign error): with that
    one term corrected, diffusers' run equals this one in float64."""
    from diffusers.schedulers import scheduling_dpmsolver_singlestep as dss

    real = dss.DPMSolverSinglestepScheduler.singlestep_dpm_solver_third_order_update

    def corrected(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        x_t = real(self, model_output_list, *args, sample=sample, noise=noise, **kwargs)
        s = [self.sigmas[self.step_index + 1 - k] for k in range(4)]  # t, s0, s1, s2
        alpha_t = 1.0 / (s[0] ** 2 + 1.0).sqrt()
        lam = [-v.log() for v in s]
        h = lam[0] - lam[3]
        r0, r1 = (lam[1] - lam[3]) / h, (lam[2] - lam[3]) / h
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        d2 = 2.0 * ((m0 - m2) / r0 - (m1 - m2) / r1) / (r0 - r1)
        return x_t + alpha_t * d2

    monkeypatch.setattr(dss.DPMSolverSinglestepScheduler, "singlestep_dpm_solver_third_order_update", corrected)
    ref, ours = _pair(9, algorithm_type="sde-dpmsolver++", solver_type="heun", solver_order=3,
                      prediction_type="v_prediction", **SD)
    _shared(ref, ours)
    assert _diff(ref, ours, TinyNet(4, seed=10), _noise(F64), seed=13) <= 1e-12


@pytest.mark.parametrize("grid", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
def test_grids_and_final_sigma(grid, final_sigmas_type):
    """Karras, exponential and beta grids (the last with a final sigma_min ends on a zero-length step, which leaves
    the sample as it is), on diffusers' schedule: its timesteps to 1 (its float32 table), its sigmas to float32 and
    shared for the float64 run."""
    ref, ours = _pair(10, solver_order=3, final_sigmas_type=final_sigmas_type, prediction_type="epsilon",
                      **{grid: True}, **SD)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=1)
    torch.testing.assert_close(ours.sigmas, ref.sigmas.double(), rtol=5e-4, atol=0)
    _shared(ref, ours)
    assert _diff(ref, ours, TinyNet(4, seed=12), _noise(F64)) <= 1e-10


def test_from_config_to_and_from_every_sibling():
    """``X.from_config(singlestep.config)`` for every scheduler here on a training table, and back, give the configs
    diffusers' classes give for the same switches (on the namesakes' keys), and the same timesteps; at zero SNR the
    switch keeps rescale_betas_zero_snr both ways."""
    cfg = dict(solver_order=3, solver_type="heun", final_sigmas_type="sigma_min", prediction_type="v_prediction", **SD)
    ref, ours = diffusers.DPMSolverSinglestepScheduler(**cfg), zd.ZSNRDPMSolverSinglestepScheduler(**cfg)
    keys = list(inspect.signature(diffusers.DPMSolverSinglestepScheduler.__init__).parameters)[1:]
    for name, cls in zd.SCHEDULERS.items():
        if name.startswith("EDM") or name == NAME:
            continue
        ref_cls = getattr(diffusers, name)
        sib_keys = list(inspect.signature(ref_cls.__init__).parameters)[1:]
        ref_sib, sib = ref_cls.from_config(ref.config), cls.from_config(ours.config)
        assert {k: sib.config[k] for k in sib_keys} == {k: ref_sib.config[k] for k in sib_keys}, name
        ref_back = diffusers.DPMSolverSinglestepScheduler.from_config(ref_sib.config)
        back = zd.ZSNRDPMSolverSinglestepScheduler.from_config(sib.config)
        assert {k: back.config[k] for k in keys} == {k: ref_back.config[k] for k in keys}, name
        for s in (ref_back, back):
            s.set_timesteps(7)
        assert torch.equal(back.timesteps, ref_back.timesteps), name
        zsnr = zd.ZSNRDPMSolverSinglestepScheduler.from_config(cls.from_config(ours.config, rescale_betas_zero_snr=True)
                                                               .config)
        assert zsnr.config.rescale_betas_zero_snr and zsnr.config.solver_type in ("heun", "midpoint"), name


def test_custom_timesteps():
    params = list(inspect.signature(diffusers.DPMSolverSinglestepScheduler.set_timesteps).parameters)
    assert list(inspect.signature(zd.ZSNRDPMSolverSinglestepScheduler.set_timesteps).parameters) == params
    ref, ours = _pair(4, solver_order=3, prediction_type="v_prediction", **SD)
    for s in (ref, ours):
        s.set_timesteps(timesteps=[999, 850, 700, 500, 300, 120, 40, 5])
    assert torch.equal(ours.timesteps, ref.timesteps) and ours.order_list == ref.order_list
    _shared(ref, ours)
    assert _diff(ref, ours, TinyNet(4, seed=13), _noise(F64)) <= 1e-12


@pytest.mark.parametrize("begin", [1, 2, 4, 5])
def test_img2img_begin_index_lowers_the_first_orders(begin):
    """A pipeline starting mid-schedule (set_begin_index, add_noise at its first timestep): the first group starts
    there, its orders lowered to the evaluations it has, as diffusers' ``while model_outputs[-order] is None``."""
    ref, ours = _pair(9, solver_order=3, prediction_type="v_prediction", **SD)
    _shared(ref, ours)
    net, x0, z = TinyNet(4, seed=14), _noise(F64, seed=1) * 0.5, _noise(F64, seed=2)
    outs = []
    for s in (ref, ours):
        s.set_begin_index(begin)
        ts = s.timesteps[begin:]
        x = s.add_noise(x0, z, ts[:1])
        for t in ts:
            x = s.step(net(s.scale_model_input(x, t), t), t, x).prev_sample
        outs.append(x)
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-12


def test_latents_replaced_between_steps():
    """Inpainting pipelines blend the known region into the latents after every step: a step of order 2 or 3 then
    gets other latents than its group's previous step returned, and integrates, as diffusers, from the sample its
    group started at (only the model output sees the edit).  Scaling the latents by 1.01 is such an edit."""
    ref, ours = _pair(9, solver_order=3, prediction_type="v_prediction", **SD)
    _shared(ref, ours)
    net, noise = TinyNet(4, seed=9), _noise(F64)
    outs = []
    for s in (ref, ours):
        x = noise.clone()
        for t in s.timesteps:
            x = s.step(net(x, t), t, x).prev_sample * 1.01
        outs.append(x)
    ours.set_timesteps(9)
    unedited, _ = _loop(ours, net, noise)
    assert (outs[1] - unedited).abs().max().item() > 1e-3
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-12


# ------------------------------------------------------------------------------------------ zero terminal SNR


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_zero_snr_starts_at_inf_and_is_the_limit_of_diffusers_substitute(algorithm, solver_type, order):
    """With rescale_betas_zero_snr the schedule starts at sigma = inf exactly (timestep 999, the noise itself as the
    first model input) and every step is finite.  diffusers' class has no rescale_betas_zero_snr: given the rescaled
    betas its last alphas_cumprod is 0 and its run NaN; with that entry replaced by delta = 2**-16 .. 2**-28 (sigma_max
    256 .. 16384) its run approaches this one, like 1/sigma_max for order 1 and like 1/log(sigma_max) for the groups
    whose later steps integrate from the start (docs/design.md §2.3).  The SDE's noise, the same on both sides, makes
    the gap of orders 2 and 3 ripple; their last is below the first.  Not compared: the SDE's third-order heun
    update (diffusers' sign error)."""
    cfg = dict(algorithm_type=algorithm, solver_type=solver_type, solver_order=order, prediction_type="v_prediction")
    ours = zd.ZSNRDPMSolverSinglestepScheduler(rescale_betas_zero_snr=True, **cfg, **SD)
    ours.set_timesteps(10)
    assert ours.sigmas[0] == math.inf and ours.timesteps[0] == 999 and ours.init_noise_sigma == 1.0
    net, noise, seen = TinyNet(4, seed=20, dtype=torch.float32), _noise(), []

    def model(y, t):
        seen.append(y)
        return net(y, t)

    exact, _ = _loop(ours, model, noise, seed=21)
    assert torch.equal(seen[0], noise) and torch.isfinite(exact).all()
    if algorithm == "sde-dpmsolver++" and solver_type == "heun" and order == 3:
        return
    errors = []
    for delta in (2.0**-16, 2.0**-20, 2.0**-24, 2.0**-28):
        ref = diffusers.DPMSolverSinglestepScheduler(trained_betas=ours.betas.tolist(), **cfg)
        ref.alphas_cumprod[-1] = delta
        ref.set_timesteps(10)
        errors.append((_loop(ref, net, noise, seed=21)[0] - exact).abs().max().item())
    if algorithm == "dpmsolver++" or order == 1:
        assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / (8 if order == 1 else 1.2), errors


def test_zero_snr_first_group_takes_the_limit_of_its_update():
    """The first group starts at sigma = inf: its second step (order 2, midpoint) is y' = s' y_0 + c'(D_0 + D_1)/2,
    the limit r0 -> 1 (zsnr_kernels.coefficients.dpmpp_singlestep), not first order."""
    sched = zd.ZSNRDPMSolverSinglestepScheduler(solver_order=2, **ZERO_SNR)
    sched.set_timesteps(6)
    net, noise = TinyNet(4, seed=22), _noise(F64)
    t0, t1 = sched.timesteps[:2]
    s1, s2 = float(sched.sigmas[1]), float(sched.sigmas[2])
    pz = zk.parameterization("v")
    f0 = net(noise, t0)
    y1 = sched.step(f0, t0, noise).prev_sample
    f1 = net(y1, t1)
    y2 = sched.step(f1, t1, y1).prev_sample
    d0 = -f0  # D at sigma = inf: p = 0, q = -1
    p, q = pz.denoise_coeffs(s1)
    d1 = p * y1 + q * f1
    want = pz.noise_scale(s2) * noise + pz.c_in(s2) * 0.5 * (d0 + d1)
    torch.testing.assert_close(y2, want, rtol=0, atol=1e-12)


def test_epsilon_prediction_cannot_start_at_inf():
    sched = zd.ZSNRDPMSolverSinglestepScheduler(**{**ZERO_SNR, "prediction_type": "epsilon"})
    sched.set_timesteps(5)
    with pytest.raises(ValueError, match="epsilon-prediction model has no denoised prediction"):
        sched.step(torch.zeros(1, 4, 2, 2), sched.timesteps[0], torch.ones(1, 4, 2, 2))


# ------------------------------------------------------------------------------------ the fused step it runs


def test_it_steps_its_row_by_name_and_never_changes_the_sampler_table(monkeypatch):
    """The step runs ``steps.sampler_step`` on coefficients.DPMPP_SINGLESTEP by name: a row the steps run without
    the table listing it (coefficients._HIDDEN), so SAMPLERS, which other threads, the ComfyUI node and sample()'s
    menu read, is the same object with the same rows before, during and after a run."""
    sched = zd.ZSNRDPMSolverSinglestepScheduler(solver_order=3, **ZERO_SNR)
    sched.set_timesteps(5)
    seen = []
    real = zk.steps.sampler_step
    before = dict(zk.SAMPLERS)

    def spy(name, *args, **kwargs):
        seen.append((name, name in zk.SAMPLERS, co.sampler_spec(name) is co.DPMPP_SINGLESTEP))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(zk.steps, "sampler_step", spy)
    _loop(sched, TinyNet(4, seed=1), _noise(F64))
    assert seen == [(co.DPMPP_SINGLESTEP.name, False, True)] * 5
    assert dict(zk.SAMPLERS) == before


@pytest.mark.skipif(not zk.backends.ext.available(), reason="_C not built")
@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
def test_the_cpu_kernels_step_it_as_the_reference(algorithm):
    """float32 latents: the compiled cpu kernels (the coefficient table path) and the torch reference agree to float32
    rounding, guidance and its rescale inside the step included, from sigma = inf; bfloat16 runs finite."""
    outs = {}
    cond, uncond = TinyNet(4, seed=30, dtype=torch.float32), TinyNet(4, seed=31, dtype=torch.float32)
    for backend in ("cpu", "torch"):
        sched = zd.ZSNRDPMSolverSinglestepScheduler(solver_order=3, solver_type="heun", algorithm_type=algorithm,
                                                    **ZERO_SNR)
        sched.backend = backend
        sched.set_timesteps(9)
        outs[backend], _ = _loop(sched, lambda y, t: (cond(y, t), uncond(y, t)), _noise(), seed=3,
                                 guidance_scale=7.5, guidance_rescale=0.7)
    torch.testing.assert_close(outs["cpu"], outs["torch"], rtol=0, atol=2e-5 * outs["torch"].abs().max().item())
    sched.backend = "cpu"
    sched.set_timesteps(9)
    bf16, _ = _loop(sched, lambda y, t: cond(y, t), _noise().bfloat16(), seed=3)
    assert bf16.dtype == torch.bfloat16 and torch.isfinite(bf16).all()


# ------------------------------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("config", [{}, {"solver_order": 3, "solver_type": "heun", "prediction_type": "v_prediction"},
                                    {"algorithm_type": "sde-dpmsolver++", "prediction_type": "v_prediction"},
                                    {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}])
def test_ldm_pipeline(unet, vqvae, config):
    """LDMPipeline (which reads init_noise_sigma and calls scale_model_input) with the one-line switch: diffusers'
    latents (the SDE's noise from the global generator, as the pipeline gives step none)."""
    pipe = _ldm(unet, vqvae, diffusers.DPMSolverSinglestepScheduler(**config))
    want = _ldm_latents(pipe)
    pipe.scheduler = zd.ZSNRDPMSolverSinglestepScheduler.from_config(pipe.scheduler.config)
    got = _ldm_latents(pipe)
    assert _close(want, got)[0], _close(want, got)


def test_stable_diffusion_pipeline(sd_parts):
    """StableDiffusionPipeline with guidance 7.5 and guidance_rescale 0.7 (eager, in the pipeline): diffusers'
    latents; at zero SNR finite, from sigma = inf; the subclass guiding inside ``step`` (the fused pass) gives the
    stock pipeline's latents, on a finite schedule and at zero SNR, ODE and SDE."""
    sd = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    pipe = _sd(sd_parts, diffusers.DPMSolverSinglestepScheduler(**sd))
    want = _sd_latents(pipe, sd_parts)
    pipe.scheduler = zd.ZSNRDPMSolverSinglestepScheduler.from_config(pipe.scheduler.config)
    got = _sd_latents(pipe, sd_parts)
    assert _close(want, got)[0], _close(want, got)
    for config in ({"solver_order": 3}, {"solver_order": 3, **ZERO_SNR},
                   {"algorithm_type": "sde-dpmsolver++", **ZERO_SNR}):
        scheduler = zd.ZSNRDPMSolverSinglestepScheduler(**{**sd, **config})
        stock = _sd_latents(_sd(sd_parts, scheduler), sd_parts)
        fused = _sd_latents(_sd(sd_parts, scheduler, _fused_guidance_pipeline()), sd_parts)
        assert torch.isfinite(stock).all()
        if "rescale_betas_zero_snr" in config:
            assert scheduler.sigmas[0] == math.inf
        assert _close(stock, fused, rel=1e-5)[0], (config, _close(stock, fused, rel=1e-5))


from test_diffusers_pipelines import (_close, _fused_guidance_pipeline, _ldm, _ldm_latents, _sd,  # noqa: E402
                                      _sd_latents, sd_parts, unet, vqvae)  # noqa: E402,F401 -- fixtures
