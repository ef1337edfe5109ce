"""Instance-mask head (upstream prefix `segmentation_head.`): query features dotted with a pixel map.

The P4 projector map is resized to 1/mask_downsample_ratio of the batch tensor, refined by one
depthwise block per decoder layer (cumulatively: layer l sees blocks 0..l), projected, and dotted
with each query's features. Eval builds dense (B, N, h, w) logits; training returns the factors
(`spatial_features`, `query_features`, `bias`) so the loss only builds the matched masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rfdetr_fn.config import ModelConfig
from rfdetr_fn.model import nn
from rfdetr_fn.tree import Params


def _depthwise_block(p: Params, x: Tensor) -> Tensor:
    """ConvNeXt-style block without the MLP: depthwise 3x3, LN (eps 1e-6), linear, GELU, residual."""
    y = F.conv2d(x, p["dwconv"]["weight"], p["dwconv"]["bias"], padding=1, groups=x.shape[1])
    y = y.permute(0, 2, 3, 1)
    y = F.gelu(nn.linear(p["pwconv1"], nn.layer_norm(p["norm"], y, eps=1e-6)))
    return y.permute(0, 3, 1, 2) + x


def _query_features(p: Params, hs: Tensor) -> Tensor:
    """Residual MLP block (LN, d -> 4d, GELU, 4d -> d) then the d -> d projection."""
    block = p["query_features_block"]
    y = nn.layer_norm(block["norm_in"], hs)
    y = nn.linear(block["layers"]["2"], F.gelu(nn.linear(block["layers"]["0"], y)))
    return nn.linear(p["query_features_proj"], y + hs)


def _spatial_proj(p: Params, x: Tensor) -> Tensor:
    return F.conv2d(x, p["spatial_features_proj"]["weight"], p["spatial_features_proj"]["bias"])


def dense(factors: dict[str, Tensor]) -> Tensor:
    """Mask logits (B, N, h, w) from the sparse factors."""
    return torch.einsum("bchw,bnc->bnhw", factors["spatial_features"], factors["query_features"]) + factors["bias"]


def apply(
    p: Params,
    spatial: Tensor,
    hs: list[Tensor],
    image_hw: tuple[int, int],
    cfg: ModelConfig,
    *,
    train: bool,
    skip_blocks: bool = False,
) -> list[Tensor] | list[dict[str, Tensor]]:
    """One mask output per entry of `hs` (decoder layer states, (B, N, d) each).

    `skip_blocks` (the encoder outputs) projects the resized map without any depthwise block.
    Returns dense logits (eval) or factor dicts (train).
    """
    r = cfg.mask_downsample_ratio
    x = F.interpolate(spatial, size=(image_hw[0] // r, image_hw[1] // r), mode="bilinear", align_corners=False)
    outs = []
    if skip_blocks:
        if len(hs) != 1:
            raise ValueError(f"skip_blocks takes exactly one query tensor, got {len(hs)}")
        outs.append(
            {
                "spatial_features": _spatial_proj(p, x),
                "query_features": _query_features(p, hs[0]),
                "bias": p["bias"],
            }
        )
    else:
        for i, q in enumerate(hs):
            x = _depthwise_block(p["blocks"][str(i)], x)
            outs.append(
                {
                    "spatial_features": _spatial_proj(p, x),
                    "query_features": _query_features(p, q),
                    "bias": p["bias"],
                }
            )
    return outs if train else [dense(o) for o in outs]


def init(cfg: ModelConfig, gen: torch.Generator) -> Params:
    """PyTorch default initialisation (kaiming-uniform weights, fan-in biases), LN 1/0, scalar bias 0."""
    d = cfg.hidden_dim

    def conv(out_c: int, in_c: int, k: int) -> Params:
        return {
            "weight": nn.kaiming_uniform_default((out_c, in_c, k, k), gen),
            "bias": nn.default_bias((out_c,), in_c * k * k, gen),
        }

    return {
        "bias": torch.zeros(1),
        "blocks": {
            str(i): {"dwconv": conv(d, 1, 3), "norm": nn.norm_init(d), "pwconv1": nn.linear_init(d, d, gen)}
            for i in range(cfg.dec_layers)
        },
        "spatial_features_proj": conv(d, d, 1),
        "query_features_block": {
            "norm_in": nn.norm_init(d),
            "layers": {"0": nn.linear_init(4 * d, d, gen), "2": nn.linear_init(d, 4 * d, gen)},
        },
        "query_features_proj": nn.linear_init(d, d, gen),
    }
