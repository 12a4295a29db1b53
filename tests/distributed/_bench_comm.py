"""The communication cost of a sharded step (issue 20): ``python tests/distributed/_bench_comm.py [WORLD]`` starts WORLD
(default 2) gloo processes on 127.0.0.1, each holding an uneven slice of the latent, and prints per step: the bytes
of the one collective (all_gather of the guidance-rescale row statistics), its time alone, and the step's own times:
the plain fused step on the rank's slice (no sharding: the kernel's own statistics and in-kernel noise) and the
sharded step (statistics of the full latent, noise at global indices, the collective).  Medians over repetitions,
every repetition started together (a barrier).  Not collected by pytest (a helper of the benchmark)."""

from __future__ import annotations

import math
import os
import socket
import statistics
import subprocess
import sys
import time

CASES = [  # (name, full shape, shard dim)
    ("video (1,16,21,60,104) / frames", (1, 16, 21, 60, 104), 2),
    ("image (1,16,128,128) / rows", (1, 16, 128, 128), 2),
    ("tokens (1,4096,64) / tokens", (1, 4096, 64), 1),
]
REPS = 15


def _median_ms(fn, barrier, reps=REPS):
    fn()
    times = []
    for _ in range(reps):
        barrier()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def worker(rank: int, world: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    import zsnr_kernels as zk
    from zsnr_kernels import distributed as zd

    torch.set_num_threads(1)
    zk.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.group.WORLD
    rows = []
    for name, shape, dim in CASES:
        n = shape[dim]
        sizes = [n // world + (r < n % world) for r in range(world)]
        local = list(shape)
        local[dim] = sizes[rank]
        g = torch.Generator().manual_seed(rank)
        y, fc, fu = (torch.randn(local, generator=g) for _ in range(3))
        kw = dict(guidance_scale=5.0, guidance_rescale=0.7, seed=7, step_index=3, backend="cpu")
        plain = lambda: zk.euler_ancestral_step(y, (fc, fu), 3.0, 1.0, **kw)  # noqa: E731
        sharded = lambda: zk.euler_ancestral_step(y, (fc, fu), 3.0, 1.0, process_group=group,  # noqa: E731
                                                  shard_dim=dim, **kw)
        no_rescale = lambda: zk.euler_ancestral_step(y, (fc, fu), 3.0, 1.0, process_group=group,  # noqa: E731
                                                     shard_dim=dim, **dict(kw, guidance_rescale=0.0))
        shard = zd.layout(y, group, dim)
        b = shape[0]
        stats = torch.zeros(b, max(sizes), zd.STATS_PER_ROW, dtype=torch.float64)
        bufs = [torch.empty_like(stats) for _ in range(world)]
        gather = lambda: dist.all_gather(bufs, stats, group=group)  # noqa: E731
        one = zd.Shard(None, dim, (sizes[rank],), 0, shard.outer, shard.inner)
        factors = lambda: zd.rescale_factors(one, y, fc, fu, 5.0, 0.7, [(0.0, 1.0)])  # noqa: E731
        normals = lambda: zd.global_normal(shard, y, [7], 3)  # noqa: E731
        barrier = lambda: dist.barrier(group=group)  # noqa: E731
        t = {k: _median_ms(f, barrier) for k, f in (("plain", plain), ("sharded", sharded),
                                                      ("sharded_no_rescale", no_rescale), ("all_gather", gather),
                                                      ("stats", factors), ("noise", normals))}
        rows.append((name, sizes, stats.numel() * 8, t))
    if rank == 0:
        with open("/proc/loadavg") as f:
            print(f"loadavg {f.read().split()[:3]}; {world} gloo processes on 127.0.0.1, 1 thread each; medians of "
                  f"{REPS}, ms")
        for name, sizes, nbytes, t in rows:
            print(f"{name}: slices {sizes}; all_gather sends {nbytes} B per rank, receives {nbytes * (world - 1)} B")
            print("   plain step on the slice {plain:.3f} | sharded step {sharded:.3f} (no rescale: "
                  "{sharded_no_rescale:.3f}) | all_gather alone {all_gather:.3f} | row statistics {stats:.3f} | "
                  "noise at global indices {noise:.3f}".format(**t))
            print(f"   all_gather / plain step = {t['all_gather'] / t['plain']:.3f}; sharded / plain = "
                  f"{t['sharded'] / t['plain']:.2f}")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    world = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), str(world), str(port)], env=env)
             for r in range(world)]
    sys.exit(max(p.wait() for p in procs))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank":
        worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
