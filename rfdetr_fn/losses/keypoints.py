"""Keypoint matching costs and losses (upstream's GroupPose terms), batched over padded targets.

For a query and a target of class c, only the query's class-c slots count, and of those only the
class's keypoints (`active`). With a = w·h of the normalised target box, vis = labelled keypoints
(v > 0) and n = max(1, #vis), per (query, target):

    l1       = Σ_vis (|Δx| + |Δy|) / √a / n
    findable = mean over active keypoints of BCE-with-logits(channel 2, v > 0)
    visible  = mean over active keypoints of BCE-with-logits(channel 3, v = 2)
    nll      = Σ_vis [½ ((l11 Δx + l21 Δy)² + (l22 Δy)²) / a − (log l11 + log l22)] / n

where (log l11, l21, log l22) are channels 4..6 (Cholesky factor of the location's precision; no 2π
constant, no clamping: the NLL may be negative). The matcher adds all four to the box costs; the
criterion sums them over matched pairs and divides by the box normaliser. Non-finite predictions are
swapped for zeros before any op and masked out (their gradients are exact zeros), as upstream does.

Targets: `keypoints` (B, T, max(schema), 3) = normalised (x, y) and visibility v in {0, 1, 2}.
Targets of a class without keypoints (label >= len(schema)) contribute nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rfdetr_fn.model.keypoints import active_mask

TERMS = ("l1", "findable", "visible", "nll")


def target_info(targets: dict, schema: tuple[int, ...]) -> dict[str, Tensor]:
    """Per target slot (B, T[, K]): class in the schema, active and labelled keypoints, safe box area."""
    labels, boxes, kps = targets["labels"], targets["boxes"], targets["keypoints"]
    classes = len(schema)
    cls = labels.clamp(0, classes - 1)
    has = (labels >= 0) & (labels < classes)
    active = active_mask(schema).to(labels.device)[cls] & has[..., None]
    area = (boxes[..., 2] * boxes[..., 3]).to(torch.float32)
    eps = torch.finfo(torch.float32).eps
    valid_area = torch.isfinite(area) & (area > eps)
    v = kps[..., 2]
    labelled = active & (v > 0) & torch.isfinite(kps[..., :2]).all(-1) & valid_area[..., None]
    return {
        "cls": cls,
        "active": active,
        "labelled": labelled,
        "xy": torch.where(labelled[..., None], kps[..., :2], torch.zeros_like(kps[..., :2])),
        "findable": (v > 0).to(kps.dtype),
        "visible": (v > 1).to(kps.dtype),
        "area": torch.where(valid_area, area, torch.ones_like(area)),
    }


def _bce_mean(logit: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    mask = mask & torch.isfinite(logit)
    safe = torch.where(mask, logit, torch.zeros_like(logit))
    bce = F.binary_cross_entropy_with_logits(safe, target.to(safe.dtype).expand_as(safe), reduction="none")
    count = mask.sum(-1).clamp(min=1).to(safe.dtype)
    return torch.where(mask, bce, torch.zeros_like(bce)).sum(-1) / count


def terms(pred: Tensor, info: dict[str, Tensor]) -> dict[str, Tensor]:
    """The four terms for aligned predictions (..., K, 8) and target info broadcastable to (..., K)."""
    labelled = info["labelled"] & torch.isfinite(pred[..., :2]).all(-1)
    zero_xy = torch.zeros_like(pred[..., :2])
    delta = torch.where(labelled[..., None], pred[..., :2], zero_xy) - info["xy"]
    count = labelled.sum(-1).clamp(min=1).to(pred.dtype)
    area = info["area"].to(pred.dtype)
    l1 = torch.where(labelled, delta.abs().sum(-1), torch.zeros_like(delta[..., 0])).sum(-1)
    out = {"l1": l1 / area.sqrt() / count}
    out["findable"] = _bce_mean(pred[..., 2], info["findable"], info["active"])
    out["visible"] = _bce_mean(pred[..., 3], info["visible"], info["active"])
    chol = pred[..., 4:7].to(torch.float32)
    gauss = labelled & torch.isfinite(chol).all(-1)
    chol = torch.where(gauss[..., None], chol, torch.zeros_like(chol))
    dx, dy = (torch.where(gauss[..., None], delta, torch.zeros_like(delta)).to(torch.float32)).unbind(-1)
    log_l11, l21, log_l22 = chol.unbind(-1)
    u0 = log_l11.exp() * dx + l21 * dy
    u1 = log_l22.exp() * dy
    nll = 0.5 * (u0 * u0 + u1 * u1) / area.to(torch.float32)[..., None] - (log_l11 + log_l22)
    nll = torch.where(gauss & torch.isfinite(nll), nll, torch.zeros_like(nll))
    out["nll"] = (nll.sum(-1) / gauss.sum(-1).clamp(min=1).to(torch.float32)).to(pred.dtype)
    return out


def _class_slots(pred: Tensor, cls: Tensor, schema: tuple[int, ...]) -> Tensor:
    """(B, N, C*Kmax, 8) padded predictions, (B, M) classes -> the class's slots: (B, N, M, Kmax, 8)."""
    b, n = pred.shape[:2]
    width = max(schema)
    per_class = pred.unflatten(2, (len(schema), width))
    idx = cls[:, None, :, None, None].expand(b, n, -1, width, pred.shape[-1])
    return per_class.gather(2, idx)


def costs(pred_keypoints: Tensor, targets: dict, schema: tuple[int, ...]) -> dict[str, Tensor]:
    """Pairwise (B, Nq, T) costs `kp_l1`, `kp_findable`, `kp_visible`, `kp_nll` (no gradient)."""
    with torch.no_grad():
        info = target_info(targets, schema)
        pred = _class_slots(pred_keypoints.detach(), info["cls"], schema)  # (B, Nq, T, K, 8)
        per_query = {k: v[:, None] for k, v in info.items()}  # broadcast over the query axis
        return {f"kp_{k}": v for k, v in terms(pred, per_query).items()}


def losses(pred_keypoints: Tensor, targets: dict, pairs: dict, num_boxes: Tensor, schema) -> dict[str, Tensor]:
    """`loss_keypoints_{l1,findable,visible,nll}` summed over matched pairs, divided by num_boxes.

    `pairs` is criterion.gather_pairs' result (matched query per (group, target) slot, flattened)."""
    batch, groups_slots = pairs["query"].shape
    slots = targets["labels"].shape[1]
    groups = groups_slots // slots
    tiled = {
        "labels": targets["labels"][:, None].expand(-1, groups, -1).reshape(batch, -1),
        "boxes": targets["boxes"][:, None].expand(-1, groups, -1, -1).reshape(batch, -1, 4),
        "keypoints": targets["keypoints"][:, None].expand(-1, groups, -1, -1, -1).flatten(1, 2),
    }
    info = target_info(tiled, schema)
    q = pairs["query"][:, :, None, None].expand(-1, -1, *pred_keypoints.shape[2:])
    per_class = pred_keypoints.gather(1, q).unflatten(2, (len(schema), max(schema)))  # (B, M, C, K, 8)
    idx = info["cls"][:, :, None, None, None].expand(-1, -1, 1, *per_class.shape[3:])
    found = terms(per_class.gather(2, idx)[:, :, 0], info)  # each pair against its own target
    matched = pairs["matched"]
    return {
        f"loss_keypoints_{k}": torch.where(matched, found[k], torch.zeros_like(found[k])).sum() / num_boxes
        for k in TERMS
    }
