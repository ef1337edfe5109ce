"""Weight averaging: uniform and weighted soups, interpolation, and Wortsman et al.'s greedy soup.

Each is a function from trees to a tree; the `average` command writes the result in upstream's layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from rfdetr_fn import tree


def average(trees: Sequence[Mapping[str, Any]], weights: Sequence[float] | None = None) -> tree.Params:
    """Weighted mean of trees with identical keys and shapes (a uniform soup when weights is None).

    Accumulates in float64 and returns each leaf in its own dtype; weights are normalised to sum 1.
    Integer leaves (counters) must agree across trees and are taken from the first.
    """
    if not trees:
        raise ValueError("average: no trees given")
    w = [1.0] * len(trees) if weights is None else [float(x) for x in weights]
    if len(w) != len(trees) or not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"average: need {len(trees)} finite, non-negative weights with a positive sum, got {w}")
    total = sum(w)
    flats = [tree.flatten(t) for t in trees]
    _check_same(flats)
    out: dict[str, Tensor] = {}
    for key, first in flats[0].items():
        if not first.is_floating_point():
            out[key] = first
            continue
        acc = sum(f[key].to(torch.float64) * (wi / total) for f, wi in zip(flats, w))
        out[key] = acc.to(first.dtype)
    return tree.unflatten(out)


def lerp(a: Mapping[str, Any], b: Mapping[str, Any], t: float) -> tree.Params:
    """(1 - t) * a + t * b leaf-wise (t = 0 gives a, 1 gives b; outside [0, 1] extrapolates)."""
    fa, fb = tree.flatten(a), tree.flatten(b)
    _check_same([fa, fb])
    return tree.unflatten(
        {k: torch.lerp(v, fb[k].to(v.dtype), t) if v.is_floating_point() else v for k, v in fa.items()}
    )


def greedy_soup(
    candidates: Sequence[Mapping[str, Any]],
    evaluate: Callable[[tree.Params], float],
    scores: Sequence[float] | None = None,
) -> tuple[tree.Params, list[int]]:
    """Wortsman et al.'s greedy soup: rank candidates by their own score, then add each one to the
    uniform soup only if the soup's score does not drop. Returns (soup, indices of the ingredients).

    `evaluate(params) -> float` is higher-is-better (e.g. validation mAP); `scores` are the candidates'
    own scores when already known (evaluation is the expensive part).
    """
    if not candidates:
        raise ValueError("greedy_soup: no candidates")
    if scores is None:
        scores = [evaluate(tree.unflatten(tree.flatten(c))) for c in candidates]
    elif len(scores) != len(candidates):
        raise ValueError(f"greedy_soup: {len(scores)} scores for {len(candidates)} candidates")
    order = sorted(range(len(candidates)), key=lambda i: -scores[i])
    chosen = [order[0]]
    best, soup = scores[order[0]], tree.unflatten(tree.flatten(candidates[order[0]]))
    for i in order[1:]:
        trial = average([candidates[j] for j in [*chosen, i]])
        score = evaluate(trial)
        if score >= best:
            chosen, best, soup = [*chosen, i], score, trial
    return soup, chosen


def _check_same(flats: Sequence[Mapping[str, Tensor]]) -> None:
    keys = list(flats[0])
    for i, f in enumerate(flats[1:], start=1):
        if list(f) != keys:
            diff = sorted(set(keys) ^ set(f))[:5]
            raise ValueError(f"tree {i} has different keys from tree 0; first differences: {diff}")
        bad = [k for k in keys if f[k].shape != flats[0][k].shape]
        if bad:
            raise ValueError(
                f"tree {i}: shape of {bad[0]!r} is {tuple(f[bad[0]].shape)}, tree 0 has {tuple(flats[0][bad[0]].shape)}"
            )
