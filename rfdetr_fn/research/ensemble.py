"""Function transforms over the model: vmapped ensembles, per-example gradients, jvp and Hessian-vector products.

The model is a pure function of its params tree, so `torch.func` applies directly, with no context
manager: every call picks kernels that support the transforms active around it (attention's math
composite under any transform, deformable attention's gather form under jvp and double backward). These
helpers are the plain calls written out once. One thing needs care: Hungarian matching is an opaque op
with no batching rule and no gradient, so the losses below compute matches per member (or for the batch)
first and pass them to `rf.loss` as a stop-gradient input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rfdetr_fn import tree
from rfdetr_fn.config import ModelConfig, TrainConfig
from rfdetr_fn.losses import TARGET_KEYS
from rfdetr_fn.losses.config import LossConfig
from rfdetr_fn.losses.criterion import match_all
from rfdetr_fn.losses.objective import batch_num_boxes, loss
from rfdetr_fn.losses.objective import matches as batch_matches
from rfdetr_fn.model import detector


def stack(trees: Sequence[tree.Params]) -> tree.Params:
    """One tree whose leaves carry a leading member axis (the input of the vmapped functions)."""
    if not trees:
        raise ValueError("stack: no trees")
    return tree.map_(lambda *leaves: torch.stack(leaves), *trees)


def unstack(stacked: tree.Params) -> list[tree.Params]:
    size = next(tree.leaves(stacked)).shape[0]
    return [tree.map_(lambda t, i=i: t[i], stacked) for i in range(size)]


def apply(stacked: tree.Params, images: Tensor, mask: Tensor | None, cfg: ModelConfig, *, train: bool = False) -> dict:
    """Every member's outputs on the same images, each leaf with a leading member axis."""

    def one(params):
        return detector.apply(params, images, mask, cfg, train=train)

    return torch.func.vmap(one, randomness="different")(stacked)


def _targets(batch: dict) -> dict:
    return {k: batch[k] for k in TARGET_KEYS if k in batch}


def member_loss(params: tree.Params, batch: dict, indices: list[Tensor], cfg: ModelConfig, tcfg: TrainConfig):
    """One member's total training loss (`rf.loss`) with the matches given (no matching inside: vmap-safe)."""
    return loss(params, batch, cfg, tcfg, indices=indices)[0]


def matches(stacked: tree.Params, batch: dict, cfg: ModelConfig, tcfg: TrainConfig) -> list[Tensor]:
    """Each member's matches on `batch`, stacked over members: the stop-gradient input of the losses."""
    with torch.no_grad():
        outs = apply(stacked, batch["images"], batch["mask"], cfg, train=True)
    members = next(tree.leaves(stacked)).shape[0]
    lcfg = LossConfig.resolve(cfg, tcfg)
    per_member = [match_all(_member(outs, i), _targets(batch), cfg, lcfg, train=True) for i in range(members)]
    return [torch.stack(layer) for layer in zip(*per_member)]


def losses(stacked: tree.Params, batch: dict, cfg: ModelConfig, tcfg: TrainConfig) -> Tensor:
    """(M,) per-member training losses on one batch, in one vmapped pass."""
    indices = matches(stacked, batch, cfg, tcfg)
    return torch.func.vmap(lambda p, idx: member_loss(p, batch, idx, cfg, tcfg), randomness="different")(
        stacked, indices
    )


def grads(stacked: tree.Params, batch: dict, cfg: ModelConfig, tcfg: TrainConfig) -> tuple[tree.Params, Tensor]:
    """Every member's gradient and loss in one vmapped pass: (stacked grads, (M,) losses)."""
    indices = matches(stacked, batch, cfg, tcfg)
    grad_fn = torch.func.grad_and_value(lambda p, idx: member_loss(p, batch, idx, cfg, tcfg))
    return torch.func.vmap(grad_fn, randomness="different")(stacked, indices)


def per_example_grads(
    params: tree.Params, batch: dict, cfg: ModelConfig, tcfg: TrainConfig, *, normalise: str = "batch"
) -> tuple[tree.Params, Tensor]:
    """Gradient of each image's own loss term: leaves (B, ...), losses (B,).

    normalise="batch" divides every image's terms by the batch's target count (as `rf.loss` and the step
    do), so the per-example gradients sum to the batch gradient exactly; "image" divides by the image's own
    count (each example's loss is then `rf.loss` of that image alone).
    """
    examples = {k: v.unsqueeze(1) for k, v in batch.items() if isinstance(v, Tensor)}
    indices = [layer.unsqueeze(1) for layer in batch_matches(params, batch, cfg, tcfg)]  # matching is per image
    count = batch_num_boxes(batch, cfg) if normalise == "batch" else None

    def one(p, example, idx):
        return loss(p, example, cfg, tcfg, indices=idx, normalise=normalise, num_boxes=count)[0]

    grad_fn = torch.func.grad_and_value(one)
    return torch.func.vmap(grad_fn, in_dims=(None, 0, 0), randomness="different")(params, examples, indices)


def jvp(
    params: tree.Params, tangent: tree.Params, images: Tensor, mask: Tensor | None, cfg: ModelConfig
) -> tuple[Tensor, Tensor]:
    """Forward-mode derivative of the eval logits along `tangent`: (logits, d logits)."""

    def logits(p):
        return detector.apply(p, images, mask, cfg, train=False)["pred_logits"]

    return torch.func.jvp(logits, (params,), (tangent,))


def hvp(params: tree.Params, vector: tree.Params, batch: dict, cfg: ModelConfig, tcfg: TrainConfig) -> tree.Params:
    """Hessian of the training loss (matches held fixed) times `vector`, forward-over-reverse."""
    indices = batch_matches(params, batch, cfg, tcfg)
    grad_fn = torch.func.grad(lambda p: member_loss(p, batch, indices, cfg, tcfg))
    return torch.func.jvp(grad_fn, (params,), (vector,))[1]


def _member(outputs: dict, i: int) -> dict:
    """Member i of vmapped outputs (dicts and lists of tensors)."""
    return torch.utils._pytree.tree_map(lambda t: t[i] if isinstance(t, Tensor) else t, outputs)
