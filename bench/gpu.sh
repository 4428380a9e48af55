#!/usr/bin/env bash
# One session on a lent GPU, offline, in under 9 minutes:
#   1. install the package (editable pip install without network or dependencies),
#   2. versions and the card,
#   3. the Triton kernel tests and the runtime's GPU tests (tests/test_triton_*.py,
#      tests/test_gpu_runtime.py; on CUDA the gpu-marked tests run too; GPU_TESTS overrides),
#   4. bench/gpu_tune.py (the W4A16 tile sweep: tune.json, log tune.log; its table,
#      codegen/tuned/<card>.json, serves the steps after it; SKIP_TUNE=1 skips it),
#   5. bench/gpu_kernels.py (our kernels beside their anchors: kernels.json, kernels.md),
#   6. bench/gpu_e2e.py (decode on the runtime, 7B shape, eager then compiled by Inductor:
#      e2e.json; E2E_ARGS overrides its arguments, "" for eager only).
# No `set -e`: a failing step is logged and the next one runs. Every step runs under `timeout`,
# shortened when the session's time runs low. Few files come back from $OUT, so the logs are few:
# tests.log (setup, versions, tests, summary), tune.log, kernels.log, e2e.log.
#
#     OUT=/some/dir bash bench/gpu.sh          # $OUT defaults to bench/out
#
# Each step's cap leaves a reserve for the steps after it (TESTS_RESERVE, TUNE_RESERVE,
# KERNELS_RESERVE, in seconds; by default the shares of the later steps that run: 270, 200 and
# 150 when all run); e2e takes what is left. STEPS picks steps 3-6 (default
# "tests tune kernels e2e"). A 15-minute visit fits two calls, for example:
#     TOTAL_S=480 STEPS="tests tune kernels" GPU_TESTS="tests/test_triton_linear.py tests/test_gpu_runtime.py" \
#         bash bench/gpu.sh
#     TOTAL_S=300 STEPS=e2e bash bench/gpu.sh      # eager, then compiled by Inductor
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-$ROOT/bench/out}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # kernels run on the GPU, not in the interpreter
PY=${PY:-python3}
TOTAL_S=${TOTAL_S:-530}   # the whole session, < 9 minutes
T0=$SECONDS
LOG=$OUT/tests.log
: > "$LOG"

say() { echo "$*" | tee -a "$LOG"; }
step() { say ""; say "=== $* (at $((SECONDS - T0)) s)"; }
# seconds a step may take: its own cap, or what is left of the session less a reserve
cap() { local left=$((TOTAL_S - (SECONDS - T0) - ${2:-10})); ((left < 1)) && left=1; ((left < $1)) && echo "$left" || echo "$1"; }
# run CMD... with its output appended to the log file $1; returns CMD's exit status
logged() { local f=$1; shift; "$@" 2>&1 | tee -a "$f"; return "${PIPESTATUS[0]}"; }
declare -A RC=()
STEPS=" ${STEPS:-tests tune kernels e2e} "
want() { [[ "$STEPS" == *" $1 "* ]]; }
share() { want "$1" && echo "$2" || echo 0; }  # a later step's part of a reserve, if it runs
TESTS_RESERVE=${TESTS_RESERVE:-$(($(share tune 120) + $(share kernels 90) + $(share e2e 60)))}
TUNE_RESERVE=${TUNE_RESERVE:-$(($(share kernels 90) + $(share e2e 110)))}
KERNELS_RESERVE=${KERNELS_RESERVE:-$(share e2e 150)}

# --- 1. install -----------------------------------------------------------------------------
importable() { (cd /tmp && timeout 60 "$PY" -c "import qcompiler.codegen, qcompiler.runtime, qcompiler.passes, qcompiler; print('qcompiler from', qcompiler.__file__)"); }

