"""One NaN on every backend (combine.h ``canonical_nan``): a NaN output element, whatever the NaN that produced
it, is stored as the positive quiet NaN with a zero payload, what float("nan") is in that dtype.  x86 arithmetic
keeps an input NaN's sign and payload, GPU arithmetic and conversions return 0x7fff(ffff): without the rule the
bits of a NaN output depended on the backend.  The torch reference applies it too (reference.one_nan).  The cuda
kernels follow the same rule (csrc/cuda/step.cu); with no
GPU here they are compiled (tests/backends/test_cuda_nvcc_build.py), not run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import zsnr_kernels as zk
from zsnr_kernels.backends import ext as _ext

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
# the payloads of the model output's NaNs: a signalling-looking payload, a negative quiet NaN, a plain one
NANS32 = (0x7FA12345, -0x400000, 0x7FC00001)  # -0x400000 is 0xffc00000 as int32


def canonical(dtype) -> int:
    return torch.tensor(float("nan"), dtype=dtype).view(BITS[dtype]).item()


def poisoned(dtype):
    """(y, F_c, F_u, D_prev) with NaNs of several payloads in F_c at known places."""
    g = torch.Generator().manual_seed(2)
    y, fc, fu, d = (torch.randn(2, 3, 5, 7, generator=g) for _ in range(4))
    flat = fc.view(-1)
    where = torch.tensor([0, 17, 64, 129, 209])
    payloads = torch.tensor([NANS32[i % 3] for i in range(len(where))], dtype=torch.int32)
    flat[where] = payloads.view(torch.float32)
    return [t.to(dtype) for t in (y, fc, fu, d)], where


def steps(backend, dtype):
    (y, fc, fu, d), _ = poisoned(dtype)
    kw = dict(backend=backend)
    return {
        "euler": zk.euler_step(y, fc, 5.0, 2.0, **kw),
        "euler_guided": zk.euler_step(y, (fc, fu), 5.0, 2.0, guidance_scale=3.0, **kw),
        "dpmpp_2m": zk.dpmpp_2m_step(y, fc, 5.0, 2.0, history=[(7.0, d)], **kw),
        "lms_carry": zk.lms_step(y, fc, 5.0, 2.0, prediction="eps", **kw),
        "ancestral_philox": zk.euler_ancestral_step(y, fc, 5.0, 2.0, seed=3, step_index=1, **kw),
    }


def check(results, dtype):
    _, where = poisoned(dtype)
    nan = canonical(dtype)
    for name, r in results.items():
        for field in ("y", "denoised", "derivative"):
            t = getattr(r, field)
            if t is None:
                continue
            bits = t.reshape(-1).view(BITS[dtype])
            isnan = torch.isnan(t.reshape(-1))
            assert isnan.nonzero().flatten().tolist() == where.tolist(), f"{name}.{field}: NaN at other places"
            got = sorted({hex(v & 0xFFFFFFFF) for v in bits[isnan].tolist()})
            assert got == [hex(nan & 0xFFFFFFFF)], f"{name}.{field} {dtype}: NaN bits {got}, want {hex(nan)}"


@pytest.mark.parametrize("dtype", list(BITS), ids=str)
def test_the_reference_stores_the_one_nan(dtype):
    check(steps("torch", dtype), dtype)


@pytest.mark.skipif(not _ext.available(), reason="zsnr_kernels._C is not built")
@pytest.mark.parametrize("dtype", list(BITS), ids=str)
def test_cpu_stores_the_one_nan(dtype):
    check(steps("cpu", dtype), dtype)


@pytest.mark.skipif(not _ext.available(), reason="zsnr_kernels._C is not built")
def test_triton_stores_the_one_nan():
    pytest.importorskip("triton")
    child = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, sys.argv[1])
        import test_nan_policy as t
        for dtype in t.BITS:
            t.check(t.steps("triton", dtype), dtype)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", child, os.path.dirname(__file__)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
