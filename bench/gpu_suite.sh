#!/usr/bin/env bash
# The GPU suite: teskd_fast's CUDA tests, its GPU benchmarks and one short teskd-train on one CUDA device, in one
# call that fits a GPU lease (at most 6 minutes on an H200 from cold caches). See docs/gpu-suite.md.
#
# Usage: bash bench/gpu_suite.sh [--dry-run] OUT
#
# Stages, each under its own cap (seconds), in this order: install 30, env 20, tests 90 (pytest tests/ -m gpu),
# loss 40, step 60, data 30 (the GPU benchmarks: -m "gpu and not gpu_extra"), e2e 90 (teskd-train, compiled,
# bf16, 300 steps). A stage's cap interrupts it with SIGINT (pytest prints its summary and writes its reports),
# then kills it 10 s later. After every stage OUT holds the report of the stages so far: summary.md (read it
# first), results.json and logs.tar.gz (every stage's log and reports): three files, of the eight that come back.
#
# --dry-run: the same stages with CUDA hidden, to test the plumbing on a CPU (CI runs it, in under 2 minutes):
# the tests collected and skipped, the CPU smoke benchmarks, teskd-train at tiny sizes on the CPU.
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
unset TRITON_INTERPRET
if [ -n "$dry_run" ]; then
  # CUDA hidden; the tests skipped (tests/conftest.py); the model-step benchmark at 2 timed steps.
  export CUDA_VISIBLE_DEVICES="" TESKD_GPU_SUITE_DRY_RUN=1 TESKD_BENCH_ROUNDS=2
fi

stages=(install env tests loss step data e2e)
declare -A cap=([install]=30 [env]=20 [tests]=90 [loss]=40 [step]=60 [data]=30 [e2e]=90)
python - "$work" "${dry_run:+dry-run}" "${stages[@]}" <<PY
import json, sys
work, mode, stages = sys.argv[1], sys.argv[2] or "gpu", sys.argv[3:]
caps = {$(for s in "${stages[@]}"; do printf '"%s": %s, ' "$s" "${cap[$s]}"; done)}
json.dump({"mode": mode, "stages": stages, "caps": caps}, open(f"{work}/plan.json", "w"))
PY

report() {
  python bench/suite_report.py report "$work" "$out" > /dev/null 2> "$work/logs/report.err" \
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
  seconds=$(python -c "import sys; print(round($(date +%s.%N) - $start, 1))")
  printf '{"name": "%s", "rc": %d, "seconds": %s, "cap_s": %d}\n' "$name" "$rc" "$seconds" "${cap[$name]}" \
    >> "$work/stages.jsonl"
  tail -3 "$work/logs/$name.log"
  echo "-- $name: exit $rc in $seconds s"
  [ "$rc" -eq 0 ] || status=1
  report
  return "$rc"
}

if ! run_stage install bash bench/suite_install.sh "$work"; then
  echo "gpu_suite: the install stage failed; nothing else can run (summary.md says why)" >&2
  printf '{"name": "_why", "rc": 0, "seconds": 0, "cap_s": 0, "why": "the install stage failed"}\n' \
    >> "$work/stages.jsonl"
  report
  exit 2
fi
# shellcheck disable=SC1091
source "$work/install.env"

run_stage env python bench/suite_report.py env "$work"

pytest_args=(-q -p no:cacheprovider -rfEs --durations=15)
# A hung test fails after 60 s with its stack (pytest-timeout) instead of taking the whole stage.
tests_args=(-m gpu --timeout=60)
if [ -z "$dry_run" ] && python -c "import xdist" 2>/dev/null; then
  # The cold Triton and Inductor compiles dominate: four processes compile side by side.
  tests_args+=(-n 4)
fi
run_stage tests python -m pytest tests/ "${pytest_args[@]}" "${tests_args[@]}" --junitxml="$work/tests.xml"

# The GPU benchmarks; on the dry run the CPU smoke benchmarks of the same files instead.
bench_select=(-m "gpu and not gpu_extra")
[ -n "$dry_run" ] && bench_select=(-m smoke)
bench_args=(--benchmark-columns=median,iqr,rounds --benchmark-disable-gc)
[ -n "$dry_run" ] && bench_args+=(--benchmark-min-rounds=1 --benchmark-max-time=0.2)
# The dry run's share of the smoke selection: one figure per provider of the loss, the tiny step.
declare -A dry_select=([loss]=forward [step]=tiny [data]=smoke)
for stage in loss:bench_loss step:bench_models data:bench_data; do
  name=${stage%%:*}
  selection=("${bench_select[@]}")
  [ -n "$dry_run" ] && selection+=(-k "${dry_select[$name]}")
  run_stage "$name" python -m pytest "bench/${stage#*:}.py" "${pytest_args[@]}" "${selection[@]}" \
    "${bench_args[@]}" --benchmark-json="$work/$name.bench.json" --junitxml="$work/$name.xml"
done

run_stage e2e python bench/suite_e2e.py "$work" ${dry_run:+--dry-run}

echo
cat "$out/summary.md"
rm -rf "$work"
exit $status
