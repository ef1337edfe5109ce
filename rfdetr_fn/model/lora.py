"""LoRA and DoRA as tree transforms, with upstream's (PEFT's) checkpoint layout.

`lora(params, rank, alpha, where, dora=True)` returns `(adapters, frozen, merge)`: a tree of new
trainable leaves, the untouched base tree, and `merge(adapters, frozen) -> dense params` that the pure
`apply` runs on. Adapters live beside the weight they adapt, under PEFT's names, so a combined tree is
one pytree the train state, EMA and DCP checkpoints handle like any other:

    <module>.lora_A.default.weight                (rank, in)   kaiming-uniform(a=sqrt 5), PEFT's init
    <module>.lora_B.default.weight                (out, rank)  zeros: the adapted model starts equal
    <module>.lora_magnitude_vector.default.weight (out,)       DoRA only: row norms of the base weight

Merged weight: LoRA W + s*B@A; DoRA m * (W + s*B@A) / ||W + s*B@A||_row with the norm detached (DoRA
paper section 4.3, as PEFT does), s = alpha / rank. The gradients equal PEFT's unmerged forward.

The scaling is not in the tree: it lives in the model config (`ModelConfig.lora_rank`, `lora_alpha`,
`lora_dora`), which `rf.apply`, the train step, `merge_for`, and weight save/load all read, so an adapter
of rank 4 and alpha 8 means the same model everywhere; `check` refuses adapters of another rank.

Upstream's `backbone_lora` (rfdetr 1.11.2 `apply_lora`): DoRA r=16, alpha=16 on the encoder modules
named q_proj/k_proj/v_proj/qkv/query/key/value/cls_token/register_tokens. PEFT matches module names
only, so in the DINOv2 encoder that is exactly the attention's query, key and value linears (the
tokens are parameters, not modules, and stay frozen). Upstream writes the wrapped encoder as
`backbone.0.encoder.base_model.model.<key>` with adapted linears' own tensors under `base_layer.`;
`to_peft`/`from_peft` convert both ways.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from rfdetr_fn import tree

ENCODER = "backbone.0.encoder."
PEFT_PREFIX = "backbone.0.encoder.base_model.model."
UPSTREAM_TARGETS = re.compile(r"^backbone\.0\.encoder\..*\.(query|key|value)\.weight$")
UPSTREAM_RANK = UPSTREAM_ALPHA = 16
ADAPTER_PARTS = ("lora_A", "lora_B", "lora_magnitude_vector")

Merge = Callable[[tree.Params, tree.Params], tree.Params]


def lora(
    params: tree.Params,
    rank: int = UPSTREAM_RANK,
    alpha: float = UPSTREAM_ALPHA,
    where: tree.Where = UPSTREAM_TARGETS,
    *,
    dora: bool = True,
    seed: int = 0,
) -> tuple[tree.Params, tree.Params, Merge]:
    """(adapters, frozen, merge) for every 2-D `.weight` leaf `where` selects.

    `merge(adapters, frozen)` gives dense params for `apply`; train `adapters` only (pass them first to
    grad). `combine(adapters, frozen)` is the single tree a train state stores.
    """
    if rank <= 0:
        raise ValueError(f"LoRA rank={rank} must be positive")
    keys = [k for k in tree.select(params, where) if k.endswith(".weight")]
    if not keys:
        raise ValueError("lora: `where` selects no `.weight` leaf")
    gen = torch.Generator().manual_seed(seed)
    flat = tree.flatten(params)
    adapters: dict[str, Tensor] = {}
    for key in keys:
        weight = flat[key]
        if weight.ndim != 2:
            raise ValueError(f"lora: {key} has shape {tuple(weight.shape)}; only linear weights are adapted")
        out_dim, in_dim = weight.shape
        module = key[: -len(".weight")]
        a = torch.empty(rank, in_dim, dtype=weight.dtype)
        bound = 1.0 / math.sqrt(in_dim)  # kaiming_uniform_(a=sqrt(5)) on a (rank, in) matrix
        a.uniform_(-bound, bound, generator=gen)
        adapters[f"{module}.lora_A.default.weight"] = a.to(weight.device)
        adapters[f"{module}.lora_B.default.weight"] = torch.zeros(
            out_dim, rank, dtype=weight.dtype, device=weight.device
        )
        if dora:
            adapters[f"{module}.lora_magnitude_vector.default.weight"] = torch.linalg.norm(weight.detach(), dim=1)
    scaling = alpha / rank
    return tree.unflatten(adapters), params, lambda ad, frozen: merge(tree.combine(ad, frozen), scaling)


def is_adapter(key: str) -> bool:
    return any(f".{part}." in key for part in ADAPTER_PARTS)


def merge(params: tree.Params, scaling: float = UPSTREAM_ALPHA / UPSTREAM_RANK) -> tree.Params:
    """Dense params: every adapted `.weight` replaced by its merged weight, adapter leaves dropped."""
    flat = tree.flatten(params)
    out = {k: v for k, v in flat.items() if not is_adapter(k)}
    for key in flat:
        if not key.endswith(".lora_A.default.weight"):
            continue
        module = key[: -len(".lora_A.default.weight")]
        base = flat[f"{module}.weight"]
        delta = flat[f"{module}.lora_B.default.weight"] @ flat[key]
        adapted = base + scaling * delta
        magnitude = flat.get(f"{module}.lora_magnitude_vector.default.weight")
        if magnitude is not None:
            norm = torch.linalg.norm(adapted, dim=1).detach()
            adapted = (magnitude / norm).unsqueeze(1) * adapted
        out[f"{module}.weight"] = adapted
    return tree.unflatten(out)


def scaling(cfg: Any) -> float:
    """alpha / rank of a model config (`ModelConfig.lora_alpha / lora_rank`)."""
    return cfg.lora_alpha / cfg.lora_rank


def add_adapters(params: tree.Params, cfg: Any, seed: int = 0) -> tree.Params:
    """`params` plus fresh adapters of the config's rank and kind on upstream's targets (kept as they are
    when already there)."""
    if any(is_adapter(k) for k in tree.flatten(params)):
        return params
    adapters, frozen, _ = lora(params, cfg.lora_rank, cfg.lora_alpha, seed=seed, dora=cfg.lora_dora)
    return tree.combine(adapters, frozen)


def check(params: tree.Params, cfg: Any) -> None:
    """Refuse adapters the config does not describe: another rank than `cfg.lora_rank`, or DoRA magnitude
    vectors present/absent against `cfg.lora_dora` (the merged model would silently differ)."""
    flat = tree.flatten(params)
    for key, value in flat.items():
        if key.endswith(".lora_A.default.weight") and value.shape[-2] != cfg.lora_rank:
            raise ValueError(
                f"LoRA adapter {key} has rank {value.shape[-2]} but the model config says lora_rank="
                f"{cfg.lora_rank}: set ModelConfig(lora_rank={value.shape[-2]}, lora_alpha=...) to the adapters' own"
            )
    dora = any(k.endswith(".lora_magnitude_vector.default.weight") for k in flat)
    if dora != cfg.lora_dora and any(k.endswith(".lora_A.default.weight") for k in flat):
        kind = "DoRA" if dora else "plain LoRA"
        raise ValueError(f"the adapters are {kind} but the model config says lora_dora={cfg.lora_dora}")


def merge_for(params: tree.Params, cfg: Any) -> tree.Params:
    """`merge` at the config's scaling, after `check`: what `rf.apply` runs on."""
    check(params, cfg)
    return merge(params, scaling(cfg))


