"""Triton mirror of ``csrc/include/zsnr/combine.h``: the per-element combine of one fused sampler step.

The math is ``zsnr_kernels/reference.py::fused_step``
(docs/design.md §2.3, §2.7) with combine.h's float32 rounding order, so that this kernel and the CPU kernel round
the same way::

    F     = fma(w, F_c - F_u, F_u)                       (F = F_c without an unconditional output)
    D     = fma(p, y, q * F)                             p, q with the guidance rescale factor folded in
    acc   = fma(b, D, a * y)
    acc   = fma(u, F_u, acc)          (with an unconditional output: CFG++'s D_u term)
    acc   = fma(h_k, H_k, acc)        k = 0 .. N_HIST-1
    acc   = fma(e, z, acc)            (with noise)
    y_out = acc
    carry = fma(g_d, D, g_y * y)                         (LMS derivative; CFG++'s D_u:)
    carry = fma(g_u, F_u, carry)      (with an unconditional output)

u and g_u are the table's columns BFU and GFU: CFG++'s weights of the unconditional D_u = p y + q F_u, folded on the
host (``zsnr_kernels.backends.table``: b_u p into a, u = b_u q; 0 for every other sampler).

Storage is float32, float16 or bfloat16; the math is float32.  The per-sample coefficients are computed in
float64 on the host (``zsnr_kernels.coefficients``) into a float64 table (``zsnr_kernels.backends.table``) that the
kernels read on the device.  With guidance rescale, :func:`_rescale_kernel` sums per fixed chunk
(:func:`stats_block`) in float32, and the last program of each sample adds the partials in float64 and folds
combine.h's ``rescale_factor`` into (p, q) on the device: a step never waits for the device, and its launches (two
with guidance rescale, one without) can be captured in a CUDA graph.

Both grids are one-dimensional, one program per (sample, block), sample-major: CUDA allows 2**31 - 1 programs on
grid axis 0 but only 65535 on axes 1 and 2, where a grid (blocks, batch) put the samples (a 2-D toy problem of 100k
points could not launch).  A program finds its sample and block with one 32-bit division.

Noise (docs/design.md §2.8) is read from a tensor (NOISE_MODE 1) or drawn in the kernel (NOISE_MODE 2): Philox4x32-10
keyed by the sample's 64-bit seed, counter (g_lo, g_hi, step, draw) with g = j // 4, then Triton's
``uint_to_uniform_float`` and ``pair_uniform_to_normal`` (as ``tl.randn4x``); element j takes normal j % 4 of
group g -- the definition of ``zsnr_kernels.noise.normal``.  A slice of a sample (SLICED: a latent sharded across
processes) draws each local group at its group of the sample, ``csrc/include/zsnr/philox.h``'s ``slice_group``
(``zsnr_kernels.noise.NoiseSlice``, whose local, total and offset are multiples of 4 here).

Byte model of one launch: reads y, F_c (, F_u), each H_k (, z when NOISE_MODE is 1); writes y_out (, D, carry).
The rescale statistics read F_c, F_u (and y for the ``x0``/``v`` spaces) once more.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ... import noise as _noise
from .. import table as _table
from ..call import MAX_HISTORY as MAX_HIST, kernel_slice
from ..device import stream_workspace
from ..layout import to_device

__all__ = ["MAX_HIST", "NUM_COEFFS", "Workspace", "launch", "launch_block", "seed_tensor", "stats_block",
           "stats_blocks"]

# combine.h RescaleSum order: sums of G_c/s, (G_c/s)^2, G/s, (G/s)^2 (G = u y + t F, G_c = u y + t F_c, s = u or t,
# whichever is larger in magnitude), formed from each tensor less its sample's first element (constexpr: the
# kernels read them too)
SUM_C, SUM_CC, SUM_G, SUM_GG = (tl.constexpr(k) for k in range(4))
NUM_SUMS = tl.constexpr(4)
# Columns of the float64 coefficient table (zsnr_kernels/backends/table.py), one row per sample or one for the batch.
C_W, C_P, C_Q, C_A, C_B, C_H0, C_H1, C_H2, C_E, C_GY, C_GD, C_U, C_T, C_PHI, C_BFU, C_GFU = (
    tl.constexpr(k) for k in (_table.W, _table.P, _table.Q, _table.A, _table.B, _table.H0, _table.H1, _table.H2,
                              _table.E, _table.GY, _table.GD, _table.U, _table.T, _table.PHI, _table.BFU, _table.GFU))
NUM_COEFFS = _table.NUM_COEFFS

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NAN_F32, NAN_BF16, NAN_F16 = 0x7FC00000, 0x7FC0, 0x7E00  # combine.h kNaN32, kNaNBFloat16, kNaNFloat16
_NAN_F32, _NAN_BF16, _NAN_F16 = tl.constexpr(NAN_F32), tl.constexpr(NAN_BF16), tl.constexpr(NAN_F16)  # for kernels
MIN_BLOCK, MAX_BLOCK = 256, 2048
MAX_PROGRAMS = 2**31 - 1  # CUDA's limit of grid axis 0, the only axis the launches use
FOLD_ROWS = 64            # partials the last program of a sample reads at once (the rescale kernel's RBLOCK)


def _largest_block(element_size: int) -> int:
    """32 bytes per thread and tensor: 1024 float32 or 2048 16-bit elements (four warps, two 128-bit accesses)."""
    return MAX_BLOCK if element_size <= 2 else MAX_BLOCK // 2


def stats_block(element_size: int) -> int:
    """The elements per program of the rescale statistics pass: a fixed chunk per storage size, never the launch's
    block, so that the float32 chunk sums, and with them the rescale factor's last bits, do not depend on the batch
    size or the GPU's SM count (docs/design.md §2.7, §2.8: a batch of 8 equals 8 batches of 1).  The largest launch
    block, which launch_block picks for every latent large enough to fill the GPU (the video latent): those keep
    the chunks they had."""
    return _largest_block(element_size)


def stats_blocks(n: int, element_size: int) -> int:
    """The statistics chunks of a sample of ``n`` elements (a :class:`Workspace`'s ``n_blocks``)."""
    return triton.cdiv(n, stats_block(element_size))


def launch_block(n: int, batch: int, element_size: int, device) -> int:
    """The elements per program of a launch over ``batch`` samples of ``n`` elements (a documented heuristic, not
    autotuning: autotuning reruns a kernel, which an in-place step cannot allow).

    Both kernels are bandwidth-bound and run 4 warps (128 threads).  A block of 32 bytes per thread and tensor --
    1024 float32 or 2048 16-bit elements, two 128-bit accesses per thread -- keeps enough loads in flight per
    thread; it is halved (down to MIN_BLOCK) while the grid would give fewer than four programs per SM, so small
    latents still occupy the whole device.  On the CPU (Triton's interpreter) the SM count is taken as 1.
    """
    block = _largest_block(element_size)
    sms = _sm_count(device)
    while block > MIN_BLOCK and batch * triton.cdiv(n, block) < 4 * sms:
        block //= 2
    return block


_SM_COUNT: dict = {}


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 1
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


# ----------------------------------------------------------------------------------------------------- kernels


# Runtime integers but n are not specialised: Triton turns an argument equal to 1 into a compile-time Python int
# (no `.to()`: step 1 of a noisy run would fail to compile) and compiles a variant per such value.  n is specialised:
# its divisible-by-16 hint is what lets a sample's loads be 128 bits wide.  Unspecialised, every latent came in 16-
# or 32-bit scalar loads, and in bf16 on sm_90 the DPM++ 3M SDE step (guided, two remembered D, D kept, Philox) took
# 237 registers, with three remembered D and guidance rescale 255 and 40 bytes spilled; with the hint 117 and 127, no
# spills (tests/backends/test_triton_aot.py).  At n = 1 it is the Python int 1, which the kernels take as it is
# (tl.cast, never n.to).  Three variants at most: n = 1, a multiple of 16, any other.
@triton.jit(do_not_specialize=["coef_stride", "n_blocks"])
def _rescale_kernel(y_ptr, fc_ptr, fu_ptr, part_ptr, count_ptr, coef_ptr, coef_stride, pq_ptr, n, n_blocks,
                    WITH_Y: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr):
    """Guidance-rescale statistics and fold, on the device (no host synchronisation); grid (batch * n_blocks,),
    program ``b * n_blocks + blk`` summing block ``blk`` of sample b.  BLOCK is :func:`stats_block`, fixed.

    Each program writes the float32 sums of its block (RescaleSum order, NUM_SUMS of a row of 16) to
    ``part_ptr[b, blk]``, then takes a ticket from ``count_ptr[b]``; the program that completes sample b adds the
    partials in float64 in block order (deterministic: the result does not depend on which program came last),
    computes combine.h's ``rescale_factor`` with phi from the sample's float64 table row
    ``coef_ptr + b * coef_stride``, folds it into (p, q) with the row's (u, t) and writes them to ``pq_ptr[b]`` as
    float32, and resets the counter for the next step.  The row's w and the weights a, b of G/s = b F + a y (combine.h
    ``rescale_weights``, from the row's u, t; read only WITH_Y), rounded to float32, form the element terms
    (combine.h ``rescale_terms``).
    """
    pid = tl.program_id(0)
    b = (pid // n_blocks).to(tl.int64)
    blk = (pid % n_blocks).to(tl.int64)
    offs = blk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    base = b * n
    cp = coef_ptr + b * coef_stride
    # combine.h rescale_terms, less the sample's first element's (the pivots c0, u0, d0 = c0 - u0, y0):
    # G_c/s = b (F_c - c0) + a (y - y0), G/s = b ((F_u - u0) + w ((F_c - F_u) - d0)) + a (y - y0); masked lanes add
    # nothing
    fc = tl.load(fc_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    fu = tl.load(fu_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    c0 = tl.load(fc_ptr + base).to(tl.float32)
    u0 = tl.load(fu_ptr + base).to(tl.float32)
    gc = fc - c0
    g = (fu - u0) + tl.load(cp + C_W).to(tl.float32) * ((fc - fu) - (c0 - u0))
    if WITH_Y:
        y = tl.load(y_ptr + base + offs, mask=mask, other=0.0).to(tl.float32) - tl.load(y_ptr + base).to(tl.float32)
        # combine.h rescale_weights: s = u where |u| > |t| (a = 1, b = t/u), else t (a = u/t, b = 1; a = 0 if t = 0)
        u_s = tl.load(cp + C_U)
        t_s = tl.load(cp + C_T)
        big_u = tl.abs(u_s) > tl.abs(t_s)
        wa = tl.where(big_u, 1.0, tl.where(t_s != 0.0, u_s / tl.where(t_s != 0.0, t_s, 1.0), 0.0)).to(tl.float32)
        wb = tl.where(big_u, t_s / tl.where(big_u, u_s, 1.0), 1.0).to(tl.float32)
        e = wa * y
        gc = wb * gc + e
        g = wb * g + e
    gc = tl.where(mask, gc, 0.0)
    g = tl.where(mask, g, 0.0)
    # The block's sums in float32 (tl.sum), unlike the cpu, which adds its 16 lanes in float64: a sample of a few
    # elements whose pivot lies far from their mean is up to ~3x the float32 torch reference's error here (16
    # elements; 0.8-1.4x from 4096).  Lanes in float64 (a [BLOCK // 16, 16] reshape summed over axis 0, then in
    # float64) matched the cpu but took twice the instructions per element of the bf16 pass (PTX, sm_90: 55
    # against 28 per element and thread; an H100 issues ~35 per element at full bandwidth).
    cols = tl.arange(0, 16)
    row = tl.where(cols == SUM_C, tl.sum(gc, axis=0), 0.0)
    row += tl.where(cols == SUM_CC, tl.sum(gc * gc, axis=0), 0.0)
    row += tl.where(cols == SUM_G, tl.sum(g, axis=0), 0.0)
    row += tl.where(cols == SUM_GG, tl.sum(g * g, axis=0), 0.0)
    tl.store(part_ptr + (b * n_blocks + blk) * 16 + cols, row)
    tl.debug_barrier()  # every thread's partial is written before the (release) ticket is taken
    ticket = tl.atomic_add(count_ptr + b, 1, sem="acq_rel")
    if ticket == n_blocks - 1:
        acc = tl.zeros([16], dtype=tl.float64)
        rows = tl.arange(0, RBLOCK)
        for r0 in range(0, n_blocks, RBLOCK):
            r = r0 + rows
            m = (r[:, None] < n_blocks) & (cols[None, :] < NUM_SUMS)
            part = tl.load(part_ptr + (b * n_blocks + r[:, None]) * 16 + cols[None, :], mask=m, other=0.0,
                           cache_modifier=".cg")
            acc += tl.sum(part.to(tl.float64), axis=0)
        p = tl.load(cp + C_P)
        q = tl.load(cp + C_Q)
        u = tl.load(cp + C_U)
        t = tl.load(cp + C_T)
        phi = tl.load(cp + C_PHI)
        nf = tl.cast(n, tl.float64)
        s_c = tl.sum(tl.where(cols == SUM_C, acc, 0.0), axis=0)
        s_cc = tl.sum(tl.where(cols == SUM_CC, acc, 0.0), axis=0)
        s_g = tl.sum(tl.where(cols == SUM_G, acc, 0.0), axis=0)
        s_gg = tl.sum(tl.where(cols == SUM_GG, acc, 0.0), axis=0)
        # combine.h rescale_factor
        mean_c = s_c / nf
        mean_g = s_g / nf
        var_c = tl.maximum(s_cc / nf - mean_c * mean_c, 0.0)
        var_g = s_gg / nf - mean_g * mean_g
        safe = tl.where(var_g > 0.0, var_g, 1.0)
        f = tl.where(var_g > 0.0, phi * tl.sqrt(var_c / safe) + (1.0 - phi), 1.0)
        # combine.h fold_rescale
        tl.store(pq_ptr + 2 * b, (p + (q * u / t) * (f - 1.0)).to(tl.float32))
        tl.store(pq_ptr + 2 * b + 1, (q * f).to(tl.float32))
        tl.store(count_ptr + b, 0)


@triton.jit
def _philox_normals(seed, step, draw, g0, l4, g4, o4, SLICED: tl.constexpr, BLOCK: tl.constexpr):
    """The BLOCK unit normals of elements 4*g0 .. 4*g0 + BLOCK - 1 of a sample (docs/design.md §2.8); with SLICED,
    of those local elements of a slice of the sample whose L/4, G/4, O/4 (groups) are l4, g4, o4: local group g
    is the sample's group (g // l4) * g4 + o4 + g % l4 (csrc/include/zsnr/philox.h ``slice_group``).

    One Philox call per group of four elements: counter (g_lo, g_hi, step, draw), key = the 64-bit seed.
    The four normals of a group are interleaved so that element j gets normal j % 4 of group j // 4.
    """
    g = g0 + tl.arange(0, BLOCK // 4).to(tl.int64)
    if SLICED:
        g = (g // l4) * g4 + o4 + g % l4
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
    """float32 ``x`` rounded to the element type of ``ptr``, to nearest even (as torch and the CPU kernel round),
    a NaN stored as combine.h's one NaN of that type (``canonical_nan``: 0x7fc00000, bfloat16 0x7fc0, float16
    0x7e00), selected as bits: GPU conversions and arithmetic give 0x7fff / 0x7fffffff, numpy keeps payloads.

    For bfloat16 the rounding is done on the bits (the Triton interpreter's float32 -> bfloat16 cast truncates):
    add 0x7FFF plus the lowest kept bit and clear the low 16 bits.
    """
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        r = bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
        nan = tl.full([1], _NAN_BF16, tl.int16).to(tl.bfloat16, bitcast=True)
    elif ptr.dtype.element_ty == tl.float16:
        r = x.to(tl.float16)
        nan = tl.full([1], _NAN_F16, tl.int16).to(tl.float16, bitcast=True)
    else:
        r = x
        nan = tl.full([1], _NAN_F32, tl.int32).to(tl.float32, bitcast=True)
    return tl.where(x == x, r, nan)  # noqa: PLR0124 (x == x: not NaN)


@triton.jit
def _coef(cp, col):
    """Column ``col`` of a float64 table row, rounded to float32 (the element pass's precision)."""
    return tl.load(cp + col).to(tl.float32)


@triton.jit(do_not_specialize=["coef_stride", "step", "draw", "slice_l4", "slice_g4", "slice_o4"])  # n: _rescale_kernel
def _combine_kernel(
    y_ptr, fc_ptr, fu_ptr, h0_ptr, h1_ptr, h2_ptr, z_ptr, seed_ptr, coef_ptr, coef_stride, pq_ptr,
    y_out_ptr, d_out_ptr, carry_out_ptr,
    n, step, draw, slice_l4, slice_g4, slice_o4,
    N_HIST: tl.constexpr, GUIDED: tl.constexpr, RESCALED: tl.constexpr, STORE_D: tl.constexpr,
    STORE_CARRY: tl.constexpr, NOISE_MODE: tl.constexpr, SLICED: tl.constexpr, BLOCK: tl.constexpr,
):
    """One block of one sample of the fused step; grid (batch * cdiv(n, BLOCK),), program ``b * cdiv(n, BLOCK) + blk``
    running block ``blk`` of sample b.  Every tensor is [batch][n].

    Sample b's coefficients are the float64 table row ``coef_ptr + b * coef_stride`` (stride 0: one row for the
    batch); with RESCALED, (p, q) come from ``pq_ptr[b]`` instead, where :func:`_rescale_kernel` folded the
    guidance rescale factor in.  Unused pointers may be any valid tensor (their loads are compiled out by the
    constexpr flags).  BLOCK is a multiple of 4.  SLICED (NOISE_MODE 2): each sample is a slice of the sample its
    noise is drawn for, whose L/4, G/4 and O/4 are slice_l4, slice_g4, slice_o4 (:func:`_philox_normals`).
    """
    pid = tl.program_id(0)
    n_blocks = (n - 1) // BLOCK + 1  # cdiv(n, BLOCK) without overflowing an int32 n (n >= 1)
    b = (pid // n_blocks).to(tl.int64)
    blk = (pid % n_blocks).to(tl.int64)
    offs = blk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    idx = b * n + offs
    cp = coef_ptr + b * coef_stride
    if RESCALED:
        p = tl.load(pq_ptr + 2 * b)
        q = tl.load(pq_ptr + 2 * b + 1)
    else:
        p = _coef(cp, C_P)
        q = _coef(cp, C_Q)
    a = _coef(cp, C_A)
    cb = _coef(cp, C_B)

    y = tl.load(y_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    fc = tl.load(fc_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:
        fu = tl.load(fu_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        f = tl.fma(_coef(cp, C_W), fc - fu, fu)   # guide()
    else:
        f = fc
    d = tl.fma(p, y, q * f)                       # denoise()
    acc = tl.fma(cb, d, a * y)                    # update(): the additions in combine.h's order
    if GUIDED:
        acc = tl.fma(_coef(cp, C_BFU), fu, acc)   # CFG++'s D_u term (0 for other samplers)
    if N_HIST > 0:
        acc = tl.fma(_coef(cp, C_H0), tl.load(h0_ptr + idx, mask=mask, other=0.0).to(tl.float32), acc)
    if N_HIST > 1:
        acc = tl.fma(_coef(cp, C_H1), tl.load(h1_ptr + idx, mask=mask, other=0.0).to(tl.float32), acc)
    if N_HIST > 2:
        acc = tl.fma(_coef(cp, C_H2), tl.load(h2_ptr + idx, mask=mask, other=0.0).to(tl.float32), acc)
    if NOISE_MODE == 1:
        z = tl.load(z_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        acc = tl.fma(_coef(cp, C_E), z, acc)
    if NOISE_MODE == 2:
        seed = tl.load(seed_ptr + b)  # int64 holding the uint64 seed
        z = _philox_normals(seed, step, draw, blk * (BLOCK // 4), slice_l4, slice_g4, slice_o4, SLICED, BLOCK)
        acc = tl.fma(_coef(cp, C_E), z, acc)
    tl.store(y_out_ptr + idx, _to_storage(acc, y_out_ptr), mask=mask)
    if STORE_D:
        tl.store(d_out_ptr + idx, _to_storage(d, d_out_ptr), mask=mask)
    if STORE_CARRY:
        c = tl.fma(_coef(cp, C_GD), d, _coef(cp, C_GY) * y)   # carry()
        if GUIDED:
            c = tl.fma(_coef(cp, C_GFU), fu, c)
        tl.store(carry_out_ptr + idx, _to_storage(c, carry_out_ptr), mask=mask)


# ------------------------------------------------------------------------------------------------ host side


class Workspace:
    """Scratch of the rescale pass for one (device, batch, n_blocks = :func:`stats_blocks`): float32 partial sums
    and the per-sample ticket counters, zeroed once here and reset by the last block after each use.  One per stream,
    or per launch inside a graph capture (:func:`zsnr_kernels.backends.device.stream_workspace`), or a
    ``SamplingPlan``'s own.  The folded (p, q) are not kept here but allocated per step, so two threads interleaving
    their launches on one stream cannot read each other's."""

    def __init__(self, device, batch: int, n_blocks: int):
        self.batch, self.n_blocks = batch, n_blocks
        self.partials = torch.empty((batch, n_blocks, 16), dtype=torch.float32, device=device)
        self.counters = torch.zeros(batch, dtype=torch.int32, device=device)


def launch(y, f_cond, f_uncond, history, table, *, n_hist, rescale, with_y=False, noise_mode=0, noise=None,
           seeds=None, step_index=0, draw=0, noise_slice=None, y_out, d_out=None, carry_out=None, block=None,
           workspace=None):
    """Launch the step's kernels on contiguous [batch][n] tensors: the rescale pass when ``rescale``, then the
    element pass, on y's device and its current stream.  Philox noise (``noise_mode`` 2) is draw ``draw`` of step
    ``step_index``, each element at its place in ``noise_slice`` (a :class:`zsnr_kernels.noise.NoiseSlice` with
    whole groups, :func:`zsnr_kernels.backends.call.kernel_slice`; None: the whole sample).  ``table`` is a float64
    [1 or batch, NUM_COEFFS] tensor on y's device (a view into a larger precomputed table is fine); ``seeds`` an
    int64 tensor of the uint64 seed bits on y's device.  Nothing here reads a device value on the host, so the launches can be captured in a CUDA
    graph.  ``block``: elements per program of the element pass (a power of two >= 16), default
    :func:`launch_block`'s choice (the statistics pass sums per :func:`stats_block`, whatever ``block`` is);
    ``workspace``: the rescale pass's :class:`Workspace` (default: :func:`stream_workspace`'s)."""
    batch = y.shape[0]
    n = y.numel() // batch
    if block is None:
        block = launch_block(n, batch, y.element_size(), y.device)
    sblock = stats_block(y.element_size())
    n_blocks, n_stats = triton.cdiv(n, block), triton.cdiv(n, sblock)
    if batch * max(n_blocks, n_stats) > MAX_PROGRAMS:
        raise ValueError(f"y of {batch} x {n} elements needs {batch * max(n_blocks, n_stats)} programs, more than a "
                         f"grid holds ({MAX_PROGRAMS})")
    sliced = noise_mode == 2 and kernel_slice(noise_slice, n) is not None and not noise_slice.whole
    l4, g4, o4 = (noise_slice.local // 4, noise_slice.total // 4, noise_slice.offset // 4) if sliced else (1, 1, 0)
    stride = 0 if table.shape[0] == 1 else table.stride(0)
    fu = f_uncond if f_uncond is not None else f_cond
    hist = list(history[:n_hist]) + [y] * (MAX_HIST - n_hist)
    # Triton launches on the current device: make it y's (a tensor on cuda:1 while cuda:0 is current would be
    # read from the wrong GPU, and the temporaries freed to the wrong stream)
    with torch.cuda.device(y.device) if y.is_cuda else contextlib.nullcontext():
        pq = table  # any valid pointer when not rescaled
        if rescale:
            ws = workspace if workspace is not None else stream_workspace(
                y.device, ("triton", batch, n_stats), lambda: Workspace(y.device, batch, n_stats))
            if (ws.batch, ws.n_blocks) != (batch, n_stats):
                raise ValueError(f"workspace is for {ws.batch} x {ws.n_blocks} blocks, the launch needs "
                                 f"{batch} x {n_stats}")
            pq = torch.empty((batch, 2), dtype=torch.float32, device=y.device)
            _rescale_kernel[(batch * n_stats,)](y, f_cond, fu, ws.partials, ws.counters, table, stride, pq, n,
                                                n_stats, WITH_Y=bool(with_y), BLOCK=sblock, RBLOCK=FOLD_ROWS,
                                                enable_fp_fusion=False)  # as the CPU: nothing contracted (and
            # explicit: Triton 3.9's default, fusion on, becomes off in 3.10, which would change the bits silently)
        _combine_kernel[(batch * n_blocks,)](
            y, f_cond, fu, hist[0], hist[1], hist[2], noise if noise is not None else y,
            seeds if seeds is not None else table, table, stride, pq,
            y_out, y_out if d_out is None else d_out, y_out if carry_out is None else carry_out,
            n, int(step_index) % 2**32, int(draw) % 2**32, l4, g4, o4,
            N_HIST=n_hist, GUIDED=f_uncond is not None, RESCALED=bool(rescale), STORE_D=d_out is not None,
            STORE_CARRY=carry_out is not None, NOISE_MODE=noise_mode, SLICED=sliced, BLOCK=block,
            enable_fp_fusion=False)  # the tl.fma calls are the only contractions: CPU and GPU round alike


def seed_tensor(seeds, batch: int, device) -> torch.Tensor:
    """The per-sample seeds (an int s meaning s + i for sample i, one int per sample, or an int64 tensor of the
    uint64 bits, which stays on its device) as an int64 tensor on ``device``."""
    if isinstance(seeds, torch.Tensor):
        s = seeds.to(device=device, dtype=torch.int64).reshape(-1)
        if s.numel() == 1 and batch > 1:
            s = s + torch.arange(batch, dtype=torch.int64, device=device)
        return s.contiguous()
    bits = _noise.seed_bits(_noise.normalize_seeds(seeds, batch))
    return to_device(torch.tensor(bits, dtype=torch.int64), device)
