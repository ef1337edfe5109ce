"""COCO-form readers: Roboflow COCO exports and raw COCO 2017, each turned into a `Source`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rfdetr_fn.data.source import DatasetError, Source

SPLIT_DIRS = {"train": "train", "valid": "valid", "val": "valid", "test": "test"}
ROBOFLOW_ANNOTATIONS = "_annotations.coco.json"
_PLACEHOLDER_SUPERCATEGORIES = {"none", "", None}


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


def check_file_names(images: list, image_dir: Path, root: Path, ann_file: Path) -> None:
    """Refuse `file_name`s that reach outside the dataset (absolute, or `..` past its root): an annotation
    file must not make training read (or a grid show) files from elsewhere on the machine."""
    top = Path(os.path.abspath(root))
    outside = [
        str(im["file_name"])
        for im in images
        if isinstance(im, dict) and isinstance(im.get("file_name"), str)
        and (
            Path(im["file_name"]).is_absolute()
            or not Path(os.path.abspath(image_dir / im["file_name"])).is_relative_to(top)
        )
    ]  # fmt: skip
    if outside:
        raise DatasetError(
            f"{ann_file}: {len(outside)} file_name(s) point outside the dataset at {top}: {outside[:10]}; "
            "file names must be relative paths inside the dataset"
        )


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
    check_file_names(data["images"], split_dir, root, ann_file)
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
    check_file_names(data["images"], image_dir, root, ann_file)
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
