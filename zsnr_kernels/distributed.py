"""Sampling a latent sharded across processes (sequence parallelism): each rank holds a slice of the latent along
one non-batch dim, ``shard_dim``, and steps its slice; the gathered slices equal the run of one process.

Two parts of a step are not element-wise, and are made so here (everything else needs no communication):

* **Guidance rescale** takes, per sample, std(G_c) and std(G) over all non-batch elements (docs/design.md §2.7).
  A *row* is one index along ``shard_dim`` with all the sample's other non-batch elements: a row is never split
  between ranks, and it is made of ``outer`` *blocks* (one index of the dims before ``shard_dim``), each ``inner``
  contiguous elements (the dims after it).  Each rank computes per block the mean and M2 (sum of squared deviations
  from the mean) of G_c and of G: on CPU tensors with the cpu kernels' own statistics pass (``_C.cpu_rescale_sums``
  with the blocks as its samples: float32 terms less the block's first element, float32 lanes per chunk, float64 in
  chunk order), elsewhere in float64 with :func:`_tree_sum`; then merges each row's blocks in their order.  The
  rows are gathered (one ``all_gather`` per model evaluation with guidance rescale: :data:`STATS_PER_ROW` float64 =
  32 bytes per row and sample, padded to the largest slice) and every rank merges all rows in global order by one
  fixed formula (:func:`_merge`): M2 = sum_k M2_k + n sum_k (d_k - mean(d))^2 with d_k = mean_k - mean_0, the sums
  by :func:`_tree_sum`, a fixed tree of element-wise float64 additions whose order depends only on the number of
  terms (never on the device, the thread count, or how many rows a rank holds).  A block's statistics do not depend
  on the other blocks either, so the factor f = phi sqrt(M2_c / M2_g) + (1 - phi) (1 where M2_g is not > 0) has the
  same bits on every rank and for any number of ranks.  A constant G gives M2 = 0 exactly, so its factor is exactly
  1, as in the kernels.  (The kernels' own statistics sum a sample in 16384-element chunks of its flat index, which
  a slice along a middle dim does not even hold contiguously: no partials of slices reproduce those bits.  The
  factor defined here differs from theirs by the summation order only: measured, at most 2e-8 relative.)
* **Noise**: the Philox normal of an element is a function of its index within the sample (§2.8); a rank's slice
  takes the normals of its elements' global indices.  The step draws them itself (:func:`kernel_noise_slice`): the
  step record carries the slice's place in the sample (:attr:`Shard.noise_slice`, a
  :class:`zsnr_kernels.noise.NoiseSlice`), and the kernels map each local group of four elements to its group of
  the sample (csrc/include/zsnr/philox.h ``slice_group``), at no cost beyond the slice's own normals.  That needs
  the groups of four to stay whole: local, total and offset (each a size along ``shard_dim`` times the product of
  the dims after it) multiples of 4, which every latent whose dims after ``shard_dim`` hold a multiple of 4
  elements satisfies.  Otherwise a compiled backend gets the normals as an explicit ``noise=`` tensor
  (:func:`global_normal`, :func:`step_noise`): on CPU tensors (with the compiled module) the compiled generator's
  (``_C.cpu_philox_normals``, the function the cpu kernels' element pass computes: bit for bit its in-kernel noise),
  elsewhere the reference (:func:`zsnr_kernels.noise.normal` with the slice) on the latent's device, within
  ``tools.tolerances.NORMAL_ATOL`` of the CUDA/Triton kernels' in-kernel normals.  The torch backend draws any
  slice itself (the reference).  ``churn_step`` (EDM churn of the first state, no kernel) takes the explicit
  normals too.

How the factor reaches the step (no change to the statistics kernels): the step runs in the backends' table mode
(the coefficient record :class:`zsnr_kernels.SamplingPlan` uses) with one float64 row per sample whose p, q are the
rescaled ones, p' = p + (q u / t)(f - 1), q' = q f (csrc/include/zsnr/combine.h ``fold_rescale``, for
G = u y + t F), and the row's guidance rescale 0, so the kernel runs no statistics pass of its own.  CFG++'s
unconditional D_u = p y + q F_u keeps the raw p, q (:func:`rows_with_factors`).  Steps without guidance rescale run
the backend's ordinary fused step (its noise drawn at the slice's places), bit for bit the unsharded step on the cpu
backend.

The layout (every rank's size along ``shard_dim``, so its offset) is learned by one ``all_gather`` of the local
shapes, once per process group, dim and local shape (:func:`layout`; ``sample()`` learns it afresh at the start of
every run).  Every rank must call the same steps in the same order (each step with guidance rescale is a
collective).  ``process_group=None`` with a ``shard_dim`` is one process holding the whole latent (no
communication): the single-process run that sharded runs equal.  Pass ``torch.distributed.group.WORLD`` for the
default group.  Collectives: gloo on CPU tensors, NCCL (tensors on the latent's device) on CUDA tensors; any
backend whose group supports ``all_gather``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _validate, coefficients as co, noise as _noise, reference
from .backends import device as _device, ext as _ext, layout as _layout, registry as _backend, table as _table
from .backends.call import DTYPE_CODES
from .parameterization import rescale_space_coeffs

__all__ = ["Shard", "layout", "forget_layouts", "agree_seeds", "global_normal", "kernel_noise_slice", "step_noise",
           "row_statistics", "rescale_factors", "rows_with_factors", "fused_step", "STATS_PER_ROW"]

#: float64 values gathered per (sample, row) and step with guidance rescale: mean and M2 of G_c and of G
STATS_PER_ROW = 4
_MAX_DIMS = 16


@dataclass(frozen=True)
class Shard:
    """Where this rank's slice lies in the full latent.  ``dim`` is the shard dim (positive), ``sizes`` every rank's
    size along it in rank order, ``rank`` this rank's place in ``sizes``; ``outer`` the product of the dims between
    the batch and ``dim``, ``inner`` the product of the dims after it (a row holds ``outer * inner`` elements)."""

    group: object
    dim: int
    sizes: tuple[int, ...]
    rank: int
    outer: int
    inner: int

    @property
    def offset(self) -> int:
        return sum(self.sizes[:self.rank])

    @property
    def local(self) -> int:
        return self.sizes[self.rank]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def row_size(self) -> int:
        return self.outer * self.inner

    @property
    def noise_slice(self) -> _noise.NoiseSlice:
        """Where this rank's slice of each sample lies in the sample, as the Philox noise is drawn for it
        (:class:`zsnr_kernels.noise.NoiseSlice`: runs of local * inner elements, total * inner apart, offset * inner
        in)."""
        return _noise.NoiseSlice(self.local * self.inner, self.total * self.inner, self.offset * self.inner)


_LAYOUTS: dict = {}


def _dist():
    import torch.distributed as dist

    return dist


def _comm_device(group, y: torch.Tensor) -> torch.device:
    """Where the group's collectives take their tensors: y's device for NCCL, the CPU otherwise (gloo)."""
    try:
        backend = str(_dist().get_backend(group)).lower()
    except (RuntimeError, ValueError):
        backend = ""
    return y.device if ("nccl" in backend and y.device.type == "cuda") else torch.device("cpu")


def _check_args(y: torch.Tensor, process_group, shard_dim) -> int:
    if torch.compiler.is_compiling():
        raise ValueError("process_group= / shard_dim= (sharded sampling) cannot be traced by torch.compile: call the "
                         "steps eagerly")
    if shard_dim is None:
        raise ValueError("process_group= needs shard_dim=: the non-batch dim along which each rank holds its slice")
    if isinstance(shard_dim, bool) or not isinstance(shard_dim, int):
        raise TypeError(f"shard_dim must be an int (a non-batch dim of y), got {type(shard_dim).__name__}")
    nd = y.ndim
    d = shard_dim + nd if shard_dim < 0 else shard_dim
    if not 1 <= d < nd:
        raise ValueError(f"shard_dim={shard_dim} must name a non-batch dim of y (1..{nd - 1} or -{nd - 1}..-1); y has "
                         f"shape {tuple(y.shape)}")
    if nd > _MAX_DIMS:
        raise ValueError(f"sharded sampling takes latents of at most {_MAX_DIMS} dims, got {nd}")
    if process_group is not None:
        dist = _dist()
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("process_group= was given but torch.distributed is not initialized: call "
                             "torch.distributed.init_process_group first (or pass process_group=None for one process)")
    return d


def layout(y: torch.Tensor, process_group=None, shard_dim=None, *, refresh: bool = False, learn: bool = True) -> Shard:
    """The :class:`Shard` of ``y``, this rank's slice along ``shard_dim``: learned by one ``all_gather`` of every rank's
    local shape (which also checks that the other dims agree), then cached per (group, dim, local shape).

    ``refresh``: learn it again (a collective every rank of the group must make; ``sample()`` does at the start of
    each run).  A cached layout is taken without communication, so a rank whose local shape stays the same while
    another rank's changes must be refreshed on every rank (or call :func:`forget_layouts` on every rank).

    ``learn=False`` (what the step functions pass): a layout of a group that is not cached is an error rather than
    a collective, since whether it is cached is each rank's own business: one rank communicating where another does
    not would pair the all_gather with another rank's next collective (a hang, or garbage).  Call
    ``layout(y, group, dim, refresh=True)`` on every rank before a loop of step functions, as ``sample()`` does."""
    d = _check_args(y, process_group, shard_dim)
    shape = tuple(y.shape)
    key = (id(process_group), d, shape, y.device.type)
    hit = _LAYOUTS.get(key)
    if hit is not None and hit.group is process_group and not refresh:
        return hit
    if process_group is not None and not learn:
        raise ValueError(f"this rank's slice layout (shape {shape} along dim {d}) is not known for process_group: call "
                         "zsnr_kernels.distributed.layout(y, process_group, shard_dim, refresh=True) on every rank "
                         "before stepping (sample() does): learning it is a collective every rank must make")
    outer, inner = math.prod(shape[1:d]), math.prod(shape[d + 1:])
    if process_group is None:
        sh = Shard(None, d, (shape[d],), 0, outer, inner)
    else:
        dist = _dist()
        world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        dev = _comm_device(process_group, y)
        mine = torch.zeros(_MAX_DIMS + 2, dtype=torch.int64)
        mine[0], mine[1] = len(shape), d
        mine[2:2 + len(shape)] = torch.tensor(shape, dtype=torch.int64)
        got = [torch.empty_like(mine, device=dev) for _ in range(world)]
        dist.all_gather(got, mine.to(dev), group=process_group)
        rows = [g.cpu().tolist() for g in got]
        for r, row in enumerate(rows):
            nd, dd, other = row[0], row[1], tuple(row[2:2 + row[0]])
            if nd != len(shape) or dd != d or other[:d] + other[d + 1:] != shape[:d] + shape[d + 1:]:
                raise ValueError(f"rank {r} of the group holds a slice of shape {other} sharded along dim {dd}, this "
                                 f"rank (rank {rank}) one of shape {shape} along dim {d}: every rank must hold a slice "
                                 "of the same latent along the same dim (equal sizes in every other dim)")
        sh = Shard(process_group, d, tuple(row[2 + d] for row in rows), rank, outer, inner)
    if len(_LAYOUTS) >= 256:  # bounded: each entry holds its group (other shapes are learned again when used)
        _LAYOUTS.clear()
    _LAYOUTS[key] = sh
    return sh


def forget_layouts() -> None:
    """Drop every cached layout (the next sharded step of each group learns its layout again: call it on every rank)."""
    _LAYOUTS.clear()


def agree_seeds(shard: Shard, seeds, y: torch.Tensor) -> list[int]:
    """Per-sample seeds every rank shares: ``seeds`` (anything :func:`zsnr_kernels.noise.normalize_seeds` takes) of the
    group's first rank, broadcast (one collective of 8 bytes per sample; ``sample()`` calls it only when it drew the
    seeds itself from torch's generator, which differs between ranks)."""
    seeds = _noise.normalize_seeds(seeds, y.shape[0])
    if shard.group is None or shard.world == 1:
        return seeds
    dist = _dist()
    t = torch.tensor(_noise.seed_bits(seeds), dtype=torch.int64, device=_comm_device(shard.group, y))
    dist.broadcast(t, src=dist.get_global_rank(shard.group, 0), group=shard.group)
    return [v % 2**64 for v in t.cpu().tolist()]


