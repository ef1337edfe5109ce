"""Exported files as models: `load("model.onnx" | "model.pt2")` and `predict` on them.

The file's metadata carries the config (resolution, heads, keypoint schema), the class names and the
normalisation, so predicting needs no checkpoint: the same preprocessing, postprocess and records as the
checkpoint path (`rfdetr_fn.eval.inference`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from rfdetr_fn.config import ModelConfig
from rfdetr_fn.deploy.graph import OUTPUTS, ExportError
from rfdetr_fn.eval import inference
from rfdetr_fn.io.formats import CONFIG_META, NAMES_META, config_from_dict

SUFFIXES = (".onnx", ".pt2")


def is_exported(path: Any) -> bool:
    """Whether `path` names an exported file (by its suffix), as opposed to weights or a run directory."""
    return isinstance(path, str | os.PathLike) and Path(path).suffix.lower() in SUFFIXES


@attrs.frozen
class Exported:
    """A loaded .onnx/.pt2 file: call it on a normalised (B, 3, H, W) batch to get apply's output keys."""

    path: Path
    format: str
    cfg: ModelConfig
    class_names: list[str] | None
    batch: int | None  # None = dynamic batch axis
    run: Callable[[Tensor], dict[str, Tensor]]

    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        step = images.shape[0] if self.batch is None else self.batch
        parts = []
        for start in range(0, images.shape[0], step):  # a static graph takes exactly its batch: pad the last
            chunk = images[start : start + step]
            pad = chunk.new_zeros(step - chunk.shape[0], *chunk.shape[1:])
            parts.append({k: v[: chunk.shape[0]] for k, v in self.run(torch.cat([chunk, pad])).items()})
        return {OUTPUTS[name]: torch.cat([p[name] for p in parts]) for name in parts[0]}


def load(path: str | os.PathLike) -> Exported:
    """An exported file, with its config and class names from the file's metadata."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model {path} not found")
    if path.suffix.lower() == ".onnx":
        from rfdetr_fn.deploy.onnx import OnnxRunner

        runner: Any = OnnxRunner(path)
    elif path.suffix.lower() == ".pt2":
        from rfdetr_fn.deploy.pt2 import Pt2Runner

        runner = Pt2Runner(path)
    else:
        raise ExportError(f"{path}: not an exported model (expected .onnx or .pt2)")
    meta = runner.metadata
    if CONFIG_META not in meta:
        raise ExportError(f"{path}: no rfdetr_fn metadata (exported by another tool?); export it with rfdetr_fn export")
    cfg = config_from_dict(json.loads(meta[CONFIG_META]), path)
    names = json.loads(meta.get(NAMES_META, "[]")) or None
    batch = None if meta.get("batch", "dynamic") == "dynamic" else int(meta["batch"])
    return Exported(path, path.suffix.lower()[1:], cfg, names, batch, runner)


def predict(
    model: Any,
    cfg: ModelConfig | None = None,
    images: Any = (),
    *,
    threshold: float = 0.5,
    compile: bool = False,
    precision: str = "fp32",
) -> list[dict[str, Tensor]]:
    """`rf.predict`: `model` is a parameter tree (with its cfg), an exported file path or a loaded `Exported`
    (cfg then comes from the file). Returns per image boxes (xyxy, original pixels), scores, labels[, masks]
    [, keypoints] above `threshold`; see `rfdetr_fn.eval.inference.predict` (`compile` and `precision` apply
    to a parameter tree; an exported file runs as it was exported)."""
    if is_exported(model):
        model = load(model)
    if isinstance(model, Exported):
        return inference.detect(model, cfg or model.cfg, images, threshold=threshold)
    if cfg is None:
        raise TypeError("predict(params, cfg, images): cfg is needed with a parameter tree")
    return inference.predict(model, cfg, images, threshold=threshold, compile=compile, precision=precision)
