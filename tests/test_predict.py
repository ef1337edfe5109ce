"""`predict` against upstream's RFDETR.predict preprocessing and PostProcess on the golden tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import rfdetr_fn as rf
from rfdetr_fn import tree
from rfdetr_fn.eval.inference import preprocess
from tests.golden import golden_config, golden_params


@pytest.fixture(scope="module", params=["tiny_det", "tiny_seg"])
def case(request, golden_dir):
    d = golden_dir / request.param
    inputs = load_file(d / "inputs.safetensors")
    sources = [inputs["batch1.source.0"].numpy(), inputs["batch1.source.1"].numpy()]
    return {
        "name": request.param,
        "cfg": golden_config(d),
        "params": golden_params(d),
        "inputs": inputs,
        "sources": sources,
        "post": load_file(d / "postprocess.safetensors"),
    }


def test_preprocess_matches_upstream(case):
    batch, sizes = preprocess(case["sources"], case["cfg"])
    worst = (batch - case["inputs"]["batch1.images"]).abs().max().item()
    assert worst <= 1e-6, f"{case['name']}: preprocessed images differ by {worst:.3g}"
    assert torch.equal(sizes, case["inputs"]["batch1.target_sizes"])


def test_predict_matches_golden_postprocess(case, tmp_path):
    """threshold 0 keeps all num_select detections; paths, PIL images and arrays give the same result."""
    src0, src1 = case["sources"]
    path = tmp_path / "img0.png"
    Image.fromarray(src0).save(path)
    by_array = rf.predict(case["params"], case["cfg"], [src0, src1], threshold=0.0)
    by_other = rf.predict(case["params"], case["cfg"], [str(path), Image.fromarray(src1)], threshold=0.0)
    post = case["post"]
    for i, (det, other) in enumerate(zip(by_array, by_other)):
        assert torch.equal(det["labels"], post[f"{i}.labels"])
        box_d = (det["boxes"] - post[f"{i}.boxes"]).abs().max().item()
        score_d = (det["scores"] - post[f"{i}.scores"]).abs().max().item()
        assert box_d <= 1e-3 and score_d <= 1e-6, f"{case['name']} image {i}: boxes {box_d:.3g}, scores {score_d:.3g}"
        torch.testing.assert_close(det["boxes"], other["boxes"], rtol=0, atol=0)
        if f"{i}.masks" in post:
            assert det["masks"].shape == post[f"{i}.masks"].shape[:1] + post[f"{i}.masks"].shape[2:]
            assert torch.equal(det["masks"], post[f"{i}.masks"][:, 0])
        else:
            assert "masks" not in det


def test_threshold_keeps_strictly_higher_scores(case):
    scores = case["post"]["0.scores"]
    cut = (scores[3] + scores[4]).item() / 2  # keep exactly the 4 best
    (det,) = rf.predict(case["params"], case["cfg"], case["sources"][0], threshold=cut)
    assert len(det["scores"]) == 4 and (det["scores"] > cut).all()
    assert det["boxes"].shape == (4, 4) and det["labels"].dtype == torch.int64
    assert rf.predict(case["params"], case["cfg"], [], threshold=0.5) == []


def test_predict_runs_in_float64(case):
    params = tree.map_(lambda t: t.double(), case["params"])
    (det,) = rf.predict(params, case["cfg"], case["sources"][1], threshold=0.0)
    assert det["boxes"].dtype == torch.float64
    torch.testing.assert_close(det["scores"].float(), case["post"]["1.scores"], rtol=0, atol=1e-6)


def test_bad_inputs_name_the_image(tmp_path):
    cfg = rf.presets.tiny()
    params = rf.init(cfg)
    with pytest.raises(ValueError, match=r"images\[1\].*uint8"):
        rf.predict(params, cfg, [np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32)])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        rf.predict(params, cfg, str(tmp_path / "missing.png"))
    with pytest.raises(TypeError, match=r"images\[0\]"):
        rf.predict(params, cfg, [42])


def test_large_images_are_a_per_call_choice_never_pillows_global(tmp_path, monkeypatch):
    """`read_rgb(allow_large=True)` skips the decompression-bomb guard for that read only: Pillow's
    process-wide `Image.MAX_IMAGE_PIXELS` is never changed (predict used to flip it)."""
    from rfdetr_fn.io import imageio

    path = tmp_path / "big.png"
    Image.fromarray(np.full((80, 80, 3), 7, dtype=np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1600)  # 80x80 = 6400 > 2 x 1600: a "bomb" now
    pytest.raises(Image.DecompressionBombError, imageio.read_rgb, path)
    assert imageio.read_rgb(path, allow_large=True).shape == (80, 80, 3)
    assert Image.MAX_IMAGE_PIXELS == 1600
