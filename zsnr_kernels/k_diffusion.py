"""Drop-in replacements for k-diffusion's samplers, exact at zero terminal SNR (sigma = inf).

Switch a k-diffusion script with one line::

    from zsnr_kernels import k_diffusion as K          # was: import k_diffusion as K
    sigmas = K.sampling.get_sigmas_karras(25, 0.03, 14.6)
    x0 = K.sampling.sample_dpmpp_2m(model, noise * sigmas[0], sigmas, extra_args={"cond": c})

``K.sampling`` is this module, so ``K.sample_euler`` works too; ``K.external`` and ``K.utils`` are k-diffusion's
own modules (the model wrappers, the helpers), imported on first use, and the samplers this module does not
rewrite (``sample_dpm_fast``, ``sample_dpm_adaptive``) are k-diffusion's own functions.

**Same results.**  Each ``sample_*`` takes k-diffusion 0.1.1's arguments and defaults, calls
``model(x, sigma, **extra_args)`` (a k-diffusion denoiser, returning x0) at the same x and sigma, calls
``callback`` with the same dict (``x``, ``i``, ``sigma``, ``sigma_hat``, ``denoised``) at the same points, draws
noise in the same order, and returns the final x.  Noise: a given ``noise_sampler`` is called exactly when and
with the arguments k-diffusion calls it with; without one, ``torch.randn_like(x)`` (ancestral samplers, and EDM
churn, which k-diffusion draws on every step whether it is used or not) and the :class:`BrownianTreeNoiseSampler`
of the SDE samplers take the same numbers from torch's global generator.  So a seeded script gives k-diffusion's
image to float rounding (about 1e-14 in float64) and leaves the generator in the same state.  The step coefficients
are computed in float64 from the sigmas' values: with float32 sigmas (``get_sigmas_*``'s default dtype) k-diffusion
computes them in float32, and where that cancels (dpm_2_ancestral's sigma_down near the end of a VP schedule, up
to ~1e-3 in x) the two differ by k-diffusion's error.  Each update is one fused step of :mod:`zsnr_kernels.steps`
(``backend="auto"``) on the state y = c_in(sigma) x, x0-prediction.

**Zero terminal SNR.**  Where ``sigmas[0]`` is inf, k-diffusion's ``x = noise * sigmas[0]`` is infinite and every
sampler returns NaN.  Here, with ``sigmas[0] = inf``:

* ``x`` is the unit noise itself (the model input at sigma = inf); an infinite ``x`` is refused.
* ``model`` must be one of k-diffusion's v-prediction wrappers (``VDenoiser``, ``DiscreteVDDPMDenoiser``,
  ``CompVisVDenoiser``, called directly): the run then calls the network inside, ``v = inner(y, t, **extra_args)``
  on the model input y (as the wrapper's ``forward`` does), with t = ``model.sigma_to_t(sigma)``, whose value at
  sigma = inf is its limit: the last training timestep T - 1 for the discrete wrappers (k-diffusion's log-space
  lookup gives NaN there), 1 for ``VDenoiser``.  Any other model raises ``ValueError``: a denoiser D(x, sigma)
  has no finite input at sigma = inf.
* The step from inf is each sampler's exact limit there (docs/design.md §2.3): first order for the DPM++ multistep
  samplers, and Euler (one model call) for heun, dpm_2 and lms, Euler ancestral for dpm_2_ancestral, whose
  second-order updates have no limit there; dpmpp_sde keeps both calls for eta > 0 (its midpoint is at inf too)
  and is Euler at eta = 0.
* ``callback`` gets ``x=None`` at sigma = inf (x is infinite there), and on this path it is called after the
  fused update, which forms ``denoised``.
* :func:`get_sigmas_zero_snr` builds the schedule (k-diffusion's ``get_sigmas`` gives NaN for such a model), and
  :class:`BrownianTreeNoiseSampler` answers at sigma = inf.

**Refused where k-diffusion computes garbage or more.**  ``sigmas`` must be strictly descending, without NaN,
with inf only first (its last value need not be 0: the result is x at that sigma, as in k-diffusion); the grid
helpers refuse ``sigma_max = inf`` (k-diffusion returns NaN) and name :func:`get_sigmas_zero_snr`; ``sample_lms``
takes ``order`` 1 to 4 (k-diffusion integrates any order numerically).  The step functions' limits apply too:
positive sigmas in [1e-30, 1e30], and a second-order step (heun, dpm_2_ancestral) spanning at most a factor 1e6
(dpm_2: 1e12), where k-diffusion returns numbers its float rounding times that factor has made meaningless (a
two-step Karras grid from 4500 to 0.002 is refused; add steps or use euler / euler_ancestral).

**Half precision.**  The state keeps ``x``'s dtype, and a model output or a noise sampler's tensor of another dtype
is cast to it (a noise tensor that broadcasts to x's shape is broadcast, as k-diffusion's addition does).  k-diffusion
instead promotes x to float32 after the first step of the samplers whose update divides by a float32 sigma
(euler, euler_ancestral, heun, dpm_2, dpm_2_ancestral, dpmpp_2s_ancestral, lms) and returns float32; for its
results in those cases pass ``x`` in float32.  The callback's ``x`` is formed from the
state for the report: editing it in place does not steer the run.  Editing ``denoised`` in place on finite
schedules steers it exactly where it steers k-diffusion's: not in euler, heun, dpm_2 and lms (whose ``d`` is
formed before the callback; here their callback gets a copy), in the other samplers.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import math
import sys
import threading
from collections.abc import Sequence

import torch
from tqdm.auto import trange

from . import _validate, coefficients as co, schedules, steps
from .parameterization import parameterization

INF = math.inf

# k-diffusion forms d = to_d(x, sigma, denoised) before it calls back in these samplers, so a callback editing
# denoised in place does not steer them (it does steer the others, whose updates read denoised afterwards): their
# callbacks get a copy
_D_BEFORE_CALLBACK = ("euler", "heun", "dpm_2", "lms")
# k-diffusion's noise source per sampler (facts of its code, not of the samplers): a default noise sampler for the
# ancestral ones, a Brownian tree for the SDE ones
_ANCESTRAL = ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral")
_SDE = ("dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_sde")

#: spacings of :func:`get_sigmas_zero_snr`
ZERO_SNR_SPACINGS = ("trailing", "linspace", "k-diffusion", "karras", "exponential", "polyexponential")


# ------------------------------------------------------------------------------------- k-diffusion's helpers


def append_zero(x):
    """``x`` with a 0 appended (k-diffusion)."""
    return torch.cat([x, x.new_zeros([1])])


def _append_dims(x, target_dims):
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


def _finite_sigma_max(sigma_max, grid: str) -> None:
    if math.isinf(float(sigma_max)):
        raise ValueError(
            f"sigma_max is inf: get_sigmas_{grid}'s formula gives NaN there. For a zero-terminal-SNR model use "
            f"get_sigmas_zero_snr(model, n, spacing={grid!r}): it starts at inf and continues the grid from the "
            "model's largest finite sigma")


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7., device='cpu'):
    """Karras et al. (2022)'s schedule, k-diffusion's arithmetic (torch's default dtype), then 0."""
    _finite_sigma_max(sigma_max, "karras")
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return append_zero(sigmas).to(device)


def get_sigmas_exponential(n, sigma_min, sigma_max, device='cpu'):
    """Uniform in log sigma, k-diffusion's arithmetic, then 0."""
    _finite_sigma_max(sigma_max, "exponential")
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, device=device).exp()
    return append_zero(sigmas)


