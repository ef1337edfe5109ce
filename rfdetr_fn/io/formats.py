"""Weights file formats: upstream .pth/.ckpt and our .safetensors, read as they are.

Weights are flat dicts whose keys are upstream rfdetr's state-dict keys, so a file written here loads
in upstream and the other way round. Reading returns the file's tensors and recorded fields as they are
(`RawCheckpoint`); fitting them to a config is `rfdetr_fn.io.adapt`; `rfdetr_fn.io.weights` loads and
saves whole models.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from rfdetr_fn.config import ModelConfig
from rfdetr_fn.errors import UserError

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
            raise CheckpointError(f"{path}: refused to load: {_refusal_reason(text)}") from err
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint (truncated or corrupt?): {_first_line(text)}"
        ) from err


def _refusal_reason(text: str) -> str:
    """torch's weights-only refusal in one whole sentence: which object the pickle would build."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text) or re.search(r"Unsupported operand (\S+)", text)
    needs = f"it needs {found.group(1)}, which" if found else "it needs objects that"
    return (
        f"{needs} a weights-only load does not allow, and unsafe unpickling could run arbitrary code. "
        "Re-save it as plain tensors and dicts."
    )


def _first_line(text: str) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= 300 else line[:297] + "..."


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
