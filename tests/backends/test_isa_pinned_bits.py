"""The CPU kernels' bits pinned across machines: steps whose every coefficient is exact on any libm give outputs
whose digests were recorded once (on a CPU with AVX-512 and AVX512-BF16, where every level ran and agreed), and
every instruction set this CPU has must reproduce them.

``tests/backends/test_cpu_backend.py`` compares the levels a CPU has with each other; a CPU without AVX-512 cannot
run that path at all.  The digests close the gap: its AVX2 and baseline loops must give the bits the AVX-512 loops
gave where they were recorded.  The inputs are small dyadic rationals drawn as integers (exact in bf16 and fp16, and
free of PyTorch's ISA-dependent normal sampler), and the sigmas are chosen so that the coefficients are rational with exact
square roots: sigma in {inf, 63/16, 15/8, 3/4, 0} with sigma_data = 1, where sqrt(sigma^2 + 1) is 65/16, 17/8,
5/4 and 1.  What remains is the kernel's own arithmetic (loads, guidance, the rescale statistics and factor, the
combine, the stores), which is what the instruction sets implement.

When a change to the kernels changes these bits on purpose, regenerate the table with
``python tests/backends/test_isa_pinned_bits.py`` and say why in the commit.
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

import zsnr_kernels as zk
from zsnr_kernels.backends import ext as _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason="the compiled CPU module is unavailable")

SHAPE = (2, 3, 17, 13)  # odd sizes: partial vectors and partial chunks
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SIGMAS = (math.inf, 63 / 16, 15 / 8, 3 / 4, 0.0)


def _tensor(gen, dtype):
    return (torch.randint(-127, 128, SHAPE, generator=gen) / 64).to(dtype)  # k/64: exact in every dtype


def _run(dtype) -> str:
    """Digest of a three-step run: Euler from inf with guidance rescale in the output space, Heun (both stages)
    with rescale in v space, Euler to 0 with rescale in x0 space; every y and denoised, in order."""
    gen = torch.Generator().manual_seed(11)
    y = _tensor(gen, dtype)
    out = hashlib.sha256()

    def outputs():  # (cond, uncond)
        return _tensor(gen, dtype), _tensor(gen, dtype)

    guide = {"guidance_scale": 7.5, "guidance_rescale": 0.7, "backend": "cpu"}
    r = zk.euler_step(y, outputs(), SIGMAS[0], SIGMAS[1], rescale_space="output", **guide)
    for t in (r.y, r.denoised):
        out.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    first = zk.heun_step(r.y, outputs(), SIGMAS[1], SIGMAS[2], rescale_space="v", **guide)
    r = zk.heun_step(first.y, outputs(), SIGMAS[1], SIGMAS[2], first=first, rescale_space="v", **guide)
    for t in (first.y, first.denoised, r.y, r.denoised):
        out.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    r = zk.euler_step(r.y, outputs(), SIGMAS[2], SIGMAS[3], rescale_space="x0", **guide)
    r = zk.euler_step(r.y, outputs(), SIGMAS[3], SIGMAS[4], rescale_space="x0", **guide)
    for t in (r.y, r.denoised):
        out.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return out.hexdigest()[:32]


# recorded on x86-64 with AVX-512 + AVX512-BF16 (gcc 12, -O3 -ffp-contract=off), every level agreeing
PINNED = {
    "float32": "0b6de22edbdfc284340c8e8df36dd6e3",
    "bfloat16": "68b3c099613893f139d00f21a2c1e3ae",
    "float16": "1d7887494956314afe9137401ac16260",
}


def _levels() -> list[int]:
    try:
        used = {}
        for level in range(len(_ext.ISA_LEVELS)):
            used.setdefault(_ext.C.cpu_limit_isa(level), level)
        return sorted(used.values())
    finally:
        _ext.restore_isa()


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_instruction_set_gives_the_pinned_bits(dtype):
    got = {}
    try:
        for level in _levels():
            got[_ext.C.cpu_limit_isa(level)] = _run(DTYPES[dtype])
    finally:
        _ext.restore_isa()
    assert all(v == PINNED[dtype] for v in got.values()), (got, PINNED[dtype])


if __name__ == "__main__":
    print({name: _run(dtype) for name, dtype in DTYPES.items()})
