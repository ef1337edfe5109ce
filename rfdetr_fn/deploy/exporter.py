"""`rf.export(params, cfg, path)`: write an .onnx or .pt2 file, verify it against `rf.apply`, then move it in.

The file is built and verified under a temp name beside `path` and renamed only when it matches, so a failed
export leaves nothing half-written at `path` (and an older file there untouched).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import torch

from rfdetr_fn import tree
from rfdetr_fn.config import ModelConfig
from rfdetr_fn.deploy import graph, verify
from rfdetr_fn.deploy.graph import ExportError
from rfdetr_fn.io.atomic import fsync_dir, raise_if_disk_full

FORMATS = {".onnx": "onnx", ".pt2": "pt2"}


@attrs.frozen
class ExportReport:
    """What an export wrote and how close it is to `rf.apply` (max |difference| per batch and output)."""

    path: Path
    format: str
    seconds: float
    size_bytes: int
    differences: dict[int, dict[str, float]]
    bound: float

    def summary(self) -> str:
        return (
            f"wrote {self.path} ({self.format}, {self.size_bytes / 1e6:.1f} MB) in {self.seconds:.1f} s; "
            f"max |exported - rf.apply| (bound {self.bound:g}): {verify.describe(self.differences)}"
        )


def resolve_format(path: Path, format: str | None) -> str:
    """The format named, or the one the suffix implies; a suffix that contradicts it is an error."""
    implied = FORMATS.get(path.suffix.lower())
    if format is None:
        if implied is None:
            raise ExportError(f"{path}: name the format (--format onnx|pt2) or use a .onnx / .pt2 suffix")
        return implied
    if format not in FORMATS.values():
        raise ExportError(f"format {format!r}: expected one of {', '.join(FORMATS.values())}")
    if implied is not None and implied != format:
        raise ExportError(f"{path}: a .{implied} name for a {format} export; name it *.{format}")
    return format


def export(
    params: tree.Params,
    cfg: ModelConfig,
    path: str | os.PathLike,
    *,
    format: str | None = None,
    batch_size: int | None = None,
    resolution: int | None = None,
    opset: int | None = None,
    half: bool = False,
    class_names: list[str] | None = None,
    device: str = "cpu",
) -> ExportReport:
    """Export the eval forward to ONNX (`.onnx`) or a torch.export + AOTInductor package (`.pt2`), verified.

    batch_size None = a dynamic batch axis; resolution None = cfg.resolution (square); half = fp16 weights
    and compute inside, float32 input and outputs; device (pt2 only) = where the package runs. The exported
    file is run on a fixed input and compared with `rf.apply`; beyond 1e-4 (fp32) it is an ExportError
    quoting the figures, and nothing is written.
    """
    path = Path(path)
    fmt = resolve_format(path, format)
    if path.is_dir():
        raise ExportError(f"{path} is a directory; --output names the file to write")
    if batch_size is not None and batch_size < 1:
        raise ExportError(f"--batch-size must be >= 1 or dynamic, got {batch_size}")
    if fmt == "onnx" and torch.device(device).type != "cpu":
        raise ExportError(f"--device {device}: ONNX files are traced on the CPU and run anywhere; drop --device")
    if fmt == "onnx":
        from rfdetr_fn.deploy import onnx

        onnx.require("onnx", "onnxscript", "onnxruntime")  # before any work: the message names the extra
    ecfg = graph.export_config(cfg, resolution)
    module = graph.Forward(graph.export_params(params, ecfg, torch.float16 if half else torch.float32), ecfg)
    module.params = tree.to(module.params, device)
    example = graph.example_input(ecfg, graph.trace_batch(batch_size)).to(device)
    meta = graph.metadata(ecfg, class_names, half=half, batch=batch_size)
    reference = graph.cpu_copy(params)  # as given: rf.apply resizes the table itself
    batches = [1, 2] if batch_size is None else [batch_size]
    start = time.perf_counter()
    figures: dict[int, dict[str, float]] = {}

    def build(tmp: Path) -> None:
        if fmt == "onnx":
            from rfdetr_fn.deploy import onnx

            onnx.write(module, example, tmp, batch=batch_size, opset=opset or onnx.DEFAULT_OPSET, meta=meta)
            runner = onnx.OnnxRunner(tmp)
        else:
            from rfdetr_fn.deploy import pt2

            pt2.write(module, example, tmp, batch=batch_size, meta=meta)
            runner = pt2.Pt2Runner(tmp)
        figures.update(verify.verify(runner, reference, ecfg, batches, half=half, where=str(path)))

    write_atomically(path, build)
    seconds = time.perf_counter() - start
    bound = verify.HALF_TOLERANCE if half else verify.TOLERANCE
    return ExportReport(path, fmt, seconds, path.stat().st_size, figures, bound)


def write_atomically(path: Path, build: Callable[[Path], None]) -> None:
    """`build(tmp)` writes a file named like `path` in a private temp folder beside it; renamed into place only
    when build returns, the temp folder removed whatever happens."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tmp = folder / path.name
        build(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        raise_if_disk_full(err, path)
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    fsync_dir(path.parent)
