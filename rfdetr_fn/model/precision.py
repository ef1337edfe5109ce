"""Mixed precision for forward passes: which autocast dtype a run uses, and the forward under it.

Shared by the train step, evaluation and the batch-size probe, so training and evaluation agree on what
"bf16" means and the loss and postprocess always see float32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rfdetr_fn.config import ModelConfig
from rfdetr_fn.model import detector
from rfdetr_fn.tree import Params


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA with compute capability >= 8, fp16 on older CUDA, fp32 elsewhere."""
    if precision != "auto":
        if precision != "fp32" and device.type != "cuda":
            raise ValueError(f"precision={precision!r} needs a CUDA device; this run is on {device.type}")
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"


def forward(
    params: Params, images: Tensor, mask: Tensor | None, cfg: ModelConfig, precision: str, **kwargs: Any
) -> dict:
    """`detector.apply` under the resolved precision's CUDA autocast (bf16/fp16; fp32 runs as is), with the
    outputs back in float32 for the loss and postprocess. Used by the train step and by evaluation."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return detector.apply(params, images, mask, cfg, **kwargs)
    with torch.autocast("cuda", dtype=dtype):
        return _to_float32(detector.apply(params, images, mask, cfg, **kwargs))


def _to_float32(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, dict):
        return {k: _to_float32(v) for k, v in out.items()}
    if isinstance(out, list):
        return [_to_float32(v) for v in out]
    return out
