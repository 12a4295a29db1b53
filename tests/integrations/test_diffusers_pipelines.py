"""``zsnr_kernels.diffusers`` schedulers inside real diffusers pipelines built from tiny random models (no downloads).

Each test swaps the pipeline's scheduler with the one-line switch ``pipe.scheduler = X.from_config(
pipe.scheduler.config)`` and runs the pipeline unchanged:

* ``DDPMPipeline`` and ``DDIMPipeline`` (pixel space, a small UNet2DModel): images equal to the diffusers
  scheduler's of the same name.  These pipelines never call ``scale_model_input`` nor ``init_noise_sigma``.
* ``LDMPipeline`` (unconditional latent diffusion, VQModel + UNet2DModel), which does call both, for the Euler
  family and DPM-Solver (switched to from a shipped UniPC config too): the latents it decodes are compared
  (captured at ``vqvae.decode``, before the VQ quantization, whose nearest-codebook rounding is discontinuous).
* ``StableDiffusionPipeline`` with classifier-free guidance and guidance rescale, when ``transformers`` is
  installed (the pipeline module imports it; the test passes ``prompt_embeds`` and needs no text encoder); and a
  subclass of it whose loop guides inside ``scheduler.step`` (the fused guidance + rescale pass), against the stock
  pipeline's eager guidance.

Everything runs in float32, like the pipelines; diffusers' float32 tables bound the agreement (see
tests/integrations/test_diffusers_schedulers.py): 1e-4 relative to the latents' scale.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
zd = pytest.importorskip("zsnr_kernels.diffusers")

ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, add_attention=False).eval()


@pytest.fixture(scope="module")
def vqvae():
    torch.manual_seed(1)
    return diffusers.VQModel(block_out_channels=(8,), norm_num_groups=4, latent_channels=3, num_vq_embeddings=16,
                             sample_size=8).eval()


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, steps=10, **kw):
    return pipe(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                output_type="np", **kw).images


def _close(a, b, rel=1e-4):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    scale = max(a.abs().max().item(), 1.0)
    return (a - b).abs().max().item() <= rel * scale, (a - b).abs().max().item(), scale


@pytest.mark.parametrize("config", [{}, {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}])
def test_ddpm_pipeline(unet, config):
    pipe = _quiet(diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**config)))
    want = _images(pipe)
    pipe.scheduler = zd.ZSNRDDPMScheduler.from_config(pipe.scheduler.config)
    got = _images(pipe)
    assert _close(want, got)[0], _close(want, got)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("config", [{}, {"clip_sample": False, **ZERO_SNR}])
def test_ddim_pipeline(unet, eta, config):
    """Default DDIM (clip_sample=True) and zero terminal SNR, where diffusers' DDIM is exact too.

    diffusers' tables are cast to float64 here: at zero SNR with eta = 1 its first step weighs the predicted noise
    by sqrt(1 - a_prev - std^2), exactly 0, formed as the difference of two equal numbers, so it takes the square
    root of a rounding error: with float32 tables up to sqrt(4 * 2**-24) ~ 4.9e-4 times the noise, or NaN when the
    rounding is negative (every value NaN on the CPUs seen).  In float64 that is at most 2.1e-8 (well inside the
    tolerance); a NaN there is still diffusers' rounding, not a result to compare with, and skips the case."""
    pipe = _quiet(diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler(**config)))
    pipe.scheduler.alphas_cumprod = pipe.scheduler.alphas_cumprod.double()  # the pipeline's own copy
    pipe.scheduler.final_alpha_cumprod = pipe.scheduler.final_alpha_cumprod.double()
    want = _images(pipe, eta=eta)
    if not torch.isfinite(torch.as_tensor(want)).all():
        pytest.skip("diffusers' DDIM took the square root of a negative rounding error (see the docstring)")
    pipe.scheduler = zd.ZSNRDDIMScheduler.from_config(pipe.scheduler.config)
    assert isinstance(pipe.scheduler, zd.ZSNRDDIMScheduler)
    got = _images(pipe, eta=eta)
    assert _close(want, got)[0], _close(want, got)


