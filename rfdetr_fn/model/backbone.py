"""Windowed DINOv2 backbone (upstream's `backbone.0.encoder`) as pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rfdetr_fn import rng
from rfdetr_fn.compiler import region
from rfdetr_fn.config import ModelConfig
from rfdetr_fn.model import nn
from rfdetr_fn.tree import Params

_EPS = 1e-6  # every LayerNorm in the ViT


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


# ---- parameters ----


def _hf_trunc_normal(shape: tuple[int, ...], gen: torch.Generator, std: float = 0.02) -> Tensor:
    """HF DINOv2 init: trunc_normal_ with absolute bounds [-2, 2] (practically untruncated at std 0.02)."""
    return torch.nn.init.trunc_normal_(torch.empty(shape), mean=0.0, std=std, a=-2.0, b=2.0, generator=gen)


def _linear(out_dim: int, in_dim: int, gen: torch.Generator) -> Params:
    return {"weight": _hf_trunc_normal((out_dim, in_dim), gen), "bias": torch.zeros(out_dim)}


def _layer_init(cfg: ModelConfig, gen: torch.Generator) -> Params:
    d, hidden = cfg.vit_width, cfg.vit_width * cfg.vit_mlp_ratio
    return {
        "norm1": nn.norm_init(d),
        "attention": {
            "attention": {name: _linear(d, d, gen) for name in ("query", "key", "value")},
            "output": {"dense": _linear(d, d, gen)},
        },
        "layer_scale1": {"lambda1": torch.ones(d)},
        "norm2": nn.norm_init(d),
        "mlp": {"fc1": _linear(hidden, d, gen), "fc2": _linear(d, hidden, gen)},
        "layer_scale2": {"lambda1": torch.ones(d)},
    }


def init(cfg: ModelConfig, gen: torch.Generator) -> Params:
    """Fresh ViT parameters, stored under `backbone.0.encoder` (keys start with `encoder.`).

    Insertion order follows upstream's state dict, so optimizer state lines up with upstream's
    parameter order. Works under `with torch.device("meta"):` to get shapes without allocating.
    """
    d, p = cfg.vit_width, cfg.patch_size
    embeddings: Params = {"cls_token": _hf_trunc_normal((1, 1, d), gen), "mask_token": torch.zeros(1, d)}
    if cfg.num_registers:
        embeddings["register_tokens"] = torch.zeros(1, cfg.num_registers, d)
    embeddings["position_embeddings"] = _hf_trunc_normal((1, cfg.pe_size**2 + 1, d), gen)
    embeddings["patch_embeddings"] = {
        "projection": {"weight": _hf_trunc_normal((d, cfg.num_channels, p, p), gen), "bias": torch.zeros(d)}
    }
    layers = {str(i): _layer_init(cfg, gen) for i in range(cfg.vit_num_layers)}
    return {"encoder": {"embeddings": embeddings, "encoder": {"layer": layers}, "layernorm": nn.norm_init(d)}}


# ---- windows ----


def window_partition(x: Tensor, num_windows: int) -> Tensor:
    """(B, Hp, Wp, D) -> (B*nw*nw, Hp/nw * Wp/nw, D); windows image-major, then row, then column."""
    b, hp, wp, d = x.shape
    h, w = hp // num_windows, wp // num_windows
    x = x.reshape(b, num_windows, h, num_windows, w, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * num_windows * num_windows, h * w, d)


def window_unpartition(x: Tensor, num_windows: int, grid_hw: tuple[int, int]) -> Tensor:
    """Inverse of `window_partition`: (B*nw*nw, h*w, D) -> (B, Hp, Wp, D)."""
    hp, wp = grid_hw
    h, w = hp // num_windows, wp // num_windows
    d = x.shape[-1]
    x = x.reshape(-1, num_windows, num_windows, h, w, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, hp, wp, d)


# ---- forward ----


def _embed(p: Params, images: Tensor, cfg: ModelConfig) -> Tensor:
    """Patchify, add the (interpolated) position table, split into windows, prepend CLS and registers."""
    proj = p["patch_embeddings"]["projection"]
    x = F.conv2d(images.to(proj["weight"].dtype), proj["weight"], proj["bias"], stride=cfg.patch_size)
    b, d, hp, wp = x.shape
    pos = resize_pos_embed(p["position_embeddings"], (hp, wp))
    patches = x.flatten(2).transpose(1, 2) + pos[:, 1:]
    windows = window_partition(patches.reshape(b, hp, wp, d), cfg.num_windows)
    n = windows.shape[0]
    prefix = [(p["cls_token"] + pos[:, :1]).expand(n, 1, d)]
    if cfg.num_registers:
        prefix.append(p["register_tokens"].expand(n, -1, -1))
    return torch.cat([*prefix, windows], dim=1)


def _attention(p: Params, x: Tensor, num_heads: int) -> Tensor:
    n, t, d = x.shape

    def heads(y: Tensor) -> Tensor:  # contiguous: see the note in rfdetr_fn/compiler.py
        return y.reshape(n, t, num_heads, d // num_heads).transpose(1, 2).contiguous()

    a = p["attention"]
    q, k, v = (heads(nn.linear(a[name], x)) for name in ("query", "key", "value"))
    out = nn.attention(q, k, v)  # scale 1/sqrt(head_dim)
    return nn.linear(p["output"]["dense"], out.transpose(1, 2).reshape(n, t, d))


def _drop_path(x: Tensor, rate: Tensor | None, key: rng.IntLike | None, branch: int) -> Tensor:
    """Per-sample stochastic depth; a sample is one window row of the residual stream, as upstream."""
    if rate is None or key is None:
        return x
    keep = 1.0 - rate
    draw = rng.uniform(rng.mix(key, branch), (x.shape[0],) + (1,) * (x.ndim - 1), device=x.device)
    return x / keep.to(x.dtype) * (keep + draw).floor().to(x.dtype)


@region
def _block(p: Params, x: Tensor, cfg: ModelConfig, full: bool, rate: Tensor | None, key: rng.IntLike | None) -> Tensor:
    """Pre-norm ViT block. Full-attention blocks let all windows of an image attend jointly."""
    n, t, d = x.shape
    y = nn.layer_norm(p["norm1"], x, _EPS)
    if full:
        y = y.reshape(n // cfg.num_windows**2, cfg.num_windows**2 * t, d)
    y = _attention(p["attention"], y, cfg.vit_heads).reshape(n, t, d)
    x = x + _drop_path(y * p["layer_scale1"]["lambda1"], rate, key, 0)
    y = nn.layer_norm(p["norm2"], x, _EPS)
    y = nn.linear(p["mlp"]["fc2"], F.gelu(nn.linear(p["mlp"]["fc1"], y)))
    return x + _drop_path(y * p["layer_scale2"]["lambda1"], rate, key, 1)


def drop_path_rates(drop_path: float, num_layers: int, device: torch.device | None = None) -> Tensor:
    """Per-layer stochastic-depth rates: upstream's float32 linspace(0, drop_path, num_layers)."""
    return torch.linspace(0.0, drop_path, num_layers, dtype=torch.float32, device=device)


def features(
    p: Params,
    images: Tensor,
    cfg: ModelConfig,
    *,
    train: bool = False,
    drop_path: float = 0.0,
    key: rng.IntLike | None = None,
) -> list[Tensor]:
    """ViT feature maps, one (B, D, H/p, W/p) per `cfg.out_feature_indexes` stage.

    Stage k is the hidden state after block k-1 through the shared final LayerNorm, prefix tokens
    dropped and windows stitched back. Blocks after the last requested stage are skipped (their
    output is never read). Drop path (train and drop_path > 0) draws from `key` (see `rfdetr_fn.rng`).
    With cfg.gradient_checkpointing (train only), each block's activations are recomputed in the
    backward pass instead of kept (upstream checkpoints the same blocks); the numbers are identical.
    """
    if images.ndim != 4 or images.shape[1] != cfg.num_channels:
        raise ValueError(f"images must be (B, {cfg.num_channels}, H, W), got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if height % cfg.block_size or width % cfg.block_size:
        raise ValueError(f"image size {height}x{width} must be divisible by patch_size*num_windows = {cfg.block_size}")
    grid = (height // cfg.patch_size, width // cfg.patch_size)
    enc = p["encoder"]
    rates = drop_path_rates(drop_path, cfg.vit_num_layers, images.device) if train and drop_path > 0 else None
    if rates is not None and key is None:
        raise ValueError("drop path needs a random key: pass key=rng.mix(seed, step) (the train step does)")
    full = set(cfg.full_attention_blocks)
    x = _embed(enc["embeddings"], images, cfg)
    hidden = [x]
    for i in range(cfg.out_feature_indexes[-1]):
        rate, layer_key = (None, None) if rates is None else (rates[i], rng.mix(key, i))
        layer = enc["encoder"]["layer"][str(i)]
        if train and cfg.gradient_checkpointing:  # keep only block inputs; the keyed draws replay exactly
            x = nn.checkpoint_for_call()(_block, layer, x, cfg, i in full, rate, layer_key, use_reentrant=False)
        else:
            x = _block(layer, x, cfg, i in full, rate, layer_key)
        hidden.append(x)
    prefix = 1 + cfg.num_registers
    maps = []
    for stage in cfg.out_feature_indexes:
        tokens = nn.layer_norm(enc["layernorm"], hidden[stage], _EPS)[:, prefix:]
        maps.append(window_unpartition(tokens, cfg.num_windows, grid).permute(0, 3, 1, 2).contiguous())
    return maps
