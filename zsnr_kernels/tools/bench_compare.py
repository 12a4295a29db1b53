"""Compare pytest-benchmark runs of ``bench/bench_step.py`` with a stored baseline, case by case, on ``x_roof_min``.

Each case of ``bench/bench_step.py`` times itself and its roof (the triad over its bytes, or its in-kernel noise
where that takes longer) in interleaved rounds and stores ``x_roof`` (median over median, the ratio the benchmark
reports) and ``x_roof_min`` (fastest sample over fastest sample), with the conditions it ran in.  Absolute times
differ between machines and drift with the machine's load; the ratio carries over between machines of one kind
(``machine_kind``: CPU model, architecture, instruction set, cores) at one thread count.  The tracked ratio is
``x_roof_min``: what other processes and the host do to a run only ever adds time, and in a slow phase of the
machine the medians of an allocating step and of the triad rose unequally (measured: the eager dpmpp_2m 1x4x64x64
bf16 case had median x_roof 48.9-52.2 in 8 runs and 61.8 and 66.2 in two later ones, its fastest samples 140-150 us
in all of them), while a slower build is slower in its fastest sample too.  The noise is measured, not assumed: a
baseline is made from k runs, each its own process, and stores, per case, the median ``x_roof_min`` and its spread
(the largest relative distance of a run from that median but one, :func:`spread`); a run is flagged where a case's
ratio rose by more than max(``--floor``, ``--spreads`` x its spread) over the baseline.

NOTE: some cases change speed from one process to the next, not within one: in 10 runs of one build on the 2-core
build machine, dpmpp_2m 4x4x128x128 fp32 on the cpu backend had x_roof 1.49-1.53 in six and 1.67-1.77 in four.
Baselines of k of those runs (resampled) flagged, with the default thresholds, on average 0.21 uncontended cases of
another of them for k = 3, 0.08 for k = 5 and 0.02 for k = 7, and 22, 19 and 18 of the 27 cases of a run made 30%
slower (ZSNR_BENCH_SLOWDOWN=0.3): make a baseline of 8 runs.

    for i in $(seq 8); do python -m pytest bench/bench_step.py --benchmark-only -q --benchmark-json=run$i.json; done
    python -m zsnr_kernels bench-compare --make-baseline bench/baselines/KIND.json run?.json
    python -m zsnr_kernels bench-compare bench/baselines/KIND.json run1.json run2.json run3.json

A change is compared by the per-case median of its runs (three, each its own process), so that one slow process
does not flag it.  A baseline made in one session misses what changes between sessions (another host of the kind,
another day): given an earlier baseline among its inputs, ``--make-baseline`` keeps that baseline's runs beside
the new ones, and their spread takes in both sessions.

Exit status 1 where a case is slower beyond its threshold or a baseline case is missing from the run, else 0.  A
run on another machine kind or thread count than the baseline's is compared with a warning, and so is one during
which other processes took cores its threads needed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import NamedTuple

from zsnr_kernels.tools import bench, cli as _cli

TRACKED = "x_roof_min"  # the ratio of each case that is compared (bench/bench_step.py's extra_info)
FLOOR = 0.10     # no threshold below 10%, however steady the baseline runs were
SPREADS = 3.0    # threshold = SPREADS x a case's measured spread where that exceeds the floor


def load_run(path: str) -> dict:
    """A pytest-benchmark JSON file (``--benchmark-json``) of ``bench/bench_step.py``: ``cases`` {name: x_roof_min}
    (those without one, run under ``--benchmark-disable``, are left out), the sets of ``kinds`` and ``threads``
    its cases name, ``loadavg`` [min, max], and the cases run ``contended`` (:func:`bench.contended`)."""
    with open(path) as fh:
        data = json.load(fh)
    if "benchmarks" not in data:
        raise SystemExit(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks'); make one with "
                         "python -m pytest bench/bench_step.py --benchmark-only --benchmark-json=PATH")
    extra = {b["name"]: b.get("extra_info", {}) for b in data["benchmarks"]}
    extra = {name: e for name, e in extra.items() if TRACKED in e}
    if not extra:
        raise SystemExit(f"{path}: no case has an {TRACKED} (a run of bench/bench_step.py, not under "
                         "--benchmark-disable, stores one per case)")
    loads = [round(e["loadavg"], 2) for e in extra.values() if "loadavg" in e]
    return {"cases": {name: float(e[TRACKED]) for name, e in extra.items()},
            "kinds": {e.get("machine_kind", "unknown") for e in extra.values()},
            "threads": {e.get("threads") for e in extra.values()},
            "loadavg": [min(loads), max(loads)] if loads else [],
            "contended": [name for name, e in extra.items() if "others_cpu" in e
                          and bench.contended(e["others_cpu"], e["threads"], e["cores"])]}


def _one(values: set, what: str):
    if len(values) > 1:
        raise SystemExit(f"{what}: {', '.join(map(str, sorted(values, key=str)))}")
    return next(iter(values))


def load_runs(paths: list[str]) -> dict:
    """Several runs of one change (each its own process) as one: per case the median of their ``x_roof_min`` (cases
    missing from a run are left out of it), and the union of their kinds, threads and contended cases."""
    runs = [load_run(p) for p in paths]
    names = dict.fromkeys(n for r in runs for n in r["cases"])
    loads = [v for r in runs for v in r["loadavg"]]
    return {"cases": {n: statistics.median(r["cases"][n] for r in runs if n in r["cases"]) for n in names},
            "kinds": set().union(*(r["kinds"] for r in runs)), "threads": set().union(*(r["threads"] for r in runs)),
            "loadavg": [min(loads), max(loads)] if loads else [],
            "contended": sorted({n for r in runs for n in r["contended"]}), "runs": len(runs)}


def _tracked(base: dict, path: str) -> dict:
    """``base`` (a stored baseline read from ``path``) if it tracks the ratio this version compares."""
    if "cases" not in base or "machine_kind" not in base:
        raise SystemExit(f"{path}: not a baseline (make one with bench-compare --make-baseline)")
    tracked = base.get("tracked", "x_roof")  # baselines before x_roof_min stored the median ratio, unnamed
    if tracked != TRACKED:
        raise SystemExit(f"{path}: a baseline of {tracked}, and bench-compare compares {TRACKED}: make it again "
                         "from runs of this version (bench-compare --make-baseline)")
    return base


def spread(values: list[float], median: float) -> float:
    """The measured noise of a case's runs: the largest relative distance of a run from their median but one (with
    three runs or more), so that one run in a slow process does not blind the case (measured on the build machine,
    8 runs: the largest distance put 5 of 27 thresholds above 30%, and a run 30% slower was flagged in 22 cases;
    the largest but one, in 26, and none of three clean runs was flagged either way)."""
    dev = sorted(abs(v / median - 1.0) for v in values)
    return dev[-2] if len(dev) > 2 else dev[-1]


class _Runs(NamedTuple):
    """What a baseline is made of, from one input file: a run (one value per case) or an earlier baseline (its
    stored values)."""

    name: str
    cases: dict          # case -> [x_roof_min of each run]
    kinds: set
    threads: set
    loadavg: list
    contended: list
    baseline_runs: int   # 0 for a run file


def _read_runs(path: str) -> _Runs:
    with open(path) as fh:
        data = json.load(fh)
    name = os.path.basename(path)
    if "cases" in data and "machine_kind" in data:
        base = _tracked(data, path)
        return _Runs(name, {n: list(c["runs"]) for n, c in base["cases"].items()}, {base["machine_kind"]},
                     {base["threads"]}, base.get("loadavg", []), base.get("contended", []), base["runs"])
    r = load_run(path)
    return _Runs(name, {n: [v] for n, v in r["cases"].items()}, r["kinds"], r["threads"], r["loadavg"],
                 r["contended"], 0)


def make_baseline(paths: list[str]) -> dict:
    """The baseline of k runs: per case (those in every run) the median ``x_roof_min``, its :func:`spread` and the
    runs' values; the machine kind and threads they share.  A path may be an earlier baseline: its stored values
    of each case count as runs (so a baseline gathers sessions, and its spread takes in what changes between
    them: another host of the kind, another day); a case it tracks must be in every run given with it."""
    inputs = [_read_runs(p) for p in paths]
    n_runs = sum(i.baseline_runs or 1 for i in inputs)
    if n_runs < 2:
        raise SystemExit("--make-baseline needs at least 2 runs (8: their spread is the measured noise)")
    names = [n for n in inputs[0].cases if all(n in i.cases for i in inputs)]
    lost = sorted({n for i in inputs if i.baseline_runs for n in i.cases} - set(names))
    if lost:
        raise SystemExit(f"the runs lack cases the baseline tracks: {', '.join(lost)} (run the whole benchmark, or "
                         "make a baseline of new runs alone)")
    partial = sorted(set().union(*(i.cases for i in inputs)) - set(names))
    if partial:
        print(f"left out, not in every run: {', '.join(partial)}", file=sys.stderr)
    cases = {}
    for name in names:
        values = [v for i in inputs for v in i.cases[name]]
        median = statistics.median(values)
        cases[name] = {TRACKED: median, "spread": spread(values, median), "runs": values}
    loads = [v for i in inputs for v in i.loadavg]
    return {"tracked": TRACKED,
            "machine_kind": _one(set().union(*(i.kinds for i in inputs)), "the runs mix machine kinds"),
            "threads": _one(set().union(*(i.threads for i in inputs)), "the runs mix thread counts"),
            "runs": n_runs,
            "made_from": [f"{i.name} ({i.baseline_runs} runs)" if i.baseline_runs else i.name for i in inputs],
            "loadavg": [min(loads), max(loads)] if loads else [],
            "contended": sorted({n for i in inputs for n in i.contended}), "cases": cases}


def threshold(case: dict, floor: float = FLOOR, spreads: float = SPREADS) -> float:
    """The relative rise of ``x_roof_min`` beyond which a case counts as slower."""
    return max(floor, spreads * case["spread"])


def compare(baseline: dict, run: dict, floor: float = FLOOR, spreads: float = SPREADS) -> tuple[list[dict], list[str]]:
    """One row per case of the baseline or the run (``case, baseline, run, change, threshold, verdict``; verdict
    ``ok``, ``SLOWER``, ``faster``, ``MISSING`` from the run, ``new``: not in the baseline; ``contended``: the case
    ran while other processes took cores its threads needed), and the warnings."""
    warnings = []
    kind = _one(run["kinds"], "the run mixes machine kinds")
    if kind != baseline["machine_kind"]:
        warnings.append(f"machine kind differs: the run's is {kind}, the baseline's {baseline['machine_kind']}: "
                        "ratios to the roof carry over only between machines of one kind")
    threads = _one(run["threads"], "the run mixes thread counts")
    if threads != baseline["threads"]:
        warnings.append(f"threads differ: the run's cases ran on {threads}, the baseline's on {baseline['threads']}")
    if run["contended"]:
        warnings.append(f"{len(run['contended'])} of {len(run['cases'])} cases ran while other processes took cores "
                        f"their threads needed (unreliable; bench.contended): {_names(run['contended'])}")
    nan = float("nan")
    rows = []
    for name, base in baseline["cases"].items():
        limit = threshold(base, floor, spreads)
        got = run["cases"].get(name, nan)
        change = got / base[TRACKED] - 1.0
        verdict = ("MISSING" if got != got else "SLOWER" if change > limit else "faster" if change < -limit
                   else "ok")
        rows.append(dict(case=name, baseline=base[TRACKED], run=got, change=change, threshold=limit, verdict=verdict))
    rows += [dict(case=name, baseline=nan, run=got, change=nan, threshold=nan, verdict="new")
             for name, got in run["cases"].items() if name not in baseline["cases"]]
    for r in rows:
        r["contended"] = r["case"] in run["contended"]
    return rows, warnings


def _names(names: list[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _pct(v: float, sign: str = "") -> str:
    return "-" if v != v else f"{100 * v:{sign}.1f}%"


def _range(loads: list) -> str:
    return f"{loads[0]:.2f}-{loads[1]:.2f}" if loads else "unknown"


def table(rows: list[dict]) -> str:
    width = max(len("case"), *(len(r["case"]) for r in rows))
    head = f"{'case':{width}s} {'baseline':>8s} {'run':>8s} {'change':>8s} {'threshold':>9s}  verdict"
    lines = [head, "-" * len(head)]
    for r in rows:
        ratios = " ".join("-".rjust(8) if r[k] != r[k] else f"{r[k]:8.3f}" for k in ("baseline", "run"))
        lines.append(f"{r['case']:{width}s} {ratios} {_pct(r['change'], '+'):>8s} {_pct(r['threshold']):>9s}  "
                     f"{r['verdict']}" + (" (contended)" if r["contended"] else ""))
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("files", nargs="+", metavar="JSON",
                    help="BASELINE.json RUN.json [RUN.json ...] (several runs of one change, each its own process: "
                         "each case's median is compared); with --make-baseline, the runs (pytest-benchmark JSON "
                         "files, or an earlier baseline whose runs are kept)")
    ap.add_argument("--make-baseline", type=_cli.output_path, metavar="OUT",
                    help="write the baseline of the given runs (8, each its own process) to OUT instead of "
                         "comparing")
    ap.add_argument("--floor", type=float, default=FLOOR, help=f"smallest threshold (default {FLOOR})")
    ap.add_argument("--spreads", type=float, default=SPREADS,
                    help=f"threshold in multiples of the case's measured spread (default {SPREADS})")


def run(a: argparse.Namespace, out=None) -> int:
    """The command with parsed options (see :func:`add_arguments`); returns the exit status."""
    out = out or sys.stdout
    if a.make_baseline:
        base = make_baseline(a.files)
        with open(a.make_baseline, "w") as fh:
            json.dump(base, fh, indent=1)
            fh.write("\n")
        print(f"wrote {a.make_baseline}: {len(base['cases'])} cases, {base['runs']} runs, machine kind "
              f"{base['machine_kind']}, {base['threads']} thread(s), load average {_range(base['loadavg'])}"
              + (f"; contended in a run (unreliable): {_names(base['contended'])}" if base["contended"] else ""),
              file=out)
        width = max(len(n) for n in base["cases"])
        print(f"{'case':{width}s} {TRACKED:>10s} {'spread':>7s} {'threshold':>9s}", file=out)
        for name, c in base["cases"].items():
            print(f"{name:{width}s} {c[TRACKED]:10.3f} {_pct(c['spread']):>7s} "
                  f"{_pct(threshold(c, a.floor, a.spreads)):>9s}", file=out)
        return 0
    if len(a.files) < 2:
        raise SystemExit("give BASELINE.json RUN.json [RUN.json ...] (or --make-baseline OUT RUN1.json RUN2.json ...)")
    with open(a.files[0]) as fh:
        base = _tracked(json.load(fh), a.files[0])
    got = load_runs(a.files[1:])
    rows, warnings = compare(base, got, a.floor, a.spreads)
    for w in warnings:
        print(f"WARNING: {w}", file=out)
    print(f"{TRACKED} = fastest sample / the roof's fastest, interleaved in the same test; baseline: median of "
          f"{base['runs']} runs (load average "
          f"{_range(base['loadavg'])}); run: " + (f"median of {got['runs']} runs, " if got["runs"] > 1 else "")
          + f"load average {_range(got['loadavg'])}; threshold = "
          f"max({_pct(a.floor)}, {a.spreads:g} x the baseline's spread)", file=out)
    print(table(rows), file=out)
    bad = [r for r in rows if r["verdict"] in ("SLOWER", "MISSING")]
    print(f"{len(bad)} of {len(rows)} cases SLOWER or MISSING" + (": regression" if bad else ""), file=out)
    return 1 if bad else 0
