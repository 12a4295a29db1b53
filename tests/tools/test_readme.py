"""The README's Python snippets run as written (with a stand-in network)."""

from __future__ import annotations

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_readme_snippets_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4, generator=g) * 0.3
    ns = {
        "unet": lambda y, t, cond: torch.tanh(torch.einsum("ij,bjhw->bihw", w, y) * cond
                                              + 1e-3 * torch.as_tensor(t).float().view(-1, 1, 1, 1)),
        "text_cond": 1.0,
        "empty_cond": 0.5,
    }
    exec(blocks[0].replace("64, 64", "8, 8"), ns)
    assert torch.isfinite(ns["x0"]).all()
    ns["noise"] = torch.randn(1, 4, 8, 8, generator=g)
    exec(blocks[1], ns)
    assert torch.isfinite(ns["x0"]).all() and ns["sigma"] == 0.0


def test_readme_sampling_plan_snippet_runs_on_the_cpu():
    """The SamplingPlan snippet up to the CUDA graph capture, on the CPU, equals sample() as it claims."""
    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "SamplingPlan" in b)
    eager_part = block.split("graph = ")[0]
    code = eager_part.replace('"cuda"', '"cpu"').replace("64, 64", "8, 8").replace("torch.float16", "torch.float32")
    ns = {"torch": torch, "zk": __import__("zsnr_kernels")}
    ns["sigmas"] = ns["zk"].schedules.DiscreteSchedule.from_betas("scaled_linear", zero_terminal_snr=True).sigmas(
        6, spacing="trailing")
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.3

    def model(y, sigma):
        f = torch.tanh(torch.einsum("ij,bjhw->bihw", w, y))
        return f, 0.5 * f

    ns["model"] = model
    exec(code, ns)
    want = ns["zk"].sample(model, ns["noise"], ns["sigmas"], sampler="dpmpp_2m", guidance_scale=7.5,
                           guidance_rescale=0.7, seed=1234)
    assert torch.equal(ns["x0"], want)


def test_readme_k_diffusion_snippet_runs():
    """The k-diffusion switch snippet as written (``K.external`` through the drop-in, which loads k-diffusion's own
    modules without its training stack) with a stand-in network: finite samples from sigma = inf."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("k_diffusion") is None:
        pytest.skip("k-diffusion is not installed (the README's test command installs it)")
    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "K.external" in b)
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.3
    ns = {"unet": lambda y, t, cond: torch.tanh(torch.einsum("ij,bjhw->bihw", w, y) * cond), "text_cond": 1.0}
    exec(block.replace("64, 64", "8, 8"), ns)
    assert ns["sigmas"][0] == float("inf") and torch.isfinite(ns["x0"]).all()


def _tiny_stable_diffusion(tmp_path):
    """A StableDiffusionPipeline built here from tiny random models (no downloads): a CLIP tokenizer over a small
    character vocabulary, a one-layer CLIP text encoder, a small UNet and VAE, v-prediction, zero-SNR betas."""
    import json

    import diffusers
    import transformers

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["<|startoftext|>", "<|endoftext|>", "!"] + chars + [c + "</w>" for c in chars]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"),
                                           model_max_length=16)
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=16)).eval()
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4).eval()
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=16).eval()
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction",
                                        rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False,
                                        steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_readme_diffusers_snippet_runs(tmp_path):
    """The diffusers switch snippet as written, on a tiny pipeline built from random models: the scheduler is
    swapped, the first model call is at sigma = inf, and the image is finite."""
    import pytest

    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    import numpy as np

    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "from_config" in b)
    pipe = _tiny_stable_diffusion(tmp_path)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[1]))
    ns = {"pipe": pipe, "prompt": "a photo of a cat"}
    exec(block.replace("guidance_rescale=0.7)", "guidance_rescale=0.7, num_inference_steps=4, height=16, width=16)"),
         ns)
    assert type(pipe.scheduler).__name__ == "ZSNRDPMSolverMultistepScheduler"
    assert pipe.scheduler.sigmas[0] == float("inf") and float(calls[0].flatten()[0]) == 999
    assert np.isfinite(np.asarray(ns["image"])).all()


def test_readme_use_backend_snippet_runs():
    """The use_backend snippet as written: the block's steps run on the reference (the same bits as
    ``backend="torch"``; the cpu kernels, auto's choice for float32 CPU tensors, round differently)."""
    import zsnr_kernels as zk

    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "use_backend" in b)
    ns: dict = {}
    torch.manual_seed(0)
    exec(block, ns)
    sigmas = [float("inf"), 3.0, 1.0, 0.0]
    assert torch.equal(ns["x0"], zk.sample(ns["model"], ns["noise"], sigmas, sampler="heun", backend="torch"))
    if zk.backends.registry.resolve("auto", ns["noise"]) != "torch":
        assert not torch.equal(ns["x0"], zk.sample(ns["model"], ns["noise"], sigmas, sampler="heun"))


def test_every_python_block_of_the_readme_is_run_by_a_test():
    """A new snippet needs a test here: each python block is named by one of the tests above."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    covered = [b for b in blocks if b is blocks[0] or b is blocks[1] or "SamplingPlan" in b or "K.external" in b
               or "from_config" in b or "use_backend" in b or "FusedGuidanceStableDiffusionPipeline" in b
               or "shard_dim" in b]
    assert len(covered) == len(blocks), [b.splitlines()[0] for b in blocks if b not in covered]


def test_readme_fused_guidance_pipeline_snippet_runs(tmp_path):
    """The pipeline subclass that guides inside the scheduler's step, as written: on the tiny pipeline with a zero-SNR
    scheduler its latents equal those of the same loop guiding in eager PyTorch (diffusers' rescale_noise_cfg)."""
    import pytest

    pytest.importorskip("transformers")
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    from zsnr_kernels.diffusers import ZSNREulerDiscreteScheduler

    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
                 if "FusedGuidanceStableDiffusionPipeline" in b)
    ns = {}
    exec(block, ns)
    tiny = _tiny_stable_diffusion(tmp_path)
    sched = ZSNREulerDiscreteScheduler.from_config(tiny.scheduler.config)
    pipe = ns["FusedGuidanceStableDiffusionPipeline"](**{**tiny.components, "scheduler": sched})
    tokens = tiny.tokenizer(["a cat", ""], padding="max_length", return_tensors="pt").input_ids
    cond, uncond = tiny.text_encoder(tokens)[0].chunk(2)
    kw = dict(guidance_scale=5.0, guidance_rescale=0.7, num_inference_steps=4, height=16, width=16)
    got = pipe(cond, uncond, generator=torch.Generator().manual_seed(0), **kw)
    # the same loop, guided eagerly as the stock pipeline does
    sched.set_timesteps(4)
    latents = tiny.prepare_latents(1, 4, 16, 16, cond.dtype, "cpu", torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        x = sched.scale_model_input(torch.cat([latents] * 2), t)
        u, c = tiny.unet(x, t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        guided = rescale_noise_cfg(u + 5.0 * (c - u), c, guidance_rescale=0.7)
        latents = sched.step(guided, t, latents).prev_sample
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, latents, rtol=1e-4, atol=1e-5)
