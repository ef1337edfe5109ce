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


def ms_deform_attn_gather(
    value: Tensor,
    spatial_shapes: Tensor | list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The same function as `ms_deform_attn_reference`, with bilinear sampling written as four gathers.

    Why: grid_sample has no forward-mode derivative and no double backward in torch, so `torch.func.jvp`,
    Hessian-vector products and forward-over-reverse get this path (chosen per call, see `ms_deform_attn`); every op
    here has vmap, forward-mode and second-order rules.
    """
    n, _, heads, dim = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    shapes = [
        (int(h), int(w)) for h, w in (spatial_shapes.tolist() if isinstance(spatial_shapes, Tensor) else spatial_shapes)
    ]
    per_level = value.split([h * w for h, w in shapes], dim=1)
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = per_level[lvl].flatten(2).transpose(1, 2).reshape(n * heads, dim, h * w)
        loc = sampling_locations[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (N*H, Q, P, 2)
        x = loc[..., 0] * w - 0.5  # align_corners=False pixel coordinates
        y = loc[..., 1] * h - 0.5
        x0, y0 = x.detach().floor(), y.detach().floor()
        fx, fy = x - x0, y - y0  # no abs(): its zero derivative at integer coordinates (cell centres) is wrong
        total = 0.0
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
            xi, yi = x0 + dx, y0 + dy
            weight = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
            inside = ((xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)).to(v.dtype)  # zero padding
            index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long().flatten(1)  # (N*H, Q*P)
            corner = v.gather(2, index.unsqueeze(1).expand(-1, dim, -1)).view(n * heads, dim, q, points)
            total = total + corner * (weight * inside).unsqueeze(1)
        sampled.append(total)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (N*H, D, Q, L*P)
    weights = attention_weights.transpose(1, 2).reshape(n * heads, 1, q, levels * points)
    out = (stacked * weights).sum(-1).view(n, heads * dim, q)
    return out.transpose(1, 2).contiguous()
