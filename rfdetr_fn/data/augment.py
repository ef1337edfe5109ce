"""Upstream's augmentation presets (`aug_config`) as torch transforms on uint8 images and pixel-xyxy targets.

A config is an ordered mapping {transform name: parameters}, in upstream's Albumentations spelling, applied
after the scale jitter and before normalisation (upstream's order). Every transform first draws
`rand < p`, then its parameters, all from the sample's generator, so augmentation stays a pure function of
(seed, epoch, position). Geometric transforms move boxes (the enclosing box of the moved corners, then
clipped; boxes left without area are dropped with their masks), masks (nearest) and keypoints (see
data.keypoints: pixel-index convention, off-image points dropped) with one matrix.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rfdetr_fn.config import AUGMENTATION_DEFAULTS
from rfdetr_fn.data import keypoints as kp
from rfdetr_fn.data.transforms import Target, drop_degenerate, hflip, jitter_resize, rand

# upstream rfdetr.datasets.aug_configs, value for value
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {"HorizontalFlip": {"p": 0.5}},
    "none": {},
    "conservative": {
        "HorizontalFlip": {"p": 0.5},
        "RandomBrightnessContrast": {"brightness_limit": 0.1, "contrast_limit": 0.1, "p": 0.3},
    },
    "aggressive": {
        "HorizontalFlip": {"p": 0.5},
        "VerticalFlip": {"p": 0.5},
        "Rotate": {"limit": 45, "p": 0.5},
        "Affine": {
            "scale": (0.8, 1.2),
            "translate_percent": (-0.1, 0.1),
            "rotate": (-15, 15),
            "shear": (-5, 5),
            "p": 0.5,
        },
        "ColorJitter": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.1, "p": 0.5},
    },
    "aerial": {
        "HorizontalFlip": {"p": 0.5},
        "VerticalFlip": {"p": 0.5},
        "Rotate": {"limit": (90, 90), "p": 0.5},
        "RandomBrightnessContrast": {"brightness_limit": 0.15, "contrast_limit": 0.15, "p": 0.4},
    },
    "industrial": {
        "HorizontalFlip": {"p": 0.3},
        "RandomBrightnessContrast": {"brightness_limit": 0.2, "contrast_limit": 0.2, "p": 0.5},
        "GaussianBlur": {"blur_limit": 3, "p": 0.3},
        "GaussNoise": {"std_range": (0.01, 0.05), "p": 0.3},
    },
}
GRAY = (0.299, 0.587, 0.114)


# ------------------------------------------------------------------------------------------------ config
def resolve(preset: str, custom: str | None) -> dict[str, dict[str, Any]]:
    """The config a run uses: the custom one when given, else the named preset."""
    if custom is not None:
        return json.loads(custom)
    if preset not in PRESETS:
        raise ValueError(f"aug_preset={preset!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def train_transform(
    image: Tensor,
    target: Target,
    *,
    scales: Sequence[int],
    scale_jitter: bool,
    gen: torch.Generator,
    config: dict[str, dict[str, Any]] | None = None,
    flip_pairs: Sequence[int] | None = None,
) -> tuple[Tensor, Target]:
    """Upstream's training transform: scale jitter, then the augmentation config (default: the default preset,
    a horizontal flip with p=0.5).

    Keypoint targets flip with `flip_pairs`; an empty list or None means no horizontal flip for them
    (upstream drops it when left/right keypoints are unknown). The random draws are the same either way."""
    image, target = jitter_resize(image, target, scales=scales, scale_jitter=scale_jitter, gen=gen)
    return apply(image, target, PRESETS["default"] if config is None else config, gen, flip_pairs=flip_pairs)


def apply(
    image: Tensor,
    target: Target,
    config: dict[str, dict[str, Any]],
    gen: torch.Generator,
    flip_pairs: Sequence[int] | None = None,
):
    """Run the config's transforms in order, each with probability p.

    Keypoint targets: HorizontalFlip swaps `flip_pairs` (skipped without them, as upstream drops it); the
    other geometric transforms move keypoints without swapping slots."""
    for name, params in config.items():
        if rand(gen) < float(params.get("p", 0.5)):
            if "keypoints" in target and name == "HorizontalFlip":
                if flip_pairs:
                    image, target = hflip(image, target, flip_pairs)
                continue
            image, target = TRANSFORMS[name](image, target, {**AUGMENTATION_DEFAULTS[name], **params}, gen)
    return image, target


# ------------------------------------------------------------------------------------------------ sampling
def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * rand(gen)


def _range(value: Any, *, symmetric: bool = True, pivot: float = 0.0) -> tuple[float, float]:
    """Albumentations' reading of a limit: a scalar v is (pivot - v, pivot + v) (or (v, v)), a pair is itself."""
    if isinstance(value, (list, tuple)):
        return float(value[0]), float(value[1])
    v = float(value)
    return (pivot - v, pivot + v) if symmetric else (v, v)


