"""Noise: one definition on every backend (docs/design.md §2.8).  This module is the pure-PyTorch reference.

A noise value is a pure function of (seed of the sample, step, draw, element index j within the sample)::

    key     = (seed % 2**32, seed // 2**32)            seed taken mod 2**64
    counter = (g % 2**32, g // 2**32, step, draw)      g = j // 4
    x0, x1, x2, x3 = Philox4x32-10(key, counter)
    u_k = float32(s_k) * float32(4.6566127342e-10)     s_k = x_k as int32, bitwise-not if negative
    n0, n1 = box_muller(u0, u1);  n2, n3 = box_muller(u2, u3)
    box_muller(a, b) = (r cos th, r sin th),  r = sqrt(-2 log(max(a, 1e-7))),  th = 2 pi b   (float32)
    noise[j] = n_{j % 4}

This is Triton's generator (``tl.philox``, ``uint_to_uniform_float``, ``pair_uniform_to_normal``) with the
counter laid out as above, and ``csrc/include/zsnr/philox.h`` for the C++/CUDA code.  The 32-bit integers
are bit-identical on every backend; the normals agree to float rounding of log/cos/sin.  Because the
counter is per sample, a batch of 8 gives the same noise as 8 batches of 1, on any device.

A slice of a sample (a latent sharded across processes, :mod:`zsnr_kernels.distributed`) takes the noise of its
elements at their places in the sample: :class:`NoiseSlice` maps its element j to the sample's element J.

Integers are held in int64 tensors with values in [0, 2**32); a 32x32-bit product is split into 16-bit
halves so that no int64 product overflows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import _validate

__all__ = ["philox4x32", "uint32_to_uniform", "normal", "group_normals", "normalize_seeds", "seed_bits", "NoiseSlice",
           "check_slice"]

MASK32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9  # key bump of k0 after each round
PHILOX_KEY_B = 0xBB67AE85  # key bump of k1
PHILOX_ROUND_A = 0xD2511F53  # multiplier of c0
PHILOX_ROUND_B = 0xCD9E8D57  # multiplier of c2
UINT_TO_UNIFORM_SCALE = 4.6566127342e-10  # largest float s with (2**31 - 1) * s < 1 in float32
TWO_PI = 6.283185307179586
MIN_UNIFORM = 1.0e-7  # u is clamped to at least this where its log is taken


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of the 64-bit product ``a * b``, for a constant ``a < 2**32`` and ``b``
    holding uint32 values, without int64 overflow: b = b_hi 2**16 + b_lo, each partial product < 2**48."""
    p_lo = a * (b & 0xFFFF)
    mid = a * (b >> 16) + (p_lo >> 16)  # a * b = mid * 2**16 + (p_lo mod 2**16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)


def _as_u32(x: Tensor | int, device: torch.device | None, name: str) -> Tensor:
    if isinstance(x, Tensor):
        if x.dtype != torch.int64:
            raise TypeError(f"{name} must be an int64 tensor, got dtype {x.dtype}")
    elif isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int or an int64 tensor, got {type(x).__name__}")
    else:
        x = torch.tensor(x & MASK32, dtype=torch.int64, device=device)
    return x & MASK32


