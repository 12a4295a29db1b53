"""The ZSNR Sampler under today's ComfyUI calling convention, without ComfyUI: stand-ins written from today's public
``comfy/samplers.py`` and ``comfy/model_sampling.py`` (the pieces the pack touches), next to the 2024-03 snapshot the
other ComfyUI tests run in.  What changed since the snapshot and matters here:

* ``comfy.samplers.sample`` builds a ``CFGGuider`` and passes *it* as ``model_wrap``; ``extra_args`` holds only
  ``model_options`` and ``seed`` (no ``cond``/``uncond``/``cond_scale``): the cfg is the guider's ``cfg``;
* ``KSamplerX0Inpaint.__call__(x, sigma, denoise_mask, model_options={}, seed=None)``;
* ``cfg_function`` hands post-CFG functions ``cond_scale`` and ``uncond`` (None where the cfg = 1 shortcut skipped
  the unconditional call);
* ``model_sampling`` reshapes a one-element sigma to a scalar (``reshape_sigma``).

Each ZSNR run equals ``zsnr_kernels.sample`` on the same toy network called directly, from sigma = inf and on a
finite schedule, CFG++ included.
"""

from __future__ import annotations

import math
import types

import pytest
import torch

import zsnr_kernels as zk
from zsnr_kernels import comfyui as zc


def reshape_sigma(sigma, noise_dim):  # today's comfy.model_sampling.reshape_sigma
    return sigma.view(()) if sigma.nelement() == 1 else sigma.view(sigma.shape[:1] + (1,) * (noise_dim - 1))


class ModelSamplingV:
    """Today's ModelSamplingDiscrete(zsnr=True) mixed with V_PREDICTION: SD's betas, ComfyUI's zero-SNR fudge
    (last alphas_cumprod 4.897e-08), argmin timesteps."""

    sigma_data = 1.0

    def __init__(self):
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        abar = torch.cumprod(1.0 - betas, 0)
        s = abar.sqrt()
        s = (s - s[-1]) * s[0] / (s[0] - s[-1])
        abar = s * s
        abar[-1] = zc.COMFY_ZSNR_LAST_ALPHAS_CUMPROD
        self.num_timesteps = 1000
        self.sigmas = ((1 - abar) / abar).sqrt().float()
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def calculate_input(self, sigma, noise):
        sigma = reshape_sigma(sigma, noise.ndim)
        return noise / (sigma ** 2 + self.sigma_data ** 2) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = reshape_sigma(sigma, model_output.ndim)
        sd2 = self.sigma_data ** 2
        return model_input * sd2 / (sigma ** 2 + sd2) - model_output * sigma * sd2 ** 0.5 / (sigma ** 2 + sd2) ** 0.5

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        sigma = reshape_sigma(sigma, noise.ndim)
        noise = noise * torch.sqrt(1.0 + sigma ** 2.0) if max_denoise else noise * sigma
        return noise + latent_image

    def inverse_noise_scaling(self, sigma, latent):
        return latent


def net(y, t, context):
    """A smooth toy network of the model input, the timestep and a prompt vector (channels mixed)."""
    tt = (t.float() / 1000.0).reshape(-1, 1, 1, 1)
    mixed = y.roll(1, dims=1) * 0.3 + y * 0.6
    return torch.tanh(mixed + context.reshape(1, -1, 1, 1) * (1.0 - tt)) - 0.2 * y


class BaseModel:
    def __init__(self):
        self.model_sampling = ModelSamplingV()

    def apply_model(self, x, t, context):  # today's BaseModel._apply_model, reduced to what matters here
        sigma = t
        xc = self.model_sampling.calculate_input(sigma, x)
        t = self.model_sampling.timestep(t).float()
        return self.model_sampling.calculate_denoised(sigma, net(xc, t, context), x)


class CFGGuider:
    """Today's comfy.samplers.CFGGuider as the sampler sees it: ``inner_model``, ``cfg`` and
    ``__call__(x, timestep, model_options, seed)`` through ``sampling_function``/``cfg_function``."""

    def __init__(self, cfg, positive, negative):
        self.inner_model, self.cfg, self.conds = BaseModel(), cfg, {"positive": positive, "negative": negative}

    def __call__(self, x, timestep, model_options={}, seed=None):
        uncond = self.conds["negative"]
        if math.isclose(self.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False):
            uncond = None
        cond_pred = self.inner_model.apply_model(x, timestep, self.conds["positive"])
        uncond_pred = torch.zeros_like(x) if uncond is None else self.inner_model.apply_model(x, timestep, uncond)
        if "sampler_cfg_function" in model_options:
            args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": self.cfg, "timestep": timestep,
                    "input": x, "sigma": timestep, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred,
                    "model": self.inner_model, "model_options": model_options}
            result = x - model_options["sampler_cfg_function"](args)
        else:
            result = uncond_pred + (cond_pred - uncond_pred) * self.cfg
        for fn in model_options.get("sampler_post_cfg_function", []):
            args = {"denoised": result, "cond": self.conds["positive"], "uncond": uncond, "cond_scale": self.cfg,
                    "model": self.inner_model, "uncond_denoised": uncond_pred, "cond_denoised": cond_pred,
                    "sigma": timestep, "model_options": model_options, "input": x}
            result = fn(args)
        return result


class KSamplerX0Inpaint:  # today's: no cond/uncond/cond_scale arguments
    def __init__(self, model, sigmas):
        self.inner_model, self.sigmas = model, sigmas

    def __call__(self, x, sigma, denoise_mask, model_options={}, seed=None):
        assert denoise_mask is None
        return self.inner_model(x, sigma, model_options=model_options, seed=seed)


