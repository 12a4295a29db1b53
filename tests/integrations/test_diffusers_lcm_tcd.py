"""``ZSNRLCMScheduler`` and ``ZSNRTCDScheduler`` against diffusers' ``LCMScheduler`` and ``TCDScheduler``.

Both walk a consistency model's integer timesteps.  LCM: D' = c_skip y + c_out D (the boundary condition), then the
fused ``lcm_step`` on D' as an x0-prediction (y' = sqrt(abar') D' + sqrt(1 - abar') z; D' after the last step).
TCD: an Euler (DDIM eta = 0) step from t down to s = floor((1 - gamma) t'), with the renoising from s up to t' folded
in as EDM churn (``euler_step(..., sigma_hat_next=sigma_t')``).

Parity is checked with the same network, start noise and generator seed on both sides: every model input, every
``denoised``/``pred_noised_sample`` and the result, to 1e-4 of their scale (diffusers' float32 tables; measured about
4e-6).  At zero terminal SNR diffusers keeps alphas_cumprod[-1] = 0 in these schedulers, and with a v- or
x0-prediction model is exact there too, so the zero-SNR runs are compared with diffusers' as well as with the
library's own loop written with the public step functions (float64).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TinyNet

import zsnr_kernels as zk

diffusers = pytest.importorskip("diffusers")
zd = pytest.importorskip("zsnr_kernels.diffusers")

F64 = torch.float64
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
ZERO_SNR = {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", **SD}
NAMES = ["LCMScheduler", "TCDScheduler"]


def _noise(dtype=torch.float32, seed=0, shape=(2, 4, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _run(sched, net, noise, *, seed=0, begin=None, start=None, **step_kw):
    """A pipeline's loop (set_timesteps already called): (final sample, model inputs, second outputs of step)."""
    g = torch.Generator().manual_seed(seed)
    ts = sched.timesteps if begin is None else sched.timesteps[begin:]
    if begin is not None:
        sched.set_begin_index(begin)
    sample = noise * sched.init_noise_sigma if start is None else start
    inputs, seconds = [], []
    for t in ts:
        x_in = sched.scale_model_input(sample, t)
        inputs.append(x_in)
        out = sched.step(net(x_in, t), t, sample, generator=g, **step_kw)
        sample = out.prev_sample
        seconds.append(out[1])
    return sample, inputs, seconds, g


def _close(ref_run, our_run, rel=1e-4):
    (a, ins_a, sec_a, _), (b, ins_b, sec_b, _) = ref_run, our_run
    assert len(ins_a) == len(ins_b) and torch.isfinite(b).all()
    worst = 0.0
    for u, v in [(a, b), *zip(ins_a, ins_b), *zip(sec_a, sec_b)]:
        err = (u.double() - v.double()).abs().max().item() / max(u.abs().max().item(), 1.0)
        worst = max(worst, err)
    assert worst <= rel, worst
    return worst


def _pair(name, steps=6, set_kw=None, **config):
    ref = getattr(diffusers, name)(**config)
    ours = zd.SCHEDULERS[name].from_config(ref.config)
    for s in (ref, ours):
        s.set_timesteps(steps, **(set_kw or {}))
    assert torch.equal(ours.timesteps, ref.timesteps), (ours.timesteps, ref.timesteps)
    return ref, ours


