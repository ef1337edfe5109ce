"""Average weights files into one: `rfdetr_fn average a.pth b.pth c.pth --out soup.pth [--greedy ...]`.

A uniform (or `--weights`) soup of checkpoints of one architecture, written in upstream's layout. With
`--greedy` the ingredients are chosen by Wortsman et al.'s greedy soup on the validation split's
mAP 50:95 (`--data.*` picks the dataset), so a checkpoint that hurts the soup is left out.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import attrs
import torch
import tyro

from rfdetr_fn import tree
from rfdetr_fn.config import DataConfig, EvalConfig
from rfdetr_fn.errors import UserError
from rfdetr_fn.io import weights
from rfdetr_fn.io.atomic import check_writable
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


class AverageError(UserError, ValueError):
    """Checkpoints or weights that cannot make a soup: printed alone, exit 2."""


def check_mix_weights(mix: tuple[float, ...] | None, count: int) -> None:
    """One finite, non-negative weight per checkpoint with a positive sum (NaN would poison every leaf)."""
    if mix is None:
        return
    if len(mix) != count or not all(math.isfinite(w) and w >= 0 for w in mix) or sum(mix) <= 0:
        raise AverageError(
            f"--weights {' '.join(map(str, mix))}: give {count} finite, non-negative numbers with a positive sum"
        )


def load_ingredients(paths: tuple[str, ...]) -> tuple[list, list]:
    """(config, names) of the first file and every file's params; refuses other class lists (a soup of
    different label spaces is meaningless) and files holding non-finite values."""
    cfg, names, trees = None, None, []
    for path in paths:
        file_cfg, params = load_weights(path)
        file_names = weights.class_names(path)
        if cfg is None:
            cfg, names = file_cfg, file_names
        elif file_cfg.num_classes != cfg.num_classes or (names and file_names and file_names != names):
            raise AverageError(
                f"{path}: trained on {file_cfg.num_classes} classes {file_names}, but {paths[0]} on "
                f"{cfg.num_classes} classes {names}: average checkpoints of one class list only"
            )
        elif file_cfg != cfg:
            params = load_weights(path, cfg)[1]
        refuse_non_finite(params, f"{path}: holds")
        trees.append(params)
    return [cfg, names], trees


def refuse_non_finite(params, where: str) -> None:
    bad = [k for k, v in tree.flatten(params).items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise AverageError(f"{where} non-finite values in {len(bad)} tensor(s), e.g. {bad[:3]}; nothing written")


def run(args: AverageArgs) -> list[int]:
    """Write the soup; returns the indices of the checkpoints it contains."""
    if len(args.checkpoints) < 2:
        raise AverageError(f"average: give at least two checkpoints, got {list(args.checkpoints)}")
    if not args.greedy:
        check_mix_weights(args.weights, len(args.checkpoints))
    check_writable(Path(args.out).absolute().parent, "--out")
    (cfg, names), trees = load_ingredients(args.checkpoints)
    if args.greedy:
        from rfdetr_fn.eval.loop import run_split

        def score(params) -> float:
            metrics = run_split(params, cfg, args.data, args.eval, None, "valid", batch_size=args.batch_size)
            return metrics["val/mAP_50_95"]

        mixed, used = soup.greedy_soup(trees, score)
    else:
        mixed, used = soup.average(trees, args.weights), list(range(len(trees)))
    refuse_non_finite(mixed, f"{args.out}: the soup has")
    weights.save_weights(args.out, mixed, cfg, class_names=names)
    print(f"wrote {args.out}: average of {[args.checkpoints[i] for i in used]}")
    return used


def main(argv: list[str] | None = None) -> list[int]:
    from rfdetr_fn.flags import parse

    return run(parse(AverageArgs, argv, prog="rfdetr_fn average"))


if __name__ == "__main__":
    main()
