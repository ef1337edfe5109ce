"""Function transforms over the model: vmapped ensembles, per-example gradients, jvp and Hessian-vector products.

The model is a pure function of its params tree, so `torch.func` applies directly: `stack` a list of
param trees and `vmap` runs every member in one batched pass. Two things need care, and live here:

- Hungarian matching is an opaque custom op with no batching rule, and it has no gradient anyway: the
  losses below compute matches per member (or per example) first, without gradients, and pass them to
  the criterion as a stop-gradient input.
- Attention on CPU dispatches to a fused kernel without vmap/forward-mode rules, and deformable attention's
  grid_sample and Triton paths have no forward-mode or second-order rules: `transformable()` switches to
  SDPA's math kernel and, for forward mode, to the gather form of deformable attention (same function).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from rfdetr_fn import kernels, tree
from rfdetr_fn.config import ModelConfig, TrainConfig
from rfdetr_fn.data import TARGET_KEYS
from rfdetr_fn.losses.config import LossConfig
from rfdetr_fn.losses.criterion import criterion, match_all
from rfdetr_fn.model import detector


def stack(trees: Sequence[tree.Params]) -> tree.Params:
    """One tree whose leaves carry a leading member axis (the input of the vmapped functions)."""
    if not trees:
        raise ValueError("stack: no trees")
    return tree.map_(lambda *leaves: torch.stack(leaves), *trees)


def unstack(stacked: tree.Params) -> list[tree.Params]:
    size = next(tree.leaves(stacked)).shape[0]
    return [tree.map_(lambda t, i=i: t[i], stacked) for i in range(size)]


@contextlib.contextmanager
def transformable(forward_mode: bool = False) -> Iterator[None]:
    """Kernels every torch.func transform can pass through (see the module docstring)."""
    previous = kernels.get_backend()
    if forward_mode:
        kernels.set_backend("gather")
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        kernels.set_backend(previous)


def apply(stacked: tree.Params, images: Tensor, mask: Tensor | None, cfg: ModelConfig, *, train: bool = False) -> dict:
    """Every member's outputs on the same images, each leaf with a leading member axis."""

    def one(params):
        return detector.apply(params, images, mask, cfg, train=train)

    with transformable():
        return torch.func.vmap(one, randomness="different")(stacked)


def _targets(batch: dict) -> dict:
    return {k: batch[k] for k in TARGET_KEYS if k in batch}


def member_loss(params: tree.Params, batch: dict, indices: list[Tensor], cfg: ModelConfig, tcfg: TrainConfig):
    """One member's total training loss with the matches given (no matching inside: vmap-safe)."""
    out = detector.apply(params, batch["images"], batch["mask"], cfg, train=True, drop_path=tcfg.drop_path)
    total, _ = criterion(out, _targets(batch), cfg, LossConfig.resolve(cfg, tcfg), train=True, indices=indices)
    return total


def matches(stacked: tree.Params, batch: dict, cfg: ModelConfig, tcfg: TrainConfig) -> list[Tensor]:
    """Each member's matches on `batch`, stacked over members: the stop-gradient input of the losses."""
    with torch.no_grad():
        outs = apply(stacked, batch["images"], batch["mask"], cfg, train=True)
    members = next(tree.leaves(stacked)).shape[0]
    per_member = [
        match_all(_member(outs, i), _targets(batch), cfg, LossConfig.resolve(cfg, tcfg), train=True)
        for i in range(members)
    ]
    return [torch.stack(layer) for layer in zip(*per_member)]


def losses(stacked: tree.Params, batch: dict, cfg: ModelConfig, tcfg: TrainConfig) -> Tensor:
    """(M,) per-member training losses on one batch, in one vmapped pass."""
    indices = matches(stacked, batch, cfg, tcfg)
    fn = torch.func.vmap(lambda p, idx: member_loss(p, batch, idx, cfg, tcfg), randomness="different")
    with transformable():
        return fn(stacked, indices)


def grads(stacked: tree.Params, batch: dict, cfg: ModelConfig, tcfg: TrainConfig) -> tuple[tree.Params, Tensor]:
    """Every member's gradient and loss in one vmapped pass: (stacked grads, (M,) losses)."""
    indices = matches(stacked, batch, cfg, tcfg)
    grad_fn = torch.func.grad_and_value(lambda p, idx: member_loss(p, batch, idx, cfg, tcfg))
    with transformable():
        return torch.func.vmap(grad_fn, randomness="different")(stacked, indices)


def per_example_grads(
    params: tree.Params, batch: dict, cfg: ModelConfig, tcfg: TrainConfig
) -> tuple[tree.Params, Tensor]:
    """Gradient of each image's own loss (normalised by its own targets): leaves (B, ...), losses (B,)."""
    examples = {k: v.unsqueeze(1) for k, v in batch.items() if isinstance(v, Tensor)}
    size = batch["images"].shape[0]
    lcfg = LossConfig.resolve(cfg, tcfg)
    with torch.no_grad():
        outs = [
            (detector.apply(params, e["images"], e["mask"], cfg, train=True), e)
            for e in (_index(examples, i) for i in range(size))
        ]
        indices = [match_all(out, _targets(e), cfg, lcfg, train=True) for out, e in outs]
    stacked_idx = [torch.stack(layer) for layer in zip(*indices)]
    grad_fn = torch.func.grad_and_value(lambda p, example, idx: member_loss(p, example, idx, cfg, tcfg))
    with transformable():
        return torch.func.vmap(grad_fn, in_dims=(None, 0, 0), randomness="different")(params, examples, stacked_idx)


def jvp(
    params: tree.Params, tangent: tree.Params, images: Tensor, mask: Tensor | None, cfg: ModelConfig
) -> tuple[Tensor, Tensor]:
    """Forward-mode derivative of the eval logits along `tangent`: (logits, d logits)."""

    def logits(p):
        return detector.apply(p, images, mask, cfg, train=False)["pred_logits"]

    with transformable(forward_mode=True):
        return torch.func.jvp(logits, (params,), (tangent,))


def hvp(params: tree.Params, vector: tree.Params, batch: dict, cfg: ModelConfig, tcfg: TrainConfig) -> tree.Params:
    """Hessian of the training loss (matches held fixed) times `vector`, forward-over-reverse."""
    with torch.no_grad():
        out = detector.apply(params, batch["images"], batch["mask"], cfg, train=True)
        indices = match_all(out, _targets(batch), cfg, LossConfig.resolve(cfg, tcfg), train=True)
    grad_fn = torch.func.grad(lambda p: member_loss(p, batch, indices, cfg, tcfg))
    with transformable(forward_mode=True):
        return torch.func.jvp(grad_fn, (params,), (vector,))[1]


def _index(batch: dict, i: int) -> dict:
    return {k: v[i] for k, v in batch.items()}


def _member(outputs: dict, i: int) -> dict:
    """Member i of vmapped outputs (dicts and lists of tensors)."""
    return torch.utils._pytree.tree_map(lambda t: t[i] if isinstance(t, Tensor) else t, outputs)
