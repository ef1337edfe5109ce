"""Kernels installed as `rfdetr_fn.kernels`: multi-scale deformable attention (reference and Triton), and
`assign_triton`, the batched linear-assignment solver behind `rfdetr_fn.losses.assignment` on CUDA.

`ms_deform_attn` picks the implementation per call, by device (Triton custom op on CUDA, the PyTorch
reference elsewhere) and by the torch.func transforms active (the gather form under jvp and double
backward); its `backend=` argument, the `backend()` context or the env var RFDETR_FN_MSDA ("auto" |
"reference" | "triton" | "gather") override it.
Triton itself is imported only when a Triton path runs, so the package works without it.
"""

from . import transforms
from .msda_op import (
    backend,
    current_backend,
    ms_deform_attn,
    ms_deform_attn_triton,
    resolve_backend,
)
from .msda_reference import ms_deform_attn_gather, ms_deform_attn_reference

__all__ = [
    "backend",
    "current_backend",
    "transforms",
    "ms_deform_attn",
    "ms_deform_attn_gather",
    "ms_deform_attn_reference",
    "ms_deform_attn_triton",
    "resolve_backend",
]
