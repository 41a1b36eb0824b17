#!/usr/bin/env bash
# One time-boxed run on a CUDA GPU machine (issue 19): build lowbit._C with the CUDA kernels for sm_90, test every op
# on the triton and cuda backends against the reference at full size (opcheck and torch.compile included), then run
# the GPU benchmarks. Each phase runs under its own time limit inside a total budget (default 540 s), and after every
# phase summary.txt (each phase's status, rc and seconds) and a tarball of all logs are rewritten in $OUT, so a phase
# that fails or times out still leaves what was done.
#
# Usage, from the repository root (the device machine's own python3 holds torch with CUDA and triton):
#   OUT=/some/dir bash tools/gpu_check.sh                 # the GPU run (what `make gpu-check` does)
#   bash tools/gpu_check.sh --cpu-smoke --out DIR         # the same phases on CPU with tiny limits (tests the script)
#   bash tools/gpu_check.sh --dry-run                     # print the plan: phases, limits, commands
# Options:
#   --out DIR          results folder (default: $OUT, else results/gpu_check)
#   --python PY        interpreter (default: $PYTHON, else python3; with --cpu-smoke .venv/bin/python if present)
#   --build MODE       inplace (default: `setup.py build_ext --inplace`, incremental on a rerun), pip (`pip install
#                      -e .`, a full rebuild each time) or none (use the lowbit already importable)
#   --phases LIST      comma-separated subset of: env,build,tests,bench_fake_quant,bench_packed
#   --budget S         total seconds for all phases (default 540; 9 minutes)
#   --limit PHASE=S    one phase's own limit in seconds (repeatable)
#   --cpu-smoke        CPU, TRITON_INTERPRET=1, CUDA off, a few tests, quick benchmarks, 20-60 s limits
#   --dry-run          print the plan and exit
# Env: MAX_JOBS (parallel compile jobs; default nproc, 16 on the H200 machine), GPU_CHECK_PYTEST_ARGS (extra pytest arguments, word-split).
# Files in $OUT (at most 8, no folders, as the device tool returns them): summary.txt, tests.log, gpu_check.tar.gz
# (every log, the JUnit XML and the results), and the benchmark results fake_quant_cuda.{md,json} and
# packed_gpu_cuda.{md,json} (copy them to bench/results/ to commit them).
set -uo pipefail

PHASES_ALL=(env build tests bench_fake_quant bench_packed)
declare -A LIMIT=([env]=45 [build]=180 [tests]=200 [bench_fake_quant]=150 [bench_packed]=150)
declare -A SMOKE_LIMIT=([env]=60 [build]=60 [tests]=60 [bench_fake_quant]=60 [bench_packed]=20)
RESERVE=15 # seconds kept at the end: a stopped phase gets 10 s to exit (timeout -k), then the last publish

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() {
  echo "gpu_check: $*" >&2
  exit 2
}

ARGS=("$@")
OUT_DIR="${OUT:-}"
PY="${PYTHON:-}"
BUILD=inplace
PHASES_ARG=""
BUDGET=540
SMOKE=0
DRY=0
RUN_PHASE=""
declare -A LIMIT_ARG=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT_DIR="${2:?--out needs a folder}"; shift 2 ;;
    --python) PY="${2:?--python needs an interpreter}"; shift 2 ;;
    --build) BUILD="${2:?--build needs inplace, pip or none}"; shift 2 ;;
    --phases) PHASES_ARG="${2:?--phases needs a list}"; shift 2 ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift 2 ;;
    --limit) LIMIT_ARG["${2%%=*}"]="${2#*=}"; shift 2 ;;
    --cpu-smoke) SMOKE=1; shift ;;
    --dry-run) DRY=1; shift ;;
    --run-phase) RUN_PHASE="${2:?}"; shift 2 ;; # internal: the script runs each phase as a child under `timeout`
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[[ -f setup.py && -d csrc && -d tests ]] || die "run from the repository root (no setup.py, csrc/ and tests/ in $(pwd))"
ROOT="$(pwd)"
SCRIPT="$(realpath "$0")"
case "$BUILD" in inplace | pip | none) ;; *) die "--build must be inplace, pip or none; got '$BUILD'" ;; esac
[[ "$BUDGET" =~ ^[0-9]+$ && "$BUDGET" -gt "$RESERVE" ]] || die "--budget must be whole seconds above $RESERVE; got '$BUDGET'"
if [[ $SMOKE == 1 ]]; then
  for p in "${PHASES_ALL[@]}"; do LIMIT[$p]=${SMOKE_LIMIT[$p]}; done
  [[ -z "$PY" && -x .venv/bin/python ]] && PY=.venv/bin/python
