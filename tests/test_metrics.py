"""COCO mAP equals a direct pycocotools run (and faster_coco_eval); F1 sweep follows upstream's rules."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from rfdetr_fn.eval.coco import (
    UPSTREAM_IOU_THRESHOLDS,
    UPSTREAM_RECALL_THRESHOLDS,
    Detections,
    Evaluator,
    coco_map,
    detections_to_coco,
    f1_sweep,
)
from tests.f1_reference import reference_f1_sweep

STATS = [
    "mAP_50_95",
    "mAP_50",
    "mAP_75",
    "mAP_small",
    "mAP_medium",
    "mAP_large",
    "mAR_1",
    "mAR_10",
    "mAR",
    "mAR_small",
    "mAR_medium",
    "mAR_large",
]


# --------------------------------------------------------------------------------------------------
# coco_mini fixtures: raw JSON, the label-space dict the data pipeline hands over, and noisy predictions


@pytest.fixture(scope="module")
def raw_path(coco_mini_dir):
    return coco_mini_dir / "valid" / "_annotations.coco.json"


@pytest.fixture(scope="module")
def raw(raw_path):
    return json.loads(raw_path.read_text())


@pytest.fixture(scope="module")
def label_gt(raw):
    """Sparse category ids -> contiguous labels (sorted by id), as the data contract delivers ground truth."""
    cat2label = {c["id"]: i for i, c in enumerate(sorted(raw["categories"], key=lambda c: c["id"]))}
    gt = copy.deepcopy({k: raw[k] for k in ("images", "annotations", "categories")})
    for ann in gt["annotations"]:
        ann["category_id"] = cat2label[ann["category_id"]]
    for cat in gt["categories"]:
        cat["id"] = cat2label[cat["id"]]
    return gt, {v: k for k, v in cat2label.items()}


def noisy_predictions(raw, seed=0, image_ids=None):
    """Per image: GT boxes jittered ~10% of their size, ~15% missed, a few relabelled, 0-4 random FPs."""
    rng = np.random.default_rng(seed)
    cat_ids = sorted(c["id"] for c in raw["categories"])
    cat2label = {c: i for i, c in enumerate(cat_ids)}
    by_image = {img["id"]: [] for img in raw["images"]}
    for ann in raw["annotations"]:
        by_image[ann["image_id"]].append(ann)
    images = {img["id"]: img for img in raw["images"]}
    out = {}
    for image_id in image_ids or sorted(by_image):
        img = images[image_id]
        boxes, labels = [], []
        for ann in by_image[image_id]:
            if ann["iscrowd"] or rng.random() < 0.15:
                continue
            x, y, w, h = ann["bbox"]
            x1, y1 = x + rng.normal(0, 0.1) * w, y + rng.normal(0, 0.1) * h
            x2, y2 = x + w + rng.normal(0, 0.1) * w, y + h + rng.normal(0, 0.1) * h
            boxes.append([x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)])
            label = cat2label[ann["category_id"]]
            labels.append(int(rng.integers(len(cat_ids))) if rng.random() < 0.1 else label)
        for _ in range(int(rng.integers(0, 5))):
            x1, y1 = rng.uniform(0, img["width"] - 20), rng.uniform(0, img["height"] - 20)
            boxes.append([x1, y1, x1 + rng.uniform(5, 200), y1 + rng.uniform(5, 200)])
            labels.append(int(rng.integers(len(cat_ids))))
        out[image_id] = {
            "boxes": torch.tensor(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)),
            "scores": torch.tensor(rng.uniform(0.01, 1.0, len(boxes))),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }
    return out


def raw_results(preds, label2cat):
    """The same detections in raw category ids, built without detections_to_coco (xyxy -> xywh by hand)."""
    results = []
    for image_id, p in preds.items():
        b = p["boxes"].numpy()
        for (x1, y1, x2, y2), s, lab in zip(b, p["scores"].tolist(), p["labels"].tolist()):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": label2cat[lab],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": s,
                }
            )
    return results


# What upstream hands every backend: torchmetrics' default grids, torch.linspace in float32, then .tolist().
TM_IOU_THRS = torch.linspace(0.5, 0.95, round((0.95 - 0.5) / 0.05) + 1, dtype=torch.float32).tolist()
TM_REC_THRS = torch.linspace(0.0, 1.00, round(1.00 / 0.01) + 1, dtype=torch.float32).tolist()


def pycocotools_stats(raw_path, results, iou_type="bbox", image_ids=None, stock_grids=False):
    """Plain pycocotools on the raw JSON file: maxDets 1, 10, 100, summarize(); upstream's grids unless stock."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(raw_path))
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        if not stock_grids:
            ev.params.iouThrs = np.asarray(TM_IOU_THRS, dtype=np.float64)
            ev.params.recThrs = np.asarray(TM_REC_THRS, dtype=np.float64)
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(STATS, ev.stats.tolist()))


def assert_stats_close(ours, ref, tol=1e-6):
    for key in STATS:
        assert ours[key] == pytest.approx(ref[key], abs=tol), key


# --------------------------------------------------------------------------------------------------
# coco_map


@pytest.fixture(scope="module")
def bbox_case(raw, raw_path, label_gt):
    gt, label2cat = label_gt
    preds = noisy_predictions(raw, seed=0)
    assert max(len(p["scores"]) for p in preds.values()) < 100  # so maxDets 100 and 500 agree
    dets = detections_to_coco(list(preds), list(preds.values()))
    ref = pycocotools_stats(raw_path, raw_results(preds, label2cat))
    return gt, preds, dets, ref


