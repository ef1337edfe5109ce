"""Optional experiment loggers: Weights & Biases (`--train.wandb`) and MLflow (`--train.mlflow`).

Each receives the run config once and then every row that goes to metrics.csv (the same scalars, at the
same optimizer step). Neither needs a network: W&B honours `WANDB_MODE=offline` (files under
`output_dir/wandb`), and MLflow writes to `MLFLOW_TRACKING_URI` or, when that is unset, a local file store
`output_dir/mlruns`. Install them with `pip install "rfdetr_fn[wandb]"` / `"rfdetr_fn[mlflow]"`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

DEFAULT_PROJECT = "rfdetr_fn"


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row, without its step/epoch counters."""
    return {
        k: float(v)
        for k, v in row.items()
        if k not in ("step", "epoch") and isinstance(v, (int, float)) and math.isfinite(float(v))
    }


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config record as flat `section.field` -> text (MLflow params are strings of <= 500 chars)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, prefix=f"{name}."))
        else:
            out[name] = str(value)[:500]
    return out


class WandbLogger:
    """One W&B run: the config at start, `wandb.log(scalars, step=step)` per row."""

    def __init__(self, output_dir: Path, config: dict[str, Any], project: str | None, run: str | None):
        import wandb

        self.run = wandb.init(
            project=project or DEFAULT_PROJECT, name=run, dir=str(output_dir), config=config, reinit=True
        )

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(scalars(row), step=int(row.get("step", 0)), commit=True)

    def close(self) -> None:
        self.run.finish()


class MlflowLogger:
    """One MLflow run in an experiment named after the project: params from the config, metrics per row."""

    def __init__(self, output_dir: Path, config: dict[str, Any], project: str | None, run: str | None):
        import mlflow

        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a local file store needs no server (MLflow 3 asks for this opt-in to use one)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (output_dir / "mlruns").resolve().as_uri()
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(project or DEFAULT_PROJECT)
        self.run = mlflow.start_run(run_name=run)
        mlflow.log_params(flat_config(config))

    def log(self, row: dict[str, Any]) -> None:
        self.mlflow.log_metrics(scalars(row), step=int(row.get("step", 0)))

    def close(self) -> None:
        self.mlflow.end_run()


def make_loggers(tcfg, output_dir: Path, config: dict[str, Any]) -> list:
    """The loggers the train config asks for; a missing package is a clear error, not a silent skip."""
    wanted = [(tcfg.wandb, "wandb", WandbLogger), (tcfg.mlflow, "mlflow", MlflowLogger)]
    loggers = []
    for enabled, package, cls in wanted:
        if not enabled:
            continue
        try:
            __import__(package)
        except ImportError as exc:
            raise ImportError(
                f"train.{package} needs the {package} package: pip install 'rfdetr_fn[{package}]'"
            ) from exc
        loggers.append(cls(output_dir, config, tcfg.project, tcfg.run))
    return loggers