def test_euler_in_a_pipeline_without_scaling_at_zero_snr(unet):
    """DDPMPipeline neither scales the start noise nor calls scale_model_input, which diffusers' Euler needs.
    ZSNREulerDiscreteScheduler's state is the model input, so it works there; at zero SNR (start y = the noise)
    Euler is DDIM with eta = 0 in this state space, and its images equal diffusers' exact zero-SNR DDIM."""
    ddim = diffusers.DDIMScheduler(clip_sample=False, **ZERO_SNR)
    pipe = _quiet(diffusers.DDPMPipeline(unet=unet, scheduler=ddim))
    want = _images(pipe)
    pipe.scheduler = zd.ZSNREulerDiscreteScheduler.from_config(ddim.config)
    got = _images(pipe)
    assert _close(want, got)[0], _close(want, got)


def _ldm(unet, vqvae, scheduler):
    return _quiet(diffusers.LDMPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler))


def _ldm_latents(pipe, steps=10):
    """Run the pipeline; return the latents it hands to ``vqvae.decode``."""
    seen = []
    decode = pipe.vqvae.decode
    pipe.vqvae.decode = lambda latents, *args, **kwargs: decode(seen.append(latents.clone()) or latents, *args,
                                                                **kwargs)
    try:
        torch.manual_seed(2)  # LDMPipeline gives step() no generator: ancestral noise comes from the global one
        pipe(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np")
    finally:
        del pipe.vqvae.decode
    return seen[-1]


@pytest.mark.parametrize(("name", "config"), [
    ("EulerDiscreteScheduler", {}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "trailing", "use_karras_sigmas": True}),
    ("EulerAncestralDiscreteScheduler", {"prediction_type": "v_prediction"}),
    ("HeunDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("KDPM2DiscreteScheduler", {"prediction_type": "v_prediction"}),
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "prediction_type": "v_prediction"}),
    ("UniPCMultistepScheduler", {}),
    ("UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh1", "prediction_type": "v_prediction",
                                 "final_sigmas_type": "sigma_min"}),
])
def test_ldm_pipeline(unet, vqvae, name, config):
    """LDMPipeline reads init_noise_sigma before set_timesteps, so diffusers' Euler family starts ``leading``
    schedules from its training sigma_max there; ``linspace``/``trailing`` start there anyway."""
    pipe = _ldm(unet, vqvae, getattr(diffusers, name)(**config))
    want = _ldm_latents(pipe)
    pipe.scheduler = zd.SCHEDULERS[name].from_config(pipe.scheduler.config)
    got = _ldm_latents(pipe)
    assert _close(want, got)[0], _close(want, got)


def test_ldm_pipeline_shipped_with_unipc_switches_to_dpm_solver(unet, vqvae):
    """A pipeline whose saved scheduler config is UniPC's (solver_type="bh2" written out, as a saved config has
    it) takes the README's one-line switch: diffusers' DPM-Solver reads bh2 as midpoint, and so does this one, with
    its latents."""
    config = {**diffusers.UniPCMultistepScheduler(solver_type="bh2").config, "_use_default_values": []}
    pipe = _ldm(unet, vqvae, diffusers.DPMSolverMultistepScheduler.from_config(config))
    want = _ldm_latents(pipe)
    pipe.scheduler = zd.ZSNRDPMSolverMultistepScheduler.from_config(config)
    assert pipe.scheduler.config.solver_type == "midpoint"
    got = _ldm_latents(pipe)
    assert _close(want, got)[0], _close(want, got)


def _same_noise_sampler(scheduler, shape, seed):
    """Give ``scheduler`` (DPMSolverSDE) the same noise sampler on every run: independent normals from a generator
    seeded with ``seed``, installed after the pipeline's ``set_timesteps`` (which resets it).  diffusers' default is
    a Brownian tree over its own float32 table, which the float64 table here moves by more than float rounding."""
    set_timesteps = scheduler.set_timesteps

    def patched(*args, **kwargs):
        set_timesteps(*args, **kwargs)
        g = torch.Generator().manual_seed(seed)
        scheduler.noise_sampler = lambda sigma, sigma_next: torch.randn(shape, generator=g)

    scheduler.set_timesteps = patched
    return scheduler


