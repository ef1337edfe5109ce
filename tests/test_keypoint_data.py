"""Keypoint data: COCO and YOLO pose annotations, synthetic corners, flip/resize rules, bad-data errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from rfdetr_fn import DataConfig, TrainConfig, presets
from rfdetr_fn.data import DatasetError, augment, build_dataset, collate, resize_batch
from rfdetr_fn.data import keypoints as kp
from rfdetr_fn.data import transforms as T

KP = presets.tiny_keypoint(num_classes=2, num_keypoints_per_class=(4, 3), resolution=64)
TC = TrainConfig(multi_scale="off")
CATS = [
    {"id": 1, "name": "quad", "keypoints": ["left_ear", "right_ear", "nose", "tail"]},
    {"id": 2, "name": "tri", "keypoints": ["left_wing", "right_wing", "beak"]},
]


def _png(path: Path, w: int = 40, h: int = 30) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(path)


def _roboflow(root: Path, anns: list[dict], cats=CATS, valid_cats=None) -> Path:
    for split, cs in (("train", cats), ("valid", valid_cats or cats)):
        _png(root / split / "a.png")
        data = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}], "annotations": anns,
                "categories": cs}  # fmt: skip
        (root / split / "_annotations.coco.json").write_text(json.dumps(data))
    return root


QUAD = {"id": 7, "image_id": 1, "category_id": 1, "bbox": [2, 3, 20, 15], "area": 300, "iscrowd": 0,
        "keypoints": [4, 5, 2, 18, 5, 2, 10, 12, 1, 0, 0, 0], "num_keypoints": 3}  # fmt: skip
TRI = {"id": 8, "image_id": 1, "category_id": 2, "bbox": [24, 4, 12, 20], "area": 240, "iscrowd": 0,
       "keypoints": [25, 6, 2, 35, 6, 2, 30, 20, 2]}  # fmt: skip


def test_keypoint_coco_annotations_schema_and_ground_truth(tmp_path):
    ds = build_dataset(DataConfig(dataset_dir=str(_roboflow(tmp_path, [QUAD, TRI]))), "valid", KP, TC, train=False)
    assert ds.keypoint_schema == (4, 3) and ds.keypoint_names[1] == ["left_wing", "right_wing", "beak"]
    assert ds.flip_pairs == (0, 1)  # both classes pair slots 0 and 1 by their left/right names
    image, target = ds[0]
    assert target["keypoints"].shape == (2, 4, 3)
    torch.testing.assert_close(target["keypoints"][0, 0], torch.tensor([4 / 40, 5 / 30, 2.0]))
    assert target["keypoints"][1, 3].tolist() == [0.0, 0.0, 0.0]  # class 1 has 3 keypoints: slot 3 is padding
    gt = ds.coco_gt()
    assert gt["annotations"][0]["keypoints"] == [4.0, 5.0, 2.0, 18.0, 5.0, 2.0, 10.0, 12.0, 1.0, 0.0, 0.0, 0.0]
    assert gt["annotations"][1]["num_keypoints"] == 3 and len(gt["annotations"][1]["keypoints"]) == 9
    assert gt["categories"][0]["keypoints"] == CATS[0]["keypoints"]
    batch = collate([ds[0]], 32)
    assert batch["keypoints"].shape == (1, 8, 4, 3) and not batch["keypoints"][0, 2:].any()


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"keypoints": [4, 5, 2, 18, 5, 2]}, r"annotation id 7 \(category quad\): 'keypoints' has 6 values, want 4"),
        ({"keypoints": [4, 5, 3, 18, 5, 2, 10, 12, 1, 0, 0, 0]}, r"annotation id 7 .*visibility \[3.0\] outside 0..2"),
    ],
)
def test_keypoint_bad_annotations_fail_early_naming_file_and_annotation(tmp_path, bad, message):
    root = _roboflow(tmp_path, [{**QUAD, **bad}, TRI])
    with pytest.raises(DatasetError, match=message) as err:
        build_dataset(DataConfig(dataset_dir=str(root)), "train", KP, TC, train=True)
    assert "_annotations.coco.json" in str(err.value)


def test_keypoint_coco_skeleton_becomes_the_model_skeleton(tmp_path):
    """COCO's 1-based per-category skeleton -> flat 0-based indices into the schema's keypoints (class 1's
    start at 4), which fit puts in the model config; an edge past the category's count is an error naming it."""
    from rfdetr_fn.fit import _align_keypoints

    cats = [{**CATS[0], "skeleton": [[1, 2], [3, 4]]}, {**CATS[1], "skeleton": [[1, 3]]}]
    root = _roboflow(tmp_path / "ok", [QUAD, TRI], cats=cats)
    ds = build_dataset(DataConfig(dataset_dir=str(root)), "train", KP, TC, train=False)
    assert ds.keypoint_skeleton == (0, 1, 2, 3, 4, 6)
    assert _align_keypoints(KP, ds).keypoint_skeleton == (0, 1, 2, 3, 4, 6)
    bad = [CATS[0], {**CATS[1], "skeleton": [[1, 4]]}]
    root = _roboflow(tmp_path / "bad", [QUAD, TRI], cats=bad)
    with pytest.raises(DatasetError, match=r"category id 2 \(tri\): skeleton edge \[1, 4\] must join two .* 1\.\.3"):
        build_dataset(DataConfig(dataset_dir=str(root)), "train", KP, TC, train=False)