# --------------------------------------------------------------------------------------------------- the noise


def _kernel_normals(y: torch.Tensor) -> bool:
    """Whether the slice's normals come from the compiled CPU generator (bit for bit the cpu kernels' in-kernel
    noise): CPU tensors with the compiled module."""
    return y.device.type == "cpu" and _ext.available()


def global_normal(shard: Shard, y: torch.Tensor, seeds, step_index: int, draw: int = 0, *,
                  kernel: bool | None = None) -> torch.Tensor:
    """This rank's slice of the §2.8 noise of the full latent: unit normals shaped like ``y`` (the slice, contiguous),
    in y's dtype, each drawn at its element's index within the full sample.  ``seeds`` one per sample (anything
    :func:`zsnr_kernels.noise.normalize_seeds` takes).  ``kernel``: from the compiled CPU generator (default on CPU
    tensors where it is built) or from the reference :func:`zsnr_kernels.noise.group_normals`."""
    b = y.shape[0]
    seeds = _noise.normalize_seeds(seeds, b)
    step_index = _validate.index("step_index", step_index, 2**32)
    o, lg, inner, off, loc = shard.outer, shard.total, shard.inner, shard.offset, shard.local
    sl = shard.noise_slice
    use_kernel = _kernel_normals(y) if kernel is None else kernel
    if use_kernel and sl.groups_whole:  # the slice's own normals, as the cpu element pass draws them for it
        n = o * loc * inner
        z = torch.empty(b, n, dtype=torch.float32)
        for i, s in enumerate(seeds):
            _ext.C.cpu_philox_normals(z[i].data_ptr(), s, step_index, draw, n, *sl)
    elif use_kernel:
        # the normals of elements 0 .. (last element of the slice) of each sample, as the cpu element pass draws them
        n = (o - 1) * lg * inner + (off + loc) * inner
        full = torch.empty(b, o * lg * inner, dtype=torch.float32)
        for i, s in enumerate(seeds):
            _ext.C.cpu_philox_normals(full[i].data_ptr(), s, step_index, draw, n)
        z = full.view(b, o, lg, inner)[:, :, off:off + loc]
    else:
        z = _noise.normal(tuple(y.shape), seeds, step_index, draw, device=y.device, noise_slice=sl)
    return z.reshape(y.shape).to(device=y.device, dtype=y.dtype).contiguous()


