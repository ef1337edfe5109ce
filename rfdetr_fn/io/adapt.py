"""Fitting a weights file to a model config: the config it was trained with, and adaptation to another.

`infer_config` reads the architecture from our metadata, upstream's recorded fields or the tensor shapes.
`adapt` brings a state dict to a config the way upstream's fine-tuning loader does: position-table
interpolation, class-head tiling/truncation and per-group query slicing. `rfdetr_fn.io.weights.load_weights`
is read, infer or adapt, then a key-by-key check against the model.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from rfdetr_fn import presets
from rfdetr_fn.config import UPSTREAM_NAMES, ModelConfig
from rfdetr_fn.io.formats import (
    CheckpointError,
    RawCheckpoint,
    config_from_dict,
    config_to_dict,
)

PE_SUFFIX = "embeddings.position_embeddings"
PATCH_KEY = "backbone.0.encoder.encoder.embeddings.patch_embeddings.projection.weight"
_ENC = "backbone.0.encoder.encoder."
_QUERY_KEYS = ("refpoint_embed.weight", "query_feat.weight")


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
    if "transformer.register_tokens" in sd:
        out["num_decoder_registers"] = sd["transformer.register_tokens"].shape[0]
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


def adapt_input_channels(weight: Tensor, channels: int) -> Tensor:
    """A patch-embedding kernel (d, c, p, p) for `channels` input channels, as upstream: one channel takes the
    mean over the original ones; any other count tiles them and scales by c/channels, keeping the response
    to an image of equal channels the same."""
    have = weight.shape[1]
    if channels == have:
        return weight
    if channels == 1:
        return weight.mean(dim=1, keepdim=True)
    tiled = weight.repeat(1, -(-channels // have), 1, 1)[:, :channels]
    return tiled * (have / channels)


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
    """Bring a flat state dict to `cfg`: input channels, PE size, class count, query groups; architecture must
    match."""
    from rfdetr_fn.model.backbone import resize_pos_embed

    _check_architecture(sd, cfg, where)
    out = dict(sd)
    if PATCH_KEY in out and out[PATCH_KEY].shape[1] != cfg.num_channels:
        out[PATCH_KEY] = adapt_input_channels(out[PATCH_KEY], cfg.num_channels)
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
