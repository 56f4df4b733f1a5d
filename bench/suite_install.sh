#!/usr/bin/env bash
# The GPU suite's install stage (bench/gpu_suite.sh runs it): make this source tree's teskd_fast importable with
# what the image has, no package registry. Usage: bash bench/suite_install.sh WORK [--source-tree]
# 1. pip install --no-index --no-deps --no-build-isolation -e . (at most 25 s; the image may lack the `wheel`
#    package or pip may be unusable: then 2.; --source-tree: 2. straight away);
# 2. else the source tree itself: bench/source_tree (its sitecustomize maps teskd_fast to teskd_fast/ and
#    teskd_fast.kernels to kernels/, setup.py's package_dir mapping, in every Python process, whatever its working
#    folder or sys.path) goes on PYTHONPATH, and WORK/bin holds the four console scripts as small wrappers.
# Either way the check at the end imports teskd_fast and teskd_fast.kernels from this tree and every dependency
# the package and the suite need: a missing one fails the stage (exit 3) after install.env is written, and the
# suite goes on. Writes WORK/install.env (the variables the later stages source).
# The interpreter: GPU_SUITE_PYTHON (bench/gpu_suite.sh sets it), else python3, else python.
set -uo pipefail
work=${1:?usage: bash bench/suite_install.sh WORK [--source-tree]}
py=${GPU_SUITE_PYTHON:-$(command -v python3 || command -v python)}
py=$("$py" -c "import sys; print(sys.executable)")
repo=$(pwd)
: > "$work/install.env"

from_this_tree() {
  "$py" - "$repo" <<'PY'
import sys
from pathlib import Path

import teskd_fast
import teskd_fast.kernels.teskd_loss as kernel

repo = Path(sys.argv[1]).resolve()
package, kernels = Path(teskd_fast.__file__).resolve().parent, Path(kernel.__file__).resolve().parent
if (package, kernels) != (repo / "teskd_fast", repo / "kernels"):
    sys.exit(f"teskd_fast imports from {package} (kernels {kernels}), not from {repo}")
print(f"teskd_fast from {package}, teskd_fast.kernels from {kernels}")
PY
}

mode=""
if [ "${2:-}" = "--source-tree" ]; then
  echo "install: straight from the source tree (--source-tree)"
elif timeout -k 5 25 "$py" -m pip install --no-index --no-deps --no-build-isolation -e . ; then
  from_this_tree && mode="pip install -e (no index)"
else
  echo "install: pip could not install teskd_fast (above); running from the source tree"
fi
if [ -z "$mode" ]; then
  rm -rf "$work/bin"
  mkdir -p "$work/bin"
  for script in teskd-train:teskd_fast.train.cli teskd-scan:teskd_fast.data.scan teskd-plot:teskd_fast.train.plot \
                teskd-compare:teskd_fast.train.compare; do
    printf '#!/bin/sh\nexec %s -c "import sys; from %s import main; sys.exit(main())" "$@"\n' \
      "$py" "${script#*:}" > "$work/bin/${script%%:*}"
    chmod +x "$work/bin/${script%%:*}"
  done
  export TESKD_FAST_SOURCE_TREE="$repo" PYTHONPATH="$repo/bench/source_tree${PYTHONPATH:+:$PYTHONPATH}" \
    PATH="$work/bin:$PATH"
  printf 'export TESKD_FAST_SOURCE_TREE=%q PYTHONPATH=%q PATH=%q\n' "$repo" "$PYTHONPATH" "$PATH" > "$work/install.env"
  from_this_tree || exit 2
  mode="source tree (bench/source_tree/sitecustomize.py on PYTHONPATH)"
fi
echo "export GPU_SUITE_INSTALL=$(printf %q "$mode")" >> "$work/install.env"
echo "install: $mode"
# What the package's core, its tests and the suite need; the image must have them (no registry there). The
# optional ones (matplotlib, scikit-learn, timm, DALI, pytest-xdist) are listed by the env stage.
"$py" - <<'PY' || { echo "install: the stages that need the modules above will fail; the suite goes on" >&2; exit 3; }
import importlib, sys
missing = []
for name in ("torch", "triton", "torchvision", "numpy", "einops", "yaml", "tqdm", "PIL", "pytest", "pytest_benchmark",
             "pytest_timeout"):
    try:
        importlib.import_module(name)
    except Exception as e:
        missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    sys.exit("install: these do not import: " + "; ".join(missing))
PY