# ----------------------------------------------------------------------------------------- the rescale factor


def _tree_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum over the last dim by a fixed pairwise tree of element-wise additions: element k of the first half plus
    element k of the second (an odd last element carried up), until one is left.  Its order depends only on the
    length, never on the device, the thread count or the other dims (an element-wise float64 add is one IEEE
    rounding wherever it runs), unlike PyTorch's reductions, whose order follows the shape and the threads."""
    n = x.shape[-1]
    if n == 0:
        return x.new_zeros(x.shape[:-1])
    while n > 1:
        h = n // 2
        pair = x[..., :h] + x[..., h:2 * h]
        x = torch.cat((pair, x[..., 2 * h:]), dim=-1) if n % 2 else pair
        n = x.shape[-1]
    return x[..., 0]


def _merge(mean: torch.Tensor, m2: torch.Tensor, count: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge groups of ``count`` elements each along ``dim`` (their means and M2s), in index order by one fixed formula:
    d_k = mean_k - mean_0, mean = mean_0 + mean(d), M2 = sum_k M2_k + count sum_k (d_k - mean(d))^2, the sums by
    :func:`_tree_sum`.  Groups of a constant tensor (equal means, M2 = 0) merge to M2 = 0 exactly."""
    mean, m2 = mean.movedim(dim, -1), m2.movedim(dim, -1)
    k = mean.shape[-1]
    d = mean - mean[..., :1]
    dbar = _tree_sum(d) / k
    e = d - dbar[..., None]
    return mean[..., 0] + dbar, _tree_sum(m2) + count * _tree_sum(e * e)


def _block_moments(shard: Shard, y, fc, fu, w: float, uv: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Per *block* of this rank's slice (one index of the dims before ``shard_dim`` and one row: ``inner`` contiguous
    elements, [B, outer, local] of them): the mean and M2 of G_c and of G, float64 ``[B, outer, local, 2]`` each.

    On CPU tensors with the compiled module: the cpu kernels' own statistics pass (``_C.cpu_rescale_sums``, float32
    lanes per chunk, then float64 in chunk order, less the block's first element; the same bits for a block
    whatever the number of blocks or threads) over the blocks as its samples, of G/s (combine.h
    ``rescale_weights``: a common scale of G_c and G that the factor does not see).  Elsewhere: G in float64 and
    :func:`_tree_sum`s of its deviations from the block's first element."""
    b, o, loc, inner = y.shape[0], shard.outer, shard.local, shard.inner
    nb = b * o * loc
    view = lambda x: x.contiguous().view(nb, inner)  # noqa: E731
    if y.device.type == "cpu" and y.dtype in DTYPE_CODES and _ext.available():
        ab = [_ext.C.rescale_weights(u, t) for u, t in uv]  # the kernels' own (a, b): combine.h
        with_y = int(any(u != 0.0 or t != 1.0 for u, t in uv))
        if not with_y:
            ab = [(0.0, 1.0)] * b
        yv, cv, uv_ = view(y), view(fc), view(fu)
        per_block = lambda vals: [v for v in vals for _ in range(o * loc)]  # noqa: E731
        if with_y:  # a = u/s, b = t/s as the kernel takes them (it recomputes the same rounding from (u, t))
            us, ts = per_block([p[0] for p in uv]), per_block([p[1] for p in uv])
        else:
            us, ts = [0.0] * nb, [1.0] * nb
        sums = torch.tensor(_ext.C.cpu_rescale_sums(DTYPE_CODES[y.dtype], nb, inner, cv.data_ptr(), uv_.data_ptr(),
                                                    yv.data_ptr(), with_y, float(w), us, ts),
                            dtype=torch.float64).view(nb, 4)
        # the blocks' first elements, the pivots the sums are taken less (in G/s, float64)
        w32 = torch.tensor(w, dtype=torch.float32).item()
        c0, u0, y0 = cv[:, 0].double(), uv_[:, 0].double(), yv[:, 0].double()
        a_ = torch.tensor(per_block([p[0] for p in ab]), dtype=torch.float64)
        b_ = torch.tensor(per_block([p[1] for p in ab]), dtype=torch.float64)
        ya = a_ * y0 if with_y else torch.zeros_like(c0)
        pc, pg = b_ * c0 + ya, b_ * (u0 + w32 * (c0 - u0)) + ya
        mean = torch.stack((pc + sums[:, 0] / inner, pg + sums[:, 2] / inner), dim=-1)
        m2 = torch.stack((sums[:, 1] - sums[:, 0] * sums[:, 0] / inner,
                          sums[:, 3] - sums[:, 2] * sums[:, 2] / inner), dim=-1).clamp_min(0.0)
        return mean.view(b, o, loc, 2), m2.view(b, o, loc, 2)
    f64 = torch.float64
    c64, u64 = fc.to(f64), fu.to(f64)
    g64 = u64 + w * (c64 - u64)
    u = torch.tensor([p[0] for p in uv], dtype=f64, device=y.device).reshape((b,) + (1,) * (y.ndim - 1))
    t = torch.tensor([p[1] for p in uv], dtype=f64, device=y.device).reshape((b,) + (1,) * (y.ndim - 1))
    if any(p[0] != 0.0 for p in uv):
        uy = u * y.to(f64)
        gc, gg = uy + t * c64, uy + t * g64
    else:
        gc, gg = t * c64, t * g64
    means, m2s = [], []
    for x in (gc, gg):
        x = x.reshape(nb, inner)
        dev = x - x[:, :1]  # deviations from the block's first element: exactly 0 for a constant block
        mean_dev = _tree_sum(dev) / inner
        dev = dev - mean_dev[:, None]
        means.append(x[:, 0] + mean_dev)
        m2s.append(_tree_sum(dev * dev))
    return torch.stack(means, -1).view(b, o, loc, 2), torch.stack(m2s, -1).view(b, o, loc, 2)


def row_statistics(shard: Shard, y, f_cond, f_uncond, guidance_scale: float, uv: list) -> torch.Tensor:
    """This rank's rows (one index along ``shard_dim``, never split between ranks): ``[B, local, 4]`` float64, the
    mean and M2 of G_c, then of G, each row merged from its ``outer`` blocks in their order (:func:`_merge`)."""
    b = y.shape[0]
    uv = list(uv) * b if len(uv) == 1 else list(uv)
    mean, m2 = _block_moments(shard, y, f_cond, f_uncond, guidance_scale, uv)
    mean, m2 = _merge(mean, m2, shard.inner, dim=1)  # [B, local, 2]
    return torch.stack((mean[..., 0], m2[..., 0], mean[..., 1], m2[..., 1]), dim=-1)


def rescale_factors(shard: Shard, y: torch.Tensor, f_cond: torch.Tensor, f_uncond: torch.Tensor,
                    guidance_scale: float, guidance_rescale: float, uv: list) -> list[float]:
    """The per-sample guidance-rescale factors of the full latent (module docstring), the same bits on every rank and
    for any number of ranks: f = phi std(G_c)/std(G) + (1 - phi), 1 where std(G) = 0, with G = u y + t F,
    F = F_u + w (F_c - F_u) and G_c the same with F_c.  ``uv``: (u, t) per sample, or one pair for the batch.  One
    ``all_gather`` of :data:`STATS_PER_ROW` float64 per row and sample (padded to the largest slice; nothing for a
    group of one); every rank then merges all rows in global order (:func:`_merge`)."""
    b = y.shape[0]
    stats = row_statistics(shard, y, f_cond, f_uncond, guidance_scale, uv)  # [B, local, 4]
    if shard.group is not None and shard.world > 1:
        dist = _dist()
        dev = _comm_device(shard.group, y)
        mine = torch.zeros(b, max(shard.sizes), STATS_PER_ROW, dtype=torch.float64, device=dev)
        mine[:, :shard.local] = stats.to(dev)
        got = [torch.empty_like(mine) for _ in range(shard.world)]
        dist.all_gather(got, mine, group=shard.group)
        stats = torch.cat([gt[:, :n] for gt, n in zip(got, shard.sizes)], dim=1).to(y.device)  # [B, rows, 4]
    mean = torch.stack((stats[..., 0], stats[..., 2]), dim=1)  # [B, 2, rows]: (c, g)
    m2 = torch.stack((stats[..., 1], stats[..., 3]), dim=1)
    _, m2 = _merge(mean, m2, shard.row_size, dim=2)  # [B, 2]
    out = []
    for c_, g_ in m2.tolist():
        out.append(1.0 if not g_ > 0.0 else guidance_rescale * math.sqrt(max(c_, 0.0) / g_) + (1.0 - guidance_rescale))
    return out


# ------------------------------------------------------------------------------------------------- the step


def rows_with_factors(rows: list, factors: list[float]) -> list[list[float]]:
    """Per-sample table rows (from one row for the batch, or one per sample) with each sample's factor folded into
    p, q (module docstring) and the row's rescale off (a sharded step's, and a sharded SamplingPlan's).  CFG++'s
    unconditional D_u keeps the raw p, q: the table holds its weights on y and F_u folded on the host (columns A and
    ``BFU``, GY and ``GFU``), which the factor does not touch."""
    rows = [list(r) for r in (rows * len(factors) if len(rows) == 1 else rows)]
    P, Q, U, T = _table.P, _table.Q, _table.U, _table.T
    for r, f in zip(rows, factors):
        (r[P], r[Q]), r[_table.PHI] = reference.fold_rescale(r[P], r[Q], r[Q] * r[U] / r[T], f), 0.0
    return rows


def fused_step(shard: Shard, name: str, y, f_cond, f_uncond, history, pz, args, sigma_eval, *, guidance_scale,
               guidance_rescale, rescale_space, noise, seeds, step_index, want_denoised, out, draw=0,
               noise_slice=None):
    """A backend's ``fused_step`` (registry signature) on this rank's slice.  Seeded noise is drawn by the step at
    ``noise_slice``'s places (:func:`kernel_noise_slice`), or ``noise`` is already this slice's (a tensor or a
    function returning one: the caller drew it at the global indices).  Without guidance rescale it is the backend's
    own step; with it, the factor of the full latent (:func:`rescale_factors`) folded into per-sample table rows,
    run by the backend's ``table_step``."""
    if seeds is not None and noise_slice is None and shard.local != shard.total:
        raise ValueError("a sharded step takes its seeded noise at the slice's global indices: pass noise_slice="
                         "kernel_noise_slice(shard, name) (the kernels draw it), or noise=step_noise(shard, y, seeds, "
                         "step_index, draw) instead of seeds")
    run = _backend.FUSED[name]
    if not guidance_rescale or f_uncond is None:
        return run(y, f_cond, f_uncond, history, pz, args, sigma_eval, guidance_scale=guidance_scale,
                   guidance_rescale=guidance_rescale, rescale_space=rescale_space, noise=noise, seeds=seeds,
                   step_index=step_index, want_denoised=want_denoised, out=out, draw=draw, noise_slice=noise_slice)
    if type(args[0].sigma) is not float:
        raise ValueError("sharded guidance rescale takes host sigmas (numbers or per-sample lists), not sigma tensors "
                         "on the device")
    cs = [co.step_coeffs(pz, a) for a in args]
    if callable(noise):
        noise = noise() if any(c.e != 0.0 for c in cs) else None
        if noise is not None:
            _validate.tensor("noise", noise, y)
    uv = [rescale_space_coeffs(pz, s, rescale_space) for s in sigma_eval]
    factors = rescale_factors(shard, y, f_cond, f_uncond, guidance_scale, guidance_rescale, uv)
    st = _device.device_step(y, f_cond, f_uncond, history, pz, args, sigma_eval, noise=noise, seeds=seeds,
                             want_denoised=want_denoised, out=out)
    if st.carry_out is not None and st.noisy and name in ("cpu", "cuda"):
        raise ValueError(f"sampler {args[0].sampler!r} keeps a derivative and adds noise in one step, which the "
                         f"{name} kernels cannot do; use backend='torch' or 'triton'")
    rows = _table.step_rows(pz, st.coeffs, sigma_eval, guidance_scale=guidance_scale,
                            guidance_rescale=guidance_rescale, rescale_space=rescale_space)
    rows = rows_with_factors(rows, factors)
    table = _layout.to_device(torch.tensor(rows, dtype=torch.float64), y.device)
    _backend.module(name).table_step(
        st.y, st.f_cond, st.f_uncond, st.history, table, guidance_scale=guidance_scale, guidance_rescale=0.0,
        rescale_space=rescale_space, noise_mode=(2 if st.philox else 1) if st.noisy else 0, noise=st.noise,
        seeds=seeds, step_index=0 if step_index is None else step_index, y_out=st.y_out, d_out=st.d_out,
        carry_out=st.carry_out, draw=draw, noise_slice=noise_slice)
    return st.finish(out), st.d_out, st.carry_out, [c.sigma_out for c in st.coeffs], st.coeffs[0].complete


def kernel_noise_slice(shard: Shard, backend: str) -> _noise.NoiseSlice | None:
    """The slice a sharded step on ``backend`` hands its kernels to draw its seeded noise at the global indices
    (:attr:`Shard.noise_slice`), or None where they cannot (a compiled backend and a slice that splits the groups of
    four, :func:`zsnr_kernels.backends.call.kernel_slice`): the step then takes :func:`step_noise` as ``noise=``."""
    sl = shard.noise_slice
    return sl if backend == "torch" or sl.groups_whole else None


def step_noise(shard: Shard, y: torch.Tensor, seeds, step_index, draw: int = 0):
    """The lazy ``noise=`` of a sharded step with ``seed=`` whose kernels do not draw the slice themselves
    (:func:`kernel_noise_slice`), and of ``churn_step``: a function drawing the slice's normals at their global
    indices (called only when the step adds noise)."""
    if step_index is None:
        raise ValueError("seed= needs step_index= (the index of the step in the schedule) to pick the noise")
    seeds = _noise.normalize_seeds(seeds, y.shape[0])
    return lambda: global_normal(shard, y, seeds, step_index, draw)
