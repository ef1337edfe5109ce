#!/usr/bin/env bash
# One-shot GPU run of benchmarks/train_step.py on a machine with torch + CUDA but no network and no install
# of this package: carry .whl (pycocotools, tyro wheels for its Python) with the call; results land in $OUT.
# Three phases, each with its own time limit and its own table file, so a slow compile still leaves the
# earlier tables: eager bs 4 and 16 (with the GPU report), compiled bs 4 (with the report: one extra
# multi-scale size is compiled and revisited), compiled bs 16. Defaults add up to 570 s, under the device
# tool's 600 s per call; the compiled Nano step's first call is the unknown.
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
COMMON=(--preset nano --device cuda --precision bf16 --steps 5)
timeout "${EAGER_S:-90}" python3 train_step.py "${COMMON[@]}" --batch-size 4 16 --modes eager --warmup 2 \
  --gpu-report --report-scales 3 2>&1 | tee "$OUT/eager.txt"
timeout "${COMPILED4_S:-330}" python3 train_step.py "${COMMON[@]}" --batch-size 4 --modes compiled --warmup 1 \
  --gpu-report --report-scales 1 2>&1 | tee "$OUT/compiled_bs4.txt"
timeout "${COMPILED16_S:-150}" python3 train_step.py "${COMMON[@]}" --batch-size 16 --modes compiled --warmup 1 \
  2>&1 | tee "$OUT/compiled_bs16.txt"
