"""The eager PyTorch reference of one fused step: the executable spec every backend is checked against.

docs/design.md §2.3 and §2.7.  One call of :func:`fused_step` does, per element and per sample::

    F     = F_u + w (F_c - F_u)                              guidance (F = F_c when there is no pair)
    f     = phi std(G_c)/std(G) + (1 - phi)                  guidance rescale, per sample (1 if std(G) = 0)
    D     = p_eff y + q_eff F                                p_eff = p + (q u / t)(f - 1), q_eff = q f
    D_u   = p y + q F_u                                      CFG++: raw p, q (D_u = D without a separate F_u)
    y_out = a y + b D + b_u D_u + u_f F_u + sum_k h_k H_k + e z
    carry = g_y y + g_D D + carry_u D_u + g_f F_u            (only when asked: LMS derivatives, CFG++'s D_u)

where G = u y + t F is the quantity the rescale acts on (``output``: u=0, t=1; ``x0``: G = D; ``v``: the
v-prediction of the same D) and G_c the same with F_c.  D_u, the unconditional denoised prediction CFG++ renoises
with, has its own weight ``b_u`` (0 for every other sampler); it equals D where there is no separate unconditional
output: no pair, or a pair at guidance_scale 1 (F = F_c alone).  The rescale acts on D only.  ``u_f``, ``g_f`` are
the same term as the coefficient table holds it, folded on the host (b_u p added to a, u_f = b_u q:
:mod:`zsnr_kernels.backends.table`); they weigh F_u, read only where there is a pair.

Every coefficient is a Python float or a float64 tensor of shape (B,) (per-sample sigmas, §2.9).  Math runs in
float64 for float64 inputs and in float32 otherwise (fp16/bf16 are storage formats), and results are cast back to
y's dtype.

Memory traffic, for the byte models of the fused kernels: reads y, F_c (, F_u) and each H_k (, z when the noise
is an input), writes y_out (, D when it is remembered, carry; CFG++ reads nothing more: D_u is formed from y and
F_u); the rescale statistics read F_c and F_u (and y for the ``x0``/``v`` spaces) once more.
"""

from __future__ import annotations

import torch

Coeff = "float | torch.Tensor"


