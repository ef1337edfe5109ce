"""Upstream's optimizer recipe (parameter groups, AdamW, clipping) built from `gradient_transforms`.

Parameter groups follow rfdetr 1.11.2 (`training/param_groups.py`): layer-wise LR decay and a no-decay list
inside the ViT, a reduced LR for the decoder, the base LR everywhere else; parameters with identical
(lr, weight_decay) are merged into one group in first-appearance order over [other, ViT, decoder].

The update is torch.optim.AdamW (decoupled decay, bias correction, no amsgrad) as the chain Adam
scaling -> per-group decay -> per-group LR x schedule, on out-of-place `torch._foreach_*` ops, one set of
calls per group; its scalars stay pending until `apply_updates`, so it rounds as torch does
(p * (1 - lr*wd) first, one step size lr / bias correction) and is bit-equal to the earlier hand-written
update. Its state keeps the layout `{step, exp_avg, exp_avg_sq}` of earlier train states. The step
count and the LR factor are tensors, so a compiled train step never recompiles as they change.
`trainable` picks the leaves that train (freezing, LoRA); `make_optimizer` reads `train.optimizer`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable
from typing import Any

import attrs

from rfdetr_fn import tree
from rfdetr_fn.config import ModelConfig, TrainConfig
from rfdetr_fn.optim import chain as gt

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
    return gt.scale_by_adam().init(params)


def group_values(groups: Iterable[Group]) -> tuple[dict[str, float], dict[str, float]]:
    """Per-leaf trees of each group's (lr, weight_decay), the form the gradient transforms take."""
    groups = list(groups)
    lrs = {n: g.lr for g in groups for n in g.names}
    decays = {n: g.weight_decay for g in groups for n in g.names}
    return tree.unflatten(lrs), tree.unflatten(decays)


def trainable(cfg: ModelConfig, tcfg: TrainConfig) -> tree.Where | None:
    """Which leaves train (None: all). Frozen leaves get no gradient and no optimizer state.

    freeze_encoder: everything but the ViT (upstream sets requires_grad False on `backbone.0.encoder`).
    backbone_lora: the LoRA adapters plus everything outside the ViT (PEFT freezes the wrapped encoder).
    """
    if not (tcfg.freeze_encoder or cfg.backbone_lora):
        return None
    outside = tree.not_(ENCODER_KEY + ".*")  # what a user writes for the same freezing: one trainable set
    if cfg.backbone_lora and not tcfg.freeze_encoder:
        return tree.any_(outside, ENCODER_KEY + ".*.lora_*")
    return outside


def adam_settings(tcfg: TrainConfig) -> tuple[tuple[float, float], float, dict[str, Any]]:
    """(betas, eps, the other `optimizer_kwargs`): `optimizer_kwargs` may override betas and eps."""
    kwargs = json.loads(tcfg.optimizer_kwargs)
    return tuple(kwargs.pop("betas", tcfg.betas)), kwargs.pop("eps", tcfg.eps), kwargs


def make_optimizer(
    cfg: ModelConfig, tcfg: TrainConfig, names: Iterable[str], schedule: gt.Schedule | None = None
) -> gt.GradientTransformation:
    """The optimizer `tcfg.optimizer` names, over upstream's parameter groups (lr, weight decay per group).

    adamw is upstream's recipe; adam and sgd take the same groups (torch's coupled weight decay for
    sgd, as upstream's torch.optim.SGD); `optimizer_kwargs` adds arguments (betas/eps, momentum,
    nesterov). 'package.module:function' calls function(cfg, tcfg, groups, schedule) for any chain.
    """
    groups = param_groups(names, cfg, tcfg)
    kwargs = json.loads(tcfg.optimizer_kwargs)
    name = tcfg.optimizer
    if ":" in name:
        module, _, attr = name.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        return factory(cfg, tcfg, groups, schedule, **kwargs)
    lrs, decays = group_values(groups)
    betas, eps, kwargs = adam_settings(tcfg)
    try:
        if name == "adamw":
            return gt.adamw(lrs, betas[0], betas[1], eps, weight_decay=decays, schedule=schedule, **kwargs)
        if name == "adam":
            return gt.adam(lrs, betas[0], betas[1], eps, schedule=schedule, **kwargs)
        if name == "sgd":
            return gt.sgd(lrs, weight_decay=decays, schedule=schedule, **kwargs)
    except TypeError as err:
        raise ValueError(f"train.optimizer_kwargs={tcfg.optimizer_kwargs} do not fit {name}: {err}") from err
    raise ValueError(f"train.optimizer={name!r}: expected adamw, adam, sgd or 'module:function'")
