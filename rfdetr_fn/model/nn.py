"""Pure layers over parameter subtrees. Each takes its own `{"weight", "bias", ...}` dict first.

Linears run as `F.linear` (one fused GEMM + bias, `addmm`) in eager code, and as `x @ w.T + b` while
Dynamo traces: under torch.func + torch.compile, `F.linear` with a bias on a 3-D input specialises on the
batch size and recompiles for every new one. Both forms return the GEMM's dtype, so under autocast a
compiled linear gives the same bf16/fp16 output as an eager one (and as upstream's `nn.Linear`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
import torch.utils.checkpoint
from torch import Tensor

from rfdetr_fn.kernels import transforms
from rfdetr_fn.tree import Params


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention, (B, heads, T, hd) -> (B, heads, T, hd), chosen per call.

    Plain calls take SDPA's fused kernel. Under a torch.func transform the same function runs as SDPA's
    math composite (matmul, softmax), whose ops all have batching, forward-mode and double-backward
    rules: CPU's fused kernel has none of the last two, and the choice needs no switch by the caller.
    bf16 inputs on CPU (autocast) that will be differentiated run the kernel in float32: CPU's bf16
    flash-attention backward is slower than its float32 one (Nano's decoder self-attention 119 vs 79 ms
    forward + backward, AVX512-BF16 EPYC, benchmarks/RESULTS.md), and the casts cost less than the
    difference. Without gradients (inference) bf16 stays: there the casts cost more than they save.
    """
    if transforms.any_transform(q):
        return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, bias)[0]
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.requires_grad and torch.is_grad_enabled():
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def linear(p: Params, x: Tensor) -> Tensor:
    if not torch.compiler.is_compiling():
        return F.linear(x, p["weight"], p.get("bias"))
    y = x @ p["weight"].t()
    return (y + p["bias"]).to(y.dtype) if "bias" in p else y


def layer_norm(p: Params, x: Tensor, eps: float = 1e-5) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), p["weight"], p["bias"], eps)


def channel_layer_norm(p: Params, x: Tensor, eps: float = 1e-6) -> Tensor:
    """LayerNorm over C of an NCHW map (upstream's projector/segmentation 'LayerNorm' with data_format NCHW)."""
    return layer_norm(p, x.permute(0, 2, 3, 1), eps).permute(0, 3, 1, 2)


def mlp(p: Params, x: Tensor, num_layers: int) -> Tensor:
    """Upstream's MLP: `layers.{i}` linears with ReLU between them (none after the last)."""
    for i in range(num_layers):
        x = linear(p["layers"][str(i)], x)
        if i < num_layers - 1:
            x = F.relu(x)
    return x


# ---- initialisers: each returns a fresh tensor from an explicit generator ----


def xavier_uniform(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    fan_out, fan_in = shape[0], shape[1]
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    bound = math.sqrt(6.0 / ((fan_in + fan_out) * receptive))
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def kaiming_uniform_default(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """PyTorch's default Linear/Conv weight init (kaiming_uniform with a=sqrt(5))."""
    fan_in = math.prod(shape[1:])
    bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def default_bias(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> Tensor:
    bound = 1.0 / math.sqrt(fan_in) if fan_in else 0.0
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def trunc_normal(shape: tuple[int, ...], gen: torch.Generator, std: float = 0.02) -> Tensor:
    return torch.nn.init.trunc_normal_(torch.empty(shape), std=std, a=-2 * std, b=2 * std, generator=gen)


def linear_init(out_dim: int, in_dim: int, gen: torch.Generator) -> Params:
    """PyTorch's default nn.Linear initialisation."""
    return {
        "weight": kaiming_uniform_default((out_dim, in_dim), gen),
        "bias": default_bias((out_dim,), in_dim, gen),
    }


def head_init(dim: int, out_dim: int, gen: torch.Generator) -> Params:
    """Upstream's 3-layer head MLP d -> d -> d -> out with a zero last layer: its first outputs are exact
    zeros, so boxes (and keypoints) start on their reference."""
    return {
        "layers": {
            "0": linear_init(dim, dim, gen),
            "1": linear_init(dim, dim, gen),
            "2": {"weight": torch.zeros(out_dim, dim), "bias": torch.zeros(out_dim)},
        }
    }


def norm_init(dim: int) -> Params:
    return {"weight": torch.ones(dim), "bias": torch.zeros(dim)}


# ---------------------------------------------------------------- gradient checkpointing


def checkpoint(fn: Callable[..., Any], *args: Any, use_reentrant: bool = False) -> Any:
    """`fn(*args)` keeping only its inputs for the backward pass, which recomputes it: the same numbers.

    Plain autograd and torch.compile use `torch.utils.checkpoint` (non-reentrant). Under torch.func
    transforms, whose saved-tensor hooks that checkpoint relies on are not supported, the same recompute is
    an autograd.Function (`_Recompute`) with torch.func rules: its backward is a `torch.func.vjp` of `fn`,
    its forward-mode rule a `torch.func.jvp`, its batching rule generated. Either way gradients equal those
    without checkpointing (exactly: the same ops run). `args` may hold trees of tensors and plain values.
    """
    if use_reentrant:
        raise ValueError("checkpoint: only the non-reentrant form exists (use_reentrant=False)")
    return _torch_func_checkpoint(fn, *args)


def checkpoint_for_call() -> Callable[..., Any]:
    """The checkpoint to call here: torch's (plain autograd, and always while Dynamo traces: it recognises
    that function only when called directly) or `checkpoint` under torch.func transforms."""
    if torch.compiler.is_compiling() or not transforms.any_transform():
        return torch.utils.checkpoint.checkpoint
    return checkpoint


def _torch_func_checkpoint(fn: Callable[..., Any], *args: Any) -> Any:
    leaves, spec = pytree.tree_flatten(args)
    slots = [i for i, v in enumerate(leaves) if isinstance(v, Tensor) and v.is_floating_point()]
    outputs: dict[str, Any] = {}

    def call(*tensors: Tensor) -> tuple[Tensor, ...]:
        full = list(leaves)
        for i, t in zip(slots, tensors):
            full[i] = t
        out_leaves, outputs["spec"] = pytree.tree_flatten(fn(*pytree.tree_unflatten(full, spec)))
        outputs["leaves"] = out_leaves  # the non-differentiable ones are read from here
        return tuple(v for v in out_leaves if _differentiable(v))

    found = _Recompute.apply(call, *(leaves[i] for i in slots))
    found = iter(found)
    merged = [next(found) if _differentiable(v) else v for v in outputs["leaves"]]
    return pytree.tree_unflatten(merged, outputs["spec"])


def _differentiable(value: Any) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point()


class _Recompute(torch.autograd.Function):
    """Recompute-in-backward with every torch.func rule (see `checkpoint`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(call, *tensors):
        return call(*tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.call = inputs[0]
        ctx.save_for_backward(*inputs[1:])
        ctx.save_for_forward(*inputs[1:])

    @staticmethod
    def backward(ctx, *grads):
        _, vjp_fn = torch.func.vjp(ctx.call, *ctx.saved_tensors)
        return (None, *vjp_fn(grads))

    @staticmethod
    def jvp(ctx, _call_tangent, *tangents):
        return torch.func.jvp(ctx.call, tuple(ctx.saved_tensors), tangents)[1]
