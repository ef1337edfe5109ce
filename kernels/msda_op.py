"""The Triton kernels as torch custom ops, an autograd.Function over them, and the per-call backend choice.

Why this shape: `torch.library.custom_op` + `register_fake` makes each kernel one opaque node for
torch.compile and torch.export. The gradient goes through a `torch.autograd.Function` with `setup_context`,
not `register_autograd`, whose generated Function lacks it and so fails under `torch.func.grad`. The backward
op is called under `no_grad` because torch.func runs backward with create_graph.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from collections.abc import Iterator

import torch
from torch import Tensor

from . import transforms
from .msda_reference import ms_deform_attn_gather, ms_deform_attn_reference

# Without CUDA, Triton can only run interpreted, and only for functions decorated while TRITON_INTERPRET=1
# (Triton's own helpers included). torch imports triton lazily (e.g. at the first custom-op call): set it now.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

BACKENDS = ("auto", "reference", "triton", "gather")
ENV_VAR = "RFDETR_FN_MSDA"


def _backend_from_env() -> str:
    name = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r}: expected one of {BACKENDS}")
    return name


_DEFAULT = _backend_from_env()
_BACKEND: contextvars.ContextVar[str] = contextvars.ContextVar("rfdetr_fn_msda_backend", default=_DEFAULT)


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"MSDA backend {name!r}: expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force the implementation behind `ms_deform_attn` inside this block (this thread/task only):
    "auto" (Triton on CUDA, reference elsewhere, the gather form under jvp/double backward), "reference",
    "triton" or "gather". The env var RFDETR_FN_MSDA sets the default. The value is read eagerly; a compiled
    call takes `ms_deform_attn(..., backend=)` instead (Dynamo cannot read a context variable)."""
    token = _BACKEND.set(_checked(name))
    try:
        yield
    finally:
        _BACKEND.reset(token)


def current_backend() -> str:
    """The backend setting of the current context (not resolved against a device)."""
    return "auto" if torch.compiler.is_compiling() else _BACKEND.get()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(device: torch.device, name: str | None = None) -> str:
    """The implementation `ms_deform_attn` uses for tensors on `device`: "reference", "triton" or "gather".

    "auto" picks by device and by the torch.func transforms active around the call: under jvp or nested
    grad the gather form (grid_sample and the Triton op have no forward-mode or double-backward rules)."""
    name = _checked(name) if name is not None else current_backend()
    if name != "auto":
        return name
    if transforms.higher_order():
        return "gather"
    return "triton" if device.type == "cuda" and _triton_available() else "reference"


def _check_shapes_sum(value: Tensor, spatial_shapes: Tensor) -> None:
    """Sum of H*W must equal S, else the kernel would read outside value. Checked only when the shapes live
    on the CPU, so a CUDA shapes tensor costs no host sync."""
    if spatial_shapes.device.type == "cpu":
        total = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
        if total != value.shape[1]:
            raise ValueError(f"spatial_shapes: sum of H*W over levels is {total} but value has {value.shape[1]} tokens")


@torch.library.custom_op("rfdetr_fn::msda_forward", mutates_args=())
def msda_forward(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Forward custom op: (N, S, H, D), (L, 2), (N, Q, H, L, P, 2), (N, Q, H, L, P) -> (N, Q, H*D)."""
    from . import msda_triton

    _check_shapes_sum(value, spatial_shapes)
    shapes = spatial_shapes.to(device=value.device, dtype=torch.int64).contiguous()
    return msda_triton.forward(
        value.contiguous(), shapes, sampling_locations.contiguous(), attention_weights.contiguous()
    )


@msda_forward.register_fake
def _msda_forward_fake(value, spatial_shapes, sampling_locations, attention_weights):
    n, _, heads, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], heads * d))


@torch.library.custom_op("rfdetr_fn::msda_backward", mutates_args=())
def msda_backward(
    grad_out: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward custom op: grads of value, sampling_locations and attention_weights."""
    from . import msda_triton

    shapes = spatial_shapes.to(device=value.device, dtype=torch.int64).contiguous()
    return msda_triton.backward(
        grad_out.contiguous(),
        value.contiguous(),
        shapes,
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
    )


@msda_backward.register_fake
def _msda_backward_fake(grad_out, value, spatial_shapes, sampling_locations, attention_weights):
    def like(t: Tensor) -> Tensor:
        return t.new_empty(t.shape)

    return like(value), like(sampling_locations), like(attention_weights)


class MSDeformAttnFunction(torch.autograd.Function):
    """Autograd over the two custom ops; works eagerly, under torch.compile and under torch.func.grad."""

    @staticmethod
    def forward(value, spatial_shapes, sampling_locations, attention_weights):
        return msda_forward(value, spatial_shapes, sampling_locations, attention_weights)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad_out):
        value, spatial_shapes, sampling_locations, attention_weights = ctx.saved_tensors
        with torch.no_grad():
            g_value, g_loc, g_attw = msda_backward(
                grad_out, value, spatial_shapes, sampling_locations, attention_weights
            )
        return g_value, None, g_loc, g_attw

    @staticmethod
    def vmap(info, in_dims, value, spatial_shapes, sampling_locations, attention_weights):
        """torch.func.vmap: fold the vmapped dimension into the batch N (one kernel launch for all members)."""
        if in_dims[1] is not None:
            raise ValueError("ms_deform_attn under vmap: spatial_shapes must be the same for every member")
        size = info.batch_size
        args = [value, sampling_locations, attention_weights]
        dims = [in_dims[0], in_dims[2], in_dims[3]]
        folded = []
        for t, d in zip(args, dims):
            t = t.unsqueeze(0).expand(size, *t.shape) if d is None else t.movedim(d, 0)
            folded.append(t.reshape(size * t.shape[1], *t.shape[2:]).contiguous())
        out = MSDeformAttnFunction.apply(folded[0], spatial_shapes, folded[1], folded[2])
        return out.reshape(size, -1, *out.shape[1:]), 0


