"""Pictures of detections: boxes, labels, masks and keypoint skeletons drawn on an image, one colour per
class. Used by `predict` (one drawing per image) and by fit's dataset grids (ground truth)."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from rfdetr_fn.data.keypoints import class_edges

MASK_ALPHA = 96  # of 255: masks tint the object without hiding it
KEYPOINT_MIN_SCORE = 0.5  # keypoints drawn when their confidence (findable probability) reaches this


def class_name(label: int, names: Sequence[str] | None) -> str:
    """The checkpoint's name for a label; the number itself when there are no names or it is out of range."""
    return names[label] if names is not None and 0 <= label < len(names) else str(label)


def class_colour(label: int) -> tuple[int, int, int]:
    """A distinct, saturated colour per class: golden-ratio steps around the hue circle."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(
    image: np.ndarray,
    det: dict[str, Tensor],
    names: Sequence[str] | None,
    schema: Sequence[int] = (),
    skeleton: Sequence[int] = (),
) -> Image.Image:
    """The image with semi-transparent masks, then boxes and "name score" labels (just "name" when `det` has
    no scores: ground truth), one colour per class, and keypoints joined by the `skeleton` edges (flat
    indices into the schema's keypoints, ModelConfig.keypoint_skeleton; see `draw_skeleton`)."""
    base = Image.fromarray(image).convert("RGBA")
    labels = det["labels"].cpu().tolist()
    if "masks" in det:
        overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
        for mask, label in zip(det["masks"].cpu().numpy(), labels):
            tint = Image.new("RGBA", base.size, (*class_colour(label), MASK_ALPHA))
            overlay.paste(tint, (0, 0), Image.fromarray(mask.astype(np.uint8) * 255))
        base = Image.alpha_composite(base, overlay)
    canvas = base.convert("RGB")
    pen = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    width = max(1, round(min(canvas.size) / 200))
    scores = det["scores"].cpu().tolist() if "scores" in det else [None] * len(labels)  # None: ground truth
    for box, score, label in zip(det["boxes"].float().cpu().tolist(), scores, labels):
        colour = class_colour(label)
        x0, y0, x1, y1 = box  # an untrained model can predict a negative width or height: draw its extent
        box = [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
        pen.rectangle(box, outline=colour, width=width)
        text = class_name(label, names) + ("" if score is None else f" {score:.2f}")
        left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
        x, y = box[0], max(0.0, box[1] - (bottom - top) - 2)
        pen.rectangle((x, y, x + right - left + 2, y + bottom - top + 2), fill=colour)
        pen.text((x + 1 - left, y + 1 - top), text, fill=(0, 0, 0), font=font)
    if "keypoints" in det:
        for points, label in zip(det["keypoints"].float().cpu().tolist(), labels):
            count = schema[label] if label < len(schema) else 0
            edges = class_edges(schema, skeleton, label)
            draw_skeleton(pen, points[:count], edges, class_colour(label), width)
    return canvas


def draw_skeleton(
    pen: ImageDraw.ImageDraw,
    points: list[list[float]],
    edges: Sequence[tuple[int, int]],
    colour: tuple[int, int, int],
    width: int,
):
    """A class's keypoints: a line for each skeleton edge, then a white dot on each keypoint (no edges: dots
    only); only keypoints whose confidence reaches KEYPOINT_MIN_SCORE are drawn or joined."""
    shown = [(x, y) if s >= KEYPOINT_MIN_SCORE else None for x, y, s in points]
    for a, b in edges:
        if shown[a] is not None and shown[b] is not None:
            pen.line([shown[a], shown[b]], fill=colour, width=width)
    radius = 2 * width
    for p in shown:
        if p is not None:
            pen.ellipse(
                (p[0] - radius, p[1] - radius, p[0] + radius, p[1] + radius), fill=(255, 255, 255), outline=colour
            )
