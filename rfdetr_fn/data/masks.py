"""Instance masks in COCO form: polygon areas and decoding polygons / RLE into bool masks."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from pycocotools import mask as mask_utils
from torch import Tensor


def polygon_area(poly: list[float]) -> float:
    """Shoelace area in px^2 of a flat [x1, y1, x2, y2, ...] polygon (COCO's `area` for polygon masks)."""
    xs, ys = poly[0::2], poly[1::2]
    return abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))) / 2


def decode_masks(segmentations: list[Any], height: int, width: int) -> Tensor:
    """COCO polygons / RLE (compressed or not) -> bool (N, H, W); no segmentation gives an empty mask."""
    rles, slots = [], []
    for i, seg in enumerate(segmentations):
        if isinstance(seg, dict):
            rles.append(mask_utils.frPyObjects(seg, height, width) if isinstance(seg["counts"], list) else seg)
        elif seg and (polys := [p for p in seg if len(p) >= 6]):
            rles.append(mask_utils.merge(mask_utils.frPyObjects(polys, height, width)))
        else:
            continue
        slots.append(i)
    out = torch.zeros((len(segmentations), height, width), dtype=torch.bool)
    if rles:
        with warnings.catch_warnings():  # pycocotools' cython trips numpy 2's copy=False deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = mask_utils.decode(rles)  # (H, W, n) uint8, column-major
        out[slots] = torch.from_numpy(decoded).permute(2, 0, 1).bool()
    return out


def rle_problem(seg: dict, height: int, width: int) -> str | None:
    """Why a COCO RLE cannot be this image's mask, if it cannot (checked in Python: pycocotools raises a
    bare ValueError, or aborts the process, on malformed counts)."""
    size = seg.get("size")
    if not (isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        return f"RLE 'size' must be [height, width], got {size!r}"
    if list(size) != [height, width]:
        return f"RLE size {list(size)} differs from the image's {height}x{width}"
    counts = seg.get("counts")
    if isinstance(counts, list):
        runs = counts if all(isinstance(v, int) and v >= 0 for v in counts) else None
    elif isinstance(counts, str | bytes):
        runs = _compressed_runs(counts.encode("ascii", "replace") if isinstance(counts, str) else counts)
    else:
        return f"RLE 'counts' must be a string or a list of integers, got {type(counts).__name__}"
    if runs is None or any(r < 0 for r in runs):
        return "RLE 'counts' are malformed"
    if sum(runs) != height * width:
        return f"RLE runs cover {sum(runs)} pixels, the image has {height * width}"
    return None


def _compressed_runs(text: bytes) -> list[int] | None:
    """COCO's compressed RLE string as run lengths (its LEB128-like 6-bit code, deltas from the run two
    back); None when a character is out of range or the text ends mid-number."""
    runs: list[int] = []
    pos = 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(text) or not 48 <= text[pos] < 112:
                return None
            c = text[pos] - 48
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            pos, shift = pos + 1, shift + 1
            if not more and c & 0x10:
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs
