"""COCO-form detection datasets: Roboflow exports, raw COCO 2017, and the shared Dataset every format feeds.

Every layout (YOLO and the synthetic shapes too) is first turned into a `Source`: COCO image entries,
COCO annotations with raw category ids, and a label map. `DetectionDataset` checks a Source once,
collecting every problem of the split into one `DatasetError`, then serves (image, target) samples and
the COCO ground truth in label space for evaluation.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch import Tensor

from rfdetr_fn.data import keypoints as kp
from rfdetr_fn.data import transforms as T

SPLIT_DIRS = {"train": "train", "valid": "valid", "val": "valid", "test": "test"}
ROBOFLOW_ANNOTATIONS = "_annotations.coco.json"
_PLACEHOLDER_SUPERCATEGORIES = {"none", "", None}
_CLIP_TOLERANCE = 1.0  # px a box may overhang the image (float rounding) before a clip warning


class DatasetError(ValueError):
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


@dataclass(frozen=True)
class Pipeline:
    """How samples are transformed: `train` enables augmentation; `scales` are the square sides to draw."""

    train: bool
    resolution: int
    scales: tuple[int, ...]
    scale_jitter: bool = True


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """One 63-bit seed per (run seed, epoch, position in the epoch)."""
    return ((seed * 1_000_003 + epoch) * 1_000_033 + position) % (2**63 - 1)


# ------------------------------------------------------------------------------------------- categories
def filter_parent_categories(categories: list[dict], annotated_ids: set[int]) -> list[dict]:
    """Drop Roboflow's synthetic root: a category that another category names as its supercategory and
    that no annotation uses. A category that is its own supercategory ("person"/"person") is kept.
    Returns the kept categories sorted by id."""
    ordered = sorted(categories, key=lambda c: int(c["id"]))
    parents = {
        c.get("supercategory")
        for c in ordered
        if c.get("supercategory") not in _PLACEHOLDER_SUPERCATEGORIES and c.get("supercategory") != c.get("name")
    }
    kept = [c for c in ordered if not (c.get("name") in parents and int(c["id"]) not in annotated_ids)]
    return kept or ordered


def read_coco_json(path: Path) -> dict:
    """Load a COCO annotation file, with errors that name it."""
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read COCO JSON ({exc})") from exc
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DatasetError(f"{path}: missing or non-list field(s) {', '.join(missing)}")
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise DatasetError(f"{path}: categories[{i}] needs an 'id' and a 'name'")
    return data


def roboflow_label_map(train_json: dict) -> tuple[dict[int, int], list[str]]:
    """Contiguous labels from the TRAIN split (parents filtered, sorted by id), shared by every split."""
    annotated = {int(a["category_id"]) for a in train_json["annotations"] if "category_id" in a}
    kept = filter_parent_categories(train_json["categories"], annotated)
    return {int(c["id"]): i for i, c in enumerate(kept)}, [str(c["name"]) for c in kept]


def roboflow_source(root: Path, split: str) -> Source:
    """`root/{train,valid,test}/_annotations.coco.json` with images beside it."""
    split_dir = root / SPLIT_DIRS[split]
    ann_file = split_dir / ROBOFLOW_ANNOTATIONS
    if not split_dir.is_dir():
        raise DatasetError(f"{split_dir}: split directory not found (Roboflow COCO layout)")
    data = read_coco_json(ann_file)
    train = data if SPLIT_DIRS[split] == "train" else read_coco_json(root / "train" / ROBOFLOW_ANNOTATIONS)
    cat2label, names = roboflow_label_map(train)
    return Source(
        name=str(ann_file),
        images=data["images"],
        annotations=data["annotations"],
        categories=data["categories"],
        cat2label=cat2label,
        class_names=names,
        num_classes=len(names),
        image_dir=split_dir,
    )


def coco2017_source(root: Path, split: str) -> Source:
    """Raw COCO 2017: `train2017/`, `val2017/`, `annotations/instances_*.json`; labels are the raw ids.

    There is no public test annotation file, so "test" reads val2017 (as upstream does)."""
    part = "train" if split == "train" else "val"
    image_dir = root / f"{part}2017"
    if not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: split directory not found (COCO 2017 layout)")
    ann_file = root / "annotations" / f"instances_{part}2017.json"
    data = read_coco_json(ann_file)
    ids = sorted(int(c["id"]) for c in data["categories"])
    if not ids or ids[0] < 0:
        raise DatasetError(f"{ann_file}: categories must have non-negative ids")
    by_id = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    names = [by_id.get(i, "") for i in range(ids[-1] + 1)]  # indexed by raw id, "" for holes
    return Source(
        name=str(ann_file),
        images=data["images"],
        annotations=data["annotations"],
        categories=data["categories"],
        cat2label={i: i for i in ids},
        class_names=names,
        num_classes=ids[-1],
        image_dir=image_dir,
    )


# ------------------------------------------------------------------------------------------- validation
@dataclass
class _Record:
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


def _check_source(source: Source) -> tuple[list[dict], list[_Record], list[str], list[str]]:
    """Validate a split: (images, records, problems, clip warnings)."""
    images, problems = _image_problems(source)
    problems = source.problems + problems
    pos = {im["id"]: k for k, im in enumerate(images)}
    listed = {str(im.get("id")) for im in source.images if isinstance(im, dict)}
    declared = {int(c["id"]): str(c.get("name", "")) for c in source.categories}
    counts = kp.category_counts(source.categories, source.annotations)
    width = max(counts.values(), default=0)
    rows: list[list[tuple]] = [[] for _ in images]
    clipped: list[str] = []
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
        tol = _CLIP_TOLERANCE
        if box[0] < -tol or box[1] < -tol or box[2] > W + tol or box[3] > H + tol:
            clipped.append(f"{where} (image {im['file_name']}): bbox {[x, y, w, h]} outside {W}x{H}")
        box[0::2] = box[0::2].clip(0, W)
        box[1::2] = box[1::2].clip(0, H)
        if box[2] <= box[0] or box[3] <= box[1]:
            continue  # degenerate: nothing to learn or match
        area = float(a.get("area") or (box[2] - box[0]) * (box[3] - box[1]))
        points = kp.parse(a.get("keypoints"), counts.get(cat, 0), width) if width else None
        if isinstance(points, str):
            problems.append(f"{where} (category {declared[cat]}): {points}")
            continue
        rows[pos[image_id]].append(
            (box, source.cat2label[cat], bool(a.get("iscrowd", 0)), a.get("segmentation") or None, aid, area, points)
        )
    records = [_make_record(r, width) for r in rows]
    return images, records, problems, clipped


def _make_record(rows: list[tuple], keypoint_width: int = 0) -> _Record:
    no_kps = np.zeros((0, keypoint_width, 3), np.float32) if keypoint_width else None
    if not rows:
        empty = np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, bool)
        return _Record(*empty, [], [], [], no_kps)
    boxes, labels, crowd, segs, ids, areas, points = zip(*rows)
    return _Record(
        np.stack(boxes).astype(np.float32),
        np.array(labels, np.int64),
        np.array(crowd, bool),
        list(segs),
        list(ids),
        list(areas),
        np.stack(points) if keypoint_width else None,
    )


def polygon_area(poly: list[float]) -> float:
    """Shoelace area in px^2 of a flat [x1, y1, x2, y2, ...] polygon (COCO's `area` for polygon masks)."""
    xs, ys = poly[0::2], poly[1::2]
    return abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))) / 2


