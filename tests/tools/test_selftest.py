"""``zsnr-kernels selftest`` (zsnr_kernels/tools/selftest.py), in-process on the cpu and torch backends with a small
matrix: its table and exit status, that an injected error makes it fail and name the case, and that its cases
cover the sampler table from sigma = inf."""

from __future__ import annotations

import csv

import pytest
import torch

from zsnr_kernels import coefficients as co
from zsnr_kernels.__main__ import main
from zsnr_kernels.backends import ext as _ext, registry
from zsnr_kernels.tools import selftest

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"zsnr_kernels._C: {_ext.why_unavailable()}")

# one sampler of each kind (single with noise, two-stage, multistep), two dtypes: about a second
SMALL = ["selftest", "--backends", "cpu", "torch", "--samplers", "euler_ancestral", "heun", "dpmpp_2m",
         "--dtypes", "float32", "bfloat16"]


def _table(out: str) -> dict[tuple[str, str, str, str], list[str]]:
    """The table's rows by (backend, device, dtype, check)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("backend "))
    header = lines[start]
    cols = [header.index(name) for name in selftest.HEADER]
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        cells = [line[a:b].strip() for a, b in zip(cols, cols[1:] + [None])]
        rows[tuple(cells[:4])] = cells
    return rows


def test_passes_and_prints_a_row_per_backend_dtype_and_check(capsys, tmp_path):
    path = tmp_path / "selftest.csv"
    assert main([*SMALL, "--csv", str(path)]) == 0
    out = capsys.readouterr().out
    assert "selftest passed" in out and "What to do" not in out
    rows = _table(out)
    for backend in ("cpu", "torch"):
        for dtype in ("float32", "bfloat16"):
            for check in ("from inf", "finite", "in place", "per-sample sigmas", "to 0", "plan = sample()"):
                assert rows[(backend, "cpu", dtype, check)][-1] == "ok", (backend, dtype, check)
        for check in ("philox normals", "batch = 1 + 1 + 1"):
            assert rows[(backend, "cpu", "float32", check)][-1] == "ok"
    assert rows[("cpu", "cpu", "uint32", "philox integers")][-1] == "ok"
    # every sampler's step from inf, and heun's second stage counted as a case of its own
    assert rows[("cpu", "cpu", "float32", "finite")][4] == "4"
    with open(path, newline="") as fh:
        written = list(csv.DictReader(fh))
    assert len(written) == len(rows) and {r["result"] for r in written} == {"ok"}


def test_an_injected_error_fails_and_names_the_case(monkeypatch, capsys):
    """The cpu backend's step off by 1e-2: the run exits 1, names the backend, dtype, check and case, and says
    what to do; the torch backend still passes."""
    real = registry.FUSED["cpu"]

    def off_by_1e_2(*args, **kwargs):
        y_out, *rest = real(*args, **kwargs)
        return (y_out.add_(1e-2), *rest)  # in place: an out= tensor stays the result

    monkeypatch.setitem(registry.FUSED, "cpu", off_by_1e_2)
    assert main(SMALL) == 1
    out = capsys.readouterr().out
    assert "selftest FAILED" in out and "What to do" in out
    assert "cpu on cpu, float32, from inf" in out
    assert "euler_ancestral inf -> 2.5: y: max |err| 0.01 is" in out
    rows = _table(out)
    assert rows[("cpu", "cpu", "float32", "from inf")][-1] == "FAIL"
    assert rows[("torch", "cpu", "float32", "from inf")][-1] == "ok"


def test_a_backend_that_raises_is_a_failure_with_its_message(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated launch failure")

    monkeypatch.setitem(registry.FUSED, "cpu", broken)
    assert main([*SMALL[:3], "--samplers", "euler", "--dtypes", "float32"]) == 1
    assert "raised RuntimeError: simulated launch failure" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_a_required_backend_that_cannot_run_here_fails_with_its_reasons(capsys):
    assert main(["selftest", "--backends", "torch", "--samplers", "euler", "--dtypes", "float32", "--quick",
                 "--require", "cuda"]) == 1
    out = capsys.readouterr().out
    assert "cuda: required (--require) but it runs on no device here: " in out and "CUDA" in out


def test_the_cases_cover_every_sampler_from_inf():
    """Built from the sampler table: every sampler steps from sigma = inf, finite (in place too) and to 0, and
    every two-stage sampler's second stage is among the finite cases."""
    cases = selftest.step_cases(co.SAMPLERS)
    for check in ("from inf", "finite", "per-sample sigmas", "to 0"):
        assert {c.sampler for c in cases if c.check == check} == set(co.SAMPLERS), check
    assert all(c.sigma == float("inf") for c in cases if c.check == "from inf")
    two_stage = {name for name, spec in co.SAMPLERS.items() if spec.kind == "two_stage"}
    assert {c.sampler for c in cases if c.stage2 and c.check == "finite"} == two_stage
    assert {c.sampler for c in cases if c.in_place} == set(co.SAMPLERS)


def test_every_sampler_passes_on_the_build_machine(capsys):
    """The whole self-test, every sampler of the table (two-stage second calls with their first call's carry:
    dpmpp_sde's y_0 and its second Philox draw, the CFG++ rows' D_u), on the backends this machine has."""
    assert main(["selftest", "--dtypes", "float32"]) == 0, capsys.readouterr().out