def test_keypoint_schema_mismatch_between_splits_is_an_error(tmp_path):
    cats = [CATS[0], {**CATS[1], "keypoints": ["a", "b"]}]
    tri2 = {**TRI, "keypoints": [25, 6, 2, 35, 6, 2]}
    root = _roboflow(tmp_path, [QUAD, tri2], cats=CATS, valid_cats=cats)
    (root / "train" / "_annotations.coco.json").write_text(
        json.dumps({**json.loads((root / "train" / "_annotations.coco.json").read_text()), "annotations": [QUAD, TRI]})
    )
    with pytest.raises(DatasetError, match=r"valid.*keypoints per class \[4, 2\] differ .*\[4, 3\]"):
        build_dataset(DataConfig(dataset_dir=str(root)), "valid", KP, TC, train=False)


def test_keypoint_yolo_pose_labels(tmp_path):
    root = tmp_path
    (root / "data.yaml").write_text("names: [quad, tri]\nkpt_shape: [3, 3]\nflip_idx: [1, 0, 2]\n")
    _png(root / "train" / "images" / "a.png", 40, 20)
    labels = root / "train" / "labels"
    labels.mkdir(parents=True)
    (labels / "a.txt").write_text("0 0.5 0.5 0.5 0.5 0.25 0.25 2 0.75 0.25 1 0.5 0.75 0\n")
    cfg = presets.tiny_keypoint(num_classes=2, num_keypoints_per_class=(3, 3), resolution=64)
    ds = build_dataset(DataConfig(dataset_dir=str(root)), "train", cfg, TC, train=False)
    assert ds.keypoint_schema == (3, 3) and ds.flip_pairs == (0, 1)
    assert ds.coco_gt()["annotations"][0]["keypoints"] == [10.0, 5.0, 2.0, 30.0, 5.0, 1.0, 0.0, 0.0, 0.0]
    (labels / "a.txt").write_text("0 0.5 0.5 0.5 0.5 0.25 0.25 2\n")
    with pytest.raises(DatasetError, match=r"a.txt:1: 8 values, want 5 \+ 3 keypoints x 3 = 14"):
        build_dataset(DataConfig(dataset_dir=str(root)), "train", cfg, TC, train=False)
    (root / "data.yaml").write_text("names: [quad, tri]\nkpt_shape: [3, 4]\n")
    with pytest.raises(DatasetError, match=r"data.yaml: kpt_shape=\[3, 4\]"):
        build_dataset(DataConfig(dataset_dir=str(root)), "train", cfg, TC, train=False)