def decode_masks(segmentations: list[Any], height: int, width: int) -> Tensor:
    """COCO polygons / RLE (compressed or not) -> bool (N, H, W); no segmentation gives an empty mask."""
    rles, slots = [], []
    for i, seg in enumerate(segmentations):
        if isinstance(seg, dict):
            rles.append(mask_utils.frPyObjects(seg, height, width) if isinstance(seg["counts"], list) else seg)
        elif seg and (polys := [p for p in seg if len(p) >= 6]):
            rles.append(mask_utils.merge(mask_utils.frPyObjects(polys, height, width)))
        else:
            continue
        slots.append(i)
    out = torch.zeros((len(segmentations), height, width), dtype=torch.bool)
    if rles:
        with warnings.catch_warnings():  # pycocotools' cython trips numpy 2's copy=False deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = mask_utils.decode(rles)  # (H, W, n) uint8, column-major
        out[slots] = torch.from_numpy(decoded).permute(2, 0, 1).bool()
    return out


# ---------------------------------------------------------------------------------------------- dataset
class DetectionDataset(torch.utils.data.Dataset):
    """Serves (image (3,h,w) float32 normalised, target) pairs and COCO ground truth in label space.

    Index with an int (augmentation seeded by the dataset seed and the index) or with an
    `(index, sample_seed)` pair from the training sampler, so every epoch and every padded
    repeat of a sample draws fresh, reproducible augmentation even in persistent workers.
    """

    def __init__(
        self,
        source: Source,
        pipeline: Pipeline,
        *,
        masks: bool = False,
        seed: int = 0,
        block_size: int = 32,
        keypoints: bool = False,
    ) -> None:
        images, records, problems, clipped = _check_source(source)
        if problems:
            shown = "\n  ".join(problems[:200])
            more = f"\n  ... and {len(problems) - 200} more" if len(problems) > 200 else ""
            raise DatasetError(f"{source.name}: {len(problems)} problem(s):\n  {shown}{more}")
        if not images:
            raise DatasetError(f"{source.name}: empty split (no images)")
        if clipped:
            head = "; ".join(clipped[:5])
            warnings.warn(
                f"{source.name}: {len(clipped)} box(es) outside their image were clipped: {head}",
                stacklevel=2,
            )
        self.source_name = source.name
        self.images = images
        self.records = records
        self.categories = source.categories
        self.cat2label = dict(source.cat2label)
        self.label2cat = {label: cat for cat, label in self.cat2label.items()}
        self.class_names = list(source.class_names)
        self.num_classes = source.num_classes
        self.image_dir = source.image_dir
        self.render = source.render
        self.pipeline = pipeline
        self.masks = masks
        self.seed = seed
        self.block_size = block_size
        self.keypoint_schema, self.keypoint_names = kp.label_schema(
            source.categories, source.annotations, self.cat2label
        )
        self.keypoints = keypoints
        if keypoints and not self.keypoint_schema:
            raise DatasetError(f"{source.name}: a keypoint model needs keypoint annotations; this split has none")
        flip = source.flip_pairs
        self.flip_pairs = flip if flip is not None else kp.merged_flip_pairs(self.keypoint_schema, self.keypoint_names)

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path | None:
        return None if self.image_dir is None else self.image_dir / self.images[index]["file_name"]

    def load_image(self, index: int) -> Image.Image:
        """Decode one image as RGB; an unreadable file raises DatasetError naming it."""
        entry = self.images[index]
        if self.render is not None:
            return self.render(entry)
        path = self.image_path(index)
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DatasetError(f"{path}: unreadable image ({exc})") from exc

    def verify_images(self) -> None:
        """Decode every image header once; report all unreadable files together."""
        bad = []
        for i in range(len(self)):
            if self.render is not None:
                continue
            try:
                with Image.open(self.image_path(i)) as im:
                    im.verify()
            except Exception as exc:  # PIL raises many types for corrupt files
                bad.append(f"{self.image_path(i)}: {exc}")
        if bad:
            raise DatasetError(f"{self.source_name}: {len(bad)} unreadable image(s):\n  " + "\n  ".join(bad))

    def raw_target(self, index: int, height: int, width: int) -> dict[str, Tensor]:
        """Non-crowd instances in original pixels (boxes re-clipped to the decoded size)."""
        rec = self.records[index]
        keep = ~rec.iscrowd
        boxes = torch.from_numpy(rec.boxes[keep]).reshape(-1, 4).clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        target = {"boxes": boxes, "labels": torch.from_numpy(rec.labels[keep])}
        if self.keypoints:
            target["keypoints"] = kp.clean(torch.from_numpy(rec.keypoints[keep]).clone(), height, width)
        if self.masks:
            segs = [s for s, k in zip(rec.segmentations, keep) if k]
            target["masks"] = decode_masks(segs, height, width)
        return T.drop_degenerate(target)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, dict[str, Tensor]]:
        if isinstance(key, tuple):
            index, seed = int(key[0]), int(key[1])
        else:
            index = int(key)
            seed = sample_seed(self.seed, 0, index)
        pil = self.load_image(index)
        image = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
        h, w = image.shape[-2:]
        target = self.raw_target(index, h, w)
        p = self.pipeline
        if p.train:
            gen = torch.Generator().manual_seed(seed)
            image, target = T.train_transform(
                image, target, scales=p.scales, scale_jitter=p.scale_jitter, gen=gen, flip_pairs=self.flip_pairs
            )
        else:
            image, target = T.eval_transform(image, target, p.resolution)
        image, target = T.finalize(image, target)
        target["image_id"] = torch.tensor(self.images[index]["id"], dtype=torch.int64)
        target["orig_size"] = torch.tensor([h, w], dtype=torch.int64)
        return image, target

    def coco_gt(self) -> dict:
        """COCO ground truth in LABEL space: crowd regions included (iscrowd=1), boxes in original pixels."""
        anns = []
        next_id = 1
        for entry, rec in zip(self.images, self.records):
            for k in range(len(rec.labels)):
                x1, y1, x2, y2 = (float(v) for v in rec.boxes[k])
                ann = {
                    "id": next_id,
                    "image_id": entry["id"],
                    "category_id": int(rec.labels[k]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": rec.areas[k],
                    "iscrowd": int(rec.iscrowd[k]),
                }
                if rec.segmentations[k]:
                    ann["segmentation"] = rec.segmentations[k]
                if rec.keypoints is not None:
                    count = (
                        self.keypoint_schema[ann["category_id"]]
                        if ann["category_id"] < len(self.keypoint_schema)
                        else 0
                    )
                    points = rec.keypoints[k, :count]
                    ann["keypoints"] = [float(v) for v in points.reshape(-1)]
                    ann["num_keypoints"] = int((points[:, 2] > 0).sum())
                anns.append(ann)
                next_id += 1
        categories = [
            {"id": label, "name": self.class_names[label] if label < len(self.class_names) else str(label)}
            for label in sorted(self.label2cat)
        ]
        for cat in categories:  # keypoint datasets: the names give evaluation each category's keypoint count
            if cat["id"] < len(self.keypoint_schema) and self.keypoint_schema[cat["id"]]:
                count, names = self.keypoint_schema[cat["id"]], self.keypoint_names[cat["id"]]
                cat["keypoints"] = names or [f"keypoint_{i}" for i in range(count)]
        return {"images": [dict(im) for im in self.images], "annotations": anns, "categories": categories}
