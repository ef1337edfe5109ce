"""The export command: `rfdetr_fn export --checkpoint output/ --format onnx --output model.onnx`.

Loads weights (a file or a training run directory, as `predict`), exports them with `rf.export` (verified
against `rf.apply` before the file appears at --output) and prints the figures.
"""

from __future__ import annotations

from typing import Literal

import attrs

from rfdetr_fn.deploy.exporter import ExportReport, export
from rfdetr_fn.deploy.graph import ExportError
from rfdetr_fn.flags import parse
from rfdetr_fn.io import weights


@attrs.frozen(kw_only=True)
class ExportArgs:
    """Export trained weights to ONNX (onnxruntime, TensorRT, OpenVINO...) or to a compiled torch.export package."""

    checkpoint: str = "output"
    """Weights file (.pth, .ckpt or .safetensors) or a training output directory."""
    format: Literal["onnx", "pt2"] | None = None
    """onnx or pt2 (torch.export + AOTInductor); None = from the --output suffix, else onnx."""
    output: str | None = None
    """File to write; None = model.onnx / model.pt2 in the current folder."""
    batch_size: str = "dynamic"
    """Batch size baked into the graph, or dynamic for a dynamic batch axis."""
    resolution: int | None = None
    """Square input side in pixels; None = the checkpoint's resolution. Must divide by patch_size*num_windows."""
    opset: int = 18
    """ONNX opset (17 or higher)."""
    half: bool = False
    """fp16 weights and compute inside the graph (input and outputs stay float32)."""
    device: str = "cpu"
    """pt2 only: build the package for cpu or cuda."""


def _batch(value: str) -> int | None:
    if value.strip().lower() == "dynamic":
        return None
    try:
        return int(value)
    except ValueError:
        raise ExportError(f"--batch-size {value!r}: expected a positive integer or dynamic") from None


def run(args: ExportArgs) -> ExportReport:
    """Load, export, verify; print what was written and how close it is to rf.apply."""
    output = args.output or f"model.{args.format or 'onnx'}"
    batch = _batch(args.batch_size)
    ckpt = weights.resolve_checkpoint(args.checkpoint)
    cfg, params = weights.load_weights(ckpt)
    report = export(
        params,
        cfg,
        output,
        format=args.format,
        batch_size=batch,
        resolution=args.resolution,
        opset=args.opset,
        half=args.half,
        class_names=weights.class_names(ckpt),
        device=args.device,
    )
    print(report.summary())
    return report


def main(argv: list[str] | None = None) -> ExportReport:
    """`rfdetr_fn export --checkpoint FILE_OR_DIR [--format onnx|pt2] [--output PATH] [...]`."""
    return run(parse(ExportArgs, argv))
