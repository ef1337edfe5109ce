"""Weights in and out (upstream .pth/.ckpt, our safetensors) and atomic train-state checkpoints (DCP).

Weights are flat dicts whose keys are upstream rfdetr's state-dict keys, so a file written here loads
in upstream and the other way round. Loading can adapt a checkpoint to a different config the way
upstream's fine-tuning loader does: position-table interpolation, class-head tiling/truncation and
per-group query slicing. Every write is atomic: a crash mid-save leaves the previous file intact.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import pathlib
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from rfdetr_fn import presets, tree
from rfdetr_fn.config import UPSTREAM_NAMES, ModelConfig
from rfdetr_fn.tree import Params

KP_MASK = "_kp_active_mask"  # upstream's schema buffer (classes x max keypoints): dropped on load, rebuilt on save
KP_CLASS_MASK = "transformer.decoder.keypoint_class_mask"  # the other schema-derived buffer (keypoint models)
CONFIG_META = "rfdetr_fn_config"
NAMES_META = "class_names"
UPSTREAM_FORMAT_VERSION = "1.11.2"  # the upstream release whose best-.pth payload we write
STATE_MARKER = "rfdetr_fn_state.json"  # written last: a state directory without it is incomplete

PE_SUFFIX = "embeddings.position_embeddings"
PATCH_KEY = "backbone.0.encoder.encoder.embeddings.patch_embeddings.projection.weight"
_ENC = "backbone.0.encoder.encoder."
_QUERY_KEYS = ("refpoint_embed.weight", "query_feat.weight")
_LIGHTNING_PREFIXES = ("model.", "_orig_mod.")
# Upstream ModelConfig fields we share (same names); written into upstream-layout `model_config`/`args`.
_UPSTREAM_FIELDS = (
    "encoder", "out_feature_indexes", "dec_layers", "two_stage", "projector_scale", "hidden_dim",
    "patch_size", "num_windows", "sa_nheads", "ca_nheads", "dec_n_points", "num_queries", "num_select",
    "bbox_reparam", "lite_refpoint_refine", "layer_norm", "num_channels", "num_classes", "resolution",
    "group_detr", "positional_encoding_size", "segmentation_head", "mask_downsample_ratio",
    "use_grouppose_keypoints", "dual_projector", "dual_projector_kp_only", "num_keypoints_per_class",
    "keypoint_cross_attn", "inter_instance_kp_attn", "grouppose_keypoint_dim_downscale", "postprocess_trace_alpha",
)  # fmt: skip
# Classes a weights-only unpickler may rebuild: upstream legacy files pickle `args` as a Namespace and
# sometimes hold paths. Both only set attributes/strings; nothing executes.
_SAFE_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath]


class CheckpointError(ValueError):
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


def infer_config(raw: RawCheckpoint) -> ModelConfig:
    """The ModelConfig a checkpoint was trained with: our metadata, else upstream fields + tensor shapes.

    Tensor shapes win over recorded fields (they are what gets loaded); fields the tensors cannot
    determine (windows, attention heads, resolution) come from `args`/`model_config`, else the preset.
    """
    if raw.config is not None:
        return raw.config
    shaped = _fields_from_shapes(raw.state_dict)
    fields = {**raw.fields, **shaped}
    name = _preset_name(raw.model_name, fields, raw.path)
    base = presets.get(name) if name in presets.NAMES else ModelConfig(name=name)
    stages = shaped.get("out_feature_indexes")
    recorded = raw.fields.get("out_feature_indexes", base.out_feature_indexes)
    layers = fields.get("vit_num_layers", base.vit_num_layers)
    if stages is not None and len(recorded) == len(stages) and max(recorded) <= layers:
        fields["out_feature_indexes"] = tuple(recorded)  # the count matches: trust the record
    attw = raw.state_dict.get("transformer.decoder.layers.0.cross_attn.attention_weights.weight")
    if attw is not None and "ca_nheads" not in raw.fields:
        # rows = heads * levels * points; the points per head come from the record or the preset
        per_head = len(fields.get("projector_scale", base.projector_scale)) * fields.get(
            "dec_n_points", base.dec_n_points
        )
        if attw.shape[0] % per_head == 0:
            fields["ca_nheads"] = attw.shape[0] // per_head
    if fields.get("dual_projector") and "dual_projector_kp_only" not in raw.fields:
        fields["dual_projector_kp_only"] = fields.get("use_grouppose_keypoints", False)  # the preview's setting
    if "num_select" not in raw.fields and "num_queries" in fields:
        fields["num_select"] = min(base.num_select, fields["num_queries"])
    fields = _fit_unknowns(base, fields, resolution_known="resolution" in raw.fields)
    values = {**config_to_dict(base), **fields, "name": name}
    if values.get("positional_encoding_size") == values["resolution"] // values["patch_size"]:
        values["positional_encoding_size"] = None  # follows the resolution, like upstream's derived PE
    return config_from_dict(values, raw.path)


def _fields_from_shapes(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """Every architecture field that the tensors themselves determine."""
    out: dict[str, Any] = {}
    if PATCH_KEY in sd:
        width, channels, patch, _ = sd[PATCH_KEY].shape
        out.update(patch_size=patch, num_channels=channels)
        layers = _count(sd, _ENC + "encoder.layer.")
        out["vit_num_layers"] = layers
        family = "base" if width == 768 else "small"
        registers = "registers_" if _ENC + "embeddings.register_tokens" in sd else ""
        out["encoder"] = f"dinov2_{registers}windowed_{family}"
        fc1 = sd.get(_ENC + "encoder.layer.0.mlp.fc1.weight")
        if fc1 is not None:
            out["vit_mlp_ratio"] = fc1.shape[0] // width
        default_width, default_heads = (768, 12) if family == "base" else (384, 6)
        if width != default_width:
            heads = max(1, width // 64) if width % 64 == 0 else 1
            warnings.warn(
                f"ViT width {width} is not a stock DINOv2 width; its head count cannot be read from the "
                f"tensors, so vit_num_heads={heads} is assumed (pass a ModelConfig to be sure)",
                stacklevel=4,
            )
            out.update(vit_hidden_size=width, vit_num_heads=heads)
        pe = next((v for k, v in sd.items() if k.endswith(PE_SUFFIX)), None)
        if pe is not None:
            out["positional_encoding_size"] = math.isqrt(pe.shape[1] - 1)
        levels = _projector_levels(sd, width)
        if levels:
            out["projector_scale"], stages = levels
            out["out_feature_indexes"] = tuple(round(layers * (i + 1) / stages) for i in range(stages))
    if "class_embed.weight" in sd:
        out["num_classes"] = sd["class_embed.weight"].shape[0] - 1
        out["hidden_dim"] = sd["class_embed.weight"].shape[1]
    dec = _count(sd, "transformer.decoder.layers.")
    if dec:
        out["dec_layers"] = dec
        lin = sd.get("transformer.decoder.layers.0.linear1.weight")
        if lin is not None:
            out["dim_feedforward"] = lin.shape[0]
    groups = _count(sd, "transformer.enc_out_class_embed.")
    out["two_stage"] = groups > 0
    if "query_feat.weight" in sd and groups:
        out["group_detr"] = groups
        out["num_queries"] = sd["query_feat.weight"].shape[0] // groups
    out["segmentation_head"] = any(k.startswith("segmentation_head.") for k in sd)
    out["dual_projector"] = any(k.startswith("backbone.0.cross_attn_projector.") for k in sd)
    out["use_grouppose_keypoints"] = "keypoint_embed.layers.0.weight" in sd
    if out["use_grouppose_keypoints"]:
        out["keypoint_cross_attn"] = any(".kp_cross_attn." in k for k in sd)
    return out


def _count(sd: Mapping[str, Tensor], prefix: str) -> int:
    """Number of numbered children under `prefix` (e.g. decoder layers)."""
    idx = {int(k[len(prefix) :].split(".", 1)[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def _projector_levels(sd: Mapping[str, Tensor], width: int) -> tuple[tuple[str, ...], int] | None:
    """(projector_scale, number of ViT stages) from the projector's sampling layers and input width."""
    pre = "backbone.0.projector."
    n = _count(sd, pre + "stages.")
    if not n:
        return None
    levels, stages = [], 0
    for i in range(n):
        samp = [k for k in sd if k.startswith(f"{pre}stages_sampling.{i}.")]
        level = "P4" if not samp else ("P5" if any(".conv." in k for k in samp) else "P3")
        levels.append(level)
        cv1 = sd.get(f"{pre}stages.{i}.0.cv1.conv.weight")
        if cv1 is not None and level != "P3":
            stages = cv1.shape[1] // width
        elif cv1 is not None and not stages:
            stages = cv1.shape[1] // max(1, width // 2)
    return tuple(sorted(levels)), max(1, stages)


