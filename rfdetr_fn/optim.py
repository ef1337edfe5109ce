"""Functional AdamW with upstream's parameter groups, and global-norm gradient clipping.

Parameter groups follow rfdetr 1.11.2 (`training/param_groups.py`): layer-wise LR decay and a no-decay list
inside the ViT, a reduced LR for the decoder, the base LR everywhere else; parameters with identical
(lr, weight_decay) are merged into one group in first-appearance order over [other, ViT, decoder].

The update is torch.optim.AdamW (decoupled decay, bias correction, no amsgrad) written with out-of-place
`torch._foreach_*` ops, one set of calls per group. The step count and the LR factor are tensors, so a
compiled train step traces it once and never recompiles as they change.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
import torch
from torch import Tensor

from rfdetr_fn import tree
from rfdetr_fn.config import ModelConfig, TrainConfig

AdamWState = dict[str, Any]
"""{"step": float32 0-dim count of updates done, "exp_avg": tree, "exp_avg_sq": tree}."""
OptState = AdamWState

ENCODER_KEY = "backbone.0.encoder"
DECODER_KEY = "transformer.decoder"
NO_DECAY_KEYS = ("gamma", "pos_embed", "rel_pos", "bias", "norm", "embeddings")


@attrs.frozen
class Group:
    """One optimizer parameter group: its base LR, weight decay and member names (optimizer order)."""

    lr: float
    weight_decay: float
    names: tuple[str, ...]


def _vit_layer_id(name: str, num_layers: int) -> int:
    """0 for embeddings, k+1 for `.layer.k.`, else num_layers + 1 (the final LayerNorm: factor 1)."""
    if "embeddings" in name:
        return 0
    if ".layer." in name:
        return int(name[name.find(".layer.") :].split(".")[2]) + 1
    return num_layers + 1


def param_settings(names: Iterable[str], cfg: ModelConfig, tcfg: TrainConfig) -> dict[str, tuple[float, float]]:
    """name -> (lr, weight_decay) by upstream's rules.

    ViT (`backbone.0.encoder`): lr_encoder * lr_vit_layer_decay^(N + 1 - layer_id) * lr_component_decay^2
    with N = out_feature_indexes[-1] + 1, and no decay for gamma/pos_embed/rel_pos/bias/norm/embeddings.
    Decoder (`transformer.decoder`): lr * lr_component_decay. Everything else: lr. Decay defaults to
    weight_decay, biases and norms outside the ViT included.
    """
    n = cfg.out_feature_indexes[-1] + 1
    out: dict[str, tuple[float, float]] = {}
    for name in names:
        if name in out:
            raise ValueError(f"parameter name {name!r} is listed twice")
        if ENCODER_KEY in name:
            scale = tcfg.lr_vit_layer_decay ** (n + 1 - _vit_layer_id(name, n))
            lr = tcfg.lr_encoder * scale * tcfg.lr_component_decay**2
            no_decay = any(key in name for key in NO_DECAY_KEYS)
            out[name] = (lr, 0.0 if no_decay else tcfg.weight_decay)
        elif DECODER_KEY in name:
            out[name] = (tcfg.lr * tcfg.lr_component_decay, tcfg.weight_decay)
        else:
            out[name] = (tcfg.lr, tcfg.weight_decay)
    return out


def param_groups(names: Iterable[str], cfg: ModelConfig, tcfg: TrainConfig) -> list[Group]:
    """Upstream's merged groups; pass names in upstream's named_parameters() (state-dict) order.

    Names are visited as [other..., ViT..., decoder...]; each new (lr, wd) pair opens a group. The
    concatenation of the groups' names is the optimizer's parameter order (the order of its state).
    """
    names = list(names)
    settings = param_settings(names, cfg, tcfg)
    vit = [n for n in names if ENCODER_KEY in n]
    decoder = [n for n in names if DECODER_KEY in n and ENCODER_KEY not in n]
    picked = set(vit) | set(decoder)
    ordered = [n for n in names if n not in picked] + vit + decoder
    members: dict[tuple[float, float], list[str]] = {}
    for name in ordered:
        members.setdefault(settings[name], []).append(name)
    return [Group(lr=lr, weight_decay=wd, names=tuple(ns)) for (lr, wd), ns in members.items()]


def adamw_init(params: tree.Params) -> AdamWState:
    """Zero moments (fresh tensors, never aliases of params) and a float32 0-dim step count of 0."""
    device = next(tree.leaves(params)).device
    return {
        "step": torch.zeros((), dtype=torch.float32, device=device),
        "exp_avg": tree.map_(torch.zeros_like, params),
        "exp_avg_sq": tree.map_(torch.zeros_like, params),
    }


def _scalar(value: Tensor, like: Tensor) -> Tensor:
    """A 0-dim tensor on `like`'s device and dtype (what torch does with its Python-float scalars)."""
    return value.to(device=like.device, dtype=like.dtype)


