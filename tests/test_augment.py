"""Augmentation presets: geometry of each transform, boxes and masks moved together, determinism, config checks."""

from __future__ import annotations

import json

import pytest
import torch

from rfdetr_fn import DataConfig, TrainConfig, flags, presets
from rfdetr_fn.config import AUGMENTATION_DEFAULTS
from rfdetr_fn.data import augment, build_dataset
from rfdetr_fn.fit import FitArgs
from tests.test_data_pipeline import _mask_boxes


def _scene(side: int = 96) -> tuple[torch.Tensor, dict]:
    """A square image with two rectangles whose masks match their boxes exactly."""
    image = torch.zeros((3, side, side), dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 20.0, 30.0, 50.0], [50.0, 40.0, 80.0, 60.0]])
    masks = torch.zeros((2, side, side), dtype=torch.bool)
    for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
        masks[k, y1:y2, x1:x2] = True
        image[k, y1:y2, x1:x2] = 255
    return image, {"boxes": boxes, "labels": torch.tensor([0, 1]), "masks": masks}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_vertical_flip_and_rotate_90_are_exact():
    image, target = _scene()
    img, t = augment.vertical_flip(image, target, {}, _gen())
    assert t["boxes"][0].tolist() == [10, 96 - 50, 30, 96 - 20] and torch.equal(img, image.flip(-2))
    # Rotate by exactly 90 degrees counter-clockwise (OpenCV's sign): the same as torch.rot90
    img, t = augment.rotate(image, target, {"limit": (90, 90)}, _gen())
    assert torch.equal(img, torch.rot90(image, 1, dims=(-2, -1)))
    assert torch.equal(t["masks"], torch.rot90(target["masks"], 1, dims=(-2, -1)))
    assert t["boxes"][0].tolist() == pytest.approx([20, 96 - 30, 50, 96 - 10], abs=1e-4)


@pytest.mark.parametrize("name", ["Rotate", "Affine"])
def test_geometric_transforms_keep_boxes_on_masks(name):
    """Axis-aligned shapes under rotation/shear: the box is the enclosing box of the moved corners, so it
    contains the moved mask and the mask fills it within the nearest-neighbour error."""
    image, target = _scene()
    params = {**AUGMENTATION_DEFAULTS[name], **augment.PRESETS["aggressive"][name]}
    checked = 0
    for seed in range(12):
        img, t = augment.TRANSFORMS[name](image, target, params, _gen(seed))
        assert img.shape == image.shape and img.dtype == torch.uint8
        assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"])
        assert (t["boxes"][:, 2:] > t["boxes"][:, :2]).all() and t["boxes"].min() >= 0 and t["boxes"].max() <= 96
        for box, mask in zip(t["boxes"], t["masks"]):
            if mask.any():
                inside = _mask_boxes(mask[None])[0]
                assert (inside[:2] >= box[:2] - 1.5).all() and (inside[2:] <= box[2:] + 1.5).all(), seed
                checked += 1
        # the image's channel k follows mask k
        for k in range(len(t["labels"])):
            label = int(t["labels"][k])
            if t["masks"][k].sum() > 20:
                assert img[label][t["masks"][k]].float().mean() > 150
    assert checked > 12


def test_affine_identity_and_translation():
    image, target = _scene()
    base = dict(AUGMENTATION_DEFAULTS["Affine"])
    img, t = augment.affine(image, target, base, _gen())
    assert torch.equal(img, image) and torch.allclose(t["boxes"], target["boxes"], atol=1e-4)
    shifted = {**base, "translate_percent": (0.125, 0.125)}  # 12 pixels right and down
    img, t = augment.affine(image, target, shifted, _gen())
    assert torch.allclose(t["boxes"][0], target["boxes"][0] + 12, atol=1e-3)
    assert torch.equal(img[:, 12:, 12:], image[:, :-12, :-12]) and torch.equal(
        t["masks"][:, 12:, 12:], target["masks"][:, :-12, :-12]
    )


def test_pixel_transforms_math():
    image = torch.full((3, 8, 8), 100, dtype=torch.uint8)
    target = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)}
    params = {"brightness_limit": (0.1, 0.1), "contrast_limit": (0.2, 0.2)}
    img, _ = augment.brightness_contrast(image, target, params, _gen())
    assert int(img[0, 0, 0]) == round(100 * 1.2 + 0.1 * 255)
    rgb = torch.rand(3, 16, 16)
    assert torch.allclose(augment._hsv_to_rgb(augment._rgb_to_hsv(rgb)), rgb, atol=1e-5)
    flat = torch.full((3, 9, 9), 77, dtype=torch.uint8)
    assert torch.equal(augment.gaussian_blur(flat, target, {"blur_limit": 3}, _gen())[0], flat)
    noisy, _ = augment.gauss_noise(flat, target, {"std_range": (0.05, 0.05)}, _gen())
    assert 8 < (noisy.float() - 77).std() < 18  # 0.05 * 255 = 12.75
    gray, _ = augment.to_gray(torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1), target, {}, _gen())
    assert gray.flatten().tolist() == [76, 76, 76]  # 0.299 * 255
    jittered, _ = augment.color_jitter(image, target, AUGMENTATION_DEFAULTS["ColorJitter"], _gen())
    assert jittered.shape == image.shape and not torch.equal(jittered, image)