def test_coco_map_matches_direct_pycocotools(bbox_case):
    gt, _, dets, ref = bbox_case
    assert 0.2 < ref["mAP_50_95"] < 0.9 and ref["mAP_50"] > ref["mAP_75"]  # a non-trivial case
    assert_stats_close(coco_map(gt, dets, max_dets=(1, 10, 100)), ref)
    assert_stats_close(coco_map(gt, dets), ref)  # default (1, 10, 500): no image has 100 detections


def test_faster_coco_eval_backend_gives_same_numbers(bbox_case):
    pytest.importorskip("faster_coco_eval")
    gt, _, dets, ref = bbox_case
    ours = coco_map(gt, dets, backend="faster_coco_eval", per_class=True)
    assert_stats_close(ours, ref)
    slow = coco_map(gt, dets, per_class=True)
    assert set(ours) == set(slow)
    for key in slow:
        assert ours[key] == pytest.approx(slow[key], abs=1e-6), key


def test_per_class_ap_names_and_mean(bbox_case, label_gt):
    gt, _, dets, ref = bbox_case
    out = coco_map(gt, dets, per_class=True)
    per_class = {k: v for k, v in out.items() if k.startswith("AP/")}
    with_gt = {a["category_id"] for a in gt["annotations"] if not a["iscrowd"]}
    assert len(per_class) == len(with_gt) and "AP/person" in per_class
    # Every class with GT fills the whole IoU x recall grid, so mAP is the mean of the per-class APs.
    assert np.mean(list(per_class.values())) == pytest.approx(ref["mAP_50_95"], abs=1e-9)
    # Explicit class names (indexed by label) override the categories' names.
    names = [f"c{i}" for i in range(len(gt["categories"]))]
    renamed = coco_map(gt, dets, per_class=True, class_names=names)
    assert renamed["AP/c0"] == out["AP/person"]


def test_coco_map_does_not_mutate_inputs(bbox_case):
    gt, _, dets, _ = bbox_case
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    coco_map(gt, dets)
    assert gt == gt_before and dets == dets_before


def test_no_detections_gives_zero(label_gt):
    gt, _ = label_gt
    out = coco_map(gt, [])
    assert set(out) == set(STATS) and all(v == 0.0 for v in out.values())
    segm = coco_map(gt, [], iou_type="segm", backend="pycocotools")
    assert set(segm) == set(STATS) and all(v == 0.0 for v in segm.values())


def test_images_without_gt_count_false_positives():
    gt = {
        "images": [{"id": 1, "height": 100, "width": 100}, {"id": 2, "height": 100, "width": 100}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 0, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0}
        ],
        "categories": [{"id": 0, "name": "a"}],
    }
    hit = {"image_id": 1, "category_id": 0, "bbox": [10, 10, 30, 30], "score": 0.5}
    assert coco_map(gt, [hit])["mAP_50"] == pytest.approx(1.0)
    # A higher-scoring detection on the background image ranks first: precision 1/2 at recall 1.
    fp = {"image_id": 2, "category_id": 0, "bbox": [10, 10, 30, 30], "score": 0.9}
    out = coco_map(gt, [hit, fp])
    assert out["mAP_50"] == pytest.approx(0.5, abs=0.01) and out["mAR"] == pytest.approx(1.0)
    assert out["mAP_large"] == -1.0  # no large GT: undefined, as COCOeval reports it


