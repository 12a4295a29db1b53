#!/usr/bin/env bash
# GPU acceptance run: one command, from a fresh clone, on a machine with an NVIDIA GPU (issue 16).
#
#   bench/gpu_acceptance.sh                  # install, GPU tests, selftest, benchmark; report in build/gpu-acceptance/
#   bench/gpu_acceptance.sh --dry-run        # check the plan and the environment; runs nothing on a device
#
# Steps (each under its own `timeout`, its exit status recorded; every step runs even when an earlier one failed, so
# one call gives the whole picture; the script exits 1 if any step failed):
#   venv            create $VENV unless it exists
#   install-torch   pip install $TORCH_SPEC                       (skipped with --no-install)
#   install         pip install -e ".[test]": builds _C and, where nvcc is found, _C_cuda   (skipped with --no-install)
#   gpu             torch sees a CUDA device (a CPU build of torch fails here: set TORCH_SPEC)
#   info            zsnr-kernels info: versions, builds, which backends run and why not
#   gpu-tests       the tests that skip without a GPU (GPU_TESTS in this script); a skip fails the step here
#   selftest        zsnr-kernels selftest --require cpu cuda triton: every backend against the float64 reference
#   bench           zsnr-kernels bench --quick at the headline shapes (bench.TARGET_SHAPES), cuda/triton vs eager and
#                   torch.compile, CSV
#   bandwidth       the bench's GB/s as % of the GPU's spec-sheet peak HBM bandwidth
#
# Options:
#   --dry-run          check tools, paths and that every command parses (--help, argparse on the exact arguments,
#                      pytest --collect-only of the GPU tests, the bandwidth report on a synthetic CSV); no device work
#   --no-install       use $VENV as it is (no venv creation, no pip)
#   --report-dir DIR   where to write the report (default build/gpu-acceptance/<UTC time>; build/ is git-ignored)
#   --peak-gbps GBPS   peak memory bandwidth (GB/s) of a GPU the script's table (H100 SXM / PCIe, H200) lacks
# Environment:
#   TORCH_SPEC   what `pip install` gets for PyTorch (default torch==2.13.0).  Split into words, so an index may follow:
#                TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" where the default index
#                serves a CPU build, as the build machines' does (the CUDA tag: pytorch.org's install selector).
#   VENV         the virtual environment (default .venv in the clone)
#   PYTHON       the interpreter that creates it (default python3)
#   REPORT_DIR, PEAK_GBPS   as the options;  ZSNR_BUILD_CUDA, ZSNR_CUDA_ARCHS (default 80;90)   passed to the build
#
# The report directory holds acceptance.log (the console), one <step>.log per step, steps.tsv (step, status, exit
# status, seconds), env.log (GPU, driver, nvcc, commit), selftest.csv, bench.csv, bandwidth.csv / bandwidth.txt and
# summary.txt.
# Sized for under 8 minutes on one H100 (installs about 3, tests, selftest and bench about 1.5 each); not yet timed on
# one: the build machines have no GPU.

set -u
set -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY_RUN=0
INSTALL=1
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
REPORT_DIR=${REPORT_DIR:-}
PEAK_GBPS=${PEAK_GBPS:-}

usage() { sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --no-install) INSTALL=0 ;;
        --report-dir) REPORT_DIR=${2:?--report-dir needs a directory}; shift ;;
        --peak-gbps) PEAK_GBPS=${2:?--peak-gbps needs a number}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_acceptance.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# Per-step limits in seconds: generous for one H100; a step past its limit is killed and recorded as timed out.
LIMIT_VENV=120
LIMIT_INSTALL_TORCH=480
LIMIT_INSTALL=480
LIMIT_QUICK=60          # gpu, info and the dry run's checks
LIMIT_GPU_TESTS=300
LIMIT_SELFTEST=300      # on a GPU most of it is Triton compiling each kernel variant once
LIMIT_BENCH=300

# The tests that skip without a GPU (test_cuda_backend.py whole: its host-side tests take seconds).  The dry run
# checks that every test file with a `not torch.cuda.is_available()` skip is listed here.
GPU_TESTS=(
    tests/backends/test_cuda_backend.py
    tests/api/test_plan.py::test_cuda_graph_replay_equals_eager
    tests/tools/test_bench_smoke.py::test_cuda_rows
)
SELFTEST_ARGS=(selftest --require cpu cuda triton)
BENCH_ARGS=()            # set by bench_args (the shapes are read from the installed bench)
BENCH_DTYPES=(float32 bfloat16)
BENCH_BACKENDS=(cuda triton eager compile)

