"""Shared by the sharded-sampling tests and their worker processes: the latents, the models, the samplers' options
and the slices each rank holds.  Everything here is deterministic and element-wise along the shard dim, so a rank
computes its slice of the model output exactly as one process computes the whole (the tests compare bits)."""

from __future__ import annotations

import math

import torch

#: (name, latent shape, shard dim, the dims the model mixes)
LATENTS = {
    "frames": ((1, 4, 6, 8, 8), 2, (1, 3, 4)),   # a video latent (B, C, F, H, W) sharded along frames
    "tokens": ((2, 16, 64), 1, (2,)),            # a token latent (B, T, C) sharded along tokens
    # rows of 7 elements: a slice's runs split the Philox groups of four, so the kernels cannot draw its noise and
    # the step takes it as a tensor (zsnr_kernels.distributed.kernel_noise_slice)
    "odd": ((2, 3, 10, 7), 2, (1, 3)),
}
#: the slices of each world size, in rank order (uneven)
SPLITS = {
    "frames": {1: [6], 2: [4, 2], 3: [1, 2, 3]},
    "tokens": {1: [16], 2: [9, 7], 3: [3, 8, 5]},
    "odd": {1: [10], 2: [6, 4], 3: [3, 4, 3]},
}
SIGMAS = [math.inf, 8.0, 2.5, 0.9, 0.3, 0.0]
#: a finite start, where churn noises the first state too (steps.churn_step)
FINITE_SIGMAS = [20.0, 8.0, 2.5, 0.9, 0.3, 0.0]


def sigmas(case: str) -> list:
    return FINITE_SIGMAS if case.endswith("-from-finite") else SIGMAS
GUIDANCE = dict(guidance_scale=5.0, guidance_rescale=0.7)
SEED = 1234


def sampler_options(name: str) -> dict:
    """Options that make every sampler use what it has: churn noise for euler/heun/dpm_2, eta for the others."""
    opts = {}
    if name in ("euler", "heun", "dpm_2"):
        opts.update(s_churn=2.0, s_tmin=0.0, s_tmax=100.0)
    return opts


def noise(latent: str) -> torch.Tensor:
    shape = LATENTS[latent][0]
    return torch.randn(shape, generator=torch.Generator().manual_seed(7))


def local_slice(t: torch.Tensor, latent: str, world: int, rank: int) -> torch.Tensor:
    _, dim, _ = LATENTS[latent]
    sizes = SPLITS[latent][world]
    off = sum(sizes[:rank])
    return t.narrow(dim, off, sizes[rank]).contiguous()


class Model:
    """A guided model F(y, sigma) -> (F_cond, F_uncond) that mixes the latent along ``mix`` dims (never the shard
    dim) by shifts, element-wise otherwise: on a slice along the shard dim it computes the slice of the whole's
    output bit for bit.  With ``group`` set (a stand-in for sequence-parallel attention) each output also gets a
    per-sample mean of y over the full latent, from an all-reduce of the slices' float64 sums."""

    def __init__(self, mix, *, communicate: bool = False, group=None, total: int | None = None):
        self.mix, self.communicate, self.group, self.total = tuple(mix), communicate, group, total

    def _one(self, y, feat, a, b, c):
        z = a * y
        for k, d in enumerate(self.mix):
            z = z + b * torch.roll(y, 1 + k, dims=d) - c * torch.roll(y, -2 - k, dims=d)
        out = torch.tanh(z + 0.3 * y * torch.cos(feat)) + 0.1 * torch.sin(3 * feat)
        if self.communicate:
            dims = tuple(range(1, y.ndim))
            s = y.to(torch.float64).sum(dim=dims)
            if self.group is not None:
                import torch.distributed as dist

                dist.all_reduce(s, group=self.group)
            mean = (s / self.total).to(y.dtype).reshape((-1,) + (1,) * (y.ndim - 1))
            out = out + 0.5 * mean
        return out

    def __call__(self, y, sigma):
        feat = torch.atan(sigma.to(torch.float64)).to(y.dtype).reshape((-1,) + (1,) * (y.ndim - 1))
        return self._one(y, feat, 0.9, 0.3, 0.2), self._one(y, feat, 0.7, 0.1, 0.25)


def total(latent: str) -> int:
    """Non-batch elements of a sample of the full latent."""
    return math.prod(LATENTS[latent][0][1:])