@pytest.mark.parametrize("preset", sorted(augment.PRESETS))
def test_every_preset_is_deterministic_and_consistent(preset):
    image, target = _scene()
    config = augment.PRESETS[preset]
    for seed in range(6):
        a = augment.train_transform(image, target, scales=[64, 96], scale_jitter=True, gen=_gen(seed), config=config)
        b = augment.train_transform(image, target, scales=[64, 96], scale_jitter=True, gen=_gen(seed), config=config)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
        assert torch.equal(a[1]["masks"], b[1]["masks"])
        assert len(a[1]["boxes"]) == len(a[1]["labels"]) == len(a[1]["masks"])


def test_default_preset_is_the_old_pipeline():
    """The default preset draws exactly as the pipeline did before presets existed: jitter, then flip p=0.5."""
    image, target = _scene()
    for seed in range(8):
        a = augment.train_transform(image, target, scales=[64, 96], scale_jitter=True, gen=_gen(seed))
        gen = _gen(seed)
        from rfdetr_fn.data import transforms as T

        img, t = T.jitter_resize(image, target, scales=[64, 96], scale_jitter=True, gen=gen)
        if T.rand(gen) < 0.5:
            img, t = T.hflip(img, t)
        assert torch.equal(a[0], img) and torch.equal(a[1]["boxes"], t["boxes"])


def test_config_checks_and_sources(tmp_path):
    with pytest.raises(ValueError, match="unknown transform 'Mosaic'"):
        TrainConfig(aug_config={"Mosaic": {}})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) limt"):
        TrainConfig(aug_config='{"Rotate": {"limt": 10}}')
    with pytest.raises(ValueError, match="p=2"):
        TrainConfig(aug_config={"HorizontalFlip": {"p": 2}})
    with pytest.raises(ValueError, match="choose one"):
        TrainConfig(aug_preset="aerial", aug_config={"HorizontalFlip": {}})
    # a dict in a config file, JSON text on the command line; both become the same checked JSON
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  aug_config:\n    VerticalFlip: {p: 1.0}\n    Rotate: {limit: [10, 20]}\n")
    args = flags.parse(FitArgs, ["--config", str(path)])
    assert json.loads(args.train.aug_config) == {"VerticalFlip": {"p": 1.0}, "Rotate": {"limit": [10, 20]}}
    flag = flags.parse(FitArgs, ["--train.aug-config", '{"VerticalFlip": {"p": 1.0}}'])
    assert augment.resolve(flag.train.aug_preset, flag.train.aug_config) == {"VerticalFlip": {"p": 1.0}}
    assert flags.parse(FitArgs, ["--train.aug-preset", "aerial"]).train.aug_preset == "aerial"


def test_dataset_applies_the_preset_per_sample_seed():
    """A vertical flip with p=1 reaches the dataset's samples; (index, seed) pairs stay reproducible."""
    cfg = presets.tiny(num_classes=3, resolution=64)
    dcfg = DataConfig(synthetic_images=4, synthetic_size=64, num_workers=0)
    plain = build_dataset(
        dcfg, "train", cfg, TrainConfig(multi_scale="off", scale_jitter=False, aug_preset="none"), train=True
    )
    flipped = build_dataset(
        dcfg,
        "train",
        cfg,
        TrainConfig(multi_scale="off", scale_jitter=False, aug_config={"VerticalFlip": {"p": 1.0}}),
        train=True,
    )
    a, b = plain[(1, 7)], flipped[(1, 7)]
    assert torch.allclose(a[0].flip(-2), b[0])
    cy = a[1]["boxes"][:, 1]
    assert torch.allclose(b[1]["boxes"][:, 1], 1 - cy, atol=1e-6)
    aggressive = build_dataset(dcfg, "train", cfg, TrainConfig(multi_scale="off", aug_preset="aggressive"), train=True)
    assert torch.equal(aggressive[(2, 11)][0], aggressive[(2, 11)][0])


def test_every_checked_augmentation_is_implemented():
    """config checks aug_config against AUGMENTATION_DEFAULTS; data.augment implements exactly those."""
    assert set(augment.TRANSFORMS) == set(AUGMENTATION_DEFAULTS)
