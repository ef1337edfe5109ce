"""Multi-scale projector (upstream's `backbone.0.projector`): ViT stages -> one d-channel map per level.

Per level, every ViT map is resampled (P3: 2x transposed conv, P4: identity, P5: stride-2 ConvX with
ReLU), the maps are concatenated on channels and fused by a C2f block (SiLU, bottlenecks without
residual) and a final channel LayerNorm. Every norm is a channel LayerNorm with eps 1e-6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rfdetr_fn.config import ModelConfig
from rfdetr_fn.model import nn
from rfdetr_fn.tree import Params

NUM_BLOCKS = 3  # C2f bottlenecks per level (upstream's num_blocks)
_SCALE = {"P3": 2.0, "P4": 1.0, "P5": 0.5}


# ---- parameters (PyTorch default init; channel LayerNorms 1/0) ----


def _conv_x(in_ch: int, out_ch: int, kernel: int, gen: torch.Generator) -> Params:
    """ConvX = conv without bias + channel LayerNorm (named `bn` upstream) + activation."""
    return {
        "conv": {"weight": nn.kaiming_uniform_default((out_ch, in_ch, kernel, kernel), gen)},
        "bn": nn.norm_init(out_ch),
    }


def _c2f(in_ch: int, out_ch: int, gen: torch.Generator) -> Params:
    c = out_ch // 2
    return {
        "cv1": _conv_x(in_ch, 2 * c, 1, gen),
        "cv2": _conv_x((2 + NUM_BLOCKS) * c, out_ch, 1, gen),
        "m": {str(i): {"cv1": _conv_x(c, c, 3, gen), "cv2": _conv_x(c, c, 3, gen)} for i in range(NUM_BLOCKS)},
    }


def _sampling_init(level: str, dim: int, gen: torch.Generator) -> Params | None:
    if level == "P3":
        shape = (dim, dim // 2, 2, 2)  # ConvTranspose2d weight is (in, out, k, k); fan_in = out * k * k
        return {
            "0": {
                "weight": nn.kaiming_uniform_default(shape, gen),
                "bias": nn.default_bias((dim // 2,), (dim // 2) * 4, gen),
            }
        }
    if level == "P5":
        return {"0": _conv_x(dim, dim, 3, gen)}
    return None


def _check(cfg: ModelConfig) -> None:
    if not cfg.layer_norm:
        raise ValueError(
            "layer_norm=False (a BatchNorm projector) is not supported; upstream only ships layer_norm=True"
        )
    unknown = [lvl for lvl in cfg.projector_scale if lvl not in _SCALE]
    if unknown:
        raise ValueError(f"projector_scale has unknown levels {unknown}; choose from {list(_SCALE)}")


def level_in_dim(level: str, cfg: ModelConfig) -> int:
    """Channels entering a level's C2f: every ViT map, halved by the P3 transposed conv."""
    per_map = cfg.vit_width // 2 if level == "P3" else cfg.vit_width
    return per_map * len(cfg.out_feature_indexes)


def init(cfg: ModelConfig, gen: torch.Generator) -> Params:
    """Fresh projector parameters, stored under `backbone.0.projector` (keys in upstream's order)."""
    _check(cfg)
    sampling: Params = {}
    stages: Params = {}
    for i, level in enumerate(cfg.projector_scale):
        per_map = {str(j): _sampling_init(level, cfg.vit_width, gen) for j in range(len(cfg.out_feature_indexes))}
        if level != "P4":
            sampling[str(i)] = per_map
        stages[str(i)] = {
            "0": _c2f(level_in_dim(level, cfg), cfg.hidden_dim, gen),
            "1": nn.norm_init(cfg.hidden_dim),
        }
    return {"stages_sampling": sampling, "stages": stages} if sampling else {"stages": stages}


# ---- forward ----


def _conv_x_apply(p: Params, x: Tensor, stride: int = 1, act=F.silu) -> Tensor:
    w = p["conv"]["weight"]
    x = F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2)
    return act(nn.channel_layer_norm(p["bn"], x, 1e-6))


def _c2f_apply(p: Params, x: Tensor) -> Tensor:
    y = list(_conv_x_apply(p["cv1"], x).chunk(2, dim=1))
    for i in range(len(p["m"])):
        block = p["m"][str(i)]
        y.append(_conv_x_apply(block["cv2"], _conv_x_apply(block["cv1"], y[-1])))  # no residual
    return _conv_x_apply(p["cv2"], torch.cat(y, dim=1))


def _resample(level: str, p: Params | None, x: Tensor) -> Tensor:
    if level == "P3":
        return F.conv_transpose2d(x, p["0"]["weight"], p["0"]["bias"], stride=2)
    if level == "P5":
        return _conv_x_apply(p["0"], x, stride=2, act=F.relu)
    return x


def apply(p: Params, feats: list[Tensor], cfg: ModelConfig) -> list[Tensor]:
    """ViT maps (one (B, D, h, w) per out-feature stage) -> one (B, hidden_dim, h_l, w_l) map per level."""
    _check(cfg)
    if len(feats) != len(cfg.out_feature_indexes):
        raise ValueError(
            f"projector got {len(feats)} feature maps but out_feature_indexes={cfg.out_feature_indexes} "
            f"needs {len(cfg.out_feature_indexes)}"
        )
    out = []
    for i, level in enumerate(cfg.projector_scale):
        sampling = p.get("stages_sampling", {}).get(str(i), {})
        maps = [_resample(level, sampling.get(str(j)), x) for j, x in enumerate(feats)]
        fused = torch.cat(maps, dim=1) if len(maps) > 1 else maps[0]
        stage = p["stages"][str(i)]
        out.append(nn.channel_layer_norm(stage["1"], _c2f_apply(stage["0"], fused), 1e-6))
    return out
