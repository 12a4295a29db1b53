"""Sampling a latent sharded across processes (zsnr_kernels.distributed, issue 20): the slices of 2 and 3 gloo
processes, gathered, equal the run of one process bit for bit, for every sampler with guidance, guidance rescale and
seeded noise; the parts that make it so (noise at global indices, the row statistics) on their own."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys

import pytest
import torch

import zsnr_kernels as zk
from zsnr_kernels import coefficients as co, distributed as zd, noise as zn
from zsnr_kernels.backends import ext as _ext
from zsnr_kernels.tools import tolerances

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _sharded_cases as C  # noqa: E402
import _sharded_worker as _worker  # noqa: E402

needs_cpu_kernels = pytest.mark.skipif(not _ext.available(), reason="the compiled cpu module is not built")
if not torch.distributed.is_available():
    pytest.skip("this PyTorch build has no torch.distributed", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_world(world: int, outdir) -> dict:
    """Every case of _worker.cases() on ``world`` gloo processes; {case: the slices gathered in rank order}."""
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = os.path.join(HERE, "_sharded_worker.py")
    procs = [subprocess.Popen([sys.executable, script, str(r), str(world), str(port), str(outdir)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(world)]
    logs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append(out.decode(errors="replace"))
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} of {world} failed:\n{logs[r][-4000:]}"
    parts = [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(world)]
    return {case: torch.cat([part[case] for part in parts], dim=C.LATENTS[case.split("/")[0]][1])
            for case in parts[0]}


@pytest.fixture(scope="module")
def gathered(tmp_path_factory):
    """The results of 2 and 3 processes (one run of each world for every test of this module)."""
    return {world: _run_world(world, tmp_path_factory.mktemp(f"world{world}")) for world in (2, 3)}


def _single(case: str, kw: dict, communicate: bool) -> torch.Tensor:
    latent = case.split("/")[0]
    shape, dim, mix = C.LATENTS[latent]
    if "seed" not in kw:
        torch.manual_seed(100)  # rank 0's generator in the workers: its seeds are everyone's
    return zk.sample(C.Model(mix, communicate=communicate, total=C.total(latent)), C.noise(latent), C.sigmas(case),
                     shard_dim=dim, **kw)


CASES = {case: (kw, comm) for case, _, kw, comm in _worker.cases()}


@needs_cpu_kernels
@pytest.mark.parametrize("world", [2, 3])
def test_every_sampler_gathered_equals_one_process_bit_for_bit(gathered, world):
    """cpu backend, fp32, guidance 5 with rescale 0.7 and seeded noise (churn for euler/heun/dpm_2), on a video latent
    sharded along frames, a token latent along tokens and a latent whose rows split the Philox groups (its noise
    drawn beside the step), uneven slices: the gathered slices equal the run of one process (shard_dim, no group)
    bit for bit, so 1, 2 and 3 processes give the same image."""
    bad = []
    for case, (kw, comm) in CASES.items():
        if comm or "/torch/" in case:
            continue
        want = _single(case, kw, comm)
        got = gathered[world][case]
        if not torch.equal(got, want):
            bad.append(f"{case}: max |diff| {(got - want).abs().max().item():.3g}")
    assert not bad, f"{world} processes differ from one:\n" + "\n".join(bad)


@needs_cpu_kernels  # the workers run the cpu cases too
@pytest.mark.parametrize("world", [2, 3])
def test_torch_backend_gathered_equals_one_process(gathered, world):
    """The torch reference backend: within the float32 tolerance of one process (measured: bit for bit here, since
    the reference draws each slice's normals at their global indices (noise.NoiseSlice, groups split or not; the
    EDM churn of a first state from the compiled generator) and its element-wise ops do not depend on the slice)."""
    for case, (kw, comm) in CASES.items():
        if "/torch/" not in case:
            continue
        want = _single(case, kw, comm)
        torch.testing.assert_close(gathered[world][case], want, rtol=0, atol=1e-5, msg=case)


@needs_cpu_kernels
@pytest.mark.parametrize("world", [2, 3])
def test_a_model_that_communicates_runs_the_whole_loop(gathered, world):
    """A stand-in for sequence-parallel attention (each output gets the per-sample mean of y from an all-reduce):
    the loop runs on 2 and 3 processes and gives the image of one process.  The model's own all-reduce sums the
    slices' float64 sums in another order than one process sums the whole, so its output may differ in the last
    bit: compared to float32 rounding of the result, not bit for bit (measured: equal bit for bit here)."""
    for case, (kw, comm) in CASES.items():
        if comm:
            want = _single(case, kw, comm)
            torch.testing.assert_close(gathered[world][case], want, rtol=0, atol=2e-5, msg=case)


@needs_cpu_kernels
@pytest.mark.parametrize("world", [2, 3])
def test_a_sharded_plan_equals_one_process(gathered, world):
    """SamplingPlan(process_group=, shard_dim=) on every rank: its slices, gathered, equal sample() of one process
    (with shard_dim) bit for bit on the cpu backend, seeded or not (an unseeded plan shares rank 0's seeds), and to
    the float32 tolerance on the torch backend; dpmpp_sde's second draw included."""
    planned = [case for case in CASES if "/plan-" in case]
    assert len(planned) == len(C.LATENTS) * (len(_worker.PLANNED) + 3)
    for case in planned:
        kw, comm = CASES[case]
        want = _single(case, kw, comm)
        if "/torch/" in case:
            torch.testing.assert_close(gathered[world][case], want, rtol=0, atol=1e-5, msg=case)
        else:
            assert torch.equal(gathered[world][case], want), case


@needs_cpu_kernels
@pytest.mark.parametrize("world", [2, 3])
def test_unseeded_runs_share_the_first_ranks_seeds(gathered, world):
    """Without seed= each rank's torch generator differs; sample() broadcasts the group's first rank's seeds, so the
    slices still form one image: that of one process with rank 0's generator."""
    for case, (kw, comm) in CASES.items():
        if case.endswith("/unseeded"):
            assert torch.equal(gathered[world][case], _single(case, kw, comm)), case


@needs_cpu_kernels
@pytest.mark.parametrize("latent", list(C.LATENTS))
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_shard_dim_differs_from_the_plain_run_only_by_the_statistics_order(latent, backend):
    """One process with shard_dim against the plain run (no shard_dim): the same but for the order the guidance-
    rescale statistics are summed in (float64 rows against the kernels' float32 chunks, or the reference's float32
    std) and the noise source on the torch backend (compiled generator against the reference, NORMAL_ATOL).
    Measured on these latents: at most 1.4e-6 (cpu) and 4.4e-6 (torch) in a result of unit scale; without guidance
    rescale the cpu runs are equal bit for bit (both draw every normal in the kernel, dpmpp_sde's second draw
    included)."""
    shape, dim, mix = C.LATENTS[latent]
    model, z = C.Model(mix), C.noise(latent)
    for name in co.SAMPLERS:
        kw = dict(sampler=name, seed=C.SEED, backend=backend, **C.GUIDANCE, **C.sampler_options(name))
        plain = zk.sample(model, z, C.SIGMAS, **kw)
        sharded = zk.sample(model, z, C.SIGMAS, shard_dim=dim, **kw)
        torch.testing.assert_close(sharded, plain, rtol=0, atol=2e-5, msg=name)
        if backend == "cpu":
            kw["guidance_rescale"] = 0.0
            assert torch.equal(zk.sample(model, z, C.SIGMAS, shard_dim=dim, **kw),
                               zk.sample(model, z, C.SIGMAS, **kw)), name


def _shard(shape, dim, sizes, rank):
    return zd.Shard(None, dim, tuple(sizes), rank, math.prod(shape[1:dim]), math.prod(shape[dim + 1:]))


@pytest.mark.parametrize("kernel", [True, False], ids=["compiled", "reference"])
def test_slice_noise_is_the_full_noise_at_global_indices(kernel):
    """Each slice's normals are the full latent's at the same places: from the compiled generator bit for bit its
    in-kernel noise, from the reference bit for bit noise.normal's groups (runs that do not start at a multiple of
    4 included: 7 elements per row)."""
    if kernel and not _ext.available():
        pytest.skip("the compiled cpu module is not built")
    full_shape, dim, sizes, seeds, step, draw = (2, 3, 10, 7), 2, (3, 4, 3), [5, 2**64 - 1], 9, 1
    if kernel:
        n = 3 * 10 * 7
        full = torch.empty(2, n)
        for i, s in enumerate(seeds):
            _ext.C.cpu_philox_normals(full[i].data_ptr(), s, step, draw, n)
        full = full.reshape(full_shape)
    else:
        full = zn.normal(full_shape, seeds, step, draw)
    off = 0
    for rank, size in enumerate(sizes):
        local = torch.empty(2, 3, size, 7)
        got = zd.global_normal(_shard(local.shape, dim, sizes, rank), local, seeds, step, draw, kernel=kernel)
        want = full.narrow(dim, off, size)
        if kernel:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=tolerances.NORMAL_ATOL)
        off += size


