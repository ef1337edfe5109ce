"""Detection metrics: COCO mAP/mAR (bbox and segm), per-class AP and upstream's macro-F1 sweep.

COCO numbers come from COCOeval itself (pycocotools, or faster_coco_eval: same numbers, faster) run on
in-memory dicts: no JSON files, no torchmetrics. Ground truth is a COCO dict in label space (category ids
are the model's labels); predictions are postprocess outputs (xyxy boxes in original pixels), kept as
columns (`Detections`) so that a COCO-sized validation set costs arrays, not a million Python dicts.

Both backends get upstream's threshold grids (`UPSTREAM_IOU_THRESHOLDS`, `UPSTREAM_RECALL_THRESHOLDS`):
upstream builds them with torchmetrics' float32 `torch.linspace(...).tolist()`, so 0.55 is 0.550000011920929
and 36 of the 101 recall steps sit just above k/100. Stock pycocotools uses float64 `np.linspace`; the two
read a class's precision at different points when its recall or a match's IoU lands exactly on a grid value.

The summary stats are read straight from COCOeval's precision/recall arrays instead of `summarize()`, because
pycocotools' summarize hard-codes maxDets=100 for AP@[.5:.95] and reports -1 when max_dets=(1, 10, 500).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pycocotools import mask as mask_utils

from rfdetr_fn.boxes import elementwise_iou

Backend = Literal["pycocotools", "faster_coco_eval"]
IouType = Literal["bbox", "segm"]

__all__ = [
    "UPSTREAM_IOU_THRESHOLDS",
    "UPSTREAM_RECALL_THRESHOLDS",
    "Detections",
    "detections_to_coco",
    "coco_map",
    "f1_sweep",
    "Evaluator",
]

# torchmetrics' defaults, which upstream hands to every backend: float32 values widened to float64.
UPSTREAM_IOU_THRESHOLDS = np.asarray(torch.linspace(0.5, 0.95, 10, dtype=torch.float32).tolist())
UPSTREAM_RECALL_THRESHOLDS = np.asarray(torch.linspace(0.0, 1.0, 101, dtype=torch.float32).tolist())


# --------------------------------------------------------------------------------------------------
# predictions -> columns


@dataclass(frozen=True)
class Detections:
    """Detections as columns: image_id, category_id (N,) int64; bbox (N,4) xywh float64; score (N,) float64;
    rles: N COCO RLE dicts (str counts) or None for box-only predictions."""

    image_id: np.ndarray
    category_id: np.ndarray
    bbox: np.ndarray
    score: np.ndarray
    rles: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.score)

    @classmethod
    def empty(cls) -> Detections:
        ints = np.zeros(0, np.int64)
        return cls(ints, ints, np.zeros((0, 4)), np.zeros(0))

    @classmethod
    def from_coco(cls, results: Sequence[Mapping[str, Any]]) -> Detections:
        """From COCO result dicts (image_id, category_id, bbox xywh, score[, segmentation])."""
        if isinstance(results, Detections):
            return results
        if not results:
            return cls.empty()
        rles = [r["segmentation"] for r in results] if all("segmentation" in r for r in results) else None
        return cls(
            np.asarray([r["image_id"] for r in results], np.int64),
            np.asarray([r["category_id"] for r in results], np.int64),
            np.asarray([r["bbox"] for r in results], np.float64).reshape(-1, 4),
            np.asarray([r["score"] for r in results], np.float64),
            rles,
        )

    @classmethod
    def from_predictions(cls, image_ids: Sequence[int], predictions: Sequence[Mapping[str, Any]]) -> Detections:
        """From postprocess outputs: xyxy -> xywh, masks -> RLE (every detection kept: no score threshold)."""
        if len(image_ids) != len(predictions):
            raise ValueError(f"got {len(image_ids)} image_ids for {len(predictions)} predictions")
        parts = [cls._one_image(int(i), pred) for i, pred in zip(image_ids, predictions)]
        return cls.concat(parts)

    @classmethod
    def _one_image(cls, image_id: int, pred: Mapping[str, Any]) -> Detections:
        where = f"predictions for image_id={image_id}"
        for key in ("boxes", "scores", "labels"):
            if key not in pred:
                raise ValueError(f"{where}: missing '{key}'")
        boxes = torch.as_tensor(pred["boxes"]).detach().to("cpu", torch.float64).reshape(-1, 4).numpy()
        scores = torch.as_tensor(pred["scores"]).detach().to("cpu", torch.float64).reshape(-1).numpy()
        labels = torch.as_tensor(pred["labels"]).detach().to("cpu", torch.int64).reshape(-1).numpy()
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"{where}: boxes/scores/labels lengths differ")
        rles = None
        if pred.get("masks") is not None:
            masks = _squeeze_masks(torch.as_tensor(pred["masks"]), where)
            if len(masks) != len(boxes):
                raise ValueError(f"{where}: {len(masks)} masks for {len(boxes)} boxes")
            rles = _encode_masks(masks)
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        return cls(np.full(len(scores), image_id, np.int64), labels, xywh, scores, rles)

    @classmethod
    def concat(cls, parts: Sequence[Detections]) -> Detections:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        rles = None
        if all(p.rles is not None for p in parts):
            rles = [r for p in parts for r in p.rles]
        return cls(
            np.concatenate([p.image_id for p in parts]),
            np.concatenate([p.category_id for p in parts]),
            np.concatenate([p.bbox for p in parts]),
            np.concatenate([p.score for p in parts]),
            rles,
        )

    def select(self, keep: np.ndarray) -> Detections:
        rles = None if self.rles is None else [r for r, k in zip(self.rles, keep) if k]
        return Detections(self.image_id[keep], self.category_id[keep], self.bbox[keep], self.score[keep], rles)

    def to_coco(self) -> list[dict]:
        """COCO result dicts (JSON-safe: RLE counts as str)."""
        rows = zip(self.image_id.tolist(), self.category_id.tolist(), self.bbox.tolist(), self.score.tolist())
        out = [{"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in rows]
        if self.rles is not None:
            for det, rle in zip(out, self.rles):
                det["segmentation"] = rle
        return out


def _encode_masks(masks: torch.Tensor) -> list[dict[str, Any]]:
    """Bool masks (K,H,W) -> COCO RLE dicts with str counts (JSON-safe; both backends accept str)."""
    if masks.shape[0] == 0:
        return []
    stacked = np.asfortranarray(masks.detach().to("cpu", torch.uint8).numpy().transpose(1, 2, 0))
    return [{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in mask_utils.encode(stacked)]


def _squeeze_masks(masks: torch.Tensor, where: str) -> torch.Tensor:
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"{where}: masks must be (K,1,H,W) or (K,H,W), got shape {tuple(masks.shape)}")
    return masks


def detections_to_coco(image_ids: Sequence[int], predictions: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Postprocess outputs -> COCO result dicts (xyxy -> xywh; masks -> RLE under "segmentation")."""
    return Detections.from_predictions(image_ids, predictions).to_coco()


