"""Kernels installed as `rfdetr_fn.kernels`: multi-scale deformable attention (reference and Triton), and
`assign_triton`, the batched linear-assignment solver behind `rfdetr_fn.losses.assignment` on CUDA.

`ms_deform_attn` picks the implementation by device (Triton custom op on CUDA, the PyTorch reference
elsewhere); `set_backend` or the env var RFDETR_FN_MSDA ("auto" | "reference" | "triton") overrides it.
Triton itself is imported only when a Triton path runs, so the package works without it.
"""

from .msda_op import (
    get_backend,
    ms_deform_attn,
    ms_deform_attn_triton,
    resolve_backend,
    set_backend,
)
from .msda_reference import ms_deform_attn_gather, ms_deform_attn_reference

__all__ = [
    "get_backend",
    "ms_deform_attn",
    "ms_deform_attn_gather",
    "ms_deform_attn_reference",
    "ms_deform_attn_triton",
    "resolve_backend",
    "set_backend",
]
