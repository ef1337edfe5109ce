"""Dataset layouts, label maps, ground truth and bad-data reports (rfdetr_fn.data)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from rfdetr_fn import DataConfig, TrainConfig, presets
from rfdetr_fn.data import (
    DatasetError,
    build_dataset,
    check_class_names,
    check_images,
    detect_format,
    filter_parent_categories,
)
from rfdetr_fn.data.masks import decode_masks
from rfdetr_fn.data.synthetic import synthetic_source
from rfdetr_fn.data.transforms import MEAN, STD

DET = presets.nano(resolution=64)
SEG = presets.seg_nano(resolution=96)
TC = TrainConfig(multi_scale="off")


def _png(path: Path, w: int, h: int, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def _ann(aid, image_id, cat, bbox, **kw):
    return {"id": aid, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": bbox[2] * bbox[3],
            "iscrowd": 0, **kw}  # fmt: skip


CROWD_RLE = [0, 4, 26, 4, 1166]  # uncompressed, column-major: a 4x2 block in the top-left corner
CATS = [
    {"id": 0, "name": "animals", "supercategory": "none"},
    {"id": 1, "name": "cat", "supercategory": "animals"},
    {"id": 2, "name": "dog", "supercategory": "animals"},
]


def _roboflow(root: Path, valid_anns=None, valid_cats=CATS) -> Path:
    """train: 2 images (cat, dog, one crowd dog); valid: 1 image with a dog."""
    for name in ("a.png", "b.png"):
        _png(root / "train" / name, 40, 30)
    _png(root / "valid" / "c.png", 40, 30)
    train = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                   {"id": 2, "file_name": "b.png", "width": 40, "height": 30}],
        "annotations": [
            _ann(1, 1, 1, [2, 3, 10, 8], segmentation=[[2, 3, 12, 3, 12, 11, 2, 11]]),
            _ann(2, 2, 2, [5, 5, 20, 20], segmentation=[[5, 5, 25, 5, 25, 25, 5, 25]]),
            _ann(3, 2, 2, [0, 0, 4, 4], iscrowd=1, segmentation={"size": [30, 40], "counts": CROWD_RLE}),
        ],
        "categories": CATS,
    }  # fmt: skip
    valid = {
        "images": [{"id": 7, "file_name": "c.png", "width": 40, "height": 30}],
        "annotations": valid_anns if valid_anns is not None else [_ann(1, 7, 2, [1, 1, 10, 10])],
        "categories": valid_cats,
    }
    (root / "train" / "_annotations.coco.json").write_text(json.dumps(train))
    (root / "valid" / "_annotations.coco.json").write_text(json.dumps(valid))
    return root


def test_filter_parent_categories_keeps_self_parent_and_annotated_parent():
    person = {"id": 3, "name": "person", "supercategory": "person"}
    assert [c["name"] for c in filter_parent_categories([person, *CATS], {1})] == ["cat", "dog", "person"]
    assert [c["id"] for c in filter_parent_categories(CATS, {0, 1})] == [0, 1, 2]  # an annotated parent stays
    flat = [{"id": 4, "name": "a", "supercategory": "none"}, {"id": 2, "name": "b"}]
    assert [c["id"] for c in filter_parent_categories(flat, set())] == [2, 4]  # no parents: sorted by id


def test_roboflow_parent_filtered_labels_from_train(tmp_path):
    root = _roboflow(tmp_path)
    cfg = DataConfig(dataset_dir=str(root))
    assert detect_format(cfg) == "roboflow"
    train = build_dataset(cfg, "train", SEG, TC, train=False)
    valid = build_dataset(cfg, "valid", SEG, TC, train=False)
    assert train.class_names == ["cat", "dog"] and train.num_classes == 2
    assert train.label2cat == {0: 1, 1: 2} and valid.label2cat == train.label2cat
    img, t = valid[0]
    assert t["labels"].tolist() == [1]  # dog keeps the train label even though valid has no cat
    assert img.shape == (3, 96, 96) and t["size"].tolist() == [96, 96] and t["orig_size"].tolist() == [30, 40]
    torch.testing.assert_close(t["boxes"], torch.tensor([[6 / 40, 6 / 30, 10 / 40, 10 / 30]]))
    _, t2 = train[1]
    assert t2["labels"].tolist() == [1]  # the crowd dog is not a training target
    assert t2["masks"].shape == (1, 96, 96) and t2["masks"].any()
    gt = train.coco_gt()
    assert gt["categories"] == [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}]
    assert [a["iscrowd"] for a in gt["annotations"]] == [0, 0, 1]
    assert [a["category_id"] for a in gt["annotations"]] == [0, 1, 1]
    assert gt["annotations"][0]["bbox"] == [2.0, 3.0, 10.0, 8.0]
    assert all("segmentation" in a for a in gt["annotations"])
    assert [im["id"] for im in gt["images"]] == [1, 2] and gt["images"][0]["height"] == 30


def test_coco_mini_labels_crowd_and_masks(coco_mini_dir):
    cfg = DataConfig(dataset_dir=str(coco_mini_dir))
    ds = build_dataset(cfg, "train", SEG, TC, train=False)
    assert len(ds) == 100 and ds.num_classes == 80  # no superclass category: nothing filtered
    assert ds.label2cat[0] == 1 and ds.label2cat[79] == 90 and ds.class_names[0] == "person"
    gt = ds.coco_gt()
    assert len(gt["annotations"]) == 746 and sum(a["iscrowd"] for a in gt["annotations"]) == 6
    assert {c["id"] for c in gt["categories"]} == set(range(80))
    # an image with a crowd region: targets hold only the non-crowd instances, with decoded masks
    k = next(i for i, r in enumerate(ds.records) if r.iscrowd.any())
    _, t = ds[k]
    assert len(t["labels"]) == int((~ds.records[k].iscrowd).sum())
    assert t["masks"].shape == (len(t["labels"]), 96, 96)
    h, w = ds.images[k]["height"], ds.images[k]["width"]
    raw = ds.raw_target(k, h, w)  # full-size polygons: every mask is non-empty and fills its box
    assert raw["masks"].shape == (len(t["labels"]), h, w)
    for box, m in zip(raw["boxes"], raw["masks"]):
        ys, xs = torch.nonzero(m, as_tuple=True)
        mask_box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert (mask_box - box).abs().max() <= 2.0
    valid = build_dataset(cfg, "valid", DET, TC, train=False)
    assert len(valid) == 50 and valid.label2cat == ds.label2cat


def test_coco_gt_scores_perfect_detections(coco_mini_dir):
    """coco_gt() is valid pycocotools input: the non-crowd ground truth as detections gives AP 1."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ds = build_dataset(DataConfig(dataset_dir=str(coco_mini_dir)), "valid", DET, TC, train=False)
    gt_dict = ds.coco_gt()
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt_dict["annotations"] if not a["iscrowd"]]  # fmt: skip
    gt = COCO()
    gt.dataset = gt_dict
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0) and ev.stats[8] == pytest.approx(1.0)


