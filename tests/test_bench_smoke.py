"""Smoke test of the benchmark script (bench/bench_step.py): a tiny --quick run writes a complete CSV."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest

from zsnr_kernels import _ext

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_step.py"
MEASURED = ["bytes", "cpu_us", "cpu_gbps", "triad_us", "triad_gbps", "pct_triad", "eager_us", "x_eager"]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not _ext.available(), reason="the compiled cpu backend is not built")
def test_quick_run_writes_csv(tmp_path, capsys):
    bench = _load_bench()
    path = tmp_path / "bench.csv"
    # torch.compile is skipped: a cold compile takes about 20 s on its own.
    bench.main(["--quick", "--ops", "euler_cfg_rescale", "--shapes", "1x4x8x8", "--dtypes", "float32",
                "--no-compile", "--csv", str(path)])
    printed = capsys.readouterr().out
    assert "euler_cfg_rescale" in printed and "Per-call overhead" in printed

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1
    row = rows[0]
    for col in bench.COLUMNS + ["cpu_model", "cores", "omp_threads", "isa", "torch", "python"]:
        assert col in row, col
    assert (row["op"], row["shape"], row["dtype"]) == ("euler_cfg_rescale", "1x4x8x8", "float32")
    for col in MEASURED:
        v = float(row[col])
        assert math.isfinite(v) and v > 0, (col, row[col])
    assert int(row["bytes"]) == 6 * 1 * 4 * 8 * 8 * 4  # the 6N byte model, float32
    assert math.isnan(float(row["compile_us"]))  # skipped, recorded as NaN
    assert row["isa"] == _ext.C.cpu_isa()