# Spec-sheet peak HBM bandwidth (GB/s) by `nvidia-smi --query-gpu=name`; others: --peak-gbps.  (The bench's own
# pct_peak comes from the device's memory clock and bus width; this column is the number users quote.)
peak_for_gpu() {
    case $1 in
        *H200*) echo 4800 ;;
        *H100*PCIe*) echo 2000 ;;
        *H100*SXM*|*H100*HBM3*) echo 3350 ;;
        *) echo "" ;;
    esac
}

# paths given relative to where the script was called from, before it moves to the clone's root
case $REPORT_DIR in /*|"") ;; *) REPORT_DIR=$PWD/$REPORT_DIR ;; esac
case $VENV in /*) ;; *) VENV=$PWD/$VENV ;; esac
cd "$ROOT" || exit 2
if [ -z "$REPORT_DIR" ]; then
    REPORT_DIR=$ROOT/build/gpu-acceptance/$(date -u +%Y%m%dT%H%M%SZ)$([ "$DRY_RUN" = 1 ] && echo -dry-run)
fi
mkdir -p "$REPORT_DIR" || exit 2
LOG=$REPORT_DIR/acceptance.log
: >"$REPORT_DIR/steps.tsv"
PY=$VENV/bin/python
CLI=$VENV/bin/zsnr-kernels
FAILED=0

say() { echo "$*" | tee -a "$LOG"; }

record() {  # record NAME RC SECONDS [NOTE]
    local status=ok
    [ "$2" = 0 ] || { status=FAIL; FAILED=$((FAILED + 1)); }
    { [ "$2" = 124 ] || [ "$2" = 137 ]; } && status=TIMEOUT
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$status" "$2" "$3" "${4:-}" >>"$REPORT_DIR/steps.tsv"
    say "-- $1: $status (exit $2, $3 s)${4:+: $4}"
}

step() {  # step NAME LIMIT_S COMMAND...: run it under timeout, its output to the console and to NAME.log
    local name=$1 limit=$2 t0=$SECONDS rc shown="" arg
    shift 2
    for arg in "$@"; do
        case $arg in *$'\n'*) shown+="<script> " ;; *) shown+="$arg " ;; esac  # an inline script by its name
    done
    say "== $name (limit ${limit} s): $shown"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$REPORT_DIR/$name.log" | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    record "$name" "$rc" $((SECONDS - t0)) "$([ "$rc" = 124 ] && echo "timed out after $limit s")"
}

check() {  # check NAME FUNCTION: a function of this shell (quick: no timeout); its exit status counts
    local name=$1 t0=$SECONDS rc
    say "== $name"
    "$2" >"$REPORT_DIR/$name.log" 2>&1
    rc=$?
    tee -a "$LOG" <"$REPORT_DIR/$name.log"
    record "$name" "$rc" $((SECONDS - t0))
}

skip() { printf '%s\tskipped\t-\t0\t%s\n' "$1" "$2" >>"$REPORT_DIR/steps.tsv"; say "-- $1: skipped ($2)"; }

# ------------------------------------------------------------------------------------------------ the steps

gpu_name() { nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1; }

environment() {
    echo "date: $(date -u +%FT%TZ)"
    echo "clone: $ROOT at $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo '(not a git checkout)')"
    echo "host: $(uname -srm), $(nproc) cores"
    echo "TORCH_SPEC=$TORCH_SPEC VENV=$VENV ZSNR_BUILD_CUDA=${ZSNR_BUILD_CUDA:-} ZSNR_CUDA_ARCHS=${ZSNR_CUDA_ARCHS:-}"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv
    else
        echo "nvidia-smi: not found"
    fi
    if command -v nvcc >/dev/null; then
        nvcc --version | tail -n 2
    else
        echo "nvcc: not found (the cuda backend needs it)"
    fi
}

# The bench's GB/s as % of the spec-sheet peak, next to the bench's own % of the peak from the device properties.
# Arguments: bench.csv, output directory, peak GB/s ("" if unknown), GPU name.
read -r -d '' BANDWIDTH_PY <<'EOF'
import csv, os, sys

src, out_dir, peak, gpu = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
peak = float(peak) if peak else None
if not os.path.exists(src):
    sys.exit(f"{src} is missing: the bench step wrote no CSV (see bench.log)")
with open(src, newline="") as fh:
    rows = [r for r in csv.DictReader(fh) if r["device"] == "cuda"]
if not rows:
    sys.exit(f"{src} has no CUDA rows: the benchmark did not run on the GPU (see bench.log)")

def pct(gbps):
    return f"{100 * float(gbps) / peak:.1f}" if peak and gbps not in ("", "nan") else ""

cols = ["op", "shape", "dtype", "backend", "us", "gbps", "pct_spec_peak", "graph_us", "graph_gbps",
        "graph_pct_spec_peak", "pct_peak", "graph_pct_peak", "x_eager", "x_compile"]
table = []
for r in rows:
    r = dict(r, pct_spec_peak=pct(r["gbps"]), graph_pct_spec_peak=pct(r.get("graph_gbps", "")))
    table.append([r.get(c, "") for c in cols])
with open(f"{out_dir}/bandwidth.csv", "w", newline="") as fh:
    w = csv.writer(fh)
    w.writerow(cols)
    w.writerows(table)
widths = [max(len(str(x)) for x in col) for col in zip(cols, *table)]
with open(f"{out_dir}/bandwidth.txt", "w") as fh:
    print(f"GPU: {gpu or 'unknown'}; spec-sheet peak: " + (f"{peak:.0f} GB/s" if peak else
          "unknown (pass --peak-gbps); pct_peak is the bench's, from the memory clock and bus width"), file=fh)
    print("pct_spec_peak: GB/s on the op's byte model / spec peak; graph_*: CUDA-graph replay; pct_peak: the bench's",
          file=fh)
    for line in [cols, *table]:
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)), file=fh)
print(open(f"{out_dir}/bandwidth.txt").read(), end="")
EOF

# Parses each command line (arguments 2.., each one shell-quoted word) with the command line's own parser, in one
# process (a --help line must print its help and exit 0), and writes a bench CSV of one CUDA row with the columns the
# bench writes today to argument 1, for BANDWIDTH_PY to read.
read -r -d '' PARSE_PY <<'EOF'
import contextlib, csv, io, shlex, sys
from zsnr_kernels.__main__ import parser
from zsnr_kernels.tools import bench

bad = 0
for line in sys.argv[2:]:
    shown = io.StringIO()
    try:
        with contextlib.redirect_stdout(shown), contextlib.redirect_stderr(shown):
            parser().parse_args(shlex.split(line))
    except SystemExit as exc:
        if exc.code:
            bad = 1
            print(f"does not parse: zsnr-kernels {line}\n{shown.getvalue()}")
            continue
    print(f"parses: zsnr-kernels {line}" + (f"  ({shown.getvalue().splitlines()[0]})" if shown.getvalue() else ""))

cols = bench.COLUMNS + bench.bandwidth_columns("peak")
row = dict.fromkeys(cols, "1")
row.update(device="cuda", op=bench.HEADLINE, shape=bench.fmt_shape(bench.TARGET_SHAPES[0]), dtype="float32",
           backend="cuda", gbps="2500", graph_gbps="2900")
with open(sys.argv[1], "w", newline="") as fh:
    w = csv.DictWriter(fh, cols)
    w.writeheader()
    w.writerow(row)
sys.exit(bad)
EOF

# pytest on the GPU tests, failing where any of them skipped: on the GPU machine each must run (a skip there means a
# backend that is not built or not installed; -rs prints why).  Arguments: pytest's.
read -r -d '' GPU_TESTS_PY <<'EOF'
import sys
import pytest

class Skips:
    nodeids = []

    def pytest_runtest_logreport(self, report):
        if report.skipped:
            self.nodeids.append(report.nodeid)

skips = Skips()
status = pytest.main(sys.argv[1:], plugins=[skips])
if status == 0 and skips.nodeids:
    print(f"{len(skips.nodeids)} GPU test(s) skipped: on a GPU machine every one must run (the SKIPPED lines say why)")
    status = 1
sys.exit(status)
EOF

quoted() { printf '%q ' "$@"; }  # a command line as one word, as PARSE_PY takes it

bench_args() {  # the bench's arguments; the headline shapes come from the bench itself
    local shapes
    shapes=$("$PY" -c 'from zsnr_kernels.tools import bench; print(*map(bench.fmt_shape, bench.TARGET_SHAPES))') ||
        return 1
    # shellcheck disable=SC2206  # the shapes are words by construction
    BENCH_ARGS=(bench --quick --shapes $shapes --dtypes "${BENCH_DTYPES[@]}" --backends "${BENCH_BACKENDS[@]}"
                --no-overhead --csv "$REPORT_DIR/bench.csv")
}

tools() {
    local ok=0
    if [ $((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1])) -ge 404 ]; then
        echo "bash $BASH_VERSION"
    else
        echo "bash $BASH_VERSION: 4.4 or newer needed (empty arrays under set -u)"; ok=1
    fi
    for t in timeout tee date; do
        if command -v $t >/dev/null; then echo "$t: $(command -v $t)"; else echo "$t: missing"; ok=1; fi
    done
    if [ -x "$PY" ]; then
        echo "venv python: $("$PY" --version 2>&1) ($PY)"
    elif [ "$INSTALL" = 0 ]; then
        echo "$PY is absent, and --no-install creates no venv"; ok=1
    elif command -v "$PYTHON" >/dev/null; then
        echo "$VENV is absent: a real run creates it with $PYTHON ($("$PYTHON" --version 2>&1))"
    else
        echo "$VENV is absent and there is no $PYTHON to create it (set PYTHON)"; ok=1
    fi
    command -v git >/dev/null || echo "git: missing (env.log will lack the commit)"
    command -v nvidia-smi >/dev/null && echo "GPU: $(gpu_name)" ||
        echo "nvidia-smi: not found (fine for --dry-run; a real run would fail its gpu step)"
    command -v nvcc >/dev/null ||
        echo "nvcc: not found (the install would build no cuda backend, and selftest --require cuda fails)"
    return $ok
}

paths() {
    local ok=0 p
    for p in pyproject.toml setup.py zsnr_kernels/__main__.py bench/gpu_acceptance.sh; do
        [ -e "$ROOT/$p" ] && echo "found $p" || { echo "missing $p"; ok=1; }
    done
    for p in "${GPU_TESTS[@]}"; do
        [ -e "$ROOT/${p%%::*}" ] && echo "found ${p%%::*}" || { echo "missing ${p%%::*}"; ok=1; }
    done
    # every test file with a GPU-only skip is listed in GPU_TESTS
    for p in $(grep -rl --include='*.py' "not torch.cuda.is_available()" tests); do
        printf '%s\n' "${GPU_TESTS[@]}" | grep -q "^$p" && echo "GPU tests of $p: listed" ||
            { echo "GPU tests of $p: NOT in GPU_TESTS of bench/gpu_acceptance.sh"; ok=1; }
    done
    echo "report: $REPORT_DIR"
    return $ok
}

plan_peak() {
    local name
    name=$(gpu_name)
    if [ -n "$PEAK_GBPS" ]; then
        echo "peak bandwidth: $PEAK_GBPS GB/s (given)"
    elif [ -n "$name" ] && [ -n "$(peak_for_gpu "$name")" ]; then
        echo "peak bandwidth of $name: $(peak_for_gpu "$name") GB/s"
    else
        echo "peak bandwidth: unknown${name:+ for $name} (a real run reports the bench's pct_peak; --peak-gbps sets it)"
    fi
    for g in "NVIDIA H100 80GB HBM3" "NVIDIA H100 PCIe" "NVIDIA H200"; do
        echo "spec-sheet table: $g -> $(peak_for_gpu "$g") GB/s"
    done
}

dry_run() {
    say "gpu_acceptance.sh --dry-run: checks only; nothing runs on a device (report: $REPORT_DIR)"
    check tools tools
    check paths paths
    check peak plan_peak
    if [ ! -x "$PY" ]; then
        skip parse "no $PY yet: the commands are parsed once the install made it"
    else
        bench_args || record bench-shapes 1 0 "the bench's headline shapes could not be read"
        step parse "$LIMIT_QUICK" "$PY" -c "$PARSE_PY" "$REPORT_DIR/dry-bench.csv" --help "selftest --help" \
            "bench --help" info "$(quoted "${SELFTEST_ARGS[@]}" --csv "$REPORT_DIR/selftest.csv")" \
            "$(quoted "${BENCH_ARGS[@]}")"
        if [ -x "$CLI" ]; then
            say "console script: $CLI"
        else
            record console-script 1 0 "no $CLI: pip install makes it"
        fi
        step collect-gpu-tests "$LIMIT_QUICK" "$PY" -c "$GPU_TESTS_PY" --collect-only -qq -p no:cacheprovider \
            "${GPU_TESTS[@]}"
        step bandwidth-report "$LIMIT_QUICK" "$PY" -c "$BANDWIDTH_PY" "$REPORT_DIR/dry-bench.csv" "$REPORT_DIR" 3350 \
            "the dry run's synthetic row"
    fi
    if [ "$INSTALL" = 1 ]; then
        step pip "$LIMIT_QUICK" bash -c '[ -x "$1/bin/pip" ] && "$1/bin/pip" --version || "$2" -m pip --version' _ \
            "$VENV" "$PYTHON"
        say "would run: pip install $TORCH_SPEC; pip install -e \".[test]\""
    fi
}

real_run() {
    local name peak
    say "gpu_acceptance.sh: report in $REPORT_DIR"
    check env environment
    if [ "$INSTALL" = 1 ]; then
        if [ -x "$PY" ]; then skip venv "$VENV exists"; else step venv "$LIMIT_VENV" "$PYTHON" -m venv "$VENV"; fi
        read -r -a torch_words <<<"$TORCH_SPEC"
        step install-torch "$LIMIT_INSTALL_TORCH" "$PY" -m pip install "${torch_words[@]}"
        step install "$LIMIT_INSTALL" "$PY" -m pip install -e ".[test]"
    else
        skip install "--no-install"
    fi
    step gpu "$LIMIT_QUICK" "$PY" -c 'import sys, torch
print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}")
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device" + (": this is a CPU build of torch; rerun with TORCH_SPEC naming a CUDA build"
             if torch.version.cuda is None else " (is the NVIDIA driver installed? nvidia-smi)"))
print(f"{torch.cuda.device_count()} device(s): {torch.cuda.get_device_name()}")'
    step info "$LIMIT_QUICK" "$CLI" info
    step gpu-tests "$LIMIT_GPU_TESTS" "$PY" -c "$GPU_TESTS_PY" -q -rs -p no:cacheprovider "${GPU_TESTS[@]}"
    step selftest "$LIMIT_SELFTEST" "$CLI" "${SELFTEST_ARGS[@]}" --csv "$REPORT_DIR/selftest.csv"
    if bench_args; then
        step bench "$LIMIT_BENCH" "$PY" -m zsnr_kernels "${BENCH_ARGS[@]}"
    else
        record bench 1 0 "the bench's headline shapes could not be read (is the package installed?)"
    fi
    name=$(gpu_name)
    peak=${PEAK_GBPS:-$(peak_for_gpu "$name")}
    step bandwidth "$LIMIT_QUICK" "$PY" -c "$BANDWIDTH_PY" "$REPORT_DIR/bench.csv" "$REPORT_DIR" "$peak" "$name"
}

if [ "$DRY_RUN" = 1 ]; then dry_run; else real_run; fi

{
    echo "steps ($(date -u +%FT%TZ)):"
    column -t -s $'\t' "$REPORT_DIR/steps.tsv" 2>/dev/null || cat "$REPORT_DIR/steps.tsv"
    [ -f "$REPORT_DIR/selftest.log" ] && grep -E '^selftest (passed|FAILED)' "$REPORT_DIR/selftest.log"
    [ -f "$REPORT_DIR/bandwidth.txt" ] && [ "$DRY_RUN" = 0 ] && cat "$REPORT_DIR/bandwidth.txt"
    if [ "$FAILED" = 0 ]; then
        echo "all steps passed"
    else
        echo "$FAILED step(s) failed: their logs are in $REPORT_DIR"
    fi
} | tee "$REPORT_DIR/summary.txt" | tee -a "$LOG"
[ "$FAILED" = 0 ]
