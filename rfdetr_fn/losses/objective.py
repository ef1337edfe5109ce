"""`loss` (exported as `rf.loss`): the one training loss of the codebase.

The train step, the evaluation loss, vmapped ensembles, per-example gradients and the examples all call
it, so a researcher differentiates exactly what the trainer does. It is a pure function of
`(params, batch)`: the forward pass, the Hungarian matching and upstream's set criterion.

Which derivative it has: the matching, the two-stage proposal boxes (detached as upstream) and the IA-BCE
targets are stop-gradient inputs, so `grad`, `jvp` and Hessian-vector products are those of that
surrogate; they differ from finite differences of the matched loss wherever a change in parameters
would change a match. The bilinear sampling of deformable attention has kinks where a sampling point
crosses a pixel centre (at init many points sit exactly on them), so gradients there are one-sided.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rfdetr_fn import rng, tree
from rfdetr_fn.config import ModelConfig, TrainConfig
from rfdetr_fn.losses import TARGET_KEYS
from rfdetr_fn.losses.config import LossConfig
from rfdetr_fn.losses.criterion import criterion, default_num_boxes, match_all
from rfdetr_fn.model.precision import forward

NORMALISE = ("batch", "image")


def loss(
    params: tree.Params,
    batch: dict[str, Tensor],
    cfg: ModelConfig,
    tcfg: TrainConfig | None = None,
    *,
    indices: list[Tensor] | None = None,
    key: Tensor | int | None = None,
    normalise: str = "batch",
    num_boxes: Tensor | float | None = None,
    train: bool = True,
    precision: str = "fp32",
) -> tuple[Tensor, dict[str, Tensor]]:
    """(weighted total, upstream's loss terms) of the model on one loader batch.

    `batch` holds images, mask and the targets (labels, boxes, masks, keypoints). Matching runs inside
    (no gradient) unless `indices` (`criterion.match_all`'s output) are given: pass them under vmap, whose
    matching op has no batching rule. `key` drives drop path and mask point sampling (`rfdetr_fn.rng`;
    None: drop path off, mask points from key 0). normalise="batch" divides every term by the batch's
    target count x query groups, as the train step does; "image" divides each image's terms by its own
    count and averages over images. `num_boxes` overrides the batch normaliser (the step passes the count
    averaged over ranks or over an accumulation window). train=False scores group 0 in eval mode, as the
    evaluation loss does. `precision` is the forward's autocast ("fp32", "bf16", "fp16").
    """
    tcfg = tcfg or TrainConfig()
    return loss_with(
        params, batch, cfg, LossConfig.resolve(cfg, tcfg), drop_path=tcfg.drop_path, indices=indices, key=key,
        normalise=normalise, num_boxes=num_boxes, train=train, precision=precision,
    )  # fmt: skip


def loss_with(
    params: tree.Params,
    batch: dict[str, Tensor],
    cfg: ModelConfig,
    lcfg: LossConfig,
    *,
    drop_path: float = 0.0,
    indices: list[Tensor] | None = None,
    key: Tensor | int | None = None,
    normalise: str = "batch",
    num_boxes: Tensor | float | None = None,
    train: bool = True,
    precision: str = "fp32",
) -> tuple[Tensor, dict[str, Tensor]]:
    """`loss` with its settings already resolved (the train step resolves `LossConfig` once, not per call)."""
    out = forward(
        params,
        batch["images"],
        batch.get("mask"),
        cfg,
        precision,
        train=train,
        drop_path=drop_path if key is not None and train else 0.0,
        key=None if key is None else rng.mix(key, 0),
    )
    return of_outputs(
        out, batch, cfg, lcfg, train=train, indices=indices, key=key, normalise=normalise, num_boxes=num_boxes
    )


def of_outputs(
    out: dict,
    batch: dict[str, Tensor],
    cfg: ModelConfig,
    lcfg: LossConfig,
    *,
    train: bool = True,
    indices: list[Tensor] | None = None,
    key: Tensor | int | None = None,
    normalise: str = "batch",
    num_boxes: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """`loss` from model outputs already computed (the evaluation loop scores the outputs it also decodes)."""
    if normalise not in NORMALISE:
        raise ValueError(f"normalise={normalise!r}: expected one of {NORMALISE}")
    targets = {k: batch[k] for k in TARGET_KEYS if k in batch}
    crit_key = 0 if key is None else rng.mix(key, 1)
    if normalise == "batch":
        return criterion(out, targets, cfg, lcfg, train=train, num_boxes=num_boxes, indices=indices, key=crit_key)
    if num_boxes is not None:
        raise ValueError('num_boxes applies to normalise="batch" only')
    if cfg.segmentation_head:  # its train outputs are not all batch-first
        raise ValueError('normalise="image" covers detection and keypoint models; use "batch" with masks')
    size = targets["labels"].shape[0]
    parts = []
    for i in range(size):  # each image's terms over its own target count
        idx = None if indices is None else [layer[i : i + 1] for layer in indices]
        one = criterion(_row(out, i), _row(targets, i), cfg, lcfg, train=train, indices=idx, key=rng.mix(crit_key, i))
        parts.append(one)
    total = torch.stack([t for t, _ in parts]).mean()
    terms = {k: torch.stack([t[k] for _, t in parts]).mean() for k in parts[0][1]}
    return total, terms


def batch_num_boxes(batch: dict[str, Tensor], cfg: ModelConfig, train: bool = True) -> Tensor:
    """The normaliser of normalise="batch": valid targets x query groups, at least 1."""
    return default_num_boxes(batch["labels"], cfg.group_detr if train else 1)


def matches(params: tree.Params, batch: dict[str, Tensor], cfg: ModelConfig, tcfg: TrainConfig | None = None):
    """`match_all` of the model on `batch` (train mode, no gradient): the stop-gradient input `loss` takes."""
    tcfg = tcfg or TrainConfig()
    with torch.no_grad():
        out = forward(params, batch["images"], batch.get("mask"), cfg, "fp32", train=True)
        return match_all(
            out, {k: batch[k] for k in TARGET_KEYS if k in batch}, cfg, LossConfig.resolve(cfg, tcfg), train=True
        )


def _row(tree_: Any, i: int) -> Any:
    """Image i of a batch (every tensor leaf sliced on its first axis, kept 4-d etc.)."""
    return torch.utils._pytree.tree_map(lambda t: t[i : i + 1] if isinstance(t, Tensor) else t, tree_)
