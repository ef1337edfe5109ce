"""Reading the golden fixtures (upstream rfdetr outputs on fixed weights) into our types."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from rfdetr_fn import tree
from rfdetr_fn.config import ModelConfig

_FIELDS = (
    "encoder",
    "out_feature_indexes",
    "dec_layers",
    "two_stage",
    "projector_scale",
    "hidden_dim",
    "patch_size",
    "num_windows",
    "sa_nheads",
    "ca_nheads",
    "dec_n_points",
    "num_queries",
    "num_select",
    "bbox_reparam",
    "lite_refpoint_refine",
    "layer_norm",
    "num_channels",
    "num_classes",
    "resolution",
    "group_detr",
    "positional_encoding_size",
    "segmentation_head",
    "mask_downsample_ratio",
)


def golden_model_config(case: Path, dtype_note: str = "") -> ModelConfig:
    """The ModelConfig of a golden case: upstream's model_config plus the shrunk ViT and FFN widths."""
    raw = json.loads((case / "config.json").read_text())
    values = {k: raw["model_config"][k] for k in _FIELDS}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    vit = raw["encoder_overrides"]
    return ModelConfig(
        name=case.name,
        vit_hidden_size=vit["hidden_size"],
        vit_num_layers=vit["num_hidden_layers"],
        vit_num_heads=vit["num_attention_heads"],
        vit_mlp_ratio=vit["mlp_ratio"],
        dim_feedforward=raw["model_defaults_overrides"]["dim_feedforward"],
        **values,
    )


def golden_params(case: Path, dtype: torch.dtype = torch.float32) -> tree.Params:
    flat = load_file(case / "weights.safetensors")
    flat.pop("_kp_active_mask", None)
    return tree.unflatten({k: v.to(dtype) for k, v in flat.items()})


def golden_targets(case: Path, pad_to: int = 8) -> dict[str, torch.Tensor]:
    """targets.safetensors ({i}.labels, {i}.boxes) in our padded batch format (-1 marks padding)."""
    flat = load_file(case / "targets.safetensors")
    n = len({k.split(".")[0] for k in flat})
    labels = torch.full((n, pad_to), -1, dtype=torch.int64)
    boxes = torch.zeros(n, pad_to, 4)
    for i in range(n):
        k = len(flat[f"{i}.labels"])
        labels[i, :k] = flat[f"{i}.labels"]
        boxes[i, :k] = flat[f"{i}.boxes"]
    return {"labels": labels, "boxes": boxes}
