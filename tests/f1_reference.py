"""Today's loop-based F1 sweep (before the vectorised one), kept only as the tests' oracle.

`reference_f1_sweep(gt, detections, ...)` takes COCO result dicts and returns what `rfdetr_fn.eval.coco.f1_sweep`
must return, bit for bit: greedy matching one detection at a time per (image, class), then the sweep.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes (N,4) x (M,4)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _gt_items(gt: Mapping[str, Any], iou_type: str) -> dict[tuple[int, int], tuple[Any, np.ndarray]]:
    """(image_id, category_id) -> (xyxy boxes or RLE masks, crowd flags), as upstream's evaluation targets.

    Regular boxes are clamped to the image and dropped when empty (ConvertCoco); crowd regions come raw
    from the COCO annotations.
    """
    sizes = {img["id"]: (img.get("width"), img.get("height")) for img in gt["images"]}
    items: dict[tuple[int, int], list[Any]] = defaultdict(list)
    crowd: dict[tuple[int, int], list[bool]] = defaultdict(list)
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
        key = (ann["image_id"], ann["category_id"])
        items[key].append(box if iou_type == "bbox" else _gt_rle(ann, height, width))
        crowd[key].append(is_crowd)
    if iou_type == "bbox":
        return {k: (np.asarray(v, dtype=np.float64), np.asarray(crowd[k], bool)) for k, v in items.items()}
    return {k: (v, np.asarray(crowd[k], bool)) for k, v in items.items()}


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


def _pairwise_iou(dets: Sequence[Mapping[str, Any]], gt_items: Any, iou_type: str) -> np.ndarray:
    """IoU matrix (detections x GT); plain IoU for crowd regions too, as upstream's matcher."""
    if len(gt_items) == 0:
        return np.zeros((len(dets), 0))
    if iou_type == "bbox":
        xywh = np.asarray([d["bbox"] for d in dets], dtype=np.float64).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        return _box_iou(xyxy, gt_items)
    if any("segmentation" not in d for d in dets):
        raise ValueError("segm F1 needs 'segmentation' in every detection")
    ious = mask_utils.iou([d["segmentation"] for d in dets], list(gt_items), [0] * len(gt_items))
    return np.asarray(ious, dtype=np.float64).reshape(len(dets), len(gt_items))


def _match(
    scores: np.ndarray, ious: np.ndarray, crowd: np.ndarray, iou: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy highest-score-first matching in one image and class -> (sorted scores, is_tp, is_ignored).

    Each regular GT takes at most one detection (the best IoU >= iou among the unclaimed); a detection that
    matches no regular GT but overlaps a crowd region at IoU >= iou is ignored instead of counted as an FP.
    """
    order = np.argsort(-scores, kind="stable")
    scores, ious = scores[order], ious[order]
    tp = np.zeros(len(scores), dtype=bool)
    ignored = np.zeros(len(scores), dtype=bool)
    if ious.shape[1] == 0:
        return scores, tp, ignored
    claimed = np.zeros(ious.shape[1], dtype=bool)
    for i in range(len(scores)):
        candidate = np.where(crowd | claimed, -1.0, ious[i])
        j = int(np.argmax(candidate))
        if candidate[j] >= iou:
            tp[i] = True
            claimed[j] = True
        elif crowd.any() and ious[i][crowd].max() >= iou:
            ignored[i] = True
    return scores, tp, ignored


def reference_f1_sweep(
    gt: Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]],
    *,
    iou: float = 0.5,
    thresholds: int | Sequence[float] = 101,
    iou_type: str = "bbox",
) -> dict[str, float]:
    """Macro F1/precision/recall at the best-macro-F1 threshold -> {F1, precision, recall, threshold}.

    Upstream's sweep: for every threshold in linspace(0, 1, thresholds), keep detections with score >=
    threshold (scores compared as float32); per class, precision = TP/(TP+FP) (0 with no detections), recall =
    TP/num_gt; average over the classes with non-crowd ground truth. Ties between thresholds keep the lowest
    one. Everything is 0 when no class has ground truth. iou_type="segm" matches masks (upstream does for
    segmentation models).
    """
    grid = np.linspace(0.0, 1.0, thresholds) if isinstance(thresholds, int) else np.asarray(thresholds, float)
    if grid.size == 0:
        raise ValueError("thresholds must hold at least one value")
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type={iou_type!r} must be 'bbox' or 'segm'")
    gt_items = _gt_items(gt, iou_type)
    dets: dict[tuple[int, int], list[Mapping]] = defaultdict(list)
    for d in detections:
        dets[(d["image_id"], d["category_id"])].append(d)

    per_class: dict[int, dict[str, Any]] = defaultdict(lambda: {"scores": [], "tp": [], "ignored": [], "n_gt": 0})
    for key in set(gt_items) | set(dets):
        items, crowd = gt_items.get(key, ([], np.zeros(0, dtype=bool)))
        entry = per_class[key[1]]
        entry["n_gt"] += int((~crowd).sum())
        found = dets.get(key, [])
        if not found:
            continue
        scores = np.asarray([d["score"] for d in found], dtype=np.float32)
        s, tp, ign = _match(scores, _pairwise_iou(found, items, iou_type), crowd, iou)
        entry["scores"].append(s)
        entry["tp"].append(tp)
        entry["ignored"].append(ign)

    classes = sorted(per_class)
    with_gt = [c for c in classes if per_class[c]["n_gt"] > 0]
    if not with_gt:
        return {"F1": 0.0, "precision": 0.0, "recall": 0.0, "threshold": float(grid[0])}

    rows = []  # per class with GT: (precision, recall, f1) over the grid
    for c in with_gt:
        entry = per_class[c]
        n_gt = entry["n_gt"]
        scores = np.concatenate(entry["scores"]) if entry["scores"] else np.zeros(0, np.float32)
        tp = np.concatenate(entry["tp"]) if entry["tp"] else np.zeros(0, bool)
        keep = ~(np.concatenate(entry["ignored"]) if entry["ignored"] else np.zeros(0, bool))
        above = scores[None, :] >= grid[:, None]  # T, N (float32 scores vs float64 grid, as upstream)
        n_tp = (above & (tp & keep)[None]).sum(1)
        n_fp = (above & (~tp & keep)[None]).sum(1)
        precision = np.where(n_tp + n_fp > 0, n_tp / np.maximum(n_tp + n_fp, 1), 0.0)
        recall = n_tp / n_gt
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
