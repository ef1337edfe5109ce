"""The update settings of a run, resolved once from TrainConfig: what the step's update piece reads.

Like `losses.config.LossConfig` for the loss piece: the train step builds both records when it is made
and reads nothing else of TrainConfig, so the compile cache keys on exactly these (`TrainStep.settings`)
and a field that never reaches the step (the output dir, logging, evaluation cadence) can never force a
recompile, nor a new field a stale artifact.
"""

from __future__ import annotations

from typing import Any

import attrs

from rfdetr_fn.config import TrainConfig
from rfdetr_fn.optim import schedules

# TrainConfig fields the optimizer recipe reads (parameter groups, the optimizer and its arguments).
RECIPE_FIELDS = (
    "optimizer",
    "optimizer_kwargs",
    "lr",
    "lr_encoder",
    "weight_decay",
    "betas",
    "eps",
    "lr_vit_layer_decay",
    "lr_component_decay",
    "freeze_encoder",
)


@attrs.frozen(kw_only=True)
class UpdateConfig:
    """Optimizer recipe, learning-rate schedule (in optimizer steps), clipping, EMA and the fp16 loss scale."""

    recipe: dict[str, Any] = attrs.field(eq=False)
    """The RECIPE_FIELDS of TrainConfig, by name (`recipe.make_optimizer` reads them)."""
    schedule: dict[str, Any] = attrs.field(eq=False)
    """`schedules.lr_factor`'s keywords for this run's length."""
    clip_max_norm: float = 0.1
    use_ema: bool = True
    ema_decay: float = 0.993
    ema_tau: float = 100.0
    ema_update_interval: int = 1
    loss_scale_growth_interval: int = 2000

    @classmethod
    def resolve(cls, tcfg: TrainConfig, steps_per_epoch: int) -> UpdateConfig:
        return cls(
            recipe={name: getattr(tcfg, name) for name in RECIPE_FIELDS},
            schedule=schedules.lr_kwargs(tcfg, steps_per_epoch),
            clip_max_norm=tcfg.clip_max_norm,
            use_ema=tcfg.use_ema,
            ema_decay=tcfg.ema_decay,
            ema_tau=tcfg.ema_tau,
            ema_update_interval=tcfg.ema_update_interval,
            loss_scale_growth_interval=tcfg.loss_scale_growth_interval,
        )
