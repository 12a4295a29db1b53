"""Philox noise of a slice of a sample drawn by the step itself (issue 20): a latent sharded along one dim holds, per
sample, runs of its slice; the step record carries the slice's place in the sample (``noise.NoiseSlice``: local,
total, offset, csrc/include/zsnr/philox.h ``slice_group``), and every backend's in-kernel noise of a slice is then
the full sample's noise at the same places, bit for bit: cpu (every instruction set), torch (the reference), and
triton under the interpreter.  The slices are the sharded-sampling tests' uneven ones, along frames of (1,4,6,8,8)
and along tokens of (2,16,64).  The CUDA kernel is the same code path (``slice_group`` in the element loop), compiled
by tests/backends/test_cuda_nvcc_build.py.

A slice a step cannot take is refused alike by every backend, on every path (drawing noise or not, ``fused_step`` and
a SamplingPlan's ``table_step``): one check (``backends.call.kernel_slice``; the torch reference's
``noise.check_slice`` is the same less the groups-whole rule), the same exception and message, before any tensor is
written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import zsnr_kernels as zk
from zsnr_kernels import coefficients as co, noise as zn
from zsnr_kernels.backends import call as _call, ext as _ext, registry, table as _table
from zsnr_kernels.parameterization import parameterization
from zsnr_kernels.tools import tolerances

requires_C = pytest.mark.skipif(not _ext.available(), reason=f"zsnr_kernels._C: {_ext.why_unavailable()}")

#: (full latent shape, shard dim, the uneven slices of 2 and 3 ranks)
LATENTS = {
    "frames": ((1, 4, 6, 8, 8), 2, ([4, 2], [1, 2, 3])),
    "tokens": ((2, 16, 64), 1, ([9, 7], [3, 8, 5])),
}
SEEDS, STEP, DRAW = [5, 2**64 - 1], 2**32 - 1, 1


def noise_step(backend: str, shape, noise_slice=None, *, seeds=SEEDS, step=STEP, draw=DRAW) -> torch.Tensor:
    """y_out of a table step whose one nonzero coefficient is e = 1 on y = 0 (y_out = z exactly, in float32): the
    step's in-kernel Philox noise of (seeds, step, draw) for a latent of ``shape`` placed by ``noise_slice``."""
    y = torch.zeros(shape)
    row = [0.0] * _table.NUM_COEFFS
    row[_table.W], row[_table.T], row[_table.E] = 1.0, 1.0, 1.0
    out = torch.empty_like(y)
    registry.module(backend).table_step(
        y, y, None, [], torch.tensor([row], dtype=torch.float64), guidance_scale=1.0, guidance_rescale=0.0,
        rescale_space="output", noise_mode=2, seeds=list(seeds[:shape[0]]), step_index=step, y_out=out, draw=draw,
        noise_slice=noise_slice)
    return out


def slices(latent: str):
    """(world, rank, start, size, local shape, NoiseSlice) of every slice of the 2- and 3-rank splits."""
    shape, dim, splits = LATENTS[latent]
    for sizes in splits:
        start = 0
        for rank, size in enumerate(sizes):
            local = list(shape)
            local[dim] = size
            yield len(sizes), rank, start, size, tuple(local), zn.NoiseSlice.along(local, dim, start, shape[dim])
            start += size


def _check_slices(backend: str, run) -> None:
    for latent, (shape, dim, _) in LATENTS.items():
        full = run(backend, shape)
        assert torch.isfinite(full).all() and full.std() > 0.5
        for world, rank, start, size, local, sl in slices(latent):
            assert sl.groups_whole and not sl.whole
            got = run(backend, local, sl)
            assert torch.equal(got, full.narrow(dim, start, size)), (latent, world, rank, sl)


@requires_C
def test_cpu_slice_noise_is_the_full_noise_at_the_same_places_on_every_instruction_set():
    levels = {}
    try:
        for level in range(len(_ext.ISA_LEVELS)):
            levels.setdefault(_ext.C.cpu_limit_isa(level), level)
        for level in levels.values():
            _ext.C.cpu_limit_isa(level)
            _check_slices("cpu", noise_step)
    finally:
        _ext.restore_isa()


def test_torch_slice_noise_is_the_full_noise_at_the_same_places():
    _check_slices("torch", noise_step)


