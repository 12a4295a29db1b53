"""Smoke test of bench/report_pipeline.py (one diffusers pipeline step's sampler time, eager against fused, issue 18):
it runs on a tiny latent for every scheduler and dtype, checks each fused step against the eager one before timing,
and prints one finite row per scheduler, shape and dtype with the load average."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

REPORT = Path(__file__).resolve().parents[2] / "bench" / "report_pipeline.py"


def _load():
    spec = importlib.util.spec_from_file_location("report_pipeline", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pipeline_report_runs_on_a_tiny_latent(capsys):
    report = _load()
    rows = report.main(["--shapes", "1x4x8x8", "2x4x8x8", "--budget", "0.01", "--rounds", "1"])
    printed = capsys.readouterr().out
    assert "Pipeline step (CFG w=7.5 + rescale phi=0.7" in printed and "load average after" in printed
    assert [(r["scheduler"], r["shape"], r["dtype"]) for r in rows] == [
        (name, shape, dtype) for shape in ("1x4x8x8", "2x4x8x8") for dtype in ("float32", "bfloat16")
        for name in report.SCHEDULERS]
    for row in rows:
        for key in ("eager_us", "fused_us", "x"):
            assert math.isfinite(row[key]) and row[key] > 0, row
        assert row["x"] == pytest.approx(row["eager_us"] / row["fused_us"])
        assert f"{row['scheduler']:10s} {row['shape']:>12s}" in printed


def test_a_fused_step_that_differs_from_the_eager_one_fails_the_report(monkeypatch):
    """The check before timing: a fused step whose result differs (here scaled by 1.5) stops the report rather than
    timing two different computations."""
    report = _load()
    real = report._variants

    def wrong(name, latents, cond, uncond, d_prev):
        eager, fused, check = real(name, latents, cond, uncond, d_prev)
        return eager, fused, lambda: (check()[0], 1.5 * check()[1])

    monkeypatch.setattr(report, "_variants", wrong)
    with pytest.raises(AssertionError, match="the fused step differs from the eager one"):
        report.main(["--shapes", "1x4x8x8", "--dtypes", "float32", "--schedulers", "euler", "--budget", "0.01",
                     "--rounds", "1"])
