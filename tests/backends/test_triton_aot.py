"""The Triton kernels compiled for real GPUs without a GPU (docs/design.md §4).

A kernel is compiled here as a launch compiles it: ``combine.launch`` runs on CPU tensors of the shapes users run
while Triton's driver reports a GPU target, and every ``kernel[grid](...)`` it makes becomes
``kernel.run(..., warmup=True)`` (:func:`_as_launched`), so Triton's own binder (``JITFunction.run``) builds the
signature, the specialisation of every argument (the ``tt.divisibility`` hints) and the options, and Triton's JIT
compiles them for that target instead of launching.  Attributes written by hand showed what their author assumed:
this test gave ``n`` the divisible-by-16 hint that ``do_not_specialize`` withheld from every real launch, and passed
while the kernels a launch compiled loaded one element at a time and spilled (issue 16).

Asserted per specialisation: ptxas -v (the AMD code object's own counts on gfx942) reports no spills or scratch,
and the latents are read with 128-bit loads.  Targets: sm_80 and sm_90 for every specialisation, sm_100, sm_120 and
gfx942 for the step that asks the most of the kernel (the one that spilled; each compile costs 0.1-1 s of the CI's
2 cores).

Triton is pinned (pyproject's ``test`` extra): ``JITFunction.run(..., warmup=True)``, its per-device binder cache
``device_caches`` and the driver's ``_active`` slot are internals this file follows from version to version.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import subprocess

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver as _driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from zsnr_kernels.backends.triton_kernels import combine as C  # noqa: E402

# Triton writes the PTX ISA of the assembler it pairs with the target (triton.backends.nvidia.compiler.get_ptxas):
# its bundled ptxas (CUDA 12.9, ISA 8.8) below sm_90 and its bundled ptxas-blackwell (CUDA 13.4, ISA 9.4) from sm_90
# on.  CUDA 13.0's ptxas reads ISA 9.0 at most and rejects 9.4 ("Unsupported .version"; measured on the build
# machine), so ptxas-blackwell, which reads every ISA this Triton writes, is named first; the toolkit's and the older
# bundled one are the fallbacks of a Triton without it, tried in that order until one reads the PTX.
_BUNDLED = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTXAS_CANDIDATES = [p for p in (os.path.join(_BUNDLED, "ptxas-blackwell"), shutil.which("ptxas"),
                                os.path.join(_BUNDLED, "ptxas")) if p and os.path.exists(p)]
PTXAS = PTXAS_CANDIDATES[0] if PTXAS_CANDIDATES else None
requires_ptxas = pytest.mark.skipif(PTXAS is None, reason="no ptxas (Triton's bundled one or the CUDA toolkit's)")
pytestmark = pytest.mark.skipif(not isinstance(C._combine_kernel, JITFunction),
                                reason="TRITON_INTERPRET=1: the kernels are interpreted, not compiled")

TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32),
           "sm_100": GPUTarget("cuda", 100, 32), "sm_120": GPUTarget("cuda", 120, 32),
           "gfx942": GPUTarget("hip", "gfx942", 64)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The latent shapes users run (docs/design.md §5), the video one last: each binds to the same kernels (n is a
# multiple of 16 in all of them)
SHAPES = [(1, 4, 64, 64), (2, 4, 128, 128), (1, 16, 21, 60, 104)]

# (storage, N_HIST, GUIDED, RESCALED, STORE_D, STORE_CARRY, NOISE_MODE): the headline step (with and without
# guidance rescale), a multistep one with D stored, LMS with a carry, the in-kernel Philox path, DPM++ 3M SDE
# (two remembered D, D kept, Philox) and the most a step asks of the kernel (three remembered tensors, guidance
# rescale, D kept, Philox).  Registers of the last two in a launch on sm_90 while n was unspecialised (scalar loads):
# 237, and 255 with 40 bytes spilled; with n's hint 117 and 127 (sm_100: 255 and 48 bytes spilled, then 125).
SPECS = [("fp32", 0, True, True, False, False, 0), ("bf16", 0, True, True, False, False, 0),
         ("bf16", 0, True, False, False, False, 0), ("bf16", 1, False, False, True, False, 0),
         ("fp32", 3, False, False, True, True, 0), ("bf16", 0, False, False, False, False, 2),
         ("fp16", 2, False, False, True, False, 2), ("bf16", 2, True, False, True, False, 2),
         ("bf16", 3, True, True, True, False, 2)]
HEAVIEST = SPECS[-1]


class _Driver:
    """Triton's active driver, as far as ``JITFunction.run(..., warmup=True)`` asks: a GPU of ``target``."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0