def _per_sample(c, like: torch.Tensor) -> torch.Tensor | float:
    """A float stays a float; a (B,) tensor becomes (B, 1, ..., 1) in ``like``'s dtype for broadcasting."""
    if isinstance(c, torch.Tensor):
        return c.to(device=like.device, dtype=like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))
    return c


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 for float64 storage, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def guidance(out_cond: torch.Tensor, out_uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Classifier-free guidance F = F_u + w (F_c - F_u), written as diffusers writes it (reads 2N, writes N)."""
    if out_uncond is None:
        return out_cond
    return out_uncond + scale * (out_cond - out_uncond)


def rescale_factor(g_cond: torch.Tensor, g_guided: torch.Tensor, phi: float) -> torch.Tensor:
    """Per-sample f = phi std(G_c)/std(G) + (1 - phi), std over all non-batch dims; f = 1 where std(G) = 0.

    Lin et al. 2023 §3.4 / diffusers ``rescale_noise_cfg`` (which returns NaN where std(G) = 0).  The
    population std is used: the ratio is the same as with Bessel's correction.  Shape (B,).
    """
    dims = tuple(range(1, g_cond.ndim))
    # the std of G less its first element, as the kernels sum it (combine.h RescaleSum: the moments of G itself, up
    # to the per-sample scale 1/t, less the first element's value): the same std, but a constant G gives exactly 0
    # (the float32 mean of a constant is not exactly its value: its std came out ~1e-8, and the factor from two
    # such stds was arbitrary, y off by up to 0.45)
    first = (slice(None),) + (slice(0, 1),) * (g_cond.ndim - 1)
    std_c = (g_cond - g_cond[first]).std(dim=dims, correction=0)
    std_g = (g_guided - g_guided[first]).std(dim=dims, correction=0)
    ok = std_g > 0
    ratio = torch.where(ok, std_c / torch.where(ok, std_g, torch.ones_like(std_g)), torch.ones_like(std_g))
    return torch.where(ok, phi * ratio + (1.0 - phi), torch.ones_like(std_g))


def fold_rescale(p, q, q_u_over_t, f):
    """The denoise coefficients with the guidance-rescale factor f of G = u y + t F folded in: D = p' y + q' F with
    p' = p + (q u / t)(f - 1), q' = q f (combine.h ``fold_rescale``).  ``q_u_over_t`` is q u / t, rounded once in
    the coefficients' own precision by the caller; numbers or tensors."""
    return p + q_u_over_t * (f - 1.0), q * f


def fused_step(
    y: torch.Tensor,
    out_cond: torch.Tensor,
    out_uncond: torch.Tensor | None,
    *,
    p: Coeff,
    q: Coeff,
    a: Coeff,
    b: Coeff,
    history: tuple[torch.Tensor, ...] = (),
    h: tuple = (),
    noise: torch.Tensor | None = None,
    e: Coeff = 0.0,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    rescale_uv: tuple = (0.0, 1.0),
    carry: tuple | None = None,
    b_u: Coeff = 0.0,
    carry_u: Coeff = 0.0,
    u_f: Coeff = 0.0,
    g_f: Coeff = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One fused sampler update.  Returns ``(y_out, D, carry)`` in y's dtype (carry None unless asked).

    ``rescale_uv`` = (u, t) defines G = u y + t F for the guidance rescale (see the module docstring).
    ``noise`` is unit Gaussian of y's shape, required when ``e`` is not 0.  Inputs are never modified.
    ``b_u``, ``carry_u``: the weights of D_u in y_out and in the carry (CFG++; a float 0.0 adds no term); ``u_f``,
    ``g_f``: weights of F_u itself (the table's folded form of the same term; used only with ``out_uncond``).
    """
    ct = compute_dtype(y.dtype)
    yc = y.to(ct)
    fc = out_cond.to(ct)
    fu = out_uncond.to(ct) if out_uncond is not None else None
    F = guidance(fc, fu, guidance_scale)
    pp, qq = _per_sample(p, yc), _per_sample(q, yc)
    with_u = not (isinstance(b_u, float) and b_u == 0.0) or (carry is not None and not (
        isinstance(carry_u, float) and carry_u == 0.0))
    d_u = None
    if with_u and fu is not None and guidance_scale != 1.0:
        d_u = pp * yc + qq * fu  # the raw p, q: before the guidance rescale is folded in
    if guidance_rescale != 0.0 and fu is not None:
        u, t = (_per_sample(c, yc) for c in rescale_uv)
        f = rescale_factor(u * yc + t * fc, u * yc + t * F, guidance_rescale)
        f = f.reshape((-1,) + (1,) * (yc.ndim - 1))
        # q u / t in the coefficients' own precision (Python floats, or float64 table columns), rounded once: the
        # same number whichever way the coefficients came
        pp, qq = fold_rescale(pp, qq, _per_sample(q * rescale_uv[0] / rescale_uv[1], yc), f)
    D = pp * yc + qq * F
    if with_u and d_u is None:
        d_u = D
    out = _per_sample(a, yc) * yc + _per_sample(b, yc) * D
    if not (isinstance(b_u, float) and b_u == 0.0):
        out = out + _per_sample(b_u, yc) * d_u
    if fu is not None and not (isinstance(u_f, float) and u_f == 0.0):
        out = out + _per_sample(u_f, yc) * fu
    for hk, wk in zip(history, h):
        out = out + _per_sample(wk, yc) * hk.to(ct)
    if not (isinstance(e, float) and e == 0.0):
        if noise is None:
            raise ValueError("this step adds noise (e != 0) but no noise tensor was given")
        out = out + _per_sample(e, yc) * noise.to(ct)
    carry_out = None
    if carry is not None:
        cv = _per_sample(carry[0], yc) * yc + _per_sample(carry[1], yc) * D
        if not (isinstance(carry_u, float) and carry_u == 0.0):
            cv = cv + _per_sample(carry_u, yc) * d_u
        if fu is not None and not (isinstance(g_f, float) and g_f == 0.0):
            cv = cv + _per_sample(g_f, yc) * fu
        carry_out = one_nan(cv.to(y.dtype))
    return one_nan(out.to(y.dtype)), one_nan(D.to(y.dtype)), carry_out


def one_nan(t: torch.Tensor) -> torch.Tensor:
    """``t`` with every NaN, whatever its sign and payload, replaced by the one NaN every backend stores: the positive
    quiet NaN with a zero payload, float("nan") in t's dtype (float32 0x7fc00000, bfloat16 0x7fc0, float16 0x7e00;
    csrc/include/zsnr/combine.h ``canonical_nan``).  CPU arithmetic keeps an input NaN's payload and GPU arithmetic
    returns 0x7fffffff: without it a NaN output's bits would depend on the backend."""
    return torch.where(torch.isnan(t), float("nan"), t)


def add_noise(y: torch.Tensor, k: Coeff, e: Coeff, noise: torch.Tensor) -> torch.Tensor:
    """y_hat = k y + e z: EDM churn of a state that no model output accompanies (the first step of a loop).
    Reads 2N, writes N."""
    ct = compute_dtype(y.dtype)
    yc = y.to(ct)
    return one_nan((_per_sample(k, yc) * yc + _per_sample(e, yc) * noise.to(ct)).to(y.dtype))
