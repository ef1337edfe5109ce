"""In-place twins of the update (clip, AdamW, EMA) for a donated train state: the same arithmetic as the
pure path (`chain.global_norm_clip`, `chain.adamw` + `chain.apply_updates`, `ema.ema_maybe_update`), so the
results are bit-equal (tests/test_inplace_update.py), but every buffer is overwritten instead of allocated.

Not wired into the step yet: `make_train_step(..., donate=True)` will call these once the step's record
form lands. A donated input must not be used again: these functions overwrite `params`, the moments, the
EMA weights and the gradients they are given.

Why not torch's fused AdamW (`torch._fused_adamw_`, one pass per tensor on CPU)? It rounds differently
(up to 2.4e-7 absolute on unit-scale weights after a few steps), so it cannot be bit-equal to the pure
update; these foreach in-place ops are. Where the pure path allocates a model-sized temporary per op, this
path allocates one per chunk for the Adam denominator and the EMA product only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rfdetr_fn import tree


def global_norm_clip_(grads: list[Tensor], max_norm: float) -> Tensor:
    """Scale `grads` in place like `chain.global_norm_clip`; returns the norm (one reduction per tensor,
    one over the per-tensor norms)."""
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    if max_norm > 0:
        torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


def adamw_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg: list[Tensor],
    exp_avg_sq: list[Tensor],
    step: Tensor,
    *,
    lr: Tensor | float,
    weight_decay: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> None:
    """One AdamW step over one parameter group, in place; `step` is the count after this step (float32
    0-dim), `lr` this step's scheduled rate (float64 0-dim or float). Mirrors `chain.scale_by_adam`,
    `add_decayed_weights` and `scale_by_learning_rate` as folded by `apply_updates`."""
    if not params:
        return
    step64 = step.to(torch.float64)
    like = params[0]
    bias2_sqrt = _scalar(torch.sqrt(1.0 - b2**step64), like)
    factor = -lr  # scale_by_learning_rate: -(schedule * lr), float64
    step_size = _scalar(factor / (1.0 - b1**step64), like)
    for lo, hi in tree.chunks(params):
        g, m, v, p = grads[lo:hi], exp_avg[lo:hi], exp_avg_sq[lo:hi], params[lo:hi]
        torch._foreach_lerp_(m, g, 1.0 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, g, g, value=1.0 - b2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, eps)
        for d, mi in zip(denom, m):  # d <- m / d, the direction, in the denominator's buffer
            torch.div(mi, d, out=d)
        if weight_decay:
            torch._foreach_mul_(p, _scalar(1.0 + weight_decay * factor, like))
        torch._foreach_mul_(denom, step_size)
        torch._foreach_add_(p, denom)


def ema_blend_(ema: list[Tensor], params: list[Tensor], delta: Tensor) -> None:
    """ema <- ema * delta + params * (1 - delta) in place, rounded as `ema._blend` (delta float64 0-dim)."""
    if not ema:
        return
    keep = delta.to(device=ema[0].device, dtype=ema[0].dtype)
    take = (1.0 - delta).to(device=ema[0].device, dtype=ema[0].dtype)
    for lo, hi in tree.chunks(ema):
        torch._foreach_mul_(ema[lo:hi], keep)
        torch._foreach_add_(ema[lo:hi], torch._foreach_mul(params[lo:hi], take))


def _scalar(value: Tensor | float, like: Tensor) -> Tensor:
    """The scalar rounded once to `like`'s dtype, as `chain._scalar`."""
    return torch.as_tensor(value, dtype=torch.float64).to(device=like.device, dtype=like.dtype)
