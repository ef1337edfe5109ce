"""Reading the golden fixtures (upstream rfdetr outputs on fixed weights) into our types."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from rfdetr_fn import tree
from rfdetr_fn.config import ModelConfig


def golden_config(case: Path) -> ModelConfig:
    """ModelConfig of a golden case: upstream's model_config + the ViT overrides + the decoder FFN width."""
    raw = json.loads((case / "config.json").read_text())
    names = {a.name for a in ModelConfig.__attrs_attrs__}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in raw["model_config"].items() if k in names}
    enc = raw["encoder_overrides"]
    return ModelConfig(
        **fields,
        vit_hidden_size=enc["hidden_size"],
        vit_num_layers=enc["num_hidden_layers"],
        vit_num_heads=enc["num_attention_heads"],
        vit_mlp_ratio=enc["mlp_ratio"],
        dim_feedforward=raw["model_defaults_overrides"]["dim_feedforward"],
    )


def golden_params(case: Path, dtype: torch.dtype = torch.float32) -> tree.Params:
    flat = load_file(case / "weights.safetensors")
    flat.pop("_kp_active_mask", None)
    flat.pop("transformer.decoder.keypoint_class_mask", None)
    return tree.unflatten({k: v.to(dtype) for k, v in flat.items()})


def golden_targets(case: Path, pad_to: int = 8) -> dict[str, torch.Tensor]:
    """targets.safetensors ({i}.labels, {i}.boxes[, {i}.keypoints]) in our padded batch format (-1 marks
    padding; keypoint padding is zeros)."""
    flat = load_file(case / "targets.safetensors")
    n = len({k.split(".")[0] for k in flat})
    labels = torch.full((n, pad_to), -1, dtype=torch.int64)
    boxes = torch.zeros(n, pad_to, 4)
    kps = torch.zeros(n, pad_to, *flat["0.keypoints"].shape[1:]) if "0.keypoints" in flat else None
    for i in range(n):
        k = len(flat[f"{i}.labels"])
        labels[i, :k] = flat[f"{i}.labels"]
        boxes[i, :k] = flat[f"{i}.boxes"]
        if kps is not None:
            kps[i, :k] = flat[f"{i}.keypoints"]
    out = {"labels": labels, "boxes": boxes}
    return out if kps is None else {**out, "keypoints": kps}


def reference_shapes(shared: Path, variant: str) -> dict[str, tuple[int, ...]]:
    """Upstream's state dict for `variant` ("nano" or "segnano"), key -> shape in upstream's order,
    from ../shared/reference/reference-rfdetr-<variant>-state-dict.tsv (key, shape, dtype per line)."""
    path = shared / "reference" / f"reference-rfdetr-{variant}-state-dict.tsv"
    rows = (line.split("\t") for line in path.read_text().splitlines() if line.strip())
    return {key: tuple(ast.literal_eval(shape)) for key, shape, _ in rows}
