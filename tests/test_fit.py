"""End to end: the model learns, the CLI trains/validates/tests/predicts, and resume is exact."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import rfdetr_fn as rf
from rfdetr_fn import cli, tree
from rfdetr_fn.config import DataConfig, TrainConfig
from rfdetr_fn.data import build_dataset
from rfdetr_fn.data.loader import collate
from rfdetr_fn.io import checkpoint, weights
from rfdetr_fn.model.boxes import cxcywh_to_xyxy, pairwise_iou
from rfdetr_fn.step import make_train_step

SHORT_STEPS = 45
SHORT_DROP = 0.9  # measured 0.83 (15.93 -> 13.20; flat for the first 20 steps); the 200-step test asks for 0.5


def _overfit_setup():
    cfg = rf.presets.tiny(num_classes=2, resolution=64)
    dcfg = DataConfig(synthetic_images=4, synthetic_classes=2, synthetic_size=64, num_workers=0)
    tcfg = TrainConfig(
        lr=3e-4,
        lr_encoder=3e-4,
        weight_decay=0.0,
        batch_size=4,
        multi_scale="off",
        use_ema=False,
        clip_max_norm=1.0,
    )
    dataset = build_dataset(dcfg, "train", cfg, tcfg, train=False)
    batch = collate([dataset[i] for i in range(4)], cfg.block_size)
    step = make_train_step(cfg, tcfg, steps_per_epoch=1000)
    return cfg, tcfg, batch, step, step.init(rf.init(cfg, 0))


def test_loss_falls_on_a_few_synthetic_images():
    """The short twin of the overfit test below: STEPS steps on 4 images and the loss clearly falls."""
    _, _, batch, step, state = _overfit_setup()
    losses = []
    for _ in range(SHORT_STEPS):
        state, metrics = step(state, [batch])
        losses.append(float(metrics["loss"]))
    assert sum(losses[-5:]) / 5 < SHORT_DROP * sum(losses[:5]) / 5, losses


@pytest.mark.slow
def test_overfits_a_few_synthetic_images():
    """200 steps on 4 images: the loss falls and the training boxes are found (IoU > 0.5, right class).

    At most one of the 11 boxes may be missed among each image's top 3n detections: which box a tiny DETR
    settles last depends on fp32 rounding (thread count, gradient mechanism), not on correctness; an
    untrained or broken model finds none.
    """
    cfg, _, batch, step, state = _overfit_setup()
    losses = []
    for _ in range(200):
        state, metrics = step(state, [batch])
        losses.append(float(metrics["loss"]))
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    with torch.no_grad():
        out = rf.apply(state["params"], batch["images"], batch["mask"], cfg, train=False)
    preds = rf.postprocess(out, torch.tensor([[64, 64]] * 4), cfg.num_select)
    missed, total = [], 0
    for b, pred in enumerate(preds):
        n = int((batch["labels"][b] >= 0).sum())
        gt = cxcywh_to_xyxy(batch["boxes"][b, :n]) * 64
        top = 3 * n
        iou = pairwise_iou(gt, pred["boxes"][:top])[0]
        hit = (iou > 0.5) & (batch["labels"][b, :n, None] == pred["labels"][None, :top])
        missed += [(b, box) for box, found in zip(gt.tolist(), hit.any(1).tolist()) if not found]
        total += n
    assert total == 11 and len(missed) <= 1, f"missed {missed}"  # 11 shapes in the 4 synthetic images


# the built-in synthetic split every command of these tests reads
DATA_ARGS = ["--data.synthetic-size", "64", "--data.num-workers", "0"]


def _images(n: int) -> list[str]:
    return ["--data.synthetic-images", str(n)]


def _fit_args(out, *extra: str) -> list[str]:
    return [
        "--preset",
        "tiny",
        "--model.resolution",
        "64",
        *DATA_ARGS,
        "--train.batch-size",
        "2",
        "--train.multi-scale",
        "off",
        "--train.compile",
        "off",
        "--train.no-progress-bar",
        "--train.output-dir",
        str(out),
        *extra,
    ]


def test_cli_fit_validate_test_predict_short(tmp_path):
    """The short twin of the test below: one 2-step epoch on 4 images, then every other command on it."""
    _cli_round_trip(tmp_path, epochs=1, images=4)


@pytest.mark.slow
def test_cli_fit_validate_test_predict(tmp_path):
    _cli_round_trip(tmp_path, epochs=2, images=8)


def _cli_round_trip(tmp_path, epochs: int, images: int) -> None:
    out = tmp_path / "run"
    cli.main(["fit", *_fit_args(out, "--train.epochs", str(epochs), *_images(images), "--train.compute-val-loss")])
    kept = out / f"checkpoint_{epochs - 1:04d}"  # the last epoch's numbered state: one save, hard-linked to last/
    assert (kept / ".metadata").stat().st_ino == (out / "last" / ".metadata").stat().st_ino
    for name in (
        "checkpoint_best_total.pth",
        "checkpoint_best_ema.pth",
        "last_ema.pth",
        "metrics.csv",
        "training_config.json",
        "metrics.png",
    ):
        assert (out / name).exists(), name
    saved = torch.load(out / "checkpoint_best_total.pth", weights_only=True)
    assert saved["best_total_source"] == "ema" and saved["model_name"]
    config = json.loads((out / "training_config.json").read_text())
    assert config["model"]["resolution"] == 64 and config["class_names"]
    rows = (out / "metrics.csv").read_text().splitlines()
    # only the EMA weights were scored: each metric once, under upstream's primary name
    assert "val/mAP_50_95" in rows[0] and "val/loss" in rows[0] and "val/ema_" not in rows[0] and len(rows) >= 3

    common = ["--checkpoint", str(out), *DATA_ARGS, *_images(images)]
    val = cli.main(["validate", *common, "--output", str(tmp_path / "val.json")])
    assert 0.0 <= val["val/mAP_50_95"] <= 1.0
    assert json.loads((tmp_path / "val.json").read_text()) == pytest.approx(val)
    test = cli.main(["test", *common])
    assert set(test) and all(k.startswith("test/") for k in test)

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(images / "a.png")
    Image.new("RGB", (80, 60), (30, 120, 200)).save(images / "b.png")
    records = cli.main(
        [
            "predict",
            "--checkpoint",
            str(out),
            "--images",
            str(images),
            "--threshold",
            "0",
            "--output-dir",
            str(tmp_path / "pred"),
        ]
    )
    parsed = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert len(parsed) == len(records) >= 1 and parsed[-1]["width"] == 80


def test_resume_is_exact_short(tmp_path):
    """The short twin of the test below: 2-step epochs on 4 images."""
    _resume_round_trip(tmp_path, images=4)


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    """2 epochs straight == 1 epoch, save, resume, 1 more epoch: bit for bit on CPU."""
    _resume_round_trip(tmp_path, images=8)


def _resume_round_trip(tmp_path, images: int) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--train.epochs", "2", "--train.seed", "3", "--train.drop-path", "0.1"]
    common += _images(images)
    steps_per_epoch = images // 2
    cli.main(["fit", *_fit_args(straight, *common)])
    cli.main(["fit", *_fit_args(split, *common, "--train.max-steps", str(steps_per_epoch))])
    cli.main(["fit", *_fit_args(split, *common, "--train.resume", "auto")])
    _, a = weights.load_weights(straight / "last_ema.pth")
    _, b = weights.load_weights(split / "last_ema.pth")
    for key, value in tree.flatten(a).items():
        assert torch.equal(value, tree.flatten(b)[key]), key
    tiny = rf.presets.tiny(resolution=64)
    template = make_train_step(tiny, TrainConfig(), steps_per_epoch=1).init(rf.init(tiny, 0))
    state_a = checkpoint.load_state(straight / "last", {"state": template})
    state_b = checkpoint.load_state(split / "last", {"state": template})
    assert int(state_a["state"]["step"]) == int(state_b["state"]["step"]) > steps_per_epoch  # resumed past max-steps
    for key, value in tree.flatten(state_a["state"]["opt_state"]).items():
        assert torch.equal(value, tree.flatten(state_b["state"]["opt_state"])[key]), key
