"""Set criterion: IA-BCE, L1 and GIoU box losses (+ point-sampled mask BCE and dice) over matched pairs.

Every matched layer (final, aux `_i`, encoder `_enc`) is matched first, then scored, like upstream
(so the random mask points are drawn in the same order). Matched pairs are gathered with the padded
(B, G, T) index tensor and padding slots are masked out with `torch.where`, so the whole criterion is
one graph with static shapes, and `torch.func.grad` / `torch.compile(fullgraph=True)` trace it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rfdetr_fn import rng
from rfdetr_fn.config import ModelConfig
from rfdetr_fn.losses import keypoints as kp_loss
from rfdetr_fn.losses.config import LossConfig
from rfdetr_fn.losses.matcher import (
    FOCAL_GAMMA,
    MatchCosts,
    match_layers,
    nearest_index,
    point_sample,
    safe_target_boxes,
    unpack_pred_masks,
)
from rfdetr_fn.model import boxes as box_ops

OVERSAMPLE = 3
IMPORTANCE = 0.75


def layers(outputs: dict) -> list[tuple[str, dict]]:
    """(suffix, outputs) for the final layer, each aux layer and the encoder outputs, in upstream's order."""
    out = [("", outputs)]
    out += [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs") or [])]
    if outputs.get("enc_outputs") is not None:
        out.append(("_enc", outputs["enc_outputs"]))
    return out


def check_targets(targets: dict, outputs: dict, masks: bool, schema: tuple[int, ...] = ()) -> None:
    """Shape/dtype checks (static under compile), naming the offending field."""
    logits = outputs.get("pred_logits")
    if logits is None or outputs.get("pred_boxes") is None:
        raise ValueError("outputs must hold 'pred_logits' and 'pred_boxes'")
    labels, boxes = targets.get("labels"), targets.get("boxes")
    if labels is None or labels.dim() != 2 or labels.dtype != torch.int64:
        raise ValueError("targets['labels'] must be an int64 (B, T) tensor with -1 in padding slots")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"targets['labels'] has batch {labels.shape[0]}, outputs have {logits.shape[0]}")
    if boxes is None or tuple(boxes.shape) != (*labels.shape, 4) or not boxes.is_floating_point():
        raise ValueError(f"targets['boxes'] must be float {(*labels.shape, 4)} normalised cxcywh")
    if masks:
        m = targets.get("masks")
        if m is None or m.dim() != 4 or tuple(m.shape[:2]) != tuple(labels.shape):
            raise ValueError(f"targets['masks'] must be bool (B, T, H, W) with (B, T) = {tuple(labels.shape)}")
    if schema:
        kp, shape = targets.get("keypoints"), (*labels.shape, max(schema), 3)
        if kp is None or tuple(kp.shape) != shape or not kp.is_floating_point():
            raise ValueError(f"targets['keypoints'] must be float {shape}: normalised x, y and visibility 0/1/2")
        if outputs.get("pred_keypoints") is None:
            raise ValueError("keypoint models' outputs must hold 'pred_keypoints'")


def default_num_boxes(labels: Tensor, groups: int) -> Tensor:
    """Valid targets x groups, at least 1 (the single-process normaliser)."""
    return ((labels >= 0).sum() * groups).to(torch.float32).clamp(min=1.0)


def gather_pairs(layer: dict, targets: dict, idx: Tensor) -> dict[str, Tensor]:
    """Flatten (B, G, T) matches to M = G*T slots per image and gather both sides of every pair."""
    batch, groups, slots = idx.shape
    flat = idx.reshape(batch, groups * slots)
    matched = flat >= 0
    query = flat.clamp(min=0)
    labels = targets["labels"][:, None, :].expand(-1, groups, -1).reshape(batch, -1)
    boxes = targets["boxes"][:, None].expand(-1, groups, -1, -1).reshape(batch, -1, 4)
    pred = layer["pred_boxes"]
    return {
        "matched": matched,
        "query": query,
        "labels": labels.clamp(min=0),
        "tgt_boxes": safe_target_boxes(boxes.to(pred.dtype), matched),
        "src_boxes": pred.gather(1, query[..., None].expand(-1, -1, 4)),
    }