# ------------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip", ["none", "clip_sample", "thresholding"])
@pytest.mark.parametrize(("steps", "scaling"), [(6, 10.0), (1, 10.0), (6, 0.05)])
def test_lcm_parity(prediction, clip, steps, scaling):
    """Model inputs, ``denoised`` (D', what LatentConsistencyModelPipeline decodes) and the result equal diffusers'
    with the same generator.  The clip range (0.5) is small enough that clipping changes the run.  With diffusers'
    timestep_scaling 10, c_skip is below 1e-5 from timestep 19 on; at 0.05 the boundary condition weighs in (c_skip
    0.2 at timestep 19)."""
    cfg = {"prediction_type": prediction, "timestep_scaling": scaling, **SD}
    if clip == "clip_sample":
        cfg.update(clip_sample=True, clip_sample_range=0.5)
    elif clip == "thresholding":
        cfg.update(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.2)
    net, noise = TinyNet(4, seed=3, dtype=torch.float32), _noise()
    ref, ours = _pair("LCMScheduler", steps, **cfg)
    run = _run(ours, net, noise)
    _close(_run(ref, net, noise), run)
    assert torch.equal(run[0], run[2][-1])  # after the last step: D' itself
    if clip != "none":  # the clip acted: the unclipped run is another one
        plain = zd.ZSNRLCMScheduler(prediction_type=prediction, timestep_scaling=scaling, **SD)
        plain.set_timesteps(steps)
        assert (_run(plain, net, noise)[0] - run[0]).abs().max().item() > 1e-3


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("clip", [False, True])
def test_tcd_parity(prediction, eta, clip):
    """Model inputs, ``pred_noised_sample`` (x_s) and the result equal diffusers' for gamma (``eta``) 0, 0.3 and 1.
    ``clip_sample``/``thresholding`` are taken and, as in diffusers' TCD, not applied."""
    cfg = {"prediction_type": prediction, **SD}
    if clip:
        cfg.update(clip_sample=True, clip_sample_range=0.5, thresholding=True)
    net, noise = TinyNet(4, seed=4, dtype=torch.float32), _noise(seed=1)
    ref, ours = _pair("TCDScheduler", 6, **cfg)
    a, b = _run(ref, net, noise, eta=eta), _run(ours, net, noise, eta=eta)
    _close(a, b)
    # the same draws from the generator: none at eta = 0, one per step but the last otherwise
    assert torch.equal(a[3].get_state(), b[3].get_state())
    fresh = torch.Generator().manual_seed(0)
    assert torch.equal(b[3].get_state(), fresh.get_state()) == (eta == 0.0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_set_timesteps_forms(name, dtype):
    """original_inference_steps, strength (img2img), custom timesteps (cut by strength, as diffusers: the last
    part), TCD's schedule of every training timestep when original_inference_steps is passed: diffusers' timesteps
    and runs; where diffusers refuses, a ValueError here."""
    ref_cls, cls = getattr(diffusers, name), zd.SCHEDULERS[name]
    net, noise = TinyNet(4, seed=5, dtype=dtype), _noise(dtype, seed=2)
    forms = [dict(num_inference_steps=n, original_inference_steps=o, strength=s)
             for n, o, s in ((4, None, 1.0), (8, 20, 1.0), (3, 50, 0.5), (2, 100, 0.3), (5, None, 0.7))]
    forms += [dict(timesteps=[999, 759, 499, 259]), dict(timesteps=[980, 700, 401, 150, 12], strength=0.6),
              dict(timesteps=[999, 500, 0])]
    for form in forms:
        form = {k: v for k, v in form.items() if v is not None}
        ref = ref_cls(prediction_type="v_prediction", **SD)
        ours = cls.from_config(ref.config)
        for s in (ref, ours):
            s.set_timesteps(**form)
        assert torch.equal(ours.timesteps, ref.timesteps), (form, ours.timesteps, ref.timesteps)
        assert ours.num_inference_steps == ref.num_inference_steps and ours.timesteps.dtype == torch.int64
        a, b = _run(ref, net, noise), _run(ours, net, noise)
        if name == "LCMScheduler" and ref.num_inference_steps > len(ref.timesteps):
            # custom timesteps cut by strength: diffusers' counter never reaches num_inference_steps - 1, so its last
            # step noises D' back to the last timestep; here it returns D', which diffusers' pipelines decode
            # (its ``denoised``: compared) -- the package docstring lists this deviation
            a = (a[2][-1], *a[1:])
        _close(a, b)
    refused = 0
    for bad in (dict(num_inference_steps=60), dict(num_inference_steps=30, strength=0.5),
                dict(num_inference_steps=4, original_inference_steps=2000), dict(timesteps=[500, 700]),
                dict(timesteps=[1000, 500])):
        ref, ours = ref_cls(**SD), cls(**SD)
        try:
            ref.set_timesteps(**bad)
        except ValueError:
            refused += 1
            with pytest.raises(ValueError):
                ours.set_timesteps(**bad)
        else:  # TCD given original_inference_steps spaces all 1000 training timesteps: 2000 is no limit there
            ours.set_timesteps(**bad)
            assert torch.equal(ours.timesteps, ref.timesteps)
    assert refused == (5 if name == "LCMScheduler" else 4)
    with pytest.raises(ValueError, match="exactly one"):
        cls(**SD).set_timesteps(4, timesteps=[999, 500])
    with pytest.raises(ValueError, match=r"strictly descending integers in \[0, 999\]"):
        cls(**SD).set_timesteps(timesteps=[999, 500, -1])  # (diffusers indexes alphas_cumprod[-1] there)


@pytest.mark.parametrize("name", NAMES)
def test_img2img_begin_index_and_add_noise(name):
    """LatentConsistencyModelImg2ImgPipeline's use: set_timesteps(strength=), set_begin_index, add_noise at the first
    timestep it runs, then the loop: diffusers' result."""
    net, x0, z = TinyNet(4, seed=6, dtype=torch.float32), _noise(seed=3) * 0.5, _noise(seed=4)
    ref, ours = _pair(name, 4, set_kw={"strength": 0.6}, prediction_type="v_prediction", **SD)
    runs = []
    for s in (ref, ours):
        start = s.add_noise(x0, z, s.timesteps[:1])
        runs.append(_run(s, net, None, begin=0, start=start))
    _close(*runs)
    ref, ours = _pair(name, 6, prediction_type="v_prediction", **SD)
    runs = []
    for s in (ref, ours):
        start = s.add_noise(x0, z, s.timesteps[2:3])
        runs.append(_run(s, net, None, begin=2, start=start))
    _close(*runs)


@pytest.mark.parametrize("name", NAMES)
def test_helpers_pipelines_and_training_read(name):
    """add_noise and get_velocity at training timesteps, previous_timestep (diffusers' types), init_noise_sigma,
    final_alpha_cumprod, TCD's _get_variance, LCM's boundary scalings, step_index/begin_index: diffusers' values."""
    for cfg in ({}, {"set_alpha_to_one": False}):
        ref = getattr(diffusers, name)(**SD, **cfg)
        ours = zd.SCHEDULERS[name].from_config(ref.config)
        torch.testing.assert_close(ours.final_alpha_cumprod, ref.final_alpha_cumprod.double(), rtol=1e-6, atol=0)
        assert ours.init_noise_sigma == ref.init_noise_sigma == 1.0
        assert torch.equal(ours.timesteps, ref.timesteps) and ours.previous_timestep(7) == ref.previous_timestep(7)
        x0, z, ts = _noise(F64, seed=5), _noise(F64, seed=6), torch.tensor([999, 500])
        torch.testing.assert_close(ours.add_noise(x0[:2], z[:2], ts), ref.add_noise(x0[:2], z[:2], ts), rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(ours.get_velocity(x0[:2], z[:2], ts), ref.get_velocity(x0[:2], z[:2], ts),
                                   rtol=1e-5, atol=1e-6)
        for s in (ref, ours):
            s.set_timesteps(4)
        for t in ref.timesteps:
            got, want = ours.previous_timestep(t), ref.previous_timestep(t)
            assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and got == want
        if name == "TCDScheduler":
            for t, prev in ((999, 759), (259, -1)):
                torch.testing.assert_close(ours._get_variance(t, prev), ref._get_variance(t, prev).double(),
                                           rtol=1e-4, atol=0)
        else:
            for t in (999, 19, 0):
                for u, v in zip(ours.get_scalings_for_boundary_condition_discrete(t),
                                ref.get_scalings_for_boundary_condition_discrete(t)):
                    assert math.isclose(u, v, rel_tol=1e-12)
        assert ours.step_index is None and ours.begin_index is None
        ours.step(_noise()[:1], ours.timesteps[0], _noise()[:1])
        assert ours.step_index == 1


@pytest.mark.parametrize("name", NAMES)
def test_return_types_and_field_names(name):
    """step returns diffusers' field names (LCM: prev_sample, denoised; TCD: prev_sample, pred_noised_sample) and,
    with return_dict=False, the same pair as a tuple."""
    ref_out = {"LCMScheduler": diffusers.schedulers.scheduling_lcm.LCMSchedulerOutput,
               "TCDScheduler": diffusers.schedulers.scheduling_tcd.TCDSchedulerOutput}[name]
    net, noise = TinyNet(4, seed=7, dtype=torch.float32), _noise()
    outs = []
    for return_dict in (True, False):
        ours = zd.SCHEDULERS[name](prediction_type="v_prediction", **SD)
        ours.set_timesteps(3)
        t = ours.timesteps[0]
        outs.append(ours.step(net(noise, t), t, noise, generator=torch.Generator().manual_seed(0),
                              return_dict=return_dict))
    assert list(outs[0].keys()) == [f for f in ref_out.__dataclass_fields__]
    assert isinstance(outs[1], tuple) and len(outs[1]) == 2
    for u, v in zip(outs[0].to_tuple(), outs[1]):
        assert torch.equal(u, v)


# --------------------------------------------------------------------------------------------- zero terminal SNR


def _table_sigma(sched, t: int) -> float:
    abar = float(sched.alphas_cumprod[t])
    return math.inf if abar == 0.0 else math.sqrt((1.0 - abar) / abar)


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
@pytest.mark.parametrize("steps", [4, 1])
def test_lcm_zero_snr_exact_and_the_librarys_loop(prediction, steps):
    """rescale_betas_zero_snr=True: the first timestep 999 is sigma = inf exactly (alphas_cumprod 0), the model gets
    the start noise itself, every D' and sample is finite; the run equals diffusers' (exact there too) and, in
    float64, the loop written with zsnr_kernels.lcm_step on D' = c_skip y + c_out D."""
    cfg = {**ZERO_SNR, "prediction_type": prediction}
    net32, net64 = TinyNet(4, seed=8, dtype=torch.float32), TinyNet(4, seed=8)
    ref, ours = _pair("LCMScheduler", steps, **cfg)
    assert ours.timesteps[0] == 999 and ours.alphas_cumprod[999] == 0 and _table_sigma(ours, 999) == math.inf
    run = _run(ours, net32, _noise())
    assert torch.equal(run[1][0], _noise()) and all(torch.isfinite(d).all() for d in run[2])
    _close(_run(ref, net32, _noise()), run)

    ours = zd.ZSNRLCMScheduler(**cfg)
    ours.set_timesteps(steps)
    noise = _noise(F64)
    got = _run(ours, net64, noise, seed=9)
    g, y, ts = torch.Generator().manual_seed(9), noise, ours.timesteps.tolist()
    for i, t in enumerate(ts):
        abar = ours.alphas_cumprod[t].item()
        f = net64(y, torch.tensor(t))
        x0 = f if prediction == "sample" else math.sqrt(abar) * y - math.sqrt(1 - abar) * f
        s = 10.0 * t
        d = 0.25 / (s * s + 0.25) * y + s / math.sqrt(s * s + 0.25) * x0
        sigma_next = _table_sigma(ours, ts[i + 1]) if i + 1 < len(ts) else 0.0
        z = torch.randn(noise.shape, generator=g, dtype=F64) if sigma_next > 0 else None
        y = zk.lcm_step(y, d, _table_sigma(ours, t), sigma_next, noise=z, prediction="x0", backend="torch").y
    assert (got[0] - y).abs().max().item() <= 1e-12


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_tcd_zero_snr_exact_and_the_librarys_loop(prediction, eta):
    """The TCD run from sigma = inf: finite, diffusers' (exact at alphas_cumprod 0 for v/x0 models), and in float64
    the loop of zsnr_kernels.euler_step from sigma_t to sigma_s with churn to sigma_t' folded in."""
    cfg = {**ZERO_SNR, "prediction_type": prediction}
    net32, net64 = TinyNet(4, seed=10, dtype=torch.float32), TinyNet(4, seed=10)
    ref, ours = _pair("TCDScheduler", 5, **cfg)
    run = _run(ours, net32, _noise(), eta=eta)
    assert torch.equal(run[1][0], _noise()) and all(torch.isfinite(d).all() for d in run[2])
    _close(_run(ref, net32, _noise(), eta=eta), run)

    ours = zd.ZSNRTCDScheduler(**cfg)
    ours.set_timesteps(5)
    noise = _noise(F64)
    got = _run(ours, net64, noise, seed=11, eta=eta)
    g, y, ts = torch.Generator().manual_seed(11), noise, ours.timesteps.tolist()
    pred = "v" if prediction == "v_prediction" else "x0"
    for i, t in enumerate(ts):
        prev_t = ts[i + 1] if i + 1 < len(ts) else 0
        s = math.floor((1 - eta) * prev_t) if i + 1 < len(ts) else 0
        sigma_s, sigma_p = _table_sigma(ours, s), _table_sigma(ours, prev_t)
        f = net64(y, torch.tensor(t))
        if sigma_p > sigma_s and i + 1 < len(ts):
            z = torch.randn(noise.shape, generator=g, dtype=F64)
            y = zk.euler_step(y, f, _table_sigma(ours, t), sigma_s, sigma_hat_next=sigma_p, noise=z,
                              prediction=pred, backend="torch").y
        else:
            y = zk.euler_step(y, f, _table_sigma(ours, t), sigma_s, prediction=pred, backend="torch").y
    assert (got[0] - y).abs().max().item() <= 1e-12


def test_tcd_renoising_is_edm_churn():
    """The identity the TCD step is built on: EDM churn of y_s from sigma_s to sigma' (c_in(sigma')/c_in(sigma_s) y_s
    + c_in(sigma') sqrt(sigma'^2 - sigma_s^2) z) is TCD's sqrt(abar'/abar_s) x_s + sqrt(1 - abar'/abar_s) z."""
    sched = zd.ZSNRTCDScheduler(**SD)
    y, z = _noise(F64, seed=12), _noise(F64, seed=13)
    for s, prev in ((0, 759), (300, 500), (531, 759), (0, 19)):
        a_s, a_p = sched.alphas_cumprod[s].item(), sched.alphas_cumprod[prev].item()
        got = zk.churn_step(y, _table_sigma(sched, s), _table_sigma(sched, prev), noise=z)
        torch.testing.assert_close(got, math.sqrt(a_p / a_s) * y + math.sqrt(1 - a_p / a_s) * z, rtol=1e-12,
                                   atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_refusals_name_the_fix(name):
    """An epsilon model at sigma = inf (diffusers: NaN), a step before set_timesteps or past the end, TCD's eta
    outside [0, 1] (diffusers: an AssertionError): ValueErrors saying what to do."""
    x = _noise()[:1]
    sched = zd.SCHEDULERS[name](**{**ZERO_SNR, "prediction_type": "epsilon"})
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(x, 999, x)
    sched.set_timesteps(2)
    with pytest.raises(ValueError, match="epsilon-prediction model has no denoised prediction"):
        sched.step(x, sched.timesteps[0], x)
    sched = zd.SCHEDULERS[name](**ZERO_SNR)
    sched.set_timesteps(2)
    for t in sched.timesteps:
        x = sched.step(torch.zeros_like(x), t, x).prev_sample
    with pytest.raises(ValueError, match="call set_timesteps again"):
        sched.step(torch.zeros_like(x), sched.timesteps[-1], x)
    if name == "TCDScheduler":
        sched.set_timesteps(2)
        for eta in (-0.1, 1.5, "a"):
            with pytest.raises(ValueError, match=r"eta \(TCD's gamma\) must be a number in \[0, 1\]"):
                sched.step(x, sched.timesteps[0], x, eta=eta)


# ---------------------------------------------------------------------------------------------------- pipelines


@pytest.fixture(scope="module")
def lcm_parts():
    """A tiny LCM-distilled UNet (time_cond_proj_dim: the guidance embedding LatentConsistencyModelPipeline
    feeds it), a tiny VAE, prompt embeddings: no text encoder, no downloads."""
    pytest.importorskip("transformers")  # the pipeline modules import it
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(13)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4, time_cond_proj_dim=8).eval()
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16).eval()
    return unet, vae, torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(14))


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _lcm_pipe(parts, scheduler):
    unet, vae, _ = parts
    return _quiet(diffusers.LatentConsistencyModelPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False))