Launched = collections.namedtuple("Launched", "name grid specialization kernel")


@contextlib.contextmanager
def _as_launched(target: GPUTarget, *, compile: bool = True):
    """Inside, ``kernel[grid](*args, **kwargs)`` binds its arguments with the kernel's own binder and (``compile``)
    compiles what a launch on a GPU of ``target`` would compile, and launches nothing.  Yields the list of
    :data:`Launched`, one per launch: the kernel's name, the grid asked for, the binder's specialisation (one
    ``(type, hint)`` per parameter) and the compiled kernel (or None)."""
    launched = []

    def getitem(fn, grid):
        def launch(*args, **kwargs):
            binder = fn.device_caches[_driver.active.get_current_device()][-1]
            _, specialization, _ = binder(*args, **kwargs)
            kernel = fn.run(*args, grid=grid, warmup=True, **kwargs) if compile else None
            launched.append(Launched(fn.fn.__name__, grid, dict(zip(fn.arg_names, specialization)), kernel))
        return launch

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_driver, "_active", _Driver(target))
        mp.setattr(JITFunction, "__getitem__", getitem)
        for fn in (C._combine_kernel, C._rescale_kernel):  # binders and kernels of this target only
            mp.setattr(fn, "device_caches", collections.defaultdict(fn.create_binder))
        yield launched


def _launch(spec, shape, *, with_y=False, step_index=0):
    """combine.launch of one step of ``spec`` on CPU tensors of ``shape`` (their values are never read)."""
    storage, n_hist, guided, rescaled, store_d, store_carry, noise_mode = spec
    new = lambda: torch.empty(shape, dtype=DTYPES[storage])  # noqa: E731
    C.launch(new(), new(), new() if guided else None, [new() for _ in range(n_hist)],
             torch.zeros((1, C.NUM_COEFFS), dtype=torch.float64), n_hist=n_hist, rescale=rescaled, with_y=with_y,
             noise_mode=noise_mode, noise=new() if noise_mode == 1 else None,
             seeds=torch.zeros(shape[0], dtype=torch.int64) if noise_mode == 2 else None, step_index=step_index,
             y_out=new(), d_out=new() if store_d else None, carry_out=new() if store_carry else None)


def _compiled(spec, target_name, *, with_y=False) -> dict:
    """{kernel name: :data:`Launched`} of ``spec``'s launches, as compiled for each of SHAPES (the same kernels for
    all)."""
    kernels = None
    with _as_launched(TARGETS[target_name]) as launched:
        for shape in SHAPES:
            launched.clear()
            _launch(spec, shape, with_y=with_y)
            got = {r.name: r for r in launched}
            assert kernels is None or ({k: r.kernel.hash for k, r in got.items()}
                                       == {k: r.kernel.hash for k, r in kernels.items()}), \
                f"{shape} binds to other kernels than {SHAPES[0]}"
            kernels = got
    return kernels


def _ptxas(ptx: str, tmp_path) -> dict:
    """What ptxas -v reports for the PTX's own .target: registers, spill stores and loads (bytes)."""
    target = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    src = tmp_path / "kernel.ptx"
    src.write_text(ptx)
    for ptxas in PTXAS_CANDIDATES:
        out = subprocess.run([ptxas, "-v", f"--gpu-name={target}", "-o", os.devnull, str(src)],
                             capture_output=True, text=True)
        if "Unsupported .version" not in out.stderr:
            break
    assert out.returncode == 0, out.stderr
    return {"registers": max(int(m) for m in re.findall(r"Used (\d+) registers", out.stderr)),
            "spill_stores": sum(int(m) for m in re.findall(r"(\d+) bytes spill stores", out.stderr)),
            "spill_loads": sum(int(m) for m in re.findall(r"(\d+) bytes spill loads", out.stderr)),
            "scratch": 0}


