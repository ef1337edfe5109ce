"""Parameter pytrees: nested dicts of tensors whose dotted paths are upstream's state-dict keys, and
selections over them.

Nested dicts let a layer take just its own subtree (`linear(p["fc1"], x)`); the flat dotted view is
what checkpoints, optimizers and tests compare against.

Research code changes *which* parameters move by selecting leaves of the tree, never by editing
modules: freezing is a `partition`, LoRA adds a subtree. Selections are written over upstream's dotted
state-dict keys (`backbone.0.encoder.*`), so a rule written for upstream checkpoints applies here
unchanged. A `Where` is a glob (`fnmatch` over the whole dotted key), a compiled regex (`re.search`), a
predicate `(key, leaf) -> bool`, or a list of these (any of them matches).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Union

import torch
from torch import Tensor

Params = dict[str, Any]  # nested dict whose leaves are tensors


def paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested dict -> {("a", "b", "c"): leaf}, in insertion order (an empty dict holds no leaf)."""
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        path = (*prefix, key)
        if isinstance(value, Mapping):
            out.update(paths(value, path))
        else:
            out[path] = value
    return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """Nested dict -> {"a.b.c": leaf}, in insertion order."""
    return {prefix + ".".join(path): value for path, value in paths(tree).items()}


def unflatten(flat: Mapping[str, Any]) -> Params:
    """{"a.b.c": leaf} -> nested dict (the inverse of `flatten`)."""
    tree: Params = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def leaves(tree: Mapping[str, Any]) -> Iterator[torch.Tensor]:
    yield from flatten(tree).values()


def map_(fn: Callable[..., Any], tree: Mapping[str, Any], *rest: Mapping[str, Any]) -> Params:
    """Apply `fn` leaf-wise over trees of identical structure, keeping the structure."""
    out: Params = {}
    for key, value in tree.items():
        others = [r[key] for r in rest]
        out[key] = map_(fn, value, *others) if isinstance(value, Mapping) else fn(value, *others)
    return out


def clone(tree: Mapping[str, Any]) -> Params:
    """Deep copy of every tensor: optimizer/EMA state must never alias params (it forces recompiles)."""
    return map_(lambda t: t.detach().clone(), tree)


def to(tree: Mapping[str, Any], device: torch.device | str) -> Params:
    """Every leaf on `device` (params, optimizer state, or a batch dict)."""
    return map_(lambda t: t.to(device, non_blocking=True), tree)


FOREACH_CHUNK = 1 << 22
"""Elements per foreach call over a whole model (optimizer, EMA): eager temporaries stay ~16 MB (fp32)
each instead of the model's size (Nano: 120 MB each, the peak of an eager train step)."""


def chunks(tensors: list[torch.Tensor], max_numel: int = FOREACH_CHUNK) -> list[tuple[int, int]]:
    """Consecutive [lo, hi) ranges of at most `max_numel` elements each (a larger tensor alone), so a
    foreach computation over a whole model runs chunk by chunk with the same arithmetic."""
    out, lo, size = [], 0, 0
    for i, t in enumerate(tensors):
        if size and size + t.numel() > max_numel:
            out.append((lo, i))
            lo, size = i, 0
        size += t.numel()
    return [*out, (lo, len(tensors))] if tensors else out


def num_params(tree: Mapping[str, Any]) -> int:
    return sum(t.numel() for t in leaves(tree))


def shapes(tree: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in flatten(tree).items()}


# ---------------------------------------------------------------- selections

Where = Union[str, "re.Pattern[str]", Callable[[str, Tensor], bool], Sequence[Any]]


class _Combined:
    """`not_`, `any_` and `all_` of selections: a predicate that keeps its parts, so `require` can name the
    part that matches nothing (a typo inside a negation would otherwise select everything)."""

    def __init__(self, kind: str, parts: Sequence[Any]):
        self.kind, self.parts = kind, tuple(parts)
        self._matchers = [matcher(p) for p in self.parts]

    def __call__(self, key: str, leaf: Any) -> bool:
        hits = (m(key, leaf) for m in self._matchers)
        if self.kind == "not":
            return not next(hits)
        return any(hits) if self.kind == "any" else all(hits)

    def __repr__(self) -> str:
        return f"{self.kind}_({', '.join(map(_describe, self.parts))})"