def adamw_update(
    params: tree.Params,
    grads: tree.Params,
    opt_state: AdamWState,
    groups: Iterable[Group],
    lr_factor: Tensor | float,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> tuple[tree.Params, AdamWState]:
    """One AdamW step for every group at lr = group.lr * lr_factor; returns new (params, opt_state).

    Parameters whose gradient is None (or that belong to no group) keep their value and moments, as
    torch skips them. The step count is shared by all parameters: torch counts per parameter, which
    only differs for a parameter that first receives a gradient after step 1.
    """
    beta1, beta2 = betas
    flat_p, flat_g = tree.flatten(params), tree.flatten(grads)
    flat_m, flat_v = tree.flatten(opt_state["exp_avg"]), tree.flatten(opt_state["exp_avg_sq"])
    new_p, new_m, new_v = dict(flat_p), dict(flat_m), dict(flat_v)
    step = opt_state["step"] + 1
    step64 = step.to(torch.float64)
    factor = torch.as_tensor(lr_factor, dtype=torch.float64, device=step.device)
    bias1 = 1.0 - beta1**step64
    bias2_sqrt = torch.sqrt(1.0 - beta2**step64)
    for group in groups:
        names = [n for n in group.names if flat_g.get(n) is not None]
        if not names:
            continue
        missing = [n for n in names if n not in flat_p or n not in flat_m]
        if missing:
            raise KeyError(f"param group names not in params/opt_state: {missing[:5]}")
        ps = [flat_p[n] for n in names]
        gs = [flat_g[n] for n in names]
        like = ps[0]
        lr = factor * group.lr
        if group.weight_decay != 0.0:
            ps = torch._foreach_mul(ps, _scalar(1.0 - lr * group.weight_decay, like))
        ms = torch._foreach_lerp([flat_m[n] for n in names], gs, 1.0 - beta1)
        vs = torch._foreach_addcmul(torch._foreach_mul([flat_v[n] for n in names], beta2), gs, gs, value=1.0 - beta2)
        denom = torch._foreach_add(torch._foreach_div(torch._foreach_sqrt(vs), _scalar(bias2_sqrt, like)), eps)
        steps = torch._foreach_mul(torch._foreach_div(ms, denom), _scalar(lr / bias1, like))
        ps = torch._foreach_sub(ps, steps)
        for i, n in enumerate(names):
            new_p[n], new_m[n], new_v[n] = ps[i], ms[i], vs[i]
    state = {"step": step, "exp_avg": tree.unflatten(new_m), "exp_avg_sq": tree.unflatten(new_v)}
    return tree.unflatten(new_p), state


def clip_by_global_norm(grads: tree.Params, max_norm: float) -> tuple[tree.Params, Tensor]:
    """torch.nn.utils.clip_grad_norm_ (L2, out of place): scale by min(1, max_norm / (norm + 1e-6)).

    None leaves pass through. max_norm 0 disables clipping (Lightning's gradient_clip_val=0); the norm is
    still returned for logging.
    """
    if max_norm < 0:
        raise ValueError(f"clip_max_norm={max_norm} must be >= 0")
    flat = tree.flatten(grads)
    names = [n for n, g in flat.items() if g is not None]
    if not names:
        raise ValueError("clip_by_global_norm: every gradient is None")
    gs = [flat[n] for n in names]
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs, 2.0)), 2.0)
    if max_norm == 0:
        return grads, total
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    clipped = torch._foreach_mul(gs, coef)
    out = dict(flat)
    out.update(zip(names, clipped))
    return tree.unflatten(out), total
