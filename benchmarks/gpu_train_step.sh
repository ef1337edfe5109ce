#!/usr/bin/env bash
# One-shot GPU run of the train-step benchmarks on a machine with torch + CUDA but no network and no install
# of this package: carry .whl (pycocotools, tyro wheels for its Python) with the call; results land in $OUT.
#
# Phases run in the order given by PHASES; each has its own time limit and writes its own table file, so a
# slow phase keeps the earlier results:
#   assign    device solver (Triton, torch ops, each eager and in a CUDA graph) vs scipy on one Nano step's
#             whole batch of matching problems, batch 4 and 16, 8 and 32 target slots   -> assign.txt
#   graph     eager vs whole-step CUDA graph (device matcher), batch 4 and 16, with host syncs/step,
#             kernels/step and captures while revisiting 3 multi-scale sizes           -> graph.txt
#   scipy     the eager step with the scipy matcher (the issue-6 baseline), batch 4 and 16 -> eager_scipy.txt
#   parity    20 graph-mode steps vs 20 eager steps: loss and parameter gaps            -> parity.txt
#   compiled  issue 6's torch.compile'd step, batch 4 (with the report) and 16          -> compiled_bs*.txt
# The default PHASES="assign graph scipy parity" adds up to 450 s, under the device tool's 600 s per call;
# run PHASES=compiled (480 s) in a call of its own: the compiled Nano step's first call is the unknown.
set -u
REPO=$(pwd)
WORK=$(mktemp -d)
OUT=${OUT:-$WORK/out}
mkdir -p "$OUT" "$WORK/pkg"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .whl/*.whl 2>/dev/null
cp -r rfdetr_fn "$WORK/pkg/" && cp -r kernels "$WORK/pkg/rfdetr_fn/kernels"  # the install maps kernels/ there
export PYTHONPATH="$WORK/pkg:$WORK/site" PYTHONUNBUFFERED=1
cd "$WORK" && cp "$REPO/benchmarks/train_step.py" "$REPO/benchmarks/assignment.py" .
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
COMMON=(--preset nano --device cuda --precision bf16)
for phase in ${PHASES:-assign graph scipy parity}; do
  case $phase in
    assign)
      timeout "${ASSIGN_S:-90}" python3 assignment.py --device cuda --batch-size 4 16 --slots 8 32 --reps 20 \
        2>&1 | tee "$OUT/assign.txt" ;;
    graph)
      timeout "${GRAPH_S:-210}" python3 train_step.py "${COMMON[@]}" --batch-size 4 16 --modes eager graphed \
        --steps 10 --warmup 2 --gpu-report --report-scales 3 2>&1 | tee "$OUT/graph.txt" ;;
    scipy)
      timeout "${SCIPY_S:-60}" python3 train_step.py "${COMMON[@]}" --batch-size 4 16 --modes eager --matcher scipy \
        --steps 5 --warmup 2 --gpu-report --report-scales 1 2>&1 | tee "$OUT/eager_scipy.txt" ;;
    parity)
      timeout "${PARITY_S:-90}" python3 train_step.py "${COMMON[@]}" --batch-size 4 --parity 20 \
        2>&1 | tee "$OUT/parity.txt" ;;
    compiled)
      timeout "${COMPILED4_S:-330}" python3 train_step.py "${COMMON[@]}" --steps 5 --batch-size 4 --modes compiled \
        --warmup 1 --gpu-report --report-scales 1 2>&1 | tee "$OUT/compiled_bs4.txt"
      timeout "${COMPILED16_S:-150}" python3 train_step.py "${COMMON[@]}" --steps 5 --batch-size 16 --modes compiled \
        --warmup 1 2>&1 | tee "$OUT/compiled_bs16.txt" ;;
    *) echo "unknown phase $phase (assign graph scipy parity compiled)" | tee -a "$OUT/errors.txt" ;;
  esac
done
