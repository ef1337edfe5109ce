"""Weights files: upstream .pth/.ckpt and our .safetensors, read and written in upstream's key layout.

Weights are flat dicts whose keys are upstream rfdetr's state-dict keys, so a file written here loads
in upstream and the other way round. Reading returns the file's tensors and recorded fields as they are
(`RawCheckpoint`); fitting them to a config is `rfdetr_fn.adapt`. Every write is atomic: a crash
mid-save leaves the previous file intact.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from rfdetr_fn import lora, tree
from rfdetr_fn.atomic import atomic_write
from rfdetr_fn.config import ModelConfig
from rfdetr_fn.errors import UserError
from rfdetr_fn.tree import Params

KP_MASK = "_kp_active_mask"  # upstream's schema buffer (classes x max keypoints): dropped on load, rebuilt on save
KP_CLASS_MASK = "transformer.decoder.keypoint_class_mask"  # the other schema-derived buffer (keypoint models)
CONFIG_META = "rfdetr_fn_config"
NAMES_META = "class_names"
UPSTREAM_FORMAT_VERSION = "1.11.2"  # the upstream release whose best-.pth payload we write

_LIGHTNING_PREFIXES = ("model.", "_orig_mod.")
# Upstream ModelConfig fields we share (same names); written into upstream-layout `model_config`/`args`.
_UPSTREAM_FIELDS = (
    "encoder", "out_feature_indexes", "dec_layers", "two_stage", "projector_scale", "hidden_dim",
    "patch_size", "num_windows", "sa_nheads", "ca_nheads", "dec_n_points", "num_queries", "num_select",
    "bbox_reparam", "lite_refpoint_refine", "layer_norm", "num_channels", "num_classes", "resolution",
    "group_detr", "positional_encoding_size", "segmentation_head", "mask_downsample_ratio", "num_decoder_registers",
    "use_grouppose_keypoints", "dual_projector", "dual_projector_kp_only", "num_keypoints_per_class",
    "keypoint_cross_attn", "inter_instance_kp_attn", "grouppose_keypoint_dim_downscale", "postprocess_trace_alpha",
)  # fmt: skip
# Classes a weights-only unpickler may rebuild: upstream legacy files pickle `args` as a Namespace and
# sometimes hold paths. Both only set attributes/strings; nothing executes.
_SAFE_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath]


class CheckpointError(UserError, ValueError):
    """A file that cannot be used as weights or train state; the message names the file and the reason."""


@attrs.frozen
class RawCheckpoint:
    """What a weights file holds, before any adaptation to a config."""

    path: Path
    state_dict: dict[str, Tensor]
    """Flat upstream keys (prefixes stripped, `_kp_active_mask` dropped)."""
    fields: dict[str, Any]
    """Upstream architecture fields (`args` overlaid by `model_config`), with our field names."""
    config: ModelConfig | None
    """Our exact ModelConfig when the file was written by rfdetr_fn."""
    class_names: list[str] | None
    model_name: str | None


# ---------------------------------------------------------------- reading files


def read_checkpoint(path: str | os.PathLike) -> RawCheckpoint:
    """Read any supported weights file (upstream .pth/.ckpt, our .safetensors) without adapting it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_torch(path)


def _read_safetensors(path: Path) -> RawCheckpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        flat = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    config = config_from_dict(json.loads(meta[CONFIG_META]), path) if CONFIG_META in meta else None
    names = json.loads(meta[NAMES_META]) if NAMES_META in meta else None
    return RawCheckpoint(path, _clean_state_dict(flat, path), _schema_field(flat), config, names, None)


def _read_torch(path: Path) -> RawCheckpoint:
    payload = _torch_load(path)
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"{path}: not a checkpoint (top level is {type(payload).__name__}, not a dict)")
    if "model" in payload and isinstance(payload["model"], Mapping):
        flat = dict(payload["model"])
    elif "state_dict" in payload and isinstance(payload["state_dict"], Mapping):
        flat = dict(payload["state_dict"])  # Lightning .ckpt / converted legacy file
    elif payload and all(isinstance(v, Tensor) for v in payload.values()):
        flat = dict(payload)  # a bare state dict
    else:
        raise CheckpointError(
            f"{path}: not a checkpoint: no 'model' or 'state_dict' entry "
            f"(top-level keys: {sorted(map(str, payload))[:10]})"
        )
    args = _parse_args(payload.get("args", payload.get("hyper_parameters")), path)
    model_config = payload.get("model_config")
    model_config = _parse_args(model_config, path) if model_config is not None else {}
    readable = (*_UPSTREAM_FIELDS, "dim_feedforward")
    fields = {k: v for k, v in {**args, **model_config}.items() if k in readable and v is not None}
    fields.update(_schema_field(flat))
    ours = payload.get(CONFIG_META)
    config = config_from_dict(ours, path) if isinstance(ours, Mapping) else None
    names = args.get("class_names") or model_config.get("class_names")
    model_name = payload.get("model_name") or model_config.get("model_name")
    return RawCheckpoint(
        path, _clean_state_dict(flat, path), fields, config, list(names) if names else None, model_name
    )


