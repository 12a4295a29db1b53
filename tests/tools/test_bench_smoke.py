"""Smoke tests of the benchmark (zsnr_kernels/tools/bench.py, run through bench/bench_step.py as its users do): a tiny
--quick run writes a complete CSV; the loops section runs on a tiny shape; bench/report_cold.py runs; --png without
matplotlib fails before measuring; CUDA backends skip cleanly without a GPU and are timed (events, CUDA graph, % of
peak) where there is one."""

from __future__ import annotations

import csv
import importlib.util
import io
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from zsnr_kernels.backends import ext as _ext
from zsnr_kernels.tools import bench as bench_core

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_step.py"
MEASURED = ["bytes", "us", "gbps", "triad_us", "triad_gbps", "pct_triad", "eager_us", "x_eager"]
TINY = ["--quick", "--ops", "euler_cfg_rescale", "--shapes", "1x4x8x8", "--dtypes", "float32", "--no-compile",
        "--loops-shape", "1x4x8x8", "--no-pipeline"]
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
    assert "euler_cfg_rescale" in printed and "Per-call overhead" in printed and "Loops at 1x4x8x8 float32" in printed

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


@needs_cpu
def test_pipeline_step_quick_on_a_tiny_shape():
    """The diffusers pipeline step's sampler time, eager against fused, after checking both compute one thing."""
    pytest.importorskip("diffusers")
    rows = bench_core.pipeline_step([(1, 4, 8, 8)], quick=True, out=io.StringIO())
    assert [(r["shape"], r["dtype"]) for r in rows] == [("1x4x8x8", "float32"), ("1x4x8x8", "bfloat16")]
    assert all(r["eager_us"] > 0 and r["fused_us"] > 0 and r["x"] == pytest.approx(r["eager_us"] / r["fused_us"])
               for r in rows)


def test_loops_quick_on_a_tiny_shape():
    r = bench_core.loops((1, 4, 8, 8), quick=True, out=io.StringIO())
    assert r["shape"] == (1, 4, 8, 8) and r["threads"] >= 1 and r["working_set_bytes"] == 3 * 256 * 4
    rows = r["rows"]
    assert list(rows) == ["default", "in_place", "sample", "plan", "roof_cache", "roof_dram", "in_place_evicted"]
    for name, row in rows.items():
        assert math.isfinite(row["us"]) and row["us"] > 0, name
    # each ratio is over the row it names, measured in the same call
    assert rows["in_place"]["x_in_place"] == 1.0 and rows["roof_cache"]["x_roof"] == rows["roof_dram"]["x_roof"] == 1.0
    assert rows["sample"]["x_roof"] == pytest.approx(rows["sample"]["us"] / rows["roof_cache"]["us"])
    assert rows["in_place_evicted"]["x_roof"] == pytest.approx(rows["in_place_evicted"]["us"] / rows["roof_dram"]["us"])
    assert all(rows[k]["faults"] >= 0 for k in ("default", "in_place", "sample", "plan"))
    assert r["evict_bytes"] > (bench_core.cache_sizes() or (0, 0))[1]


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


def _row(**kw):
    nan = float("nan")
    row = {"backend": "cpu", "us": 100.0, "triad_us": 90.0, "noise_us": 0.0, "pct_roof": 90.0, "kernel_us": nan,
           "eager_us": nan, "compile_us": nan}
    row.update(kw)
    return row


@pytest.mark.parametrize("op,shape,row,where,want", [
    ("euler", (1, 16, 21, 60, 104), _row(), "DRAM", "ok: roof 90%>=85"),
    ("euler", (1, 16, 21, 60, 104), _row(pct_roof=80.0), "DRAM", "MISS: roof 80%<85"),
    ("euler", (4, 4, 128, 128), _row(pct_roof=40.0), "LLC", "-"),           # noise-free in cache: no target
    ("euler", (1, 4, 64, 64), _row(pct_roof=20.0, kernel_us=50.0), "L2", "-"),
    ("euler_ancestral", (4, 4, 128, 128), _row(pct_roof=42.0, noise_us=42.0, triad_us=20.0), "LLC",
     "MISS: roof 42%<70"),
    # in L2 a noisy step is judged by the compiled call alone: roof = max(triad, noise) / kernel
    ("euler_ancestral", (1, 4, 64, 64), _row(pct_roof=24.0, noise_us=20.0, triad_us=5.0, kernel_us=25.0), "L2",
     "ok: kern roof 80%>=70"),
    ("euler", (1, 16, 21, 60, 104), _row(backend="eager"), "DRAM", "-"),
    # the headline's ratios: 2x compile only where compile is under half the roof
    (bench_core.HEADLINE, (4, 4, 128, 128), _row(pct_roof=90.0, eager_us=2000.0, compile_us=150.0), "LLC",
     "ok: x eager 20.0x>=10"),
    (bench_core.HEADLINE, (4, 4, 128, 128), _row(pct_roof=90.0, eager_us=2000.0, compile_us=400.0), "LLC",
     "ok: x eager 20.0x>=10, x compile 4.0x>=2"),
    (bench_core.HEADLINE, (1, 16, 21, 60, 104), _row(pct_roof=75.0, eager_us=500.0, compile_us=300.0), "DRAM",
     "MISS: roof 75%<85, x compile 3.0x>=2"),                         # eager at 18% of roof: 10x cannot exist
])
def test_targets_apply_where_the_method_says(op, shape, row, where, want):
    assert bench_core._target(bench_core.OPS[op], shape, row, where) == want


def test_regime_from_cache_sizes():
    caches = (1 << 20, 32 << 20)
    assert [bench_core.regime(n, caches) for n in (1 << 20, (1 << 20) + 1, 32 << 20, (32 << 20) + 1)] == [
        "L2", "LLC", "LLC", "DRAM"]
    assert bench_core.regime(1, None) == "?"


def test_console_line_prints_a_dash_for_what_was_not_measured():
    nan = float("nan")
    row = {"device": "cpu", "op": "euler", "shape": "1x4x8x8", "dtype": "float32", "backend": "cpu", "us": 10.0,
           "gbps": 1.0, "pct_triad": 50.0, "pct_roof": 50.0, "pct_triad_kernel": nan, "eager_us": 20.0,
           "x_eager": 2.0, "compile_us": nan, "x_compile": nan, "where": "L2", "target": "-"}
    line = bench_core._line(row, 3, None)
    assert "nan" not in line
    header = bench_core._header("cpu", None)
    assert line.index("2.0x") + len("2.0x") == header.index("x eager") + len("x eager")   # columns line up
    assert line.split()[-4:] == ["-", "-", "L2", "-"]                       # compile us, x comp, in, target
    assert line[header.index("kern%"):header.index("kern%") + 5].strip() == "-"


def test_warm_up_waits_out_a_slow_stretch():
    """Calls equally slow for a while look steady; the warm-up goes on until a quiet stretch after the last
    speed-up."""
    import time

    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.01 if len(calls) <= 10 else 0.0001)

    n, settled = bench_core.warm_up(fn, quiet_s=0.1, settle=5, max_s=5.0)
    assert settled and n > 15 and len(calls) == n
    n, settled = bench_core.warm_up(lambda: time.sleep(0.01), quiet_s=10.0, max_s=0.2)
    assert not settled and n >= 5
