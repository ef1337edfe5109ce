"""Transforms, multi-scale, collate and sampling (rfdetr_fn.data)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from rfdetr_fn import DataConfig, TrainConfig, presets
from rfdetr_fn.data import (
    augment,
    build_dataset,
    collate,
    epoch_indices,
    epoch_length,
    eval_loader,
    multi_scale_scales,
    num_train_batches,
    per_batch_scale,
    resize_batch,
    target_slots,
    train_loader,
)
from rfdetr_fn.data import transforms as T

# ---------------------------------------------------------------------------------------- multi-scale


def test_multi_scale_matches_golden_for_every_variant(golden_dir):
    variants = json.loads((golden_dir / "recipe" / "multi_scale.json").read_text())["variants"]
    assert len(variants) >= 14
    for name, v in variants.items():
        args = (v["resolution"], v["patch_size"], v["num_windows"])
        assert multi_scale_scales(args[0], True, *args[1:]) == v["expanded"], name
        assert multi_scale_scales(args[0], False, *args[1:]) == v["not_expanded"], name
        picks = [per_batch_scale(step, v["expanded"]) for step in range(20)]
        assert picks == v["per_batch_choice_steps_0_to_19_expanded"], name


def test_multi_scale_modes_set_sample_sizes():
    cfg = DataConfig(synthetic_images=6, synthetic_size=48)
    model = presets.nano(resolution=64, patch_size=8, num_windows=1)  # scales 24..104 step 8
    scales = multi_scale_scales(64, True, 8, 1)
    assert scales == list(range(24, 105, 8))
    per_batch = build_dataset(cfg, "train", model, TrainConfig(multi_scale="per-batch"), train=True)
    assert {per_batch[i][0].shape[-1] for i in range(6)} == {104}
    per_sample = build_dataset(cfg, "train", model, TrainConfig(multi_scale="per-sample"), train=True)
    sides = {per_sample[(i % 6, 1000 + i)][0].shape[-1] for i in range(30)}
    assert sides <= set(scales) and len(sides) >= 4
    off = build_dataset(cfg, "train", model, TrainConfig(multi_scale="off"), train=True)
    assert {off[i][0].shape[-1] for i in range(6)} == {64}
    val = build_dataset(cfg, "valid", model, TrainConfig(), train=False)
    assert val[0][0].shape == (3, 64, 64)


# ---------------------------------------------------------------------------------------- transforms
def _scene(h: int = 300, w: int = 420):
    """A uint8 image with three axis-aligned rectangles; masks are exactly their boxes."""
    boxes = torch.tensor([[10, 20, 110, 90], [200, 150, 400, 290], [300, 5, 330, 60]], dtype=torch.float32)
    masks = torch.zeros((3, h, w), dtype=torch.bool)
    image = torch.zeros((3, h, w), dtype=torch.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
        masks[k, y1:y2, x1:x2] = True
        image[k, y1:y2, x1:x2] = 255
    return image, {"boxes": boxes, "labels": torch.tensor([0, 1, 2]), "masks": masks}


def _mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    out = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        out.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return torch.tensor(out, dtype=torch.float32)


def test_train_transform_keeps_boxes_on_masks():
    image, target = _scene()
    seen_crop = seen_flip = 0
    for seed in range(24):
        gen = torch.Generator().manual_seed(seed)
        img, t = augment.train_transform(image, target, scales=[96, 128, 160], scale_jitter=True, gen=gen)
        side = img.shape[-1]
        assert img.shape == (3, side, side) and side in (96, 128, 160) and img.dtype == torch.uint8
        assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"])
        keep = t["masks"].flatten(1).any(1)  # a sliver may vanish when nearest-resized
        err = (_mask_boxes(t["masks"][keep]) - t["boxes"][keep]).abs().max() if keep.any() else 0
        assert err <= 2.0, seed
        assert (t["boxes"][:, 2:] > t["boxes"][:, :2]).all()
        assert t["boxes"].min() >= 0 and t["boxes"].max() <= side
        seen_crop += len(t["labels"]) < 3
        # the image's red channel follows mask 0 (255 inside, 0 outside) within the resize blur
        if t["labels"].tolist()[:1] == [0]:
            inside = img[0][t["masks"][0]].float().mean()
            assert inside > 150
        seen_flip += int(t["labels"].tolist() == [0, 1, 2] and t["boxes"][0, 0] > side / 2)
    assert seen_crop > 0 and seen_flip > 0  # both random branches were exercised


def test_transform_is_a_function_of_the_generator_seed():
    image, target = _scene()
    a = augment.train_transform(
        image, target, scales=[96, 128], scale_jitter=True, gen=torch.Generator().manual_seed(3)
    )
    b = augment.train_transform(
        image, target, scales=[96, 128], scale_jitter=True, gen=torch.Generator().manual_seed(3)
    )
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])


def test_hflip_crop_and_resize_geometry():
    image, target = _scene()
    img, t = T.hflip(image, target)
    assert t["boxes"][0].tolist() == [420 - 110, 20, 420 - 10, 90] and torch.equal(img[0].flip(-1), image[0])
    img, t = T.crop(image, target, top=50, left=100, height=200, width=250)
    assert img.shape == (3, 200, 250)
    assert t["labels"].tolist() == [0, 1, 2] or t["labels"].tolist() == [0, 1]
    assert t["boxes"][0].tolist() == [0, 0, 10, 40]  # clipped at the window's corner
    assert t["boxes"][1].tolist() == [100, 100, 250, 200]
    img, t = T.crop(image, target, top=100, left=0, height=100, width=150)
    assert t["labels"].tolist() == []  # nothing left inside: all dropped
    img, t = T.resize(image, target, (150, 840))
    assert t["boxes"][0].tolist() == [20, 10, 220, 45]
    torch.testing.assert_close(_mask_boxes(t["masks"]), t["boxes"], atol=0.5, rtol=0)
    assert T.short_side_size(300, 420, 400) == (400, 560) and T.short_side_size(500, 250, 400) == (800, 400)


def test_normalize_true_division_and_cxcywh():
    u8 = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(3, 16, 16)
    x = T.normalize(u8)
    mean = torch.tensor(T.MEAN).view(3, 1, 1)
    std = torch.tensor(T.STD).view(3, 1, 1)
    assert torch.equal(x, (u8.float() / 255.0 - mean) / std) and x.dtype == torch.float32
    img, t = T.finalize(torch.zeros((3, 100, 200), dtype=torch.uint8), {
        "boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0], [5.0, 5.0, 5.0, 9.0], [190.0, 90.0, 230.0, 120.0]]),
        "labels": torch.tensor([4, 5, 6]),
    })  # fmt: skip
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.2, 0.3, 0.2, 0.4], [0.975, 0.95, 0.05, 0.1]]))
    assert t["labels"].tolist() == [4, 6] and t["size"].tolist() == [100, 200]


# ---------------------------------------------------------------------------------------- collate
def _sample(h, w, n, masks=False, image_id=1):
    t = {
        "boxes": torch.rand(n, 4),
        "labels": torch.arange(n),
        "image_id": torch.tensor(image_id),
        "orig_size": torch.tensor([h * 2, w * 2]),
        "size": torch.tensor([h, w]),
    }
    if masks:
        t["masks"] = torch.ones((n, h, w), dtype=torch.bool)
    return torch.ones((3, h, w)), t


def test_collate_pads_images_masks_and_targets():
    batch = collate([_sample(40, 70, 3, True, 5), _sample(64, 50, 9, True, 6)], block_size=32)
    assert set(batch) == {"images", "mask", "labels", "boxes", "masks", "image_id", "orig_size", "size"}
    assert batch["images"].shape == (2, 3, 64, 96) and batch["images"].dtype == torch.float32
    assert batch["mask"].shape == (2, 64, 96) and batch["mask"].dtype == torch.bool
    assert not batch["mask"][0, :40, :70].any() and batch["mask"][0, 40:].all() and batch["mask"][0, :, 70:].all()
    assert batch["images"][0, :, 40:].abs().sum() == 0 and batch["images"][0, :, :40, :70].eq(1).all()
    assert batch["labels"].shape == (2, 16) and batch["labels"][0, 3:].eq(-1).all()
    assert batch["labels"][1, :9].tolist() == list(range(9)) and batch["boxes"][0, 3:].abs().sum() == 0
    assert batch["masks"].shape == (2, 16, 64, 96) and batch["masks"][0, :3, :40, :70].all()
    assert not batch["masks"][0, :3, 40:].any() and not batch["masks"][0, 3:].any()
    assert batch["image_id"].tolist() == [5, 6] and batch["size"].tolist() == [[40, 70], [64, 50]]
    assert batch["orig_size"].dtype == torch.int64
    empty = collate([_sample(32, 32, 0)], block_size=32)
    assert empty["labels"].shape == (1, 8) and "masks" not in empty and not empty["mask"].any()
    assert collate([_sample(30, 30, 8)], block_size=16, target_pad=8)["labels"].shape == (1, 8)


def test_resize_batch_per_batch_scale():
    batch = collate([_sample(40, 70, 3, True), _sample(64, 50, 2, True)], block_size=32)
    out = resize_batch(batch, 48)
    assert out["images"].shape == (2, 3, 48, 48) and out["mask"].shape == (2, 48, 48)
    assert out["masks"].shape == (2, 8, 48, 48) and out["masks"].dtype == torch.bool
    assert out["size"].tolist() == [[30, 35], [48, 25]]
    assert torch.equal(out["boxes"], batch["boxes"]) and out["mask"][0, -1].all() and not out["mask"][0, 0, 0]
    assert resize_batch(out, 48) is out


# ---------------------------------------------------------------------------------------- sampling
def test_replacement_sampling_for_tiny_datasets():
    assert epoch_length(10, 4, 1) == 20
    pairs = epoch_indices(10, 4, seed=1, epoch=0)
    idx = [i for i, _ in pairs]
    assert len(idx) == 20 and set(idx) <= set(range(10)) and len(set(idx)) < 20
    assert len({s for _, s in pairs}) == 20  # repeats still get their own augmentation seed


def test_aligned_epochs_cover_the_dataset():
    assert epoch_length(22, 4, 1) == 24 and epoch_length(20, 4, 1) == 20 and epoch_length(41, 8, 1) == 48
    pairs = epoch_indices(22, 4, seed=0, epoch=0)
    idx = [i for i, _ in pairs]
    assert len(idx) == 24 and set(idx) == set(range(22))
    again = epoch_indices(22, 4, seed=0, epoch=0)
    assert again == pairs and [i for i, _ in epoch_indices(22, 4, seed=0, epoch=1)] != idx
    pad_e0 = sorted(idx)
    pad_e1 = sorted(i for i, _ in epoch_indices(22, 4, seed=5, epoch=3))
    assert pad_e0 == pad_e1  # the padding indices come from a fixed generator


def test_distributed_shards_disjoint_and_covering():
    n, eff, world = 22, 4, 2
    assert epoch_length(n, eff, world) == 40  # at least 5 effective batches per rank
    shards = [epoch_indices(n, eff, world_size=world, rank=r, seed=7, epoch=2) for r in range(world)]
    assert all(len(s) == 20 for s in shards)
    seeds = [s for shard in shards for _, s in shard]
    assert len(set(seeds)) == 40  # disjoint positions of one global list
    assert set(i for shard in shards for i, _ in shard) == set(range(n))
    assert shards[0] != shards[1]
    assert epoch_length(100, 4, 3) == 108 and len(epoch_indices(100, 4, world_size=3, rank=2)) == 36
    with pytest.raises(ValueError, match="rank"):
        epoch_indices(10, 2, world_size=2, rank=2)


def test_fixed_target_slots_for_compiled_steps():
    """A compiled step recompiles per shape, so fit fixes T for the run: every batch has the same target
    axis, sized for the image with the most annotations; a sample that does not fit is named."""
    fixed = collate([_sample(32, 32, 3, False, 7)], block_size=32, slots=24)
    assert fixed["labels"].shape == (1, 24) and fixed["boxes"].shape == (1, 24, 4)
    with pytest.raises(ValueError, match="image_id 9 has 25 targets but the batch has 24"):
        collate([_sample(32, 32, 3, False, 7), _sample(32, 32, 25, False, 9)], block_size=32, slots=24)
    data = DataConfig(synthetic_images=12, synthetic_size=48, num_workers=0)
    model = presets.nano(resolution=48, patch_size=12, num_windows=2)
    tc = TrainConfig(batch_size=2, multi_scale="off", seed=3)
    ds = build_dataset(data, "train", model, tc, train=True)
    most = max(len(r.labels) for r in ds.records)
    assert target_slots(ds) == max(8, -(-most // 8) * 8) and target_slots(ds, pad=1) == most
    assert target_slots([1, 2, 3]) is None  # a dataset that does not list its annotations
    shapes = {tuple(b["labels"].shape) for b in train_loader(ds, tc, data, seed=3, slots=40)}
    assert shapes == {(2, 40)}


def test_train_and_eval_loaders_end_to_end():
    data = DataConfig(synthetic_images=12, synthetic_size=48, num_workers=0)
    model = presets.seg_nano(resolution=48, patch_size=12, num_windows=2)
    tc = TrainConfig(batch_size=2, grad_accum_steps=2, multi_scale="per-batch", seed=3)
    ds = build_dataset(data, "train", model, tc, train=True)
    loader = train_loader(ds, tc, data, seed=3, epoch=0)
    assert len(loader) == num_train_batches(12, tc) == 10  # 12 < 5*4: 20 samples drawn with replacement
    batches = list(loader)
    assert len(batches) == len(loader)
    b = batches[0]
    side = max(multi_scale_scales(48, True, 12, 2))
    assert b["images"].shape == (2, 3, side, side) and b["masks"].shape[:2] == (2, 8)
    again = list(itertools.islice(train_loader(ds, tc, data, seed=3, epoch=0), 2))
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(batches, again))
    loader.sampler.set_epoch(1)
    assert not torch.equal(next(iter(loader))["images"], b["images"])
    val = build_dataset(data, "valid", model, tc, train=False)
    ev = list(eval_loader(val, tc, data))
    assert sum(len(x["image_id"]) for x in ev) == 3 and ev[0]["images"].shape[-1] == 48
    shards = [list(eval_loader(val, batch_size=1, world_size=2, rank=r)) for r in range(2)]
    assert [[b["image_id"].item() for b in s] for s in shards] == [[1, 3], [2]]


@pytest.mark.slow
def test_workers_do_not_change_batches():
    data0 = DataConfig(synthetic_images=8, synthetic_size=48, num_workers=0)
    data2 = DataConfig(synthetic_images=8, synthetic_size=48, num_workers=2)
    model = presets.nano(resolution=64)
    tc = TrainConfig(batch_size=2, seed=1)
    ds = build_dataset(data0, "train", model, tc, train=True)
    a = list(train_loader(ds, tc, data0, seed=1, epoch=4))
    b = list(train_loader(ds, tc, data2, seed=1, epoch=4))
    assert len(a) == len(b) and all(torch.equal(x["images"], y["images"]) for x, y in zip(a, b))


def test_resize_batch_keeps_every_tensor_on_the_batch_device():
    """Regression: `size` was rescaled with a CPU tensor, which broke per-batch multi-scale on CUDA."""
    batch = {
        "images": torch.zeros(1, 3, 64, 64, device="meta"),
        "mask": torch.zeros(1, 64, 64, dtype=torch.bool, device="meta"),
        "size": torch.zeros(1, 2, dtype=torch.int64, device="meta"),
    }
    out = resize_batch(batch, 96)
    assert {t.device.type for t in out.values()} == {"meta"} and out["images"].shape[-1] == 96
