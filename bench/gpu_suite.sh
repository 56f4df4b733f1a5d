#!/usr/bin/env bash
# The GPU suite: teskd_fast's CUDA tests, its GPU benchmarks and one short teskd-train on one CUDA device, in one
# call that fits a GPU lease (at most 6 minutes on an H200 from cold caches). See docs/gpu-suite.md.
#
# Usage: bash bench/gpu_suite.sh [--dry-run] OUT
#
# Stages, each under its own cap (seconds), in this order: install 45, env 25, tests 90 (pytest tests/ -m gpu),
# loss 35, data 30, step 55 (the GPU benchmarks: -m "gpu and not gpu_extra"), e2e 80 (teskd-train, compiled,
# bf16, 300 steps). Right after install, the warm-up (bench/suite_warmup.py, cap 240) starts in the background:
# it compiles the step's and the e2e run's graphs into Inductor's and AOTAutograd's caches (TORCHINDUCTOR_CACHE_DIR,
# shared by every process), and those two stages wait for it (bounded) so that they load the graphs instead of
# compiling them cold under their caps. A stage's cap interrupts it with SIGINT (pytest prints its summary and
# writes its reports), then kills it 10 s later. After every stage OUT holds the report of the stages so far:
# summary.md (read it first), results.json and logs.tar.gz (every stage's log and reports): three files, of the
# eight that come back.
#
# --dry-run: the same stages with CUDA hidden, to test the plumbing on a CPU (CI runs it, in under 2 minutes):
# the tests collected and skipped, the CPU smoke benchmarks, the warm-up and teskd-train at tiny sizes on the CPU.
#
# GPU_SUITE_PYTHON: the interpreter of every stage (default: python3, as the GPU image promises; else python).
set -uo pipefail
dry_run=""
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
out=${1:?usage: bash bench/gpu_suite.sh [--dry-run] OUT}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")
mkdir -p "$work/logs"
export GPU_SUITE_COMMAND="bash bench/gpu_suite.sh ${dry_run:+--dry-run }$out"
# The interpreter itself, not a launcher (a pyenv shim costs a shell start per call).
py=${GPU_SUITE_PYTHON:-$(command -v python3 || command -v python)}
py=$("$py" -c "import sys; print(sys.executable)")
export GPU_SUITE_PYTHON=$py
unset TRITON_INTERPRET
# One compile cache for every process of the suite (the warm-up's compiles are the later stages' cache hits);
# a second suite in the same lease finds it warm. FX graph and AOTAutograd caches on (PyTorch's default since 2.5).
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-/tmp}/torchinductor_$(id -un 2>/dev/null || echo user)}
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
if [ -n "$dry_run" ]; then
  # CUDA hidden; the tests skipped (tests/conftest.py); the model-step benchmark at 2 timed steps.
  export CUDA_VISIBLE_DEVICES="" TESKD_GPU_SUITE_DRY_RUN=1 TESKD_BENCH_ROUNDS=2
fi

# The warm-up runs in the background beside env, tests, loss and data; its cap does not add to the suite's.
stages=(install warmup env tests loss data step e2e)
declare -A cap=([install]=45 [warmup]=240 [env]=25 [tests]=90 [loss]=35 [data]=30 [step]=55 [e2e]=80)
"$py" - "$work" "${dry_run:+dry-run}" "${stages[@]}" <<PY
import json, sys
work, mode, stages = sys.argv[1], sys.argv[2] or "gpu", sys.argv[3:]
caps = {$(for s in "${stages[@]}"; do printf '"%s": %s, ' "$s" "${cap[$s]}"; done)}
json.dump({"mode": mode, "stages": stages, "caps": caps, "background": ["warmup"],
           "cache_dir": "$TORCHINDUCTOR_CACHE_DIR"}, open(f"{work}/plan.json", "w"))
PY

report() {
  "$py" bench/suite_report.py report "$work" "$out" > /dev/null 2> "$work/logs/report.err" \
    || echo "gpu_suite: the report failed: $(tail -1 "$work/logs/report.err")" >&2
}

# run_stage NAME CMD...: CMD under the stage's cap (SIGINT at cap - 10 s, SIGKILL at cap), its output in
# WORK/logs/NAME.log; then one line in WORK/stages.jsonl and the report rewritten.
status=0
run_stage() {
  local name=$1; shift
  local start rc
  echo "== $name (cap ${cap[$name]} s): $*"
  # Reported as running until it ends: a suite stopped from outside (the lease's limit) says which stage it was in.
  echo "$name" > "$work/running"
  report
  start=$(date +%s.%N)
  timeout -s INT -k 10 $((cap[$name] - 10)) "$@" > "$work/logs/$name.log" 2>&1
  rc=$?
  local seconds
  seconds=$("$py" -c "print(round($(date +%s.%N) - $start, 1))")
  printf '{"name": "%s", "rc": %d, "seconds": %s, "cap_s": %d, "start": %s}\n' "$name" "$rc" "$seconds" \
    "${cap[$name]}" "$start" >> "$work/stages.jsonl"
  tail -3 "$work/logs/$name.log"
  echo "-- $name: exit $rc in $seconds s"
  [ "$rc" -eq 0 ] || status=1
  report
  return "$rc"
}

