"""Raw outputs -> per-image detections at the original image size (upstream's PostProcess).

Scores are sigmoids over every (query, class) pair, including the extra last class column; the top
`num_select` pairs win, ties going to the lower flat index (a stable descending sort), so results do
not depend on the backend's top-k tie rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rfdetr_fn.model import keypoints
from rfdetr_fn.model.boxes import cxcywh_to_xyxy

_MASK_CHUNK = 32  # masks are upsampled this many at a time: full-size float logits of 300 queries are large


def select(logits: Tensor, num_select: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, Q, C) logits -> scores, labels, query indices, each (B, K) with K = min(num_select, Q*C)."""
    prob = logits.sigmoid().flatten(1)
    k = min(num_select, prob.shape[1])
    scores, idx = torch.sort(prob, dim=1, descending=True, stable=True)
    scores, idx = scores[:, :k], idx[:, :k]
    c = logits.shape[2]
    return scores, idx % c, idx // c


def postprocess_kwargs(cfg) -> dict:
    """The keypoint arguments of `postprocess` for a ModelConfig (none for box/mask models)."""
    if not cfg.keypoints:
        return {}
    return {"keypoint_schema": cfg.num_keypoints_per_class, "trace_alpha": cfg.postprocess_trace_alpha}


def postprocess(
    outputs: dict,
    target_sizes: Tensor,
    num_select: int,
    *,
    keypoint_schema: tuple[int, ...] = (),
    trace_alpha: float = 0.2,
) -> list[dict[str, Tensor]]:
    """Top-k detections per image: scores, labels, boxes (xyxy pixels, clamped to the image)[, masks]
    [, keypoints].

    `target_sizes` (B, 2) holds each original (height, width). Masks, when present, are the selected
    queries' logits resized bilinearly to the original size and thresholded at 0 -> bool (K, 1, H, W).
    Keypoint models (`pred_keypoints` and a `keypoint_schema`) add `keypoints` (K, max(schema), 3) pixel
    x, y and confidence and `keypoint_precision_cholesky`, and their scores are fused with the
    keypoint uncertainty (`trace_alpha`, see `keypoints.select_keypoints`); the order stays the
    selection order, as upstream.
    """
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    if target_sizes.ndim != 2 or target_sizes.shape != (logits.shape[0], 2):
        raise ValueError(
            f"target_sizes must be (batch={logits.shape[0]}, 2) as (h, w), got {tuple(target_sizes.shape)}"
        )
    scores, labels, queries = select(logits, num_select)
    xyxy = torch.gather(cxcywh_to_xyxy(boxes), 1, queries[..., None].expand(-1, -1, 4))
    h, w = target_sizes.unbind(1)
    scale = torch.stack([w, h, w, h], 1).to(xyxy.dtype)[:, None, :]
    xyxy = torch.minimum((xyxy * scale).clamp_min(0.0), scale)
    masks = outputs.get("pred_masks")
    kps = outputs.get("pred_keypoints")
    if kps is not None and keypoint_schema:
        kps, precision, scores = keypoints.select_keypoints(
            kps, queries, labels, scores, target_sizes, keypoint_schema, trace_alpha
        )
    results = []
    for i in range(logits.shape[0]):
        res = {"scores": scores[i], "labels": labels[i], "boxes": xyxy[i]}
        if kps is not None and keypoint_schema:
            res["keypoints"], res["keypoint_precision_cholesky"] = kps[i], precision[i]
        if isinstance(masks, Tensor):
            size = (int(target_sizes[i, 0]), int(target_sizes[i, 1]))
            sel = masks[i][queries[i]][:, None]
            res["masks"] = (
                torch.cat(
                    [
                        F.interpolate(chunk, size=size, mode="bilinear", align_corners=False) > 0.0
                        for chunk in sel.split(_MASK_CHUNK)
                    ]
                )
                if sel.shape[0]
                else sel.new_zeros((0, 1, *size), dtype=torch.bool)
            )
        results.append(res)
    return results
