"""batch_size auto: the decision rules, the measurement loop, and a real CPU probe through fit."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from rfdetr_fn import cli, presets
from rfdetr_fn.config import TrainConfig
from rfdetr_fn.train import autobatch
from rfdetr_fn.train.grids import batch_pictures, grid_image

MiB = 2**20


def test_accumulation_reaches_the_global_target():
    assert autobatch.grad_accum_steps_for(5, 16, 1) == 4  # ceil(16 / 5)
    assert autobatch.grad_accum_steps_for(5, 16, 2) == 2  # 8 per rank
    assert autobatch.grad_accum_steps_for(32, 16, 1) == 1  # a floor, never a cap
    assert autobatch.grad_accum_steps_for(3, 16, 3) == 2  # ceil(16 / 3) = 6 per rank


def test_linear_fit_and_budget():
    fixed, per_image = autobatch.fit_linear({1: 110 * MiB, 2: 120 * MiB, 4: 140 * MiB})
    assert fixed == pytest.approx(100 * MiB) and per_image == pytest.approx(10 * MiB)
    assert autobatch.micro_batch_for(100 * MiB, 10 * MiB, 355 * MiB) == 25
    assert autobatch.micro_batch_for(100 * MiB, 10 * MiB, 50 * MiB) == 1  # never below one
    assert autobatch.micro_batch_for(100 * MiB, 0.0, 50 * MiB, cap=7) == 7


def test_choice_applies_ema_headroom_then_cap():
    peaks = {1: 110 * MiB, 2: 120 * MiB}
    tcfg = TrainConfig(batch_size="auto")
    choice = autobatch.choose(peaks, 300 * MiB, tcfg, world_size=1)
    assert (choice.micro_batch, choice.grad_accum_steps) == (14, 2)  # floor(20 * 0.7); ceil(16 / 14)
    assert choice.effective == 28 and "EMA headroom" in choice.describe()
    no_ema = autobatch.choose(peaks, 300 * MiB, TrainConfig(batch_size="auto", use_ema=False), world_size=2)
    assert (no_ema.micro_batch, no_ema.grad_accum_steps, no_ema.effective) == (20, 1, 40)
    capped = autobatch.choose(peaks, 300 * MiB, tcfg, world_size=1, cap=8, cap_reason="cpu")
    assert (capped.micro_batch, capped.grad_accum_steps) == (8, 2) and "capped at 8 (cpu)" in capped.reason


def test_measure_peaks_doubles_until_the_peak_moves():
    runs = []
    fake = {1: 500 * MiB, 2: 500 * MiB, 4: 500.5 * MiB, 8: 520 * MiB}
    peaks = autobatch.measure_peaks(runs.append, lambda: fake[runs[-1]], lambda: None)
    assert runs == [1, 2, 4, 8] and peaks == fake
    runs.clear()
    fake = {1: 500 * MiB, 2: 510 * MiB}
    assert autobatch.measure_peaks(runs.append, lambda: fake[runs[-1]], lambda: None) == fake and runs == [1, 2]


def test_out_of_memory_halves():
    tried = []

    def run(b):
        tried.append(b)
        if b > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    assert autobatch._largest_that_runs(run, 24) == 3 and tried == [24, 12, 6, 3]


def test_probe_batch_is_worst_case():
    cfg = presets.tiny(num_classes=3, segmentation_head=True)
    tcfg = TrainConfig(auto_batch_max_targets_per_image=7)
    batch = autobatch.probe_batch(cfg, tcfg, 64, 2, torch.device("cpu"))
    assert batch["labels"].shape == (2, 7) and (batch["labels"] == 1).all()
    assert batch["masks"].shape == (2, 7, 64, 64) and batch["images"].shape == (2, 3, 64, 64)


def test_batch_size_accepts_auto_only():
    with pytest.raises(ValueError, match="batch_size=0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="auto_batch_ema_headroom"):
        TrainConfig(auto_batch_ema_headroom=1.5)


def test_grid_pictures_undo_normalisation_and_boxes():
    from rfdetr_fn.data.transforms import normalize

    pixels = torch.randint(0, 256, (3, 32, 48), dtype=torch.uint8)
    images = torch.zeros(1, 3, 64, 64)
    images[0, :, :32, :48] = normalize(pixels)
    batch = {
        "images": images,
        "size": torch.tensor([[32, 48]]),
        "labels": torch.tensor([[2, -1]]),
        "boxes": torch.tensor([[[0.5, 0.5, 0.5, 0.25], [0, 0, 0, 0]]]),
    }
    [(picture, det)] = batch_pictures(batch)
    assert picture.shape == (32, 48, 3) and (abs(picture.astype(int) - pixels.permute(1, 2, 0).numpy()) <= 1).all()
    assert det["boxes"].tolist() == [[12.0, 12.0, 36.0, 20.0]] and det["labels"].tolist() == [2]
    grid = grid_image([Image.fromarray(picture)] * 4, cell=50)
    assert grid.size == (150, 150)


@pytest.mark.slow
def test_fit_with_auto_batch_preset_and_grids(tmp_path, capsys):
    """The acceptance command, shortened: a real CPU probe, the aggressive preset, grids written."""
    out = tmp_path / "run"
    args = ["--preset", "tiny", "--model.resolution", "64", "--data.synthetic-images", "8"]
    args += ["--data.synthetic-size", "64", "--data.num-workers", "0", "--train.multi-scale", "off"]
    args += ["--train.compile", "off", "--train.no-progress-bar", "--train.epochs", "1"]
    args += ["--train.output-dir", str(out), "--train.batch-size", "auto", "--train.auto-batch-target-effective", "4"]
    args += ["--train.auto-batch-max-targets-per-image", "8", "--train.aug-preset", "aggressive"]
    cli.main(["fit", *args, "--train.save-dataset-grids"])
    printed = capsys.readouterr().out
    assert "batch_size auto: micro-batch 4 x grad_accum_steps 1" in printed
    config = json.loads((out / "training_config.json").read_text())
    assert config["train"]["batch_size"] == 4 and config["train"]["aug_preset"] == "aggressive"
    grids = sorted(p.name for p in (out / "dataset_grids").iterdir())
    assert grids[0] == "train_batch0.png" and "valid_batch0.png" in grids
    assert Image.open(out / "dataset_grids" / "train_batch0.png").size == (960, 960)
