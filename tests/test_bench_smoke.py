"""Smoke tests of the benchmark (zsnr_kernels/bench.py, run through bench/bench_step.py as its users do): a tiny
--quick run writes a complete CSV; bench/report_cold.py runs; --png without matplotlib fails before measuring; CUDA
backends skip cleanly without a GPU and are timed (events, CUDA graph, % of peak) where there is one."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from zsnr_kernels import _ext
from zsnr_kernels import bench as bench_core

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_step.py"
MEASURED = ["bytes", "us", "gbps", "triad_us", "triad_gbps", "pct_triad", "eager_us", "x_eager"]
TINY = ["--quick", "--ops", "euler_cfg_rescale", "--shapes", "1x4x8x8", "--dtypes", "float32", "--no-compile"]
needs_cpu = pytest.mark.skipif(not _ext.available(), reason="the compiled cpu backend is not built")


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _read(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@needs_cpu
def test_quick_run_writes_csv(tmp_path, capsys):
    bench = _load_bench()
    path = tmp_path / "bench.csv"
    # torch.compile is skipped: a cold compile takes about 20 s on its own.
    bench.main([*TINY, "--backends", "cpu", "eager", "compile", "--csv", str(path)])
    printed = capsys.readouterr().out
    assert "euler_cfg_rescale" in printed and "Per-call overhead" in printed

    rows = _read(path)
    assert [(r["device"], r["backend"]) for r in rows] == [("cpu", "cpu"), ("cpu", "eager")]
    for row in rows:
        for col in bench.COLUMNS + ["cpu_model", "cores", "omp_threads", "isa", "torch", "python"]:
            assert col in row, col
        assert (row["op"], row["shape"], row["dtype"]) == ("euler_cfg_rescale", "1x4x8x8", "float32")
        for col in MEASURED:
            v = float(row[col])
            assert math.isfinite(v) and v > 0, (col, row[col])
        assert int(row["bytes"]) == 6 * 1 * 4 * 8 * 8 * 4  # the 6N byte model, float32
        assert int(row["elements"]) == 256
        assert math.isnan(float(row["compile_us"])) and math.isnan(float(row["graph_us"]))  # skipped: NaN
        kernel = float(row["kernel_us"])  # the replayed compiled call: the cpu row only, and faster than the call
        assert (0 < kernel < float(row["us"])) if row["backend"] == "cpu" else math.isnan(kernel)
        assert float(row["gbps"]) == pytest.approx(int(row["bytes"]) / float(row["us"]) / 1e3, rel=1e-4)
        assert float(row["x_eager"]) == pytest.approx(float(row["eager_us"]) / float(row["us"]), rel=1e-4)
        assert row["isa"] == _ext.C.cpu_isa()
    assert float(rows[1]["x_eager"]) == 1.0


@needs_cpu
def test_cold_cache_report_runs(capsys):
    spec = importlib.util.spec_from_file_location("report_cold", BENCH.parent / "report_cold.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--shape", "1x4x8x8", "--dtypes", "bfloat16", "--ops", "euler_ancestral", "--repeats", "1"])
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[:2] == ["euler_ancestral", "bfloat16"]
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in row[2:6])  # cold, warm, triad cold, triad warm


def test_png_without_matplotlib_fails_before_measuring(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit, match=r'pip install "zsnr-kernels\[plot\]"'):
        bench_core.main([*TINY, "--png", str(tmp_path / "b.png")])
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "b.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_cuda_backends_skip_without_a_gpu(capsys):
    with pytest.raises(SystemExit, match="nothing to time"):
        bench_core.main([*TINY, "--backends", "cuda", "triton", "eager"])
    out = capsys.readouterr().out
    assert "skipped cuda: torch.cuda.is_available() is False" in out
    assert "skipped triton: torch.cuda.is_available() is False" in out


def test_peak_bandwidth_from_device_properties(monkeypatch):
    """H100 SXM5: 5120-bit HBM3 at 2619 MHz is NVIDIA's 3.35 TB/s."""
    props = SimpleNamespace(memory_clock_rate=2_619_000, memory_bus_width=5120)  # kHz, bits
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    name, gbps = bench_core.device_bandwidth()
    assert name == "peak" and gbps == pytest.approx(3350, rel=2e-3)
    assert bench_core.bandwidth_columns(name) == ["peak_gbps", "pct_peak", "graph_pct_peak"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rows(tmp_path, capsys):
    path = tmp_path / "bench.csv"
    rows = bench_core.main(["--quick", "--ops", "euler", "--shapes", "1x4x64x64", "--dtypes", "float32",
                            "--backends", "cuda", "triton", "eager", "--no-overhead", "--csv", str(path)])
    out = capsys.readouterr().out
    fused = [r for r in rows if r["device"] == "cuda" and r["backend"] in ("cuda", "triton")]
    for b in ("cuda", "triton"):  # each fused backend is timed, or its reason to skip is printed
        assert any(r["backend"] == b for r in fused) or f"skipped {b}:" in out
    bw = "peak" if any("pct_peak" in r for r in rows) else "d2d_copy"
    for r in fused:
        assert r["us"] > 0 and r[f"pct_{bw}"] > 0
        assert math.isfinite(r["graph_us"]) or "CUDA-graph timing" in out
    if fused:
        assert f"pct_{bw}" in _read(path)[0]
