"""Geometric augmentation and normalisation in torch, matching upstream's default pipeline.

Images travel as uint8 (3, H, W) tensors through the geometric steps (every resize rounds back to
uint8, as upstream's PIL/torchvision path does), so normalisation happens once at the end with a true
division by 255. Targets travel as {"boxes": (N, 4) float32 xyxy pixels, "labels": (N,) int64,
"masks": (N, H, W) bool (optional)}; every per-instance tensor is filtered together.
Randomness comes only from the `torch.Generator` passed in, so a sample is a pure function of its seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rfdetr_fn.data import keypoints as kp

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
JITTER_SHORT_SIDES = (400, 500, 600)
CROP_MIN, CROP_MAX = 384, 600
INSTANCE_KEYS = ("boxes", "labels", "masks", "keypoints")

Target = dict[str, Tensor]


# ----------------------------------------------------------------------------------------------- scales
def multi_scale_scales(resolution: int, expanded: bool, patch_size: int, num_windows: int) -> list[int]:
    """Square training sides around `resolution`, each a multiple of patch_size*num_windows.

    Offsets are -5..5 blocks when expanded, else -3..4; sides below two blocks are dropped.
    """
    block = patch_size * num_windows
    base = resolution // block
    offsets = range(-5, 6) if expanded else range(-3, 5)
    return [(base + k) * block for k in offsets if (base + k) * block >= 2 * block]


def per_batch_scale(step: int, scales: Sequence[int]) -> int:
    """The side for optimizer step `step`: the same on every rank and every accumulation micro-batch."""
    return random.Random(step).choice(list(scales))


# ----------------------------------------------------------------------------------------------- random
def randint(gen: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high] (both inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=gen))


def rand(gen: torch.Generator) -> float:
    return float(torch.rand((), generator=gen))


# ------------------------------------------------------------------------------------------- primitives
def _resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    # uint8 in, uint8 out: torch's fast antialiased kernel (the one torchvision uses for PIL parity)
    x = image[None].contiguous()
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def _resize_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size))
    # nearest-exact samples pixel centres, keeping masks on their boxes ("nearest" shifts half a pixel)
    return F.interpolate(masks[None].to(torch.uint8), size=size, mode="nearest-exact")[0].bool()


def resize(image: Tensor, target: Target, size: tuple[int, int]) -> tuple[Tensor, Target]:
    """Resize to (h, w): bilinear with antialias for the image, nearest for masks, boxes scaled."""
    h, w = image.shape[-2:]
    out = dict(target)
    out["boxes"] = target["boxes"] * torch.tensor([size[1] / w, size[0] / h] * 2, dtype=torch.float32)
    if "masks" in target:
        out["masks"] = _resize_masks(target["masks"], size)
    if "keypoints" in target:
        out["keypoints"] = kp.scale(target["keypoints"], size[1] / w, size[0] / h)
    return _resize_image(image, size), out


def short_side_size(h: int, w: int, short: int) -> tuple[int, int]:
    """(h, w) with the short side set to `short`, aspect kept (long side truncated, as torchvision)."""
    if h <= w:
        return short, int(short * w / h)
    return int(short * h / w), short


def filter_instances(target: Target, keep: Tensor) -> Target:
    """Apply one boolean selection to every per-instance tensor."""
    return {k: (v[keep] if k in INSTANCE_KEYS else v) for k, v in target.items()}


def drop_degenerate(target: Target) -> Target:
    """Drop boxes with no width or height (they cannot be matched or regressed)."""
    b = target["boxes"]
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return target if bool(keep.all()) else filter_instances(target, keep)


def crop(image: Tensor, target: Target, top: int, left: int, height: int, width: int) -> tuple[Tensor, Target]:
    """Cut a window; boxes are shifted and clipped, and instances left without area are dropped."""
    out = dict(target)
    shift = torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes = target["boxes"] - shift
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    out["boxes"] = boxes
    if "masks" in target:
        out["masks"] = target["masks"][:, top : top + height, left : left + width]
    if "keypoints" in target:
        out["keypoints"] = kp.shift(target["keypoints"], left, top, height, width)
    return image[:, top : top + height, left : left + width], drop_degenerate(out)


def hflip(image: Tensor, target: Target, flip_pairs: Sequence[int] = ()) -> tuple[Tensor, Target]:
    """Mirror left-right; x1' = W - x2 and x2' = W - x1 (keypoints: see data.keypoints.hflip)."""
    h, w = image.shape[-2:]
    out = dict(target)
    b = target["boxes"]
    out["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    if "masks" in target:
        out["masks"] = target["masks"].flip(-1)
    if "keypoints" in target:
        out["keypoints"] = kp.hflip(target["keypoints"], h, w, flip_pairs)
    return image.flip(-1), out


def normalize(image: Tensor) -> Tensor:
    """uint8 (3, H, W) -> float32 ImageNet-normalised; the /255 is a true division, as upstream."""
    mean = torch.tensor(MEAN, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(-1, 1, 1)
    return image.to(torch.float32).div_(255.0).sub_(mean).div_(std)


def boxes_to_cxcywh_normalized(boxes: Tensor, h: int, w: int) -> Tensor:
    """Pixel xyxy -> cxcywh relative to the (unpadded) image side."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    out = torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)
    return out / torch.tensor([w, h, w, h], dtype=torch.float32)