fi
PY="${PY:-python3}"
for p in "${!LIMIT_ARG[@]}"; do
  [[ -v "LIMIT[$p]" ]] || die "--limit names an unknown phase '$p' (phases: ${PHASES_ALL[*]})"
  [[ "${LIMIT_ARG[$p]}" =~ ^[0-9]+$ ]] || die "--limit $p= needs whole seconds; got '${LIMIT_ARG[$p]}'"
  LIMIT[$p]=${LIMIT_ARG[$p]}
done
PHASES=("${PHASES_ALL[@]}")
if [[ -n "$PHASES_ARG" ]]; then
  IFS=, read -r -a PHASES <<<"$PHASES_ARG"
  for p in "${PHASES[@]}"; do [[ -v "LIMIT[$p]" ]] || die "--phases: unknown phase '$p' (phases: ${PHASES_ALL[*]})"; done
fi
OUT_DIR="${OUT_DIR:-$ROOT/results/gpu_check}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" # parallel compile jobs: 16 on the H200 machine

# ---- what each phase runs --------------------------------------------------------------------------------------

# Ops-level test files: every op on every backend that serves DEVICE, opcheck, torch.compile, properties, determinism.
TEST_FILES=(tests/test_backends.py tests/test_fake_quant.py tests/test_multi_branch_fake_quant.py
  tests/test_packed_linear.py tests/test_packed_triton.py tests/test_ops.py tests/test_determinism.py
  tests/test_properties.py)
if [[ $SMOKE == 1 ]]; then
  DEVICE=cpu
  REQUIRED=reference,cpu,triton
  export LOWBIT_CUDA=0 TRITON_INTERPRET=1
  BENCH_FAKE_ARGS=(--device cpu --quick)
  BENCH_PACKED_ARGS=(--quick --rounds 2)
  SMOKE_TESTS=(-k "opcheck or compile or required or ties_round_half")
else
  DEVICE=cuda
  REQUIRED=reference,triton,cuda
  export LOWBIT_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" # sm_90 only: the H200
  BENCH_FAKE_ARGS=(--device cuda)
  BENCH_PACKED_ARGS=(--quick)
  SMOKE_TESTS=()
fi

build_cmd() {
  case "$BUILD" in
    inplace) echo "$PY setup.py build_ext --inplace" ;;
    pip) echo "$PY -m pip install --no-deps --no-build-isolation --no-index --disable-pip-version-check -v -e ." ;;
    none) echo "true" ;;
  esac
}

print_plan() {
  local t=0 p
  echo "gpu_check plan: root $ROOT, python $PY, build $BUILD, device $DEVICE, budget ${BUDGET}s, out $OUT_DIR"
  echo "  env:  LOWBIT_CUDA=$LOWBIT_CUDA TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} MAX_JOBS=$MAX_JOBS" \
    "TRITON_INTERPRET=${TRITON_INTERPRET:-}"
  for p in "${PHASES[@]}"; do
    t=$((t + LIMIT[$p]))
    case "$p" in
      env) echo "  env              <= ${LIMIT[$p]}s  versions, GPU, nvcc, missing python modules" ;;
      build) echo "  build            <= ${LIMIT[$p]}s  $(build_cmd); import check (backends $REQUIRED)" ;;
      tests) echo "  tests            <= ${LIMIT[$p]}s  LOWBIT_TEST_DEVICE=$DEVICE LOWBIT_TRITON_AUTOTUNE=off pytest ${TEST_FILES[*]} ${SMOKE_TESTS[*]}" ;;
      bench_fake_quant) echo "  bench_fake_quant <= ${LIMIT[$p]}s  bench/bench_fake_quant.py ${BENCH_FAKE_ARGS[*]}" ;;
      bench_packed) echo "  bench_packed     <= ${LIMIT[$p]}s  LOWBIT_TRITON_AUTOTUNE=quick bench/bench_packed_gpu.py ${BENCH_PACKED_ARGS[*]}" ;;
    esac
  done
  echo "  phase limits add up to ${t}s; each phase also stops at the total budget (${BUDGET}s less ${RESERVE}s)"
}

