"""Pure layers over parameter subtrees. Each takes its own `{"weight", "bias", ...}` dict first.

Linears are written as `x @ w.T + b`: under torch.func + torch.compile, `F.linear` with a bias on a
3-D input specialises on the batch size and recompiles for every new one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rfdetr_fn.tree import Params


def linear(p: Params, x: Tensor) -> Tensor:
    y = x @ p["weight"].t()
    return y + p["bias"] if "bias" in p else y


def layer_norm(p: Params, x: Tensor, eps: float = 1e-5) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), p["weight"], p["bias"], eps)


def channel_layer_norm(p: Params, x: Tensor, eps: float = 1e-6) -> Tensor:
    """LayerNorm over C of an NCHW map (upstream's projector/segmentation 'LayerNorm' with data_format NCHW)."""
    return layer_norm(p, x.permute(0, 2, 3, 1), eps).permute(0, 3, 1, 2)


def mlp(p: Params, x: Tensor, num_layers: int) -> Tensor:
    """Upstream's MLP: `layers.{i}` linears with ReLU between them (none after the last)."""
    for i in range(num_layers):
        x = linear(p["layers"][str(i)], x)
        if i < num_layers - 1:
            x = F.relu(x)
    return x


# ---- initialisers: each returns a fresh tensor from an explicit generator ----


def xavier_uniform(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    fan_out, fan_in = shape[0], shape[1]
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    bound = math.sqrt(6.0 / ((fan_in + fan_out) * receptive))
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def kaiming_uniform_default(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """PyTorch's default Linear/Conv weight init (kaiming_uniform with a=sqrt(5))."""
    fan_in = math.prod(shape[1:])
    bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def default_bias(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> Tensor:
    bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def trunc_normal(shape: tuple[int, ...], gen: torch.Generator, std: float = 0.02) -> Tensor:
    return torch.nn.init.trunc_normal_(torch.empty(shape), std=std, a=-2 * std, b=2 * std, generator=gen)


def linear_init(out_dim: int, in_dim: int, gen: torch.Generator) -> Params:
    """PyTorch's default nn.Linear initialisation."""
    return {
        "weight": kaiming_uniform_default((out_dim, in_dim), gen),
        "bias": default_bias((out_dim,), in_dim, gen),
    }


def head_init(dim: int, out_dim: int, gen: torch.Generator) -> Params:
    """Upstream's 3-layer head MLP d -> d -> d -> out with a zero last layer: its first outputs are exact
    zeros, so boxes (and keypoints) start on their reference."""
    return {
        "layers": {
            "0": linear_init(dim, dim, gen),
            "1": linear_init(dim, dim, gen),
            "2": {"weight": torch.zeros(out_dim, dim), "bias": torch.zeros(out_dim)},
        }
    }


def norm_init(dim: int) -> Params:
    return {"weight": torch.ones(dim), "bias": torch.zeros(dim)}
