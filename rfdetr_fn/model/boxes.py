"""Box conversions and (generalised) IoU, shared by the loss, the postprocess and the data pipeline.

Boxes are the last axis of size 4; every function broadcasts over leading axes, so the same code
serves a flat list of boxes, a batch of images and a batch of (image, group) blocks. Pairwise
functions put the second set's axis last: (..., N, 4) x (..., M, 4) -> (..., N, M). Nothing here
checks box validity (no data-dependent branches), so it traces into one compiled graph; degenerate
boxes (zero union or zero enclosing area) give NaN, and callers mask them out.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(cx, cy, w, h) -> (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of xyxy boxes."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _span(lo: Tensor, hi: Tensor) -> Tensor:
    """Product of the clamped side lengths of the box lo..hi (0 when empty)."""
    wh = (hi - lo).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def pairwise_iou(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """IoU and union of every xyxy box in `a` (..., N, 4) with every box in `b` (..., M, 4)."""
    a_, b_ = a[..., :, None, :], b[..., None, :, :]
    inter = _span(torch.maximum(a_[..., :2], b_[..., :2]), torch.minimum(a_[..., 2:], b_[..., 2:]))
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter
    return inter / union, union


def pairwise_giou(a: Tensor, b: Tensor) -> Tensor:
    """Generalised IoU of every xyxy box in `a` (..., N, 4) with every box in `b` (..., M, 4)."""
    iou, union = pairwise_iou(a, b)
    a_, b_ = a[..., :, None, :], b[..., None, :, :]
    hull = _span(torch.minimum(a_[..., :2], b_[..., :2]), torch.maximum(a_[..., 2:], b_[..., 2:]))
    return iou - (hull - union) / hull


def elementwise_iou(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """IoU and union of corresponding xyxy boxes: (..., 4) x (..., 4) -> (...)."""
    inter = _span(torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:]))
    union = box_area(a) + box_area(b) - inter
    return inter / union, union


def elementwise_giou(a: Tensor, b: Tensor) -> Tensor:
    """Generalised IoU of corresponding xyxy boxes: (..., 4) x (..., 4) -> (...)."""
    iou, union = elementwise_iou(a, b)
    hull = _span(torch.minimum(a[..., :2], b[..., :2]), torch.maximum(a[..., 2:], b[..., 2:]))
    return iou - (hull - union) / hull
