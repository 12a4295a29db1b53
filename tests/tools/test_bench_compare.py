"""``python -m zsnr_kernels bench-compare`` (zsnr_kernels/tools/bench_compare.py) on synthetic pytest-benchmark JSON:
the baseline stores each case's measured spread (gathering an earlier baseline's runs), a 30% rise beyond it is
flagged, a change within it passes, several runs are compared by their median, a missing case fails, another
machine kind, thread count or a contended run is warned about; and one real case of bench/bench_step.py writes the
x_roof_min the command reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zsnr_kernels.__main__ import main
from zsnr_kernels.tools import bench_compare

ROOT = Path(__file__).resolve().parents[2]
KIND = "test-cpu-x86_64-avx512-2c"


def _run_json(path, x_roof_min: dict, kind=KIND, threads=1, others_cpu=0.1):
    """A pytest-benchmark JSON file as bench/bench_step.py writes it (only the fields bench-compare reads), of a
    2-core machine."""
    extra = {"machine_kind": kind, "threads": threads, "cores": 2, "loadavg": 1.1, "others_cpu": others_cpu}
    benchmarks = [{"name": name, "stats": {"median": 1e-4}, "extra_info": {"x_roof_min": x, **extra}}
                  for name, x in x_roof_min.items()]
    path.write_text(json.dumps({"machine_info": {}, "benchmarks": benchmarks}))
    return str(path)


@pytest.fixture
def baseline(tmp_path, capsys):
    """Four runs: a steady case (spread 1%, threshold the 10% floor) and a noisy one (spread 20%: threshold 60%)."""
    runs = [_run_json(tmp_path / f"r{i}.json", {"steady": s, "noisy": n})
            for i, (s, n) in enumerate([(2.00, 1.0), (2.02, 1.2), (1.98, 0.8), (2.0, 1.0)])]
    path = tmp_path / "base.json"
    assert main(["bench-compare", "--make-baseline", str(path), *runs]) == 0
    assert f"wrote {path}: 2 cases, 4 runs, machine kind {KIND}, 1 thread(s)" in capsys.readouterr().out
    base = json.loads(path.read_text())
    assert base["tracked"] == "x_roof_min"
    assert base["cases"]["steady"] == {"x_roof_min": 2.0, "spread": pytest.approx(0.01),
                                       "runs": [2.0, 2.02, 1.98, 2.0]}
    assert base["cases"]["noisy"]["spread"] == pytest.approx(0.2)
    return str(path)


def test_the_spread_leaves_out_one_run_far_from_the_others():
    """One run in a slow process does not blind a case: the spread is the largest distance from the median but
    one (with three runs or more)."""
    assert bench_compare.spread([2.0, 2.02, 1.98, 2.0, 3.0], 2.0) == pytest.approx(0.01)
    assert bench_compare.spread([2.0, 2.4], 2.2) == pytest.approx(0.2 / 2.2)


def _compare(capsys, base, *runs) -> tuple[int, dict, str]:
    """Exit status, {case: verdict} from the printed table, and the output."""
    status = main(["bench-compare", base, *runs])
    out = capsys.readouterr().out
    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("---"))
    at = lines[rule - 1].index("verdict")   # the header's column
    verdicts = {line.split()[0]: line[at:] for line in lines[rule + 1:-1]}   # the rows, less the summary
    return status, verdicts, out


def test_a_30_percent_rise_is_flagged(baseline, tmp_path, capsys):
    status, verdicts, out = _compare(capsys, baseline, _run_json(tmp_path / "run.json", {"steady": 2.6, "noisy": 1.0}))
    assert status == 1 and verdicts == {"steady": "SLOWER", "noisy": "ok"}
    assert "+30.0%" in out and "regression" in out


def test_a_change_within_the_measured_noise_passes(baseline, tmp_path, capsys):
    # the noisy case's runs spread 20%: a 30% rise is within its 60% threshold; the steady case moved 5% (floor 10%)
    status, verdicts, out = _compare(capsys, baseline, _run_json(tmp_path / "run.json", {"steady": 2.1, "noisy": 1.3}))
    assert status == 0 and verdicts == {"steady": "ok", "noisy": "ok"}
    assert "WARNING" not in out


def test_faster_is_reported_and_passes(baseline, tmp_path, capsys):
    status, verdicts, _ = _compare(capsys, baseline, _run_json(tmp_path / "run.json", {"steady": 1.5, "noisy": 1.0}))
    assert status == 0 and verdicts["steady"] == "faster"


def test_missing_and_new_cases_are_reported(baseline, tmp_path, capsys):
    status, verdicts, _ = _compare(capsys, baseline, _run_json(tmp_path / "run.json", {"steady": 2.0, "other": 3.0}))
    assert status == 1 and verdicts == {"steady": "ok", "noisy": "MISSING", "other": "new"}


def test_other_conditions_are_warned_about(baseline, tmp_path, capsys):
    """Another machine kind, another thread count, other processes on the cores the run's threads needed."""
    run = _run_json(tmp_path / "run.json", {"steady": 2.0, "noisy": 1.0}, kind="other-cpu-aarch64-neon-8c",
                    threads=2, others_cpu=0.5)
    status, verdicts, out = _compare(capsys, baseline, run)
    assert status == 0
    assert f"WARNING: machine kind differs: the run's is other-cpu-aarch64-neon-8c, the baseline's {KIND}" in out
    assert "WARNING: threads differ: the run's cases ran on 2, the baseline's on 1" in out
    assert "WARNING: 2 of 2 cases ran while other processes took cores their threads needed" in out
    assert verdicts == {"steady": "ok (contended)", "noisy": "ok (contended)"}