@requires_C
def test_cpu_in_kernel_slice_noise_is_the_compiled_generators_and_the_references():
    """The in-kernel normals of a slice are ``_C.cpu_philox_normals`` of the slice (what zsnr_kernels.distributed hands
    a step as explicit noise where a kernel cannot draw the slice) bit for bit, and the reference's
    (``noise.normal(..., noise_slice=)``) within NORMAL_ATOL."""
    for latent in LATENTS:
        for _, _, _, _, local, sl in slices(latent):
            got = noise_step("cpu", local, sl)
            n = got[0].numel()
            for b in range(local[0]):
                z = torch.empty(n)
                _ext.C.cpu_philox_normals(z.data_ptr(), SEEDS[b], STEP, DRAW, n, *sl)
                assert torch.equal(got[b].reshape(-1), z)
            ref = zn.normal(local, SEEDS[:local[0]], STEP, DRAW, noise_slice=sl)
            torch.testing.assert_close(got, ref, rtol=0, atol=tolerances.NORMAL_ATOL)


def test_reference_draws_slices_that_split_groups():
    """The reference draws any slice (runs whose start or length is not a multiple of 4): the full noise at the same
    places (to float rounding of log/cos/sin, which PyTorch's loops could round apart by position; measured bit for
    bit here), and what the torch backend's step draws for it, where the compiled kernels would split a group of
    four."""
    full = zn.normal((2, 3, 10, 7), SEEDS, STEP, DRAW)
    start = 0
    for size in (3, 4, 3):
        sl = zn.NoiseSlice.along((2, 3, size, 7), 2, start, 10)
        assert not sl.groups_whole
        got = zn.normal((2, 3, size, 7), SEEDS, STEP, DRAW, noise_slice=sl)
        torch.testing.assert_close(got, full[:, :, start:start + size], rtol=0, atol=tolerances.NORMAL_ATOL)
        assert torch.equal(noise_step("torch", (2, 3, size, 7), sl), got)
        start += size


def test_the_mapping_is_philox_h_slice_group():
    """NoiseSlice.index maps local elements to the sample's; with whole groups, NoiseSlice.group maps local group g
    to the sample's group of its four elements (philox.h ``slice_group``)."""
    sl = zn.NoiseSlice.along((1, 4, 3, 8, 8), 2, 2, 6)
    assert sl == zn.NoiseSlice(3 * 64, 6 * 64, 2 * 64)
    j = torch.arange(4 * 3 * 64)
    full = torch.arange(4 * 6 * 64).view(4, 6, 64)
    assert torch.equal(sl.index(j), full[:, 2:5].reshape(-1))
    g = torch.arange(j.numel() // 4)
    assert torch.equal(sl.group(g), sl.index(4 * g) // 4)
    assert zn.NoiseSlice(8, 8, 0).whole and zn.NoiseSlice(8, 8, 0).group(5) == 5


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=requires_C), "triton"])
def test_a_slice_the_kernels_cannot_draw_is_refused_naming_the_fix(backend):
    """The compiled kernels (cpu, cuda, triton: one check, backends.call.kernel_slice) refuse a slice that splits
    the groups of four, or does not place the step's samples, before anything runs, naming the fix."""
    if backend == "triton":
        pytest.importorskip("triton")
    bad = zn.NoiseSlice(6, 14, 2)  # runs of 6 elements: groups split
    with pytest.raises(ValueError, match="splits the Philox groups.*noise="):
        _call.kernel_slice(bad, 12)
    with pytest.raises(ValueError, match="does not place samples of 12 elements"):
        _call.kernel_slice(zn.NoiseSlice(8, 16, 4), 12)
    with pytest.raises(ValueError, match="does not place samples"):
        _call.kernel_slice(zn.NoiseSlice(8, 8, 4), 16)
    with pytest.raises(TypeError, match="NoiseSlice"):
        _call.kernel_slice((8, 8, 0), 8)
    if backend == "cpu" or os.environ.get("TRITON_INTERPRET") == "1":
        with pytest.raises(ValueError, match="splits the Philox groups"):
            noise_step(backend, (1, 2, 6), bad)
    with pytest.raises(ValueError, match="does not place samples of 12 elements"):
        zn.normal((1, 12), 0, 0, noise_slice=zn.NoiseSlice(8, 16, 4))