def ia_bce_loss(logits: Tensor, pairs: dict, num_boxes: Tensor, alpha: float) -> Tensor:
    """IoU-aware BCE: soft target t = clamp(p^a * IoU^(1-a), 0.01) (detached) at matched (query, class),
    p^2-weighted BCE towards 0 elsewhere (the p^2 weight keeps its gradient)."""
    batch, num_queries, num_classes = logits.shape
    prob = logits.sigmoid()
    matched = pairs["matched"]
    position = pairs["query"] * num_classes + pairs["labels"]  # (B, M) into the flattened (Nq*C) axis
    with torch.no_grad():
        iou, _ = box_ops.elementwise_iou(
            box_ops.cxcywh_to_xyxy(pairs["src_boxes"].detach()), box_ops.cxcywh_to_xyxy(pairs["tgt_boxes"])
        )
        p = prob.detach().flatten(1).gather(1, position)
        t = (p.pow(alpha) * iou.pow(1 - alpha)).clamp(min=0.01)
        t = torch.where(matched, t, torch.zeros_like(t))
        # Each query is matched at most once, so scatter_add places every t in its own cell.
        pos_w = torch.zeros_like(prob).flatten(1).scatter_add(1, position, t).view_as(prob)
        hits = torch.zeros_like(prob).flatten(1).scatter_add(1, position, matched.to(prob.dtype))
        positive = hits.view_as(prob) > 0
    neg_w = torch.where(positive, 1 - pos_w, prob**FOCAL_GAMMA)
    loss = neg_w * logits - F.logsigmoid(logits) * (pos_w + neg_w)
    return loss.sum() / num_boxes


def focal_loss(logits: Tensor, pairs: dict, num_boxes: Tensor, alpha: float) -> Tensor:
    """Plain sigmoid focal loss (upstream's `ia_bce_loss=False` path): one-hot targets at matched (query,
    class), zeros elsewhere (the no-object column is never a positive); summed, divided by num_boxes."""
    position = pairs["query"] * logits.shape[-1] + pairs["labels"]
    hits = torch.zeros_like(logits).flatten(1).scatter_add(1, position, pairs["matched"].to(logits.dtype))
    target = (hits.view_as(logits) > 0).to(logits.dtype)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * ce * (1 - p_t) ** FOCAL_GAMMA).sum() / num_boxes


def class_error(logits: Tensor, pairs: dict) -> Tensor:
    """100 - top-1 accuracy (%) over matched pairs (logging only)."""
    with torch.no_grad():
        picked = logits.detach().gather(1, pairs["query"][..., None].expand(-1, -1, logits.shape[-1]))
        correct = (picked.argmax(-1) == pairs["labels"]) & pairs["matched"]
        count = pairs["matched"].sum().clamp(min=1).to(logits.dtype)
        return 100 - correct.sum().to(logits.dtype) * (100.0 / count)