def adapter_shapes(
    shapes: Mapping[str, tuple[int, ...]], rank: int = UPSTREAM_RANK, dora: bool = True
) -> dict[str, tuple[int, ...]]:
    """Adapter keys and shapes the adapters on upstream's targets add to a model with these parameter shapes."""
    out: dict[str, tuple[int, ...]] = {}
    for key, (out_dim, in_dim, *_) in ((k, s) for k, s in shapes.items() if UPSTREAM_TARGETS.search(k)):
        module = key[: -len(".weight")]
        out[f"{module}.lora_A.default.weight"] = (rank, in_dim)
        out[f"{module}.lora_B.default.weight"] = (out_dim, rank)
        if dora:
            out[f"{module}.lora_magnitude_vector.default.weight"] = (out_dim,)
    return out


def adapter_config(cfg: Any) -> dict[str, Any]:
    """PEFT's `LoraConfig` fields for upstream's backbone adapters, saved beside the weights."""
    return {
        "peft_type": "LORA",
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "use_dora": cfg.lora_dora,
        "target_modules": [
            "q_proj",
            "k_proj",
            "v_proj",
            "qkv",
            "query",
            "key",
            "value",
            "cls_token",
            "register_tokens",
        ],  # fmt: skip
    }


# ---------------------------------------------------------------- upstream (PEFT) layout


def to_peft(flat: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our flat keys -> upstream's LoRA-run keys (unchanged when the tree has no adapters)."""
    if not any(is_adapter(k) for k in flat):
        return dict(flat)
    adapted = {k[: -len(".lora_A.default.weight")] for k in flat if k.endswith(".lora_A.default.weight")}
    out: dict[str, Tensor] = {}
    for key, value in flat.items():
        if not key.startswith(ENCODER):
            out[key] = value
            continue
        module, _, leaf = key.rpartition(".")
        if module in adapted and leaf in ("weight", "bias"):
            key = f"{module}.base_layer.{leaf}"
        out[PEFT_PREFIX + key[len(ENCODER) :]] = value
    return out


def from_peft(flat: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Upstream LoRA-run keys -> (dense base keys, adapter keys) in our layout; plain files pass through."""
    dense: dict[str, Tensor] = {}
    adapters: dict[str, Tensor] = {}
    for key, value in flat.items():
        if key.startswith(PEFT_PREFIX):
            key = ENCODER + key[len(PEFT_PREFIX) :].replace(".base_layer.", ".")
        (adapters if is_adapter(key) else dense)[key] = value
    return dense, adapters
