"""One rank of the sharded-sampling tests: ``python _sharded_worker.py RANK WORLD PORT OUTDIR``.  Joins a gloo group
on 127.0.0.1, runs every case of :func:`cases` on its slices and saves ``{case: local result}`` to
OUTDIR/rank{RANK}.pt."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import _sharded_cases as C  # noqa: E402


#: samplers run by a sharded SamplingPlan too (a case "<latent>/<backend>/plan-<sampler>": the plan's run)
PLANNED = ("euler_ancestral", "dpmpp_sde", "dpmpp_3m_sde", "euler_ancestral_cfg_pp")


def cases():
    """(case name, latent, sample() keyword arguments, communicating model): every sampler on both latents on the cpu
    backend, a few on the torch backend, and the communicating model; and a few run by a sharded SamplingPlan with
    the same arguments (its result is compared with sample()'s of one process)."""
    from zsnr_kernels import coefficients as co

    out = []
    for latent in C.LATENTS:
        for name in co.SAMPLERS:
            kw = dict(sampler=name, seed=C.SEED, backend="cpu", **C.GUIDANCE, **C.sampler_options(name))
            out.append((f"{latent}/cpu/{name}", latent, kw, False))
        for name in ("euler", "dpmpp_2m_sde", "dpmpp_sde", "euler_ancestral_cfg_pp"):
            kw = dict(sampler=name, seed=C.SEED, backend="torch", **C.GUIDANCE, **C.sampler_options(name))
            out.append((f"{latent}/torch/{name}", latent, kw, False))
        kw = dict(sampler="dpmpp_2m_sde", seed=C.SEED, backend="cpu", **C.GUIDANCE)
        out.append((f"{latent}/cpu/communicating-model", latent, kw, True))
        kw = dict(sampler="euler_ancestral", backend="cpu", **C.GUIDANCE)  # no seed: rank 0's, broadcast
        out.append((f"{latent}/cpu/unseeded", latent, kw, False))
        kw = dict(sampler="heun", seed=C.SEED, backend="cpu", s_churn=4.0, **C.GUIDANCE)  # churn of the first state
        out.append((f"{latent}/cpu/churn-from-finite", latent, kw, False))
        for space in ("x0", "v"):  # rescale statistics of G = u y + t F, the weights of combine.h rescale_weights
            kw = dict(sampler="dpmpp_2m", seed=C.SEED, backend="cpu", rescale_space=space, **C.GUIDANCE)
            out.append((f"{latent}/cpu/rescale-{space}", latent, kw, False))
        for backend in ("cpu", "torch"):
            for name in PLANNED if backend == "cpu" else PLANNED[:2]:
                kw = dict(sampler=name, seed=C.SEED, backend=backend, **C.GUIDANCE)
                out.append((f"{latent}/{backend}/plan-{name}", latent, kw, False))
        kw = dict(sampler="dpmpp_sde", backend="cpu", **C.GUIDANCE)  # no seed: the plan shares rank 0's
        out.append((f"{latent}/cpu/plan-unseeded", latent, kw, False))
    return out


def main(rank: int, world: int, port: int, outdir: str) -> None:
    import zsnr_kernels as zk

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        group = dist.group.WORLD
        results = {}
        for case, latent, kw, communicate in cases():
            shape, dim, mix = C.LATENTS[latent]
            model = C.Model(mix, communicate=communicate, group=group, total=C.total(latent))
            if "seed" not in kw:
                torch.manual_seed(100 + rank)  # each rank's generator differs: sample() must agree on rank 0's seeds
            z = C.local_slice(C.noise(latent), latent, world, rank)
            if "/plan-" in case:
                plan = zk.SamplingPlan(C.sigmas(case), z.shape, process_group=group, shard_dim=dim, **kw)
                results[case] = plan.run(model, z)
                continue
            results[case] = zk.sample(model, z, C.sigmas(case), process_group=group, shard_dim=dim, **kw)
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
