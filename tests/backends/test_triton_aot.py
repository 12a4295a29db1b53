"""The Triton kernels compiled for real GPUs without a GPU (docs/design.md §4): ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` for sm_80 and sm_90, then ``ptxas -v`` on the PTX.

Asserted per specialisation: the compile succeeds, ptxas reports no spill loads or stores, and with 16-byte
aligned pointers (the ``tt.divisibility`` hint a launch on ordinary PyTorch tensors gets) the global loads are
vectorised.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from zsnr_kernels.backends.triton_kernels import combine as C  # noqa: E402

# Triton may emit a newer PTX ISA version than a given ptxas reads ("Unsupported .version"): try the assemblers
# Triton bundles and the CUDA toolkit's, newest first, and use the first that reads the PTX.
_BUNDLED = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTXAS_CANDIDATES = [p for p in (os.path.join(_BUNDLED, "ptxas-blackwell"), shutil.which("ptxas"),
                                os.path.join(_BUNDLED, "ptxas")) if p and os.path.exists(p)]
PTXAS = PTXAS_CANDIDATES[0] if PTXAS_CANDIDATES else None

COMBINE_ARGS = ["y_ptr", "fc_ptr", "fu_ptr", "h0_ptr", "h1_ptr", "h2_ptr", "z_ptr",
                "y_out_ptr", "d_out_ptr", "carry_out_ptr"]
STORAGE = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}

# (storage, N_HIST, GUIDED, RESCALED, STORE_D, STORE_CARRY, NOISE_MODE): the headline step (with and without
# guidance rescale), a multistep one with D stored, LMS with a carry, and the in-kernel Philox path
SPECS = [("fp32", 0, True, True, False, False, 0), ("bf16", 0, True, True, False, False, 0),
         ("bf16", 0, True, False, False, False, 0), ("bf16", 1, False, False, True, False, 0),
         ("fp32", 3, False, False, True, True, 0), ("bf16", 0, False, False, False, False, 2),
         ("fp16", 2, False, False, True, False, 2)]


def _block(storage: str) -> int:
    """The largest block launch_block() picks for this storage (32 bytes per thread and tensor)."""
    return C.launch_block(2**30, 1, 4 if storage == "fp32" else 2, torch.device("cpu"))


def _compile(fn, signature, constexprs, aligned, arch):
    """Compile ``fn`` for sm_``arch``; the arguments named in ``aligned`` get the 16-divisibility hint (16-byte
    aligned pointers, sizes that are multiples of 16) that a launch on ordinary PyTorch tensors gets."""
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature) if name in aligned}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options={"enable_fp_fusion": False})


def _spills(ptx: str, tmp_path) -> tuple[int, int]:
    """Spill bytes (stores, loads) that ptxas -v reports, for the PTX's own .target."""
    target = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    src = tmp_path / "kernel.ptx"
    src.write_text(ptx)
    for ptxas in PTXAS_CANDIDATES:
        out = subprocess.run([ptxas, "-v", f"--gpu-name={target}", "-o", os.devnull, str(src)],
                             capture_output=True, text=True)
        if "Unsupported .version" not in out.stderr:
            break
    assert out.returncode == 0, out.stderr
    stores = sum(int(m) for m in re.findall(r"(\d+) bytes spill stores", out.stderr))
    loads = sum(int(m) for m in re.findall(r"(\d+) bytes spill loads", out.stderr))
    return stores, loads


@pytest.mark.skipif(PTXAS is None, reason="no ptxas (Triton's bundled one or the CUDA toolkit's)")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(map(str, s)))
def test_combine_compiles_without_spills_and_with_vector_loads(spec, arch, tmp_path):
    storage, n_hist, guided, rescaled, store_d, store_carry, noise_mode = spec
    st = STORAGE[storage]
    sig = {"y_ptr": st, "fc_ptr": st, "fu_ptr": st, "h0_ptr": st, "h1_ptr": st, "h2_ptr": st, "z_ptr": st,
           "seed_ptr": "*i64", "coef_ptr": "*fp64", "coef_stride": "i32", "pq_ptr": "*fp32", "y_out_ptr": st,
           "d_out_ptr": st, "carry_out_ptr": st, "n": "i32", "step": "i32", "draw": "i32"}
    consts = dict(N_HIST=n_hist, GUIDED=guided, RESCALED=rescaled, STORE_D=store_d, STORE_CARRY=store_carry,
                  NOISE_MODE=noise_mode, BLOCK=_block(storage))
    sig.update({k: "constexpr" for k in consts})
    aligned = [*COMBINE_ARGS, "seed_ptr", "coef_ptr", "pq_ptr", "n"]
    kernel = _compile(C._combine_kernel, sig, consts, aligned, arch=arch)
    ptx = kernel.asm["ptx"]
    assert _spills(ptx, tmp_path) == (0, 0)
    assert re.search(r"ld\.global(\.[a-z]+)*\.v[24]", ptx), "global loads are not vectorised"


@pytest.mark.skipif(PTXAS is None, reason="no ptxas (Triton's bundled one or the CUDA toolkit's)")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("with_y", [False, True])
def test_rescale_pass_compiles_without_spills(arch, with_y, tmp_path):
    sig = {"y_ptr": "*bf16", "fc_ptr": "*bf16", "fu_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32",
           "coef_ptr": "*fp64", "coef_stride": "i32", "pq_ptr": "*fp32", "n": "i32", "n_blocks": "i32",
           "WITH_Y": "constexpr", "BLOCK": "constexpr", "RBLOCK": "constexpr"}
    consts = {"WITH_Y": with_y, "BLOCK": _block("bf16"), "RBLOCK": 64}
    aligned = ["y_ptr", "fc_ptr", "fu_ptr", "part_ptr", "count_ptr", "coef_ptr", "pq_ptr", "n"]
    kernel = _compile(C._rescale_kernel, sig, consts, aligned, arch=arch)
    ptx = kernel.asm["ptx"]
    assert _spills(ptx, tmp_path) == (0, 0)
    assert re.search(r"ld\.global(\.[a-z]+)*\.v[24]", ptx)
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
def test_runtime_integers_are_not_specialised(kernel):
    """Triton's JIT turns an integer argument equal to 1 into a compile-time Python int (which has no ``.to()``)
    and compiles a variant per such value: step 1 of a noisy run or one element per sample would fail to compile
    on a GPU.  The interpreter never specialises, so only this declaration guards it."""
    fn = getattr(C, kernel)
    integers = [p.name for p in fn.params if not p.is_constexpr and not p.name.endswith("_ptr")]
    assert integers, "no runtime integer parameters found"
    assert sorted(p.name for p in fn.params if p.do_not_specialize) == sorted(integers)