def _torch_load(path: Path) -> Any:
    """`torch.load(weights_only=True)`, with clear errors; never falls back to unsafe unpickling."""
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except _load_errors() as err:
        text = str(err)
        if "weights_only" in text or "Unsupported global" in text or "WeightsUnpickler" in text:
            raise CheckpointError(
                f"{path}: refused to load: the pickle needs objects a weights-only load does not allow, "
                f"and unsafe unpickling could run arbitrary code. Re-save it as plain tensors/dicts. "
                f"({text[:300]})"
            ) from err
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {text[:300]}") from err


def _load_errors() -> tuple[type[BaseException], ...]:
    import pickle
    import zipfile

    return (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError)


def _parse_args(args: Any, path: Path) -> dict[str, Any]:
    """Upstream `args`: a dict, an argparse Namespace, or (1.11 when not weights-only-safe) its repr()."""
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(args, Mapping):
        return dict(args)
    if isinstance(args, str):
        return _parse_repr(args, path)
    warnings.warn(f"{path}: ignoring 'args' of type {type(args).__name__}", stacklevel=3)
    return {}


def _parse_repr(text: str, path: Path) -> dict[str, Any]:
    """Read `Namespace(a=1, b='x')` or `{'a': 1}` safely (literals only; anything else is skipped)."""
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        warnings.warn(f"{path}: could not parse the 'args' string; ignoring it", stacklevel=4)
        return {}
    if isinstance(node, ast.Dict):
        pairs = zip(node.keys, node.values)
        named = ((ast.literal_eval(k) if k is not None else None, v) for k, v in pairs)
    elif isinstance(node, ast.Call):
        named = ((kw.arg, kw.value) for kw in node.keywords)
    else:
        return {}
    out: dict[str, Any] = {}
    for key, value in named:
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            continue  # e.g. PosixPath('...'): not an architecture field
    return out


def _strip(key: str) -> str:
    while key.startswith(_LIGHTNING_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _schema_field(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The keypoint schema upstream keeps in `_kp_active_mask` (keypoints per class), when non-empty."""
    mask = next((v for k, v in flat.items() if _strip(k) == KP_MASK), None)
    if not isinstance(mask, Tensor) or mask.ndim != 2 or not mask.numel():
        return {}
    return {"num_keypoints_per_class": tuple(int(n) for n in mask.sum(1).tolist())}


def _clean_state_dict(flat: Mapping[str, Any], path: Path) -> dict[str, Tensor]:
    """Strip Lightning/compile prefixes, drop the schema buffers, upcast half floats to float32."""
    out: dict[str, Tensor] = {}
    for key, value in flat.items():
        key = _strip(key)
        if key in (KP_MASK, KP_CLASS_MASK):
            continue
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if value.dtype in (torch.float16, torch.bfloat16):
            value = value.float()  # lossless; training keeps float32 master weights
        out[key] = value
    if not out:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors")
    return out


# ---------------------------------------------------------------- configs


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """JSON-ready dict of every ModelConfig field (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.asdict(cfg).items()}


def config_from_dict(data: Mapping[str, Any], source: str | os.PathLike = "config") -> ModelConfig:
    """Inverse of `config_to_dict`; unknown fields are an error naming `source`."""
    known = {f.name for f in attrs.fields(ModelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CheckpointError(f"{source}: unknown ModelConfig fields {unknown}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return ModelConfig(**values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: invalid model config: {err}") from err


def _upstream_fields(cfg: ModelConfig) -> dict[str, Any]:
    """Our config in upstream's ModelConfig names (upstream forbids extra fields, so only shared ones)."""
    fields = {name: getattr(cfg, name) for name in _UPSTREAM_FIELDS}
    fields["positional_encoding_size"] = cfg.pe_size
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


# ---------------------------------------------------------------- writing files


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
        meta = {CONFIG_META: json.dumps(config_to_dict(cfg))}
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
        **extra,
    }
    if lightning:
        payload["state_dict"] = {f"model.{k}": v for k, v in model.items()}
    return payload


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
