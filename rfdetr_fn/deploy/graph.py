"""What every export format shares: the eval forward as a traceable module, upstream's input/output names,
the export-resolution parameters, the file metadata and the fixed verification input.

The graph is `rf.apply(params, images, None, cfg, train=False)` on the last decoder layer, as upstream's
`forward_export`: one input `input` (B, 3, H, W) float32 ImageNet-normalised, outputs `dets` (pred_boxes,
cxcywh normalised), `labels` (pred_logits), and `masks` (pred_masks) or `keypoints` (pred_keypoints).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import attrs
import torch
from torch import Tensor

from rfdetr_fn import kernels, tree
from rfdetr_fn.config import ModelConfig
from rfdetr_fn.errors import UserError
from rfdetr_fn.io.formats import CONFIG_META, NAMES_META, config_to_dict
from rfdetr_fn.model import backbone, detector, lora
from rfdetr_fn.tree import Params

INPUT = "input"
# Upstream's output names and the apply() keys behind them.
OUTPUTS = {"dets": "pred_boxes", "labels": "pred_logits", "masks": "pred_masks", "keypoints": "pred_keypoints"}
FORMAT_VERSION = "1"


class ExportError(UserError, ValueError):
    """An export that cannot be made or does not match the model; the message says why and what to do."""


def output_names(cfg: ModelConfig) -> list[str]:
    """dets, labels, then masks for segmentation models or keypoints for keypoint models (upstream's order)."""
    if cfg.segmentation_head:
        return ["dets", "labels", "masks"]
    if cfg.keypoints:
        return ["dets", "labels", "keypoints"]
    return ["dets", "labels"]


def export_config(cfg: ModelConfig, resolution: int | None) -> ModelConfig:
    """cfg at the export resolution (the position table keeps its trained size); a resolution the patch grid
    cannot take is an ExportError naming the constraint."""
    if resolution is None or resolution == cfg.resolution:
        return cfg
    try:
        return attrs.evolve(cfg, resolution=resolution, positional_encoding_size=cfg.pe_size)
    except ValueError as err:  # ConfigError, or the config's own divisibility checks
        raise ExportError(f"--resolution {resolution}: {err}") from None


def export_params(params: Params, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> Params:
    """Detached CPU copy with LoRA adapters merged and the ViT position table resized to the export grid once,
    so the graph holds no bicubic resize (upstream does the same before its trace)."""
    params = cpu_copy(params)
    if cfg.backbone_lora:
        params = lora.merge(params)
    grid = cfg.resolution // cfg.patch_size
    key = "backbone.0.encoder.encoder.embeddings.position_embeddings"
    table = backbone.resize_pos_embed(tree.flatten(params)[key], (grid, grid))
    params = tree.replace(params, {key: table})
    return tree.map_(lambda t: t.to(dtype).contiguous(), params)


def cpu_copy(params: Params) -> Params:
    """Detached float32 CPU copy: where export traces and verification compares."""
    return tree.map_(lambda t: t.detach().to("cpu", torch.float32), params)


class Forward(torch.nn.Module):
    """The eval forward over fixed parameters: `input` -> the outputs named by `output_names`, in float32.

    An fp16 parameter tree (--half) runs in fp16 inside; the input and outputs stay float32 so the file keeps
    upstream's contract."""

    def __init__(self, params: Params, cfg: ModelConfig):
        super().__init__()
        self.params, self.cfg = params, cfg
        self.names = output_names(cfg)

    def forward(self, input: Tensor) -> tuple[Tensor, ...]:  # noqa: A002 (the graph input's name)
        out = detector.apply(self.params, input, None, self.cfg, train=False)
        return tuple(out[OUTPUTS[name]].float() for name in self.names)


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Deformable attention through its pure-PyTorch reference (GridSample in ONNX) for the duration of one
    export, never the Triton op; the previous choice comes back afterwards."""
    with kernels.backend("reference"):  # a contextvars value: this export's, no other caller's
        yield


def metadata(cfg: ModelConfig, class_names: list[str] | None, *, half: bool, batch: int | None) -> dict[str, str]:
    """String key/values stored in the file: enough for `predict` to preprocess, postprocess and name classes."""
    from rfdetr_fn.data.transforms import MEAN, STD  # here, not at import: the data package is 0.2 s

    return {
        "producer": "rfdetr_fn",
        "format_version": FORMAT_VERSION,
        CONFIG_META: json.dumps(config_to_dict(cfg)),
        NAMES_META: json.dumps(list(class_names) if class_names else []),
        "resolution": json.dumps([cfg.resolution, cfg.resolution]),
        "input": json.dumps({"name": INPUT, "layout": "BCHW", "dtype": "float32", "color": "RGB"}),
        "normalisation": json.dumps({"scale": "1/255", "mean": list(MEAN), "std": list(STD)}),
        "outputs": json.dumps(output_names(cfg)),
        "batch": "dynamic" if batch is None else str(batch),
        "precision": "fp16" if half else "fp32",
    }


def example_input(cfg: ModelConfig, batch: int, seed: int = 0) -> Tensor:
    """A fixed, reproducible normalised image batch (the verification input)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.num_channels, cfg.resolution, cfg.resolution, generator=gen)


def trace_batch(batch: int | None) -> int:
    """Batch of the tracing example: 2 for a dynamic axis (torch.export specialises sizes 0 and 1)."""
    return 2 if batch is None else batch


def dynamic_shapes(batch: int | None) -> dict | None:
    """torch.export's spec for the `input` argument: a named batch dimension, or None for a static graph."""
    if batch is not None:
        return None
    return {INPUT: {0: torch.export.Dim("batch", min=1, max=4096)}}