def _lcm_images(pipe, parts, output_type="latent", steps=4):
    return pipe(prompt_embeds=parts[2], num_inference_steps=steps, guidance_scale=8.5, height=16, width=16,
                num_images_per_prompt=2, generator=torch.Generator().manual_seed(15), output_type=output_type).images


def _rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return (a - b).abs().max().item() / max(a.abs().max().item(), 1.0)


@pytest.mark.parametrize("config", [{}, {"prediction_type": "v_prediction", "timestep_scaling": 5.0}])
def test_latent_consistency_model_pipeline(lcm_parts, config):
    """LatentConsistencyModelPipeline (it decodes step's ``denoised``): the latents and the decoded images equal
    diffusers' LCMScheduler's after the one-line switch."""
    pipe = _lcm_pipe(lcm_parts, diffusers.LCMScheduler(**config))
    want, want_img = _lcm_images(pipe, lcm_parts), _lcm_images(pipe, lcm_parts, "np")
    pipe.scheduler = zd.ZSNRLCMScheduler.from_config(pipe.scheduler.config)
    assert isinstance(pipe.scheduler, zd.ZSNRLCMScheduler)
    got, got_img = _lcm_images(pipe, lcm_parts), _lcm_images(pipe, lcm_parts, "np")
    assert _rel(want, got) <= 1e-4 and _rel(want_img, got_img) <= 1e-4, (_rel(want, got), _rel(want_img, got_img))


