"""Detection metrics: COCO mAP/mAR (bbox and segm), per-class AP and upstream's macro-F1 sweep.

COCO numbers come from COCOeval itself (pycocotools, or faster_coco_eval: same numbers, faster) run on
in-memory dicts: no JSON files, no torchmetrics. Ground truth is a COCO dict in label space (category ids
are the model's labels); predictions are postprocess outputs (xyxy boxes in original pixels).

The summary stats are read straight from COCOeval's precision/recall arrays instead of `summarize()`, because
pycocotools' summarize hard-codes maxDets=100 for AP@[.5:.95] and reports -1 when max_dets=(1, 10, 500).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pycocotools import mask as mask_utils

Backend = Literal["pycocotools", "faster_coco_eval"]
IouType = Literal["bbox", "segm"]

__all__ = ["detections_to_coco", "coco_map", "f1_sweep", "Evaluator"]


# --------------------------------------------------------------------------------------------------
# predictions -> COCO results


def _encode_masks(masks: torch.Tensor) -> list[dict[str, Any]]:
    """Bool masks (K,H,W) -> COCO RLE dicts with str counts (JSON-safe; both backends accept str)."""
    rles = []
    for m in masks.detach().to("cpu", torch.uint8).numpy():
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode("ascii")
        rles.append(rle)
    return rles


def _squeeze_masks(masks: torch.Tensor, where: str) -> torch.Tensor:
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"{where}: masks must be (K,1,H,W) or (K,H,W), got shape {tuple(masks.shape)}")
    return masks


def detections_to_coco(image_ids: Sequence[int], predictions: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Postprocess outputs -> COCO result dicts (xyxy -> xywh; masks -> RLE under "segmentation").

    Every detection is kept (evaluation applies no score threshold).
    """
    if len(image_ids) != len(predictions):
        raise ValueError(f"got {len(image_ids)} image_ids for {len(predictions)} predictions")
    out: list[dict] = []
    for image_id, pred in zip(image_ids, predictions):
        where = f"predictions for image_id={int(image_id)}"
        for key in ("boxes", "scores", "labels"):
            if key not in pred:
                raise ValueError(f"{where}: missing '{key}'")
        boxes = torch.as_tensor(pred["boxes"]).detach().to("cpu", torch.float64).reshape(-1, 4)
        scores = torch.as_tensor(pred["scores"]).detach().cpu().reshape(-1)
        labels = torch.as_tensor(pred["labels"]).detach().cpu().reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"{where}: boxes/scores/labels lengths differ")
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        rles = None
        if pred.get("masks") is not None:
            masks = _squeeze_masks(torch.as_tensor(pred["masks"]), where)
            if len(masks) != len(boxes):
                raise ValueError(f"{where}: {len(masks)} masks for {len(boxes)} boxes")
            rles = _encode_masks(masks)
        for i, (box, score, label) in enumerate(zip(xywh, scores.tolist(), labels.tolist())):
            det = {"image_id": int(image_id), "category_id": int(label), "bbox": box, "score": float(score)}
            if rles is not None:
                det["segmentation"] = rles[i]
            out.append(det)
    return out


# --------------------------------------------------------------------------------------------------
# COCO mAP


def _check_gt(gt: Mapping[str, Any]) -> None:
    if not isinstance(gt, Mapping):
        raise TypeError(f"gt must be a COCO-format dict, got {type(gt).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in gt:
            raise ValueError(f"gt (COCO dict) is missing '{key}'")


def _check_image_ids(gt: Mapping[str, Any], detections: Sequence[Mapping[str, Any]]) -> None:
    known = {img["id"] for img in gt["images"]}
    unknown = sorted({d["image_id"] for d in detections} - known)
    if unknown:
        raise ValueError(f"detections reference image_id(s) not in gt['images']: {unknown[:10]}")


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


def _results_for(detections: Sequence[Mapping[str, Any]], iou_type: str) -> list[dict]:
    """Copy detections (COCOeval mutates them) keeping only the geometry `iou_type` scores.

    Dropping "bbox" for segm makes loadRes take the area from the mask, not the box, for the area ranges.
    """
    if iou_type == "bbox":
        return [{k: v for k, v in d.items() if k != "segmentation"} for d in detections]
    missing = [d["image_id"] for d in detections if "segmentation" not in d]
    if missing:
        raise ValueError(f"iou_type='segm' needs 'segmentation' in every detection (image_id {missing[0]})")
    return [{k: v for k, v in d.items() if k != "bbox"} for d in detections]


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
    detections: Sequence[Mapping[str, Any]],
    *,
    iou_type: IouType = "bbox",
    max_dets: Sequence[int] = (1, 10, 500),
    backend: Backend = "pycocotools",
    per_class: bool = False,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
) -> dict[str, float]:
    """COCO mAP/mAR of `detections` (COCO results) against `gt` (COCO dict), computed by COCOeval.

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
    _check_image_ids(gt, detections)
    coco_cls, eval_cls, eval_kwargs = _backend(backend)
    # COCOeval writes into annotation dicts (ignore flags, polygons -> RLE): work on copies.
    dataset = {
        "images": [dict(img) for img in gt["images"]],
        "annotations": [_gt_annotation(ann, i) for i, ann in enumerate(gt["annotations"])],
        "categories": copy.deepcopy(list(gt["categories"])),
    }
    with _quiet():
        coco_gt = _coco_api(coco_cls, dataset)
        results = _results_for(detections, iou_type)
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # pycocotools' loadRes cannot take an empty list
            empty = {"images": dataset["images"], "annotations": [], "categories": dataset["categories"]}
            coco_dt = _coco_api(coco_cls, empty)
        evaluator = eval_cls(coco_gt, coco_dt, iou_type, **eval_kwargs)
        evaluator.params.maxDets = max_dets
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
# F1 sweep (upstream's evaluation/matching.py + evaluation/f1_sweep.py semantics)


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


def f1_sweep(
    gt: Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]],
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
    _check_image_ids(gt, detections)
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
        self._seen: set[int] = set()
        self._detections: list[dict] = []
        self._has_masks = False

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
            self._seen.add(image_id)
            if pred.get("masks") is not None:
                img = self._images[image_id]
                masks = _squeeze_masks(torch.as_tensor(pred["masks"]), f"predictions for image_id={image_id}")
                pred = {**pred, "masks": _resize_masks(masks.bool(), int(img["height"]), int(img["width"]))}
                self._has_masks = True
            keep_ids.append(image_id)
            keep_preds.append(pred)
        self._detections.extend(detections_to_coco(keep_ids, keep_preds))

    def _seen_gt(self) -> dict[str, Any]:
        return {
            "images": [img for img in self.gt["images"] if img["id"] in self._seen],
            "annotations": [a for a in self.gt["annotations"] if a["image_id"] in self._seen],
            "categories": self.gt["categories"],
        }

    def compute(self) -> dict[str, float]:
        gt = self._seen_gt()
        common = {"max_dets": self.max_dets, "backend": self.backend}
        out = coco_map(gt, self._detections, per_class=self.per_class, class_names=self.class_names, **common)
        if self._has_masks:
            segm = coco_map(gt, self._detections, iou_type="segm", **common)
            out.update({f"segm_{k}": v for k, v in segm.items()})
        f1 = f1_sweep(gt, self._detections, iou_type="segm" if self._has_masks else "bbox")
        out.update({"F1": f1["F1"], "precision": f1["precision"], "recall": f1["recall"]})
        return out