def test_several_runs_are_compared_by_each_cases_median(baseline, tmp_path, capsys):
    """Runs of one change in their own processes: a case slow in one of three passes (its median is the others'),
    slow in two of three it is flagged."""
    runs = [_run_json(tmp_path / f"run{i}.json", {"steady": s, "noisy": 1.0}) for i, s in enumerate((2.6, 2.0, 2.02))]
    status, verdicts, out = _compare(capsys, baseline, *runs)
    assert status == 0 and verdicts == {"steady": "ok", "noisy": "ok"} and "run: median of 3 runs" in out
    runs[1] = _run_json(tmp_path / "run1.json", {"steady": 2.7, "noisy": 1.0})
    status, verdicts, _ = _compare(capsys, baseline, *runs)
    assert status == 1 and verdicts["steady"] == "SLOWER"


def test_a_baseline_gathers_the_runs_of_an_earlier_one(baseline, tmp_path, capsys):
    """--make-baseline given an earlier baseline keeps its runs beside the new ones (another session's), case by
    case: the spread takes in both; a case it tracks that the new runs lack is refused, not dropped."""
    later = [_run_json(tmp_path / f"later{i}.json", {"steady": s, "noisy": 1.0, "added": 3.0})
             for i, s in enumerate((2.3, 2.2))]
    path = tmp_path / "gathered.json"
    assert main(["bench-compare", "--make-baseline", str(path), baseline, *later]) == 0
    assert "left out, not in every run: added" in capsys.readouterr().err
    base = json.loads(path.read_text())
    assert base["runs"] == 6 and base["made_from"] == ["base.json (4 runs)", "later0.json", "later1.json"]
    assert base["cases"]["steady"]["runs"] == [2.0, 2.02, 1.98, 2.0, 2.3, 2.2]
    assert base["cases"]["steady"]["x_roof_min"] == pytest.approx(2.01)
    assert base["cases"]["steady"]["spread"] == pytest.approx(2.2 / 2.01 - 1.0)
    short = _run_json(tmp_path / "short.json", {"steady": 2.0})
    with pytest.raises(SystemExit, match="the runs lack cases the baseline tracks: noisy"):
        main(["bench-compare", "--make-baseline", str(tmp_path / "lost.json"), baseline, short])


def test_a_baseline_of_another_ratio_is_refused(baseline, tmp_path):
    """A baseline made before x_roof_min (it stored the median ratio, without a "tracked" field) is refused, for a
    comparison and as runs of a new baseline: the two ratios differ by what the medians take in."""
    old = json.loads(Path(baseline).read_text())
    del old["tracked"]
    for case in old["cases"].values():
        case["x_roof"] = case.pop("x_roof_min")
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    run = _run_json(tmp_path / "run.json", {"steady": 2.0, "noisy": 1.0})
    with pytest.raises(SystemExit, match="a baseline of x_roof, and bench-compare compares x_roof_min"):
        main(["bench-compare", str(path), run])
    with pytest.raises(SystemExit, match="make it again"):
        main(["bench-compare", "--make-baseline", str(tmp_path / "new.json"), str(path), run])


def test_inputs_it_cannot_use_are_refused(tmp_path, baseline):
    with pytest.raises(SystemExit, match="at least 2 runs"):
        main(["bench-compare", "--make-baseline", str(tmp_path / "b.json"), _run_json(tmp_path / "r.json", {"a": 1})])
    with pytest.raises(SystemExit, match="not a baseline"):
        main(["bench-compare", _run_json(tmp_path / "r.json", {"a": 1}), _run_json(tmp_path / "s.json", {"a": 1})])
    (tmp_path / "disabled.json").write_text(json.dumps({"benchmarks": [{"name": "a", "extra_info": {}}]}))
    with pytest.raises(SystemExit, match="no case has an x_roof_min"):
        main(["bench-compare", baseline, str(tmp_path / "disabled.json")])


def test_threshold_is_the_floor_or_a_multiple_of_the_spread():
    assert bench_compare.threshold({"spread": 0.01}) == bench_compare.FLOOR
    assert bench_compare.threshold({"spread": 0.2}) == pytest.approx(bench_compare.SPREADS * 0.2)


def test_a_bench_step_case_writes_what_bench_compare_reads(tmp_path):
    """One real case (the small triad) through pytest-benchmark: its JSON makes a baseline and compares."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("ZSNR_BENCH_SLOWDOWN", None)
    run = str(tmp_path / "run.json")
    r = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "bench" / "bench_step.py"), "-q",
                        "-p", "no:cacheprovider", "--benchmark-only", "-k", "test_bench_triad and 1x4x64x64",
                        "--benchmark-max-time=0.02", "--benchmark-min-rounds=3", f"--benchmark-json={run}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    (case,) = json.loads(Path(run).read_text())["benchmarks"]
    assert case["extra_info"]["x_roof"] > 0 and case["extra_info"]["x_roof_min"] > 0
    assert case["extra_info"]["threads"] == 1
    base = str(tmp_path / "base.json")
    assert main(["bench-compare", "--make-baseline", base, run, run]) == 0
    assert list(json.loads(Path(base).read_text())["cases"]) == ["test_bench_triad[1x4x64x64]"]
    assert main(["bench-compare", base, run]) == 0