TRITON_CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[2])
    import torch
    import test_noise_slice as T

    out = {}
    for latent, (shape, dim, _) in T.LATENTS.items():
        out[latent] = T.noise_step("triton", shape)
        for world, rank, start, size, local, sl in T.slices(latent):
            out[(latent, world, rank)] = T.noise_step("triton", local, sl)
    torch.save(out, sys.argv[1])
    """
)


def test_triton_slice_noise_is_the_full_noise_at_the_same_places(tmp_path):
    """Under TRITON_INTERPRET=1 (a child process: the variable must be set before Triton sees a kernel)."""
    pytest.importorskip("triton")
    path = tmp_path / "out.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", TRITON_CHILD, str(path), os.path.dirname(__file__)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = torch.load(path, weights_only=False)
    for latent, (shape, dim, _) in LATENTS.items():
        full = out[latent]
        assert torch.isfinite(full).all()
        torch.testing.assert_close(full, zn.normal(shape, SEEDS[:shape[0]], STEP, DRAW), rtol=0,
                                   atol=tolerances.NORMAL_ATOL)
        for world, rank, start, size, _, _ in slices(latent):
            assert torch.equal(out[(latent, world, rank)], full.narrow(dim, start, size)), (latent, world, rank)


@pytest.mark.skipif(not _ext.available(), reason="the cpu kernels are not built")
@pytest.mark.parametrize("bad", [(5, 5, 0), (-4, -4, 0), (4, 8, 8), (4, 2**62, 2**63 - 2), (6, 12, 2)])
def test_the_compiled_module_refuses_a_slice_that_does_not_place_the_sample(bad):
    """The C++ check (zsnr/philox.h slice_drawable) on its own, without the Python checks in front of it: L = G with
    O = 0 must divide n, the slice must lie inside its runs (compared without overflow), the groups stay whole."""
    out = torch.empty(16)
    with pytest.raises(ValueError, match="slice_local, slice_total, slice_offset"):
        _ext.C.cpu_philox_normals(out.data_ptr(), 1, 0, 0, 16, *bad)


#: the latent of the refusal tests: samples of n = 24 elements
REFUSE_SHAPE = (2, 3, 8)
#: slices that no step on REFUSE_SHAPE takes (the torch reference takes "splits_groups": it draws any slice)
BAD_SLICES = {
    "tuple": (24, 24, 0),  # a slice is a NoiseSlice (NoiseSlice.along), not its fields
    "float_field": zn.NoiseSlice(8.0, 24, 0),
    "past_its_run": zn.NoiseSlice(8, 16, 12),  # offset + local > total
    "local_not_dividing_n": zn.NoiseSlice(16, 32, 0),
    "empty_runs": zn.NoiseSlice(0, 8, 0),
    "negative_offset": zn.NoiseSlice(8, 24, -8),
    "beyond_int64": zn.NoiseSlice(8, 2**64, 0),  # the step record's fields are int64
    "sample_of_2**63_elements": zn.NoiseSlice(8, 2**62, 0),  # 3 runs of 2**62
    "splits_groups": zn.NoiseSlice(6, 12, 2),  # the compiled kernels' refusal
}
#: a slice every step takes: runs of 8 of 16, the second half
GOOD_SLICE = zn.NoiseSlice(8, 16, 8)
#: the ways a slice reaches a backend: fused_step's (sampler, what it is given), or table_step's noise_mode
REFUSE_PATHS = {
    "philox": ("euler_ancestral", "seeds"),  # draws the slice's noise in the kernel
    "seeded_no_noise": ("euler", "seeds"),  # seeded, adds no noise
    "noise_tensor": ("euler_ancestral", "noise"),  # the noise is given: nothing reads the slice
    "spec_table_philox": ("lcm", "seeds"),  # a sampler the cpu and cuda kernels do not know: the spec's table
    "spec_table_no_noise": ("heun_flow", "seeds"),
    "table_step_0": 0,  # a SamplingPlan's step: noise_mode 0 (none), 1 (a tensor), 2 (Philox)
    "table_step_1": 1,
    "table_step_2": 2,
}


def refusal(backend: str, path: str, noise_slice):
    """Run REFUSE_PATHS[path] on ``backend`` with ``noise_slice``: None if the step ran, else (the exception's type
    name, its message, whether every tensor -- out included, in another layout for fused_step, which a step copies
    back into -- is as it was)."""
    gen = torch.Generator().manual_seed(0)
    y, f, z = (torch.randn(REFUSE_SHAPE, generator=gen) for _ in range(3))
    run = registry.module(backend)
    mode = REFUSE_PATHS[path]
    if isinstance(mode, int):
        row = [0.0] * _table.NUM_COEFFS
        row[_table.W], row[_table.T], row[_table.A], row[_table.E] = 1.0, 1.0, 1.0, float(mode != 0)
        out = torch.full(REFUSE_SHAPE, 7.0)
        call = lambda: run.table_step(  # noqa: E731
            y, f, None, [], torch.tensor([row], dtype=torch.float64), guidance_scale=1.0, guidance_rescale=0.0,
            rescale_space="output", noise_mode=mode, noise=z if mode == 1 else None,
            seeds=SEEDS if mode == 2 else None, step_index=STEP, y_out=out, draw=DRAW, noise_slice=noise_slice)
    else:
        sampler, given = mode
        out = torch.full((2, 8, 3), 7.0).transpose(1, 2)  # REFUSE_SHAPE in another layout
        call = lambda: run.fused_step(  # noqa: E731
            y, f, None, [], parameterization("eps", 1.0), [co.StepArgs(sampler, 5.0, 2.0)], [5.0],
            guidance_scale=1.0, guidance_rescale=0.0, rescale_space="output", noise=z if given == "noise" else None,
            seeds=SEEDS if given == "seeds" else None, step_index=STEP, want_denoised=False, out=out, draw=DRAW,
            noise_slice=noise_slice)
    tensors = (y, f, z, out)
    before = [t.clone() for t in tensors]
    try:
        call()
    except (TypeError, ValueError) as exc:
        return type(exc).__name__, str(exc), all(torch.equal(t, b) for t, b in zip(tensors, before))
    return None


def raised(check, noise_slice):
    """(type name, message) of what ``check(noise_slice, n)`` raises for REFUSE_SHAPE's samples, or None."""
    try:
        check(noise_slice, 24)
    except (TypeError, ValueError) as exc:
        return type(exc).__name__, str(exc)
    return None


