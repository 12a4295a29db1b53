"""Triton mirror of ``csrc/include/zsnr/combine.h``: the per-element combine of one fused sampler step.

Installed as ``zsnr_kernels.triton_kernels.combine``.  The math is ``zsnr_kernels/reference.py::fused_step``
(DESIGN §2.3, §2.7) with combine.h's float32 rounding order, so that this kernel and the CPU kernel round
the same way::

    F     = fma(w, F_c - F_u, F_u)                       (F = F_c without an unconditional output)
    D     = fma(p, y, q * F)                             p, q with the guidance rescale factor folded in
    acc   = fma(b, D, a * y)
    acc   = fma(h_k, H_k, acc)        k = 0 .. N_HIST-1
    acc   = fma(e, z, acc)            (with noise)
    y_out = acc
    carry = fma(g_d, D, g_y * y)                         (LMS derivative)

Storage is float32, float16 or bfloat16; the math is float32.  The per-sample coefficients are computed in
float64 on the host (``zsnr_kernels.coefficients``), the guidance rescale factor too, from per-sample sums that
:func:`_rescale_sums_kernel` accumulates in float32 per block and the host reduces in float64
(:func:`rescale_factor` is combine.h's ``rescale_factor``, :func:`fold_rescale` its ``fold_rescale``).

Noise (DESIGN §2.8) is read from a tensor (NOISE_MODE 1) or drawn in the kernel (NOISE_MODE 2): Philox4x32-10
keyed by the sample's 64-bit seed, counter (g_lo, g_hi, step, draw) with g = j // 4, then Triton's
``uint_to_uniform_float`` and ``pair_uniform_to_normal`` (as ``tl.randn4x``); element j takes normal j % 4 of
group g -- the definition of ``zsnr_kernels.noise.normal``.

Byte model of one launch: reads y, F_c (, F_u), each H_k (, z when NOISE_MODE is 1); writes y_out (, D, carry).
The rescale statistics read F_c, F_u (and y for the ``x0``/``v`` spaces) once more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

__all__ = ["fused_step_triton", "rescale_sums", "rescale_factor", "fold_rescale", "MAX_HIST", "NUM_SUMS"]

MAX_HIST = 3  # combine.h kMaxHist
# combine.h RescaleSum order: sums of F_c, F_c^2, F_u, F_u^2, F_c F_u, y, y^2, y F_c, y F_u
SUM_C, SUM_CC, SUM_U, SUM_UU, SUM_CU, SUM_Y, SUM_YY, SUM_YC, SUM_YU = range(9)
NUM_SUMS = 9
# columns of the [batch, NUM_COEFFS] float32 coefficient table the combine kernel reads
C_W, C_P, C_Q, C_A, C_B, C_H0, C_H1, C_H2, C_E, C_GY, C_GD = range(11)
NUM_COEFFS = 11

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_BLOCK = 1024


# ----------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _rescale_sums_kernel(y_ptr, fc_ptr, fu_ptr, out_ptr, n, n_blocks, WITH_Y: tl.constexpr, BLOCK: tl.constexpr):
    """Partial sums of one block of one sample: out[b, blk, :] in combine.h's RescaleSum order (float32).

    Grid (batch, n_blocks).  The y sums (last four) are written as 0 unless WITH_Y.
    """
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    offs = blk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    base = b * n
    fc = tl.load(fc_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    fu = tl.load(fu_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    o = out_ptr + (b * n_blocks + blk) * 9
    tl.store(o + 0, tl.sum(fc, axis=0))
    tl.store(o + 1, tl.sum(fc * fc, axis=0))
    tl.store(o + 2, tl.sum(fu, axis=0))
    tl.store(o + 3, tl.sum(fu * fu, axis=0))
    tl.store(o + 4, tl.sum(fc * fu, axis=0))
    if WITH_Y:
        y = tl.load(y_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(o + 5, tl.sum(y, axis=0))
        tl.store(o + 6, tl.sum(y * y, axis=0))
        tl.store(o + 7, tl.sum(y * fc, axis=0))
        tl.store(o + 8, tl.sum(y * fu, axis=0))
    else:
        zero = tl.sum(fc * 0.0, axis=0)
        tl.store(o + 5, zero)
        tl.store(o + 6, zero)
        tl.store(o + 7, zero)
        tl.store(o + 8, zero)


@triton.jit
def _philox_normals(seed, step, draw, g0, BLOCK: tl.constexpr):
    """The BLOCK unit normals of elements 4*g0 .. 4*g0 + BLOCK - 1 of a sample (DESIGN §2.8).

    One Philox call per group of four elements: counter (g_lo, g_hi, step, draw), key = the 64-bit seed.
    The four normals of a group are interleaved so that element j gets normal j % 4 of group j // 4.
    """
    g = g0 + tl.arange(0, BLOCK // 4).to(tl.int64)
    zero = (g * 0).to(tl.uint32)
    c0 = g.to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    c2 = zero + step.to(tl.uint32)
    c3 = zero + draw.to(tl.uint32)
    x0, x1, x2, x3 = tl.philox(seed, c0, c1, c2, c3)
    n0, n1 = tl.random.pair_uniform_to_normal(tl.random.uint_to_uniform_float(x0),
                                              tl.random.uint_to_uniform_float(x1))
    n2, n3 = tl.random.pair_uniform_to_normal(tl.random.uint_to_uniform_float(x2),
                                              tl.random.uint_to_uniform_float(x3))
    # join(join(n0, n2), join(n1, n3))[i, a, c] = n_{2c + a}; row-major flattening puts it at 4 i + 2 c + a,
    # i.e. the normal n_k lands at position 4 i + k.
    z = tl.join(tl.join(n0, n2), tl.join(n1, n3))
    return tl.reshape(z, (BLOCK,))


@triton.jit
def _to_storage(x, ptr):
    """float32 ``x`` rounded to the element type of ``ptr``, to nearest even (as torch and the CPU kernel round).

    For bfloat16 the rounding is done on the bits (the Triton interpreter's float32 -> bfloat16 cast truncates):
    add 0x7FFF plus the lowest kept bit and clear the low 16 bits; NaN is passed through as it is.
    """
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        r = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)
        return r.to(tl.bfloat16)
    else:
        return x.to(ptr.dtype.element_ty)


@triton.jit
def _combine_kernel(
    y_ptr, fc_ptr, fu_ptr, h0_ptr, h1_ptr, h2_ptr, z_ptr, seed_ptr, coef_ptr,
    y_out_ptr, d_out_ptr, carry_out_ptr,
    n, step, draw,
    N_HIST: tl.constexpr, GUIDED: tl.constexpr, STORE_D: tl.constexpr, STORE_CARRY: tl.constexpr,
    NOISE_MODE: tl.constexpr, BLOCK: tl.constexpr,
):
    """One block of one sample of the fused step; grid (batch, cdiv(n, BLOCK)).  Every tensor is [batch][n].

    ``coef_ptr`` is the [batch, 11] float32 table (w, p, q, a, b, h0, h1, h2, e, g_y, g_d).  Unused pointers
    may be any valid tensor (their loads are compiled out by the constexpr flags).  BLOCK is a multiple of 4.
    """
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    offs = blk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    idx = b * n + offs
    cp = coef_ptr + b * 11
    p = tl.load(cp + 1)
    q = tl.load(cp + 2)
    a = tl.load(cp + 3)
    cb = tl.load(cp + 4)

    y = tl.load(y_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    fc = tl.load(fc_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:
        w = tl.load(cp + 0)
        fu = tl.load(fu_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        f = tl.fma(w, fc - fu, fu)               # guide()
    else:
        f = fc
    d = tl.fma(p, y, q * f)                       # denoise()
    acc = tl.fma(cb, d, a * y)                    # update(): the additions in combine.h's order
    if N_HIST > 0:
        acc = tl.fma(tl.load(cp + 5), tl.load(h0_ptr + idx, mask=mask, other=0.0).to(tl.float32), acc)
    if N_HIST > 1:
        acc = tl.fma(tl.load(cp + 6), tl.load(h1_ptr + idx, mask=mask, other=0.0).to(tl.float32), acc)
    if N_HIST > 2:
        acc = tl.fma(tl.load(cp + 7), tl.load(h2_ptr + idx, mask=mask, other=0.0).to(tl.float32), acc)
    if NOISE_MODE == 1:
        z = tl.load(z_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        acc = tl.fma(tl.load(cp + 8), z, acc)
    if NOISE_MODE == 2:
        seed = tl.load(seed_ptr + b)  # int64 holding the uint64 seed
        z = _philox_normals(seed, step, draw, blk * (BLOCK // 4), BLOCK)
        acc = tl.fma(tl.load(cp + 8), z, acc)
    tl.store(y_out_ptr + idx, _to_storage(acc, y_out_ptr), mask=mask)
    if STORE_D:
        tl.store(d_out_ptr + idx, _to_storage(d, d_out_ptr), mask=mask)
    if STORE_CARRY:
        c = tl.fma(tl.load(cp + 10), d, tl.load(cp + 9) * y)   # carry()
        tl.store(carry_out_ptr + idx, _to_storage(c, carry_out_ptr), mask=mask)


# ------------------------------------------------------------------------------------------------ host side


def rescale_factor(s: Sequence[float], n: float, u: float, t: float, w: float, phi: float) -> float:
    """combine.h ``rescale_factor`` in float64: f = phi std(G_c)/std(G) + (1 - phi), 1 where std(G) = 0.

    ``s`` holds the nine sums of one sample (RescaleSum order); G_c = u y + t F_c,
    G = u y + t ((1 - w) F_u + w F_c).
    """
    al, be = t * w, t * (1.0 - w)
    mean_c = (u * s[SUM_Y] + t * s[SUM_C]) / n
    sq_c = (u * u * s[SUM_YY] + 2.0 * u * t * s[SUM_YC] + t * t * s[SUM_CC]) / n
    mean_g = (u * s[SUM_Y] + al * s[SUM_C] + be * s[SUM_U]) / n
    sq_g = (u * u * s[SUM_YY] + al * al * s[SUM_CC] + be * be * s[SUM_UU]
            + 2.0 * (u * al * s[SUM_YC] + u * be * s[SUM_YU] + al * be * s[SUM_CU])) / n
    var_c = max(sq_c - mean_c * mean_c, 0.0)
    var_g = sq_g - mean_g * mean_g
    if not var_g > 0.0:
        return 1.0
    return phi * math.sqrt(var_c / var_g) + (1.0 - phi)


def fold_rescale(f: float, u: float, t: float, p: float, q: float) -> tuple[float, float]:
    """combine.h ``fold_rescale``: D = p y + (q/t)(f G - u y) = (p + (q u / t)(f - 1)) y + q f F."""
    return p + (q * u / t) * (f - 1.0), q * f


def rescale_sums(y: torch.Tensor, f_cond: torch.Tensor, f_uncond: torch.Tensor, with_y: bool,
                 block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """Per-sample sums (RescaleSum order) as a [batch, 9] float64 tensor: float32 within a block of ``block``
    elements, float64 across blocks.  The tensors must be contiguous and of one shape."""
    batch = y.shape[0]
    n = y.numel() // batch
    n_blocks = triton.cdiv(n, block)
    part = torch.empty((batch, n_blocks, NUM_SUMS), dtype=torch.float32, device=y.device)
    _rescale_sums_kernel[(batch, n_blocks)](y, f_cond, f_uncond, part, n, n_blocks, WITH_Y=bool(with_y),
                                            BLOCK=block)
    return part.to(torch.float64).sum(dim=1)


def _per_sample(values, batch: int, name: str) -> list:
    """One value for the batch or a sequence of ``batch`` values -> a list of ``batch`` values."""
    if isinstance(values, (list, tuple)) and len(values) > 0 and not isinstance(values[0], (int, float)):
        if len(values) == 1:
            return list(values) * batch
        if len(values) != batch:
            raise ValueError(f"{name} must hold one entry or one per sample ({batch}), got {len(values)}")
        return list(values)
    return [values] * batch


def _seed_tensor(seeds, batch: int, device) -> torch.Tensor:
    """The per-sample seeds as an int64 tensor holding the uint64 bits."""
    if isinstance(seeds, torch.Tensor):
        s = seeds.to(device=device, dtype=torch.int64).reshape(-1)
        if s.numel() == 1 and batch > 1:
            s = s + torch.arange(batch, dtype=torch.int64, device=device)
        return s.contiguous()
    if isinstance(seeds, int):
        seeds = [(seeds + i) % 2**64 for i in range(batch)]
    vals = [int(v) % 2**64 for v in seeds]
    if len(vals) != batch:
        raise ValueError(f"seeds must hold one seed per sample ({batch}), got {len(vals)}")
    return torch.tensor([v - 2**64 if v >= 2**63 else v for v in vals], dtype=torch.int64, device=device)


def fused_step_triton(y, f_cond, f_uncond, history, coeffs, *, denoise, guidance_scale=1.0, guidance_rescale=0.0,
                      rescale_uv=(0.0, 1.0), noise=None, seeds=None, step_index=0, draw=0, want_denoised=True,
                      want_carry=False, out=None, block=DEFAULT_BLOCK):
    """One fused step with the Triton kernels.  Returns ``(y_out, D or None, carry or None)`` in y's dtype.

    ``coeffs``: a :class:`zsnr_kernels.coefficients.StepCoeffs` (or a list: one, or one per sample).
    ``denoise``: (p, q) of D = p y + q F (a pair, or a list of pairs per sample), as
    ``Parameterization.denoise_coeffs`` gives them.  ``rescale_uv``: (u, t) of G = u y + t F (a pair or one per
    sample); used only with an unconditional output and ``guidance_rescale`` != 0.  Noise is added when some
    sample has e != 0: from ``noise`` (a tensor shaped like y) if given, else Philox from ``seeds`` (one int per
    sample, a single int s meaning s + i for sample i, or an int64 tensor of the uint64 bits) with
    ``step_index`` and ``draw``.  ``carry`` is computed when ``want_carry`` and the coefficients have one.
    Tensors are read as contiguous ([batch][n]); ``out`` (if given) receives y_out.
    """
    if y.dtype not in DTYPES:
        raise TypeError(f"y must be float32, float16 or bfloat16 for the Triton kernels, got {y.dtype}")
    if block % 4 or block <= 0:
        raise ValueError(f"block must be a positive multiple of 4, got {block}")
    batch = y.shape[0]
    n = y.numel() // batch
    cs = _per_sample(coeffs, batch, "coeffs")
    pq = _per_sample(denoise, batch, "denoise")
    uv = _per_sample(rescale_uv, batch, "rescale_uv")
    y_c = y.contiguous()
    fc = f_cond.contiguous()
    guided = f_uncond is not None
    fu = f_uncond.contiguous() if guided else fc

    n_hist = max(len(c.h) for c in cs)
    if n_hist > MAX_HIST:
        raise ValueError(f"at most {MAX_HIST} history tensors, the coefficients ask for {n_hist}")
    if n_hist > len(history):
        raise ValueError(f"this step needs {n_hist} history tensor(s), got {len(history)}")
    hist = [h.contiguous() for h in history[:n_hist]] + [y_c] * (MAX_HIST - n_hist)

    # guidance rescale: per-sample factor from the sums, folded into (p, q) in float64
    p_eff, q_eff = [float(v[0]) for v in pq], [float(v[1]) for v in pq]
    w = float(guidance_scale)
    phi = float(guidance_rescale)
    if guided and phi != 0.0:
        with_y = any(float(u) != 0.0 for u, _ in uv)
        sums = rescale_sums(y_c, fc, fu, with_y, block).tolist()
        for i in range(batch):
            u, t = float(uv[i][0]), float(uv[i][1])
            f = rescale_factor(sums[i], float(n), u, t, w, phi)
            p_eff[i], q_eff[i] = fold_rescale(f, u, t, p_eff[i], q_eff[i])

    noisy = any(c.e != 0.0 for c in cs)
    noise_mode, z_t, seed_t = 0, y_c, torch.zeros(1, dtype=torch.int64, device=y.device)
    if noisy:
        if noise is not None:
            noise_mode, z_t = 1, noise.contiguous()
        elif seeds is not None:
            noise_mode, seed_t = 2, _seed_tensor(seeds, batch, y.device)
        else:
            raise ValueError("this step adds noise: pass noise= or seeds= with step_index=")
    store_carry = bool(want_carry) and cs[0].carry is not None

    table = torch.zeros((batch, NUM_COEFFS), dtype=torch.float64)
    for i, c in enumerate(cs):
        row = table[i]
        row[C_W], row[C_P], row[C_Q], row[C_A], row[C_B] = w, p_eff[i], q_eff[i], c.a, c.b
        for k, hk in enumerate(c.h):
            row[C_H0 + k] = hk
        row[C_E] = c.e
        if c.carry is not None:
            row[C_GY], row[C_GD] = c.carry
    table = table.to(device=y.device, dtype=torch.float32)

    y_out = torch.empty_like(y_c)
    d_out = torch.empty_like(y_c) if want_denoised else None
    carry_out = torch.empty_like(y_c) if store_carry else None
    grid = (batch, triton.cdiv(n, block))
    _combine_kernel[grid](
        y_c, fc, fu, hist[0], hist[1], hist[2], z_t, seed_t, table,
        y_out, y_out if d_out is None else d_out, y_out if carry_out is None else carry_out,
        n, int(step_index) % 2**32, int(draw) % 2**32,
        N_HIST=n_hist, GUIDED=guided, STORE_D=d_out is not None, STORE_CARRY=store_carry,
        NOISE_MODE=noise_mode, BLOCK=block,
        enable_fp_fusion=False)  # the tl.fma calls are the only contractions: CPU and GPU round alike
    y_out = y_out.view(y.shape)
    if out is not None:
        out.copy_(y_out)
        y_out = out
    return (y_out, None if d_out is None else d_out.view(y.shape),
            None if carry_out is None else carry_out.view(y.shape))