@needs_cpu_kernels
def test_compiled_noise_of_a_slice_is_the_cpu_kernels_in_kernel_noise():
    """A seeded step on the whole latent with shard_dim (explicit noise from the compiled generator) equals the same
    step drawing its noise in the kernel, bit for bit."""
    shape = (2, 4, 6, 8, 8)
    y, f = torch.zeros(shape), torch.randn(shape, generator=torch.Generator().manual_seed(3))
    a = zk.euler_ancestral_step(y, f, 3.0, 1.0, seed=[11, 2**63 + 5], step_index=7, backend="cpu")
    b = zk.euler_ancestral_step(y, f, 3.0, 1.0, seed=[11, 2**63 + 5], step_index=7, backend="cpu", shard_dim=2)
    assert torch.equal(a.y, b.y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["kernel-pass", "float64-tree"])
def test_row_statistics_do_not_depend_on_how_rows_are_split(dtype):
    """A slice's row statistics are those of the same rows in the whole, bit for bit, on a (1,16,21,60,104) video
    latent under 2 threads: float32 through the cpu kernels' statistics pass (blocks of 6240 elements), float64
    through the pairwise tree (its order depends on the block size only)."""
    if dtype == torch.float32 and not _ext.available():
        pytest.skip("the compiled cpu module is not built")
    g = torch.Generator().manual_seed(1)
    shape = (1, 16, 21, 60, 104)
    y, fc, fu = (torch.randn(shape, generator=g, dtype=dtype) * 3 + 100 for _ in range(3))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for uv in ([(0.0, 1.0)], [(0.4, -0.9)]):
            whole = zd.row_statistics(_shard(shape, 2, (21,), 0), y, fc, fu, 7.5, uv)
            for lo, hi in ((0, 1), (1, 9), (9, 21)):
                part = [t[:, :, lo:hi].contiguous() for t in (y, fc, fu)]
                got = zd.row_statistics(_shard(shape, 2, (lo, hi - lo, 21 - hi), 1), *part, 7.5, uv)
                assert torch.equal(got, whole[:, lo:hi]), (uv, lo, hi)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["kernel-pass", "float64-tree"])
