"""ONNX: write the eval forward with torch's dynamo exporter (onnxscript), run files with onnxruntime.

The optional dependencies come from the `[export]` extra; without them the message names it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from rfdetr_fn.deploy.graph import INPUT, ExportError, Forward, dynamic_shapes, reference_kernels

DEFAULT_OPSET = 18  # the dynamo exporter's own opset; 17 is accepted and converted down
EXTRA_HINT = "pip install 'rfdetr_fn[export]' (or: pip install onnx onnxruntime onnxscript)"


def require(*names: str) -> list[ModuleType]:
    """Import the optional ONNX packages, or say which extra installs them."""
    found, missing = [], []
    for name in names:
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"the onnx format needs {', '.join(missing)}, from the [export] extra: {EXTRA_HINT}")
    return found


def write(module: Forward, example: Tensor, path: Path, *, batch: int | None, opset: int, meta: dict) -> None:
    """Trace `module` on `example` and save a self-contained .onnx file (weights inside) with `meta`."""
    require("onnx", "onnxscript")
    if opset < 17:
        raise ExportError(f"--opset {opset}: the exporter needs opset 17 or higher")
    with reference_kernels(), torch.no_grad():
        program = torch.onnx.export(
            module.eval(),
            (example,),
            dynamo=True,
            input_names=[INPUT],
            output_names=module.names,
            dynamic_shapes=dynamic_shapes(batch),
            opset_version=opset,
            verbose=False,
        )
    program.model.metadata_props.update(meta)
    program.save(path, external_data=False)


class OnnxRunner:
    """An .onnx file under onnxruntime: `runner(images)` -> the named outputs as float32 tensors."""

    def __init__(self, path: str | Path, threads: int | None = None):
        (ort,) = require("onnxruntime")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=_providers(ort))
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ExportError(f"{path}: not a loadable ONNX model ({str(err).splitlines()[0]})") from None
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.names = [o.name for o in self.session.get_outputs()]

    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        arrays = self.session.run(None, {INPUT: np.ascontiguousarray(images.detach().cpu().float().numpy())})
        return {name: torch.from_numpy(a) for name, a in zip(self.names, arrays)}


def _providers(ort: ModuleType) -> list[str]:
    """CUDA when this onnxruntime build has it, always CPU as the fallback."""
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
    return [p for p in wanted if p in ort.get_available_providers()]