def get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=1., device='cpu'):
    """Polynomial in log sigma, k-diffusion's arithmetic, then 0."""
    _finite_sigma_max(sigma_max, "polyexponential")
    ramp = torch.linspace(1, 0, n, device=device) ** rho
    sigmas = torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
    return append_zero(sigmas)


def get_sigmas_vp(n, beta_d=19.9, beta_min=0.1, eps_s=1e-3, device='cpu'):
    """The continuous VP schedule, k-diffusion's arithmetic, then 0."""
    t = torch.linspace(1, eps_s, n, device=device)
    sigmas = torch.sqrt(torch.exp(beta_d * t ** 2 / 2 + beta_min * t) - 1)
    return append_zero(sigmas)


def to_d(x, sigma, denoised):
    """The Karras ODE derivative (x - denoised) / sigma (k-diffusion)."""
    return (x - denoised) / _append_dims(sigma, x.ndim)


def get_ancestral_step(sigma_from, sigma_to, eta=1.):
    """(sigma_down, sigma_up) of an ancestral step from sigma_from to sigma_to (k-diffusion)."""
    if not eta:
        return sigma_to, 0.
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


def default_noise_sampler(x):
    """k-diffusion's default noise of the ancestral samplers: ``torch.randn_like(x)`` on every call."""
    return lambda sigma, sigma_next: torch.randn_like(x)


# ---------------------------------------------------------------------------------------- Brownian tree noise


class _BatchedBrownianTree:
    """k-diffusion's ``BatchedBrownianTree`` (one ``torchsde.BrownianTree`` per seed), plus the normalised
    increment over an infinite interval."""

    def __init__(self, x, t0, t1, seed=None):
        try:
            import torchsde
        except ImportError:
            raise ImportError(
                "the SDE samplers' default noise is k-diffusion's Brownian tree, which needs torchsde: "
                "pip install torchsde, or pass noise_sampler= (e.g. default_noise_sampler(x) for independent "
                "Gaussian noise on every step)") from None
        t0, t1, self.sign = self.sort(t0, t1)
        w0 = torch.zeros_like(x)
        if seed is None:
            seed = torch.randint(0, 2 ** 63 - 1, []).item()
        try:
            count = len(seed)
        except TypeError:  # one seed, one tree for the whole batch
            count = None
        self.batched = count is not None
        if self.batched:
            if count != x.shape[0]:
                raise ValueError(f"seed has {count} entries but x has {x.shape[0]} samples; pass one seed or one "
                                 "per sample")
            w0 = w0[0]
        else:
            seed = [seed]
        self.seeds = list(seed)
        self.shape, self.dtype, self.device = tuple(w0.shape), x.dtype, x.device
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s) for s in self.seeds]

    @staticmethod
    def sort(a, b):
        return (a, b, 1) if a < b else (b, a, -1)

    def __call__(self, t0, t1):
        t0, t1, sign = self.sort(t0, t1)
        w = torch.stack([tree(t0, t1) for tree in self.trees]) * (self.sign * sign)
        return w if self.batched else w[0]

    def to_infinity(self):
        """The limit of (W(b) - W(a)) / sqrt(b - a) as b -> inf: unit Gaussian, independent of the tree on [t0, t1],
        drawn from a generator seeded with the tree's seed (the same numbers on every call)."""
        z = [torch.randn(self.shape, generator=torch.Generator(device=self.device).manual_seed(s), dtype=self.dtype,
                         device=self.device) for s in self.seeds]
        return torch.stack(z) if self.batched else z[0]


