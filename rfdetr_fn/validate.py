"""Evaluate weights on a dataset split: `python -m rfdetr_fn.validate --checkpoint output/checkpoint_best_total.pth`.

Also the evaluation used inside `fit`: eval-mode forward, postprocess at the original image size, COCO
mAP/mAR (bbox, and segm for segmentation models) and the macro-F1 sweep.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Literal

import attrs
import torch

from rfdetr_fn import distributed, tree
from rfdetr_fn.adapt import load_weights
from rfdetr_fn.compile import use_compile
from rfdetr_fn.config import DataConfig, EvalConfig, ModelConfig, TrainConfig
from rfdetr_fn.data import TARGET_KEYS, build_dataset, eval_loader
from rfdetr_fn.flags import parse
from rfdetr_fn.inference import forward_fn
from rfdetr_fn.keypoint_metrics import KeypointEvaluator
from rfdetr_fn.loss.criterion import criterion
from rfdetr_fn.metrics import Evaluator
from rfdetr_fn.model.postprocess import postprocess, postprocess_kwargs
from rfdetr_fn.precision import resolve_precision
from rfdetr_fn.weights import class_names, resolve_checkpoint


@attrs.frozen(kw_only=True)
class EvalArgs:
    """Evaluate a checkpoint on the validation split (COCO mAP, mAR, F1)."""

    checkpoint: str = "output/checkpoint_best_total.pth"
    """Weights file (.pth, .ckpt or .safetensors) or a training output directory."""
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    split: Literal["valid", "test"] = "valid"
    """Dataset split to score."""
    batch_size: int = 4
    """Images per forward pass."""
    output: str | None = None
    """Write the metrics as JSON here (default: print only)."""
    device: str | None = None
    """cpu, cuda or cuda:N; None picks CUDA when available."""


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
    if compile is None:
        compile = use_compile(ecfg.compile, world.device, "inference")
    precision = resolve_precision(ecfg.precision, world.device)
    forward = forward_fn(cfg, world.device, compile=compile, cache_dir=cache_dir, precision=precision)
    loader = eval_loader(
        dataset, batch_size=batch_size, num_workers=num_workers, world_size=world.size, rank=world.rank
    )
    evaluator = make_evaluator(dataset, cfg, ecfg)
    losses: list[float] = []
    for batch in loader:
        images = batch["images"].to(world.device)
        mask = batch["mask"].to(world.device)
        out = forward(params, images, mask)
        if loss_cfg is not None:
            targets = {k: batch[k].to(world.device) for k in TARGET_KEYS if k in batch}
            losses.append(float(criterion(out, targets, cfg, loss_cfg, train=False)[0]))
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


def run(args: EvalArgs) -> dict[str, float]:
    world = distributed.setup(args.device)
    ckpt = resolve_checkpoint(args.checkpoint)
    cfg, params = load_weights(ckpt)
    params = tree.to(params, world.device)
    trained_on = (str(ckpt), class_names(ckpt))
    metrics = run_split(
        params, cfg, args.data, args.eval, None, args.split, world, batch_size=args.batch_size, trained_on=trained_on
    )
    if world.main:
        text = json.dumps(metrics, indent=2)
        print(text)
        if args.output:
            Path(args.output).write_text(text)
    distributed.teardown(world)
    return metrics


def main(argv: list[str] | None = None, *, split: str = "valid") -> dict[str, float]:
    args = parse(EvalArgs, argv)
    if split != "valid" and args.split == "valid":
        args = attrs.evolve(args, split=split)
    return run(args)


if __name__ == "__main__":
    from rfdetr_fn.flags import run_or_exit

    run_or_exit(main)
