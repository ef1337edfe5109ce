"""Experiment loggers in their offline / local-file modes: the same scalars as metrics.csv, and the config."""

from __future__ import annotations

import pytest

from rfdetr_fn.config import TrainConfig
from rfdetr_fn.io import loggers, runlog

ROWS = [
    {"step": 1, "epoch": 0, "train/loss": 3.5, "train/lr": 1e-4},
    {"step": 10, "epoch": 0, "train/loss": 2.25, "val/mAP_50_95": 0.125, "val/segm_mAP_50": float("nan")},
]
CONFIG = {"model": {"name": "tiny", "resolution": 64}, "train": {"lr": 1e-4}, "class_names": ["a", "b"]}


def test_rows_become_scalars_and_config_flattens():
    assert loggers.scalars(ROWS[1]) == {"train/loss": 2.25, "val/mAP_50_95": 0.125}
    flat = loggers.flat_config(CONFIG)
    assert flat["model.resolution"] == "64" and flat["class_names"] == "['a', 'b']"


def test_missing_package_is_a_clear_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ImportError, match=r"pip install 'rfdetr_fn\[wandb\]'"):
        loggers.make_loggers(TrainConfig(wandb=True), None, CONFIG)
    assert loggers.make_loggers(TrainConfig(), None, CONFIG) == []


def test_mlflow_local_file_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    [sink] = loggers.make_loggers(TrainConfig(mlflow=True, project="exp", run="r1"), tmp_path, CONFIG)
    log = runlog.RunLog(tmp_path, tensorboard=False, sinks=[sink])
    for row in ROWS:
        log.log(row)
    run_id = sink.run.info.run_id
    log.close()
    client = MlflowClient((tmp_path / "mlruns").resolve().as_uri())
    run = client.get_run(run_id)
    assert run.info.run_name == "r1" and run.data.params["model.resolution"] == "64"
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.5), (10, 2.25)]
    assert run.data.metrics["val/mAP_50_95"] == 0.125 and "val/segm_mAP_50" not in run.data.metrics


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    [sink] = loggers.make_loggers(TrainConfig(wandb=True, project="exp", run="r1"), tmp_path, CONFIG)
    for row in ROWS:
        sink.log(row)
    assert sink.run.config["model"]["resolution"] == 64
    assert sink.run.summary["train/loss"] == 2.25 and sink.run.summary["val/mAP_50_95"] == 0.125
    sink.close()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
