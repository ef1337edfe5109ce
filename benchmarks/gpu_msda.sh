#!/usr/bin/env bash
# One-shot GPU check for the Triton deformable attention: versions, the MSDA tests on CUDA, then the
# benchmark table. Run from the repo root; nothing is installed. `rfdetr_fn.kernels` maps to ./kernels only
# through the editable install, so a throw-away shim package (empty rfdetr_fn/__init__.py + a link to
# ./kernels) stands in for it: it needs only torch, triton and pytest, whatever else rfdetr_fn imports.
# Logs go to $OUT when set (the device tool), else /tmp.
set -u
export PYTHONUNBUFFERED=1
REPO=$(pwd)
LOGS=${OUT:-/tmp}
SHIM=$(mktemp -d)
mkdir -p "$SHIM/rfdetr_fn"
echo '"""Shim: only rfdetr_fn.kernels is imported by these checks."""' >"$SHIM/rfdetr_fn/__init__.py"
ln -s "$REPO/kernels" "$SHIM/rfdetr_fn/kernels"
export PYTHONPATH="$SHIM"
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$LOGS/versions.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton',
triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')" \
  2>&1 | tee -a "$LOGS/versions.txt"

# Run copies of the test file and conftest from the shim: the checkout's tests/ is a package, so pytest would
# put the repo root (whose rfdetr_fn/ lacks kernels/) first on sys.path.
mkdir -p "$SHIM/msda_tests"
cp "$REPO/tests/conftest.py" "$REPO/tests/test_msda.py" "$SHIM/msda_tests/"
cd "$SHIM" || exit 1
echo "== pytest tests/test_msda.py"
timeout "${TEST_TIMEOUT:-150}" $PY -m pytest "$SHIM/msda_tests/test_msda.py" -q -p no:cacheprovider --durations=6 \
  -W ignore::pytest.PytestUnknownMarkWarning 2>&1 | tee "$LOGS/pytest.log"
echo "== benchmark"
timeout "${BENCH_TIMEOUT:-170}" $PY "$REPO/benchmarks/msda.py" --device "${DEVICE:-cuda}" ${BENCH_ARGS:---sweep --graphs} \
  2>&1 | tee "$LOGS/bench.md"