class Sampler:  # today's comfy.samplers.Sampler
    def sample(self):
        pass

    def max_denoise(self, model_wrap, sigmas):
        max_sigma = float(model_wrap.inner_model.model_sampling.sigma_max)
        sigma = float(sigmas[0])
        return math.isclose(max_sigma, sigma, rel_tol=1e-05) or sigma > max_sigma


@pytest.fixture
def today(monkeypatch):
    """zsnr_kernels.comfyui building its Sampler class on today's stand-ins (and back afterwards)."""
    fake = types.SimpleNamespace(Sampler=Sampler, KSamplerX0Inpaint=KSamplerX0Inpaint)
    monkeypatch.setattr(zc, "_comfy", lambda: fake)
    monkeypatch.setattr(zc, "_SAMPLER_CLASS", None)
    yield
    monkeypatch.setattr(zc, "_SAMPLER_CLASS", None)


POS, NEG = torch.tensor([0.5, -0.3, 0.2, 0.1]), torch.tensor([-0.1, 0.2, 0.0, -0.4])


def _schedule(finite: bool):
    sched = zc.zero_snr_schedule(ModelSamplingV())
    s = zc.schedule_sigmas(sched, "trailing", 6)
    if finite:  # ComfyUI's own table's top (its zsnr fudge, sigma ~4519) instead of inf, as KSampler starts
        s = s.clone()
        s[0] = ModelSamplingV().sigma_max
    return s


def _ours(name, cfg, sigmas, noise):
    guider = CFGGuider(cfg, POS, NEG)
    out = zc.make_sampler(name).sample(guider, sigmas, {"model_options": {}, "seed": 42}, None, noise,
                                       torch.zeros_like(noise), None, True)
    return out


def _direct(name, cfg, sigmas, noise):
    ms = ModelSamplingV()

    def model(y, sigma):
        s = sigma.float()
        t = torch.where(torch.isinf(s), torch.full_like(s, 999.0), ms.timestep(s).float())
        if cfg == 1.0:
            return net(y, t, POS)
        return net(y, t, POS), net(y, t, NEG)

    if math.isfinite(float(sigmas[0])):  # the start as KSAMPLER's noise_scaling makes it (sigmas[0] = sigma_max)
        noise = noise * math.sqrt(1.0 + float(sigmas[0]) ** 2) / float(sigmas[0])
    return zk.sample(model, noise, sigmas, sampler=name, prediction="v", guidance_scale=cfg, seed=42)


@pytest.mark.parametrize("finite", [False, True])
@pytest.mark.parametrize("name,cfg", [("euler", 4.0), ("dpmpp_2m", 4.0), ("euler_ancestral", 4.0),
                                      ("euler_cfg_pp", 1.5), ("dpmpp_2m_cfg_pp", 1.5),
                                      ("euler_ancestral_cfg_pp", 0.8), ("dpmpp_2s_ancestral_cfg_pp", 1.5)])
@pytest.mark.parametrize("batch", [1, 3])
def test_the_sampler_runs_under_todays_calling_convention(today, name, cfg, finite, batch):
    noise = torch.randn(batch, 4, 6, 6, generator=torch.Generator().manual_seed(batch))
    sigmas = _schedule(finite)
    ours = _ours(name, cfg, sigmas, noise)
    ref = _direct(name, cfg, sigmas, noise)  # (F_c, F_u) at guidance scale cfg: CFG for all, D_u for CFG++
    assert torch.isfinite(ours).all()
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= 2e-5 * scale, (ours - ref).abs().max().item()


@pytest.mark.parametrize("name", ["euler_cfg_pp", "dpmpp_2s_ancestral_cfg_pp"])
def test_cfg_pp_at_cfg_1_is_the_plain_sampler_under_todays_guider(today, name):
    """Today's guider at cfg 1 skips the unconditional call (its post-CFG args say ``uncond`` None): every step is
    the plain sampler's, to rounding."""
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(7))
    sigmas = _schedule(False)
    plain = {"euler_cfg_pp": "euler", "dpmpp_2s_ancestral_cfg_pp": "dpmpp_2s_ancestral"}[name]
    got, want = _ours(name, 1.0, sigmas, noise), _ours(plain, 1.0, sigmas, noise)
    assert (got - want).abs().max().item() <= 1e-6 * want.abs().max().item()


def test_fused_guidance_under_todays_cfg_args(today):
    """ZSNR Guidance reads today's ``sampler_cfg_function`` args (``model`` is the BaseModel); through a whole run
    from inf it equals the library's guidance rescale on the network called directly."""
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    sigmas = _schedule(False)
    guider = CFGGuider(4.0, POS, NEG)
    options = {"sampler_cfg_function": zc.fused_cfg_function(0.7, "v")}
    ours = zc.make_sampler("euler").sample(guider, sigmas, {"model_options": options, "seed": 1}, None, noise,
                                           torch.zeros_like(noise), None, True)
    ms = ModelSamplingV()

    def model(y, sigma):
        s = sigma.float()
        t = torch.where(torch.isinf(s), torch.full_like(s, 999.0), ms.timestep(s).float())
        return net(y, t, POS), net(y, t, NEG)

    ref = zk.sample(model, noise, sigmas, sampler="euler", prediction="v", guidance_scale=4.0, guidance_rescale=0.7,
                    rescale_space="v")
    assert torch.isfinite(ours).all()
    assert (ours - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()