def test_latent_consistency_model_pipeline_zero_snr(lcm_parts):
    """At zero SNR the first UNet call gets the pipeline's start noise itself at timestep 999 (sigma = inf) and the
    decoded latents are finite and diffusers' (exact there for a v-prediction model)."""
    unet = lcm_parts[0]
    calls = []
    hook = unet.register_forward_pre_hook(lambda module, args: calls.append((args[0].clone(), args[1])))
    try:
        pipe = _lcm_pipe(lcm_parts, zd.ZSNRLCMScheduler(**ZERO_SNR))
        got = _lcm_images(pipe, lcm_parts)
    finally:
        hook.remove()
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(15))
    assert torch.equal(calls[0][0], noise) and float(calls[0][1]) == 999
    assert torch.isfinite(got).all() and all(torch.isfinite(x).all() for x, _ in calls)
    pipe.scheduler = diffusers.LCMScheduler(**ZERO_SNR)
    assert _rel(_lcm_images(pipe, lcm_parts), got) <= 1e-4


@pytest.fixture(scope="module")
def sd_parts():
    """A tiny StableDiffusionPipeline's UNet and VAE, and prompt embeddings (no text encoder needed)."""
    pytest.importorskip("transformers")
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(3)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4).eval()
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16).eval()
    g = torch.Generator().manual_seed(4)
    return unet, vae, torch.randn(1, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)


