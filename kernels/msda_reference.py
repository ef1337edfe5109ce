"""Multi-scale deformable attention core in plain PyTorch: the specification the Triton kernels match.

Semantics are upstream's `ms_deform_attn_core_pytorch`: bilinear sampling with zero padding and
align_corners=False, softmaxed weights applied per head, head-major output channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: Tensor | list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """value (N, S, H, D); spatial_shapes (L, 2) as (H, W); locations (N, Q, H, L, P, 2) in [0, 1], x first;
    weights (N, Q, H, L, P). Returns (N, Q, H*D)."""
    n, _, heads, dim = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    shapes = [
        (int(h), int(w)) for h, w in (spatial_shapes.tolist() if isinstance(spatial_shapes, Tensor) else spatial_shapes)
    ]
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = per_level[lvl].flatten(2).transpose(1, 2).reshape(n * heads, dim, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (N*H, Q, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (N*H, D, Q, L*P)
    weights = attention_weights.transpose(1, 2).reshape(n * heads, 1, q, levels * points)
    out = (stacked * weights).sum(-1).view(n, heads * dim, q)
    return out.transpose(1, 2).contiguous()