class BrownianTreeNoiseSampler:
    """k-diffusion's noise sampler backed by ``torchsde.BrownianTree`` (the same seed gives the same noise),
    defined at sigma = inf too.

    x: the tensor whose shape, device and dtype to use; sigma_min, sigma_max: the finite interval the tree
    spans; seed: an int, or one per sample (one tree each); None draws one from torch's global generator, as
    k-diffusion does; transform: maps sigma to the tree's time.  ``sampler(sigma, sigma_next)`` is the Brownian
    increment between them divided by its standard deviation.  When sigma or sigma_next is inf, the increment
    over the infinite interval, normalised, is a unit Gaussian independent of the tree (the limit as the upper
    end grows): it is drawn from a generator seeded with the tree's seed, so a seed still fixes every sample.
    """

    def __init__(self, x, sigma_min, sigma_max, seed=None, transform=lambda x: x):
        if math.isinf(float(sigma_max)):
            raise ValueError("sigma_max is inf: a Brownian tree spans a finite interval. Pass the largest finite "
                             "sigma of the schedule; calls at sigma = inf get the limit (see the class docstring)")
        self.transform = transform
        t0, t1 = self.transform(torch.as_tensor(sigma_min)), self.transform(torch.as_tensor(sigma_max))
        self.tree = _BatchedBrownianTree(x, t0, t1, seed)

    def __call__(self, sigma, sigma_next):
        if math.isinf(float(sigma)) or math.isinf(float(sigma_next)):
            return self.tree.to_infinity()
        t0, t1 = self.transform(torch.as_tensor(sigma)), self.transform(torch.as_tensor(sigma_next))
        return self.tree(t0, t1) / (t1 - t0).abs().sqrt()


# -------------------------------------------------------------------------------- zero SNR: models and grids

#: the k-diffusion classes whose ``forward`` is a v-prediction wrapper, and what the sampler calls on them
_V_FORWARDS = {
    "VDenoiser": ("inner_model", ("sigma_to_t", "sigma_data")),
    "DiscreteVDDPMDenoiser": ("get_v", ("sigma_to_t", "sigma_data", "sigmas")),
}

_DENOISER_AT_INF = (
    "sigmas[0] is inf (zero terminal SNR), but model ({name}) is not one of k-diffusion's v-prediction wrappers. "
    "A denoiser D(x, sigma) takes the variance-exploding latent x = x0 + sigma * noise, which is infinite at "
    "sigma = inf, so it has no finite input there (k-diffusion's samplers return NaN). Either pass the "
    "k_diffusion.external.VDenoiser / DiscreteVDDPMDenoiser / CompVisVDenoiser wrapping a v-prediction network "
    "itself (not inside another wrapper, e.g. a CFG denoiser, and without an overridden forward): then the "
    "sampler calls the network on the model input, the noise itself at sigma = inf. Or start from a finite "
    "sigma (sigmas[1:] with x = noise * sigmas[1]). An eps-prediction model cannot start at inf at all: "
    "D = x - sigma * eps has no limit there."
)


class _VNetwork:
    """The network inside one of k-diffusion's v-prediction wrappers, called as the wrapper's ``forward`` calls it
    (``inner_model(c_in x, t, **kw)`` for ``VDenoiser``, ``get_v(c_in x, t, **kw)`` for the discrete ones) but on
    the model input y = c_in x directly, which is finite at sigma = inf.

    A model qualifies when the class defining its ``forward`` is named ``VDenoiser`` or ``DiscreteVDDPMDenoiser``
    (``CompVisVDenoiser`` inherits the latter) and it has the attributes used.  Matching the ``forward``'s owner
    rather than ``isinstance`` refuses subclasses that override ``forward`` (adding guidance, say), which calling
    the inner network would silently skip; matching by name accepts vendored copies of k-diffusion and needs no
    import of it.
    """

    def __init__(self, model, call, discrete: bool):
        self.model, self.call, self.discrete = model, call, discrete
        self.sigma_data = float(model.sigma_data)

    @classmethod
    def of(cls, model) -> _VNetwork | None:
        owner = next((c for c in type(model).__mro__ if "forward" in vars(c)), None)
        spec = _V_FORWARDS.get(getattr(owner, "__name__", None))
        if spec is None or not all(hasattr(model, a) for a in (spec[0], *spec[1])):
            return None
        call = model.inner_model if spec[0] == "inner_model" else model.get_v
        return cls(model, call, discrete=spec[0] == "get_v")

    def __call__(self, y, sigma: float, sigma_vec, extra_args):
        t = self.model.sigma_to_t(sigma_vec)
        if sigma == INF:
            if self.discrete:  # the last training timestep; log-space distances to the table's inf are NaN
                t = torch.full_like(t, len(self.model.sigmas) - 1)
            if not torch.isfinite(t).all():
                raise ValueError(f"{type(self.model).__name__}.sigma_to_t(inf) is not finite: the network has no "
                                 "time input for sigma = inf. Start from a finite sigma")
        return self.call(y, t, **extra_args)


