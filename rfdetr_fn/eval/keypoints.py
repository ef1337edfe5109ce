"""COCO keypoint AP/AR (OKS), upstream's rules (rfdetr 1.11.2 MetricKeypointOKS).

Ground truth is a COCO dict in label space (category id = the model's label) whose annotations carry
`keypoints` triplets; predictions are postprocess outputs with `keypoints` (K, max(schema), 3) = pixel
x, y and confidence. Upstream's rules, all kept here:

- each prediction's keypoints are cut to its category's keypoint count; labels without a category
  (e.g. the class head's extra column) are dropped; boxes are not used;
- OKS sigmas: the explicit list (cut to each group's count) or, by default, COCO's person sigmas for
  17-keypoint categories and a uniform 0.05 (built in float32) for any other count;
- categories with different keypoint counts are scored separately (one COCOeval per count) and the 10
  summary stats are averaged weighted by the number of categories per group, ignoring -1 entries;
- keypoint COCOeval keeps only the 20 best-scoring detections per image and category (maxDets = [20]),
  whatever the box evaluation's max_dets; area ranges all / medium / large.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from rfdetr_fn.eval.coco import Backend, Evaluator, coco_api, coco_backend, quiet_coco

COCO_PERSON_SIGMAS = np.array(
    [0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89]
) / 10.0  # fmt: skip
DEFAULT_SIGMA = 0.05
MAX_DETS = 20
STAT_KEYS = (
    "kp_mAP_50_95", "kp_mAP_50", "kp_mAP_75", "kp_mAP_medium", "kp_mAP_large",
    "kp_mAR", "kp_mAR_50", "kp_mAR_75", "kp_mAR_medium", "kp_mAR_large",
)  # fmt: skip


def keypoint_counts(gt: Mapping[str, Any]) -> dict[int, int]:
    """Keypoints per category: the category's `keypoints` names, else the longest annotation."""
    counts = {int(c["id"]): len(c["keypoints"]) for c in gt["categories"] if c.get("keypoints")}
    for ann in gt["annotations"]:
        if ann.get("keypoints"):
            cat = int(ann["category_id"])
            counts[cat] = max(counts.get(cat, 0), len(ann["keypoints"]) // 3)
    return counts


def oks_sigmas(count: int, explicit: Sequence[float] | None = None) -> np.ndarray:
    """Sigmas for a group of `count`-keypoint categories (see the module docstring)."""
    if explicit is not None:
        sigmas = np.asarray(explicit, dtype=np.float32)
        if sigmas.ndim != 1 or sigmas.size < count or not np.isfinite(sigmas).all() or (sigmas <= 0).any():
            raise ValueError(f"keypoint_oks_sigmas={list(explicit)} must be positive and cover {count} keypoints")
        return sigmas[:count].astype(np.float64)
    if count == len(COCO_PERSON_SIGMAS):
        return COCO_PERSON_SIGMAS.copy()
    return np.full(count, DEFAULT_SIGMA, dtype=np.float32).astype(np.float64)


def keypoints_to_coco(
    image_ids: Sequence[int], predictions: Sequence[Mapping[str, Any]], counts: Mapping[int, int]
) -> list[dict]:
    """COCO keypoint results: one per prediction whose label is a keypoint category."""
    out = []
    for image_id, pred in zip(image_ids, predictions):
        kps = torch.as_tensor(pred["keypoints"]).detach().cpu().double()
        for label, score, points in zip(pred["labels"].tolist(), pred["scores"].tolist(), kps):
            count = counts.get(int(label))
            if not count:
                continue
            flat = points[:count].reshape(-1).tolist()
            out.append({"image_id": int(image_id), "category_id": int(label), "keypoints": flat, "score": score})
    return out


def _gt_for(gt: Mapping[str, Any], cats: set[int]) -> dict[str, Any]:
    anns = []
    for i, ann in enumerate(gt["annotations"]):
        if int(ann["category_id"]) not in cats:
            continue
        a = {"id": i + 1, "iscrowd": 0, **copy.deepcopy(dict(ann))}
        a.setdefault("num_keypoints", sum(1 for v in a.get("keypoints", [])[2::3] if v > 0))
        a.setdefault("area", float(a["bbox"][2]) * float(a["bbox"][3]))
        anns.append(a)
    categories = [copy.deepcopy(dict(c)) for c in gt["categories"] if int(c["id"]) in cats]
    return {"images": [dict(img) for img in gt["images"]], "annotations": anns, "categories": categories}


def _group_stats(
    gt: Mapping[str, Any], results: list[dict], cats: set[int], sigmas: np.ndarray, backend: Backend
) -> np.ndarray:
    coco_cls, eval_cls, eval_kwargs = coco_backend(backend)
    dataset = _gt_for(gt, cats)
    with quiet_coco():
        coco_gt = coco_api(coco_cls, dataset)
        mine = [dict(r) for r in results if r["category_id"] in cats]
        if mine:
            coco_dt = coco_gt.loadRes(mine)
        else:
            coco_dt = coco_api(coco_cls, {**dataset, "annotations": []})
        evaluator = eval_cls(coco_gt, coco_dt, "keypoints", **eval_kwargs)
        evaluator.params.kpt_oks_sigmas = sigmas
        evaluator.params.maxDets = [MAX_DETS]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats, dtype=np.float64)[: len(STAT_KEYS)]