# ----------------------------------------------------------------------------------------------- geometric
def _warp(image: Tensor, target: Target, matrix: Tensor) -> tuple[Tensor, Target]:
    """Apply a 3x3 map from input to output pixel coordinates (pixel edges at integers, size kept).

    Image bilinear and masks nearest, both with zero fill outside the input; boxes become the enclosing box of
    their moved corners, clipped to the image."""
    h, w = image.shape[-2:]
    inverse = torch.linalg.inv(matrix.double()).float()
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1) @ inverse.T  # output pixel -> input position
    grid = torch.stack([points[..., 0] / w * 2 - 1, points[..., 1] / h * 2 - 1], dim=-1)[None]
    x = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = dict(target)
    if "masks" in target and target["masks"].shape[0]:
        m = F.grid_sample(target["masks"][None].float(), grid, mode="nearest", align_corners=False)
        out["masks"] = m[0] > 0.5
    b = target["boxes"]
    corners = torch.stack([b[:, [0, 1]], b[:, [2, 1]], b[:, [0, 3]], b[:, [2, 3]]], dim=1)  # (N, 4 corners, xy)
    moved = torch.cat([corners, torch.ones_like(corners[..., :1])], dim=-1) @ matrix.T
    xy = moved[..., :2]
    boxes = torch.cat([xy.amin(dim=1), xy.amax(dim=1)], dim=-1).reshape(-1, 4)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    out["boxes"] = boxes
    if "keypoints" in target:
        out["keypoints"] = kp.warp(target["keypoints"], matrix, h, w)
    return x[0].round().clamp(0, 255).to(image.dtype), drop_degenerate(out)


def _about_centre(h: int, w: int, linear: Tensor, shift: tuple[float, float] = (0.0, 0.0)) -> Tensor:
    """Homogeneous matrix applying `linear` (2x2) about the image centre, then translating by `shift` pixels."""
    cx, cy = w / 2, h / 2
    m = torch.eye(3, dtype=torch.float64)
    m[:2, :2] = linear
    centre = torch.tensor([cx, cy], dtype=torch.float64)
    m[:2, 2] = centre - linear @ centre + torch.tensor(shift, dtype=torch.float64)
    return m


def _rotation(degrees: float) -> Tensor:
    """Counter-clockwise on screen (y points down), as OpenCV's getRotationMatrix2D."""
    t = math.radians(degrees)
    return torch.tensor([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]], dtype=torch.float64)


def horizontal_flip(image: Tensor, target: Target, params: dict, gen: torch.Generator):
    return hflip(image, target)


def vertical_flip(image: Tensor, target: Target, params: dict, gen: torch.Generator):
    """Mirror top-bottom; y1' = H - y2 and y2' = H - y1 (keypoints: see data.keypoints.vflip)."""
    h, w = image.shape[-2:]
    out = dict(target)
    b = target["boxes"]
    out["boxes"] = torch.stack([b[:, 0], h - b[:, 3], b[:, 2], h - b[:, 1]], dim=1)
    if "masks" in target:
        out["masks"] = target["masks"].flip(-2)
    if "keypoints" in target:
        out["keypoints"] = kp.vflip(target["keypoints"], h, w)
    return image.flip(-2), out


def rotate(image: Tensor, target: Target, params: dict, gen: torch.Generator):
    """Rotate about the centre by an angle drawn from `limit` degrees; corners left outside are cut."""
    angle = _uniform(gen, *_range(params["limit"]))
    h, w = image.shape[-2:]
    return _warp(image, target, _about_centre(h, w, _rotation(angle)).float())


def affine(image: Tensor, target: Target, params: dict, gen: torch.Generator):
    """Scale (x and y drawn apart), rotation, shear (x and y) about the centre, then a translation drawn per
    axis as a fraction of the side (Albumentations' Affine with keep_ratio=False)."""
    sx, sy = (_uniform(gen, *_range(params["scale"], symmetric=False)) for _ in range(2))
    tx, ty = (_uniform(gen, *_range(params["translate_percent"])) for _ in range(2))
    angle = _uniform(gen, *_range(params["rotate"]))
    shx, shy = (math.tan(math.radians(_uniform(gen, *_range(params["shear"])))) for _ in range(2))
    h, w = image.shape[-2:]
    shear = torch.tensor([[1.0, shx], [shy, 1.0]], dtype=torch.float64)
    scale = torch.diag(torch.tensor([sx, sy], dtype=torch.float64))
    matrix = _about_centre(h, w, _rotation(angle) @ shear @ scale, shift=(tx * w, ty * h))
    return _warp(image, target, matrix.float())


