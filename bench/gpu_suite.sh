#!/usr/bin/env bash
# Every GPU correctness test and every benchmark of teskd_fast on one CUDA device, in one call (< 10 minutes
# on an H100). Usage: bash bench/gpu_suite.sh OUT_DIR
# Writes OUT_DIR/env.txt (card, driver, versions, date, command), tests.log, profile_loss.txt, profile_step.txt,
# bench.log, bench.json and results.md (the summary table: group, provider, median, speed-up against the
# group's baseline). Time caps: tests 170 s, profiles 90 s, benchmarks 330 s.
set -uo pipefail
out=${1:?usage: bash bench/gpu_suite.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET

# The GPU image may have no registry: install the package itself only (no dependencies, no build isolation).
# A failed install stops the suite here, with its log: every later import would fail otherwise.
if ! python -c "import teskd_fast.kernels.teskd_loss, teskd_fast.loss" 2>/dev/null; then
  if ! python -m pip install --quiet --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1; then
    echo "gpu_suite: installing teskd_fast failed; $out/install.log:" >&2
    tail -30 "$out/install.log" >&2
    exit 2
  fi
fi
# What the package needs and the image must already have (no registry there): fail loudly if one is missing.
if ! python -c "import torch, triton, torchvision, einops, yaml, tqdm, matplotlib, sklearn, PIL, teskd_fast.kernels.teskd_loss" \
    2> "$out/import.log"; then
  echo "gpu_suite: a dependency does not import; $out/import.log:" >&2
  cat "$out/import.log" >&2
  exit 2
fi

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "command: bash bench/gpu_suite.sh $out"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
for name in ("triton", "torchvision", "nvidia.dali"):
    try:
        mod = __import__(name, fromlist=["__version__"])
        print(name, mod.__version__)
    except ImportError:
        print(name, "not installed")
PY
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

status=0
echo "== tests (CUDA)"
timeout 170 python -m pytest tests/ -q -p no:cacheprovider --durations=20 > "$out/tests.log" 2>&1 || status=1
tail -5 "$out/tests.log"

echo "== profiles"
timeout 90 python bench/profile_gpu.py "$out" > "$out/profile.log" 2>&1 || status=1
tail -5 "$out/profile.log"

echo "== benchmarks"
timeout 330 python -m pytest bench/ -q -p no:cacheprovider --benchmark-json="$out/bench.json" \
  --benchmark-columns=median,iqr,rounds > "$out/bench.log" 2>&1 || status=1
tail -5 "$out/bench.log"
cp bench/results/latest.md "$out/results.md" 2>/dev/null && cat "$out/results.md"
exit $status
