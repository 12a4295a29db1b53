"""``bench/gpu_acceptance.sh --dry-run``: the GPU acceptance run's plan and environment check passes on a machine
without a GPU, against this environment's Python (``--no-install``: no venv, no pip), and a failing step is
recorded without stopping the steps after it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_acceptance.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and timeout")


def _dry_run(report: Path, venv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VENV": venv}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", "--no-install", "--report-dir", str(report)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120, check=False)


def _steps(report: Path) -> dict[str, str]:
    rows = [line.split("\t") for line in (report / "steps.tsv").read_text().splitlines()]
    return {r[0]: r[1] for r in rows}


def test_dry_run_passes_here(tmp_path):
    venv = Path(sys.prefix)  # the environment running the tests, as the script's $VENV
    if not (venv / "bin" / "python").exists() or not (venv / "bin" / "zsnr-kernels").exists():
        pytest.skip(f"{venv} is not a virtual environment with zsnr-kernels installed")
    r = _dry_run(tmp_path / "report", str(venv))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    steps = _steps(tmp_path / "report")
    assert steps == {name: "ok" for name in ("tools", "paths", "peak", "parse", "collect-gpu-tests",
                                             "bandwidth-report")}, steps
    assert "parses: zsnr-kernels selftest --require cpu cuda triton" in r.stdout
    assert "parses: zsnr-kernels bench --quick --shapes" in r.stdout
    assert "all steps passed" in (tmp_path / "report" / "summary.txt").read_text()
    assert (tmp_path / "report" / "bandwidth.csv").exists()


def test_a_failing_step_is_recorded_and_the_rest_still_run(tmp_path):
    """A venv that does not exist: the tools check fails, the steps that need its Python are skipped with the
    reason, and the script exits 1 after running every check."""
    r = _dry_run(tmp_path / "report", str(tmp_path / "no-venv"))
    assert r.returncode == 1
    steps = _steps(tmp_path / "report")
    assert steps["tools"] == "FAIL" and steps["paths"] == "ok" and steps["parse"] == "skipped"
    assert "1 step(s) failed" in r.stdout