def _amdgcn(asm: str) -> dict:
    """The AMD code object's registers, spills and scratch (its metadata, as the compiler wrote it)."""
    get = lambda key: max(int(m) for m in re.findall(rf"\.{key}:\s+(\d+)", asm))  # noqa: E731
    return {"registers": get("vgpr_count"), "spill_stores": get("vgpr_spill_count") + get("sgpr_spill_count"),
            "spill_loads": 0, "scratch": get("private_segment_fixed_size")}


def _resources(kernel, tmp_path) -> dict:
    return _amdgcn(kernel.asm["amdgcn"]) if "amdgcn" in kernel.asm else _ptxas(kernel.asm["ptx"], tmp_path)


# Global loads in PTX and AMDGCN: 128-bit ones (the rescale fold's .cg reads of the partials aside), and scalar
# 16-bit ones
VECTOR_LOAD = re.compile(r"ld\.global(\.(?!cg)\w+)*\.v4\.b32|(global|buffer)_load_dwordx4")
SCALAR16_LOAD = re.compile(r"ld\.global(\.(?!v\d)\w+)*\.b16|(global|buffer)_load_(u?short|d16)")


def _assert_latents_loaded_by_vectors(r: Launched, tensors: int, scalar16: int = 0):
    """Each of the ``tensors`` latents a program reads comes in 128-bit loads, BLOCK * element size / 16 bytes over
    the program's threads (2 per thread at 32 bytes per thread and tensor), and no other load is 16 bits wide but
    ``scalar16`` (the rescale pass's pivots, one element per tensor)."""
    k = r.kernel
    asm = k.asm.get("amdgcn") or k.asm["ptx"]
    block = r.specialization["BLOCK"][1]
    element_size = torch.empty(0, dtype=DTYPES[r.specialization["y_ptr"][0][1:]]).element_size()
    per_tensor = block * element_size // (16 * k.metadata.num_warps * k.metadata.target.warp_size)
    assert len(VECTOR_LOAD.findall(asm)) == tensors * per_tensor, f"{r.name}: loads are not all 128 bits wide"
    assert len(SCALAR16_LOAD.findall(asm)) == scalar16, f"{r.name}: scalar 16-bit loads"


def _check(spec, target_name, tmp_path):
    _, n_hist, guided, rescaled, _, _, noise_mode = spec
    kernels = _compiled(spec, target_name)
    assert set(kernels) == ({"_rescale_kernel", "_combine_kernel"} if rescaled else {"_combine_kernel"})
    for name, r in kernels.items():
        res = _resources(r.kernel, tmp_path)
        assert (res["spill_stores"], res["spill_loads"], res["scratch"]) == (0, 0, 0), f"{name} on {target_name}: {res}"
    # y, F_c, F_u, the history, the noise tensor
    _assert_latents_loaded_by_vectors(kernels["_combine_kernel"], 2 + guided + n_hist + (noise_mode == 1))


