#!/usr/bin/env bash
# One-shot GPU run of benchmarks/train_step.py on the device machine (torch 2.11 + CUDA, no network).
# Carry .whl (pycocotools, tyro wheels for Python 3.12) with the call; results land in $OUT.
set -u
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r rfdetr_fn /tmp/pkg/ && cp -r kernels /tmp/pkg/rfdetr_fn/kernels
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1
cd /tmp && cp "$OLDPWD/benchmarks/train_step.py" /tmp/train_step.py
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
timeout "${EAGER_S:-90}" python3 /tmp/train_step.py --preset nano --batch-size 4 16 --device cuda --precision bf16 \
  --modes eager --steps 5 --warmup 2 --gpu-report --report-scales 3 2>&1 | tee "$OUT/eager.txt"
timeout "${COMPILED_S:-150}" python3 /tmp/train_step.py --preset nano --batch-size 4 --device cuda --precision bf16 \
  --modes compiled --steps 5 --warmup 1 --gpu-report --report-scales 1 2>&1 | tee "$OUT/compiled.txt"