@pytest.mark.parametrize("config", [{"prediction_type": "v_prediction"}, {"timestep_spacing": "trailing"}])
def test_ldm_pipeline_dpm_solver_sde(unet, vqvae, config):
    """DPMSolverSDE (two UNet calls a step, Brownian noise) in LDMPipeline: with the same noise sampler, the
    latents equal diffusers'."""
    pipe = _ldm(unet, vqvae, _same_noise_sampler(diffusers.DPMSolverSDEScheduler(**config), (2, 3, 8, 8), 6))
    want = _ldm_latents(pipe)
    pipe.scheduler = _same_noise_sampler(zd.ZSNRDPMSolverSDEScheduler.from_config(pipe.scheduler.config),
                                         (2, 3, 8, 8), 6)
    got = _ldm_latents(pipe)
    assert _close(want, got)[0], _close(want, got)


@pytest.mark.parametrize(("name", "config"), [
    *((name, ZERO_SNR) for name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                                    "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DPMSolverSDEScheduler")),
    # no timestep_spacing in diffusers' singlestep class (its linspace timesteps start at 999 too)
    ("DPMSolverSinglestepScheduler", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                                      "solver_order": 3})])
def test_ldm_pipeline_zero_snr(unet, vqvae, name, config):
    """At zero SNR the first UNet call gets the pipeline's start noise itself, at timestep 999, and the decoded
    latents are finite."""
    calls = []
    hook = unet.register_forward_pre_hook(lambda module, args: calls.append((args[0].clone(), args[1])))
    try:
        pipe = _ldm(unet, vqvae, zd.SCHEDULERS[name](**config))
        latents = _ldm_latents(pipe)
    finally:
        hook.remove()
    noise = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(calls[0][0], noise) and float(calls[0][1]) == 999
    assert torch.isfinite(latents).all() and all(torch.isfinite(x).all() for x, _ in calls)


@pytest.fixture(scope="module")
def sd_parts():
    """A tiny StableDiffusionPipeline's UNet and VAE, and prompt embeddings (no text encoder needed)."""
    pytest.importorskip("transformers")  # the pipeline module imports it
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


def _sd(parts, scheduler, cls=None):
    from diffusers import StableDiffusionPipeline

    unet, vae, _, _ = parts
    return _quiet((cls or StableDiffusionPipeline)(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False))


SD_GUIDED = {"guidance_scale": 7.5, "guidance_rescale": 0.7, "num_inference_steps": 8, "height": 16, "width": 16}


def _sd_latents(pipe, parts):
    _, _, cond, uncond = parts
    return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, output_type="latent",
                generator=torch.Generator().manual_seed(5), **SD_GUIDED).images


def test_stable_diffusion_pipeline_with_guidance_rescale(sd_parts):
    """StableDiffusionPipeline (guidance 7.5, guidance_rescale 0.7, done by the pipeline before step): Euler,
    DPM++ 2M, LMS, KDPM2 ancestral and EDM Euler equal diffusers' on finite schedules; the zero-SNR run is finite."""
    sd = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}
    for name, config in (("EulerDiscreteScheduler", sd), ("DPMSolverMultistepScheduler", sd),
                         ("LMSDiscreteScheduler", sd), ("KDPM2AncestralDiscreteScheduler", sd),
                         ("EDMEulerScheduler", {"sigma_max": 14.6})):
        pipe = _sd(sd_parts, getattr(diffusers, name)(**config))
        want = _sd_latents(pipe, sd_parts)
        pipe.scheduler = zd.SCHEDULERS[name].from_config(pipe.scheduler.config)
        got = _sd_latents(pipe, sd_parts)
        assert _close(want, got)[0], (name, _close(want, got))
        if not name.startswith("EDM"):
            pipe.scheduler = zd.SCHEDULERS[name].from_config(pipe.scheduler.config, **ZERO_SNR)
            assert torch.isfinite(_sd_latents(pipe, sd_parts)).all()
            assert pipe.scheduler.sigmas[0] == float("inf")


