"""Pure schedules: the LR factor per optimizer step, schedule lengths, per-layer drop-path rates.

`lr_factor` takes a Python int or a 0-dim tensor step. The tensor form stays a tensor (no `.item()`), so a
compiled train step can compute its own learning rate without recompiling as the step advances.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from rfdetr_fn.config import TrainConfig

Kind = Literal["step", "cosine"]


def schedule_lengths(
    epochs: int, steps_per_epoch: int, warmup_epochs: float, *, max_steps: int | None = None
) -> tuple[int, int]:
    """(total_steps, warmup_steps) as upstream derives them from the trainer's step estimate.

    total = epochs * steps_per_epoch (capped by max_steps, like Lightning's estimated_stepping_batches);
    warmup = int(max(1, total // epochs) * warmup_epochs).
    """
    if epochs <= 0 or steps_per_epoch <= 0:
        raise ValueError(f"epochs={epochs} and steps_per_epoch={steps_per_epoch} must be positive")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs={warmup_epochs} must be >= 0")
    total = epochs * steps_per_epoch
    if max_steps is not None:
        total = min(total, max_steps)
    return total, int(max(1, total // epochs) * warmup_epochs)


def lr_kwargs(tcfg: TrainConfig, steps_per_epoch: int) -> dict:
    """Every keyword `lr_factor` needs, from a TrainConfig and the loader's optimizer steps per epoch."""
    total, warmup = schedule_lengths(tcfg.epochs, steps_per_epoch, tcfg.warmup_epochs, max_steps=tcfg.max_steps)
    return dict(
        total_steps=total,
        steps_per_epoch=max(1, total // tcfg.epochs),
        warmup_steps=warmup,
        kind=tcfg.lr_scheduler,
        lr_drop_epochs=tcfg.lr_drop,
        min_factor=tcfg.lr_min_factor,
    )


def lr_factor(
    step: int | Tensor,
    *,
    total_steps: int,
    steps_per_epoch: int,
    warmup_steps: int,
    kind: Kind,
    lr_drop_epochs: int,
    min_factor: float,
) -> float | Tensor:
    """Multiplier of every group's base LR at 0-based optimizer step `step` (upstream's LambdaLR).

    Linear warm-up s / warmup (so step 0 runs at LR 0 when warming up), then either a tenfold drop at
    epoch `lr_drop_epochs` ("step") or a cosine from 1 to `min_factor` over the remaining steps ("cosine").
    A tensor step gives a float64 0-dim tensor, computed without Python branches on its value.
    """
    if kind not in ("step", "cosine"):
        raise ValueError(f"lr_scheduler={kind!r} must be 'step' or 'cosine'")
    warm = max(1, warmup_steps)
    drop_at = lr_drop_epochs * steps_per_epoch
    span = max(1, total_steps - warmup_steps)
    if not isinstance(step, Tensor):
        if step < warmup_steps:
            return step / warm
        if kind == "step":
            return 1.0 if step < drop_at else 0.1
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / span))
    s = step.to(torch.float64)
    if kind == "step":
        after = torch.where(s < drop_at, torch.ones_like(s), torch.full_like(s, 0.1))
    else:
        after = min_factor + (1 - min_factor) * 0.5 * (1 + torch.cos(math.pi * (s - warmup_steps) / span))
    return torch.where(s < warmup_steps, s / warm, after)