def _discrete_schedule(model_or_alphas_cumprod) -> schedules.DiscreteSchedule:
    obj = model_or_alphas_cumprod
    if isinstance(obj, (torch.Tensor, Sequence)):
        return schedules.DiscreteSchedule.from_alphas_cumprod(obj)
    table = getattr(obj, "sigmas", None)
    if isinstance(table, torch.Tensor):
        return schedules.DiscreteSchedule.from_sigmas(table)
    raise TypeError("model_or_alphas_cumprod must be a discrete k-diffusion wrapper (with its table of training "
                    f"sigmas, e.g. DiscreteVDDPMDenoiser) or an alphas_cumprod tensor, got {type(obj).__name__}")


def get_sigmas_zero_snr(model_or_alphas_cumprod, n, spacing="trailing", *, rho=None, device="cpu"):
    """Sampling sigmas from sigma = inf for a zero-terminal-SNR discrete model: n noise levels, then 0.

    model_or_alphas_cumprod: a k-diffusion discrete wrapper (``DiscreteVDDPMDenoiser``, ``CompVisVDenoiser``:
        its table ``sigmas`` of training sigmas) or the model's ``alphas_cumprod``, which must end at 0 (Lin et
        al.'s rescaled betas; ``schedules.alphas_cumprod(schedules.rescale_zero_terminal_snr(betas))``), so that
        its last training sigma is inf.
    spacing:
        ``"trailing"`` (Lin et al. §3.3, the default), ``"linspace"`` (n >= 2): diffusers' integer timesteps
        (:func:`zsnr_kernels.schedules.timesteps`), which start at the last one, T - 1, and the training sigmas
        there.  (Its ``"leading"`` spacing misses T - 1, the flaw of Lin et al. §3.3, so it has no place here.)
        ``"k-diffusion"``: what the wrapper's own ``get_sigmas(n)`` computes, fractional timesteps
        ``linspace(T - 1, 0, n)`` with log-linear interpolation, but inf at t = T - 1 where k-diffusion's
        interpolation returns NaN (0 * inf), and in float64.
        ``"karras"``, ``"exponential"``, ``"polyexponential"``: inf, then k-diffusion's grid of n - 1 points from
        the model's largest finite sigma down to its smallest (``rho``: 7 for karras, 1 for polyexponential).

    Returns n + 1 float64 values on ``device``: inf, ..., 0.
    """
    n = _validate.integer("n (the number of noise levels before the final 0)", n, lo=1)
    sched = _discrete_schedule(model_or_alphas_cumprod)
    if not sched.zero_terminal_snr:
        raise ValueError(
            f"the model's largest training sigma is {sched.sigma_max:.6g} (alphas_cumprod[-1] = "
            f"{sched.alphas_cumprod[-1].item():.3g} > 0): it is not a zero-terminal-SNR model, so there is no "
            "sigma = inf to start from. Use its finite grid (get_sigmas(n), get_sigmas_karras), or, for a model "
            "trained with Lin et al.'s rescaled schedule, build the wrapper on that schedule's alphas_cumprod")
    if rho is not None and spacing not in ("karras", "polyexponential"):
        raise ValueError(f"rho shapes the karras and polyexponential grids, not spacing={spacing!r}")
    if spacing == "linspace" and n < 2:
        raise ValueError("spacing='linspace' with n = 1 is timestep 0 in diffusers, not sigma = inf; use 'trailing'")
    if spacing in ("trailing", "linspace"):
        out = sched.sigmas(n, spacing)
    elif spacing == "k-diffusion":
        t = torch.linspace(sched.num_train_timesteps - 1, 0, n, dtype=torch.float64)
        out = append_zero(sched.t_to_sigma(t))
    elif spacing in ("karras", "exponential", "polyexponential"):
        out = sched.grid(spacing, n, **({} if rho is None else {"rho": rho}))
    else:
        raise ValueError(f"spacing must be one of {ZERO_SNR_SPACINGS}, got {spacing!r}")
    return out.to(device)


# ------------------------------------------------------------------------------------------------ the samplers


def _schedule(sigmas) -> tuple[torch.Tensor, list[float]]:
    """(sigmas as a tensor, as floats): 1-D, no NaN, >= 0, strictly descending; only sigmas[0] may be inf.  The last value
    need not be 0 (k-diffusion then returns x at that sigma, as :func:`zsnr_kernels.sample` does)."""
    if isinstance(sigmas, torch.Tensor):
        if sigmas.ndim != 1:
            raise ValueError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
    elif isinstance(sigmas, Sequence):
        sigmas = torch.tensor([_validate.real(f"sigmas[{i}]", v, allow_inf=True) for i, v in enumerate(sigmas)],
                              dtype=torch.float64)
    else:
        raise TypeError(f"sigmas must be a 1-D tensor, got {type(sigmas).__name__}")
    vals = sigmas.detach().double().cpu().tolist()
    if any(math.isnan(v) for v in vals):
        raise ValueError("sigmas contains NaN (k-diffusion's get_sigmas gives NaN at a zero-terminal-SNR model's "
                         "sigma = inf: build the schedule with get_sigmas_zero_snr)")
    if any(v < 0 for v in vals):
        raise ValueError(f"sigmas must be >= 0, got {min(vals)}")
    _validate.not_ascending(vals, isinstance(sigmas, torch.Tensor))
    if any(math.isinf(v) for v in vals[1:]):
        raise ValueError("only sigmas[0] may be inf")
    for i in range(len(vals) - 1):
        if not vals[i + 1] < vals[i]:
            fix = "; drop repeated values (a zero-length step)" if vals[i + 1] == vals[i] else ""
            raise ValueError(f"sigmas must be strictly descending, but sigmas[{i + 1}]={vals[i + 1]} >= "
                             f"sigmas[{i}]={vals[i]}{fix}")
    return sigmas, vals