# --------------------------------------------------------------------------------------------------
# COCO mAP


def _check_gt(gt: Mapping[str, Any]) -> None:
    if not isinstance(gt, Mapping):
        raise TypeError(f"gt must be a COCO-format dict, got {type(gt).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in gt:
            raise ValueError(f"gt (COCO dict) is missing '{key}'")


def _check_image_ids(gt: Mapping[str, Any], dets: Detections) -> None:
    known = np.asarray([img["id"] for img in gt["images"]], np.int64)
    unknown = np.setdiff1d(np.unique(dets.image_id), known)
    if unknown.size:
        raise ValueError(f"detections reference image_id(s) not in gt['images']: {unknown[:10].tolist()}")


def _backend(name: str) -> tuple[Any, Any, dict[str, Any]]:
    """(COCO class, COCOeval class, extra COCOeval kwargs) for a backend name."""
    if name == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval, {}
    if name == "faster_coco_eval":
        try:
            from faster_coco_eval import COCO, COCOeval_faster
        except ImportError as e:  # optional dependency
            raise ImportError("backend='faster_coco_eval' needs `pip install faster-coco-eval`") from e
        return COCO, COCOeval_faster, {"print_function": lambda *a, **k: None}
    raise ValueError(f"backend={name!r} must be 'pycocotools' or 'faster_coco_eval'")


@contextlib.contextmanager
def _quiet():
    """Swallow the progress prints of pycocotools and the log lines of faster_coco_eval."""
    log = logging.getLogger("faster_coco_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        log.setLevel(level)


def _coco_api(coco_cls: Any, dataset: dict) -> Any:
    api = coco_cls()
    api.dataset = dataset
    api.createIndex()
    return api


def _result_annotations(dets: Detections, iou_type: str) -> list[dict]:
    """What loadRes would build from the results, straight from the columns (no per-dict copies).

    Area is the box's for bbox and the mask's for segm, as loadRes and upstream set it.
    """
    if iou_type == "segm" and dets.rles is None:
        raise ValueError("iou_type='segm' needs a mask ('segmentation') for every detection")
    area = dets.bbox[:, 2] * dets.bbox[:, 3] if iou_type == "bbox" else mask_utils.area(dets.rles)
    rows = zip(dets.image_id.tolist(), dets.category_id.tolist(), dets.bbox.tolist(), dets.score.tolist())
    anns = [
        {"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "score": s, "area": a, "iscrowd": 0}
        for k, ((i, c, b, s), a) in enumerate(zip(rows, np.asarray(area, np.float64).tolist()))
    ]
    if iou_type == "segm":
        for ann, rle in zip(anns, dets.rles):
            ann["segmentation"] = rle
    return anns


def _mean_valid(values: np.ndarray) -> float:
    """COCO's convention: average the entries that are defined (> -1); -1 when none is."""
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def _summary(evaluator: Any, max_dets: Sequence[int]) -> dict[str, float]:
    p = evaluator.params
    precision = np.asarray(evaluator.eval["precision"])  # T, R, K, A, M
    recall = np.asarray(evaluator.eval["recall"])  # T, K, A, M
    area = {name: i for i, name in enumerate(p.areaRngLbl)}
    iou = {t: int(np.argmin(np.abs(np.asarray(p.iouThrs) - t))) for t in (0.5, 0.75)}
    last = len(max_dets) - 1
    stats = {
        "mAP_50_95": _mean_valid(precision[:, :, :, area["all"], last]),
        "mAP_50": _mean_valid(precision[iou[0.5], :, :, area["all"], last]),
        "mAP_75": _mean_valid(precision[iou[0.75], :, :, area["all"], last]),
    }
    for name in ("small", "medium", "large"):
        stats[f"mAP_{name}"] = _mean_valid(precision[:, :, :, area[name], last])
    for m, dets in enumerate(max_dets[:-1]):
        stats[f"mAR_{dets}"] = _mean_valid(recall[:, :, area["all"], m])
    stats["mAR"] = _mean_valid(recall[:, :, area["all"], last])
    for name in ("small", "medium", "large"):
        stats[f"mAR_{name}"] = _mean_valid(recall[:, :, area[name], last])
    return stats


def _gt_annotation(ann: Mapping[str, Any], index: int) -> dict[str, Any]:
    """Copy of a GT annotation with the fields COCOeval needs (id, area, iscrowd) filled when absent."""
    if "bbox" not in ann or "image_id" not in ann or "category_id" not in ann:
        raise ValueError(f"gt annotation #{index} needs 'image_id', 'category_id' and 'bbox'")
    out = {"id": index + 1, "iscrowd": 0, **ann}
    out.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
    return out


def _class_name(cat_id: int, cats: Mapping[int, Mapping], class_names: Any) -> str:
    if isinstance(class_names, Mapping) and cat_id in class_names:
        return str(class_names[cat_id])
    if isinstance(class_names, Sequence) and not isinstance(class_names, str) and 0 <= cat_id < len(class_names):
        return str(class_names[cat_id])
    return str(cats.get(cat_id, {}).get("name", cat_id))


def coco_map(
    gt: Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]] | Detections,
    *,
    iou_type: IouType = "bbox",
    max_dets: Sequence[int] = (1, 10, 500),
    backend: Backend = "pycocotools",
    per_class: bool = False,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
) -> dict[str, float]:
    """COCO mAP/mAR of `detections` (COCO results or columns) against `gt` (COCO dict), computed by COCOeval
    with upstream's IoU and recall grids.

    Keys: mAP_50_95, mAP_50, mAP_75, mAP_small/medium/large, mAR_<max_dets[0]>, mAR_<max_dets[1]>, mAR (at
    max_dets[-1]), mAR_small/medium/large; with per_class, "AP/<name>" for every class that has ground truth.
    -1 means undefined (no ground truth in that slice), as in COCOeval. No detections give 0, not an error.
    """
    _check_gt(gt)
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type={iou_type!r} must be 'bbox' or 'segm'")
    max_dets = [int(m) for m in max_dets]
    if len(max_dets) != 3 or sorted(max_dets) != max_dets or max_dets[0] < 1:
        raise ValueError(f"max_dets={tuple(max_dets)} must be three increasing positive counts, e.g. (1, 10, 500)")
    dets = Detections.from_coco(detections)
    _check_image_ids(gt, dets)
    coco_cls, eval_cls, eval_kwargs = _backend(backend)
    # COCOeval writes into annotation dicts (ignore flags, polygons -> RLE): work on copies.
    images = [dict(img) for img in gt["images"]]
    categories = copy.deepcopy(list(gt["categories"]))
    annotations = [_gt_annotation(ann, i) for i, ann in enumerate(gt["annotations"])]
    results = _result_annotations(dets, iou_type)
    with _quiet():
        coco_gt = _coco_api(coco_cls, {"images": images, "annotations": annotations, "categories": categories})
        coco_dt = _coco_api(coco_cls, {"images": images, "annotations": results, "categories": categories})
        evaluator = eval_cls(coco_gt, coco_dt, iou_type, **eval_kwargs)
        evaluator.params.maxDets = max_dets
        evaluator.params.iouThrs = UPSTREAM_IOU_THRESHOLDS.copy()
        evaluator.params.recThrs = UPSTREAM_RECALL_THRESHOLDS.copy()
        evaluator.evaluate()
        evaluator.accumulate()
    stats = _summary(evaluator, max_dets)
    if per_class:
        precision = np.asarray(evaluator.eval["precision"])
        area_all = list(evaluator.params.areaRngLbl).index("all")
        for k, cat_id in enumerate(evaluator.params.catIds):
            ap = _mean_valid(precision[:, :, k, area_all, -1])
            if ap > -1:  # classes without ground truth have no AP
                stats[f"AP/{_class_name(cat_id, coco_gt.cats, class_names)}"] = ap
    return stats


# --------------------------------------------------------------------------------------------------
# F1 sweep (upstream's evaluation/matching.py + evaluation/f1_sweep.py semantics), vectorised


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
    iou_type: IouType = "bbox",
) -> dict[str, float]:
    """Macro F1/precision/recall at the best-macro-F1 threshold -> {F1, precision, recall, threshold}.

    Upstream's sweep: for every threshold in linspace(0, 1, thresholds), keep detections with score >=
    threshold (scores compared as float32); per class, precision = TP/(TP+FP) (0 with no detections), recall =
    TP/num_gt; average over the classes with non-crowd ground truth. Ties between thresholds keep the lowest
    one. Everything is 0 when no class has ground truth. iou_type="segm" matches masks (upstream does for
    segmentation models).
    """
    _check_gt(gt)
    dets = Detections.from_coco(detections)
    _check_image_ids(gt, dets)
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


