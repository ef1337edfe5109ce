"""YOLO layout (`data.yaml` + images/ and labels/ folders), turned into a COCO-form `Source`.

Label lines are `cls cx cy w h` (normalised box) or `cls x1 y1 x2 y2 ...` (normalised polygon, at least
three points; its bounds give the box). Images without a label file are background. Class ids are the
labels, as-is. Pose datasets (`kpt_shape: [K, 2 or 3]` in data.yaml, optional `kpt_names` and
`flip_idx`) have lines `cls cx cy w h x1 y1 [v1] ... xK yK [vK]`; with 2 values per keypoint a point is
absent when a coordinate is negative or both are 0, else visible (Ultralytics' convention).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import yaml

from rfdetr_fn.data import keypoints as kp
from rfdetr_fn.data.masks import polygon_area
from rfdetr_fn.data.source import IMAGE_SUFFIXES, DatasetError, Source
from rfdetr_fn.io import imageio

YAML_NAMES = ("data.yaml", "data.yml")
_YAML_KEYS = {"train": ("train",), "valid": ("val", "valid"), "val": ("val", "valid"), "test": ("test",)}
_CONVENTION = {"train": ("train",), "valid": ("valid", "val"), "val": ("valid", "val"), "test": ("test",)}


def find_yaml(root: Path) -> Path | None:
    """`data.yaml` or `data.yml` in `root`, if any."""
    return next((root / n for n in YAML_NAMES if (root / n).is_file()), None)


def read_yaml(path: Path) -> dict:
    """Parse data.yaml; it must hold `names` (a list, or a {id: name} mapping with ids 0..K-1)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise DatasetError(f"{path}: cannot read YAML ({exc})") from exc
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):
        if sorted(int(k) for k in names) != list(range(len(names))):
            raise DatasetError(f"{path}: 'names' ids must be 0..{len(names) - 1}")
        names = [names[k] for k in sorted(names, key=int)]
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{path}: no 'names' list of class names")
    return {**data, "names": [str(n) for n in names]}


def labels_dir_for(images_dir: Path) -> Path:
    """Swap the rightmost `images` path segment for `labels` (YOLO's rule); else `labels` beside it."""
    parts = list(images_dir.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts)
    return images_dir.parent / "labels"


def _candidates(root: Path, base: Path, value: str) -> list[Path]:
    """Where a YAML split path may point: relative to `path:`, the YAML folder, or with Roboflow's '../'."""
    p = Path(value)
    if p.is_absolute():
        return [p]
    stripped = Path(*[q for q in p.parts if q not in ("..", ".")]) if p.parts else p
    return [base / p, root / p, root / stripped]


def split_image_dirs(root: Path, data: dict, split: str) -> list[Path]:
    """Image folders of a split: from the YAML keys when they resolve, else the Roboflow convention."""
    base = root / data["path"] if isinstance(data.get("path"), str) else root
    for key in _YAML_KEYS[split]:
        value = data.get(key)
        if not value:
            continue
        dirs = []
        for v in value if isinstance(value, list) else [value]:
            found = next((c for c in _candidates(root, base, str(v)) if c.exists()), None)
            if found is not None:
                dirs.append(found)
        if dirs:
            return dirs
    for name in _CONVENTION[split]:
        d = root / name / "images"
        if d.is_dir():
            return [d]
    raise DatasetError(
        f"{root}: missing split directory for '{split}' (looked for YAML keys {list(_YAML_KEYS[split])} "
        f"and {[f'{n}/images' for n in _CONVENTION[split]]})"
    )


def _list_images(location: Path) -> list[tuple[Path, Path]]:
    """(image path, its label file) pairs; `location` is a folder or a .txt list of image paths."""
    if location.is_file():
        lines = [ln.strip() for ln in location.read_text().splitlines() if ln.strip()]
        paths = [p if p.is_absolute() else location.parent / p for p in map(Path, lines)]
        return [(p, labels_dir_for(p.parent) / (p.stem + ".txt")) for p in paths]
    labels = labels_dir_for(location)
    files = sorted(p for p in location.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return [(p, labels / p.relative_to(location).with_suffix(".txt")) for p in files]


def parse_label_line(line: str, num_classes: int, width: int, height: int) -> tuple[int, list, list] | str:
    """-> (class id, pixel xywh box, pixel polygon or []) or an error string."""
    try:
        values = [float(v) for v in line.split()]
    except ValueError:
        return "non-numeric value"
    if len(values) < 5 or (len(values) != 5 and len(values) % 2 == 0):
        return f"{len(values)} values (want 'cls cx cy w h' or 'cls x1 y1 x2 y2 x3 y3 ...')"
    if values[0] != int(values[0]) or not 0 <= values[0] < num_classes:
        return f"unknown class id {values[0]:g} (names has {num_classes})"
    cls = int(values[0])
    if len(values) == 5:
        cx, cy, w, h = values[1:]
        return cls, [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height], []
    xs = [v * width for v in values[1::2]]
    ys = [v * height for v in values[2::2]]
    poly = [c for xy in zip(xs, ys) for c in xy]
    return cls, [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)], poly