class _Draw:
    """One noise draw k-diffusion makes in a step.  The fused step calls it only when it adds noise; a draw it did
    not need is made and dropped by :meth:`settle`, so generators and stateful noise samplers advance exactly as
    under k-diffusion."""

    __slots__ = ("done", "make")

    def __init__(self, make):
        self.make, self.done = make, False

    def __call__(self):
        self.done = True
        return self.make()

    def settle(self) -> None:
        if not self.done:
            self.make()


def _as_state_noise(z, x: torch.Tensor):
    """A noise sampler's tensor as the state takes it: x's dtype and device, and x's shape where it broadcasts
    there (k-diffusion adds it to x, promoting and broadcasting; the state keeps x's dtype as with model outputs)."""
    if isinstance(z, torch.Tensor) and z.shape != x.shape and torch.broadcast_shapes(z.shape, x.shape) == x.shape:
        z = z.expand_as(x)
    return z.to(device=x.device, dtype=x.dtype) if isinstance(z, torch.Tensor) else z


def _dpmpp_sde_draws(noise_sampler, sigma_t, sigma_next_t, at_inf: bool, x) -> tuple[_Draw, _Draw]:
    """The two noise draws of a ``sample_dpmpp_sde`` step, called with the arguments k-diffusion computes, in the
    sigmas' own dtype: ``(sigma_fn(t), sigma_fn(t + h/2))`` for the first stage and ``(sigma_fn(t),
    sigma_fn(t_next))`` for the second (a Brownian tree's increments move with its query times by more than float
    rounding, so the times are k-diffusion's to the bit).  From sigma = inf (k-diffusion: t + h/2 is NaN) the first
    stage's are ``(inf, inf)``, the limit of its interval."""
    t, t_next = sigma_t.log().neg(), sigma_next_t.log().neg()
    sigma_from, sigma_to = t.neg().exp(), t_next.neg().exp()
    sigma_mid = sigma_t if at_inf else (t + (t_next - t) * 0.5).neg().exp()
    return (_Draw(lambda: _as_state_noise(noise_sampler(sigma_from, sigma_mid), x)),
            _Draw(lambda: _as_state_noise(noise_sampler(sigma_from, sigma_to), x)))


def _k_diffusion_draws(sampler: str, sigma_next: float, eta: float, two_stages: bool) -> bool:
    """Whether k-diffusion makes this step's noise draw (after the step's model calls) even when it adds none."""
    if co.SAMPLERS[sampler].churn:
        return True  # the next step's churn noise: k-diffusion draws it at that step's start, used or not
    if sampler == "dpm_2_ancestral":
        return two_stages  # drawn only in its DPM-Solver-2 branch (sigma_down > 0)
    if sampler == "dpmpp_sde":
        return sigma_next > 0  # both stages' draws, whatever eta (k-diffusion multiplies them by sigma_up = 0)
    if sampler in _SDE:
        return bool(eta) and sigma_next > 0
    return sigma_next > 0  # euler_ancestral, dpmpp_2s_ancestral