# --------------------------------------------------------------------------------------------------
# Evaluator: accumulate batches, compute once


def _resize_masks(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Nearest-resize (K,H,W) bool masks to the image size, so masks kept at head resolution still score."""
    if tuple(masks.shape[-2:]) == (height, width) or masks.shape[0] == 0:
        return masks
    resized = torch.nn.functional.interpolate(masks[:, None].float(), size=(height, width), mode="nearest")
    return resized[:, 0] > 0.5


class Evaluator:
    """Accumulates postprocess outputs over an evaluation pass and computes upstream's metric set.

    Each `update` turns its batch into columns at once (masks into RLE), so no mask outlives its batch.
    Only images passed to `update` are scored (a repeated image id, e.g. distributed-sampler padding, is
    dropped). `compute()` returns mAP_50_95, mAP_50, mAP_75, mAR (and the other COCO stats), segm_* twins when
    masks were predicted, F1/precision/recall from the sweep (on masks when masks were predicted, as
    upstream), and AP/<name> when per_class is on.
    """

    def __init__(
        self,
        gt: Mapping[str, Any],
        *,
        max_dets: int | Sequence[int] = 500,
        backend: Backend = "pycocotools",
        per_class: bool = False,
        class_names: Sequence[str] | Mapping[int, str] | None = None,
    ) -> None:
        _check_gt(gt)
        _backend(backend)  # fail on a bad name now, not after a whole evaluation pass
        self.gt = gt
        self.max_dets = (1, 10, int(max_dets)) if isinstance(max_dets, int) else tuple(max_dets)
        self.backend = backend
        self.per_class = per_class
        self.class_names = class_names
        self._images = {img["id"]: img for img in gt["images"]}
        self.reset()

    @classmethod
    def from_config(cls, gt: Mapping[str, Any], cfg: Any, class_names: Any = None) -> Evaluator:
        """Build from an EvalConfig (backend, max_dets, per_class)."""
        return cls(gt, max_dets=cfg.max_dets, backend=cfg.backend, per_class=cfg.per_class, class_names=class_names)

    def reset(self) -> None:
        self._seen: dict[int, None] = {}  # insertion-ordered set
        self._parts: list[Detections] = []
        self._has_masks = False

    @property
    def num_detections(self) -> int:
        return sum(len(p) for p in self._parts)

    def update(self, predictions: Sequence[Mapping[str, Any]], image_ids: Sequence[int]) -> None:
        """Add one batch: postprocess outputs and the COCO image ids they belong to."""
        image_ids = [int(i) for i in (image_ids.tolist() if torch.is_tensor(image_ids) else image_ids)]
        if len(image_ids) != len(predictions):
            raise ValueError(f"update got {len(image_ids)} image_ids for {len(predictions)} predictions")
        keep_ids, keep_preds = [], []
        for image_id, pred in zip(image_ids, predictions):
            if image_id not in self._images:
                raise ValueError(f"image_id {image_id} is not in the ground truth's images")
            if image_id in self._seen:
                continue
            self._seen[image_id] = None
            if pred.get("masks") is not None:
                img = self._images[image_id]
                masks = _squeeze_masks(torch.as_tensor(pred["masks"]), f"predictions for image_id={image_id}")
                pred = {**pred, "masks": _resize_masks(masks.bool(), int(img["height"]), int(img["width"]))}
                self._has_masks = True
            keep_ids.append(image_id)
            keep_preds.append(pred)
        self._parts.append(Detections.from_predictions(keep_ids, keep_preds))

    def state(self) -> dict[str, Any]:
        """What this evaluator holds (image ids seen, detections as columns): small and picklable."""
        return {"image_ids": list(self._seen), "detections": Detections.concat(self._parts)}

    def merge(self, states: Sequence[Mapping[str, Any]]) -> None:
        """Add other evaluators' `state()`s (e.g. every rank's), dropping images this one has already seen."""
        for st in states:
            fresh = [i for i in st["image_ids"] if i not in self._seen]
            dets = st["detections"]
            self._parts.append(dets.select(np.isin(dets.image_id, np.asarray(fresh, np.int64))))
            self._has_masks |= dets.rles is not None and len(dets) > 0
            self._seen.update(dict.fromkeys(fresh))

    def _seen_gt(self) -> dict[str, Any]:
        return {
            "images": [img for img in self.gt["images"] if img["id"] in self._seen],
            "annotations": [a for a in self.gt["annotations"] if a["image_id"] in self._seen],
            "categories": self.gt["categories"],
        }

    def compute(self, timings: dict[str, float] | None = None) -> dict[str, float]:
        """The metrics; `timings`, when given, receives the seconds spent in coco_bbox, coco_segm and f1."""
        timings = {} if timings is None else timings
        gt = self._seen_gt()
        dets = Detections.concat(self._parts)
        common = {"max_dets": self.max_dets, "backend": self.backend}
        t0 = time.perf_counter()
        out = coco_map(gt, dets, per_class=self.per_class, class_names=self.class_names, **common)
        timings["coco_bbox"] = time.perf_counter() - t0
        if self._has_masks:
            t0 = time.perf_counter()
            segm = coco_map(gt, dets, iou_type="segm", **common)
            out.update({f"segm_{k}": v for k, v in segm.items()})
            timings["coco_segm"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        f1 = f1_sweep(gt, dets, iou_type="segm" if self._has_masks else "bbox")
        timings["f1"] = time.perf_counter() - t0
        out.update({"F1": f1["F1"], "precision": f1["precision"], "recall": f1["recall"]})
        return out