def philox4x32(
    key0: Tensor | int,
    key1: Tensor | int,
    c0: Tensor | int,
    c1: Tensor | int,
    c2: Tensor | int,
    c3: Tensor | int,
    rounds: int = 10,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32 with key (key0, key1) and counter (c0, c1, c2, c3); Triton's ``tl.philox_impl``.

    Each round maps (c0, c1, c2, c3) to (hi(B c2) ^ c1 ^ k0, lo(B c2), hi(A c0) ^ c3 ^ k1, lo(A c0)) with
    A = 0xD2511F53, B = 0xCD9E8D57, then bumps the key: k0 += 0x9E3779B9, k1 += 0xBB67AE85 (mod 2**32).

    Arguments are int64 tensors (or Python ints) holding uint32 values, taken mod 2**32, and broadcast
    against each other.  Returns the four output words as int64 tensors with values in [0, 2**32).
    """
    rounds = _validate.integer("rounds", rounds, lo=0)
    names = ("key0", "key1", "c0", "c1", "c2", "c3")
    args = (key0, key1, c0, c1, c2, c3)
    device = next((a.device for a in args if isinstance(a, Tensor)), None)
    k0, k1, c0, c1, c2, c3 = torch.broadcast_tensors(*(_as_u32(a, device, n) for a, n in zip(args, names)))
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def uint32_to_uniform(x: Tensor) -> Tensor:
    """Triton's ``uint_to_uniform_float`` for 32 bits: a float32 uniform in [0, 1).

    ``x`` (an integer tensor holding uint32 values) is read as int32 s; negative s becomes ~s; the result
    is float32(s) * float32(4.6566127342e-10).  As unsigned arithmetic: s = x if x < 2**31 else 2**32-1-x.
    """
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"x must be an integer tensor, got dtype {x.dtype}")
    x = x.to(torch.int64) & MASK32
    s = torch.where(x >= 2**31, MASK32 - x, x)
    # A Python float scalar is rounded to float32 by type promotion, as Triton rounds its constant.
    return s.to(torch.float32) * UINT_TO_UNIFORM_SCALE


def _box_muller(u1: Tensor, u2: Tensor) -> tuple[Tensor, Tensor]:
    """Triton's ``pair_uniform_to_normal`` in float32: (r cos th, r sin th), r = sqrt(-2 log max(u1, 1e-7)),
    th = 2 pi u2."""
    u1 = torch.clamp_min(u1, MIN_UNIFORM)  # the bound is rounded to float32, as in Triton
    th = TWO_PI * u2
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


class NoiseSlice(NamedTuple):
    """Where a slice of each sample lies in the sample its noise is drawn for (docs/design.md §2.8), as
    ``csrc/include/zsnr/philox.h``'s ``NoiseSlice`` defines it (the one definition; the kernels draw it there).

    A latent sharded along one non-batch dim holds, per sample, one run of ``local`` (L) elements for every index of
    the dims before the shard dim; each run is its part of ``total`` (G) elements of the sample, starting ``offset``
    (O) elements into them.  With D the product of the dims after the shard dim, L = (the slice's size along it) D,
    G = (the sample's size along it) D, O = (the slice's start) D (:meth:`along`).  The slice's element j (its flat
    index within the slice's sample) is the sample's element ``J = (j // L) * G + O + j % L``, whose noise it takes.
    The whole sample is L = G = n, O = 0."""

    local: int
    total: int
    offset: int

    @classmethod
    def along(cls, shape: Sequence[int], dim: int, start: int, size: int) -> NoiseSlice:
        """The slice of a latent of ``shape`` (the slice's own, batch first) that holds indices ``start`` ..
        ``start + shape[dim] - 1`` of the ``size`` indices the full latent has along the non-batch dim ``dim``."""
        inner = math.prod(shape[dim + 1:])
        return cls(shape[dim] * inner, size * inner, start * inner)

    @property
    def whole(self) -> bool:
        """Whether it is the whole sample (J = j)."""
        return self.local == self.total and self.offset == 0

    @property
    def groups_whole(self) -> bool:
        """Whether each group of four local elements is one group of the sample (L, G, O multiples of 4; philox.h
        ``slice_groups_whole``): the slices the compiled kernels draw themselves."""
        return self.whole or (self.local % 4 == 0 and self.total % 4 == 0 and self.offset % 4 == 0)

    def check(self, n: int, name: str = "noise_slice") -> NoiseSlice:
        """``self``, if it places samples of ``n`` elements (1 <= L, 0 <= O, O + L <= G, n a multiple of L, and the
        sample it lies in, n / L runs of G elements, fewer than 2**63 elements: a tensor's, whose indices the step
        record's int64 fields and the reference's int64 index arithmetic hold); ValueError naming ``name``
        otherwise (samples of no elements: any slice, there is nothing to place).  Every backend refuses a slice by
        this rule (:func:`check_slice`)."""
        for field, v in zip(self._fields, self):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name}.{field} must be an int, got {type(v).__name__}")
        if n == 0:  # an empty slice (a rank holding none of an uneven split): nothing to place
            return self
        if not (1 <= self.local and 0 <= self.offset and self.offset + self.local <= self.total
                and n % self.local == 0 and max(n // self.local, 1) * self.total < 2**63):
            raise ValueError(f"{name}={tuple(self)} does not place samples of {n} elements: each sample must be runs "
                             "of local elements (n a multiple of local) inside runs of total, offset + local <= total, "
                             "in a sample of fewer than 2**63 elements (build it with NoiseSlice.along(shape, dim, "
                             "start, size))")
        return self

    def index(self, j):
        """The sample's element J of local element(s) ``j`` (an int or an int64 tensor)."""
        return (j // self.local) * self.total + self.offset + j % self.local

    def group(self, g):
        """The sample's group of local group(s) ``g`` of a slice with whole groups (philox.h ``slice_group``):
        ``(g // (L/4)) * (G/4) + O/4 + g % (L/4)``."""
        if self.whole:
            return g
        l4 = self.local // 4
        return (g // l4) * (self.total // 4) + self.offset // 4 + g % l4


def check_slice(noise_slice, n: int, name: str = "noise_slice") -> NoiseSlice | None:
    """``noise_slice`` if it is None (the whole sample) or a :class:`NoiseSlice` that places samples of ``n``
    elements (:meth:`NoiseSlice.check`); TypeError for another type (a plain tuple included: a slice is built by
    :meth:`NoiseSlice.along`, not written out by hand).  The check of a slice every backend makes, drawing noise
    or not; the compiled kernels add that groups stay whole (:func:`zsnr_kernels.backends.call.kernel_slice`)."""
    if noise_slice is None:
        return None
    if not isinstance(noise_slice, NoiseSlice):
        raise TypeError(f"{name} must be a zsnr_kernels.noise.NoiseSlice (build it with NoiseSlice.along(shape, dim, "
                        f"start, size)), got {type(noise_slice).__name__}")
    return noise_slice.check(n, name)


def _seed_int(value: object, name: str) -> int:
    v = _validate.integer(name, value)
    if not -(2**63) <= v < 2**64:
        raise ValueError(f"{name} must be in [-2**63, 2**64), got {v}")
    return v % 2**64


def _check_seed_tensor(seed: Tensor, batch: int) -> None:
    if seed.dtype == torch.bool or seed.dtype.is_floating_point or seed.dtype.is_complex:
        raise TypeError(f"seed tensor must have an integer dtype, got {seed.dtype}")
    if seed.is_meta:
        raise ValueError("seed is a meta tensor, which holds no values; pass ints or a CPU/CUDA tensor")
    if seed.dim() > 1 or (seed.dim() == 1 and seed.shape[0] != batch):
        raise ValueError(f"seed tensor must be 0-d or have shape ({batch},) (one per sample), got {tuple(seed.shape)}")


def normalize_seeds(seed: int | Sequence[int] | Tensor, batch: int) -> list[int]:
    """The per-sample seeds as ``batch`` Python ints in [0, 2**64).

    ``seed`` is a sequence / 1-d integer tensor of ``batch`` ints (one per sample), or one int s (a Python int
    or a 0-d tensor) that gives sample i the seed s + i: different noise for every sample, and sample i of a
    batch equals a batch of one seeded s + i (the convention of A1111 and ComfyUI batches).  Ints must lie in
    [-2**63, 2**64) (an int64 or a uint64); everything is taken mod 2**64.
    """
    batch = _validate.index("batch", batch, 2**63)
    if isinstance(seed, Tensor):
        _check_seed_tensor(seed, batch)
        values = seed.tolist()
        return [v % 2**64 for v in values] if seed.dim() == 1 else [(values + i) % 2**64 for i in range(batch)]
    if isinstance(seed, (str, bytes, Mapping)) or not isinstance(seed, Iterable):
        first = _seed_int(seed, "seed")
        return [(first + i) % 2**64 for i in range(batch)]
    seeds = [_seed_int(s, f"seed[{i}]") for i, s in enumerate(seed)]
    if len(seeds) != batch:
        raise ValueError(f"seed must hold one seed per sample: got {len(seeds)} seeds for batch {batch}")
    return seeds


def seed_bits(seeds: Sequence[int]) -> list[int]:
    """uint64 seeds (ints in [0, 2**64), as :func:`normalize_seeds` gives them) as the int64 values with the same
    bits: what an int64 tensor holds and the kernels read back as uint64."""
    return [v - 2**64 if v >= 2**63 else v for v in seeds]


def seed_tensor(seed: Tensor, batch: int) -> Tensor:
    """:func:`normalize_seeds` of a seed tensor without leaving it: the (batch,) int64 tensor holding the bits of
    the per-sample seeds, on the seed's device (no host synchronisation, and torch.compile traces it as a graph
    input instead of specialising on its values)."""
    _check_seed_tensor(seed, batch)
    s = seed.to(torch.int64).reshape(-1)
    if seed.dim() == 0:  # one seed s: sample i gets s + i (wraps mod 2**64)
        s = s + torch.arange(batch, device=seed.device, dtype=torch.int64)
    return s


def step_seeds(seed: int | Sequence[int] | Tensor, batch: int) -> list[int] | Tensor:
    """The seeds a step takes: :func:`normalize_seeds`, except that a seed tensor stays one (:func:`seed_tensor`):
    its values are never read on the host (no wait for the device, docs/design.md §2.9; traced, a graph input
    rather than constants of the graph).  Every int64 value is a valid seed, so nothing is left unchecked."""
    if isinstance(seed, Tensor):
        return seed_tensor(seed, batch)
    return normalize_seeds(seed, batch)


def _seed_keys(seed: int | Sequence[int] | Tensor, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Philox keys (seed_lo, seed_hi) as int64 tensors of shape [batch, 1]; a seed tensor stays on its
    device (no host synchronization)."""
    if isinstance(seed, Tensor):
        s = seed_tensor(seed, batch).to(device).reshape(batch, 1)
    else:
        s = torch.tensor(seed_bits(normalize_seeds(seed, batch)), dtype=torch.int64, device=device).reshape(batch, 1)
    return s & MASK32, (s >> 32) & MASK32


def normal(
    shape: Sequence[int],
    seed: int | Sequence[int] | Tensor,
    step: int,
    draw: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    noise_slice: NoiseSlice | None = None,
) -> Tensor:
    """Standard normal noise of ``shape`` by the docs/design.md §2.8 definition (see the module docstring).

    ``shape[0]`` is the batch B; element j counts over the flattened remaining dims of each sample.  With
    ``noise_slice`` (a :class:`NoiseSlice`), ``shape`` is a slice's and element j takes the noise of the sample's
    element ``noise_slice.index(j)`` (any slice: groups need not stay whole here).
    ``seed``: one int s (sample i gets s + i), or a sequence / integer tensor of B ints (``normalize_seeds``).
    ``step`` (the step index) and ``draw`` (the draw within the step) are ints in [0, 2**32).
    Computed in float32, then cast to ``dtype``; on ``device`` (default: the default device).
    Writes N elements; int64 and float32 temporaries take a few tens of bytes per element.
    """
    if isinstance(shape, (int, Tensor)) or not isinstance(shape, Sequence):
        raise TypeError(f"shape must be a sequence of ints, got {type(shape).__name__}")
    shape = tuple(_validate.index(f"shape[{i}]", d, 2**63) for i, d in enumerate(shape))
    if not shape:
        raise ValueError("shape must have at least one dim (the batch)")
    step = _validate.index("step", step, 2**32)
    draw = _validate.index("draw", draw, 2**32)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if device is None:  # torch.get_default_device exists from PyTorch 2.3 on
        device = getattr(torch, "get_default_device", lambda: torch.device("cpu"))()
    device = torch.device(device)
    batch, n = shape[0], math.prod(shape[1:])
    if noise_slice is not None:
        noise_slice = None if check_slice(noise_slice, n).whole else noise_slice
    key0, key1 = _seed_keys(seed, batch, device)
    if noise_slice is None or noise_slice.groups_whole:
        g = torch.arange((n + 3) // 4, dtype=torch.int64, device=device)
        out = group_normals(key0, key1, g if noise_slice is None else noise_slice.group(g), step, draw)[:, :n]
    else:  # runs that split groups: each run's groups, then its elements picked out of them
        sl = noise_slice
        starts = sl.index(torch.arange(n // sl.local, dtype=torch.int64, device=device) * sl.local)  # [runs]
        ng = (sl.local + 3) // 4 + 1  # groups covering a run of `local` elements, whatever its start mod 4
        g = (starts // 4)[:, None] + torch.arange(ng, dtype=torch.int64, device=device)[None, :]  # [runs, ng]
        normals = group_normals(key0[:, :, None], key1[:, :, None], g[None], step, draw)  # [B, runs, 4 ng]
        idx = (starts % 4)[:, None] + torch.arange(sl.local, dtype=torch.int64, device=device)[None, :]
        out = normals.gather(2, idx[None].expand(batch, -1, -1)).reshape(batch, n)
    return out.reshape(shape).to(dtype)


def group_normals(key0: Tensor | int, key1: Tensor | int, g: Tensor, step: int, draw: int) -> Tensor:
    """The four float32 normals of each Philox group ``g`` (int64, counter (g_lo, g_hi, step, draw)) under the key
    (key0, key1), interleaved: ``[..., 4 * len(g)]``, element j of a sample being number j % 4 of group j // 4.
    :func:`normal` is this over groups 0..; a caller can take any range of a sample's elements (the groups of
    elements lo..hi-1 are lo // 4 .. (hi - 1) // 4)."""
    x = philox4x32(key0, key1, g & MASK32, g >> 32, step, draw)  # 4 x [..., groups]
    u0, u1, u2, u3 = (uint32_to_uniform(v) for v in x)
    n0, n1 = _box_muller(u0, u1)
    n2, n3 = _box_muller(u2, u3)
    return torch.stack((n0, n1, n2, n3), dim=-1).flatten(-2)