def _sd_latents(parts, scheduler, **kw):
    from diffusers import StableDiffusionPipeline

    unet, vae, cond, uncond = parts
    pipe = _quiet(StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False))
    return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, output_type="latent", num_inference_steps=4,
                height=16, width=16, generator=torch.Generator().manual_seed(5), **kw).images


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("eta", [0.0, 0.3])
def test_stable_diffusion_pipeline(sd_parts, name, eta):
    """StableDiffusionPipeline (TCD's usual host; it hands ``eta`` to a step that takes one) with guidance 2 and
    guidance_rescale 0.5: diffusers' latents; at zero SNR finite, and diffusers' there too."""
    kw = {"guidance_scale": 2.0, "guidance_rescale": 0.5, "eta": eta}
    sd = {**SD, "steps_offset": 1}  # (what the pipeline asks of a config; LCM and TCD do not read it)
    want = _sd_latents(sd_parts, getattr(diffusers, name)(**sd), **kw)
    got = _sd_latents(sd_parts, zd.SCHEDULERS[name](**sd), **kw)
    assert _rel(want, got) <= 1e-4, _rel(want, got)
    want = _sd_latents(sd_parts, getattr(diffusers, name)(**ZERO_SNR, steps_offset=1), **kw)
    got = _sd_latents(sd_parts, zd.SCHEDULERS[name](**ZERO_SNR, steps_offset=1), **kw)
    assert torch.isfinite(got).all() and _rel(want, got) <= 1e-4, _rel(want, got)