def _validate(value: Tensor, spatial_shapes, sampling_locations: Tensor, attention_weights: Tensor) -> None:
    """Shape and dtype checks that need no tensor data (safe inside torch.compile)."""
    if value.dim() != 4:
        raise ValueError(f"value: expected (N, S, H, D), got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations: expected (N, Q, H, L, P, 2), got shape {tuple(sampling_locations.shape)}"
        )
    n, _, heads, _ = value.shape
    if sampling_locations.shape[0] != n or sampling_locations.shape[2] != heads:
        raise ValueError(
            f"sampling_locations: batch/heads ({sampling_locations.shape[0]}, {sampling_locations.shape[2]}) "
            f"do not match value's ({n}, {heads})"
        )
    if tuple(attention_weights.shape) != tuple(sampling_locations.shape[:-1]):
        raise ValueError(
            f"attention_weights: expected shape {tuple(sampling_locations.shape[:-1])}, "
            f"got {tuple(attention_weights.shape)}"
        )
    levels = sampling_locations.shape[3]
    if isinstance(spatial_shapes, Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or spatial_shapes.shape[0] != levels:
            raise ValueError(
                f"spatial_shapes: expected ({levels}, 2) as (H, W), got shape {tuple(spatial_shapes.shape)}"
            )
        if spatial_shapes.is_floating_point():
            raise ValueError(f"spatial_shapes: expected an integer tensor, got {spatial_shapes.dtype}")
    else:
        if len(spatial_shapes) != levels:
            raise ValueError(f"spatial_shapes: expected {levels} (H, W) pairs, got {len(spatial_shapes)}")
        total = sum(int(h) * int(w) for h, w in spatial_shapes)
        if total != value.shape[1]:
            raise ValueError(f"spatial_shapes: sum of H*W over levels is {total} but value has {value.shape[1]} tokens")
    for name, t in (
        ("value", value),
        ("sampling_locations", sampling_locations),
        ("attention_weights", attention_weights),
    ):
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating tensor, got {t.dtype}")


_SHAPES_ON_DEVICE: dict[tuple[tuple[tuple[int, int], ...], torch.device], Tensor] = {}


def shapes_tensor(spatial_shapes: Tensor | list[tuple[int, int]], device: torch.device) -> Tensor:
    """(L, 2) int64 level shapes for the kernels, on `device` when given as a list.

    Copying a list to the GPU is a host-to-device copy from pageable memory, i.e. a sync point: twice per
    decoder layer per step if done per call. So eagerly each distinct list is copied once and kept (the
    kernels only read it); while torch.compile traces, the tensor is created inside the graph instead.
    A tensor argument is used where it lives.
    """
    if isinstance(spatial_shapes, Tensor):
        return spatial_shapes.to(torch.int64)
    key = tuple((int(h), int(w)) for h, w in spatial_shapes)
    if device.type == "cpu" or torch.compiler.is_compiling():
        return torch.tensor(key, dtype=torch.int64, device=device).reshape(-1, 2)
    if (key, device) not in _SHAPES_ON_DEVICE:
        with torch.inference_mode(False):  # a first call under inference_mode must not poison training
            _SHAPES_ON_DEVICE[(key, device)] = torch.tensor(key, dtype=torch.int64, device=device).reshape(-1, 2)
    return _SHAPES_ON_DEVICE[(key, device)]


def ms_deform_attn_triton(
    value: Tensor,
    spatial_shapes: Tensor | list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Deformable attention core through the Triton custom op, on any device (CPU runs Triton's interpreter:
    correct but slow, meant for tests). Same arguments and result as `ms_deform_attn_reference`."""
    _validate(value, spatial_shapes, sampling_locations, attention_weights)
    return MSDeformAttnFunction.apply(
        value.contiguous(),
        shapes_tensor(spatial_shapes, value.device),
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
    )


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor | list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    backend: str | None = None,
) -> Tensor:
    """Deformable attention core: value (N, S, H, D); spatial_shapes (L, 2) as (H, W); locations
    (N, Q, H, L, P, 2) in [0, 1], x first; weights (N, Q, H, L, P). Returns (N, Q, H*D).
    Triton on CUDA, the grid_sample reference elsewhere, the gather form under jvp and double backward;
    `backend` (or the `backend()` context) forces one."""
    backend = resolve_backend(value.device, backend)
    if backend == "triton":
        return ms_deform_attn_triton(value, spatial_shapes, sampling_locations, attention_weights)
    if backend == "gather":
        return ms_deform_attn_gather(value, spatial_shapes, sampling_locations, attention_weights)
    return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)