@requires_ptxas
@pytest.mark.parametrize("target_name", ["sm_80", "sm_90"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(map(str, s)))
def test_combine_compiles_as_launched_without_spills_and_with_vector_loads(spec, target_name, tmp_path):
    _check(spec, target_name, tmp_path)


@requires_ptxas
@pytest.mark.parametrize("target_name", ["sm_100", "sm_120", "gfx942"])
def test_heaviest_step_compiles_for_newer_targets(target_name, tmp_path):
    """Blackwell (data centre and consumer) and AMD MI300: the step with the most live values, its rescale pass
    included, without spills or scratch (gfx942 needs no ptxas, but shares the skip)."""
    _check(HEAVIEST, target_name, tmp_path)


@requires_ptxas
@pytest.mark.parametrize("target_name", ["sm_80", "sm_90"])
@pytest.mark.parametrize("with_y", [False, True])
def test_rescale_pass_compiles_without_spills(target_name, with_y, tmp_path):
    r = _compiled(("bf16", 0, True, True, False, False, 0), target_name, with_y=with_y)["_rescale_kernel"]
    ptx = r.kernel.asm["ptx"]
    assert _ptxas(ptx, tmp_path)["spill_stores"] == 0
    _assert_latents_loaded_by_vectors(r, 2 + with_y, scalar16=2 + with_y)  # F_c, F_u (, y) and their pivots
    # the last-block fold: the block's partials are written (bar.sync) before a device-scope acquire-release
    # ticket, and the last block reads every partial from L2 (.cg), never a stale L1 line
    assert "bar.sync" in ptx
    assert re.search(r"atom\.global\.gpu\.acq_rel\.add", ptx)
    assert re.search(r"ld\.global\.cg", ptx)


def test_launch_block_heuristic(monkeypatch):
    """32 bytes per thread and tensor on large latents; smaller blocks while the grid would underfill the GPU."""
    cpu = torch.device("cpu")
    assert C.launch_block(10**7, 1, 4, cpu) == 1024 and C.launch_block(10**7, 1, 2, cpu) == 2048
    monkeypatch.setattr(C, "_sm_count", lambda device: 132)  # an H100
    assert C.launch_block(4 * 64 * 64, 1, 4, cpu) == C.MIN_BLOCK            # (1, 4, 64, 64): 64 programs at most
    assert C.launch_block(4 * 128 * 128, 8, 4, cpu) == 512                 # (8, 4, 128, 128): 1024 programs
    assert C.launch_block(16 * 21 * 60 * 104, 1, 2, cpu) == C.MAX_BLOCK    # the video latent in bf16


@pytest.mark.parametrize("kernel", ["_combine_kernel", "_rescale_kernel"])
def test_runtime_integers_but_n_are_not_specialised(kernel):
    """Triton's JIT turns an integer argument equal to 1 into a compile-time Python int (which has no ``.to()``)
    and compiles a variant per such value: step 1 of a noisy run would fail to compile on a GPU, so the step, the
    draw, the table's row stride and the block count are declared unspecialised.  ``n`` is the exception: its
    divisible-by-16 hint is what lets the loads of a sample's elements be 128 bits wide (the kernels take n = 1 as
    a Python int, test_odd_element_counts_compile).  The interpreter never specialises, so only this declaration
    and the binder test below guard it."""
    fn = getattr(C, kernel)
    integers = [p.name for p in fn.params if not p.is_constexpr and not p.name.endswith("_ptr")]
    assert "n" in integers
    assert sorted(p.name for p in fn.params if p.do_not_specialize) == sorted(set(integers) - {"n"})


def test_the_binder_gives_n_its_hint_and_leaves_step_one_a_runtime_integer():
    """What Triton's binder makes of a launch at step 1: n (a multiple of 16) gets the divisibility hint, every
    pointer too (PyTorch's allocations are 16-byte aligned), and the step stays an i32 argument."""
    spec = ("bf16", 2, True, True, True, False, 2)
    with _as_launched(TARGETS["sm_90"], compile=False) as launched:
        _launch(spec, SHAPES[0], step_index=1)
    for r in launched:
        s = r.specialization
        assert s["n"] == ("i32", "D"), (r.name, s["n"])
        assert all(hint == "D" for name, (_, hint) in s.items() if name.endswith("_ptr")), (r.name, s)
        if "step" in s:
            assert s["step"] == ("i32", None)


@requires_ptxas
@pytest.mark.parametrize("shape", [(3, 1), (3, 7)], ids=["n1", "n7"])
def test_odd_element_counts_compile(shape, tmp_path):
    """n = 1 is bound as the Python int 1 (a constexpr), n = 7 without the hint: both kernels still compile, and
    without spills (n.to(tl.float64) in the rescale fold did not compile at n = 1)."""
    spec = ("fp32", 1, True, True, True, False, 0)
    with _as_launched(TARGETS["sm_90"]) as launched:
        _launch(spec, shape, with_y=True, step_index=1)
    assert {r.name for r in launched} == {"_rescale_kernel", "_combine_kernel"}
    for r in launched:
        assert r.specialization["n"] == (("constexpr", 1) if shape[1] == 1 else ("i32", ""))
        assert _ptxas(r.kernel.asm["ptx"], tmp_path)["spill_stores"] == 0