def test_keypoint_flip_equals_golden(golden_dir):
    """Upstream's flip: boxes x -> W - x, keypoints x -> (W - 1) - x, pair slots swapped for every
    instance, off-image keypoints dropped; then normalisation."""
    g = load_file(golden_dir / "tiny_kp" / "flip_augmentation.safetensors")
    image = g["input.image"].permute(2, 0, 1).contiguous()
    target = {"boxes": g["input.boxes"], "labels": g["input.labels"], "keypoints": g["input.keypoints"]}
    pairs = kp.merged_flip_pairs(
        (4, 3), [["left_ear", "right_ear", "nose", "tail"], ["left_wing", "right_wing", "beak"]]
    )
    assert pairs == (0, 1)
    flipped, out = T.hflip(image, target, pairs)
    assert torch.equal(flipped.permute(1, 2, 0), g["flipped.image"])
    torch.testing.assert_close(out["boxes"], g["flipped.boxes"])
    torch.testing.assert_close(out["keypoints"], g["flipped.keypoints"])
    normalised, final = T.finalize(flipped, out)
    torch.testing.assert_close(normalised, g["normalized.image"], rtol=0, atol=1e-6)
    torch.testing.assert_close(final["boxes"], g["normalized.boxes"])
    torch.testing.assert_close(final["keypoints"], g["normalized.keypoints"])


def test_keypoint_flip_pairs_rules():
    assert kp.pairs_from_names(["nose", "Left Eye", "right-eye", "left_ear", "right_ear"]) == [1, 2, 3, 4]
    assert kp.merged_flip_pairs((2, 2), [["left", "right"], ["a", "b"]]) == ()  # classes disagree: no flip
    assert kp.pairs_from_flip_idx([0, 2, 1, 4, 3]) == [1, 2, 3, 4]
    target = {"boxes": torch.tensor([[2.0, 2.0, 10.0, 10.0]]), "labels": torch.tensor([0]),
              "keypoints": torch.tensor([[[3.0, 3.0, 2.0], [8.0, 8.0, 2.0]]])}  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    flips = set()
    for _ in range(8):  # without pairs a keypoint target is never flipped
        _, out = augment.train_transform(
            torch.zeros(3, 20, 20, dtype=torch.uint8), target, scales=(20,), scale_jitter=False, gen=gen, flip_pairs=()
        )
        flips.add(out["keypoints"][0, 0, 0].item())
    assert flips == {3.0}


def _kp_target(points: list[list[float]], box=(0.0, 0.0, 19.0, 19.0)) -> dict:
    return {"boxes": torch.tensor([box]), "labels": torch.tensor([0]), "keypoints": torch.tensor([points])}


def test_keypoint_vertical_flip_moves_y_and_swaps_no_slots():
    """Albumentations' rule: y -> (H - 1) - y, x and visibility kept; no slot swap even with left/right
    pairs (upstream counts only horizontal mirrors); unlabelled points stay (0, 0, 0)."""
    points = [[5.0, 3.0, 2.0], [7.0, 2.0, 1.0], [0.0, 0.0, 0.0]]
    config = {"VerticalFlip": {"p": 1.0}}
    image = torch.zeros(3, 20, 30, dtype=torch.uint8)
    image[0, 3, 5] = 255
    flipped, out = augment.apply(image, _kp_target(points), config, torch.Generator(), flip_pairs=(0, 1))
    assert out["keypoints"][0].tolist() == [[5.0, 16.0, 2.0], [7.0, 17.0, 1.0], [0.0, 0.0, 0.0]]
    assert flipped[0, 16, 5] == 255  # the keypoint's pixel went where the keypoint went
    assert out["boxes"][0].tolist() == [0.0, 1.0, 19.0, 20.0]


