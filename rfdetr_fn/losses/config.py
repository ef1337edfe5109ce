"""The loss and matcher settings of a run, resolved once from ModelConfig and TrainConfig.

TrainConfig holds ~80 fields; the criterion and the matcher read a dozen of them. `LossConfig` is those
dozen, with the task defaults applied and the per-layer weight table built once (upstream builds its
`weight_dict` once in `build_criterion`), so the criterion never sees the rest of the run's settings and
the compile cache keys on exactly what the loss reads.

A NamedTuple rather than an attrs class, like `MatchCosts`: `rf.loss` resolves it inside compiled pieces
too, and Dynamo traces a NamedTuple's constructor but not a frozen attrs `__init__`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, NamedTuple

from rfdetr_fn.config import ModelConfig, TrainConfig
from rfdetr_fn.losses.keypoints import TERMS as KEYPOINT_TERMS


class LossConfig(NamedTuple):
    """What the criterion and the matcher read (built by `LossConfig.resolve`, never by hand in a run)."""

    weights: Mapping[str, float]
    """Weight of every loss key that enters the total, aux (`_i`) and encoder (`_enc`) copies included."""
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    focal_alpha: float = 0.25
    ia_bce_loss: bool = True
    mask_ce_cost: float = 5.0
    """Upstream's matcher weighs mask costs with the mask loss weights: same numbers, another role."""
    mask_dice_cost: float = 5.0
    mask_point_sample_ratio: int = 16
    keypoint_coefs: Mapping[str, float] = {}  # a shared default, never mutated
    """Keypoint loss (and cost) weights by term: l1, findable, visible, nll (keypoint models only)."""
    matcher_backend: Literal["auto", "scipy", "device"] = "auto"

    @classmethod
    def resolve(cls, cfg: ModelConfig, tcfg: TrainConfig) -> LossConfig:
        """The record for a model and a run: the task's class-loss default (2 for keypoint models, as
        upstream's KeypointTrainConfig) and the weight table for the model's layers and heads."""
        kp = {t: float(getattr(tcfg, f"keypoint_{t}_loss_coef")) for t in KEYPOINT_TERMS} if cfg.keypoints else {}
        return cls(
            weights=weight_table(cfg, tcfg, kp),
            set_cost_class=tcfg.set_cost_class,
            set_cost_bbox=tcfg.set_cost_bbox,
            set_cost_giou=tcfg.set_cost_giou,
            focal_alpha=tcfg.focal_alpha,
            ia_bce_loss=tcfg.ia_bce_loss,
            mask_ce_cost=tcfg.mask_ce_loss_coef,
            mask_dice_cost=tcfg.mask_dice_loss_coef,
            mask_point_sample_ratio=tcfg.mask_point_sample_ratio,
            keypoint_coefs=kp,
            matcher_backend=tcfg.matcher_backend,
        )


def cls_loss_coef(cfg: ModelConfig, tcfg: TrainConfig) -> float:
    """The configured class-loss weight, else upstream's default for the task (KeypointTrainConfig: 2)."""
    if tcfg.cls_loss_coef is not None:
        return tcfg.cls_loss_coef
    return 2.0 if cfg.keypoints else 1.0


def weight_table(cfg: ModelConfig, tcfg: TrainConfig, keypoint_coefs: Mapping[str, float]) -> dict[str, float]:
    """Loss weights per key, repeated for every aux layer and the encoder outputs (upstream's keys)."""
    base = {"loss_ce": cls_loss_coef(cfg, tcfg), "loss_bbox": tcfg.bbox_loss_coef, "loss_giou": tcfg.giou_loss_coef}
    if cfg.segmentation_head:
        base |= {"loss_mask_ce": tcfg.mask_ce_loss_coef, "loss_mask_dice": tcfg.mask_dice_loss_coef}
    base |= {f"loss_keypoints_{k}": v for k, v in keypoint_coefs.items()}
    suffixes = ["", *(f"_{i}" for i in range(cfg.dec_layers - 1))] + (["_enc"] if cfg.two_stage else [])
    return {key + suffix: value for suffix in suffixes for key, value in base.items()}
