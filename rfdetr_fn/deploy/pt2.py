"""pt2: `torch.export` of the eval forward compiled ahead of time by AOTInductor into one package.

The package holds the weights and the compiled C++ (or CUDA) code; `torch._inductor.aoti_load_package` runs it
with torch alone, without rfdetr_fn's model code. It is built for the device the parameters are on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from rfdetr_fn.deploy.graph import ExportError, Forward, dynamic_shapes, reference_kernels


def write(module: Forward, example: Tensor, path: Path, *, batch: int | None, meta: dict) -> None:
    """torch.export `module` (dynamic batch axis unless `batch`) and AOT-compile it into `path` (.pt2)."""
    with reference_kernels(), torch.no_grad():
        program = torch.export.export(module.eval(), (example,), dynamic_shapes=dynamic_shapes(batch))
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(path), inductor_configs={"aot_inductor.metadata": dict(meta)}
        )


class Pt2Runner:
    """A .pt2 AOTInductor package: `runner(images)` -> the named outputs as float32 tensors."""

    def __init__(self, path: str | Path):
        try:
            self.model = torch._inductor.aoti_load_package(str(path))
        except Exception as err:  # a zip that is not an AOTInductor package, or built for another device
            raise ExportError(f"{path}: not a loadable AOTInductor package ({str(err).splitlines()[0]})") from None
        self.metadata: dict[str, str] = dict(self.model.get_metadata())
        self.names: list[str] = json.loads(self.metadata.get("outputs", "[]"))
        self.device = torch.device(self.metadata.get("AOTI_DEVICE_KEY", "cpu"))

    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        outputs = self.model(images.to(self.device, torch.float32).contiguous())
        return {name: out.float() for name, out in zip(self.names, outputs)}
