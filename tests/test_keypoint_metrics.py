"""COCO keypoint AP/AR (OKS) with upstream's rules, against the golden tiny_kp OKS case."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rfdetr_fn.eval import keypoints as km


def _label_space(scenario: dict) -> tuple[dict, list[int], list[dict]]:
    """The scenario's GT with category ids replaced by labels, and its predictions as postprocess outputs."""
    cat2label = {cat: int(label) for label, cat in scenario["label2cat"].items()}
    gt = json.loads(json.dumps(scenario["gt"]))
    for ann in gt["annotations"]:
        ann["category_id"] = cat2label[ann["category_id"]]
    for cat in gt["categories"]:
        cat["id"] = cat2label[cat["id"]]
    ids, preds = [], []
    for image_id, p in scenario["predictions"].items():
        ids.append(int(image_id))
        preds.append({k: torch.tensor(v) for k, v in p.items()})
    return gt, ids, preds


@pytest.fixture(scope="module")
def oks_case(golden_dir):
    return json.loads((golden_dir / "tiny_kp" / "oks_eval.json").read_text())


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_keypoint_oks_equals_golden(oks_case, backend):
    pytest.importorskip(backend)
    for scenario in oks_case["scenarios"]:
        gt, ids, preds = _label_space(scenario)
        results = km.keypoints_to_coco(ids, preds, km.keypoint_counts(gt))
        assert all(r["category_id"] in (0, 1) for r in results)  # label 2 (no category) dropped
        stats = km.oks_map(gt, results, sigmas=scenario["keypoint_oks_sigmas_argument"], backend=backend)
        ours = np.array([stats[k] for k in km.STAT_KEYS])
        np.testing.assert_allclose(ours, scenario["stats"], rtol=0, atol=1e-6, err_msg=scenario["name"])
        for key, index in (("map", 0), ("map_50", 1), ("map_75", 2), ("mar", 5)):
            assert ours[index] == pytest.approx(scenario["metric_keypoint_oks"][key], abs=1e-6)


def test_keypoint_oks_sigma_rules(oks_case):
    groups = {s["name"]: s["groups"] for s in oks_case["scenarios"]}
    for name, explicit in (
        ("two_categories_default_sigmas", None),
        ("two_categories_explicit_sigmas", [0.025, 0.05, 0.075, 0.1]),
    ):
        for group in groups[name]:
            sig = km.oks_sigmas(group["keypoint_count"], explicit)
            np.testing.assert_array_equal(sig, group["kpt_oks_sigmas"])
    person = groups["person17_default_sigmas_maxdets20"][0]
    np.testing.assert_allclose(km.oks_sigmas(17), person["kpt_oks_sigmas"], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="cover 4 keypoints"):
        km.oks_sigmas(4, [0.05, 0.05])


def test_keypoint_weighted_stats_ignore_undefined():
    out = km.weighted_stats([np.array([0.5] * 4 + [-1.0] * 6), np.array([0.2] * 10)], [1, 3])
    assert out[0] == pytest.approx((0.5 + 3 * 0.2) / 4) and out[4] == pytest.approx(0.2)
    assert km.weighted_stats([np.full(10, -1.0)], [2])[0] == -1.0


def test_keypoint_evaluator_adds_kp_stats_to_box_metrics(oks_case):
    """The evaluator used by validate/fit: box stats as before plus kp_* equal to the golden case."""
    scenario = oks_case["scenarios"][0]
    gt, ids, preds = _label_space(scenario)
    ev = km.KeypointEvaluator(gt, backend="pycocotools")
    ev.update(preds[:1], ids[:1])
    ev.update(preds, ids)  # image 1 again (distributed padding): ignored
    out = ev.compute()
    assert {"mAP_50_95", "mAR", "F1"} <= set(out)
    assert out["kp_mAP_50_95"] == pytest.approx(scenario["stats"][0], abs=1e-6)
    assert out["kp_mAR"] == pytest.approx(scenario["stats"][5], abs=1e-6)
    with pytest.raises(ValueError, match="lack 'keypoints'"):
        km.KeypointEvaluator(gt).update([{k: v for k, v in preds[0].items() if k != "keypoints"}], ids[:1])


def test_best_model_tracker_can_select_on_keypoint_ap():
    from rfdetr_fn.config import TrainConfig
    from rfdetr_fn.fit import _monitored

    # EMA scored alone (the default) reports under the primary names
    record = {"val/kp_mAP_50_95": 0.3, "val/mAP_50_95": 0.6, "val/kp_mAR": 0.4}
    assert _monitored(record, TrainConfig(best_model_metric="kp_map")) == (None, 0.3)
    assert _monitored(record, TrainConfig(best_model_metric="kp_mar")) == (None, 0.4)
