"""Upstream's macro-F1 sweep (evaluation/matching.py + evaluation/f1_sweep.py semantics), vectorised.

Greedy matching is sequential only within one (image, class) group, so it runs one detection rank at a time
with every group at once; pair IoUs are computed for same-group pairs only. Same numbers as the loop it
replaced (tests/f1_reference.py), tested equal on random cases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pycocotools import mask as mask_utils

from rfdetr_fn.eval.detections import Detections, check_gt, check_image_ids
from rfdetr_fn.model.boxes import elementwise_iou

__all__ = ["f1_sweep"]


@dataclass(frozen=True)
class _GroundTruth:
    """F1's view of the GT as columns: upstream's evaluation targets (see `_f1_ground_truth`)."""

    image_id: np.ndarray
    category_id: np.ndarray
    xyxy: np.ndarray
    crowd: np.ndarray
    rles: list[dict[str, Any]] | None


def _f1_ground_truth(gt: Mapping[str, Any], iou_type: str) -> _GroundTruth:
    """Regular boxes clamped to the image and dropped when empty (upstream's ConvertCoco); crowd regions raw."""
    sizes = {img["id"]: (img.get("width"), img.get("height")) for img in gt["images"]}
    ids, cats, boxes, crowd, rles = [], [], [], [], []
    for ann in gt["annotations"]:
        x, y, w, h = (float(v) for v in ann["bbox"])
        box = [x, y, x + w, y + h]
        is_crowd = bool(ann.get("iscrowd", 0))
        width, height = sizes.get(ann["image_id"], (None, None))
        if not is_crowd:
            if width is not None and height is not None:
                box = [min(max(v, 0.0), lim) for v, lim in zip(box, (width, height, width, height))]
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
        ids.append(ann["image_id"])
        cats.append(ann["category_id"])
        boxes.append(box)
        crowd.append(is_crowd)
        if iou_type == "segm":
            rles.append(_gt_rle(ann, height, width))
    return _GroundTruth(
        np.asarray(ids, np.int64),
        np.asarray(cats, np.int64),
        np.asarray(boxes, np.float64).reshape(-1, 4),
        np.asarray(crowd, bool),
        rles if iou_type == "segm" else None,
    )


def _gt_rle(ann: Mapping[str, Any], height: int | None, width: int | None) -> dict[str, Any]:
    """A GT annotation's mask as compressed RLE (polygons and uncompressed RLE converted)."""
    seg = ann.get("segmentation")
    if not seg:
        raise ValueError(f"annotation id={ann.get('id')} has no 'segmentation' (needed for segm F1)")
    if isinstance(seg, dict) and isinstance(seg.get("counts"), (str, bytes)):
        return seg
    if height is None or width is None:
        raise ValueError(f"image id={ann['image_id']} needs 'height' and 'width' to rasterise its masks")
    rles = mask_utils.frPyObjects(seg, int(height), int(width))
    return mask_utils.merge(rles) if isinstance(rles, list) else rles


def _pairs(det_group: np.ndarray, gt_group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (detection, GT) index pair of the same group; GT in annotation order within a group."""
    gt_order = np.argsort(gt_group, kind="stable")
    sorted_groups = gt_group[gt_order]
    start = np.searchsorted(sorted_groups, det_group, side="left")
    count = np.searchsorted(sorted_groups, det_group, side="right") - start
    det_idx = np.repeat(np.arange(len(det_group)), count)
    offset = np.arange(len(det_idx)) - np.repeat(np.cumsum(count) - count, count)
    return det_idx, gt_order[np.repeat(start, count) + offset]


def _pair_iou(dets: Detections, truth: _GroundTruth, di: np.ndarray, gi: np.ndarray, iou_type: str) -> np.ndarray:
    """Plain IoU of each pair (crowd regions too, as upstream's matcher); 0 for an empty union."""
    if iou_type == "bbox":
        xyxy = np.concatenate([dets.bbox[:, :2], dets.bbox[:, :2] + dets.bbox[:, 2:]], axis=1)
        iou, union = elementwise_iou(torch.from_numpy(xyxy[di]), torch.from_numpy(truth.xyxy[gi]))
        return torch.where(union > 0, iou, 0.0).numpy()
    if dets.rles is None:
        raise ValueError("segm F1 needs 'segmentation' in every detection")
    out = np.zeros(len(di))
    order = np.argsort(dets.image_id[di], kind="stable")  # one mask-IoU call per image
    bounds = np.flatnonzero(np.diff(dets.image_id[di][order])) + 1
    for chunk in np.split(order, bounds):
        if chunk.size == 0:
            continue
        d_u, d_inv = np.unique(di[chunk], return_inverse=True)
        g_u, g_inv = np.unique(gi[chunk], return_inverse=True)
        ious = mask_utils.iou([dets.rles[k] for k in d_u], [truth.rles[k] for k in g_u], [0] * len(g_u))
        out[chunk] = np.asarray(ious, np.float64).reshape(len(d_u), len(g_u))[d_inv, g_inv]
    return out


def _greedy_match(dets: Detections, truth: _GroundTruth, iou: float, iou_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Upstream's greedy matching for all (image, class) groups at once -> (is_tp, is_ignored) per detection.

    Within a group, detections go highest score first (float32 scores, ties in input order); each takes the
    unclaimed regular GT of highest IoU >= iou (ties: first in annotation order). A detection that matches
    nothing but overlaps a crowd region at IoU >= iou is ignored rather than an FP. Detections of equal rank
    in different groups never compete, so the greedy loop runs over ranks, each rank vectorised over groups.
    """
    n = len(dets)
    tp, ignored = np.zeros(n, bool), np.zeros(n, bool)
    if n == 0 or len(truth.crowd) == 0:
        return tp, ignored
    images = np.union1d(dets.image_id, truth.image_id)
    cats = np.union1d(dets.category_id, truth.category_id)

    def group(image_id: np.ndarray, cat: np.ndarray) -> np.ndarray:
        return np.searchsorted(images, image_id) * len(cats) + np.searchsorted(cats, cat)

    det_group = group(dets.image_id, dets.category_id)
    order = np.lexsort((-dets.score.astype(np.float32), det_group))  # stable: ties keep input order
    first = np.searchsorted(det_group[order], det_group[order], side="left")
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - first
    di, gi = _pairs(det_group, group(truth.image_id, truth.category_id))
    ious = _pair_iou(dets, truth, di, gi, iou_type)
    hit = ious >= iou
    on_crowd = hit & truth.crowd[gi]
    cand = np.flatnonzero(hit & ~truth.crowd[gi])
    cand = cand[np.lexsort((gi[cand], -ious[cand], di[cand], rank[di[cand]]))]  # best GT first per detection
    claimed = np.zeros(len(truth.crowd), bool)
    cand_rank = rank[di[cand]]
    for r in np.unique(cand_rank):
        lo, hi = np.searchsorted(cand_rank, [r, r + 1])
        live = cand[lo:hi][~claimed[gi[cand[lo:hi]]]]
        if live.size == 0:
            continue
        _, firsts = np.unique(di[live], return_index=True)
        tp[di[live[firsts]]] = True
        claimed[gi[live[firsts]]] = True
    ignored[di[on_crowd]] = True
    return tp, ignored & ~tp


def f1_sweep(
    gt: Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]] | Detections,
    *,
    iou: float = 0.5,
    thresholds: int | Sequence[float] = 101,
    iou_type: Literal["bbox", "segm"] = "bbox",
) -> dict[str, float]:
    """Macro F1/precision/recall at the best-macro-F1 threshold -> {F1, precision, recall, threshold}.

    Upstream's sweep: for every threshold in linspace(0, 1, thresholds), keep detections with score >=
    threshold (scores compared as float32); per class, precision = TP/(TP+FP) (0 with no detections), recall =
    TP/num_gt; average over the classes with non-crowd ground truth. Ties between thresholds keep the lowest
    one. Everything is 0 when no class has ground truth. iou_type="segm" matches masks (upstream does for
    segmentation models).
    """
    check_gt(gt)
    dets = Detections.from_coco(detections)
    check_image_ids(gt, dets)
    grid = np.linspace(0.0, 1.0, thresholds) if isinstance(thresholds, int) else np.asarray(thresholds, float)
    if grid.size == 0:
        raise ValueError("thresholds must hold at least one value")
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type={iou_type!r} must be 'bbox' or 'segm'")
    truth = _f1_ground_truth(gt, iou_type)
    tp, ignored = _greedy_match(dets, truth, iou, iou_type)
    regular = truth.category_id[~truth.crowd]
    with_gt = np.unique(regular)
    if with_gt.size == 0:
        return {"F1": 0.0, "precision": 0.0, "recall": 0.0, "threshold": float(grid[0])}
    scores = dets.score.astype(np.float32).astype(np.float64)
    keep = ~ignored
    rows = []  # per class with GT: (precision, recall, f1) over the grid
    for c in with_gt:
        mine = (dets.category_id == c) & keep
        n_tp = _count_at_least(scores[mine & tp], grid)
        n_fp = _count_at_least(scores[mine & ~tp], grid)
        precision = np.where(n_tp + n_fp > 0, n_tp / np.maximum(n_tp + n_fp, 1), 0.0)
        recall = n_tp / int((regular == c).sum())
        denom = precision + recall
        f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1.0), 0.0)
        rows.append((precision, recall, f1))
    precision = np.mean([r[0] for r in rows], axis=0)
    recall = np.mean([r[1] for r in rows], axis=0)
    f1 = np.mean([r[2] for r in rows], axis=0)
    best = int(np.argmax(f1))  # first maximum = lowest threshold
    return {
        "F1": float(f1[best]),
        "precision": float(precision[best]),
        "recall": float(recall[best]),
        "threshold": float(grid[best]),
    }


def _count_at_least(scores: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """For each threshold t of the grid, how many scores are >= t."""
    return len(scores) - np.searchsorted(np.sort(scores), grid, side="left")
