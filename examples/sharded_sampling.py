"""Sampling a video latent sharded across processes along its frames (sequence parallelism), on CPU with gloo.

    torchrun --nproc-per-node 2 examples/sharded_sampling.py        (any number of processes; 1 works too)

Each rank holds a slice of the (1, 4, 9, 32, 32) latent along frames (uneven: 9 frames on 2 ranks are 5 + 4) and
runs ``zsnr_kernels.sample`` on it with guidance, guidance rescale and seeded SDE noise.  The model stands in for a
sequence-parallel network: it mixes channels and pixels locally and all-reduces a per-sample mean over the whole
latent (what attention across frames would exchange).  Rank 0 gathers the slices and checks them against the run of
one process holding the whole latent.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist

import zsnr_kernels as zk

SHAPE, FRAMES_DIM = (1, 4, 9, 32, 32), 2
SIGMAS = [math.inf, 14.6, 5.0, 2.0, 0.8, 0.3, 0.0]
OPTIONS = dict(sampler="dpmpp_2m_sde", guidance_scale=7.5, guidance_rescale=0.7, seed=2024)


class Model:
    """(F_cond, F_uncond) of a small fixed network; ``group``: the all-reduce of a sequence-parallel model."""

    def __init__(self, group=None):
        self.group = group
        g = torch.Generator().manual_seed(0)
        self.w_cond = torch.randn(4, 4, generator=g) / 2
        self.w_uncond = torch.randn(4, 4, generator=g) / 2

    def _one(self, y, sigma, w):
        feat = torch.atan(sigma).float().reshape(-1, 1, 1, 1, 1)
        z = torch.einsum("ij,bjfhw->bifhw", w, y) + 0.2 * torch.roll(y, 1, dims=-1)
        total = y.double().sum(dim=(1, 2, 3, 4))  # the per-sample mean over the full latent
        if self.group is not None:
            dist.all_reduce(total, group=self.group)
        mean = (total / math.prod(SHAPE[1:])).float().reshape(-1, 1, 1, 1, 1)
        return torch.tanh(z + 0.3 * y * torch.cos(feat)) + 0.5 * mean

    def __call__(self, y, sigma):
        return self._one(y, sigma, self.w_cond), self._one(y, sigma, self.w_uncond)


def main() -> None:
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")  # torchrun's environment: rank, world size, address
        rank, world = dist.get_rank(), dist.get_world_size()
        group = dist.group.WORLD
    else:
        rank, world, group = 0, 1, None
    torch.set_num_threads(1)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    frames = SHAPE[FRAMES_DIM]
    sizes = [frames // world + (r < frames % world) for r in range(world)]
    mine = noise.narrow(FRAMES_DIM, sum(sizes[:rank]), sizes[rank]).contiguous()

    x0 = zk.sample(Model(group), mine, SIGMAS, process_group=group, shard_dim=FRAMES_DIM, **OPTIONS)

    if distributed:
        parts = [None] * world
        dist.all_gather_object(parts, x0)
    else:
        parts = [x0]
    if rank == 0:
        full = torch.cat(parts, dim=FRAMES_DIM)
        one = zk.sample(Model(), noise, SIGMAS, shard_dim=FRAMES_DIM, **OPTIONS)  # one process, the whole latent
        print(f"{world} process(es), frames per rank {sizes}: x0 {tuple(full.shape)}, "
              f"equal to one process bit for bit: {torch.equal(full, one)} "
              f"(max |diff| {(full - one).abs().max().item():.3g})")
    if distributed:
        dist.barrier()  # every rank leaves together (a rank exiting while rank 0 still checks can abort gloo)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