def test_stable_diffusion_pipeline_dpm_solver_sde(sd_parts):
    """DPMSolverSDE in StableDiffusionPipeline (guidance 7.5 and rescale 0.7 by the pipeline): with the same noise
    sampler diffusers' latents; at zero SNR, with diffusers' Brownian tree of a fixed noise_sampler_seed (its limit
    at sigma = inf), finite and the same on a second run."""
    sd = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}
    shape = (1, 4, 8, 8)
    pipe = _sd(sd_parts, _same_noise_sampler(diffusers.DPMSolverSDEScheduler(**sd), shape, 7))
    want = _sd_latents(pipe, sd_parts)
    pipe.scheduler = _same_noise_sampler(zd.ZSNRDPMSolverSDEScheduler.from_config(pipe.scheduler.config), shape, 7)
    got = _sd_latents(pipe, sd_parts)
    assert _close(want, got)[0], _close(want, got)
    pipe.scheduler = zd.ZSNRDPMSolverSDEScheduler.from_config(pipe.scheduler.config, noise_sampler_seed=11,
                                                              **ZERO_SNR)
    first = _sd_latents(pipe, sd_parts)
    assert pipe.scheduler.sigmas[0] == float("inf") and torch.isfinite(first).all()
    assert torch.equal(_sd_latents(pipe, sd_parts), first)


def _fused_guidance_pipeline():
    """The README's example: a StableDiffusionPipeline whose loop hands the scheduler both halves of the guided UNet
    call, so that guidance and its rescale run inside the fused step.  diffusers' ``__call__`` guides between the UNet
    and ``scheduler.step`` with no hook there; this subclass keeps the pipeline's parts (``prepare_latents``,
    ``prepare_extra_step_kwargs``, the UNet call on the doubled batch) and replaces only the loop."""
    from diffusers import StableDiffusionPipeline

    class FusedGuidanceStableDiffusionPipeline(StableDiffusionPipeline):
        @torch.no_grad()
        def __call__(self, prompt_embeds, negative_prompt_embeds, *, guidance_scale=7.5, guidance_rescale=0.0,
                     num_inference_steps=50, height=512, width=512, generator=None, **_):
            self.scheduler.set_timesteps(num_inference_steps, device=self.device)
            latents = self.prepare_latents(prompt_embeds.shape[0], self.unet.config.in_channels, height, width,
                                           prompt_embeds.dtype, self.device, generator)
            embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
            extra = self.prepare_extra_step_kwargs(generator, 0.0)
            for t in self.scheduler.timesteps:
                x = self.scheduler.scale_model_input(torch.cat([latents] * 2), t)
                uncond, cond = self.unet(x, t, encoder_hidden_states=embeds).sample.chunk(2)
                latents = self.scheduler.step((cond, uncond), t, latents, guidance_scale=guidance_scale,
                                              guidance_rescale=guidance_rescale, **extra).prev_sample
            return diffusers.pipelines.stable_diffusion.StableDiffusionPipelineOutput(
                images=latents, nsfw_content_detected=None)

    return FusedGuidanceStableDiffusionPipeline


@pytest.mark.parametrize(("name", "config"), [
    ("EulerDiscreteScheduler", {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("KDPM2AncestralDiscreteScheduler", {}),
    ("EulerDiscreteScheduler", ZERO_SNR),
    ("DPMSolverSDEScheduler", {"noise_sampler_seed": 3}),
    ("DPMSolverSDEScheduler", {"noise_sampler_seed": 3, **ZERO_SNR}),
    ("LCMScheduler", {}),
    ("LCMScheduler", ZERO_SNR),
    ("TCDScheduler", ZERO_SNR),
])
def test_guidance_inside_the_step_equals_the_pipelines(sd_parts, name, config):
    """The fused-guidance pipeline's latents equal the stock pipeline's (eager CFG, then rescale_noise_cfg) with the
    same scheduler, to float32 rounding: finite schedules and zero terminal SNR, stochastic samplers included."""
    sd = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}
    scheduler = zd.SCHEDULERS[name](**sd, **config)
    want = _sd_latents(_sd(sd_parts, scheduler), sd_parts)
    got = _sd_latents(_sd(sd_parts, scheduler, _fused_guidance_pipeline()), sd_parts)
    assert torch.isfinite(want).all()
    assert _close(want, got, rel=1e-5)[0], _close(want, got, rel=1e-5)
