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


def sine_from_mask(mask: Tensor, num_feats: int, dtype: torch.dtype, temperature: float = 10000.0) -> Tensor:
    """Normalised sine encoding of a (B, H, W) padding mask (True = padding) -> (B, 2*num_feats, H, W).

    Coordinates are 1-based cumulative counts of valid pixels, divided by the last count (+1e-6) and
    scaled to 2*pi, so the encoding spans the valid region of each image whatever its padding.
    Channels are y first, then x. Computed in float32, returned in `dtype`.
    """
    valid = ~mask
    y = valid.cumsum(1, dtype=torch.float32)
    x = valid.cumsum(2, dtype=torch.float32)
    y = y / (y[:, -1:, :] + 1e-6) * _SCALE
    x = x / (x[:, :, -1:] + 1e-6) * _SCALE
    freqs = _frequencies(num_feats, torch.float32, mask.device, temperature)
    pos_y = _interleave(y[..., None] / freqs)
    pos_x = _interleave(x[..., None] / freqs)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(dtype)


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
