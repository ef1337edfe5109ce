"""Hungarian matching of queries to padded targets, in one traceable graph.

Costs are computed batched over images on padded targets (no per-image Python loop, no
data-dependent shapes) and the assignments of every layer, image and group are solved in one call of an
opaque custom op (`assignment.solve`: scipy on the host, or the device solver), so
`torch.compile(fullgraph=True)` and `torch.func.grad` see a single node with a fixed output shape.

Targets: `labels` int64 (B, T) with -1 in padding slots, `boxes` float (B, T, 4) normalised cxcywh,
optionally `masks` bool (B, T, H, W). Result: (B, G, T) query indices into the (G*Q)-query axis
(group g owns queries [g*Q, (g+1)*Q)), -1 where a target slot is padding or unmatched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rfdetr_fn import rng
from rfdetr_fn.losses import keypoints as kp_loss
from rfdetr_fn.losses.assignment import solve
from rfdetr_fn.losses.config import LossConfig
from rfdetr_fn.model import boxes as box_ops

FOCAL_GAMMA = 2.0
# Padding target boxes become (cx, cy, w, h) = (0.5, 0.5, 1, 1), so no cost or loss divides by a zero area.
_DUMMY_CENTRE, _DUMMY_SIZE = 0.5, 1.0


class MatchCosts(NamedTuple):
    """Weights of the matching cost terms (upstream's set_cost_* and focal alpha) and mask points.

    A NamedTuple rather than an attrs class: the criterion builds one per layer inside the traced step,
    and Dynamo cannot trace a frozen attrs `__init__` (it sets fields through `object.__setattr__`).
    """

    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    focal_alpha: float = 0.25
    cost_mask_ce: float = 5.0
    cost_mask_dice: float = 5.0
    mask_points: int | None = None
    """Points sampled for the mask costs; None = h*w/16 of the predicted masks."""
    keypoint_schema: tuple[int, ...] = ()
    """Keypoints per class of a keypoint model (empty: no keypoint costs)."""
    keypoint_coefs: dict[str, float] | None = None
    """Keypoint cost weights by term (upstream uses the keypoint loss weights); None = 1 each."""

    @classmethod
    def from_loss(
        cls, lcfg: LossConfig, mask_points: int | None = None, keypoint_schema: tuple[int, ...] = ()
    ) -> MatchCosts:
        """Upstream builds its matcher from the train args: set_cost_*, focal_alpha, mask and keypoint loss
        weights."""
        return cls(
            cost_class=lcfg.set_cost_class,
            cost_bbox=lcfg.set_cost_bbox,
            cost_giou=lcfg.set_cost_giou,
            focal_alpha=lcfg.focal_alpha,
            cost_mask_ce=lcfg.mask_ce_cost,
            cost_mask_dice=lcfg.mask_dice_cost,
            mask_points=mask_points,
            keypoint_schema=tuple(keypoint_schema),
            keypoint_coefs=dict(lcfg.keypoint_coefs) if keypoint_schema else None,
        )


def point_sample(features: Tensor, coords: Tensor) -> Tensor:
    """Bilinear values of (N, C, h, w) at (N, P, 2) xy points in [0, 1]: (N, C, P); border padding."""
    grid = (2.0 * coords - 1.0)[:, :, None, :]
    out = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[..., 0]


def nearest_index(coords: Tensor, height: int, width: int) -> Tensor:
    """Flat pixel index that grid_sample(mode='nearest', align_corners=False) reads at xy in [0, 1].

    Indexing the boolean masks directly avoids a float copy of every (possibly huge) target mask.
    The arithmetic follows grid_sample's unnormalisation step by step, so ties round the same way.
    """
    grid = 2.0 * coords - 1.0
    x = torch.round(((grid[..., 0] + 1.0) * width - 1.0) / 2.0).long().clamp(0, width - 1)
    y = torch.round(((grid[..., 1] + 1.0) * height - 1.0) / 2.0).long().clamp(0, height - 1)
    return y * width + x


def safe_target_boxes(boxes: Tensor, valid: Tensor) -> Tensor:
    """Padding slots get a unit box so IoU/GIoU stay finite (their values are masked out later)."""
    # filled on the device: `new_tensor([...])` would be a host-to-device copy, a sync on CUDA
    dummy = torch.cat([boxes.new_full((2,), _DUMMY_CENTRE), boxes.new_full((2,), _DUMMY_SIZE)])
    return torch.where(valid[..., None], boxes, dummy)


def focal_class_cost(logits: Tensor, alpha: float) -> Tensor:
    """Focal cost of logits already gathered at the target classes (elementwise)."""
    prob = logits.sigmoid()
    pos = alpha * (1 - prob) ** FOCAL_GAMMA * (-F.logsigmoid(logits))
    neg = (1 - alpha) * prob**FOCAL_GAMMA * (-F.logsigmoid(-logits))
    return pos - neg


def unpack_pred_masks(pred_masks: dict | Tensor) -> tuple[Tensor, Tensor, Tensor] | Tensor:
    """Unpack the train-mode sparse dict (spatial, query, bias) or pass a dense (B, Nq, h, w) through."""
    if isinstance(pred_masks, dict):
        return pred_masks["spatial_features"], pred_masks["query_features"], pred_masks["bias"]
    return pred_masks


def mask_costs(
    pred_masks: dict | Tensor, target_masks: Tensor, num_points: int | None, key: rng.IntLike = 0
) -> tuple[Tensor, Tensor]:
    """Pairwise mean point BCE and dice (B, Nq, T) at one shared set of uniform random points (from `key`)."""
    packed = unpack_pred_masks(pred_masks)
    source = packed[0] if isinstance(packed, tuple) else packed
    batch, _, h, w = source.shape
    points = num_points if num_points is not None else h * w // 16
    coords = rng.uniform(key, (1, points, 2), device=source.device)
    sampled = point_sample(source, coords.expand(batch, -1, -1))  # (B, C or Nq, P)
    if isinstance(packed, tuple):
        _, queries, bias = packed
        logits = torch.einsum("bcp,bnc->bnp", sampled, queries) + bias
    else:
        logits = sampled
    flat = nearest_index(coords[0], target_masks.shape[-2], target_masks.shape[-1])
    labels = target_masks.flatten(2)[:, :, flat].to(logits.dtype)  # (B, T, P)
    pos, neg = F.softplus(-logits), F.softplus(logits)  # BCE against 1 and against 0
    ce = (pos @ labels.transpose(1, 2) + neg @ (1 - labels).transpose(1, 2)) / points
    prob = logits.sigmoid()
    numerator = 2 * prob @ labels.transpose(1, 2)
    denominator = prob.sum(-1)[:, :, None] + labels.sum(-1)[:, None, :]
    dice = 1 - (numerator + 1) / (denominator + 1)
    return ce, dice


def match_costs(outputs_layer: dict, targets: dict, costs: MatchCosts, key: rng.IntLike = 0) -> dict[str, Tensor]:
    """Per-image cost terms (B, Nq, T) and their weighted total; masks and keypoints count when both
    sides have them (keypoint costs weighted by `costs.keypoint_coefs`, the keypoint loss weights)."""
    with torch.no_grad():
        logits = outputs_layer["pred_logits"].detach()
        pred = outputs_layer["pred_boxes"].detach()
        labels, valid = targets["labels"], targets["labels"] >= 0
        tgt = safe_target_boxes(targets["boxes"].to(pred.dtype), valid)
        gather = labels.clamp(min=0)[:, None, :].expand(-1, logits.shape[1], -1)
        terms = {
            "class": focal_class_cost(logits.gather(2, gather), costs.focal_alpha),
            "bbox": (pred[:, :, None, :] - tgt[:, None, :, :]).abs().sum(-1),
            "giou": -box_ops.pairwise_giou(box_ops.cxcywh_to_xyxy(pred), box_ops.cxcywh_to_xyxy(tgt)),
        }
        total = costs.cost_bbox * terms["bbox"] + costs.cost_class * terms["class"] + costs.cost_giou * terms["giou"]
        if "masks" in targets and outputs_layer.get("pred_masks") is not None:
            pm = outputs_layer["pred_masks"]
            pm = {k: v.detach() for k, v in pm.items()} if isinstance(pm, dict) else pm.detach()
            terms["mask_ce"], terms["mask_dice"] = mask_costs(pm, targets["masks"], costs.mask_points, key)
            total = total + costs.cost_mask_ce * terms["mask_ce"] + costs.cost_mask_dice * terms["mask_dice"]
        schema = costs.keypoint_schema
        if schema and "keypoints" in targets and outputs_layer.get("pred_keypoints") is not None:
            found = kp_loss.costs(outputs_layer["pred_keypoints"], targets, schema)
            coefs = costs.keypoint_coefs or dict.fromkeys(kp_loss.TERMS, 1.0)
            for term in kp_loss.TERMS:
                terms[f"kp_{term}"] = found[f"kp_{term}"]
                total = total + coefs[term] * found[f"kp_{term}"]
        terms["total"] = total.float()
        return terms


def assign(total: Tensor, valid: Tensor, group_detr: int, backend: str = "auto") -> Tensor:
    """Solve every (image, group) block of a (B, G*Q, T) cost: (B, G, T) query indices, -1 = none.

    Valid targets may sit anywhere in the T axis: columns are stably reordered valid-first for the
    solver (which reads a prefix of n_valid columns) and the answer is put back in slot order.
    `backend`: "scipy", "device" or "auto" (see `assignment.resolve_backend`).
    """
    batch, num_queries, slots = total.shape
    if num_queries % group_detr:
        raise ValueError(f"pred_logits has {num_queries} queries, not a multiple of group_detr={group_detr}")
    per_group = num_queries // group_detr
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices  # (B, T) valid first
    cost = total.gather(2, order[:, None, :].expand(-1, num_queries, -1))
    cost = cost.reshape(batch * group_detr, per_group, slots)
    n_valid = valid.sum(1).repeat_interleave(group_detr)
    solved = solve(cost, n_valid, backend).view(batch, group_detr, slots)
    idx = torch.full_like(solved, -1).scatter(2, order[:, None, :].expand(-1, group_detr, -1), solved)
    offset = (torch.arange(group_detr, device=idx.device) * per_group)[None, :, None]
    return torch.where(idx >= 0, idx + offset, idx)


def match_layers(
    layers: Sequence[dict],
    targets: dict,
    costs: Sequence[MatchCosts],
    *,
    group_detr: int,
    backend: str = "auto",
    keys: Sequence[rng.IntLike] | None = None,
) -> list[Tensor]:
    """(B, G, T) query indices (offset by g*Q) per layer, -1 for padding, with one solve per query count.

    The costs of every layer are built first (`keys`, one per layer, drive their random mask points),
    then all layers x images x groups go to the solver as one batch (the encoder proposals form a second
    batch only when the image has fewer tokens than num_queries).
    """
    keys = [0] * len(layers) if keys is None else keys
    totals = [match_costs(layer, targets, c, key=k)["total"] for layer, c, k in zip(layers, costs, keys, strict=True)]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, total in enumerate(totals):
        by_shape.setdefault(tuple(total.shape), []).append(i)
    found: dict[int, Tensor] = {}
    with torch.no_grad():
        valid = targets["labels"] >= 0
        for members in by_shape.values():
            stacked = torch.cat([totals[i] for i in members])
            idx = assign(stacked, valid.repeat(len(members), 1), group_detr, backend)
            found.update(zip(members, idx.split(valid.shape[0])))
    return [found[i] for i in range(len(totals))]


def match(
    outputs_layer: dict,
    targets: dict,
    costs: MatchCosts,
    *,
    group_detr: int,
    backend: str = "auto",
    key: rng.IntLike = 0,
) -> Tensor:
    """(B, G, T) query indices (already offset by g*Q) matched to each target slot, -1 for padding."""
    return match_layers([outputs_layer], targets, [costs], group_detr=group_detr, backend=backend, keys=[key])[0]
