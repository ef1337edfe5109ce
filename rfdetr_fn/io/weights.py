"""Whole models in and out of weights files: `load_weights` (read, infer the config or adapt to one, check
key by key) and `save_weights` (upstream's legacy .pth layout, or .safetensors).

Every write is atomic: a crash mid-save leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from rfdetr_fn import tree
from rfdetr_fn.config import ModelConfig
from rfdetr_fn.io.adapt import adapt, check_keys, infer_config
from rfdetr_fn.io.atomic import atomic_write
from rfdetr_fn.io.formats import (
    CONFIG_META,
    KP_CLASS_MASK,
    KP_MASK,
    NAMES_META,
    UPSTREAM_FORMAT_VERSION,
    _upstream_fields,
    config_to_dict,
    read_checkpoint,
)
from rfdetr_fn.model import detector, lora
from rfdetr_fn.tree import Params


def load_weights(
    path: str | os.PathLike, cfg: ModelConfig | None = None, *, strict: bool = True
) -> tuple[ModelConfig, Params]:
    """Load weights as (config, nested params).

    cfg None: the config is read from the file (ours), upstream's `model_config`/`args`, or the tensor shapes.
    cfg given: the checkpoint is adapted to it (PE, class head, query groups) and checked key by key;
    strict=False only warns about missing/unexpected keys (missing ones are taken from a fresh init).
    """
    raw = read_checkpoint(path)
    dense, adapters = lora.from_peft(raw.state_dict)  # a backbone_lora run's file (upstream's or ours)
    raw = attrs.evolve(raw, state_dict=dense)
    if cfg is None:
        cfg = infer_config(raw)
    written = raw.config or ModelConfig()  # the adapters' own rank/alpha/kind: our config, else upstream's 16/16 DoRA
    if adapters and not cfg.backbone_lora:  # as upstream: merge the adapters into a plain encoder
        merged = lora.merge_for(tree.unflatten({**dense, **adapters}), written)
        raw = attrs.evolve(raw, state_dict=tree.flatten(merged))
        adapters = {}
    elif adapters:  # kept: they must be the adapters the config describes (rank, kind) at the file's scaling
        lora.check(tree.unflatten(adapters), cfg)
        if lora.scaling(cfg) != lora.scaling(written):
            raise ValueError(
                f"{raw.path}: adapters were trained at lora_alpha={written.lora_alpha}, lora_rank={written.lora_rank}"
                f" but the config says lora_alpha={cfg.lora_alpha}, lora_rank={cfg.lora_rank}"
            )
    src = raw.config or raw.fields
    src_q = _get(src, "num_queries"), _get(src, "group_detr")
    flat = adapt(raw.state_dict, cfg, src_queries=src_q, where=raw.path)
    expected = _expected_shapes(cfg)
    check_keys(flat, expected, strict=strict, where=raw.path)
    missing = [k for k in expected if k not in flat]
    if missing:
        fresh = tree.flatten(detector.init(cfg, 0))
        flat.update({k: fresh[k] for k in missing})
    flat = {k: flat[k] for k in expected}  # model order; unexpected keys dropped
    return cfg, tree.unflatten({**flat, **adapters})


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = detector.param_shapes(cfg)
    return {k: tuple(v) for k, v in shapes.items() if k != KP_MASK}


def _get(src: ModelConfig | Mapping[str, Any], name: str) -> Any:
    return getattr(src, name) if isinstance(src, ModelConfig) else src.get(name)


def class_names(path: str | os.PathLike) -> list[str] | None:
    """Class names stored in a weights file (upstream `args.class_names` or our metadata), if any."""
    return read_checkpoint(path).class_names


def save_weights(
    path: str | os.PathLike, params: Params, cfg: ModelConfig, *, class_names: list[str] | None = None,
    extra: dict | None = None,
) -> None:  # fmt: skip
    """Write weights atomically: `.safetensors` (ours) or `.pth` (upstream legacy layout, loads upstream)."""
    path = Path(path)
    names = list(class_names) if class_names is not None else None
    extra = {str(k): _plain(v) for k, v in (extra or {}).items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        flat = _cpu_flat(params)
        meta = {CONFIG_META: json.dumps(config_to_dict(cfg)), **_adapter_meta(params, cfg, json.dumps)}
        if names is not None:
            meta[NAMES_META] = json.dumps(names)
        meta.update({k: json.dumps(v) for k, v in extra.items()})
        atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=meta))
        return
    payload = _pth_payload(params, cfg, args=_upstream_args(cfg, names), extra=extra)
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def write_upstream_best(
    path: str | os.PathLike, params: Params, cfg: ModelConfig, *, epoch: int, class_names: list[str] | None,
    train_args: dict, source: str | None = None,
) -> None:  # fmt: skip
    """Upstream 1.11.2 best-model `.pth` (checkpoint_best_{regular,ema,total}.pth, last_ema.pth).

    `args` is the train config plus class names; values a weights-only load cannot read become repr().
    `source` ("ema"/"regular") marks checkpoint_best_total.pth.
    """
    names = list(class_names) if class_names is not None else None
    extra: dict[str, Any] = {
        "epoch": int(epoch),
        "optimizer_states": [],
        "lr_schedulers": [],
        "rfdetr_version": UPSTREAM_FORMAT_VERSION,
    }
    if source is not None:
        extra["best_total_source"] = source
    args = {**_plain(dict(train_args)), "class_names": names}
    payload = _pth_payload(params, cfg, args=args, extra=extra, lightning=True)
    atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


def _pth_payload(
    params: Params, cfg: ModelConfig, *, args: dict[str, Any], extra: dict[str, Any], lightning: bool = False
) -> dict[str, Any]:
    """The one `.pth` layout both writers use: upstream's `model`/`args`/`model_config`, our exact config,
    and with `lightning` the `state_dict` view Lightning checkpoints carry (sharing storage: no extra bytes)."""
    model = _with_buffers(_cpu_flat(params), cfg)
    payload = {
        "model": model,
        "args": args,
        "model_name": cfg.model_name,
        "model_config": {**_upstream_fields(cfg), "model_name": cfg.model_name},
        CONFIG_META: config_to_dict(cfg),
        **_adapter_meta(params, cfg),
        **extra,
    }
    if lightning:
        payload["state_dict"] = {f"model.{k}": v for k, v in model.items()}
    return payload


def _adapter_meta(params: Params, cfg: ModelConfig, encode=lambda v: v) -> dict[str, Any]:
    """PEFT's adapter config (rank, alpha, DoRA) beside adapter weights, so the file says what they mean."""
    if not any(lora.is_adapter(k) for k in tree.flatten(params)):
        return {}
    return {"adapter_config": encode(lora.adapter_config(cfg))}


