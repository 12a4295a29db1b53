"""The benchmark's measure of a sharded step's communication cost (``python bench/bench_step.py --comm [WORLD]``,
issue 20): a quick run on 2 gloo processes prints, per latent, the bytes of the step's one collective and the times
of the plain step, the sharded step (noise drawn in the kernel at the slice's global indices), the same with the
noise drawn beside it, and the collective alone."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zsnr_kernels.backends import ext as _ext

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_step.py"

pytestmark = [pytest.mark.skipif(not _ext.available(), reason="the compiled cpu module is not built"),
              pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")]


def test_quick_comm_run_reports_bytes_and_times_for_two_processes():
    run = subprocess.run([sys.executable, str(BENCH), "--comm", "2", "--quick"], capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert re.search(r"load average [\d.]+ at the start", out) and "2 gloo processes" in out
    # frames (1,4,6,8,8) on 2 ranks: slices [3, 3], 4 float64 per row and sample, padded to 3 rows: 96 bytes
    assert "frames (1,4,6,8,8) / frames: slices [3, 3]; one all_gather per step with guidance rescale: sends 96 B" in out
    # tokens (2,16,64): slices [8, 8], 2 samples x 8 rows x 32 bytes
    assert "tokens (2,16,64) / tokens: slices [8, 8]; one all_gather per step with guidance rescale: sends 512 B" in out
    times = re.findall(r"plain step on the slice ([\d.]+) \| sharded step ([\d.]+)", out)
    assert len(times) == 2 and all(float(v) > 0 for pair in times for v in pair)
