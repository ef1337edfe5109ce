"""Keypoint annotations: the dataset's schema, parsing with clear errors, and the geometric transforms.

Keypoints travel with a sample's target as `keypoints` (N, max(schema), 3) float32 = (x, y, v) in pixels,
v in {0 unlabelled, 1 labelled but hidden, 2 visible}; unlabelled keypoints and the padding slots past a
class's count are (0, 0, 0), as upstream's pipeline stores them. Upstream's augmentation rules
(Albumentations' keypoint convention: a keypoint's x, y are pixel indices, pixel centres at integers):
boxes and images flip x -> W - x but keypoints x -> (W - 1) - x; the left/right slots of every
instance swap on a horizontal flip only (a vertical flip moves y -> (H - 1) - y and swaps nothing);
rotations and affines move keypoints with the image's matrix about the pixel-index centre; any keypoint
that is unlabelled or falls outside [0, W) x [0, H) becomes (0, 0, 0).
Flip pairs come from left/right keypoint names (or YOLO's flip_idx); when the classes disagree the
merged list is empty and keypoint training drops the horizontal flip, as upstream does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

# ------------------------------------------------------------------------------------------------ schema


def category_counts(categories: Sequence[dict], annotations: Sequence[dict]) -> dict[int, int]:
    """Keypoints per raw category id: its `keypoints` names, else the longest annotation triplet list."""
    counts = {int(c["id"]): len(c["keypoints"]) for c in categories if isinstance(c.get("keypoints"), list)}
    for a in annotations:
        kps = a.get("keypoints")
        cat = a.get("category_id")
        if isinstance(kps, list) and kps and cat is not None and not counts.get(int(cat)):
            counts[int(cat)] = max(counts.get(int(cat), 0), len(kps) // 3)
    return counts


def label_schema(
    categories: Sequence[dict], annotations: Sequence[dict], cat2label: dict[int, int]
) -> tuple[tuple[int, ...], list[list[str]]]:
    """(keypoints per label, names per label) with trailing keypoint-less labels trimmed; () if none."""
    counts = category_counts(categories, annotations)
    by_label: dict[int, tuple[int, list[str]]] = {}
    names = {int(c["id"]): c.get("keypoints") for c in categories}
    for cat, label in cat2label.items():
        n = counts.get(cat, 0)
        given = names.get(cat)
        by_label[label] = (n, [str(x) for x in given] if isinstance(given, list) and len(given) == n else [])
    width = max((label + 1 for label, (n, _) in by_label.items() if n > 0), default=0)
    schema = tuple(by_label.get(i, (0, []))[0] for i in range(width))
    return schema, [by_label.get(i, (0, []))[1] for i in range(width)]


def skeleton_problems(categories: Sequence[dict], counts: dict[int, int]) -> list[str]:
    """What is wrong with the categories' COCO `skeleton` edges (1-based [a, b] keypoint pairs), if anything."""
    problems = []
    for c in categories:
        edges = c.get("skeleton")
        if not edges:
            continue
        n = counts.get(int(c["id"]), 0)
        where = f"category id {c['id']} ({c.get('name', '')})"
        for edge in edges if isinstance(edges, list) else [edges]:
            ok = isinstance(edge, list | tuple) and len(edge) == 2 and all(isinstance(v, int) for v in edge)
            if not ok or not all(1 <= v <= n for v in edge) or edge[0] == edge[1]:
                problems.append(
                    f"{where}: skeleton edge {edge!r} must join two different keypoints in 1..{n} (COCO is 1-based)"
                )
    return problems


def label_skeleton(categories: Sequence[dict], cat2label: dict[int, int], schema: Sequence[int]) -> tuple[int, ...]:
    """The categories' skeleton edges as flat [a0, b0, a1, b1, ...] indices into the schema's compact
    keypoint list (class 0's keypoints, then class 1's, ...), 0-based; edges must already be valid."""
    offsets = [sum(schema[:label]) for label in range(len(schema))]
    out: list[int] = []
    for c in categories:
        label = cat2label.get(int(c["id"]))
        if label is None or label >= len(schema) or not schema[label]:
            continue
        for a, b in c.get("skeleton") or []:
            out += [offsets[label] + a - 1, offsets[label] + b - 1]
    return tuple(out)


def class_edges(schema: Sequence[int], skeleton: Sequence[int], label: int) -> list[tuple[int, int]]:
    """The skeleton edges of one class, as indices into that class's own keypoints."""
    if label >= len(schema):
        return []
    start, stop = sum(schema[:label]), sum(schema[: label + 1])
    pairs = zip(skeleton[0::2], skeleton[1::2])
    return [(a - start, b - start) for a, b in pairs if start <= a < stop and start <= b < stop]


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(name).strip().lower()).strip("_")


def _mirror(name: str) -> str | None:
    tokens = name.split("_")
    if tokens.count("left") + tokens.count("right") != 1:
        return None
    return "_".join({"left": "right", "right": "left"}.get(t, t) for t in tokens)


def pairs_from_names(names: Sequence[str]) -> list[int]:
    """Flat [a0, b0, a1, b1, ...] of keypoints whose names differ only by one left/right token."""
    norm = [_normalise(n) for n in names]
    if len(set(norm)) != len(norm):
        return []
    index = {n: i for i, n in enumerate(norm)}
    pairs: list[int] = []
    seen: set[int] = set()
    for i, n in enumerate(norm):
        j = index.get(_mirror(n) or "")
        if i in seen or j is None or j == i or j in seen or _mirror(norm[j]) != n:
            continue
        pairs += [i, j]
        seen.update((i, j))
    return pairs


