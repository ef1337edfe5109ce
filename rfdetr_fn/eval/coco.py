"""Detection metrics: COCO mAP/mAR (bbox and segm), per-class AP and upstream's macro-F1 sweep.

COCO numbers come from COCOeval itself (pycocotools, or faster_coco_eval: same numbers, faster) run on
in-memory dicts: no JSON files, no torchmetrics. Ground truth is a COCO dict in label space (category ids
are the model's labels); predictions are postprocess outputs (xyxy boxes in original pixels), kept as
columns (`rfdetr_fn.eval.detections.Detections`). The F1 sweep lives in `rfdetr_fn.eval.f1`.

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
from typing import Any, Literal

import numpy as np
import torch

from rfdetr_fn.eval.detections import Detections, check_gt, check_image_ids, detections_to_coco, rle_area, squeeze_masks
from rfdetr_fn.eval.f1 import f1_sweep

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
# COCO mAP


def coco_backend(name: str) -> tuple[Any, Any, dict[str, Any]]:
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
def quiet_coco():
    """Swallow the progress prints of pycocotools and the log lines of faster_coco_eval."""
    log = logging.getLogger("faster_coco_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        log.setLevel(level)


def coco_api(coco_cls: Any, dataset: dict) -> Any:
    api = coco_cls()
    api.dataset = dataset
    api.createIndex()
    return api


def _result_annotations(dets: Detections, iou_type: str) -> list[dict]:
    """What loadRes would build from the results, straight from the columns (no per-dict copies).

    Area is the box's for bbox and the mask's for segm, as loadRes and upstream set it.
    """
    if not len(dets):
        return []
    if iou_type == "segm" and dets.rles is None:
        raise ValueError("iou_type='segm' needs a mask ('segmentation') for every detection")
    area = dets.bbox[:, 2] * dets.bbox[:, 3] if iou_type == "bbox" else rle_area(dets.rles)
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
    check_gt(gt)
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type={iou_type!r} must be 'bbox' or 'segm'")
    max_dets = [int(m) for m in max_dets]
    if len(max_dets) != 3 or sorted(max_dets) != max_dets or max_dets[0] < 1:
        raise ValueError(f"max_dets={tuple(max_dets)} must be three increasing positive counts, e.g. (1, 10, 500)")
    dets = Detections.from_coco(detections)
    check_image_ids(gt, dets)
    coco_cls, eval_cls, eval_kwargs = coco_backend(backend)
    # COCOeval writes into annotation dicts (ignore flags, polygons -> RLE): work on copies.
    images = [dict(img) for img in gt["images"]]
    categories = copy.deepcopy(list(gt["categories"]))
    annotations = [_gt_annotation(ann, i) for i, ann in enumerate(gt["annotations"])]
    results = _result_annotations(dets, iou_type)
    with quiet_coco():
        coco_gt = coco_api(coco_cls, {"images": images, "annotations": annotations, "categories": categories})
        coco_dt = coco_api(coco_cls, {"images": images, "annotations": results, "categories": categories})
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
        check_gt(gt)
        coco_backend(backend)  # fail on a bad name now, not after a whole evaluation pass
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
                masks = squeeze_masks(torch.as_tensor(pred["masks"]), f"predictions for image_id={image_id}")
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

    def compute(self, timings: dict[str, tuple[float, float]] | None = None) -> dict[str, float]:
        """The metrics; `timings`, when given, receives (wall, CPU) seconds of coco_bbox, coco_segm and f1."""
        timings = {} if timings is None else timings
        gt = self._seen_gt()
        dets = Detections.concat(self._parts)
        common = {"max_dets": self.max_dets, "backend": self.backend}
        with _timed(timings, "coco_bbox"):
            out = coco_map(gt, dets, per_class=self.per_class, class_names=self.class_names, **common)
        if self._has_masks:
            with _timed(timings, "coco_segm"):
                segm = coco_map(gt, dets, iou_type="segm", **common)
            out.update({f"segm_{k}": v for k, v in segm.items()})
        with _timed(timings, "f1"):
            f1 = f1_sweep(gt, dets, iou_type="segm" if self._has_masks else "bbox")
        out.update({"F1": f1["F1"], "precision": f1["precision"], "recall": f1["recall"]})
        return out


@contextlib.contextmanager
def _timed(timings: dict[str, tuple[float, float]], name: str):
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    timings[name] = (time.perf_counter() - wall, time.process_time() - cpu)
