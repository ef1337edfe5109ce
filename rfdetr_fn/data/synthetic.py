"""Built-in procedural dataset: coloured rectangles, ellipses and triangles on noisy backgrounds.

It lets `fit` run with no dataset on disk. Class k is shape k % 3 in colour (k + k // 6) % 6: up to 18
distinct classes, and the first six differ in colour as well as shape, so a short run can tell them
apart by colour before it has learnt shapes. Every shape is a polygon, drawn with Pillow and stored as a
COCO polygon, so boxes, masks and pixels agree; it also carries keypoints (rectangle corners, the
ellipse's four extreme points, triangle vertices; see KEYPOINTS) with their outline as COCO skeleton, so
keypoint models train on it out of the box. Shapes never overlap, so no mask is hidden behind another.
Everything is a pure function of (seed, split, index), keyed through `rfdetr_fn.rng.mix`: annotations are
made up front, pixels on demand.
"""

from __future__ import annotations

import functools
import math
import random

import numpy as np
from PIL import Image, ImageDraw

from rfdetr_fn import rng
from rfdetr_fn.config import DataConfig
from rfdetr_fn.data.masks import polygon_area
from rfdetr_fn.data.source import DatasetError, Source

SHAPES = ("rectangle", "ellipse", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "magenta": (200, 50, 200),
    "cyan": (40, 200, 210),
}
_SPLIT_OFFSET = {"train": 0, "valid": 1, "val": 1, "test": 2}
# Keypoints of each shape (all visible): the polygon vertices they sit on, and their names.
KEYPOINTS = {
    "rectangle": ((0, 1, 2, 3), ("top_left", "top_right", "bottom_right", "bottom_left")),
    "ellipse": ((24, 0, 8, 16), ("top", "right", "bottom", "left")),
    "triangle": ((0, 1, 2), ("apex", "bottom_right", "bottom_left")),
}


def class_names(num_classes: int) -> list[str]:
    """'red rectangle', 'red ellipse', 'red triangle', 'green rectangle', ..."""
    if num_classes > len(SHAPES) * len(COLOURS):
        raise DatasetError(f"synthetic_classes={num_classes} exceeds {len(SHAPES) * len(COLOURS)} shape/colour pairs")
    colours = list(COLOURS)
    return [f"{colours[colour_index(k)]} {SHAPES[k % len(SHAPES)]}" for k in range(num_classes)]


def colour_index(label: int) -> int:
    """Colour of class `label`: a bijection of the 18 classes onto (shape, colour) pairs."""
    return (label + label // len(COLOURS)) % len(COLOURS)


def shape_polygon(kind: str, x: float, y: float, w: float, h: float, gen: random.Random) -> list[float]:
    """Flat [x1, y1, x2, y2, ...] polygon of a shape inside the box (x, y, w, h), touching all four sides."""
    if kind == "rectangle":
        pts = [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
    elif kind == "ellipse":
        n = 32
        pts = [
            (x + w / 2 * (1 + math.cos(2 * math.pi * i / n)), y + h / 2 * (1 + math.sin(2 * math.pi * i / n)))
            for i in range(n)
        ]
    else:
        apex = x + gen.uniform(0.2, 0.8) * w
        pts = [(apex, y), (x + w, y + h), (x, y + h)]
    return [round(c, 2) for p in pts for c in p]


def outline(count: int) -> list[list[int]]:
    """COCO skeleton (1-based edges) joining a shape's keypoints around its outline."""
    return [[k + 1, (k + 1) % count + 1] for k in range(count)]


def category(label: int, name: str) -> dict:
    """COCO category of a class: its shape's keypoint names and the outline through them as skeleton."""
    points = KEYPOINTS[SHAPES[label % len(SHAPES)]][1]
    return {"id": label, "name": name, "keypoints": list(points), "skeleton": outline(len(points))}


def shape_keypoints(kind: str, poly: list[float]) -> list[float]:
    """COCO keypoint triplets (x, y, v=2) of a shape, read off its polygon."""
    vertices, _ = KEYPOINTS[kind]
    return [c for i in vertices for c in (poly[2 * i], poly[2 * i + 1], 2.0)]


def _layout(gen: random.Random, size: int, num_classes: int) -> list[tuple[int, list[float]]]:
    """1-4 non-overlapping shapes as (class, polygon)."""
    placed: list[tuple[float, float, float, float]] = []
    shapes = []
    for _ in range(gen.randint(1, 4)):
        for _try in range(20):
            w, h = gen.uniform(0.15, 0.45) * size, gen.uniform(0.15, 0.45) * size
            x, y = gen.uniform(0, size - w), gen.uniform(0, size - h)
            if all(x + w < a or a + c < x or y + h < b or b + d < y for a, b, c, d in placed):
                break
        else:
            continue
        placed.append((x, y, w, h))
        cls = gen.randrange(num_classes)
        shapes.append((cls, shape_polygon(SHAPES[cls % len(SHAPES)], x, y, w, h, gen)))
    return shapes


def render(entry: dict, *, seed: int, polygons: dict[int, list[tuple[int, list[float]]]]) -> Image.Image:
    """Pixels of one image: a random grey with Gaussian noise, then its shapes filled in their colours."""
    noise = np.random.default_rng(rng.mix(seed, entry["id"]))
    h, w = entry["height"], entry["width"]
    base = noise.uniform(60, 190)
    pixels = (base + noise.normal(0, 18, size=(h, w, 3))).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    colours = list(COLOURS.values())
    for cls, poly in polygons[entry["id"]]:
        draw.polygon(list(zip(poly[0::2], poly[1::2])), fill=colours[colour_index(cls)])
    return image


def synthetic_source(data_cfg: DataConfig, split: str, seed: int = 0) -> Source:
    """The split's images (train: synthetic_images; valid/test: a quarter, at least 1)."""
    if split not in _SPLIT_OFFSET:
        raise DatasetError(f"synthetic dataset: unknown split {split!r}")
    n = data_cfg.synthetic_images if split == "train" else max(1, data_cfg.synthetic_images // 4)
    size, k = data_cfg.synthetic_size, data_cfg.synthetic_classes
    names = class_names(k)
    split_key = rng.mix(seed, _SPLIT_OFFSET[split])  # one key per (seed, split): splits never share images
    images, annotations, polygons = [], [], {}
    for i in range(n):
        image_id = i + 1
        shapes = _layout(random.Random(rng.mix(split_key, i)), size, k)
        polygons[image_id] = shapes
        images.append({"id": image_id, "file_name": f"synthetic_{split}_{i:05d}.png", "height": size, "width": size})
        for cls, poly in shapes:
            xs, ys = poly[0::2], poly[1::2]
            box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cls,
                    "bbox": box,
                    "area": polygon_area(poly),
                    "iscrowd": 0,
                    "segmentation": [poly],
                    "keypoints": shape_keypoints(SHAPES[cls % len(SHAPES)], poly),
                }
            )
    return Source(
        name=f"synthetic[{split}]",
        images=images,
        annotations=annotations,
        categories=[category(i, nm) for i, nm in enumerate(names)],
        cat2label={i: i for i in range(k)},
        class_names=names,
        num_classes=k,
        render=functools.partial(render, seed=split_key, polygons=polygons),
    )