@pytest.fixture
def cuda_stand_in(cuda_on_cpu):
    """The cuda backend's host side on CPU tensors (tests/conftest.py ``CudaOnCpu``): a refused step reaches no
    launch."""
    return cuda_on_cpu


TRITON_REFUSALS_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[2])
    import test_noise_slice as T

    slices = {**T.BAD_SLICES, "good": T.GOOD_SLICE}
    json.dump({f"{bad}/{path}": T.refusal("triton", path, sl) for bad, sl in slices.items() for path in T.REFUSE_PATHS},
              open(sys.argv[1], "w"))
    """
)


@pytest.fixture(scope="module")
def triton_refusals(tmp_path_factory):
    """:func:`refusal` of every bad slice (and GOOD_SLICE) on every path of the triton backend, under
    TRITON_INTERPRET=1 (one child process: the variable must be set before Triton sees a kernel), keyed
    ``"{bad}/{path}"``; lists for tuples (JSON)."""
    pytest.importorskip("triton")
    path = tmp_path_factory.mktemp("triton_refusals") / "out.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", TRITON_REFUSALS_CHILD, str(path), os.path.dirname(__file__)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(path.read_text())


def _outcomes(backend: str, bad: str, paths, request) -> dict:
    """{path: refusal (a list, as JSON gives it)} of slice ``bad`` (or "good": GOOD_SLICE) on ``backend``."""
    if backend == "triton":
        results = request.getfixturevalue("triton_refusals")
        return {p: results[f"{bad}/{p}"] for p in paths}
    sl = GOOD_SLICE if bad == "good" else BAD_SLICES[bad]
    outcomes = {}
    for p in paths:
        r = refusal(backend, p, sl)
        outcomes[p] = None if r is None else list(r)
    return outcomes


BACKENDS = [pytest.param("cpu", marks=requires_C), "cuda", "triton", "torch"]


@pytest.mark.parametrize("bad", list(BAD_SLICES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_refuses_a_bad_slice_alike_on_every_path(backend, bad, request):
    """The compiled backends (cpu, cuda's host side up to the launch, triton interpreted) refuse each bad slice on
    every path -- fused_step drawing noise, seeded without noise, given a noise tensor, from the spec's table, and a
    SamplingPlan's table_step in each noise mode -- with backends.call.kernel_slice's exception and message, before
    they touch a tensor.  The torch reference refuses it alike, except a slice that splits the groups of four, which
    it draws (docs/design.md §2.8)."""
    if backend == "cuda":
        stand_in = request.getfixturevalue("cuda_stand_in")
    paths = list(REFUSE_PATHS)
    want = None if backend == "torch" and bad == "splits_groups" else raised(_call.kernel_slice, BAD_SLICES[bad])
    got = _outcomes(backend, bad, paths, request)
    assert got == {p: None if want is None else [*want, True] for p in paths}
    if want is not None:
        assert raised(zn.check_slice, BAD_SLICES[bad]) == (None if bad == "splits_groups" else want)
    if backend == "cuda":
        assert stand_in.calls == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_slice_that_places_the_sample_runs_on_every_path(backend, request):
    """The control of the refusals: GOOD_SLICE runs on every path of every backend (what refuses a bad slice is the
    slice check, not the step)."""
    if backend == "cuda":
        stand_in = request.getfixturevalue("cuda_stand_in")
    assert _outcomes(backend, "good", list(REFUSE_PATHS), request) == dict.fromkeys(REFUSE_PATHS)
    if backend == "cuda":
        assert len(stand_in.calls) == len(REFUSE_PATHS)


def test_an_empty_slice_steps():
    """A rank holding none of an uneven split (a slice of zero elements along the shard dim) steps, seeded or not:
    there is nothing to place."""
    y = torch.zeros(2, 0, 8)
    assert zn.check_slice(zn.NoiseSlice(0, 0, 0), 0) == (0, 0, 0)
    for step in (zk.euler_step, zk.euler_ancestral_step):
        assert step(y, y, 5.0, 1.0, seed=1, step_index=0, shard_dim=1).y.shape == (2, 0, 8)