def pose_schema(data: dict, path: Path) -> tuple[int, int, list[str], tuple[int, ...]] | None:
    """(keypoints, values per keypoint, names, flip pairs) of a pose data.yaml, None without kpt_shape."""
    shape = data.get("kpt_shape")
    if shape is None:
        return None
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) for v in shape)):
        raise DatasetError(f"{path}: kpt_shape={shape!r} must be [number of keypoints, 2 or 3]")
    count, dim = shape
    if count <= 0 or dim not in (2, 3):
        raise DatasetError(f"{path}: kpt_shape={shape!r} must be [positive number of keypoints, 2 or 3]")
    names = data.get("kpt_names")
    names = names.get(0, names.get("0")) if isinstance(names, dict) else names
    if names is None:
        names = [f"keypoint_{i}" for i in range(count)]
    if not isinstance(names, list) or len(names) != count:
        raise DatasetError(f"{path}: kpt_names must list {count} names (kpt_shape), got {names!r}")
    flip = data.get("flip_idx")
    if flip is not None and (not isinstance(flip, list) or sorted(flip) != list(range(count))):
        raise DatasetError(f"{path}: flip_idx must be a permutation of 0..{count - 1}, got {flip!r}")
    return count, dim, [str(n) for n in names], tuple(kp.pairs_from_flip_idx(flip or []))


def pose_keypoints(values: list[float], count: int, dim: int, width: int, height: int) -> list[float] | str:
    """A pose line's keypoint values -> COCO triplets in pixels (absent points (0, 0, 0)), or the problem."""
    if len(values) != count * dim:
        return f"{5 + len(values)} values, want 5 + {count} keypoints x {dim} = {5 + count * dim} (kpt_shape)"
    out = []
    for i in range(count):
        x, y = values[i * dim], values[i * dim + 1]
        if dim == 3:
            v = values[i * dim + 2]
        else:
            v = 0.0 if x < 0 or y < 0 or (x == 0 and y == 0) else 2.0
        x, y = min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0)
        out += [x * width, y * height, v] if v > 0 else [0.0, 0.0, v]
    return out


def warn_unused_labels(image_dirs: list[Path], used: set[Path]) -> None:
    """Label files that no image reads, counted: an orphan (its image is gone) or an upper-case `.TXT`
    (read as `.txt` on no case-sensitive disk) would otherwise drop boxes silently."""
    found = [
        f for d in image_dirs if d.is_dir() and labels_dir_for(d).is_dir()
        for f in labels_dir_for(d).rglob("*") if f.suffix.lower() == ".txt" and f not in used
    ]  # fmt: skip
    upper = [f for f in found if f.suffix != ".txt"]
    orphans = [f for f in found if f.suffix == ".txt"]
    if upper:
        warnings.warn(
            f"{len(upper)} label file(s) end in an upper-case suffix and were not read (rename them to .txt): "
            f"{[str(f) for f in upper[:5]]}",
            stacklevel=3,
        )
    if orphans:
        warnings.warn(
            f"{len(orphans)} label file(s) have no image and were ignored: {[str(f) for f in orphans[:5]]}",
            stacklevel=3,
        )


def yolo_source(root: Path, split: str) -> Source:
    """Read one split of a YOLO dataset; every label problem goes into Source.problems."""
    root = Path(os.path.abspath(root))
    yaml_path = find_yaml(root)
    if yaml_path is None:
        raise DatasetError(f"{root}: no data.yaml or data.yml (YOLO layout)")
    data = read_yaml(yaml_path)
    names = data["names"]
    pose = pose_schema(data, yaml_path)
    images, annotations, problems = [], [], []
    dirs = split_image_dirs(root, data, split)
    pairs = [pair for d in dirs for pair in _list_images(d)]
    warn_unused_labels(dirs, {label for _, label in pairs})
    for image_path, label_path in pairs:
        try:
            width, height = imageio.header_size(image_path)  # upright: YOLO labels are in the viewed frame
        except imageio.READ_ERRORS as exc:
            problems.append(imageio.read_error(image_path, exc))
            continue
        image_id = len(images) + 1
        file_name = str(image_path.relative_to(root)) if image_path.is_relative_to(root) else str(image_path)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        if not label_path.is_file():
            continue  # background image
        for n, line in enumerate(label_path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            values = line.split()
            keypoint_values = values[5:] if pose else []
            parsed = parse_label_line(" ".join(values[:5]) if pose else line, len(names), width, height)
            if isinstance(parsed, str):
                problems.append(f"{label_path}:{n}: {parsed}")
                continue
            cls, box, poly = parsed
            points = None
            if pose:
                try:
                    points = pose_keypoints([float(v) for v in keypoint_values], pose[0], pose[1], width, height)
                except ValueError:
                    points = "non-numeric keypoint value"
                if isinstance(points, str):
                    problems.append(f"{label_path}:{n}: {points}")
                    continue
            ann = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": cls,
                "bbox": box,
                "area": box[2] * box[3],
                "iscrowd": 0,
            }
            if poly:
                ann["segmentation"] = [poly]
                ann["area"] = polygon_area(poly)
            if points is not None:
                ann["keypoints"] = points
            annotations.append(ann)
    return Source(
        name=str(yaml_path) + f" [{split}]",
        images=images,
        annotations=annotations,
        categories=[{"id": i, "name": n, **({"keypoints": pose[2]} if pose else {})} for i, n in enumerate(names)],
        cat2label={i: i for i in range(len(names))},
        class_names=names,
        num_classes=len(names),
        image_dir=root,  # file_name is relative to root (or absolute for paths outside it)
        problems=problems,
        flip_pairs=pose[3] if pose else None,  # YOLO pose flips with flip_idx only (upstream)
    )
