"""The predict command line: predictions.json, drawings, RLE masks, errors, `rfdetr_fn predict` dispatch."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import rfdetr_fn as rf
from rfdetr_fn import cli
from rfdetr_fn.eval.drawing import class_colour
from rfdetr_fn.io import weights
from rfdetr_fn.predict_cli import PredictArgs, collect_images, main, run

SIZES = {"a.png": (60, 80), "b.png": (90, 50)}  # name -> (height, width)


def _write_images(folder: Path) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for name, (h, w) in SIZES.items():
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / name)
        arrays[name] = arr
    (folder / "notes.txt").write_text("not an image")
    return arrays


def _write_weights(path: Path, **overrides) -> Path:
    cfg = rf.presets.tiny(**overrides)
    weights.save_weights(path, rf.init(cfg, 0), cfg, class_names=["a", "b", "c"][: cfg.num_classes])
    return path


@pytest.fixture(scope="module")
def det_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("det")
    arrays = _write_images(tmp / "imgs")
    weights = _write_weights(tmp / "w.pth", num_classes=3)
    out = tmp / "out"
    argv = ["--checkpoint", str(weights), "--images", str(tmp / "imgs"), "--output-dir", str(out)]
    records = main([*argv, "--threshold", "0.0", "--batch-size", "1"])
    return {"tmp": tmp, "arrays": arrays, "weights": weights, "out": out, "records": records}


def test_predictions_json(det_run):
    out = det_run["out"]
    records = json.loads((out / "predictions.json").read_text())
    assert records == det_run["records"]
    assert [Path(r["image"]).name for r in records] == ["a.png", "b.png"]  # folder sorted, .txt skipped
    for r in records:
        h, w = SIZES[Path(r["image"]).name]
        assert (r["height"], r["width"]) == (h, w)
        dets = r["detections"]
        assert len(dets) == rf.presets.tiny().num_select  # threshold 0 keeps every selected query
        scores = [d["score"] for d in dets]
        assert scores == sorted(scores, reverse=True)
        assert all(0.0 <= s <= 1.0 for s in scores)
        for d in dets:
            x0, y0, x1, y1 = d["box_xyxy"]
            assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
            assert "mask_rle" not in d
            names = ["a", "b", "c"]
            expected = names[d["label"]] if d["label"] < 3 else str(d["label"])
            assert d["class_name"] == expected
        assert {d["class_name"] for d in dets} <= {"a", "b", "c", "3"}


def test_batch_size_does_not_change_results(det_run, tmp_path):
    argv = ["--checkpoint", str(det_run["weights"]), "--images", str(det_run["tmp"] / "imgs")]
    records = main([*argv, "--output-dir", str(tmp_path), "--threshold", "0.0", "--no-draw"])
    assert [r["image"] for r in records] == [r["image"] for r in det_run["records"]]
    for ours, ref in zip(records, det_run["records"]):
        assert [d["label"] for d in ours["detections"]] == [d["label"] for d in ref["detections"]]
        a = np.array([d["score"] for d in ours["detections"]])
        b = np.array([d["score"] for d in ref["detections"]])
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert not list(tmp_path.glob("*.png"))  # --no-draw


def test_drawings(det_run):
    for name, arr in det_run["arrays"].items():
        drawn = det_run["out"] / name
        assert drawn.is_file()
        with Image.open(drawn) as im:
            assert im.size == (arr.shape[1], arr.shape[0])
            pixels = np.asarray(im.convert("RGB"))
        changed = np.any(pixels != arr, axis=-1).mean()
        assert changed > 0.01  # boxes and labels were drawn on it


def test_class_colours_stay_apart():
    """Golden-ratio hue steps: neighbouring labels get far-apart colours, and no two of 20 are alike."""
    colours = [class_colour(i) for i in range(20)]
    assert min(math.dist(a, b) for a, b in itertools.combinations(colours, 2)) > 30
    assert min(math.dist(colours[i], colours[i + 1]) for i in range(19)) > 250
    assert class_colour(3) == colours[3]  # a label always gets the same colour


def test_segmentation_masks(tmp_path):
    arrays = _write_images(tmp_path / "imgs")
    weights = _write_weights(tmp_path / "seg.pth", segmentation_head=True, num_classes=2)
    out = tmp_path / "out"
    images = [str(tmp_path / "imgs" / "b.png"), str(tmp_path / "imgs" / "a.png")]
    records = main(["--checkpoint", str(weights), "--images", *images, "--output-dir", str(out), "--threshold", "0"])
    assert [Path(r["image"]).name for r in records] == ["b.png", "a.png"]  # files keep the given order
    for r in records:
        h, w = r["height"], r["width"]
        assert r["detections"]
        for d in r["detections"]:
            rle = d["mask_rle"]
            assert isinstance(rle["counts"], str) and rle["size"] == [h, w]
            m = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
            assert m.shape == (h, w) and set(np.unique(m)) <= {0, 1}
        with Image.open(out / Path(r["image"]).name) as im:
            assert im.size == (w, h)
    assert set(arrays) == {"a.png", "b.png"}


def test_checkpoint_directory_and_names_fallback(tmp_path):
    cfg = rf.presets.tiny(num_classes=3)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    weights.save_weights(run_dir / "checkpoint_best_total.pth", rf.init(cfg, 0), cfg)  # no class names
    _write_images(tmp_path / "imgs")
    records = run(
        PredictArgs(checkpoint=str(run_dir), images=(str(tmp_path / "imgs" / "a.png"),),
                    output_dir=str(tmp_path / "out"), threshold=0.0, draw=False)
    )  # fmt: skip
    assert all(d["class_name"] == str(d["label"]) for d in records[0]["detections"])


def test_missing_image_is_named(det_run, tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        main(["--checkpoint", str(det_run["weights"]), "--images", str(missing), "--output-dir", str(tmp_path)])


def test_unreadable_image_is_named(det_run, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(SystemExit) as exit_:  # skipped, reported, and the run fails at the end
        main(["--checkpoint", str(det_run["weights"]), "--images", str(bad), "--output-dir", str(tmp_path / "o")])
    assert exit_.value.code == 1
    (record,) = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert "broken.png: unreadable image" in record["error"]


def test_no_images(det_run, tmp_path):
    with pytest.raises(ValueError, match="no images"):
        main(["--checkpoint", str(det_run["weights"]), "--output-dir", str(tmp_path)])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        collect_images([str(empty)])


def test_missing_checkpoint(det_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        main(["--checkpoint", str(tmp_path / "absent.pth"), "--images", str(det_run["tmp"] / "imgs")])


def test_cli_dispatch(det_run, tmp_path):
    out = tmp_path / "cli"
    image = str(det_run["tmp"] / "imgs" / "a.png")
    records = cli.main(
        ["predict", "--checkpoint", str(det_run["weights"]), "--images", image,
         "--output-dir", str(out), "--threshold", "0.0", "--no-draw"]
    )  # fmt: skip
    assert len(records) == 1 and records[0]["width"] == 80
    assert json.loads((out / "predictions.json").read_text()) == records
    ref = det_run["records"][0]["detections"]
    assert [d["label"] for d in records[0]["detections"]] == [d["label"] for d in ref]