def test_coco_map_bad_input():
    gt = {"images": [{"id": 1, "height": 10, "width": 10}], "annotations": [], "categories": []}
    with pytest.raises(ValueError, match="'annotations'"):
        coco_map({"images": [], "categories": []}, [])
    with pytest.raises(ValueError, match=r"image_id\(s\) not in gt"):
        coco_map(gt, [{"image_id": 7, "category_id": 0, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(ValueError, match="max_dets"):
        coco_map(gt, [], max_dets=(10, 1, 100))
    with pytest.raises(ValueError, match="annotation #0 needs"):
        coco_map({**gt, "annotations": [{"image_id": 1, "category_id": 0}]}, [])
    # id, area and iscrowd may be left out: they get COCO's defaults (area from the box).
    minimal = {**gt, "annotations": [{"image_id": 1, "category_id": 0, "bbox": [0, 0, 4, 4]}]}
    minimal["categories"] = [{"id": 0, "name": "a"}]
    hit = {"image_id": 1, "category_id": 0, "bbox": [0, 0, 4, 4], "score": 1.0}
    assert coco_map(minimal, [hit])["mAP_small"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="backend"):
        coco_map(gt, [], backend="vernier")
    with pytest.raises(ValueError, match="segmentation"):
        coco_map(gt, [{"image_id": 1, "category_id": 0, "bbox": [0, 0, 1, 1], "score": 1.0}], iou_type="segm")


# --------------------------------------------------------------------------------------------------
# segm


def test_segm_map_from_polygons_and_rle(raw, raw_path, label_gt):
    gt, label2cat = label_gt
    cat2label = {v: k for k, v in label2cat.items()}
    image_ids = [img["id"] for img in raw["images"][:10]]
    assert any(a["iscrowd"] for a in raw["annotations"] if a["image_id"] in image_ids)  # an RLE crowd region
    with contextlib.redirect_stdout(io.StringIO()):
        api = COCO(str(raw_path))
    rng = np.random.default_rng(1)
    preds, results = {}, []
    for image_id in image_ids:
        img = api.imgs[image_id]
        masks, labels, scores, boxes = [], [], [], []
        for ann in api.imgToAnns[image_id]:
            if ann["iscrowd"]:
                continue
            m = api.annToMask(ann).astype(bool)  # from the polygon
            shift = int(rng.integers(-3, 4))
            masks.append(np.roll(m, shift, axis=1))
            labels.append(cat2label[ann["category_id"]])
        for _ in range(2):  # false positives
            m = np.zeros((img["height"], img["width"]), bool)
            y, x = int(rng.integers(0, img["height"] - 40)), int(rng.integers(0, img["width"] - 40))
            m[y : y + 40, x : x + 40] = True
            masks.append(m)
            labels.append(int(rng.integers(len(label2cat))))
        scores = rng.uniform(0.05, 1.0, len(masks)).tolist()
        boxes = [[0.0, 0.0, 1.0, 1.0]] * len(masks)  # boxes play no part in segm
        mask_t = torch.from_numpy(np.stack(masks))[:, None]  # (K,1,H,W), as postprocess returns
        preds[image_id] = {
            "boxes": torch.tensor(boxes),
            "scores": torch.tensor(scores, dtype=torch.float64),
            "labels": torch.tensor(labels),
            "masks": mask_t,
        }
        for m, s, lab in zip(masks, scores, labels):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            results.append({"image_id": image_id, "category_id": label2cat[lab], "segmentation": rle, "score": s})
    ref = pycocotools_stats(raw_path, results, iou_type="segm", image_ids=image_ids)
    assert 0.2 < ref["mAP_50_95"] < 0.95

    sub = {
        "images": [i for i in gt["images"] if i["id"] in image_ids],
        "annotations": [a for a in gt["annotations"] if a["image_id"] in image_ids],
        "categories": gt["categories"],
    }
    dets = detections_to_coco(list(preds), list(preds.values()))
    assert_stats_close(coco_map(sub, dets, iou_type="segm", max_dets=(1, 10, 100)), ref)
    pytest.importorskip("faster_coco_eval")
    assert_stats_close(coco_map(sub, dets, iou_type="segm", backend="faster_coco_eval"), ref)


# --------------------------------------------------------------------------------------------------
# detections_to_coco


def test_detections_to_coco_boxes_and_masks():
    masks = torch.zeros(2, 1, 6, 8, dtype=torch.bool)
    masks[0, 0, 1:3, 2:5] = True
    pred = {
        "boxes": torch.tensor([[1.0, 2.0, 5.0, 8.0], [0.0, 0.0, 2.5, 1.5]]),
        "scores": torch.tensor([0.9, 0.25]),
        "labels": torch.tensor([3, 0]),
        "masks": masks,
    }
    out = detections_to_coco([42], [pred])
    assert [d["bbox"] for d in out] == [[1.0, 2.0, 4.0, 6.0], [0.0, 0.0, 2.5, 1.5]]
    assert [d["category_id"] for d in out] == [3, 0] and out[0]["image_id"] == 42
    assert out[1]["score"] == pytest.approx(0.25)
    json.dumps(out)  # JSON-safe (RLE counts as str)
    decoded = mask_utils.decode({**out[0]["segmentation"], "counts": out[0]["segmentation"]["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), masks[0, 0].numpy())
    assert (
        detections_to_coco([1], [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}])
        == []
    )


def test_detections_to_coco_bad_input():
    with pytest.raises(ValueError, match="missing 'scores'"):
        detections_to_coco([1], [{"boxes": torch.zeros(1, 4), "labels": torch.zeros(1)}])
    with pytest.raises(ValueError, match="image_ids"):
        detections_to_coco([1, 2], [{}])
    bad = {
        "boxes": torch.zeros(1, 4),
        "scores": torch.zeros(1),
        "labels": torch.zeros(1),
        "masks": torch.zeros(4),
    }
    with pytest.raises(ValueError, match="masks must be"):
        detections_to_coco([1], [bad])


# --------------------------------------------------------------------------------------------------
# F1 sweep on hand-made cases


def small_gt(annotations, n_images=2, n_classes=2):
    anns = [
        {"id": i + 1, "image_id": img, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": crowd}
        for i, (img, c, b, crowd) in enumerate(annotations)
    ]
    return {
        "images": [{"id": i, "height": 200, "width": 200} for i in range(1, n_images + 1)],
        "annotations": anns,
        "categories": [{"id": c, "name": f"c{c}"} for c in range(n_classes)],
    }


def det(img, c, b, s):
    return {"image_id": img, "category_id": c, "bbox": b, "score": s}


def test_f1_perfect_and_empty():
    gt = small_gt([(1, 0, [10, 10, 50, 50], 0), (1, 1, [100, 100, 30, 40], 0), (2, 0, [0, 0, 20, 20], 0)])
    perfect = [det(a["image_id"], a["category_id"], a["bbox"], 0.9) for a in gt["annotations"]]
    assert f1_sweep(gt, perfect) == {"F1": 1.0, "precision": 1.0, "recall": 1.0, "threshold": 0.0}
    assert f1_sweep(gt, []) == {"F1": 0.0, "precision": 0.0, "recall": 0.0, "threshold": 0.0}


def test_f1_hand_computed_macro_average():
    # class 0: 2 GT, one found (0.9); class 1: 1 GT found (0.8) plus an FP (0.7).
    gt = small_gt([(1, 0, [10, 10, 50, 50], 0), (2, 0, [0, 0, 20, 20], 0), (1, 1, [100, 100, 30, 40], 0)])
    dets = [
        det(1, 0, [12, 10, 50, 50], 0.9),
        det(1, 1, [100, 100, 30, 40], 0.8),
        det(2, 1, [50, 50, 9, 9], 0.655),
    ]
    out = f1_sweep(gt, dets)
    # Above 0.655: class 0 P=1 R=1/2 F1=2/3, class 1 P=R=F1=1 -> macro F1 5/6, P 1, R 3/4 (at 0.66).
    assert out["F1"] == pytest.approx(5 / 6) and out["precision"] == pytest.approx(1.0)
    assert out["recall"] == pytest.approx(0.75) and out["threshold"] == pytest.approx(0.66)


def test_f1_crowd_match_is_ignored():
    crowd_region = [100, 100, 80, 80]
    gt = small_gt([(1, 0, [10, 10, 50, 50], 0), (1, 0, crowd_region, 1)], n_images=1, n_classes=1)
    tp = det(1, 0, [10, 10, 50, 50], 0.9)
    on_crowd = det(1, 0, [105, 100, 80, 80], 0.95)  # matches only the crowd region
    out = f1_sweep(gt, [tp, on_crowd])
    assert out == {"F1": 1.0, "precision": 1.0, "recall": 1.0, "threshold": 0.0}
    # A detection away from the crowd region is an FP: it lowers precision, so the sweep moves above it.
    elsewhere = det(1, 0, [60, 150, 30, 30], 0.5)
    assert f1_sweep(gt, [tp, elsewhere])["threshold"] == pytest.approx(0.51)
    assert f1_sweep(gt, [tp, elsewhere], thresholds=[0.0])["precision"] == pytest.approx(0.5)
    # A class whose only GT is a crowd region has no GT: it is left out of the macro average.
    crowd_only = small_gt([(1, 0, [10, 10, 50, 50], 0), (1, 1, crowd_region, 1)], n_images=1)
    assert f1_sweep(crowd_only, [tp, det(1, 1, [140, 140, 10, 10], 0.9)])["F1"] == 1.0


def test_f1_low_score_false_positive_moves_threshold():
    gt = small_gt([(1, 0, [10, 10, 50, 50], 0)], n_images=1, n_classes=1)
    tp = det(1, 0, [10, 10, 50, 50], 0.9)
    assert f1_sweep(gt, [tp])["threshold"] == 0.0
    out = f1_sweep(gt, [tp, det(1, 0, [120, 120, 40, 40], 0.3)])
    assert out["threshold"] == pytest.approx(0.31) and out["F1"] == 1.0  # scores >= t are kept


def test_f1_duplicates_and_classes_without_gt():
    gt = small_gt([(1, 0, [10, 10, 50, 50], 0)], n_images=1)
    tp = det(1, 0, [10, 10, 50, 50], 0.9)
    # A duplicate on a claimed GT is an FP; the sweep moves above it.
    out = f1_sweep(gt, [tp, det(1, 0, [11, 10, 50, 50], 0.5)])
    assert out["F1"] == 1.0 and out["threshold"] == pytest.approx(0.51)
    # FPs of a class with no GT do not enter the macro average.
    assert f1_sweep(gt, [tp, det(1, 1, [10, 10, 50, 50], 0.95)])["F1"] == 1.0
    with pytest.raises(ValueError, match="not in gt"):
        f1_sweep(gt, [det(9, 0, [0, 0, 1, 1], 0.5)])


# --------------------------------------------------------------------------------------------------
# Evaluator


def test_evaluator_accumulates_batches(raw, label_gt, bbox_case):
    gt, _, dets, _ = bbox_case
    label_gt_dict, _ = label_gt
    preds = noisy_predictions(raw, seed=0)
    ids = list(preds)
    ev = Evaluator(label_gt_dict, per_class=True)
    ev.update([preds[i] for i in ids[:20]], ids[:20])
    ev.update([preds[i] for i in ids[19:]], torch.tensor(ids[19:]))  # image ids[19] repeated: dropped
    out = ev.compute()
    expected = coco_map(gt, dets, per_class=True)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key
    f1 = f1_sweep(gt, dets)
    assert (out["F1"], out["precision"], out["recall"]) == (f1["F1"], f1["precision"], f1["recall"])
    assert not any(k.startswith("segm_") for k in out)
    ev.reset()
    ev.update([preds[ids[0]]], [ids[0]])
    only_first = ev.compute()
    assert only_first["mAP_50_95"] != out["mAP_50_95"]  # only the updated image is scored
    with pytest.raises(ValueError, match="image_id 123456"):
        ev.update([preds[ids[0]]], [123456])


def test_evaluator_segm_keys_with_low_res_masks():
    gt = small_gt([(1, 0, [40, 40, 80, 80], 0)], n_images=1, n_classes=1)
    gt["annotations"][0]["segmentation"] = [[40, 40, 120, 40, 120, 120, 40, 120]]
    mask = torch.zeros(1, 1, 50, 50, dtype=torch.bool)  # at a quarter of the image size
    mask[0, 0, 10:30, 10:30] = True
    pred = {
        "boxes": torch.tensor([[40.0, 40, 120, 120]]),
        "scores": torch.tensor([0.8]),
        "labels": torch.tensor([0]),
    }
    ev = Evaluator(gt)
    ev.update([{**pred, "masks": mask}], [1])
    out = ev.compute()
    assert out["mAP_50_95"] == pytest.approx(1.0) and out["segm_mAP_50_95"] == pytest.approx(1.0)
    assert out["segm_mAP_50"] == pytest.approx(1.0) and out["F1"] == 1.0


def square_rle(x, y, size, h=200, w=200):
    m = np.zeros((h, w), np.uint8)
    m[y : y + size, x : x + size] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def test_f1_segm_matches_masks_and_ignores_crowd_rle():
    gt = small_gt([(1, 0, [10, 10, 40, 40], 0), (1, 0, [100, 100, 60, 60], 1)], n_images=1, n_classes=1)
    gt["annotations"][0]["segmentation"] = [[10, 10, 50, 10, 50, 50, 10, 50]]  # polygon
    crowd = np.zeros((200, 200), np.uint8)
    crowd[100:160, 100:160] = 1
    # Crowd regions usually come as uncompressed RLE: run lengths over the column-major pixels, zeros first.
    flat = crowd.flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    counts = {"size": [200, 200], "counts": runs}
    assert np.array_equal(mask_utils.decode(mask_utils.frPyObjects(counts, 200, 200)), crowd)
    gt["annotations"][1]["segmentation"] = counts
    hit = {**det(1, 0, [0, 0, 1, 1], 0.9), "segmentation": square_rle(10, 10, 40)}
    on_crowd = {**det(1, 0, [0, 0, 1, 1], 0.95), "segmentation": square_rle(102, 100, 58)}
    # The boxes are nonsense: only the masks are compared.
    assert f1_sweep(gt, [hit, on_crowd], iou_type="segm")["precision"] == 1.0
    assert f1_sweep(gt, [hit, on_crowd])["F1"] == 0.0
    off = {**det(1, 0, [0, 0, 1, 1], 0.9), "segmentation": square_rle(35, 10, 40)}  # IoU 15/65 < 0.5
    assert f1_sweep(gt, [off], iou_type="segm")["F1"] == 0.0


# --------------------------------------------------------------------------------------------------
# upstream's threshold grids


def test_upstream_grids_are_torchmetrics_float32_linspace():
    assert UPSTREAM_IOU_THRESHOLDS.tolist() == TM_IOU_THRS and UPSTREAM_RECALL_THRESHOLDS.tolist() == TM_REC_THRS
    assert UPSTREAM_IOU_THRESHOLDS[1] == float(np.float32(0.55)) > 0.55  # 0.550000011920929
    assert UPSTREAM_RECALL_THRESHOLDS[14] == float(np.float32(0.14)) > 14 / 100
    # 36 recall steps sit just above k/100, the rest at or below it.
    assert sum(UPSTREAM_RECALL_THRESHOLDS[k] > k / 100 for k in range(101)) == 36


def grid_case():
    """Two classes where the float32 and float64 grids disagree.

    Class 0: 100 GT, 14 found exactly -> recall 14/100 at every IoU; the float32 recall step 14 lies above
    0.14, so it reads precision 0 there (AP 14/101), the float64 one reads 1 (15/101). Class 1: one match at
    IoU exactly 0.55 (5500/10000): counted at the float64 threshold 0.55, not at the float32 one.
    """
    anns = []
    for k in range(100):
        x, y = 100.0 * (k % 10), 100.0 * (k // 10)
        anns.append({"id": k + 1, "image_id": 1, "category_id": 0, "bbox": [x, y, 50.0, 50.0], "area": 2500.0})
    anns.append({"id": 101, "image_id": 2, "category_id": 1, "bbox": [0.0, 0.0, 100.0, 100.0], "area": 1e4})
    for a in anns:
        a["iscrowd"] = 0
    gt = {
        "images": [{"id": 1, "height": 1000, "width": 1000}, {"id": 2, "height": 200, "width": 200}],
        "annotations": anns,
        "categories": [{"id": 0, "name": "many"}, {"id": 1, "name": "one"}],
    }
    dets = [{"image_id": 1, "category_id": 0, "bbox": a["bbox"], "score": 0.9} for a in anns[:14]]
    dets.append({"image_id": 2, "category_id": 1, "bbox": [0.0, 0.0, 55.0, 100.0], "score": 0.8})
    return gt, dets


def direct_stats(gt, dets, *, stock_grids):
    """pycocotools on the same dicts, maxDets (1, 10, 100), stats from summarize()."""
    with contextlib.redirect_stdout(io.StringIO()):
        api = COCO()
        api.dataset = copy.deepcopy(gt)
        api.createIndex()
        ev = COCOeval(api, api.loadRes(copy.deepcopy(dets)), "bbox")
        if not stock_grids:
            ev.params.iouThrs = np.asarray(TM_IOU_THRS)
            ev.params.recThrs = np.asarray(TM_REC_THRS)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(STATS, ev.stats.tolist()))


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_grids_pin_numbers_where_float32_and_float64_disagree(backend):
    if backend == "faster_coco_eval":
        pytest.importorskip("faster_coco_eval")
    gt, dets = grid_case()
    out = coco_map(gt, dets, backend=backend, per_class=True)
    assert out["AP/many"] == pytest.approx(14 / 101, abs=1e-12)
    assert out["AP/one"] == pytest.approx(0.1, abs=1e-12)  # matched at IoU 0.5 only
    assert out["mAP_50_95"] == pytest.approx((14 / 101 + 0.1) / 2, abs=1e-12)
    assert out["mAP_50"] == pytest.approx((14 / 101 + 1.0) / 2, abs=1e-12)
    assert out["mAP_75"] == pytest.approx(14 / 101 / 2, abs=1e-12)
    assert out["mAR"] == pytest.approx((0.14 + 0.1) / 2, abs=1e-12)
    # Upstream's grids through plain pycocotools agree; stock pycocotools reads the other points.
    assert_stats_close(out, direct_stats(gt, dets, stock_grids=False), tol=1e-12)
    stock = direct_stats(gt, dets, stock_grids=True)
    assert stock["mAP_50_95"] == pytest.approx((15 / 101 + 0.2) / 2, abs=1e-12)
    assert stock["mAP_50"] == pytest.approx((15 / 101 + 1.0) / 2, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# vectorised F1 sweep == the loop it replaced (tests/f1_reference.py)


def random_f1_case(seed, *, masks=False, size=64):
    """Small crowded images: overlapping GT, crowd regions, boxes past the border, score and IoU ties."""
    rng = np.random.default_rng(seed)
    n_images, n_classes = int(rng.integers(1, 6)), 3
    anns, dets = [], []
    for image_id in range(1, n_images + 1):
        for _ in range(int(rng.integers(0, 9))):
            x, y = rng.integers(-8, size - 4, 2).tolist()
            w, h = rng.integers(2, 30, 2).tolist()
            crowd = int(rng.random() < 0.15)
            anns.append((image_id, int(rng.integers(n_classes)), [x, y, w, h], crowd))
            for _ in range(int(rng.integers(0, 3))):  # found, possibly several times (duplicates)
                jx, jy = rng.integers(-3, 4, 2).tolist()
                c = anns[-1][1] if rng.random() < 0.8 else int(rng.integers(n_classes))
                dets.append((image_id, c, [x + jx, y + jy, w, h], float(np.round(rng.random(), 2))))
        for _ in range(int(rng.integers(0, 6))):  # background detections, some on crowd regions
            x, y = rng.integers(0, size - 4, 2).tolist()
            w, h = rng.integers(2, 30, 2).tolist()
            dets.append((image_id, int(rng.integers(n_classes)), [x, y, w, h], float(np.round(rng.random(), 2))))
    gt = small_gt(anns, n_images=n_images, n_classes=n_classes)
    for img in gt["images"]:
        img["height"] = img["width"] = size
    out = [det(*d) for d in dets]
    if masks:
        for a in gt["annotations"]:
            x, y, w, h = a["bbox"]
            if a["iscrowd"]:
                a["segmentation"] = box_rle(x, y, w, h, size)
            else:  # a polygon, clipped to the image by the rasteriser
                a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        for d in out:
            d["segmentation"] = box_rle(*d["bbox"], size)
    return gt, out


def box_rle(x, y, w, h, size):
    m = np.zeros((size, size), np.uint8)
    m[max(y, 0) : max(y + h, 0), max(x, 0) : max(x + w, 0)] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


@pytest.mark.parametrize("seed", range(40))
def test_f1_sweep_equals_reference_loop(seed):
    gt, dets = random_f1_case(seed)
    assert f1_sweep(gt, dets) == reference_f1_sweep(gt, dets)
    assert f1_sweep(gt, dets, iou=0.3, thresholds=11) == reference_f1_sweep(gt, dets, iou=0.3, thresholds=11)
    # Columns and dicts are one input.
    assert f1_sweep(gt, Detections.from_coco(dets)) == reference_f1_sweep(gt, dets)


@pytest.mark.parametrize("seed", range(8))
def test_f1_sweep_segm_equals_reference_loop(seed):
    gt, dets = random_f1_case(seed, masks=True)
    assert f1_sweep(gt, dets, iou_type="segm") == reference_f1_sweep(gt, dets, iou_type="segm")


def test_f1_random_cases_exercise_the_rules():
    """The random cases above hold what makes greedy matching hard, so their agreement means something."""
    seen = {"crowd ignored": 0, "groups of several": 0, "score ties": 0, "F1 strictly between": 0}
    for seed in range(40):
        gt, dets = random_f1_case(seed)
        scores = [d["score"] for d in dets]
        seen["score ties"] += len(scores) != len(set(scores))
        out = reference_f1_sweep(gt, dets, thresholds=[0.0])
        no_crowd = {**gt, "annotations": [a for a in gt["annotations"] if not a["iscrowd"]]}
        seen["crowd ignored"] += out["precision"] != reference_f1_sweep(no_crowd, dets, thresholds=[0.0])["precision"]
        seen["F1 strictly between"] += 0.0 < reference_f1_sweep(gt, dets)["F1"] < 1.0
        keys = [(d["image_id"], d["category_id"]) for d in dets]
        seen["groups of several"] += len(keys) != len(set(keys))
    assert all(count >= 3 for count in seen.values()), seen


def test_f1_greedy_ties_follow_upstream():
    # An IoU tie goes to the GT first in annotation order: d1 is 0.6 from both A and B and takes A, so d2 (which
    # only fits A) is left an FP. Taking B would have made both TPs.
    a, b = [0, 0, 10, 10], [5, 0, 10, 10]
    gt = small_gt([(1, 0, a, 0), (1, 0, b, 0)], n_images=1, n_classes=1)
    tied = [det(1, 0, [2.5, 0, 10, 10], 0.9), det(1, 0, a, 0.8)]
    assert f1_sweep(gt, tied, thresholds=[0.0]) == reference_f1_sweep(gt, tied, thresholds=[0.0])
    assert f1_sweep(gt, tied, thresholds=[0.0])["precision"] == 0.5
    # Scores are ranked as float32: 0.9 and 0.9 + 1e-9 tie, so input order decides. d1 (on A and the crowd
    # region) goes first and takes A; d2 (on A only) becomes an FP. In float64, d2 would take A and d1 be ignored.
    gt = small_gt([(1, 0, a, 0), (1, 0, [0, 0, 10, 25], 1)], n_images=1, n_classes=1)
    dets = [det(1, 0, [0, 0, 10, 14], 0.9), det(1, 0, a, 0.9 + 1e-9)]
    assert f1_sweep(gt, dets, thresholds=[0.0])["precision"] == 0.5


# --------------------------------------------------------------------------------------------------
# segm: our Evaluator against the COCO segm path upstream takes (torchmetrics -> faster_coco_eval)


def segm_case(seed=0, size=96, n_images=4):
    """Polygon objects from 3 to 40 px (small and medium), crowd regions as RLE, masks predicted with shifts,
    misses, false positives and detections sitting on the crowd regions."""
    rng = np.random.default_rng(seed)
    gt = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"c{c}"} for c in range(2)]}
    preds = {}
    for image_id in range(1, n_images + 1):
        gt["images"].append({"id": image_id, "height": size, "width": size})
        masks, scores, labels = [], [], []
        for k in range(int(rng.integers(4, 9))):
            side = int(rng.choice([3, 5, 8, 12, 20, 40]))
            x, y = rng.integers(0, size - side, 2).tolist()
            crowd = k == 0 and image_id % 2 == 1
            label = int(rng.integers(2))
            m = np.zeros((size, size), np.uint8)
            m[y : y + side, x : x + side] = 1
            if side > 5:  # cut a corner: a real polygon, not a box
                m[y : y + side // 3, x : x + side // 3] = 0
            rle = mask_utils.encode(np.asfortranarray(m))
            if crowd:
                seg = {"size": rle["size"], "counts": rle["counts"].decode()}
            else:
                c = side // 3 if side > 5 else 0
                seg = [[x + c, y, x + side, y, x + side, y + side, x, y + side, x, y + c, x + c, y + c]]
                m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, size, size)))
            area = float(m.sum())
            gt["annotations"].append(
                {"image_id": image_id, "category_id": label, "bbox": [x, y, side, side], "area": area,
                 "iscrowd": int(crowd), "segmentation": seg}
            )  # fmt: skip
            if rng.random() < 0.2 and not crowd:
                continue  # missed
            shifted = np.roll(m, tuple(rng.integers(-1, 2, 2).tolist()), axis=(0, 1))
            masks.append(shifted.astype(bool))
            labels.append(label if rng.random() < 0.9 else 1 - label)
            scores.append(float(rng.uniform(0.05, 1.0)))
        for _ in range(2):  # false positives
            m = np.zeros((size, size), bool)
            x, y = rng.integers(0, size - 10, 2).tolist()
            m[y : y + int(rng.integers(2, 10)), x : x + int(rng.integers(2, 10))] = True
            masks.append(m)
            labels.append(int(rng.integers(2)))
            scores.append(float(rng.uniform(0.05, 1.0)))
        preds[image_id] = {
            "boxes": torch.zeros(len(masks), 4),  # boxes play no part in segm
            "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels),
            "masks": torch.from_numpy(np.stack(masks))[:, None],
        }
    for i, ann in enumerate(gt["annotations"]):
        ann["id"] = i + 1
    return gt, preds


def upstream_segm_stats(gt, preds):
    """What upstream's OnePassCocoMeanAveragePrecision does with mask tensors: GT masks (decoded at image size)
    and predicted masks encoded to RLE, areas from the masks, crowd rows with iscrowd=1, faster_coco_eval's
    COCOeval with torchmetrics' float32 grids and maxDets [1, 10, 500], stats from summarize()."""
    from faster_coco_eval import COCO as FCOCO
    from faster_coco_eval import COCOeval_faster

    sizes = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    target, results = [], []
    for ann in gt["annotations"]:
        h, w = sizes[ann["image_id"]]
        seg = ann["segmentation"]
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list) else dict(seg)
        rle = mask_utils.encode(np.asfortranarray(mask_utils.decode(rle)))  # the tensor upstream holds
        target.append({"id": len(target) + 1, "image_id": ann["image_id"], "category_id": ann["category_id"],
                       "segmentation": rle, "area": float(mask_utils.area(rle)), "iscrowd": ann["iscrowd"],
                       "bbox": ann["bbox"]})  # fmt: skip
    for image_id, p in preds.items():
        encoded = mask_utils.encode(np.asfortranarray(p["masks"][:, 0].numpy().transpose(1, 2, 0).astype(np.uint8)))
        for rle, score, label in zip(encoded, p["scores"].tolist(), p["labels"].tolist()):
            results.append({"id": len(results) + 1, "image_id": image_id, "category_id": label, "segmentation": rle,
                            "area": float(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist(),
                            "score": score, "iscrowd": 0})  # fmt: skip
    apis = []
    for anns in (target, results):
        api = FCOCO()
        api.dataset = {"images": gt["images"], "annotations": anns, "categories": gt["categories"]}
        api.createIndex()
        apis.append(api)
    ev = COCOeval_faster(apis[0], apis[1], iouType="segm", print_function=lambda *a, **k: None)
    params = ev.params
    params.iouThrs = np.asarray(TM_IOU_THRS, dtype=np.float64)
    params.recThrs = np.asarray(TM_REC_THRS, dtype=np.float64)
    params.maxDets = [1, 10, 500]
    ev.params = params
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(["mAP_50_95", "mAP_50", "mAP_75", "mAP_small", "mAP_medium", "mAP_large", "mAR_1", "mAR_10",
                     "mAR", "mAR_small", "mAR_medium", "mAR_large"], ev.stats.tolist()))  # fmt: skip


def our_segm(gt, preds, backend="pycocotools"):
    ev = Evaluator(gt, backend=backend)
    ids = list(preds)
    ev.update([preds[i] for i in ids[:2]], ids[:2])  # two batches
    ev.update([preds[i] for i in ids[2:]], ids[2:])
    return {k[len("segm_") :]: v for k, v in ev.compute().items() if k.startswith("segm_")}


@pytest.mark.parametrize("seed", range(3))
def test_segm_metrics_equal_upstream_path_with_crowd_and_small_objects(seed):
    pytest.importorskip("faster_coco_eval")
    gt, preds = segm_case(seed)
    ref = upstream_segm_stats(gt, preds)
    assert 0.1 < ref["mAP_50_95"] < 0.95 and ref["mAP_small"] > -1 and ref["mAP_medium"] > -1
    for backend in ("pycocotools", "faster_coco_eval"):
        assert_stats_close(our_segm(gt, preds, backend), ref, tol=1e-12)
    # Crowd regions and small objects both move the numbers here, so the agreement covers them.
    no_crowd = {**gt, "annotations": [a for a in gt["annotations"] if not a["iscrowd"]]}
    assert upstream_segm_stats(no_crowd, preds)["mAP_50_95"] != ref["mAP_50_95"]
    assert ref["mAP_small"] != ref["mAP_medium"]


def test_evaluator_keeps_rle_not_masks_and_merges_ranks():
    gt, preds = segm_case(1)
    ids = list(preds)
    single = Evaluator(gt)
    single.update([preds[i] for i in ids], ids)
    state = single.state()
    # What the evaluator keeps is columns and RLE strings: no tensor, nothing of size H*W per detection.
    kept = state["detections"]
    assert isinstance(kept, Detections) and all(isinstance(r["counts"], str) for r in kept.rles)
    assert not any(torch.is_tensor(v) for v in vars(kept).values())
    # Two "ranks", the second repeating an image of the first (sampler padding): merged like one pass.
    rank0, rank1 = Evaluator(gt), Evaluator(gt)
    rank0.update([preds[i] for i in ids[:3]], ids[:3])
    rank1.update([preds[i] for i in ids[2:]], ids[2:])
    assert rank1.num_detections > single.num_detections - rank0.num_detections  # it holds the repeat
    rank0.merge([rank1.state()])
    assert rank0.num_detections == single.num_detections
    assert rank0.compute() == single.compute()


def test_evaluate_frees_each_batch_of_masks(monkeypatch):
    """loop.evaluate hands every batch to the Evaluator (RLE) and keeps no mask tensors: when compute()
    starts, the masks of every batch but the last (still a local of the loop) are garbage."""
    import gc
    import weakref

    import rfdetr_fn as rf
    from rfdetr_fn.config import DataConfig, EvalConfig, TrainConfig
    from rfdetr_fn.data import build_dataset
    from rfdetr_fn.eval import loop

    cfg = rf.presets.tiny(num_classes=2, resolution=64, segmentation_head=True)
    dcfg = DataConfig(synthetic_images=24, synthetic_classes=2, synthetic_size=64, num_workers=0)
    dataset = build_dataset(dcfg, "valid", cfg, TrainConfig(), train=False)  # 6 images
    batches: list[list[weakref.ref]] = []
    alive_at_compute: list[int] = []
    update, compute = Evaluator.update, Evaluator.compute

    def spy_update(self, predictions, image_ids):
        batches.append([weakref.ref(p["masks"]) for p in predictions])
        update(self, predictions, image_ids)

    def spy_compute(self, timings=None):
        gc.collect()
        alive_at_compute.extend(i for i, refs in enumerate(batches) if any(r() is not None for r in refs))
        return compute(self, timings)

    monkeypatch.setattr(Evaluator, "update", spy_update)
    monkeypatch.setattr(Evaluator, "compute", spy_compute)
    metrics = loop.evaluate(rf.init(cfg, seed=0), cfg, dataset, batch_size=2, ecfg=EvalConfig())
    assert len(batches) == 3 and "segm_mAP_50_95" in metrics
    assert alive_at_compute in ([], [2])
