"""The contract every dataset layout meets: a split in COCO form (`Source`), and the checks run on it.

Every layout (Roboflow and COCO 2017 in `coco`, YOLO in `yolo`, the synthetic shapes in `synthetic`) is
first turned into a `Source`: COCO image entries, COCO annotations with raw category ids, and a label
map. `check_source` validates a Source once, collecting every problem of the split, and turns its
annotations into per-image records (boxes clipped, crowd flagged) for `DetectionDataset`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rfdetr_fn.data import keypoints as kp
from rfdetr_fn.data.masks import rle_problem
from rfdetr_fn.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")  # files read as images, any case
_CLIP_TOLERANCE = 1.0  # px a box may overhang the image (float rounding) before a clip warning


class DatasetError(UserError, ValueError):
    """Bad data on disk; the message names the file and, for annotations, lists every problem found."""


@dataclass
class Source:
    """One split in COCO form, whatever the layout on disk."""

    name: str  # the file or folder the split came from, used in every message
    images: list[dict]  # {"id", "file_name", "height", "width"}
    annotations: list[dict]  # COCO annotations, raw category ids
    categories: list[dict]  # {"id", "name"}: every category the split declares
    cat2label: dict[int, int]  # raw category id -> contiguous (or raw) training label
    class_names: list[str]  # indexed by label
    num_classes: int
    image_dir: Path | None = None
    render: Callable[[dict], Image.Image] | None = None  # in-memory images (synthetic data)
    problems: list[str] = field(default_factory=list)  # found while reading the layout
    flip_pairs: tuple[int, ...] | None = None  # keypoint swap pairs given by the layout (YOLO flip_idx)


@dataclass
class Record:
    """One image's annotations, checked and clipped (crowd included, flagged)."""

    boxes: np.ndarray  # (n, 4) float32 xyxy px, clipped to the image
    labels: np.ndarray  # (n,) int64
    iscrowd: np.ndarray  # (n,) bool
    segmentations: list[Any]  # raw COCO segmentation or None
    ann_ids: list[int]
    areas: list[float]
    keypoints: np.ndarray | None = None  # (n, max(schema), 3) float32 x, y, v px (keypoint datasets)


def _image_problems(source: Source) -> tuple[list[dict], list[str]]:
    problems, images, seen = [], [], set()
    for i, im in enumerate(source.images):
        try:
            entry = {
                "id": int(im["id"]),
                "file_name": str(im["file_name"]),
                "height": int(im["height"]),
                "width": int(im["width"]),
            }
        except (KeyError, TypeError, ValueError):
            problems.append(f"images[{i}]: needs integer 'id', 'height', 'width' and a 'file_name'")
            continue
        if entry["height"] <= 0 or entry["width"] <= 0:
            problems.append(f"image id {entry['id']} ({entry['file_name']}): non-positive size")
            continue
        if entry["id"] in seen:
            problems.append(f"image id {entry['id']} ({entry['file_name']}): duplicate image id")
            continue
        path = None if source.render is not None or source.image_dir is None else source.image_dir / entry["file_name"]
        if path is not None and not os.path.isfile(path):
            problems.append(f"image id {entry['id']}: missing image file {path}")
        seen.add(entry["id"])
        images.append(entry)
    return images, problems