step "install qcompiler (editable, offline, no dependencies)"
# editable, so the sweep's table (codegen/tuned/<card>.json) lands in this checkout and serves the
# later steps; PIP_BREAK_SYSTEM_PACKAGES lets pip write to a system Python marked as externally
# managed (older pips ignore it); --user where site-packages is not writable
PIP=("$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .)
logged "$LOG" env PIP_BREAK_SYSTEM_PACKAGES=1 timeout -k 5 120 "${PIP[@]}" \
  || logged "$LOG" env PIP_BREAK_SYSTEM_PACKAGES=1 timeout -k 5 120 "${PIP[@]}" --user
RC[install]=$?
logged "$LOG" importable
RC[import]=$?
((RC[import] == 0)) || say "qcompiler is not importable after pip (rc ${RC[install]}): the steps below will fail"

# --- 2. versions ----------------------------------------------------------------------------
step "card and versions"
logged "$LOG" timeout 30 nvidia-smi -L
logged "$LOG" timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
logged "$LOG" timeout 120 "$PY" -c "
import platform, torch
print('python', platform.python_version(), '| torch', torch.__version__, '| CUDA', torch.version.cuda,
      '| cuda available', torch.cuda.is_available())
try:
    import triton; print('triton', triton.__version__)
except Exception as e:
    print('triton: not importable:', type(e).__name__, e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, f'sm_{p.major}{p.minor}', p.multi_processor_count, 'SMs', round(p.total_memory / 2**30, 1), 'GiB')
"

# --- 3. Triton kernel tests -----------------------------------------------------------------
step "tests/test_triton_*.py"
if ! want tests; then
  RC[tests]=skipped
else
shopt -s nullglob
TESTS=(${GPU_TESTS:-tests/test_triton_*.py tests/test_gpu_runtime.py})
shopt -u nullglob
if ((${#TESTS[@]} == 0)); then
  say "no tests/test_triton_*.py in this checkout"
  RC[tests]=missing
else
  PYTEST_TIMEOUT=()
  if timeout 60 "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST_TIMEOUT=(--timeout 240); else say "(pytest-timeout not installed: no per-test timeout)"; fi
  logged "$LOG" timeout -k 5 "$(cap 200 "$TESTS_RESERVE")" "$PY" -m pytest -q --maxfail=8 ${PYTEST_TIMEOUT[@]+"${PYTEST_TIMEOUT[@]}"} -p no:cacheprovider "${TESTS[@]}"
  RC[tests]=$?
fi
fi

# --- 4. W4A16 tile sweep (its table serves the steps after it) ------------------------------
step "bench/gpu_tune.py"
T=$(cap "${TUNE_S:-150}" "$TUNE_RESERVE")
if [[ -n "${SKIP_TUNE:-}" ]] || ! want tune; then
  RC[tune]=skipped
elif ((T >= 20)); then
  : > "$OUT/tune.log"
  logged "$OUT/tune.log" timeout -k 5 "$((T + 30))" "$PY" bench/gpu_tune.py --budget "$T" ${TUNE_ARGS:-}
  RC[tune]=$?
else
  say "skipped: only ${T} s left"
  RC[tune]=skipped
fi

# --- 5. kernel benchmarks -------------------------------------------------------------------
step "bench/gpu_kernels.py"
if want kernels; then
  : > "$OUT/kernels.log"
  logged "$OUT/kernels.log" timeout -k 5 "$(cap 120 "$KERNELS_RESERVE")" "$PY" bench/gpu_kernels.py ${KERNELS_ARGS:-}
  RC[kernels]=$?
else
  RC[kernels]=skipped
fi

# --- 6. end to end --------------------------------------------------------------------------
step "bench/gpu_e2e.py"
if ! want e2e; then
  RC[e2e]=skipped
elif [[ -f bench/gpu_e2e.py ]]; then
  T=$(cap "${E2E_S:-600}" 10)
  if ((T >= 30)); then
    : > "$OUT/e2e.log"
    logged "$OUT/e2e.log" timeout -k 5 "$T" "$PY" bench/gpu_e2e.py ${E2E_ARGS---compile}
    RC[e2e]=$?
  else
    say "skipped: only ${T} s left"
    RC[e2e]=skipped
  fi
else
  say "no bench/gpu_e2e.py in this checkout"
  RC[e2e]=missing
fi

# --- summary --------------------------------------------------------------------------------
step "summary"
for k in install import tests tune kernels e2e; do say "  $k: ${RC[$k]:-not run} (0 = ok, 124 = timed out)"; done
say "  total: $((SECONDS - T0)) s"
ls -l "$OUT" | tee -a "$LOG"
for k in import tests kernels e2e; do [[ "${RC[$k]:-}" =~ ^(0|missing|skipped)$ ]] || exit 1; done
exit 0
