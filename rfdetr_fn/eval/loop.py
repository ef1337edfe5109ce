"""The evaluation loop: eval-mode forward, postprocess at the original image size, COCO mAP/mAR (bbox,
and segm for segmentation models), keypoint OKS and the macro-F1 sweep, sharded under torchrun.

Used by `fit` after each epoch and by the `validate` and `test` commands.
"""

from __future__ import annotations

import warnings

import torch

from rfdetr_fn import tree
from rfdetr_fn.compiler import use_compile
from rfdetr_fn.config import DataConfig, EvalConfig, ModelConfig, TrainConfig
from rfdetr_fn.data import TARGET_KEYS, build_dataset, eval_loader
from rfdetr_fn.eval.coco import Evaluator
from rfdetr_fn.eval.inference import forward_fn
from rfdetr_fn.eval.keypoints import KeypointEvaluator
from rfdetr_fn.io import distributed
from rfdetr_fn.losses import objective
from rfdetr_fn.losses.config import LossConfig
from rfdetr_fn.model.postprocess import postprocess, postprocess_kwargs
from rfdetr_fn.model.precision import compute_kind, resolve_precision


def make_evaluator(dataset, cfg: ModelConfig, ecfg: EvalConfig) -> Evaluator:
    """The dataset's Evaluator: a KeypointEvaluator (box and keypoint metrics) for keypoint models."""
    if cfg.keypoints:
        common = dict(max_dets=ecfg.max_dets, backend=ecfg.backend, per_class=ecfg.per_class)
        gt = dataset.coco_gt()
        return KeypointEvaluator(gt, sigmas=ecfg.keypoint_oks_sigmas, class_names=dataset.class_names, **common)
    return Evaluator.from_config(dataset.coco_gt(), ecfg, class_names=dataset.class_names)


@torch.no_grad()
def evaluate(
    params,
    cfg: ModelConfig,
    dataset,
    *,
    batch_size: int,
    ecfg: EvalConfig,
    num_workers: int = 0,
    world: distributed.World | None = None,
    loss_cfg: TrainConfig | None = None,
    compile: bool | None = None,
    cache_dir: str | None = None,
) -> dict[str, float]:
    """Score `params` on `dataset`; under torchrun each rank takes a shard and rank 0 merges the detections.

    With `loss_cfg`, the eval-mode criterion (one query group) is averaged over batches as `loss`.
    `compile` None follows `ecfg.compile` for the device; the compiled forward is `inference.forward_fn`'s."""
    world = world or distributed.World(rank=0, size=1, device=next(tree.leaves(params)).device)
    precision = resolve_precision(ecfg.precision, world.device)
    if compile is None:
        compile = use_compile(ecfg.compile, compute_kind(world.device, precision), "inference")
    forward = forward_fn(cfg, world.device, compile=compile, cache_dir=cache_dir, precision=precision)
    loader = eval_loader(
        dataset, batch_size=batch_size, num_workers=num_workers, world_size=world.size, rank=world.rank
    )
    evaluator = make_evaluator(dataset, cfg, ecfg)
    lcfg = None if loss_cfg is None else LossConfig.resolve(cfg, loss_cfg)  # once, not per batch
    losses: list[float] = []
    for batch in loader:
        images = batch["images"].to(world.device)
        mask = batch["mask"].to(world.device)
        out = forward(params, images, mask)
        if lcfg is not None:
            targets = {k: batch[k].to(world.device) for k in TARGET_KEYS if k in batch}
            losses.append(float(objective.of_outputs(out, targets, cfg, lcfg, train=False)[0]))
        preds = postprocess(out, batch["orig_size"].to(world.device), cfg.num_select, **postprocess_kwargs(cfg))
        evaluator.update(preds, batch["image_id"].tolist())  # masks become RLE here: none outlives its batch
    states = distributed.gather_objects(evaluator.state(), world)
    all_losses = [x for part in distributed.gather_objects(losses, world) for x in part]
    if not world.main:
        return {}
    evaluator.merge(states[1:])  # distributed samplers may repeat images to even out shards: first one wins
    metrics = evaluator.compute()
    if all_losses:
        metrics["loss"] = sum(all_losses) / len(all_losses)
    return metrics


def run_split(
    params,
    cfg: ModelConfig,
    dcfg: DataConfig,
    ecfg: EvalConfig,
    tcfg: TrainConfig | None,
    split: str,
    world: distributed.World | None = None,
    batch_size: int | None = None,
    trained_on: tuple[str, list[str] | None] | None = None,
) -> dict[str, float]:
    """Evaluate on a named split and prefix the keys with it (`test/mAP_50_95`, ...).

    `trained_on`: (checkpoint, its class names), to warn when the split names other classes."""
    tcfg = tcfg or TrainConfig()
    dataset = build_dataset(dcfg, split, cfg, tcfg, train=False)
    if trained_on is not None and trained_on[1] is not None and list(trained_on[1]) != dataset.class_names:
        warnings.warn(
            f"{trained_on[0]} was trained on classes {list(trained_on[1])}, but the {split} split "
            f"({dataset.source_name}) has {dataset.class_names}: labels are matched by index, so the metrics "
            "may compare different classes",
            stacklevel=2,
        )
    metrics = evaluate(
        params,
        cfg,
        dataset,
        batch_size=batch_size or tcfg.eval_batch,
        ecfg=ecfg,
        num_workers=dcfg.num_workers,
        world=world,
        loss_cfg=tcfg if split == "test" and tcfg.compute_test_loss else None,
    )
    prefix = "val" if split == "valid" else split
    return {f"{prefix}/{k}": v for k, v in metrics.items()}