def cardinality_error(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean |#queries with max sigmoid > 0.5 - #targets| per image (logging only)."""
    with torch.no_grad():
        predicted = (logits.detach().sigmoid().amax(-1) > 0.5).sum(1).to(torch.float32)
        return (predicted - (labels >= 0).sum(1).to(torch.float32)).abs().mean()


def box_losses(pairs: dict, num_boxes: Tensor) -> dict[str, Tensor]:
    """Summed L1 (cxcywh) and 1 - GIoU over matched pairs, each divided by num_boxes."""
    src, tgt, matched = pairs["src_boxes"], pairs["tgt_boxes"], pairs["matched"]
    l1 = (src - tgt).abs().sum(-1)
    giou = box_ops.elementwise_giou(box_ops.cxcywh_to_xyxy(src), box_ops.cxcywh_to_xyxy(tgt))
    zero = torch.zeros_like(l1)
    return {
        "loss_bbox": torch.where(matched, l1, zero).sum() / num_boxes,
        "loss_giou": torch.where(matched, 1 - giou, zero).sum() / num_boxes,
    }


def uncertain_points(logits: Tensor, num_points: int, key: rng.IntLike = 0) -> Tensor:
    """PointRend points for (N, 1, h, w) logits: the 75% most uncertain of 3P uniform ones + 25% uniform."""
    n = logits.shape[0]
    coords = rng.uniform(rng.mix(key, 0), (n, num_points * OVERSAMPLE, 2), device=logits.device)
    uncertainty = -point_sample(logits, coords)[:, 0].abs()
    keep = int(IMPORTANCE * num_points)
    top = uncertainty.topk(keep, dim=1).indices
    chosen = coords.gather(1, top[..., None].expand(-1, -1, 2))
    extra = rng.uniform(rng.mix(key, 1), (n, num_points - keep, 2), device=logits.device)
    return torch.cat([chosen, extra], dim=1)


def matched_mask_logits(pred_masks: dict | Tensor, query: Tensor) -> Tensor:
    """(B, M, h, w) mask logits of the queries in `query` (B, M), from the sparse dict or dense masks."""
    packed = unpack_pred_masks(pred_masks)
    if isinstance(packed, tuple):
        spatial, queries, bias = packed
        picked = queries.gather(1, query[..., None].expand(-1, -1, queries.shape[-1]))
        return torch.einsum("bchw,bmc->bmhw", spatial, picked) + bias
    h, w = packed.shape[-2:]
    return packed.gather(1, query[:, :, None, None].expand(-1, -1, h, w))


def mask_losses(
    pred_masks: dict | Tensor,
    target_masks: Tensor,
    idx: Tensor,
    num_boxes: Tensor,
    *,
    point_ratio: int,
    key: rng.IntLike = 0,
) -> dict[str, Tensor]:
    """Point-sampled mean BCE and dice of every matched mask; padding slots give exact zeros.

    With no match at all the result is a zero that is still connected to the mask head's outputs.
    """
    batch, groups, slots = idx.shape
    flat = idx.reshape(batch, groups * slots)
    matched = flat >= 0
    logits = matched_mask_logits(pred_masks, flat.clamp(min=0))  # (B, M, h, w)
    h, w = logits.shape[-2:]
    num_points = max(h, h * w // point_ratio)
    stacked = logits.reshape(-1, 1, h, w)
    with torch.no_grad():
        coords = uncertain_points(stacked.detach(), num_points, key)  # (B*M, P, 2)
    point_logits = point_sample(stacked, coords)[:, 0].view(batch, groups * slots, num_points)
    with torch.no_grad():
        height, width = target_masks.shape[-2:]
        pixel = nearest_index(coords, height, width).view(batch, groups, slots, num_points)
        pixel = pixel.transpose(1, 2).reshape(batch, slots, groups * num_points)  # slot (g, t) reads mask t
        labels = target_masks.flatten(2).gather(2, pixel).view(batch, slots, groups, num_points)
        labels = labels.transpose(1, 2).reshape(batch, groups * slots, num_points).to(point_logits.dtype)
    ce = F.binary_cross_entropy_with_logits(point_logits, labels, reduction="none").mean(-1)
    prob = point_logits.sigmoid()
    dice = 1 - (2 * (prob * labels).sum(-1) + 1) / (prob.sum(-1) + labels.sum(-1) + 1)
    zero = torch.zeros_like(ce)
    return {
        "loss_mask_ce": torch.where(matched, ce, zero).sum() / num_boxes,
        "loss_mask_dice": torch.where(matched, dice, zero).sum() / num_boxes,
    }


def match_all(
    outputs: dict, targets: dict, cfg: ModelConfig, lcfg: LossConfig, *, train: bool, key: rng.IntLike = 0
) -> list[Tensor]:
    """Hungarian matches of every loss layer (final, aux, encoder), each (B, G, T) query indices, -1 = none.

    No gradient flows through them; research code computes them once and passes them to `criterion`
    as a stop-gradient input (vmapped ensembles, per-example gradients). `key` drives the random mask
    points of segmentation costs (see `rfdetr_fn.rng`).
    """
    use_masks = cfg.segmentation_head
    schema = cfg.num_keypoints_per_class if cfg.keypoints else ()
    groups = cfg.group_detr if train else 1
    match_targets = {k: targets[k] for k in ("labels", "boxes")}
    match_targets |= {"masks": targets["masks"]} if use_masks else {}
    match_targets |= {"keypoints": targets["keypoints"]} if schema else {}
    matched_layers = layers(outputs)
    costs = []
    for suffix, layer in matched_layers:
        points = None
        if use_masks:
            if layer.get("pred_masks") is None:
                raise ValueError(f"segmentation outputs{suffix or ' (final)'} lack 'pred_masks'")
            source = unpack_pred_masks(layer["pred_masks"])
            source = source[0] if isinstance(source, tuple) else source
            points = source.shape[-2] * source.shape[-1] // lcfg.mask_point_sample_ratio
        costs.append(MatchCosts.from_loss(lcfg, mask_points=points, keypoint_schema=schema))
    layer_outputs = [layer for _, layer in matched_layers]
    keys = [rng.mix(key, j, 0) if use_masks else 0 for j in range(len(layer_outputs))]
    return match_layers(layer_outputs, match_targets, costs, group_detr=groups, backend=lcfg.matcher_backend, keys=keys)


def criterion(
    outputs: dict,
    targets: dict,
    cfg: ModelConfig,
    lcfg: LossConfig,
    *,
    train: bool,
    num_boxes: Tensor | float | None = None,
    indices: list[Tensor] | None = None,
    key: rng.IntLike = 0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted total loss and upstream's loss dict (diagnostics class_error/cardinality_error excluded
    from the total). `num_boxes` defaults to valid targets x G (G = group_detr in training, else 1);
    a distributed caller passes its all-reduced value instead. `indices`: precomputed `match_all`.
    `key` drives the random mask points (segmentation only; see `rfdetr_fn.rng`): the train step passes a
    fresh one every step."""
    use_masks = cfg.segmentation_head
    schema = cfg.num_keypoints_per_class if cfg.keypoints else ()
    check_targets(targets, outputs, use_masks, schema)
    groups = cfg.group_detr if train else 1
    labels = targets["labels"]
    if num_boxes is None:
        num_boxes = default_num_boxes(labels, groups)
    num_boxes = torch.as_tensor(num_boxes, dtype=torch.float32, device=outputs["pred_logits"].device)
    matched_layers = layers(outputs)
    if indices is None:
        indices = match_all(outputs, targets, cfg, lcfg, train=train, key=key)
    losses: dict[str, Tensor] = {}
    for j, ((suffix, layer), idx) in enumerate(zip(matched_layers, indices)):
        pairs = gather_pairs(layer, targets, idx)
        classification = ia_bce_loss if lcfg.ia_bce_loss else focal_loss
        losses["loss_ce" + suffix] = classification(layer["pred_logits"], pairs, num_boxes, lcfg.focal_alpha)
        if not suffix:
            losses["class_error"] = class_error(layer["pred_logits"], pairs)
        for name, value in box_losses(pairs, num_boxes).items():
            losses[name + suffix] = value
        losses["cardinality_error" + suffix] = cardinality_error(layer["pred_logits"], labels)
        if schema:
            found = kp_loss.losses(layer["pred_keypoints"], targets, pairs, num_boxes, schema)
            losses.update({key + suffix: value for key, value in found.items()})
        if use_masks:
            found = mask_losses(
                layer["pred_masks"],
                targets["masks"],
                idx,
                num_boxes,
                point_ratio=lcfg.mask_point_sample_ratio,
                key=rng.mix(key, j, 1),
            )
            for name, value in found.items():
                losses[name + suffix] = value
    total = torch.stack([losses[k] * lcfg.weights[k] for k in losses if k in lcfg.weights]).sum()
    return total, losses
