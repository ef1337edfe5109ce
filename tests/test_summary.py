"""What a user sees: the run summaries, the epoch line, the one-figure plot and the metric names."""

from __future__ import annotations

from pathlib import Path

import pytest

from rfdetr_fn.config import DataConfig, EvalConfig, TrainConfig
from rfdetr_fn.fit import _evaluate_epoch, _monitored
from rfdetr_fn.io import runlog
from rfdetr_fn.train import summary


def test_start_summary_has_the_batch_arithmetic():
    text = summary.start_summary(
        model="RFDETRNano (384 px)",
        num_params=30_500_000,
        num_classes=3,
        train_images=32,
        val_images=8,
        batch_size=4,
        grad_accum_steps=2,
        world_size=2,
        steps_per_epoch=10,
        epochs=5,
        max_steps=30,
        device="cuda:0",
        precision="bf16",
        compiled=True,
        output_dir=Path("out"),
    )
    assert "30.50 M parameters" in text and "4 x 2 accumulation x 2 rank(s) = 16 per step" in text
    assert "5 epochs x 10 steps = 30 optimizer steps" in text and "cuda:0, bf16, compile on" in text
    assert len(text.splitlines()) <= 12


def test_end_summary_names_best_epoch_metrics_files_and_time():
    text = summary.end_summary(
        best_epoch=3,
        best_source="ema",
        best_row={"epoch": 3, "val/mAP_50_95": 0.41, "val/F1": 0.5},
        weights=[Path("out/checkpoint_best_total.pth")],
        times={"train": 90.0, "eval": 8.0, "save": 2.0},
        epochs_run=5,
    )
    assert "epoch 3 (ema weights)" in text and "mAP_50_95  0.4100" in text
    assert "out/checkpoint_best_total.pth" in text and "train 90 s (90%), eval 8 s (8%), save 2 s (2%)" in text
    none = summary.end_summary(best_epoch=None, best_source="ema", best_row={}, weights=[], times={}, epochs_run=1)
    assert "no evaluation improved" in none


def test_each_metric_is_logged_once_under_upstreams_name(monkeypatch):
    scored = []

    def fake_evaluate(params, *args, **kwargs):
        scored.append(params)
        return {"mAP_50_95": 0.3 if params == "ema" else 0.2}

    monkeypatch.setattr("rfdetr_fn.fit.evaluate", fake_evaluate)
    state = {"params": "base", "ema_state": {"params": "ema"}}
    ema_only = TrainConfig()
    record = _evaluate_epoch(state, None, ema_only, DataConfig(), EvalConfig(), None, None, False)
    assert record == {"val/mAP_50_95": 0.3} and scored == ["ema"]
    assert _monitored(record, ema_only) == (None, 0.3)
    assert summary.epoch_line({"epoch": 2, **record}, summary.scored_weights(False, True)) == (
        "epoch 2 (EMA weights): val/mAP_50_95=0.3000"
    )
    both = TrainConfig(eval_base_model=True)
    record = _evaluate_epoch(state, None, both, DataConfig(), EvalConfig(), None, None, False)
    assert record == {"val/mAP_50_95": 0.2, "val/ema_mAP_50_95": 0.3}
    assert _monitored(record, both) == (0.2, 0.3)
    no_ema = TrainConfig(use_ema=False)
    record = _evaluate_epoch(state, None, no_ema, DataConfig(), EvalConfig(), None, None, False)
    assert record == {"val/mAP_50_95": 0.2} and _monitored(record, no_ema) == (0.2, None)


def test_plot_drops_coco_sentinels_and_writes_one_figure(tmp_path):
    rows = [
        {"step": 1, "epoch": 0, "train/loss": 3.0, "train/loss_ce_0": 1.0, "train/lr": 1e-4},
        {"step": 2, "epoch": 0, "val/mAP_50_95": 0.1, "val/ema_mAP_50_95": 0.12, "val/segm_mAP_50": -1.0},
        {"step": 4, "epoch": 1, "val/mAP_50_95": 0.2, "val/ema_mAP_50_95": -1.0, "val/F1": 0.3},
    ]
    series = runlog.panel_series(rows, ("mAP_50_95", "segm_mAP_50"))
    assert series == {"val/mAP_50_95": [(2.0, 0.1), (4.0, 0.2)], "val/ema_mAP_50_95": [(2.0, 0.12)]}
    assert "train/loss_ce_0" not in runlog.panel_series(rows, ("loss", "loss_ce"))  # per-layer terms stay in csv
    pytest.importorskip("matplotlib")
    assert runlog.plot(rows, tmp_path) == [tmp_path / "metrics.png"]
    assert (tmp_path / "metrics.png").stat().st_size > 1000


def test_atomic_writes_keep_the_users_umask(tmp_path):
    """metrics.csv, weights and JSON records get the mode a plain open() would give, not mkstemp's 0600."""
    import os

    from rfdetr_fn.io.atomic import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.csv", lambda p: p.write_text("x"))
        assert (tmp_path / "a.csv").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        atomic_write(tmp_path / "b.csv", lambda p: p.write_text("x"))
        assert (tmp_path / "b.csv").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
