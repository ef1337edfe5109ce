"""Attention layers shared by the decoder and the keypoint block, and their initialisers.

`self_attention` is nn.MultiheadAttention (batch_first) restricted to query groups; `deformable_attention`
is MSDeformAttn around reference boxes, its core the `ms_deform_attn` kernel.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rfdetr_fn.config import ModelConfig
from rfdetr_fn.kernels import ms_deform_attn
from rfdetr_fn.model import nn
from rfdetr_fn.tree import Params

Shapes = list[tuple[int, int]]


def self_attention(
    p: Params, x: Tensor, pos: Tensor, heads: int, groups: int, attn_bias: Tensor | None = None
) -> Tensor:
    """nn.MultiheadAttention(batch_first) with q = k = x + pos, v = x, restricted to each query group.

    The (B, G*Q, d) queries are viewed as (B*G, Q, d): attention never crosses a group boundary.
    `attn_bias` (Q, Q) is added to the scores (-inf blocks a pair), like MHA's float attn_mask.
    """
    b, n, d = x.shape
    qk = x + pos
    w_q, w_k, w_v = p["in_proj_weight"].chunk(3)
    b_q, b_k, b_v = p["in_proj_bias"].chunk(3)

    def heads_view(t: Tensor) -> Tensor:  # contiguous: see the note in rfdetr_fn/compiler.py
        return t.reshape(b * groups, n // groups, heads, d // heads).transpose(1, 2).contiguous()

    q = heads_view(qk @ w_q.T + b_q)
    k = heads_view(qk @ w_k.T + b_k)
    v = heads_view(x @ w_v.T + b_v)
    out = nn.attention(q, k, v, attn_bias)
    out = out.transpose(1, 2).reshape(b, n, d)
    return nn.linear(p["out_proj"], out)


def deformable_attention(
    p: Params, query: Tensor, ref: Tensor, value: Tensor, mask: Tensor, shapes: Shapes, cfg: ModelConfig
) -> Tensor:
    """MSDeformAttn with 4-d reference boxes (B, N, levels, 4): offsets scale with box size * 0.5 / points."""
    b, n, d = query.shape
    heads, levels, points = cfg.ca_nheads, len(shapes), cfg.dec_n_points
    v = nn.linear(p["value_proj"], value).masked_fill(mask[..., None], 0.0)
    offsets = nn.linear(p["sampling_offsets"], query).view(b, n, heads, levels, points, 2)
    weights = nn.linear(p["attention_weights"], query).view(b, n, heads, levels * points)
    weights = weights.softmax(-1).view(b, n, heads, levels, points)
    r = ref[:, :, None, :, None, :]
    loc = r[..., :2] + offsets / points * r[..., 2:] * 0.5
    out = ms_deform_attn(v.view(b, v.shape[1], heads, d // heads), shapes, loc, weights)
    return nn.linear(p["output_proj"], out)


def msda_init(cfg: ModelConfig, gen: torch.Generator) -> Params:
    """MSDeformAttn's own reset: zero offset/attention weights, direction-pattern offset bias."""
    d, heads, levels, points = cfg.hidden_dim, cfg.ca_nheads, cfg.num_levels, cfg.dec_n_points
    return {
        "sampling_offsets": {
            "weight": torch.zeros(heads * levels * points * 2, d),
            "bias": _msda_offset_bias(heads, levels, points),
        },
        "attention_weights": {
            "weight": torch.zeros(heads * levels * points, d),
            "bias": torch.zeros(heads * levels * points),
        },
        "value_proj": {"weight": nn.xavier_uniform((d, d), gen), "bias": torch.zeros(d)},
        "output_proj": {"weight": nn.xavier_uniform((d, d), gen), "bias": torch.zeros(d)},
    }


def _msda_offset_bias(heads: int, levels: int, points: int) -> Tensor:
    """Upstream's direction pattern: head h points along angle 2*pi*h/heads, point i at distance i+1."""
    theta = torch.arange(heads, dtype=torch.float32) * (2.0 * math.pi / heads)
    grid = torch.stack([theta.cos(), theta.sin()], -1)
    grid = (grid / grid.abs().max(-1, keepdim=True).values).view(heads, 1, 1, 2).repeat(1, levels, points, 1)
    grid = grid * torch.arange(1, points + 1, dtype=torch.float32).view(1, 1, points, 1)
    return grid.flatten()


def xavier_linear(out_dim: int, in_dim: int, gen: torch.Generator) -> Params:
    """xavier_uniform weight (Transformer._reset_parameters) with the default nn.Linear bias."""
    return {
        "weight": nn.xavier_uniform((out_dim, in_dim), gen),
        "bias": nn.default_bias((out_dim,), in_dim, gen),
    }