@torch.no_grad()
def _sample(sampler, model, x, sigmas, extra_args, callback, disable, *, noise_sampler=None, s_churn=0.0,
            s_tmin=0.0, s_tmax=INF, s_noise=1.0, eta=1.0, solver_type="midpoint", order=4):
    """The one loop behind every ``sample_*``: k-diffusion's calls and draws, this library's fused steps."""
    _validate.tensor("x", x)
    sig_t, vals = _schedule(sigmas)
    s_noise = _validate.real("s_noise", s_noise, lo=0.0)
    eta = _validate.real("eta", eta, lo=0.0)
    if noise_sampler is not None and not callable(noise_sampler):
        raise TypeError("noise_sampler must be callable as noise_sampler(sigma, sigma_next)")
    extra_args = {} if extra_args is None else extra_args
    n = len(vals) - 1
    if n == 0:
        return x
    vnet = None
    if vals[0] == INF:
        vnet = _VNetwork.of(model)
        if vnet is None:
            raise ValueError(_DENOISER_AT_INF.format(name=type(model).__name__))
        if not torch.isfinite(x).all():
            raise ValueError("x is not finite, but at sigmas[0] = inf x must be the unit noise itself (the model "
                             "input there), not noise * sigmas[0], which is infinite")
        pz = parameterization("v", vnet.sigma_data)
        y = x
    else:
        pz = parameterization("x0", 1.0)  # a denoiser's output is D itself; any sigma_data serves
        y = pz.to_y(x, vals[0])
    options = {"prediction": pz.prediction, "sigma_data": pz.sigma_data,
               "return_denoised": vnet is not None and callback is not None}
    spec = co.SAMPLERS[sampler]
    step = steps.step_function(sampler)
    if spec.eta:
        options.update(eta=eta, s_noise=s_noise)
    if "solver_type" in dict(spec.options):
        options["solver_type"] = solver_type
    if "order" in dict(spec.options):
        options["order"] = order
    depth = order - 1 if spec.keeps == "derivative" else spec.history  # LMS remembers order - 1 derivatives

    # noise: k-diffusion's sources, called at k-diffusion's points
    if sampler in _SDE and noise_sampler is None:
        finite = sig_t[(sig_t > 0) & torch.isfinite(sig_t)]
        if finite.numel():  # none when the only step is inf -> 0, which adds no noise
            noise_sampler = BrownianTreeNoiseSampler(x, finite.min(), finite.max())
    elif sampler in _ANCESTRAL and noise_sampler is None:
        noise_sampler = default_noise_sampler(x)
    hat_t = [sig_t[i] for i in range(n)]  # sigma_hat: the callback's tensors; floats for the steps
    hats = vals[:-1]
    if spec.churn:
        s_churn = _validate.real("s_churn", s_churn, lo=0.0)
        s_tmin = _validate.real("s_tmin", s_tmin, allow_inf=True)
        s_tmax = _validate.real("s_tmax", s_tmax, allow_inf=True)
        window = ((sig_t[:-1] >= s_tmin) & (sig_t[:-1] <= s_tmax)).tolist()
        gammas = [min(s_churn / n, 2 ** 0.5 - 1) if w else 0.0 for w in window]
        hat_t = [sig_t[i] * (g + 1) for i, g in enumerate(gammas)]
        hats = torch.stack(hat_t).double().cpu().tolist()
        eps = torch.randn_like(x)  # k-diffusion draws each step's churn noise, used or not; this is step 0's
        if hats[0] != vals[0]:
            y = steps.churn_step(y, vals[0], hats[0], s_noise=s_noise, noise=eps, prediction=pz.prediction,
                                 sigma_data=pz.sigma_data)

    def evaluate(y, sigma, report: bool):
        """(x, model output) at the state y and noise level sigma: the denoiser is called on x = y / c_in(sigma)
        as k-diffusion calls it, the v network on y itself (x is then formed only to ``report`` it to the
        callback; it is None at sigma = inf)."""
        sigma_vec = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        xs = pz.to_x(y, sigma) if vnet is None or report else None
        out = model(xs, sigma_vec, **extra_args) if vnet is None else vnet(y, sigma, sigma_vec, extra_args)
        return xs, out.to(y.dtype)  # a half-precision x with a float32 network: the state keeps x's dtype

    history: list[tuple[float, torch.Tensor]] = []
    for i in trange(n, disable=disable):
        sigma, sigma_next = hats[i], vals[i + 1]
        xs, out = evaluate(y, sigma, callback is not None)
        if callback is not None and vnet is None:  # before the update (and its noise draws), as k-diffusion calls
            # it; editing denoised steers the update where it steers k-diffusion's, so those samplers get a copy
            callback({"x": xs, "i": i, "sigma": sig_t[i], "sigma_hat": hat_t[i],
                      "denoised": out.clone() if sampler in _D_BEFORE_CALLBACK else out})
        kw = dict(options)
        draw = draw2 = None
        if spec.churn and i + 1 < n:
            draw = _Draw(lambda: torch.randn_like(x))  # k-diffusion's churn noise of step i + 1
            if hats[i + 1] != sigma_next:  # fold that churn into this update (docs/design.md §2.5)
                kw.update(sigma_hat_next=hats[i + 1], s_noise=s_noise, noise=draw)
        elif noise_sampler is not None and sampler == "dpmpp_sde":
            draw, draw2 = _dpmpp_sde_draws(noise_sampler, sig_t[i], sig_t[i + 1], vals[i] == INF, x)
            kw["noise"] = draw
        elif noise_sampler is not None:
            draw = _Draw(lambda i=i: _as_state_noise(noise_sampler(sig_t[i], sig_t[i + 1]), x))
            kw["noise"] = draw
        if depth:
            kw["history"] = history
        r = step(y, out, sigma, sigma_next, **kw)
        if callback is not None and vnet is not None:  # D of a v model comes out of the fused step
            callback({"x": xs, "i": i, "sigma": sig_t[i], "sigma_hat": hat_t[i], "denoised": r.denoised})
        two_stages = not r.complete
        if draw2 is not None and sigma_next > 0:  # dpmpp_sde's first-stage draw, made before its second model call
            draw.settle()
        if two_stages:
            _, out2 = evaluate(r.y, r.sigma, False)
            r = step(r.y, out2, sigma, sigma_next, first=r, **(kw if draw2 is None else {**kw, "noise": draw2}))
        if draw is not None and _k_diffusion_draws(sampler, sigma_next, eta, two_stages):
            (draw if draw2 is None else draw2).settle()
        if depth:
            history = ([(sigma, r.derivative if spec.keeps == "derivative" else r.denoised)] + history)[:depth]
        y = r.y
    return pz.to_x(y, vals[-1])


def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float('inf'), s_noise=1.):
    """Euler steps with EDM churn (Karras et al. 2022, Algorithm 2), as ``k_diffusion.sampling.sample_euler``."""
    return _sample("euler", model, x, sigmas, extra_args, callback, disable, s_churn=s_churn, s_tmin=s_tmin,
                   s_tmax=s_tmax, s_noise=s_noise)


def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None):
    """Ancestral sampling with Euler steps, as ``k_diffusion.sampling.sample_euler_ancestral``."""
    return _sample("euler_ancestral", model, x, sigmas, extra_args, callback, disable, eta=eta, s_noise=s_noise,
                   noise_sampler=noise_sampler)


