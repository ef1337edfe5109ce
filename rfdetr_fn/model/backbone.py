"""Windowed DINOv2 backbone (upstream's `backbone.0.encoder`) as pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def resize_pos_embed(table: Tensor, grid_hw: tuple[int, int]) -> Tensor:
    """Resize a (1, 1 + S*S, D) position table to (1, 1 + H*W, D): bicubic + antialias in float32, CLS kept.

    Used on every forward whose patch grid differs from the table, and once at load time to bring a
    checkpoint's table to the configured size.
    """
    cls, patches = table[:, :1], table[:, 1:]
    side = int(round(patches.shape[1] ** 0.5))
    if side * side != patches.shape[1]:
        raise ValueError(f"position table has {patches.shape[1]} patch entries, not a square grid")
    if (side, side) == tuple(grid_hw):
        return table
    grid = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(grid_hw), mode="bicubic", align_corners=False, antialias=True)
    patches = grid.to(table.dtype).permute(0, 2, 3, 1).reshape(1, grid_hw[0] * grid_hw[1], -1)
    return torch.cat([cls, patches], dim=1)