def not_(where: Where) -> Where:
    """The leaves `where` does not select (freeze the ViT: `trainable=not_("backbone.0.encoder.*")`)."""
    return _Combined("not", [where])


def any_(*wheres: Where) -> Where:
    """The leaves any of `wheres` selects (a list means the same)."""
    return _Combined("any", wheres)


def all_(*wheres: Where) -> Where:
    """The leaves every one of `wheres` selects."""
    return _Combined("all", wheres)


def require(params: Mapping[str, Any], where: Where, what: str = "selection") -> None:
    """Refuse a selection that matches no leaf, or any glob/regex inside it (through not_/any_/all_ and lists)
    that matches none: such a typo would silently freeze or train the wrong set. Opaque predicates are
    checked as a whole only."""
    flat = flatten(params)
    for part in [where, *_parts(where)]:
        if isinstance(part, (str, re.Pattern)) or part is where:
            match = matcher(part)
            if not any(match(k, v) for k, v in flat.items()):
                whole = "" if part is where else f" (in {what} {_describe(where)})"
                raise ValueError(
                    f"{what} {_describe(part)} matches no parameter{whole}; keys look like {next(iter(flat), '')!r}"
                )


def _parts(where: Where) -> list[Any]:
    inner = where.parts if isinstance(where, _Combined) else where if _is_list(where) else ()
    out: list[Any] = []
    for part in inner:
        out += [part, *_parts(part)]
    return out


def _is_list(where: Any) -> bool:
    return isinstance(where, Sequence) and not isinstance(where, str)


def _describe(where: Any) -> str:
    if isinstance(where, re.Pattern):
        return f"re.compile({where.pattern!r})"
    if isinstance(where, (str, _Combined)) or _is_list(where):
        return repr(where)
    return getattr(where, "__name__", type(where).__name__)


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
    return [k for k, v in flatten(params).items() if match(k, v)]


def partition(params: Mapping[str, Any], where: Where) -> tuple[Params, Params]:
    """(selected, rest): two trees holding disjoint leaves; `combine(selected, rest)` restores `params`.

    Leaves are shared, not copied. Unselected leaves are absent from `selected` (not None), so an
    optimizer initialised on `selected` holds state for the selected leaves only.
    """
    match = matcher(where)
    chosen: dict[str, Tensor] = {}
    rest: dict[str, Tensor] = {}
    for key, leaf in flatten(params).items():
        (chosen if match(key, leaf) else rest)[key] = leaf
    return unflatten(chosen), unflatten(rest)


def combine(*trees: Mapping[str, Any]) -> Params:
    """Join trees with disjoint leaves (the inverse of `partition`); a key present twice is an error."""
    flat: dict[str, Tensor] = {}
    for t in trees:
        for key, leaf in flatten(t).items():
            if key in flat:
                raise ValueError(f"combine: leaf {key!r} is in more than one tree")
            flat[key] = leaf
    return unflatten(flat)


def replace(params: Mapping[str, Any], values: Mapping[str, Tensor], *, strict: bool = True) -> Params:
    """A copy of `params` with the leaves at the given dotted keys replaced (new keys need strict=False)."""
    flat = flatten(params)
    unknown = [k for k in values if k not in flat]
    if strict and unknown:
        raise KeyError(f"replace: no leaf at {unknown[:5]}")
    return unflatten({**flat, **values})


def map_where(fn: Callable[[Tensor], Tensor], params: Mapping[str, Any], where: Where) -> Params:
    """Apply `fn` to the leaves `where` matches; the others pass through unchanged."""
    match = matcher(where)
    return unflatten({k: fn(v) if match(k, v) else v for k, v in flatten(params).items()})


def labels(params: Mapping[str, Any], rules: Mapping[str, Where], default: str | None = None) -> Params:
    """A tree of label strings, one per leaf: the first rule (in order) that matches names the leaf.

    Leaves no rule matches get `default`; with default None they are an error, so a typo in a rule
    never silently leaves parameters out of an optimizer.
    """
    matchers = [(name, matcher(w)) for name, w in rules.items()]
    out: dict[str, str] = {}
    for key, leaf in flatten(params).items():
        name = next((n for n, m in matchers if m(key, leaf)), default)
        if name is None:
            raise ValueError(f"labels: no rule matches {key!r} and there is no default")
        out[key] = name
    return unflatten(out)
