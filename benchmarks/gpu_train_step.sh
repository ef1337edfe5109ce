#!/usr/bin/env bash
# One-shot GPU run of benchmarks/train_step.py on a machine with torch + CUDA but no network and no install
# of this package: carry .whl (pycocotools, tyro wheels for its Python) with the call; results land in $OUT.
set -u
REPO=$(pwd)
WORK=$(mktemp -d)
OUT=${OUT:-$WORK/out}
mkdir -p "$OUT" "$WORK/pkg"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .whl/*.whl 2>/dev/null
cp -r rfdetr_fn "$WORK/pkg/" && cp -r kernels "$WORK/pkg/rfdetr_fn/kernels"  # the install maps kernels/ there
export PYTHONPATH="$WORK/pkg:$WORK/site" PYTHONUNBUFFERED=1
cd "$WORK" && cp "$REPO/benchmarks/train_step.py" .
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
timeout "${EAGER_S:-90}" python3 train_step.py --preset nano --batch-size 4 16 --device cuda --precision bf16 \
  --modes eager --steps 5 --warmup 2 --gpu-report --report-scales 3 2>&1 | tee "$OUT/eager.txt"
timeout "${COMPILED_S:-900}" python3 train_step.py --preset nano --batch-size 4 16 --device cuda --precision bf16 \
  --modes compiled --steps 5 --warmup 1 --gpu-report 2>&1 | tee "$OUT/compiled.txt"