def _cpu_flat(params: Params) -> dict[str, Tensor]:
    """Flat CPU tensors under upstream's keys (DoRA adapters in PEFT's layout, as upstream writes them)."""
    return lora.to_peft({k: v.detach().cpu().contiguous() for k, v in tree.flatten(params).items()})


def _with_buffers(flat: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Upstream's state dict: the schema buffers where upstream keeps them (the mask first, the class
    mask after the keypoint position embedding)."""
    from rfdetr_fn.model import keypoints

    active, blocked = keypoints.buffers(cfg)
    out = {KP_MASK: active}
    for key, value in flat.items():
        out[key] = value
        if key == "transformer.decoder.keypoint_pos_embed":
            out[KP_CLASS_MASK] = blocked
    return out


def _upstream_args(cfg: ModelConfig, names: list[str] | None) -> dict[str, Any]:
    """Legacy `args`: upstream's argument names for the architecture, plus class names."""
    return {
        **_upstream_fields(cfg),
        "dim_feedforward": cfg.dim_feedforward,
        "class_names": names,
        "pretrain_weights": None,
    }


def _plain(value: Any) -> Any:
    """Only what `torch.load(weights_only=True)` and JSON accept; anything else becomes its repr()."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def resolve_checkpoint(path: str) -> Path:
    """A weights file, or a training output directory (its best_total, else last_ema)."""
    p = Path(path)
    if p.is_dir():
        for name in ("checkpoint_best_total.pth", "last_ema.pth", "checkpoint_best_ema.pth"):
            if (p / name).exists():
                return p / name
        raise FileNotFoundError(f"{p} holds no checkpoint_best_total.pth, last_ema.pth or checkpoint_best_ema.pth")
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    return p
