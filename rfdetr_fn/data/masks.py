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
