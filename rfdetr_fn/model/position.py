"""Sine position encodings: the per-pixel one built from a padding mask, and the one for query boxes.

Both interleave sin/cos pairs over `num_feats` frequencies 10000^(2*floor(k/2)/num_feats). Upstream
keeps the mask encoding in float32 whatever the model dtype (a "float32 island"); we do the same so
float64 runs match upstream's float64 outputs bit for bit where it matters.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_SCALE = 2 * math.pi


def _frequencies(num_feats: int, dtype: torch.dtype, device: torch.device, temperature: float) -> Tensor:
    k = torch.arange(num_feats, dtype=dtype, device=device)
    return temperature ** (2 * (k // 2) / num_feats)


def _interleave(angles: Tensor) -> Tensor:
    """(..., F) angles -> (..., F) as [sin a0, cos a1, sin a2, cos a3, ...]."""
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_for_boxes(boxes: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Sine encoding of (B, N, 4) cxcywh boxes (or (B, N, 2) points) -> (B, N, 4*num_feats) in their dtype.

    Order is (y, x, w, h): the decoder's `ref_point_head` weights expect exactly this layout.
    """
    freqs = _frequencies(num_feats, boxes.dtype, boxes.device, temperature)
    parts = [_interleave((boxes[..., i] * _SCALE)[..., None] / freqs) for i in range(boxes.shape[-1])]
    if boxes.shape[-1] == 2:
        return torch.cat((parts[1], parts[0]), dim=-1)
    if boxes.shape[-1] == 4:
        return torch.cat((parts[1], parts[0], parts[2], parts[3]), dim=-1)
    raise ValueError(f"boxes must end in 2 or 4 coordinates, got shape {tuple(boxes.shape)}")