def check_source(source: Source) -> tuple[list[dict], list[Record], list[str], str | None]:
    """Validate a split: (images, records, problems, the dropped/clipped boxes report)."""
    images, problems = _image_problems(source)
    problems = source.problems + problems
    pos = {im["id"]: k for k, im in enumerate(images)}
    listed = {str(im.get("id")) for im in source.images if isinstance(im, dict)}
    declared = {int(c["id"]): str(c.get("name", "")) for c in source.categories}
    counts = kp.category_counts(source.categories, source.annotations)
    width = max(counts.values(), default=0)
    problems += kp.skeleton_problems(source.categories, counts)
    rows: list[list[tuple]] = [[] for _ in images]
    clipped: list[str] = []
    dropped: dict[str, list[str]] = {}
    for i, a in enumerate(source.annotations):
        aid = a.get("id", f"#{i}")
        where = f"annotation id {aid}"
        try:
            image_id, cat = int(a["image_id"]), int(a["category_id"])
            x, y, w, h = (float(v) for v in a["bbox"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"{where}: needs 'image_id', 'category_id' and a 4-number 'bbox'")
            continue
        if image_id not in pos:
            if str(image_id) not in listed:  # images already reported above need no second line
                problems.append(f"{where}: image_id {image_id} is not in 'images'")
            continue
        if cat not in declared:
            problems.append(f"{where}: unknown category id {cat}")
            continue
        if cat not in source.cat2label:
            problems.append(f"{where}: category id {cat} ({declared[cat]}) is not in the train split's label map")
            continue
        im = images[pos[image_id]]
        W, H = im["width"], im["height"]
        box = np.array([x, y, x + w, y + h], dtype=np.float64)
        reason = _drop_reason(box, W, H)
        if reason is not None:  # nothing to learn or match; counted for the split's one warning
            dropped.setdefault(reason, []).append(str(aid))
            continue
        tol = _CLIP_TOLERANCE
        if box[0] < -tol or box[1] < -tol or box[2] > W + tol or box[3] > H + tol:
            clipped.append(f"{where} (image {im['file_name']}): bbox {[x, y, w, h]} partly outside {W}x{H}")
        box[0::2] = box[0::2].clip(0, W)
        box[1::2] = box[1::2].clip(0, H)
        area = float(a.get("area") or (box[2] - box[0]) * (box[3] - box[1]))
        seg = a.get("segmentation")
        mask_problem = rle_problem(seg, H, W) if isinstance(seg, dict) else None
        if mask_problem is not None:
            problems.append(f"{where} (image {im['file_name']}): {mask_problem}")
            continue
        points = kp.parse(a.get("keypoints"), counts.get(cat, 0), width) if width else None
        if isinstance(points, str):
            problems.append(f"{where} (category {declared[cat]}): {points}")
            continue
        rows[pos[image_id]].append(
            (box, source.cat2label[cat], bool(a.get("iscrowd", 0)), a.get("segmentation") or None, aid, area, points)
        )
    records = [_make_record(r, width) for r in rows]
    return images, records, problems, _box_report(dropped, clipped)


def _drop_reason(box: np.ndarray, width: int, height: int) -> str | None:
    """Why an xyxy pixel box cannot be a target, if it cannot."""
    if not np.isfinite(box).all():
        return "non-finite bbox"
    if box[2] <= box[0] or box[3] <= box[1]:
        return "zero or negative width/height"
    if box[2] <= 0 or box[3] <= 0 or box[0] >= width or box[1] >= height:
        return "entirely outside the image"
    return None


def _box_report(dropped: dict[str, list[str]], clipped: list[str]) -> str | None:
    """One line for the split: dropped annotations per reason (with ids), clipped boxes (with examples)."""
    parts = []
    if dropped:
        counts = ", ".join(f"{len(ids)} {reason}" for reason, ids in dropped.items())
        ids = [i for found in dropped.values() for i in found]
        shown = ", ".join(ids[:10]) + (", ..." if len(ids) > 10 else "")
        parts.append(f"dropped {len(ids)} annotation(s): {counts} (annotation ids {shown})")
    if clipped:
        parts.append(f"clipped {len(clipped)} box(es) partly outside their image: " + "; ".join(clipped[:5]))
    return "; ".join(parts) or None


def _make_record(rows: list[tuple], keypoint_width: int = 0) -> Record:
    no_kps = np.zeros((0, keypoint_width, 3), np.float32) if keypoint_width else None
    if not rows:
        empty = np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool)
        return Record(*empty, [], [], [], no_kps)
    boxes, labels, crowd, segs, ids, areas, points = zip(*rows)
    return Record(
        np.stack(boxes).astype(np.float32),
        np.array(labels, np.int64),
        np.array(crowd, bool),
        list(segs),
        list(ids),
        list(areas),
        np.stack(points) if keypoint_width else None,
    )
