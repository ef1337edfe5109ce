"""Evaluate weights on a dataset split: `python -m rfdetr_fn.validate --checkpoint output/checkpoint_best_total.pth`.

The command only: the evaluation loop itself (shared with `fit`) is `rfdetr_fn.eval.loop`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import attrs

from rfdetr_fn import tree
from rfdetr_fn.config import DataConfig, EvalConfig
from rfdetr_fn.eval.loop import run_split
from rfdetr_fn.flags import parse
from rfdetr_fn.io import distributed
from rfdetr_fn.io.atomic import atomic_write, check_writable
from rfdetr_fn.io.weights import class_names, load_weights, resolve_checkpoint


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


def run(args: EvalArgs) -> dict[str, float]:
    if args.output:  # before the evaluation, not after it
        check_writable(Path(args.output).absolute().parent, "--output")
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
            atomic_write(Path(args.output), lambda tmp: tmp.write_text(text))
    distributed.teardown(world)
    return metrics


def main(argv: list[str] | None = None, *, split: str = "valid") -> dict[str, float]:
    args = parse(EvalArgs, argv, prog="rfdetr_fn validate" if split == "valid" else f"rfdetr_fn {split}")
    if split != "valid" and args.split == "valid":
        args = attrs.evolve(args, split=split)
    return run(args)


if __name__ == "__main__":
    from rfdetr_fn.flags import run_or_exit

    run_or_exit(main)