if [[ $DRY == 1 ]]; then
  print_plan
  exit 0
fi

# ---- bookkeeping -----------------------------------------------------------------------------------------------

if [[ -n "$RUN_PHASE" ]]; then
  WORK="${GPU_CHECK_WORK:?--run-phase is internal: GPU_CHECK_WORK must name the work folder}"
else
  mkdir -p "$OUT_DIR" || die "cannot create $OUT_DIR"
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
  export GPU_CHECK_WORK="$WORK"
fi
RESULTS="$WORK/results"
mkdir -p "$RESULTS"
START=$(date +%s)
SUMMARY="$WORK/summary.txt"
declare -A STATUS=() RC=() SECS=() NOTE=()

# A line for the summary's notes (phases run as child processes, so the notes go through a file).
note() {
  echo "$*" >>"$WORK/notes.txt"
  echo "gpu_check: $*"
}

write_summary() {
  local p
  {
    echo "# gpu_check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(($(date +%s) - START)) s since start)"
    echo "mode: $([[ $SMOKE == 1 ]] && echo cpu-smoke || echo gpu)  device: $DEVICE  build: $BUILD  budget: ${BUDGET}s"
    echo "python: $PY  root: $ROOT"
    printf '%-17s %-9s %5s %6s %6s  %s\n' phase status rc secs limit note
    for p in "${PHASES[@]}"; do
      printf '%-17s %-9s %5s %6s %6s  %s\n' "$p" "${STATUS[$p]:-pending}" "${RC[$p]:--}" "${SECS[$p]:--}" \
        "${LIMIT[$p]}" "${NOTE[$p]:-}"
    done
    [[ -f "$WORK/notes.txt" ]] && { echo; sed 's/^/note: /' "$WORK/notes.txt"; }
    [[ -f "$WORK/env.log" ]] && { echo; echo "## environment"; cat "$WORK/env.log"; }
    [[ -f "$WORK/tests_outcome.txt" ]] && { echo; echo "## tests"; cat "$WORK/tests_outcome.txt"; }
  } >"$SUMMARY"
}