def _coco2017(root: Path) -> Path:
    cats = [{"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}]
    for part in ("train", "val"):
        _png(root / f"{part}2017" / "x.jpg", 32, 32)
        data = {"images": [{"id": 3, "file_name": "x.jpg", "width": 32, "height": 32}],
                "annotations": [_ann(1, 3, 5, [4, 4, 8, 8])], "categories": cats}  # fmt: skip
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{part}2017.json").write_text(json.dumps(data))
    return root


def test_raw_coco2017_uses_raw_category_ids(tmp_path):
    cfg = DataConfig(dataset_dir=str(_coco2017(tmp_path)))
    assert detect_format(cfg) == "coco"
    ds = build_dataset(cfg, "test", DET, TC, train=False)  # test reads val2017
    assert ds.num_classes == 5 and ds.class_names == ["", "person", "", "", "", "airplane"]
    assert ds[0][1]["labels"].tolist() == [5] and ds.label2cat == {1: 1, 5: 5}
    assert ds.coco_gt()["categories"] == [{"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}]


def _yolo(root: Path, yaml_text: str = "names: [cat, dog]\n") -> Path:
    _png(root / "train" / "images" / "a.png", 40, 20)
    _png(root / "train" / "images" / "bg.png", 40, 20)  # no label file: background
    (root / "train" / "labels").mkdir(parents=True)
    (root / "train" / "labels" / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n1 0.1 0.1 0.4 0.1 0.4 0.6 0.1 0.6\n")
    _png(root / "valid" / "images" / "v.png", 40, 20)
    (root / "data.yaml").write_text(yaml_text)
    return root


def test_yolo_boxes_polygons_and_background(tmp_path):
    cfg = DataConfig(dataset_dir=str(_yolo(tmp_path)))
    assert detect_format(cfg) == "yolo"
    ds = build_dataset(cfg, "train", SEG, TC, train=False)
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2 and len(ds) == 2
    gt = ds.coco_gt()
    boxes = [a["bbox"] for a in gt["annotations"]]
    np.testing.assert_allclose(boxes, [[10, 5, 20, 10], [4, 2, 12, 10]], atol=1e-4)
    assert "segmentation" in gt["annotations"][1] and gt["annotations"][1]["area"] == pytest.approx(120)
    _, t = ds[0]
    assert t["labels"].tolist() == [0, 1]
    m = t["masks"][1]  # polygon mask: x 4..16 of 40, y 2..12 of 20, at 96x96
    ys, xs = torch.nonzero(m, as_tuple=True)
    assert abs(xs.min().item() - 4 / 40 * 96) <= 2 and abs(xs.max().item() + 1 - 16 / 40 * 96) <= 2
    assert abs(ys.min().item() - 2 / 20 * 96) <= 2 and abs(ys.max().item() + 1 - 12 / 20 * 96) <= 2
    assert not t["masks"][0].any()  # box-only line: empty mask
    _, bg = ds[1]
    assert len(bg["labels"]) == 0 and bg["boxes"].shape == (0, 4) and bg["masks"].shape == (0, 96, 96)
    assert len(build_dataset(cfg, "val", DET, TC, train=False)) == 1  # 'valid/' found for 'val'


def test_yolo_split_paths_from_yaml(tmp_path):
    root = _yolo(tmp_path, "names: {0: cat, 1: dog}\ntrain: ../train/images\nval: ../valid/images\n")
    ds = build_dataset(DataConfig(dataset_dir=str(root)), "train", DET, TC, train=False)
    assert len(ds) == 2 and ds.class_names == ["cat", "dog"]


def test_synthetic_deterministic_and_consistent():
    cfg = DataConfig(synthetic_images=8, synthetic_size=64, synthetic_classes=4)
    a = build_dataset(cfg, "train", SEG, TC, train=True)
    b = build_dataset(cfg, "train", SEG, TC, train=True)
    assert len(a) == 8 and len(build_dataset(cfg, "valid", SEG, TC, train=False)) == 2
    assert a.class_names == ["red rectangle", "green ellipse", "blue triangle", "yellow rectangle"]
    assert a.coco_gt() == b.coco_gt()
    for i in range(3):
        (xa, ta), (xb, tb) = a[i], b[i]
        assert torch.equal(xa, xb) and torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["masks"], tb["masks"])
    reseeded = synthetic_source(cfg, "train", seed=1)
    assert [x["bbox"] for x in reseeded.annotations] != [x["bbox"] for x in a.coco_gt()["annotations"]]
    # pixels agree with masks: shapes are saturated colours, the background is noisy grey
    native = DataConfig(synthetic_images=4, synthetic_size=96, synthetic_classes=4)
    x, t = build_dataset(native, "train", SEG, TC, train=False)[1]
    rgb = x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    spread = rgb.max(0).values - rgb.min(0).values
    inside = t["masks"].any(0)
    assert len(t["labels"]) >= 1 and spread[inside].mean() > 0.5 and spread[~inside].mean() < 0.2


def test_decode_masks_polygon_and_rle():
    ref = torch.zeros((3, 10, 12), dtype=torch.bool)
    ref[0, 2:6, 3:9] = True
    ref[1, :2, :4] = True
    ref[2, 5:, 6:] = True
    compressed = mask_utils.encode(np.asfortranarray(ref[2].numpy().astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode()
    segs = [
        [[3, 2, 9, 2, 9, 6, 3, 6]],
        {"size": [10, 12], "counts": [0, 2, 8, 2, 8, 2, 8, 2, 88]},
        compressed,
        None,
    ]
    out = decode_masks(segs, 10, 12)
    assert out.shape == (4, 10, 12) and not out[3].any()
    assert torch.equal(out[1:3], ref[1:3])
    assert (out[0] ^ ref[0]).sum() <= 10  # polygon rasterisation differs from the ideal box on one edge


def test_class_names_shift_is_an_error_and_reorder_a_warning():
    with pytest.raises(ValueError, match="parent category"):
        check_class_names(["animals", "cat", "dog"], ["cat", "dog"], "x")
    with pytest.warns(UserWarning, match="reordering"):
        assert check_class_names(["dog", "cat"], ["cat", "dog"], "x") == ["dog", "cat"]
    assert check_class_names(["cat", "dog"], ["cat", "dog"], "x") == ["cat", "dog"]


# ------------------------------------------------------------------------------------------- bad data
def test_problems_collected_into_one_report(tmp_path):
    anns = [_ann(1, 7, 9, [1, 1, 5, 5]), _ann(2, 99, 1, [1, 1, 5, 5]), {"id": 3, "image_id": 7}]
    root = _roboflow(tmp_path, valid_anns=anns)
    (root / "train" / "b.png").unlink()
    cfg = DataConfig(dataset_dir=str(root))
    with pytest.raises(DatasetError) as err:
        build_dataset(cfg, "valid", DET, TC, train=False)
    msg = str(err.value)
    assert "3 problem(s)" in msg and "_annotations.coco.json" in msg
    assert "annotation id 1: unknown category id 9" in msg
    assert "annotation id 2: image_id 99" in msg and "annotation id 3" in msg
    with pytest.raises(DatasetError, match=r"1 problem\(s\):\n.*missing image file .*b\.png"):
        build_dataset(cfg, "train", DET, TC, train=False)


def test_category_outside_train_label_map(tmp_path):
    root = _roboflow(tmp_path, valid_anns=[_ann(1, 7, 0, [1, 1, 5, 5])])  # the dropped parent, used in valid
    with pytest.raises(DatasetError, match="not in the train split's label map"):
        build_dataset(DataConfig(dataset_dir=str(root)), "valid", DET, TC, train=False)


def test_box_outside_image_clipped_with_warning(tmp_path):
    root = _roboflow(tmp_path, valid_anns=[_ann(1, 7, 2, [30, 20, 50, 50]), _ann(2, 7, 2, [50, 0, 5, 5])])
    with pytest.warns(UserWarning, match=r"dropped 1 annotation\(s\): 1 entirely outside.*clipped 1 box"):
        ds = build_dataset(DataConfig(dataset_dir=str(root)), "valid", DET, TC, train=False)
    assert [a["bbox"] for a in ds.coco_gt()["annotations"]] == [[30.0, 20.0, 10.0, 10.0]]  # 2nd fully outside


def test_unreadable_image_named(tmp_path):
    root = _roboflow(tmp_path)
    (root / "valid" / "c.png").write_bytes(b"not an image")
    ds = build_dataset(DataConfig(dataset_dir=str(root)), "valid", DET, TC, train=False)
    with pytest.raises(DatasetError, match=r"c\.png: unreadable image"):
        ds[0]
    with pytest.raises(DatasetError, match=r"(?s)1 unusable image.*c\.png: unreadable image"):
        check_images([ds])


def test_empty_split_and_missing_split(tmp_path):
    root = _roboflow(tmp_path)
    data = json.loads((root / "valid" / "_annotations.coco.json").read_text())
    data["images"], data["annotations"] = [], []
    (root / "valid" / "_annotations.coco.json").write_text(json.dumps(data))
    cfg = DataConfig(dataset_dir=str(root))
    with pytest.raises(DatasetError, match="empty split"):
        build_dataset(cfg, "valid", DET, TC, train=False)
    with pytest.raises(DatasetError, match="test.*split directory not found"):
        build_dataset(cfg, "test", DET, TC, train=False)


def test_yolo_errors(tmp_path):
    root = _yolo(tmp_path / "a", "nc: 2\n")
    with pytest.raises(DatasetError, match="data.yaml: no 'names'"):
        build_dataset(DataConfig(dataset_dir=str(root)), "train", DET, TC, train=False)
    root = _yolo(tmp_path / "b")
    with pytest.raises(DatasetError, match="missing split directory for 'test'"):
        build_dataset(DataConfig(dataset_dir=str(root)), "test", DET, TC, train=False)
    (root / "train" / "labels" / "bg.txt").write_text("5 0.5 0.5 0.1 0.1\n0 0.5 x 0.1 0.1\n0 0.1 0.2 0.3\n")
    with pytest.raises(DatasetError) as err:
        build_dataset(DataConfig(dataset_dir=str(root)), "train", DET, TC, train=False)
    msg = str(err.value)
    assert "3 problem(s)" in msg and "bg.txt:1: unknown class id 5" in msg
    assert "bg.txt:2: non-numeric" in msg and "bg.txt:3: 4 values" in msg


def test_no_layout_recognised(tmp_path):
    with pytest.raises(DatasetError, match="no dataset layout recognised"):
        detect_format(DataConfig(dataset_dir=str(tmp_path)))
    with pytest.raises(DatasetError, match="dataset_dir not found"):
        detect_format(DataConfig(dataset_dir=str(tmp_path / "nope")))