def pairs_from_flip_idx(flip_idx: Sequence[int]) -> list[int]:
    """YOLO's flip_idx permutation -> flat swap pairs (mutual pairs only)."""
    pairs: list[int] = []
    seen: set[int] = set()
    for i, j in enumerate(flip_idx):
        if i in seen or j in seen or i == j:
            seen.add(i)
            continue
        if 0 <= j < len(flip_idx) and flip_idx[j] == i:
            pairs += [i, j]
            seen.update((i, j))
    return pairs


def merged_flip_pairs(schema: Sequence[int], names: Sequence[Sequence[str]]) -> tuple[int, ...]:
    """One global pair list when every keypoint class infers the same pairs (upstream), else ()."""
    per_class = [pairs_from_names(n) if len(n) == k else [] for k, n in zip(schema, names) if k > 0]
    if not per_class or any(p != per_class[0] for p in per_class[1:]):
        return ()
    return tuple(per_class[0])


# ----------------------------------------------------------------------------------------------- parsing


def parse(raw: Any, count: int, width: int) -> np.ndarray | str:
    """An annotation's flat [x, y, v, ...] list -> (width, 3) float32, or the problem as a string.

    Missing or empty keypoints are all unlabelled; the list must hold exactly `count` triplets and every
    v must be 0, 1 or 2; unlabelled points are stored as (0, 0, 0)."""
    out = np.zeros((width, 3), np.float32)
    if raw is None or (isinstance(raw, list) and not raw):
        return out
    if not isinstance(raw, list) or len(raw) != 3 * count:
        got = len(raw) if isinstance(raw, list) else type(raw).__name__
        return f"'keypoints' has {got} values, want {count} (x, y, v) triplets = {3 * count}"
    try:
        values = np.asarray(raw, dtype=np.float64).reshape(count, 3)
    except (TypeError, ValueError):
        return "'keypoints' holds non-numeric values"
    if not np.isfinite(values).all():
        return "'keypoints' holds non-finite values"
    bad = sorted({float(v) for v in values[:, 2] if v not in (0, 1, 2)})
    if bad:
        return f"keypoint visibility {bad} outside 0..2"
    values[values[:, 2] == 0] = 0.0
    out[:count] = values
    return out


# ---------------------------------------------------------------------------------------------- geometry


def clean(kps: Tensor, height: int, width: int) -> Tensor:
    """Unlabelled keypoints and those outside [0, W) x [0, H) become (0, 0, 0)."""
    x, y, v = kps.unbind(-1)
    keep = (v > 0) & (x >= 0) & (x < width) & (y >= 0) & (y < height)
    return torch.where(keep[..., None], kps, torch.zeros_like(kps))


def scale(kps: Tensor, sx: float, sy: float) -> Tensor:
    return kps * torch.tensor([sx, sy, 1.0], dtype=kps.dtype)


def shift(kps: Tensor, dx: float, dy: float, height: int, width: int) -> Tensor:
    """Move into a crop window of (height, width) at (dx, dy); points left outside are dropped."""
    moved = torch.where(kps[..., 2:] > 0, kps - torch.tensor([dx, dy, 0.0], dtype=kps.dtype), kps)
    return clean(moved, height, width)


def hflip(kps: Tensor, height: int, width: int, pairs: Sequence[int]) -> Tensor:
    """x -> (W - 1) - x, left/right slots swapped for every instance, off-image points dropped."""
    flipped = kps.clone()
    flipped[..., 0] = (width - 1) - kps[..., 0]
    order = list(range(kps.shape[-2]))
    for a, b in zip(pairs[0::2], pairs[1::2]):
        order[a], order[b] = b, a
    flipped = flipped[..., order, :]
    return clean(flipped, height, width)


def vflip(kps: Tensor, height: int, width: int) -> Tensor:
    """y -> (H - 1) - y; no slots swap (upstream counts only horizontal mirrors), off-image points dropped."""
    flipped = kps.clone()
    flipped[..., 1] = (height - 1) - kps[..., 1]
    return clean(flipped, height, width)


def warp(kps: Tensor, matrix: Tensor, height: int, width: int) -> Tensor:
    """Move keypoints with a 3x3 map between pixel-edge coordinates (the image warp's), off-image ones dropped.

    Keypoints are pixel indices, so they shift by half a pixel into edge coordinates and back: the map then
    turns about ((W - 1) / 2, (H - 1) / 2), the centre Albumentations uses for keypoints."""
    xy1 = torch.cat([kps[..., :2] + 0.5, torch.ones_like(kps[..., :1])], -1)
    moved = xy1.double() @ matrix.double().T
    out = torch.cat([(moved[..., :2] - 0.5).to(kps.dtype), kps[..., 2:]], -1)
    return clean(out, height, width)


def normalise(kps: Tensor, height: int, width: int) -> Tensor:
    """Pixel x, y -> fractions of the (unpadded) image side; v unchanged."""
    return kps / torch.tensor([width, height, 1.0], dtype=kps.dtype)