def _preset_name(model_name: str | None, fields: Mapping[str, Any], path: Path) -> str:
    """Our preset for upstream's class name; without one, the preset closest to the fields."""
    if model_name:
        by_upstream = {v: k for k, v in UPSTREAM_NAMES.items()}
        if model_name in by_upstream:
            return by_upstream[model_name]
        warnings.warn(f"{path}: unknown upstream model_name {model_name!r}; picking the closest preset", stacklevel=4)
    keys = ("patch_size", "encoder", "hidden_dim", "dec_layers", "resolution", "num_windows", "num_queries")

    def score(name: str) -> int:
        cfg = presets.get(name)
        same = sum(fields.get(k) == getattr(cfg, k) for k in keys)
        same += fields.get("positional_encoding_size") == cfg.pe_size
        same += 10 * (fields.get("use_grouppose_keypoints", False) == cfg.keypoints)
        return same + 10 * (fields.get("segmentation_head", False) == cfg.segmentation_head)

    return max(presets.NAMES, key=score)


def _fit_unknowns(base: ModelConfig, fields: dict[str, Any], *, resolution_known: bool) -> dict[str, Any]:
    """Choose the fields the tensors cannot fix (heads, windows, resolution) so the config is valid."""
    fields = dict(fields)
    d = fields.get("hidden_dim", base.hidden_dim)
    for heads in ("sa_nheads", "ca_nheads"):
        h = fields.get(heads, getattr(base, heads))
        fields[heads] = max(c for c in range(1, h + 1) if d % c == 0)
    patch = fields.get("patch_size", base.patch_size)
    pe = fields.get("positional_encoding_size") or base.pe_size
    if not resolution_known:
        same = patch == base.patch_size and pe == base.pe_size
        fields["resolution"] = base.resolution if same else pe * patch
    res = fields.get("resolution", base.resolution)
    windows = fields.get("num_windows", base.num_windows)
    if res % (patch * windows):
        windows = next(w for w in (windows, 2, 1) if res % (patch * w) == 0 or w == 1)
        fields["num_windows"] = windows
        if res % (patch * windows):
            block = patch * windows
            fields["resolution"] = -(-res // block) * block
    return fields


# ---------------------------------------------------------------- adapting a checkpoint to a config


def resize_rows(t: Tensor, rows: int) -> Tensor:
    """Upstream's class-head resize: tile the existing rows, then truncate (never random re-init)."""
    reps = -(-rows // t.shape[0])
    return t.repeat(reps, *([1] * (t.dim() - 1)))[:rows].clone()


def slice_queries(t: Tensor, src: tuple[int | None, int | None], dst: tuple[int, int]) -> Tensor:
    """Keep the first Q' rows of each of the first G' query groups; a flat slice if the layout is unknown."""
    q_src, g_src = src
    q_dst, g_dst = dst
    rows = t.shape[0]
    if q_src is None and g_src:
        q_src = rows // g_src
    if g_src is None and q_src:
        g_src = rows // q_src
    if q_src and g_src and q_src * g_src == rows and q_dst <= q_src and g_dst <= g_src:
        return t.reshape(g_src, q_src, *t.shape[1:])[:g_dst, :q_dst].reshape(q_dst * g_dst, *t.shape[1:]).clone()
    return t[: q_dst * g_dst].clone()


def adapt(
    sd: Mapping[str, Tensor], cfg: ModelConfig, *, src_queries: tuple[int | None, int | None] = (None, None),
    where: str | os.PathLike = "checkpoint",
) -> dict[str, Tensor]:  # fmt: skip
    """Bring a flat state dict to `cfg`: PE size, class count, query groups; architecture must match."""
    from rfdetr_fn.model.backbone import resize_pos_embed

    _check_architecture(sd, cfg, where)
    out = dict(sd)
    pe = cfg.pe_size
    for key in [k for k in out if k.endswith(PE_SUFFIX)]:
        if out[key].shape[1] != pe * pe + 1:
            out[key] = resize_pos_embed(out[key], (pe, pe))
    heads = [k for k in out if _is_class_head(k)]
    old = {out[k].shape[0] for k in heads}
    if old and old != {cfg.num_logits}:
        warnings.warn(
            f"{where}: class head resized from {max(old) - 1} to {cfg.num_classes} classes "
            f"({max(old)} -> {cfg.num_logits} rows, tiled then truncated like upstream)",
            stacklevel=3,
        )
        for k in heads:
            out[k] = resize_rows(out[k], cfg.num_logits)
    _adapt_keypoints(out, cfg)
    for k in _QUERY_KEYS:
        if k in out and out[k].shape[0] != cfg.num_queries * cfg.group_detr:
            out[k] = slice_queries(out[k], src_queries, (cfg.num_queries, cfg.group_detr))
    # Encoder heads exist once per training group; extra groups are simply not part of this config.
    for k in [k for k in out if k.startswith("transformer.enc_")]:
        parts = k.split(".")
        if len(parts) > 2 and parts[2].isdigit() and int(parts[2]) >= cfg.group_detr:
            del out[k]
    return out


def _adapt_keypoints(sd: dict[str, Tensor], cfg: ModelConfig) -> None:
    """Upstream's keypoint loading rules: a missing dual projector starts as a copy of the projector;
    the per-keypoint rows (position embedding, initializer queries) follow the config's schema."""
    pre, dual = "backbone.0.projector.", "backbone.0.cross_attn_projector."
    if cfg.dual_projector and not any(k.startswith(dual) for k in sd):
        sd.update({dual + k[len(pre) :]: v.clone() for k, v in list(sd.items()) if k.startswith(pre)})
    if not cfg.keypoints:
        return
    total = sum(cfg.num_keypoints_per_class)
    rows = ("decoder.keypoint_pos_embed", "keypoint_query_initializer.queries")
    for key in (f"transformer.{r}" for r in (*rows, "keypoint_query_initializer_enc.queries")):
        if key in sd and sd[key].shape[0] != total:
            sd[key] = resize_rows(sd[key], total)


def _is_class_head(key: str) -> bool:
    return key in ("class_embed.weight", "class_embed.bias") or (
        key.startswith("transformer.enc_out_class_embed.") and key.endswith((".weight", ".bias"))
    )


def _check_architecture(sd: Mapping[str, Tensor], cfg: ModelConfig, where: str | os.PathLike) -> None:
    """Patch size and the segmentation head cannot be adapted (upstream refuses them too)."""
    if PATCH_KEY in sd and sd[PATCH_KEY].shape[-1] != cfg.patch_size:
        raise CheckpointError(
            f"{where}: patch size {sd[PATCH_KEY].shape[-1]} in the checkpoint does not match "
            f"patch_size={cfg.patch_size} of the config; use a config with the checkpoint's patch size"
        )
    has_seg = any(k.startswith("segmentation_head.") for k in sd)
    if has_seg != cfg.segmentation_head:
        raise CheckpointError(
            f"{where}: the checkpoint {'has' if has_seg else 'has no'} segmentation head but the config has "
            f"segmentation_head={cfg.segmentation_head}"
        )


def check_keys(
    sd: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], *, strict: bool = True,
    where: str | os.PathLike = "checkpoint",
) -> None:  # fmt: skip
    """Compare keys and shapes against the model; strict raises listing every difference, else warns."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(
        f"{k}: {tuple(sd[k].shape)} vs {tuple(expected[k])}"
        for k in set(sd) & set(expected)
        if tuple(sd[k].shape) != tuple(expected[k])
    )
    if not (missing or unexpected or wrong):
        return
    lines = [f"{where}: weights do not match the model config"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
        if items:
            shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
            lines.append(f"  {title} ({len(items)}): {shown}")
    if strict or wrong:
        raise CheckpointError("\n".join(lines))
    warnings.warn("\n".join(lines), stacklevel=3)


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]] | None:
    try:
        from rfdetr_fn.model import detector
    except ImportError:
        warnings.warn("rfdetr_fn.model.detector is not available; the key check is skipped", stacklevel=3)
        return None
    shapes = detector.param_shapes(cfg)
    return {k: tuple(v) for k, v in shapes.items() if k != KP_MASK}


# ---------------------------------------------------------------- public: weights


def load_weights(
    path: str | os.PathLike, cfg: ModelConfig | None = None, *, strict: bool = True
) -> tuple[ModelConfig, Params]:
    """Load weights as (config, nested params).

    cfg None: the config is read from the file (ours), upstream's `model_config`/`args`, or the tensor shapes.
    cfg given: the checkpoint is adapted to it (PE, class head, query groups) and checked key by key;
    strict=False only warns about missing/unexpected keys (missing ones are taken from a fresh init).
    """
    raw = read_checkpoint(path)
    if cfg is None:
        cfg = infer_config(raw)
    src = raw.config or raw.fields
    src_q = _get(src, "num_queries"), _get(src, "group_detr")
    flat = adapt(raw.state_dict, cfg, src_queries=src_q, where=raw.path)
    expected = _expected_shapes(cfg)
    if expected is not None:
        check_keys(flat, expected, strict=strict, where=raw.path)
        missing = [k for k in expected if k not in flat]
        if missing:
            from rfdetr_fn.model import detector

            fresh = tree.flatten(detector.init(cfg, 0))
            flat.update({k: fresh[k] for k in missing})
        flat = {k: flat[k] for k in expected}  # model order; unexpected keys dropped
    return cfg, tree.unflatten(flat)


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
    flat = {k: v.detach().cpu().contiguous() for k, v in tree.flatten(params).items()}
    names = list(class_names) if class_names is not None else None
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {CONFIG_META: json.dumps(config_to_dict(cfg))}
        if names is not None:
            meta[NAMES_META] = json.dumps(names)
        meta.update({str(k): json.dumps(_plain(v)) for k, v in (extra or {}).items()})
        atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=meta))
        return
    payload = {
        "model": _with_buffers(flat, cfg),
        "args": _upstream_args(cfg, names),
        "model_name": cfg.model_name,
        "model_config": {**_upstream_fields(cfg), "model_name": cfg.model_name},
        CONFIG_META: config_to_dict(cfg),
        **{str(k): _plain(v) for k, v in (extra or {}).items()},
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def write_upstream_best(
    path: str | os.PathLike, params: Params, cfg: ModelConfig, *, epoch: int, class_names: list[str] | None,
    train_args: dict, source: str | None = None,
) -> None:  # fmt: skip
    """Upstream 1.11.2 best-model `.pth` (checkpoint_best_{regular,ema,total}.pth, last_ema.pth).

    `args` is the train config plus class names; values a weights-only load cannot read become repr().
    `source` ("ema"/"regular") marks checkpoint_best_total.pth.
    """
    flat = {k: v.detach().cpu().contiguous() for k, v in tree.flatten(params).items()}
    model = _with_buffers(flat, cfg)
    names = list(class_names) if class_names is not None else None
    payload: dict[str, Any] = {
        "model": model,
        "state_dict": {f"model.{k}": v for k, v in model.items()},  # shares storage: no extra bytes
        "epoch": int(epoch),
        "optimizer_states": [],
        "lr_schedulers": [],
        "args": {**_plain(dict(train_args)), "class_names": names},
        "model_name": cfg.model_name,
        "model_config": {**_upstream_fields(cfg), "model_name": cfg.model_name},
        "rfdetr_version": UPSTREAM_FORMAT_VERSION,
        CONFIG_META: config_to_dict(cfg),
    }
    if source is not None:
        payload["best_total_source"] = source
    atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


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


# ---------------------------------------------------------------- atomic file writes


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write to a temp file beside `path`, fsync, then os.replace: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows: directories cannot be opened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- train state (torch.distributed.checkpoint)


def _dist() -> tuple[bool, int]:
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    return on, dist.get_rank() if on else 0


def _barrier(on: bool) -> None:
    if on:
        import torch.distributed as dist

        dist.barrier()


def _shared_tag(on: bool) -> int:
    """Rank 0's pid, agreed by every rank, names the temp directory they all write into."""
    tag = [os.getpid()]
    if on:
        import torch.distributed as dist

        dist.broadcast_object_list(tag, src=0)
    return int(tag[0])


def _flat_state(state: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}; "/" and "%" in keys are escaped so any key survives."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise TypeError(f"train state keys must be strings, got {key!r} at {prefix or '<root>'}")
        path = prefix + key.replace("%", "%25").replace("/", "%2F")
        if isinstance(value, Mapping):
            out.update(_flat_state(value, path + "/"))
        else:
            out[path] = value
    return out


def save_state(directory: str | os.PathLike, state: dict, *, keep: str | None = None) -> Path:
    """Save a train state (nested dict of tensors and JSON values) atomically; returns the directory.

    Tensors go through `torch.distributed.checkpoint` (every rank of a process group must call this);
    other leaves (ints, floats, strings, None, lists) go into a JSON marker written last. The new state is
    written to `<directory>.tmp-<pid>` and swapped in only when complete, so a crash keeps the old one.
    `keep`: also keep a copy of the finished checkpoint under this sibling name (hard links; e.g. `last`
    plus a numbered snapshot from one save).
    """
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    on, rank = _dist()
    tmp = directory.with_name(f"{directory.name}.tmp-{_shared_tag(on)}")
    flat = _flat_state(state)
    tensors = {k: v for k, v in flat.items() if isinstance(v, Tensor)}
    values = {k: _json_leaf(k, v) for k, v in flat.items() if not isinstance(v, Tensor)}
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(on)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        dcp.save(tensors, checkpoint_id=tmp, no_dist=not on)
    _barrier(on)
    if rank == 0:
        marker = {"format": 1, "tensors": sorted(tensors), "values": values}
        atomic_write(tmp / STATE_MARKER, lambda p: p.write_text(json.dumps(marker)))
        _swap_in(tmp, directory)
        if keep is not None:
            kept = directory.with_name(keep)
            kept_tmp = kept.with_name(f"{kept.name}.tmp-{os.getpid()}")
            shutil.rmtree(kept_tmp, ignore_errors=True)
            shutil.copytree(directory, kept_tmp, copy_function=_link_or_copy)
            _swap_in(kept_tmp, kept)
    _barrier(on)
    return directory


def _json_leaf(key: str, value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"train state leaf {key!r} is a {type(value).__name__}: store tensors, numbers, strings, None "
            f"or lists of them (bytes as uint8 tensors)"
        ) from err
    return value


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # finished checkpoints are never modified, so sharing inodes is safe
    except OSError:
        shutil.copy2(src, dst)


def _swap_in(new: Path, target: Path) -> None:
    """Put the complete `new` directory at `target`; the old one is removed only after the swap."""
    old = target.with_name(f"{target.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    for stale in [*target.parent.glob(f"{target.name}.old-*"), *target.parent.glob(f"{target.name}.tmp-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by earlier crashed saves


def _complete(directory: Path) -> bool:
    return (directory / STATE_MARKER).is_file() and (directory / ".metadata").is_file()


def _resolve_state_dir(directory: Path) -> Path:
    """`directory` if complete; else a complete copy left by a save interrupted mid-swap."""
    if _complete(directory):
        return directory
    siblings = sorted(directory.parent.glob(f"{directory.name}.tmp-*")) + sorted(
        directory.parent.glob(f"{directory.name}.old-*")
    )
    for candidate in siblings:
        if _complete(candidate):
            warnings.warn(f"{directory}: incomplete; restoring from {candidate.name}", stacklevel=3)
            return candidate
    if directory.exists():
        raise CheckpointError(f"{directory}: not a complete train-state checkpoint (no {STATE_MARKER})")
    raise CheckpointError(f"{directory}: no such train-state checkpoint directory")


def load_state(directory: str | os.PathLike, template: dict) -> dict:
    """Restore a train state saved by `save_state` into the structure (and tensor devices) of `template`.

    Every template leaf must be in the checkpoint; tensors must have the saved shape and dtype. The
    template is not modified: tensors are restored into fresh buffers like the template's.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    path = _resolve_state_dir(Path(directory))
    try:
        marker = json.loads((path / STATE_MARKER).read_text())
        stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except (OSError, ValueError, EOFError) as err:
        raise CheckpointError(f"{path}: unreadable train-state checkpoint: {err}") from err
    values = marker["values"]
    flat = _flat_state(template)
    buffers: dict[str, Tensor] = {}
    problems = []
    for key, leaf in flat.items():
        if key in values:
            continue
        meta = stored.get(key)
        if meta is None or not hasattr(meta, "size"):
            problems.append(f"missing {key}")
            continue
        shape, dtype = tuple(meta.size), meta.properties.dtype
        if isinstance(leaf, Tensor):
            if tuple(leaf.shape) != shape or leaf.dtype != dtype:
                problems.append(f"{key}: saved {shape} {dtype}, template {tuple(leaf.shape)} {leaf.dtype}")
                continue
            buffers[key] = torch.empty_like(leaf)
        else:
            buffers[key] = torch.empty(shape, dtype=dtype)
    if problems:
        raise CheckpointError(f"{path}: train state does not match the template: " + "; ".join(problems[:20]))
    on, _ = _dist()
    if buffers:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(buffers, checkpoint_id=path, no_dist=not on)
    restored = {**{k: values[k] for k in flat if k in values}, **buffers}
    return _rebuild(template, restored)


def _rebuild(template: Mapping[str, Any], flat: Mapping[str, Any], prefix: str = "") -> dict:
    out: dict[str, Any] = {}
    for key, value in template.items():
        path = prefix + key.replace("%", "%25").replace("/", "%2F")
        if isinstance(value, Mapping):
            out[key] = _rebuild(value, flat, path + "/")
        else:
            leaf = flat[path]
            out[key] = tuple(leaf) if isinstance(value, tuple) and isinstance(leaf, list) else leaf
    return out
