"""Hungarian matching of queries to padded targets, in one traceable graph.

Costs are computed batched over images on padded targets (no per-image Python loop, no
data-dependent shapes) and the assignment is solved by scipy inside an opaque custom op, so
`torch.compile(fullgraph=True)` and `torch.func.grad` see a single node with a fixed output shape.

Targets: `labels` int64 (B, T) with -1 in padding slots, `boxes` float (B, T, 4) normalised cxcywh,
optionally `masks` bool (B, T, H, W). Result: (B, G, T) query indices into the (G*Q)-query axis
(group g owns queries [g*Q, (g+1)*Q)), -1 where a target slot is padding or unmatched.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from rfdetr_fn import boxes as box_ops
from rfdetr_fn import rng
from rfdetr_fn.loss import keypoints as kp_loss

FOCAL_GAMMA = 2.0
# Padding target boxes become (cx, cy, w, h) = (0.5, 0.5, 1, 1), so no cost or loss divides by a zero area.
_DUMMY_CENTRE, _DUMMY_SIZE = 0.5, 1.0


def sanitize_cost(cost: np.ndarray) -> np.ndarray:
    """Replace non-finite entries by a finite value above every real cost (scipy rejects inf/NaN)."""
    finite = np.isfinite(cost)
    if finite.all():
        return cost
    real = cost[finite]
    fill = real.max() + np.abs(real).max() + 1.0 if real.size else 0.0
    return np.where(finite, cost, fill)


@torch.library.custom_op("rfdetr_fn::hungarian", mutates_args=())
def hungarian(cost: Tensor, n_valid: Tensor) -> Tensor:
    """Solve N independent assignments; cost (N, Q, T) uses columns [0, n_valid[i]) of problem i.

    Returns (N, T) int64: the query matched to each target column, -1 for padding (or for targets
    left over when a problem has more targets than queries). Runs on the host: CUDA costs are
    copied over, which is a sync point, as in any scipy-based matcher. It is the only one: costs and
    counts travel in one copy, and the answer goes back from pinned memory without waiting.
    """
    packed = torch.cat([cost.detach().reshape(-1).to(torch.float64), n_valid.detach().to(torch.float64)])
    host = packed.cpu().numpy()
    cost_np = host[: cost.numel()].reshape(cost.shape)
    out = np.full((cost.shape[0], cost.shape[2]), -1, dtype=np.int64)
    for i, count in enumerate(host[cost.numel() :].tolist()):
        count = min(int(count), cost.shape[2])
        if count <= 0:
            continue
        rows, cols = linear_sum_assignment(sanitize_cost(cost_np[i, :, :count]))
        out[i, cols] = rows
    answer = torch.from_numpy(out)
    if cost.device.type != "cuda":
        return answer.to(cost.device)
    return answer.pin_memory().to(cost.device, non_blocking=True)


@hungarian.register_fake
def _(cost: Tensor, n_valid: Tensor) -> Tensor:
    return cost.new_empty((cost.shape[0], cost.shape[2]), dtype=torch.int64)


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


def match_costs(
    outputs_layer: dict,
    targets: dict,
    *,
    cost_class: float,
    cost_bbox: float,
    cost_giou: float,
    focal_alpha: float,
    cost_mask_ce: float = 5.0,
    cost_mask_dice: float = 5.0,
    mask_points: int | None = None,
    key: rng.IntLike = 0,
    keypoint_schema: tuple[int, ...] = (),
    keypoint_coefs: dict[str, float] | None = None,
) -> dict[str, Tensor]:
    """Per-image cost terms (B, Nq, T) and their weighted total; masks and keypoints count when both
    sides have them (keypoint costs weighted by `keypoint_coefs`, the keypoint loss weights)."""
    with torch.no_grad():
        logits = outputs_layer["pred_logits"].detach()
        pred = outputs_layer["pred_boxes"].detach()
        labels, valid = targets["labels"], targets["labels"] >= 0
        tgt = safe_target_boxes(targets["boxes"].to(pred.dtype), valid)
        gather = labels.clamp(min=0)[:, None, :].expand(-1, logits.shape[1], -1)
        costs = {
            "class": focal_class_cost(logits.gather(2, gather), focal_alpha),
            "bbox": (pred[:, :, None, :] - tgt[:, None, :, :]).abs().sum(-1),
            "giou": -box_ops.pairwise_giou(box_ops.cxcywh_to_xyxy(pred), box_ops.cxcywh_to_xyxy(tgt)),
        }
        total = cost_bbox * costs["bbox"] + cost_class * costs["class"] + cost_giou * costs["giou"]
        if "masks" in targets and outputs_layer.get("pred_masks") is not None:
            pm = outputs_layer["pred_masks"]
            pm = {k: v.detach() for k, v in pm.items()} if isinstance(pm, dict) else pm.detach()
            costs["mask_ce"], costs["mask_dice"] = mask_costs(pm, targets["masks"], mask_points, key)
            total = total + cost_mask_ce * costs["mask_ce"] + cost_mask_dice * costs["mask_dice"]
        if keypoint_schema and "keypoints" in targets and outputs_layer.get("pred_keypoints") is not None:
            found = kp_loss.costs(outputs_layer["pred_keypoints"], targets, keypoint_schema)
            coefs = keypoint_coefs or dict.fromkeys(kp_loss.TERMS, 1.0)
            for term in kp_loss.TERMS:
                costs[f"kp_{term}"] = found[f"kp_{term}"]
                total = total + coefs[term] * found[f"kp_{term}"]
        costs["total"] = total.float()
        return costs


def assign(total: Tensor, valid: Tensor, group_detr: int) -> Tensor:
    """Solve every (image, group) block of a (B, G*Q, T) cost: (B, G, T) query indices, -1 = none.

    Valid targets may sit anywhere in the T axis: columns are stably reordered valid-first for the
    solver (which reads a prefix of n_valid columns) and the answer is put back in slot order.
    """
    batch, num_queries, slots = total.shape
    if num_queries % group_detr:
        raise ValueError(f"pred_logits has {num_queries} queries, not a multiple of group_detr={group_detr}")
    per_group = num_queries // group_detr
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices  # (B, T) valid first
    cost = total.gather(2, order[:, None, :].expand(-1, num_queries, -1))
    cost = cost.reshape(batch * group_detr, per_group, slots)
    n_valid = valid.sum(1).repeat_interleave(group_detr)
    solved = hungarian(cost, n_valid).view(batch, group_detr, slots)
    idx = torch.full_like(solved, -1).scatter(2, order[:, None, :].expand(-1, group_detr, -1), solved)
    offset = (torch.arange(group_detr, device=idx.device) * per_group)[None, :, None]
    return torch.where(idx >= 0, idx + offset, idx)


def match(
    outputs_layer: dict,
    targets: dict,
    *,
    group_detr: int,
    cost_class: float,
    cost_bbox: float,
    cost_giou: float,
    focal_alpha: float,
    cost_mask_ce: float = 5.0,
    cost_mask_dice: float = 5.0,
    mask_points: int | None = None,
    key: rng.IntLike = 0,
    keypoint_schema: tuple[int, ...] = (),
    keypoint_coefs: dict[str, float] | None = None,
) -> Tensor:
    """(B, G, T) query indices (already offset by g*Q) matched to each target slot, -1 for padding."""
    costs = match_costs(
        outputs_layer,
        targets,
        cost_class=cost_class,
        cost_bbox=cost_bbox,
        cost_giou=cost_giou,
        focal_alpha=focal_alpha,
        cost_mask_ce=cost_mask_ce,
        cost_mask_dice=cost_mask_dice,
        mask_points=mask_points,
        key=key,
        keypoint_schema=keypoint_schema,
        keypoint_coefs=keypoint_coefs,
    )
    with torch.no_grad():
        return assign(costs["total"], targets["labels"] >= 0, group_detr)
