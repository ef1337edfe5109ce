"""Detections as columns, and the COCO result format they convert to and from.

A COCO-sized validation pass holds ~500,000 detections: as columns (one array per field, masks as RLE
strings) they cost tens of MB and convert to what COCOeval wants without a million intermediate dicts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

__all__ = ["Detections", "detections_to_coco", "check_gt", "check_image_ids", "rle_area"]


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
            masks = squeeze_masks(torch.as_tensor(pred["masks"]), where)
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


def squeeze_masks(masks: torch.Tensor, where: str) -> torch.Tensor:
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"{where}: masks must be (K,1,H,W) or (K,H,W), got shape {tuple(masks.shape)}")
    return masks


def detections_to_coco(image_ids: Sequence[int], predictions: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Postprocess outputs -> COCO result dicts (xyxy -> xywh; masks -> RLE under "segmentation")."""
    return Detections.from_predictions(image_ids, predictions).to_coco()


def check_gt(gt: Mapping[str, Any]) -> None:
    if not isinstance(gt, Mapping):
        raise TypeError(f"gt must be a COCO-format dict, got {type(gt).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in gt:
            raise ValueError(f"gt (COCO dict) is missing '{key}'")


def check_image_ids(gt: Mapping[str, Any], dets: Detections) -> None:
    known = np.asarray([img["id"] for img in gt["images"]], np.int64)
    unknown = np.setdiff1d(np.unique(dets.image_id), known)
    if unknown.size:
        raise ValueError(f"detections reference image_id(s) not in gt['images']: {unknown[:10].tolist()}")


def rle_area(rles: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Pixel area of each RLE, float64. In chunks: pycocotools' area() overflows a uint8 for lists of 256+
    under numpy 2."""
    chunks = [mask_utils.area(list(rles[i : i + 255])) for i in range(0, len(rles), 255)]
    return np.concatenate(chunks).astype(np.float64) if chunks else np.zeros(0)
