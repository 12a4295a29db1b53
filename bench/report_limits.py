"""Print how runs from sigma_max = 1e4, 1e8, 1e16 approach the run from sigma = inf (max abs gap, same unit noise
and Philox seeds): the figures behind tests/math/test_limits_at_inf.py.

    python bench/report_limits.py
"""

import os
import sys

import torch

# The figures behind a test come from that test's own set-up (its model, schedules and noise), imported from tests/:
# a copy here could drift from what the test checks.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from conftest import TinyNet  # noqa: E402

import zsnr_kernels as zk  # noqa: E402

SAMPLERS = ["euler", "ddim", "ddpm", "euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m",
            "dpmpp_2m_sde", "dpmpp_3m_sde", "lms"]


def main():
    net = TinyNet(4, seed=2)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rest = zk.schedules.karras(10, 0.03, 14.6)

    def run(sampler, sigma_max):
        sigmas = torch.cat([torch.tensor([sigma_max], dtype=torch.float64), rest])
        return zk.sample(net, noise, sigmas, sampler=sampler, seed=11, eta=0.0 if sampler == "ddim" else 1.0)

    print(f"{'sampler':20s} {'1e4':>10s} {'1e8':>10s} {'1e16':>10s}   (dpm_2_ancestral has no limit: Euler from inf)")
    for name in SAMPLERS:
        at_inf = run(name, float("inf"))
        gaps = [(run(name, s) - at_inf).abs().max().item() for s in (1e4, 1e8, 1e16)]
        print(f"{name:20s} " + " ".join(f"{g:10.3e}" for g in gaps))


if __name__ == "__main__":
    main()