def test_factor_of_the_merged_rows_is_the_std_ratio(dtype):
    """The merged rows give phi std(G_c)/std(G) + 1 - phi (float64 reference: 1e-13 from the float64 tree, float32
    rounding of the terms from the kernel pass); a constant output gives exactly 1."""
    if dtype == torch.float32 and not _ext.available():
        pytest.skip("the compiled cpu module is not built")
    g = torch.Generator().manual_seed(2)
    fc = torch.randn(2, 5, 7, 3, generator=g, dtype=dtype) * 2 + 5
    fu = torch.randn(2, 5, 7, 3, generator=g, dtype=dtype)
    y = torch.randn(2, 5, 7, 3, generator=g, dtype=dtype)
    sh = _shard(y.shape, 2, (7,), 0)
    got = zd.rescale_factors(sh, y, fc, fu, 4.0, 0.7, [(0.3, 0.8), (0.0, 1.0)])
    for b, (u, t) in enumerate([(0.3, 0.8), (0.0, 1.0)]):
        gc = u * y[b].double() + t * fc[b].double()
        gg = u * y[b].double() + t * (fu[b].double() + 4.0 * (fc[b].double() - fu[b].double()))
        want = 0.7 * (gc.std(correction=0) / gg.std(correction=0)).item() + 0.3
        assert abs(got[b] - want) < (1e-13 if dtype == torch.float64 else 1e-6)
    const = torch.full((1, 5, 7, 3), 0.1, dtype=dtype)
    assert zd.rescale_factors(sh, const, const, const * 0.37, 4.0, 0.7, [(0.0, 1.0)]) == [1.0]
    assert zd.rescale_factors(sh, const, const, const * 0.37, 4.0, 0.7, [(0.3, 0.8)]) == [1.0]


def test_arguments_are_checked():
    y = torch.zeros(1, 4, 6)
    f = (y, y)
    with pytest.raises(ValueError, match="non-batch dim"):
        zk.euler_step(y, f, 2.0, 1.0, guidance_scale=2.0, shard_dim=0)
    with pytest.raises(ValueError, match="non-batch dim"):
        zk.euler_step(y, f, 2.0, 1.0, guidance_scale=2.0, shard_dim=3)
    with pytest.raises(TypeError, match="shard_dim must be an int"):
        zk.euler_step(y, f, 2.0, 1.0, guidance_scale=2.0, shard_dim=1.0)
    with pytest.raises(ValueError, match="needs shard_dim"):
        zk.euler_step(y, f, 2.0, 1.0, guidance_scale=2.0, process_group=object())
    with pytest.raises(ValueError, match="non-batch dim"):
        zk.SamplingPlan([float("inf"), 1.0, 0.0], (1, 4, 6), shard_dim=0)
    with pytest.raises(ValueError, match="needs shard_dim"):
        zk.SamplingPlan([float("inf"), 1.0, 0.0], (1, 4, 6), process_group=object())


def test_a_step_with_a_group_whose_layout_is_unknown_refuses_instead_of_communicating():
    """Learning a layout is a collective; whether it is cached is each rank's own business, so a step never learns
    one on its own (one rank's all_gather would pair with another rank's next collective): it refuses with the fix,
    and steps once ``layout(..., refresh=True)`` ran (on every rank, as sample() does)."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        zd.forget_layouts()
        y = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(0))
        f = (torch.randn_like(y), torch.randn_like(y))
        kw = dict(guidance_scale=3.0, guidance_rescale=0.7, process_group=group, shard_dim=2)
        with pytest.raises(ValueError, match="refresh=True"):
            zk.euler_step(y, f, 2.0, 1.0, **kw)
        zd.layout(y, group, 2, refresh=True)
        assert torch.equal(zk.euler_step(y, f, 2.0, 1.0, **kw).y, zk.euler_step(y, f, 2.0, 1.0, **{
            **kw, "process_group": None}).y)
    finally:
        dist.destroy_process_group()
        zd.forget_layouts()
