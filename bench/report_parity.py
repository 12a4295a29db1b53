"""Print the max abs difference between zsnr_kernels.sample and k-diffusion's sample_* (12 steps, SD discrete and
Karras sigmas, float64 and float32): the figures behind tests/math/test_samplers_vs_k_diffusion.py.

    python bench/report_parity.py      (needs k-diffusion: pip install --no-deps k-diffusion==0.1.1.post1)
"""

import os
import sys

import torch

# The figures behind a test come from that test's own set-up (its model, schedules and noise), imported from tests/:
# a copy here could drift from what the test checks.
TESTS = os.path.join(os.path.dirname(__file__), "..", "tests")
sys.path[:0] = [TESTS, os.path.join(TESTS, "math")]
import _kdiffusion  # noqa: E402
from test_samplers_vs_k_diffusion import ALL_KD, NOISY, _noise_pair, _setup  # noqa: E402

import zsnr_kernels as zk  # noqa: E402


def main():
    kd = _kdiffusion.load()
    print(f"{'sampler':20s} {'sd fp64':>9s} {'sd fp32':>9s} {'karras fp64':>11s} {'karras fp32':>11s}")
    for name in ALL_KD:
        row = []
        for schedule in ("sd_discrete", "karras"):
            for dtype in (torch.float64, torch.float32):
                sampling, kd_model, model, sigmas = _setup(kd, schedule, dtype)
                noise = torch.randn(2, 4, 9, 11, generator=torch.Generator().manual_seed(0), dtype=dtype)
                a, b = _noise_pair(noise, 64)
                kw_kd = {"noise_sampler": lambda s, sn: next(a)} if name in NOISY else {}
                kw_zk = {"noise_sampler": lambda s, sn: next(b)} if name in NOISY else {}
                ref = getattr(sampling, f"sample_{name}")(kd_model, noise * sigmas[0], sigmas, disable=True, **kw_kd)
                row.append((zk.sample(model, noise, sigmas, sampler=name, **kw_zk) - ref).abs().max().item())
        print(f"{name:20s} {row[0]:9.1e} {row[1]:9.1e} {row[2]:11.1e} {row[3]:11.1e}")


if __name__ == "__main__":
    main()
