"""Tree transforms: select, split, join, replace and average parameter trees by their dotted keys.

Research code changes *which* parameters move and *how* by transforming the params tree, never by
editing modules: freezing is a `partition`, LoRA adds a subtree, a soup is an `average`. Selections are
written over upstream's dotted state-dict keys (`backbone.0.encoder.*`), so a rule written for upstream
checkpoints applies here unchanged.

A `Where` is a glob (`fnmatch` over the whole dotted key), a compiled regex (`re.search`), a predicate
`(key, leaf) -> bool`, or a list of these (any of them matches).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import Tensor

from rfdetr_fn import tree

Where = Union[str, "re.Pattern[str]", Callable[[str, Tensor], bool], Sequence[Any]]


def matcher(where: Where) -> Callable[[str, Tensor], bool]:
    """The predicate `(key, leaf) -> bool` that a `Where` stands for."""
    if isinstance(where, str):
        return lambda key, leaf: fnmatch.fnmatchcase(key, where)
    if isinstance(where, re.Pattern):
        return lambda key, leaf: where.search(key) is not None
    if callable(where):
        return where
    if isinstance(where, Sequence):
        parts = [matcher(w) for w in where]
        return lambda key, leaf: any(p(key, leaf) for p in parts)
    raise TypeError(f"where must be a glob, a regex, a predicate or a list of them, got {type(where).__name__}")


def select(params: Mapping[str, Any], where: Where) -> list[str]:
    """Dotted keys of the leaves `where` matches, in tree order."""
    match = matcher(where)
    return [k for k, v in tree.flatten(params).items() if match(k, v)]


def partition(params: Mapping[str, Any], where: Where) -> tuple[tree.Params, tree.Params]:
    """(selected, rest): two trees holding disjoint leaves; `combine(selected, rest)` restores `params`.

    Leaves are shared, not copied. Unselected leaves are absent from `selected` (not None), so an
    optimizer initialised on `selected` holds state for the selected leaves only.
    """
    match = matcher(where)
    chosen: dict[str, Tensor] = {}
    rest: dict[str, Tensor] = {}
    for key, leaf in tree.flatten(params).items():
        (chosen if match(key, leaf) else rest)[key] = leaf
    return tree.unflatten(chosen), tree.unflatten(rest)


def combine(*trees: Mapping[str, Any]) -> tree.Params:
    """Join trees with disjoint leaves (the inverse of `partition`); a key present twice is an error."""
    flat: dict[str, Tensor] = {}
    for t in trees:
        for key, leaf in tree.flatten(t).items():
            if key in flat:
                raise ValueError(f"combine: leaf {key!r} is in more than one tree")
            flat[key] = leaf
    return tree.unflatten(flat)


def replace(params: Mapping[str, Any], values: Mapping[str, Tensor], *, strict: bool = True) -> tree.Params:
    """A copy of `params` with the leaves at the given dotted keys replaced (new keys need strict=False)."""
    flat = tree.flatten(params)
    unknown = [k for k in values if k not in flat]
    if strict and unknown:
        raise KeyError(f"replace: no leaf at {unknown[:5]}")
    return tree.unflatten({**flat, **values})


def map_where(fn: Callable[[Tensor], Tensor], params: Mapping[str, Any], where: Where) -> tree.Params:
    """Apply `fn` to the leaves `where` matches; the others pass through unchanged."""
    match = matcher(where)
    return tree.unflatten({k: fn(v) if match(k, v) else v for k, v in tree.flatten(params).items()})


def labels(params: Mapping[str, Any], rules: Mapping[str, Where], default: str | None = None) -> tree.Params:
    """A tree of label strings, one per leaf: the first rule (in order) that matches names the leaf.

    Leaves no rule matches get `default`; with default None they are an error, so a typo in a rule
    never silently leaves parameters out of an optimizer.
    """
    matchers = [(name, matcher(w)) for name, w in rules.items()]
    out: dict[str, str] = {}
    for key, leaf in tree.flatten(params).items():
        name = next((n for n, m in matchers if m(key, leaf)), default)
        if name is None:
            raise ValueError(f"labels: no rule matches {key!r} and there is no default")
        out[key] = name
    return tree.unflatten(out)


# ---------------------------------------------------------------- averaging


def average(trees: Sequence[Mapping[str, Any]], weights: Sequence[float] | None = None) -> tree.Params:
    """Weighted mean of trees with identical keys and shapes (a uniform soup when weights is None).

    Accumulates in float64 and returns each leaf in its own dtype; weights are normalised to sum 1.
    Integer leaves (counters) must agree across trees and are taken from the first.
    """
    if not trees:
        raise ValueError("average: no trees given")
    w = [1.0] * len(trees) if weights is None else [float(x) for x in weights]
    if len(w) != len(trees) or sum(w) <= 0 or min(w) < 0:
        raise ValueError(f"average: need {len(trees)} non-negative weights with a positive sum, got {w}")
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
