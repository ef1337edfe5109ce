"""Deployment: export the eval forward to ONNX or to a torch.export + AOTInductor package, verified against
`rf.apply`, and run exported files (`load`, `predict`). onnx/onnxruntime/onnxscript come from the [export] extra
and are imported only when an ONNX file is written or read."""

from rfdetr_fn.deploy.exporter import ExportReport, export
from rfdetr_fn.deploy.graph import ExportError
from rfdetr_fn.deploy.runtime import Exported, is_exported, load, predict

__all__ = ["ExportError", "ExportReport", "Exported", "export", "is_exported", "load", "predict"]