def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                s_tmax=float('inf'), s_noise=1.):
    """Heun steps with EDM churn (Karras et al. 2022, Algorithm 2), as ``k_diffusion.sampling.sample_heun``.
    From sigma = inf the step is Euler (the trapezoid over an infinite interval has no limit)."""
    return _sample("heun", model, x, sigmas, extra_args, callback, disable, s_churn=s_churn, s_tmin=s_tmin,
                   s_tmax=s_tmax, s_noise=s_noise)


def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float('inf'), s_noise=1.):
    """DPM-Solver-2 steps with EDM churn, as ``k_diffusion.sampling.sample_dpm_2``; Euler from sigma = inf."""
    return _sample("dpm_2", model, x, sigmas, extra_args, callback, disable, s_churn=s_churn, s_tmin=s_tmin,
                   s_tmax=s_tmax, s_noise=s_noise)


def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None):
    """Ancestral sampling with DPM-Solver-2 steps, as ``k_diffusion.sampling.sample_dpm_2_ancestral``; Euler
    ancestral from sigma = inf."""
    return _sample("dpm_2_ancestral", model, x, sigmas, extra_args, callback, disable, eta=eta, s_noise=s_noise,
                   noise_sampler=noise_sampler)


def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep, as ``k_diffusion.sampling.sample_lms`` (``order`` 1 to 4); Euler from sigma = inf."""
    order = _validate.integer("order", order, lo=1, hi=co.LMS_MAX_ORDER)  # before the first model call
    return _sample("lms", model, x, sigmas, extra_args, callback, disable, order=order)


def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                              noise_sampler=None):
    """Ancestral sampling with DPM-Solver++(2S) steps, as ``k_diffusion.sampling.sample_dpmpp_2s_ancestral``."""
    return _sample("dpmpp_2s_ancestral", model, x, sigmas, extra_args, callback, disable, eta=eta,
                   s_noise=s_noise, noise_sampler=noise_sampler)


def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                     noise_sampler=None, r=1 / 2):
    """DPM-Solver++(2S) SDE, as ``k_diffusion.sampling.sample_dpmpp_sde`` (:func:`zsnr_kernels.dpmpp_sde_step`):
    two model calls per step, the noise sampler called with k-diffusion's ``(sigma, sigma_s)`` and ``(sigma,
    sigma')``; default noise a :class:`BrownianTreeNoiseSampler` over the finite sigmas, seeded from torch's
    generator.  ``r`` must be 1/2 (the fused step's midpoint; k-diffusion's other values are not rewritten).  From
    sigma = inf: eta > 0 keeps both calls (the second at sigma = inf too), eta = 0 is one Euler step
    (:func:`zsnr_kernels.coefficients.dpmpp_sde`)."""
    if r != 0.5:
        raise ValueError(f"r={r!r}: the fused dpmpp_sde step takes k-diffusion's default r = 1/2 only; for another "
                         "midpoint use k_diffusion.sampling.sample_dpmpp_sde itself")
    return _sample("dpmpp_sde", model, x, sigmas, extra_args, callback, disable, eta=eta, s_noise=s_noise,
                   noise_sampler=noise_sampler)


def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M), as ``k_diffusion.sampling.sample_dpmpp_2m``."""
    return _sample("dpmpp_2m", model, x, sigmas, extra_args, callback, disable)


def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, solver_type='midpoint'):
    """DPM-Solver++(2M) SDE, as ``k_diffusion.sampling.sample_dpmpp_2m_sde``.  Default noise: a
    :class:`BrownianTreeNoiseSampler` over the finite sigmas (torchsde), seeded from torch's generator."""
    _validate.choice("solver_type", solver_type, co.SOLVER_TYPES)  # before the first model call
    return _sample("dpmpp_2m_sde", model, x, sigmas, extra_args, callback, disable, eta=eta, s_noise=s_noise,
                   noise_sampler=noise_sampler, solver_type=solver_type)


def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None):
    """DPM-Solver++(3M) SDE, as ``k_diffusion.sampling.sample_dpmpp_3m_sde``; default noise as
    :func:`sample_dpmpp_2m_sde`."""
    return _sample("dpmpp_3m_sde", model, x, sigmas, extra_args, callback, disable, eta=eta, s_noise=s_noise,
                   noise_sampler=noise_sampler)


#: ``K.sampling.sample_euler`` after ``from zsnr_kernels import k_diffusion as K``, as with k-diffusion itself
sampling = sys.modules[__name__]


#: how to get the k-diffusion modules the drop-in forwards to, with the torch already installed kept as it is: what
#: the extra ``zsnr-kernels[k-diffusion]`` lists (pyproject.toml; a test keeps the two equal), then k-diffusion
#: without its own dependency list (torchvision, and with it a CUDA build of torch)
K_DIFFUSION_INSTALL = "pip install scipy torchsde torchdiffeq tqdm && pip install --no-deps k-diffusion==0.1.1.post1"


