"""One rank of the data-parallel test; `tests/test_distributed.py` launches two with torch.distributed.run.

    python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker.py OUT [eager|compile]

eager (default): each rank trains on its half of `global_batch()` for STEPS eager steps with `world_size=2`,
then writes to OUT its flat train state and per-step metrics (`trained_rank{r}.pt`), a DCP train state saved
by both ranks (`state2/`) and the state it loads from `OUT/state1/` (saved by one process before the launch;
`loaded_rank{r}.pt`). compile: one step through compile_step (fullgraph pieces, backend="aot_eager"), so the
functional collectives must trace into the update graph (`compiled_rank{r}.pt`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import rfdetr_fn as rf
from rfdetr_fn import tree
from rfdetr_fn.config import TrainConfig
from rfdetr_fn.io import distributed
from rfdetr_fn.io.checkpoint import load_state, save_state
from rfdetr_fn.step import compile_step, make_train_step

STEPS = 3
WORLD = 2
PER_RANK = 2
# Unequal boxes per rank (rank 0: 3 + 1, rank 1: 2 + 1): a per-rank loss normaliser would change the update.
LABELS = [[0, 2, 1], [1], [2, 0], [0]]
BOXES = [
    [[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4], [0.5, 0.2, 0.2, 0.1]],
    [[0.5, 0.5, 0.4, 0.3]],
    [[0.25, 0.7, 0.3, 0.3], [0.6, 0.4, 0.2, 0.5]],
    [[0.5, 0.5, 0.6, 0.6]],
]


def configs():
    cfg = rf.presets.tiny(num_classes=3, resolution=64)
    return cfg, TrainConfig(batch_size=PER_RANK, multi_scale="off", drop_path=0.0)


def global_batch() -> dict[str, torch.Tensor]:
    """The fixed global batch of WORLD * PER_RANK images; rank r takes rows [r*PER_RANK, (r+1)*PER_RANK)."""
    n, slots = len(LABELS), 8
    g = torch.Generator().manual_seed(0)
    labels = torch.full((n, slots), -1, dtype=torch.int64)
    boxes = torch.zeros(n, slots, 4)
    for i, (lab, box) in enumerate(zip(LABELS, BOXES)):
        labels[i, : len(lab)] = torch.tensor(lab)
        boxes[i, : len(box)] = torch.tensor(box)
    return {
        "images": torch.randn(n, 3, 64, 64, generator=g),
        "mask": torch.zeros(n, 64, 64, dtype=torch.bool),
        "labels": labels,
        "boxes": boxes,
    }


def shard(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    return {k: v[rank * PER_RANK : (rank + 1) * PER_RANK] for k, v in batch.items()}


def fresh_state() -> dict:
    cfg, tcfg = configs()
    return make_train_step(cfg, tcfg, steps_per_epoch=10).init(rf.init(cfg, 0))


def train(step_fn, state: dict, batch: dict, steps: int) -> tuple[dict, list[dict[str, float]]]:
    """`steps` steps on one batch (the step's random draws come from the state's seed, step and rank)."""
    history = []
    for _ in range(steps):
        state, metrics = step_fn(state, [batch])
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history


def flat_state(state: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tree.flatten(state).items()}


def main(out: Path, mode: str) -> None:
    world = distributed.setup("cpu")
    assert world.size == WORLD, f"launch with --nproc_per_node={WORLD}, got WORLD_SIZE={world.size}"
    cfg, tcfg = configs()
    step = make_train_step(cfg, tcfg, steps_per_epoch=10, world_size=WORLD, rank=world.rank)
    batch = shard(global_batch(), world.rank)
    if mode == "compile":
        compiled = compile_step(step, backend="aot_eager")  # the collectives trace into the update piece
        state, history = train(compiled, fresh_state(), batch, 1)
        torch.save({"state": flat_state(state), "metrics": history}, out / f"compiled_rank{world.rank}.pt")
    else:
        state, history = train(step, fresh_state(), batch, STEPS)
        torch.save(
            {"state": flat_state(state), "metrics": history, "labels": batch["labels"]},
            out / f"trained_rank{world.rank}.pt",
        )
        save_state(out / "state2", state)
        loaded = load_state(out / "state1", fresh_state())
        torch.save({"state": flat_state(loaded)}, out / f"loaded_rank{world.rank}.pt")
    distributed.barrier(world)
    distributed.teardown(world)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "eager")