# ------------------------------------------------------------------------------------------------- colour
def _to_uint8(x: Tensor) -> Tensor:
    return x.round().clamp(0, 255).to(torch.uint8)


def _gray(x: Tensor) -> Tensor:
    return sum(c * x[i] for i, c in enumerate(GRAY))[None]


def _rgb_to_hsv(x: Tensor) -> Tensor:
    """float RGB in [0, 1] -> HSV with hue in [0, 1)."""
    r, g, b = x
    maxc, _ = x.max(dim=0)
    minc, _ = x.min(dim=0)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([hue, sat, maxc])


def _hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    table = torch.stack(
        [torch.stack(c) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]
    )  # (6 sectors, 3 channels, H, W)
    return table.gather(0, i[None, None].expand(1, 3, *i.shape))[0]


def _need_rgb(image: Tensor, name: str) -> None:
    if image.shape[0] != 3:
        raise ValueError(f"aug_config: {name} needs 3-channel images, got {image.shape[0]} channels")


def color_jitter(image: Tensor, target: Target, params: dict, gen: torch.Generator):
    """Brightness, contrast, saturation (factors in [1-v, 1+v]) and hue (shift in [-v, v] turns), in an order
    drawn per sample, as torchvision's and Albumentations' ColorJitter."""
    _need_rgb(image, "ColorJitter")
    x = image.float() / 255.0
    for k in torch.randperm(4, generator=gen).tolist():
        if k == 0 and params["brightness"]:
            x = (x * _uniform(gen, *_range(params["brightness"], pivot=1.0))).clamp(0, 1)
        elif k == 1 and params["contrast"]:
            f = _uniform(gen, *_range(params["contrast"], pivot=1.0))
            x = (x * f + _gray(x).mean() * (1 - f)).clamp(0, 1)
        elif k == 2 and params["saturation"]:
            f = _uniform(gen, *_range(params["saturation"], pivot=1.0))
            x = (x * f + _gray(x) * (1 - f)).clamp(0, 1)
        elif k == 3 and params["hue"]:
            hsv = _rgb_to_hsv(x)
            hsv[0] = (hsv[0] + _uniform(gen, *_range(params["hue"]))) % 1.0
            x = _hsv_to_rgb(hsv)
    return _to_uint8(x * 255.0), target


def brightness_contrast(image: Tensor, target: Target, params: dict, gen: torch.Generator):
    """x * (1 + c) + b * 255 with c, b drawn from the limits (Albumentations, brightness_by_max)."""
    alpha = 1.0 + _uniform(gen, *_range(params["contrast_limit"]))
    beta = _uniform(gen, *_range(params["brightness_limit"])) * 255.0
    return _to_uint8(image.float() * alpha + beta), target


def gaussian_blur(image: Tensor, target: Target, params: dict, gen: torch.Generator):
    """Odd kernel drawn from blur_limit (3 = always 3); sigma from the kernel size by OpenCV's rule."""
    low, high = _range(params["blur_limit"], symmetric=False)
    sizes = [k for k in range(int(low), int(high) + 1) if k % 2 == 1 and k >= 3] or [3]
    k = sizes[int(torch.randint(len(sizes), (1,), generator=gen))]
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    taps = torch.exp(-((torch.arange(k) - (k - 1) / 2) ** 2) / (2 * sigma**2))
    taps = taps / taps.sum()
    c = image.shape[0]
    x = F.pad(image.float()[None], (k // 2,) * 4, mode="reflect")
    x = F.conv2d(x, taps.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    x = F.conv2d(x, taps.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return _to_uint8(x[0]), target


def gauss_noise(image: Tensor, target: Target, params: dict, gen: torch.Generator):
    """Zero-mean Gaussian noise per pixel and channel, std drawn from std_range (a fraction of 255)."""
    std = _uniform(gen, *_range(params["std_range"], symmetric=False)) * 255.0
    noise = torch.randn(image.shape, generator=gen) * std
    return _to_uint8(image.float() + noise), target


def to_gray(image: Tensor, target: Target, params: dict, gen: torch.Generator):
    _need_rgb(image, "ToGray")
    return _to_uint8(_gray(image.float()).expand(3, -1, -1)), target


Transform = Callable[[Tensor, Target, dict, torch.Generator], tuple[Tensor, Target]]
TRANSFORMS: dict[str, Transform] = {
    "HorizontalFlip": horizontal_flip,
    "VerticalFlip": vertical_flip,
    "Rotate": rotate,
    "Affine": affine,
    "ColorJitter": color_jitter,
    "RandomBrightnessContrast": brightness_contrast,
    "GaussianBlur": gaussian_blur,
    "GaussNoise": gauss_noise,
    "ToGray": to_gray,
}