def _append_dims(x, target_dims):
    """``k_diffusion.utils.append_dims``: ``x`` with trailing singleton dims up to ``target_dims``."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


def _bare_utils_getattr(name):
    raise AttributeError(
        f"k_diffusion.utils.{name} is not available: k-diffusion's utils module needs its training dependencies "
        "(torchvision ...), which did not import, so only append_dims (what k_diffusion.sampling and "
        "k_diffusion.external use) is provided. Install k-diffusion with all its dependencies for the rest")


def k_diffusion_module(name: str):
    """k-diffusion's own module ``k_diffusion.<name>`` (``sampling``, ``external`` or ``utils``), unchanged.

    A plain ``import k_diffusion`` imports its whole training stack (torchvision, scikit-image, CLIP, wandb ...),
    and PyPI's torchvision pulls its own torch.  The samplers and the model wrappers need none of it: where the
    full package fails to import, ``sampling.py`` and ``external.py`` are executed unmodified inside a bare
    ``k_diffusion`` package whose ``utils`` holds the one helper they use (``append_dims``), and registered under
    their own names (so ``import k_diffusion.external`` then finds them too).  What they need is the extra
    ``zsnr-kernels[k-diffusion]`` plus k-diffusion itself without its dependencies (:data:`K_DIFFUSION_INSTALL`).
    Raises ``ImportError`` naming the missing module and that command."""
    if name not in ("sampling", "external", "utils"):
        raise ValueError(f"name must be 'sampling', 'external' or 'utils', got {name!r}")
    module = _k_diffusion_loaded.get(name)
    if module is not None:
        return module
    with _k_diffusion_lock:  # one loader at a time: a module is in sys.modules before its code has run
        if name not in _k_diffusion_loaded:
            _k_diffusion_loaded[name] = _load_k_diffusion_module(name)
        return _k_diffusion_loaded[name]


_k_diffusion_lock = threading.Lock()
_k_diffusion_loaded: dict = {}  # name -> module, once loaded completely


def _load_k_diffusion_module(name: str):
    full = f"k_diffusion.{name}"
    try:
        return importlib.import_module(full)
    except Exception as exc:  # a missing training dependency, or a torchvision built for another torch
        first = exc
    spec = importlib.util.find_spec("k_diffusion") if "k_diffusion" not in sys.modules else None
    root = (list(spec.submodule_search_locations)[0] if spec is not None and spec.submodule_search_locations
            else None)
    if root is None:
        raise ImportError(f"k-diffusion is not installed ({first}); to use k_diffusion.{name} with the torch you "
                          f"have: {K_DIFFUSION_INSTALL}") from first
    import types

    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = [root]
    pkg.__spec__ = importlib.machinery.ModuleSpec("k_diffusion", None, is_package=True)
    pkg.__spec__.submodule_search_locations = [root]
    pkg.__doc__ = ("k-diffusion's sampling and external modules alone, loaded by zsnr_kernels.k_diffusion because "
                   f"the whole package failed to import ({type(first).__name__}: {first})")
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = _append_dims
    utils.__getattr__ = _bare_utils_getattr
    pkg.utils = utils
    saved = {k: sys.modules.get(k) for k in ("k_diffusion", "k_diffusion.utils", "k_diffusion.sampling",
                                              "k_diffusion.external")}
    sys.modules["k_diffusion"], sys.modules["k_diffusion.utils"] = pkg, utils
    try:
        for part in ("sampling", "external"):
            part_spec = importlib.util.spec_from_file_location(f"k_diffusion.{part}", f"{root}/{part}.py")
            module = importlib.util.module_from_spec(part_spec)
            sys.modules[f"k_diffusion.{part}"] = module
            part_spec.loader.exec_module(module)
            setattr(pkg, part, module)
    except Exception as exc:
        for key, value in saved.items():  # leave no half-loaded package behind
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
        missing = exc.name if isinstance(exc, ImportError) and exc.name else None
        raise ImportError(f"k-diffusion's sampling and external modules failed to import ({exc}"
                          + (f"; k-diffusion's whole package failed with: {first}" if missing is None else "")
                          + f"); {('install ' + repr(missing) + ' with: ') if missing else 'fix with: '}"
                          f"{K_DIFFUSION_INSTALL}") from exc
    return sys.modules[full]


def __getattr__(name):
    """From k-diffusion itself, imported on first use (:func:`k_diffusion_module`): ``external`` and ``utils`` (its
    model wrappers and helpers), and the names of ``k_diffusion.sampling`` this module does not define
    (``sample_dpm_fast``, ``sample_dpm_adaptive``, ``DPMSolver`` ...), unchanged: those run k-diffusion's own code
    (finite schedules, no fused kernels).  So a front end that lists the samplers it finds
    (``hasattr(K.sampling, "sample_dpm_fast")``) keeps them."""
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    source = name if name in ("external", "utils") else "sampling"
    try:
        module = k_diffusion_module(source)
    except ImportError as exc:
        raise AttributeError(f"{name} would come from k_diffusion.{source}: {exc}") from exc
    if source == "sampling":
        if not hasattr(module, name):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r} (nor has k_diffusion.sampling)")
        return getattr(module, name)
    return module


__all__ = [
    "ZERO_SNR_SPACINGS", "BrownianTreeNoiseSampler", "append_zero", "default_noise_sampler", "get_ancestral_step",
    "get_sigmas_exponential", "get_sigmas_karras", "get_sigmas_polyexponential", "get_sigmas_vp",
    "get_sigmas_zero_snr", "sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
    "sample_dpmpp_2s_ancestral", "sample_dpmpp_3m_sde", "sample_dpmpp_sde", "sample_euler", "sample_euler_ancestral", "sample_heun",
    "sample_lms", "sampling", "to_d",
]