if ! run_stage install bash bench/suite_install.sh "$work"; then
  # Keep going: with what the stage set up, or else straight from the source tree (no pip); the stages that
  # cannot run without what is missing fail and say so.
  if ! grep -q GPU_SUITE_INSTALL "$work/install.env" 2>/dev/null; then
    echo "gpu_suite: the install stage did not finish; running from the source tree" >&2
    timeout -k 5 30 bash bench/suite_install.sh "$work" --source-tree >> "$work/logs/install.log" 2>&1 \
      || echo "gpu_suite: the source-tree fallback failed too (logs: install.log); going on" >&2
  fi
fi
# shellcheck disable=SC1091
source "$work/install.env"

# The warm-up, in the background under its own cap; its line in stages.jsonl is written when it ends.
(
  start=$(date +%s.%N)
  timeout -s INT -k 10 $((cap[warmup] - 10)) "$py" bench/suite_warmup.py run "$work" ${dry_run:+--dry-run} \
    > "$work/logs/warmup.log" 2>&1
  rc=$?
  printf '{"name": "warmup", "rc": %d, "seconds": %s, "cap_s": %d, "start": %s}\n' "$rc" \
    "$("$py" -c "print(round($(date +%s.%N) - $start, 1))")" "${cap[warmup]}" "$start" >> "$work/stages.jsonl"
) &
warmup_pid=$!
echo "$warmup_pid" > "$work/warmup.pid"
echo "== warmup (background, cap ${cap[warmup]} s): bench/suite_warmup.py run"

run_stage env "$py" bench/suite_report.py env "$work"

pytest_args=(-q -p no:cacheprovider -rfEs --durations=15)
# A hung test fails after 60 s with its stack (pytest-timeout) instead of taking the whole stage.
# TESKD_GPU_TEST_TIMEOUT: over the modules' own timeout markers too (tests/conftest.py).
tests_args=(-m gpu --timeout=60)
export TESKD_GPU_TEST_TIMEOUT=60
if [ -z "$dry_run" ] && "$py" -c "import xdist" 2>/dev/null; then
  # The cold Triton and Inductor compiles dominate: four processes compile side by side.
  tests_args+=(-n 4)
fi
run_stage tests "$py" -m pytest tests/ "${pytest_args[@]}" "${tests_args[@]}" --junitxml="$work/tests.xml"

# The GPU benchmarks; on the dry run the CPU smoke benchmarks of the same files instead.
bench_select=(-m "gpu and not gpu_extra")
[ -n "$dry_run" ] && bench_select=(-m smoke)
bench_args=(--benchmark-columns=median,iqr,rounds --benchmark-disable-gc)
[ -n "$dry_run" ] && bench_args+=(--benchmark-min-rounds=1 --benchmark-max-time=0.2)
# The dry run's share of the smoke selection: one figure per provider of the loss, the tiny step.
declare -A dry_select=([loss]=forward [step]=tiny [data]=smoke)
# The step stage after loss and data: the warm-up has had the tests, loss and data stages to compile its graph;
# it waits for it (at most 30 s of its cap) rather than compile it a second time beside the warm-up.
declare -A wait_for=([step]=30)
for stage in loss:bench_loss data:bench_data step:bench_models; do
  name=${stage%%:*}
  selection=("${bench_select[@]}")
  [ -n "$dry_run" ] && selection+=(-k "${dry_select[$name]}")
  waiting=()
  [ -n "${wait_for[$name]:-}" ] && waiting=("$py" bench/suite_warmup.py wait "$work" "$name" "${wait_for[$name]}" --)
  run_stage "$name" ${waiting[@]+"${waiting[@]}"} "$py" -m pytest "bench/${stage#*:}.py" "${pytest_args[@]}" "${selection[@]}" \
    "${bench_args[@]}" --benchmark-json="$work/$name.bench.json" --junitxml="$work/$name.xml"
done

# The e2e run stops itself 20 s before the cap (SIGINT, then its process group killed 8 s later) and writes
# e2e.json whatever happened; the wait for the warm-up's e2e graphs is inside that deadline.
run_stage e2e "$py" bench/suite_warmup.py wait "$work" e2e 25 -- "$py" bench/suite_e2e.py "$work" \
  --deadline $(($(date +%s) + cap[e2e] - 20)) ${dry_run:+--dry-run}

# A warm-up still running (it failed to finish in time) is stopped: SIGINT, then SIGKILL, to the process group of
# its `timeout` (timeout leads a group of its own: the warm-up, its teskd-train and their compile workers).
if kill -0 "$warmup_pid" 2>/dev/null; then
  for pid in $(pgrep -P "$warmup_pid"); do kill -INT -- "-$pid" 2>/dev/null; done
  sleep 3
  for pid in $(pgrep -P "$warmup_pid"); do kill -KILL -- "-$pid" 2>/dev/null; done
fi
wait "$warmup_pid" 2>/dev/null
report

echo
cat "$out/summary.md"
rm -rf "$work"
exit $status
