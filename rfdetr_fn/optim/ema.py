"""Functional EMA of the weights with upstream's tau warm-up, traceable inside the compiled step.

State: {"params": tree (a copy, never an alias, of the weights), "updates": 0-dim float32 count}.
The first update copies the weights (AveragedModel starts with n_averaged = 0); update k >= 2 does
ema <- delta(k) * ema + (1 - delta(k)) * weights with delta(k) = decay * (1 - exp(-k / tau)).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rfdetr_fn import tree

EmaState = dict[str, Any]


def ema_init(params: tree.Params) -> EmaState:
    """Fresh EMA state: cloned weights and zero updates (clones, so dynamo never sees aliased inputs)."""
    device = next(tree.leaves(params)).device
    return {"params": tree.clone(params), "updates": torch.zeros((), dtype=torch.float32, device=device)}


def _delta(updates: Tensor, decay: float, tau: float) -> Tensor:
    """Tensor delta of the next update given `updates` done so far (0 on the first: a plain copy)."""
    k = updates.to(torch.float64) + 1
    warm = decay * (1.0 - torch.exp(-k / tau)) if tau > 0 else torch.full_like(k, decay)
    return torch.where(updates == 0, 0.0, warm).to(torch.float64)


def _blend(state: EmaState, params: tree.Params, delta: Tensor, counted: Tensor) -> EmaState:
    """ema * delta + params * (1 - delta) leaf-wise with foreach ops; delta 1 keeps ema, 0 copies params."""
    flat_ema = tree.flatten(state["params"])
    flat_p = tree.flatten(params)
    if flat_ema.keys() != flat_p.keys():
        missing = sorted(flat_ema.keys() ^ flat_p.keys())[:5]
        raise ValueError(f"EMA and params trees differ; first mismatched keys: {missing}")
    names = list(flat_ema)
    emas = [flat_ema[n] for n in names]
    ps = [flat_p[n].detach() for n in names]
    keep = delta.to(device=emas[0].device, dtype=emas[0].dtype)
    take = (1.0 - delta).to(device=emas[0].device, dtype=emas[0].dtype)
    new: list[Tensor] = []
    for lo, hi in tree.chunks(emas):  # the products live per chunk, not for the whole model
        new += torch._foreach_add(torch._foreach_mul(emas[lo:hi], keep), torch._foreach_mul(ps[lo:hi], take))
    return {"params": tree.unflatten(dict(zip(names, new))), "updates": state["updates"] + counted}


def ema_update(state: EmaState, params: tree.Params, *, decay: float, tau: float) -> EmaState:
    """One EMA update (the first copies `params`); out of place, no Python branch on tensors."""
    delta = _delta(state["updates"], decay, tau)
    return _blend(state, params, delta, torch.ones_like(state["updates"]))


def ema_maybe_update(
    state: EmaState, params: tree.Params, step: int | Tensor, *, interval: int, decay: float, tau: float
) -> EmaState:
    """Update only when `step` (optimizer steps done, counting this one) is a multiple of `interval`.

    Upstream checks trainer.global_step % ema_update_interval after the optimizer step. A skipped step
    blends with delta = 1, which returns the EMA unchanged, so the graph is the same on every step.
    """
    if interval <= 0:
        raise ValueError(f"ema_update_interval={interval} must be positive")
    if interval == 1:
        return ema_update(state, params, decay=decay, tau=tau)
    step_t = torch.as_tensor(step, device=state["updates"].device)
    due = torch.remainder(step_t, interval) == 0
    delta = torch.where(due, _delta(state["updates"], decay, tau), 1.0).to(torch.float64)
    return _blend(state, params, delta, due.to(state["updates"].dtype))
