"""In-place twins of the update (clip, AdamW, EMA) for a donated train state: the same arithmetic as the
pure path (`chain.global_norm_clip`, `chain.adamw` + `chain.apply_updates`, `ema.ema_maybe_update`), so the
results are bit-equal (tests/test_inplace_update.py), but every buffer is overwritten instead of allocated.

`make_train_step(..., donate=True)` (what `fit` uses on CPU) runs `donated_update` in place of the pure
update. A donated input must not be used again: these functions overwrite `params`, the moments, the EMA
weights and the gradients they are given.

Why not torch's fused AdamW (`torch._fused_adamw_`, one pass per tensor on CPU)? It rounds differently
(up to 2.4e-7 absolute on unit-scale weights after a few steps), so it cannot be bit-equal to the pure
update; these foreach in-place ops are. Where the pure path allocates a model-sized temporary per op, this
path allocates one per chunk for the Adam denominator and the EMA product only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rfdetr_fn import tree
from rfdetr_fn.optim import ema as ema_lib
from rfdetr_fn.optim.config import UpdateConfig
from rfdetr_fn.optim.recipe import Group


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


def donated_update(
    state: dict,
    grads,
    groups: list[Group],
    ucfg: UpdateConfig,
    *,
    betas: tuple[float, float],
    eps: float,
    lr_factor: Tensor,
) -> None:
    """Upstream's AdamW over its parameter groups and the EMA, in place on `state` (params, moments, EMA):
    the in-place twin of the step's pure update for the built-in adamw, given clipped `grads`."""
    flat_p, flat_g = tree.flatten(state["params"]), tree.flatten(grads)
    opt = state["opt_state"]
    flat_m, flat_v = tree.flatten(opt["exp_avg"]), tree.flatten(opt["exp_avg_sq"])
    opt["step"].add_(1)  # the count after this step, as the pure update's `state["step"] + 1`
    for group in groups:
        names = [n for n in group.names if flat_g.get(n) is not None]
        adamw_(
            [flat_p[n] for n in names], [flat_g[n] for n in names], [flat_m[n] for n in names],
            [flat_v[n] for n in names], opt["step"], lr=lr_factor * group.lr, weight_decay=group.weight_decay,
            b1=betas[0], b2=betas[1], eps=eps,
        )  # fmt: skip
    if ucfg.use_ema:
        ema = state["ema_state"]
        delta = ema_lib._delta(ema["updates"], ucfg.ema_decay, ucfg.ema_tau)
        counted = torch.ones_like(ema["updates"])
        if ucfg.ema_update_interval > 1:  # a skipped step blends with delta 1, as the pure update does
            due = torch.remainder(state["step"] + 1, ucfg.ema_update_interval) == 0
            delta, counted = torch.where(due, delta, 1.0).to(torch.float64), due.to(counted.dtype)
        flat_e = tree.flatten(ema["params"])
        ema_blend_(list(flat_e.values()), [flat_p[n].detach() for n in flat_e], delta)
        ema["updates"].add_(counted)


def _scalar(value: Tensor | float, like: Tensor) -> Tensor:
    """The scalar rounded once to `like`'s dtype, as `chain._scalar`."""
    return torch.as_tensor(value, dtype=torch.float64).to(device=like.device, dtype=like.dtype)