# --------------------------------------------------------------------------------------------- pipelines
def random_crop_window(h: int, w: int, gen: torch.Generator) -> tuple[int, int, int, int]:
    """Upstream's RandomSizedCrop(384, 600): side lengths drawn independently, then a uniform position."""
    cw = randint(gen, min(CROP_MIN, w), min(w, CROP_MAX))
    ch = randint(gen, min(CROP_MIN, h), min(h, CROP_MAX))
    top = randint(gen, 0, h - ch)
    left = randint(gen, 0, w - cw)
    return top, left, ch, cw


def jitter_resize(
    image: Tensor, target: Target, *, scales: Sequence[int], scale_jitter: bool, gen: torch.Generator
) -> tuple[Tensor, Target]:
    """Scale jitter: square resize, or (p=0.5) resize-crop-resize, to a side drawn from `scales`.

    The rest of the training transform (flips and the other presets) is `augment.train_transform`."""
    side = scales[randint(gen, 0, len(scales) - 1)]
    if scale_jitter and rand(gen) >= 0.5:
        short = JITTER_SHORT_SIDES[randint(gen, 0, len(JITTER_SHORT_SIDES) - 1)]
        image, target = resize(image, target, short_side_size(*image.shape[-2:], short))
        image, target = crop(image, target, *random_crop_window(*image.shape[-2:], gen))
    return resize(image, target, (side, side))


def eval_transform(image: Tensor, target: Target, resolution: int) -> tuple[Tensor, Target]:
    """Square resize to the model resolution (validation, test and prediction)."""
    return resize(image, target, (resolution, resolution))


def finalize(image: Tensor, target: Target) -> tuple[Tensor, Target]:
    """Clip, drop degenerate boxes, normalise the image and turn boxes into normalised cxcywh."""
    h, w = image.shape[-2:]
    boxes = target["boxes"].clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    out = drop_degenerate({**target, "boxes": boxes})
    out["boxes"] = boxes_to_cxcywh_normalized(out["boxes"], h, w)
    if "keypoints" in out:
        out["keypoints"] = kp.normalise(kp.clean(out["keypoints"], h, w), h, w)
    out["size"] = torch.tensor([h, w], dtype=torch.int64)
    return normalize(image), out


# ------------------------------------------------------------------------------------------- batch level
def resize_batch(batch: dict[str, Tensor], scale: int) -> dict[str, Tensor]:
    """Per-batch multi-scale: resize a collated batch to (scale, scale).

    Images bilinear (align_corners=False, no antialias, like upstream's on-batch interpolate); the padding
    mask and instance masks nearest. Boxes are normalised, so they need no change; `size` is rescaled.
    """
    H, W = batch["images"].shape[-2:]
    if (scale, scale) == (H, W):
        return batch
    size = (scale, scale)
    out = dict(batch)
    out["images"] = F.interpolate(batch["images"], size=size, mode="bilinear", align_corners=False)
    out["mask"] = F.interpolate(batch["mask"][:, None].float(), size=size, mode="nearest")[:, 0].bool()
    if "masks" in batch:
        m = batch["masks"]
        if m.shape[1]:
            out["masks"] = F.interpolate(m.float(), size=size, mode="nearest").bool()
        else:
            out["masks"] = m.new_zeros((m.shape[0], 0, *size))
    ratio = torch.tensor([scale / H, scale / W], dtype=torch.float64, device=batch["size"].device)
    out["size"] = (batch["size"].double() * ratio).round().to(torch.int64)
    return out