# Copies the summary, the test log, the results and a tarball of everything into OUT_DIR (8 files at most).
publish() {
  write_summary
  cp "$SUMMARY" "$OUT_DIR/summary.txt"
  [[ -f "$WORK/tests.log" ]] && cp "$WORK/tests.log" "$OUT_DIR/tests.log"
  local f
  for f in "$RESULTS"/*.md "$RESULTS"/*.json; do [[ -f "$f" ]] && cp "$f" "$OUT_DIR/"; done
  tar -czf "$OUT_DIR/gpu_check.tar.gz.tmp" -C "$WORK" . 2>/dev/null && mv "$OUT_DIR/gpu_check.tar.gz.tmp" \
    "$OUT_DIR/gpu_check.tar.gz"
}

if [[ -z "$RUN_PHASE" ]]; then
  trap 'publish' EXIT
  trap 'note "interrupted"; exit 130' INT TERM
fi

# run_phase NAME: runs phase_NAME (this script again, with --run-phase NAME) under the phase's limit, capped by what
# is left of the budget; its output goes to WORK/NAME.log.
run_phase() {
  local name=$1
  local left=$((START + BUDGET - RESERVE - $(date +%s)))
  local limit=${LIMIT[$name]}
  ((left < limit)) && limit=$left
  if ((limit < 5)); then
    STATUS[$name]=skipped
    NOTE[$name]="no time left in the ${BUDGET}s budget"
    publish
    return 1
  fi
  local t0 rc
  t0=$(date +%s)
  echo "gpu_check: phase $name (limit ${limit}s) ..."
  # timeout signals the whole process group: pytest-xdist workers, ninja and nvcc stop with the phase.
  timeout -k 10 "$limit" bash "$SCRIPT" "${ARGS[@]}" --run-phase "$name" >"$WORK/$name.log" 2>&1
  rc=$?
  SECS[$name]=$(($(date +%s) - t0))
  RC[$name]=$rc
  if [[ $rc == 0 ]]; then
    STATUS[$name]=ok
  elif [[ $rc == 124 || $rc == 137 ]]; then
    STATUS[$name]=timeout
    NOTE[$name]="stopped at its ${limit}s limit${NOTE[$name]:+; ${NOTE[$name]}}"
  else
    STATUS[$name]=failed
  fi
  echo "gpu_check: phase $name: ${STATUS[$name]} (rc $rc, ${SECS[$name]}s)"
  if [[ $rc != 0 ]]; then
    echo "---- last lines of $name.log ----"
    tail -n 25 "$WORK/$name.log"
    echo "----"
  fi
  publish
  return "$rc"
}

skip_phase() {
  STATUS[$1]=skipped
  NOTE[$1]="$2"
  echo "gpu_check: phase $1 skipped: $2"
  publish
}

# ---- the phases --------------------------------------------------------------------------------------------------

phase_env() {
  "$PY" - "$WORK/modules.txt" <<'PY'
import importlib.util
import platform
import sys

print(f"python {platform.python_version()} ({sys.executable})")
try:
    import torch

    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        cap = ".".join(map(str, torch.cuda.get_device_capability()))
        print(f"GPU {torch.cuda.get_device_name()} (sm {cap}), {torch.cuda.device_count()} device(s)")
except Exception as exc:  # report, never stop: the summary says what is missing
    print(f"torch: cannot import ({type(exc).__name__}: {exc})")
needed = {  # module: what its absence costs
    "torch": "nothing runs",
    "numpy": "nothing runs",
    "setuptools": "no build",
    "ninja": "no parallel build (MAX_JOBS)",
    "pytest": "the tests phase is skipped",
    "triton": "no triton backend",
    "hypothesis": "tests/test_properties.py is skipped (said in the summary)",
    "xdist": "the tests run serially (no pytest -n)",
    "pytest_timeout": "no per-test time limit (a hung test takes the whole phase)",
    "safetensors": "lowbit.save/load fail",
    "sklearn": "lowbit.app.data fails",
    "matplotlib": "no plots",
    "tqdm": "no progress bars",
}


def absent(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ImportError:  # a broken install counts as missing
        return True


missing = [m for m in needed if absent(m)]
for m in missing:
    print(f"MISSING {m}: {needed[m]}")
with open(sys.argv[1], "w") as f:
    f.write("\n".join(missing) + ("\n" if missing else ""))
if not missing:
    print("all needed python modules are present")
PY
  local rc=$?
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv,noheader || echo "nvidia-smi: not found"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 | head -n 1 || echo "nvcc: not found"
  echo "cpus $(nproc), MAX_JOBS $MAX_JOBS"
  return $rc
}

# missing MODULE: true when the env phase found MODULE absent (asks python itself if that phase did not finish).
missing() {
  if [[ -f "$WORK/modules.txt" ]]; then
    grep -qx "$1" "$WORK/modules.txt"
  else
    ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)" "$1"
  fi
}

# lowbit.kernels is the repository's kernels/ folder, which an install maps (setup.py's package_dir). Without an
# install (the device machine's throwaway copy of the tree), a link lowbit/kernels -> ../kernels lets the in-place
# build import it; it is made after the build and removed before the next (setup.py would list the package twice).
KERNELS_LINK=lowbit/kernels

phase_build() {
  [[ -L $KERNELS_LINK && "$(readlink $KERNELS_LINK)" == ../kernels ]] && rm "$KERNELS_LINK"
  if [[ $BUILD != none ]]; then
    echo "+ $(build_cmd)"
    $(build_cmd) || return 1
  fi
  if [[ $BUILD == inplace ]] && ! "$PY" -c "import lowbit.kernels" 2>/dev/null; then
    echo "+ ln -s ../kernels $KERNELS_LINK"
    ln -s ../kernels "$KERNELS_LINK" || return 1
  fi
  echo "+ import check"
  "$PY" - "$ROOT" "$REQUIRED" <<'PY'
import os
import sys

import lowbit
import lowbit.kernels
from lowbit.backends import status

root, required = sys.argv[1], sys.argv[2].split(",")
print(f"lowbit from {os.path.dirname(lowbit.__file__)}, lowbit.kernels from {lowbit.kernels.__path__[0]}")
for name in ("reference", "cpu", "triton", "cuda"):
    st = status(name)
    print(f"backend {name}: {'available' if st.available else 'unavailable'} ({st.reason}) devices {st.devices}")
if not os.path.realpath(lowbit.__file__).startswith(os.path.realpath(root) + os.sep):
    sys.exit(f"lowbit was imported from {lowbit.__file__}, not from {root}")
absent = [n for n in required if not status(n).available]
if absent:
    sys.exit(f"required backends unavailable: {', '.join(absent)}")
PY
}

phase_tests() {
  # -v: one line per test, so a phase stopped at its limit shows which tests were running.
  local args=(-v -p no:cacheprovider -rfEs --durations=25 --junitxml="$WORK/tests.xml")
  if missing hypothesis; then
    local kept=() f # dropped from the file list: pytest collects a named file even with --ignore
    for f in "${TEST_FILES[@]}"; do [[ $f == tests/test_properties.py ]] || kept+=("$f"); done
    TEST_FILES=("${kept[@]}")
    note "tests/test_properties.py skipped: hypothesis is not installed on this machine"
  else
    args+=(--hypothesis-show-statistics)
  fi
  if ! missing xdist && [[ $SMOKE == 0 ]]; then
    args+=(-n 8)
  fi
  missing pytest_timeout || args+=(--timeout=120)
  # shellcheck disable=SC2206  # word splitting of the user's extra arguments is intended
  local extra=(${GPU_CHECK_PYTEST_ARGS:-})
  echo "+ LOWBIT_TEST_DEVICE=$DEVICE LOWBIT_REQUIRE_BACKENDS=$REQUIRED LOWBIT_TRITON_AUTOTUNE=off $PY -m pytest" \
    "${args[*]} ${TEST_FILES[*]} ${SMOKE_TESTS[*]} ${extra[*]}"
  # Autotuning off: every configuration would compile once per specialization on a fresh machine (minutes); the
  # tests reach every kernel path and several configurations directly, and the benchmark checks the tuned ones.
  LOWBIT_TEST_DEVICE=$DEVICE LOWBIT_REQUIRE_BACKENDS=$REQUIRED LOWBIT_TRITON_AUTOTUNE=off PYTHONUNBUFFERED=1 \
    "$PY" -m pytest "${args[@]}" "${TEST_FILES[@]}" "${SMOKE_TESTS[@]}" "${extra[@]}"
}

phase_bench_fake_quant() {
  echo "+ $PY bench/bench_fake_quant.py ${BENCH_FAKE_ARGS[*]} --out $RESULTS"
  PYTHONUNBUFFERED=1 "$PY" bench/bench_fake_quant.py "${BENCH_FAKE_ARGS[@]}" --out "$RESULTS"
}

phase_bench_packed() {
  echo "+ LOWBIT_TRITON_AUTOTUNE=quick $PY bench/bench_packed_gpu.py ${BENCH_PACKED_ARGS[*]} --out $RESULTS/packed_gpu_cuda"
  # A subset of the autotuning configurations: the full search compiles ~450 GEMV variants (minutes).
  LOWBIT_TRITON_AUTOTUNE=quick PYTHONUNBUFFERED=1 "$PY" bench/bench_packed_gpu.py "${BENCH_PACKED_ARGS[@]}" \
    --out "$RESULTS/packed_gpu_cuda"
}

# Tests and benchmarks import lowbit from this checkout (the in-place build has no install).
[[ $BUILD == inplace ]] && export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "$RUN_PHASE" ]]; then
  "phase_$RUN_PHASE"
  exit $?
fi
print_plan | tee "$WORK/plan.txt"
for p in "${PHASES[@]}"; do STATUS[$p]=pending; done
publish

BUILT=1
for p in "${PHASES[@]}"; do
  case "$p" in
    env) run_phase env ;;
    build) run_phase build || BUILT=0 ;;
    tests | bench_fake_quant | bench_packed)
      if [[ $BUILT == 0 ]]; then
        skip_phase "$p" "the build phase failed: lowbit cannot run"
      elif [[ $p == tests ]] && missing pytest; then
        skip_phase tests "pytest is not installed on this machine"
      else
        run_phase "$p"
        if [[ $p == tests && -f "$WORK/tests.log" ]]; then
          { grep -E '^(FAILED|ERROR) |[0-9]+ (passed|failed)|no tests ran' "$WORK/tests.log" | tail -n 40
            [[ ${STATUS[tests]} == timeout ]] && { echo "last lines before the limit:"; tail -n 5 "$WORK/tests.log"; }
          } >"$WORK/tests_outcome.txt"
        fi
      fi
      ;;
  esac
done

FAILED=0
for p in "${PHASES[@]}"; do [[ ${STATUS[$p]} == ok ]] || FAILED=1; done
publish
trap - EXIT
echo
cat "$OUT_DIR/summary.txt"
echo "gpu_check: files in $OUT_DIR: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
exit $FAILED