def test_keypoint_rotate_follows_the_image_and_drops_off_image_points():
    """A 90 degree turn (counter-clockwise on screen) about the pixel-index centre (9.5, 9.5) of a 20 x 20
    image sends pixel (x=4, y=6) to (6, 15); the image's marked pixel lands on the same spot."""
    image = torch.zeros(3, 20, 20, dtype=torch.uint8)
    image[:, 6, 4] = 255
    target = _kp_target([[4.0, 6.0, 2.0], [12.0, 3.0, 1.0]], box=(2.0, 2.0, 14.0, 10.0))
    config = {"Rotate": {"limit": (90, 90), "p": 1.0}}
    turned, out = augment.apply(image, target, config, torch.Generator())
    torch.testing.assert_close(out["keypoints"][0], torch.tensor([[6.0, 15.0, 2.0], [3.0, 7.0, 1.0]]))
    assert (turned[:, 15, 6] == 255).all() and int((turned > 0).sum()) == 3
    shifted = {"Affine": {"translate_percent": (0.5, 0.5), "p": 1.0}}  # +10 px right and down
    _, out = augment.apply(image, _kp_target([[2.0, 3.0, 2.0], [15.0, 5.0, 2.0]], box=(0.0, 0.0, 16.0, 8.0)),
                           shifted, torch.Generator())  # fmt: skip
    torch.testing.assert_close(out["keypoints"][0], torch.tensor([[12.0, 13.0, 2.0], [0.0, 0.0, 0.0]]))


def test_keypoint_affine_scale_about_the_centre():
    """Scale 2 about the pixel-index centre (9.5, 9.5): (7, 8) -> (4.5, 6.5); (1, 1) leaves the image."""
    config = {"Affine": {"scale": (2.0, 2.0), "p": 1.0}}
    _, out = augment.apply(torch.zeros(3, 20, 20, dtype=torch.uint8),
                           _kp_target([[7.0, 8.0, 2.0], [1.0, 1.0, 2.0]]), config, torch.Generator())  # fmt: skip
    torch.testing.assert_close(out["keypoints"][0], torch.tensor([[4.5, 6.5, 2.0], [0.0, 0.0, 0.0]]))


def test_keypoint_resize_and_multi_scale():
    target = {"boxes": torch.tensor([[0.0, 0.0, 20.0, 10.0]]), "labels": torch.tensor([0]),
              "keypoints": torch.tensor([[[10.0, 5.0, 2.0], [0.0, 0.0, 0.0]]])}  # fmt: skip
    _, out = T.resize(torch.zeros(3, 10, 20, dtype=torch.uint8), target, (40, 80))
    assert out["keypoints"][0].tolist() == [[40.0, 20.0, 2.0], [0.0, 0.0, 0.0]]
    batch = {"images": torch.zeros(1, 3, 32, 32), "mask": torch.zeros(1, 32, 32, dtype=torch.bool),
             "keypoints": torch.rand(1, 8, 2, 3), "size": torch.tensor([[32, 32]])}  # fmt: skip
    assert torch.equal(resize_batch(batch, 64)["keypoints"], batch["keypoints"])  # normalised: unchanged


def test_keypoint_synthetic_corners():
    cfg = presets.tiny_keypoint(resolution=64)
    ds = build_dataset(DataConfig(synthetic_images=4, synthetic_size=64), "valid", cfg, TC, train=False)
    assert ds.keypoint_schema == (4, 4, 3) and ds.flip_pairs == ()
    gt = ds.coco_gt()
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        pts = np.array(ann["keypoints"]).reshape(-1, 3)
        if ann["category_id"] == 0:  # rectangle: its corners are the box corners
            np.testing.assert_allclose(pts[:, :2], [[x, y], [x + w, y], [x + w, y + h], [x, y + h]], atol=1e-4)
        assert (pts[:, 0] >= x - 1e-4).all() and (pts[:, 0] <= x + w + 1e-4).all() and (pts[:, 2] == 2).all()
