"""Average weights files into one: `rfdetr_fn average a.pth b.pth c.pth --out soup.pth [--greedy ...]`.

A uniform (or `--weights`) soup of checkpoints of one architecture, written in upstream's layout. With
`--greedy` the ingredients are chosen by Wortsman et al.'s greedy soup on the validation split's
mAP 50:95 (`--data.*` picks the dataset), so a checkpoint that hurts the soup is left out.
"""

from __future__ import annotations

from typing import Annotated

import attrs
import tyro

from rfdetr_fn.config import DataConfig, EvalConfig
from rfdetr_fn.io import weights
from rfdetr_fn.io.weights import load_weights
from rfdetr_fn.research import soup


@attrs.frozen(kw_only=True)
class AverageArgs:
    """Average weights files (a model soup) into a new .pth."""

    checkpoints: Annotated[tuple[str, ...], tyro.conf.Positional] = ()
    """Weights files of one architecture (.pth, .ckpt or .safetensors)."""
    out: str = "soup.pth"
    """Where the averaged weights go (upstream layout; .safetensors for ours)."""
    weights: tuple[float, ...] | None = None
    """One weight per checkpoint (normalised); default uniform. Ignored with --greedy."""
    greedy: bool = False
    """Greedy soup: add a checkpoint only if validation mAP 50:95 does not drop."""
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    batch_size: int = 4
    """Images per forward pass when --greedy evaluates."""


def run(args: AverageArgs) -> list[int]:
    """Write the soup; returns the indices of the checkpoints it contains."""
    if len(args.checkpoints) < 2:
        raise ValueError(f"average: give at least two checkpoints, got {list(args.checkpoints)}")
    cfg, first = load_weights(args.checkpoints[0])
    trees = [first] + [load_weights(p, cfg)[1] for p in args.checkpoints[1:]]
    names = weights.class_names(args.checkpoints[0])
    if args.greedy:
        from rfdetr_fn.eval.loop import run_split

        def score(params) -> float:
            metrics = run_split(params, cfg, args.data, args.eval, None, "valid", batch_size=args.batch_size)
            return metrics["val/mAP_50_95"]

        mixed, used = soup.greedy_soup(trees, score)
    else:
        mixed, used = soup.average(trees, args.weights), list(range(len(trees)))
    weights.save_weights(args.out, mixed, cfg, class_names=names)
    print(f"wrote {args.out}: average of {[args.checkpoints[i] for i in used]}")
    return used


def main(argv: list[str] | None = None) -> list[int]:
    from rfdetr_fn.flags import parse

    return run(parse(AverageArgs, argv, prog="rfdetr_fn average"))


if __name__ == "__main__":
    main()