def weighted_stats(stats: Sequence[np.ndarray], weights: Sequence[int]) -> np.ndarray:
    """Per-stat mean over groups weighted by category count; -1 entries are left out (-1 if all are)."""
    out = np.full(len(STAT_KEYS), -1.0)
    for i in range(len(STAT_KEYS)):
        pairs = [(s[i], w) for s, w in zip(stats, weights) if s[i] >= 0]
        if pairs:
            out[i] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
    return out


def oks_map(
    gt: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]],
    *,
    sigmas: Sequence[float] | None = None,
    backend: Backend = "pycocotools",
) -> dict[str, float]:
    """Keypoint AP/AR (STAT_KEYS) of COCO keypoint `results` against `gt`; -1 = undefined."""
    counts = keypoint_counts(gt)
    groups: dict[int, set[int]] = defaultdict(set)
    for cat, count in counts.items():
        if count > 0:
            groups[count].add(cat)
    if not groups:
        raise ValueError("keypoint evaluation needs categories with keypoints in the ground truth")
    stats, weights = [], []
    for count, cats in sorted(groups.items()):
        stats.append(_group_stats(gt, list(results), cats, oks_sigmas(count, sigmas), backend))
        weights.append(len(cats))
    return dict(zip(STAT_KEYS, (float(v) for v in weighted_stats(stats, weights))))


class KeypointEvaluator(Evaluator):
    """`metrics.Evaluator` (box mAP/mAR, F1) plus keypoint AP/AR (`kp_*` keys) for keypoint models."""

    def __init__(self, gt: Mapping[str, Any], *, sigmas: Sequence[float] | None = None, **kwargs: Any) -> None:
        self.sigmas = sigmas
        self.counts = keypoint_counts(gt)
        super().__init__(gt, **kwargs)

    def reset(self) -> None:
        super().reset()
        self._kp_results: dict[int, list[dict]] = {}

    def update(self, predictions: Sequence[Mapping[str, Any]], image_ids: Sequence[int]) -> None:
        ids = [int(i) for i in (image_ids.tolist() if torch.is_tensor(image_ids) else image_ids)]
        fresh = {i: p for i, p in zip(ids, predictions) if i not in self._seen and i not in self._kp_results}
        super().update(predictions, image_ids)  # validates ids; box detections
        for image_id, pred in fresh.items():
            if pred.get("keypoints") is None:
                raise ValueError(f"predictions for image_id={image_id} lack 'keypoints' (a keypoint model's output)")
            self._kp_results[image_id] = keypoints_to_coco([image_id], [pred], self.counts)

    def state(self) -> dict[str, Any]:
        """`Evaluator.state()` plus the keypoint results (COCO dicts) per image id."""
        return {**super().state(), "keypoints": dict(self._kp_results)}

    def merge(self, states: Sequence[Mapping[str, Any]]) -> None:
        """Add other evaluators' `state()`s, dropping images this one has already seen (as `Evaluator.merge`)."""
        for st in states:
            fresh = [i for i in st["image_ids"] if i not in self._seen]
            super().merge([st])
            for image_id in fresh:
                self._kp_results[image_id] = st["keypoints"].get(image_id, [])

    def compute(self, timings: dict[str, tuple[float, float]] | None = None) -> dict[str, float]:
        out = super().compute(timings)
        results = [r for rs in self._kp_results.values() for r in rs]
        out.update(oks_map(self._seen_gt(), results, sigmas=self.sigmas, backend=self.backend))
        return out
