"""Nothing lost, nothing silently wrong: one test per reported defect of issue 15 (fit, resume, data, predict)."""

from __future__ import annotations

import math

import pytest
import torch

from rfdetr_fn import checkpoint, cli, tree
from rfdetr_fn.config import TrainConfig
from rfdetr_fn.fit import FitArgs

DATA = ["--data.synthetic-images", "4", "--data.synthetic-size", "64", "--data.num-workers", "0"]


def fit_argv(out, *extra: str) -> list[str]:
    """A few-second tiny run on the built-in shapes."""
    return [
        "fit",
        "--preset", "tiny", "--model.resolution", "64", *DATA,
        "--train.batch-size", "2", "--train.multi-scale", "off", "--train.compile", "off",
        "--train.no-progress-bar", "--train.no-tensorboard", "--train.output-dir", str(out), *extra,
    ]  # fmt: skip


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    from rfdetr_fn import runlog

    monkeypatch.setattr(runlog, "plot", lambda rows, out: [])


def fake_step(nan_at: int | None = None):
    """A stand-in for make_train_step: moves every weight a little (NaN from step `nan_at` on), no model run."""

    def make(cfg, tcfg, **kw):
        def step(state, batches):
            n = int(state["step"]) + 1
            bump = math.nan if nan_at is not None and n >= nan_at else 1e-3
            params = tree.map_(lambda p: p + bump, state["params"])
            ema = {**state["ema_state"], "params": params} if state["ema_state"] else {}
            loss = torch.tensor(bump)
            metrics = {"loss": loss, "grad_norm": loss, "lr_factor": torch.tensor(1.0), "finite": torch.isfinite(loss)}
            return {**state, "step": state["step"] + 1, "params": params, "ema_state": ema}, metrics

        return step

    return make


@pytest.fixture
def cheap_fit(monkeypatch):
    """Swap the model step and the evaluation for stand-ins: fit's bookkeeping runs in about a second."""
    from rfdetr_fn import fit

    monkeypatch.setattr(fit, "make_train_step", fake_step())
    monkeypatch.setattr(fit, "_evaluate_epoch", lambda state, *a: {"val/mAP_50_95": 0.0, "val/ema_mAP_50_95": 0.0})
    return monkeypatch


def _all_finite(path) -> bool:
    _, params = checkpoint.load_weights(path)
    return all(bool(torch.isfinite(v).all()) for v in tree.flatten(params).values())


# ---------------------------------------------------------------- 2. non-finite guard


def test_2_divergence_stops_with_last_good_state_and_no_nan_weights(tmp_path, cheap_fit):
    """What --train.lr 1e6 does (NaN from step 2), with the step stubbed: the real NaN backward takes 10 s."""
    from rfdetr_fn import fit

    cheap_fit.setattr(fit, "make_train_step", fake_step(nan_at=2))
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"non-finite .* at step 2.*lr"):
        cli.main(fit_argv(out, "--train.epochs", "3"))
    restored = checkpoint.load_state(out / "last", {"state": {"step": torch.zeros((), dtype=torch.int64)}})
    assert int(restored["state"]["step"]) == 1  # the last good state
    assert not (out / "checkpoint_best_total.pth").exists() and not (out / "last_ema.pth").exists()
    for weights in out.glob("*.pth"):
        assert _all_finite(weights), weights


def test_2_non_finite_config_values_are_rejected():
    bad = {"lr": math.nan, "weight_decay": math.inf, "clip_max_norm": math.nan, "betas": (0.9, math.nan)}
    for field, value in bad.items():
        with pytest.raises(ValueError, match=f"{field}=.*finite"):
            TrainConfig(**{field: value})
    with pytest.raises(SystemExit):
        cli.parse(FitArgs, ["--train.lr", "nan"])


# ---------------------------------------------------------------- 1. a fresh run into a used output dir


def test_1_fresh_run_refuses_a_used_output_dir_and_overwrite_starts_clean(tmp_path, cheap_fit):
    from rfdetr_fn import fit

    out = tmp_path / "run"
    cheap_fit.setattr(fit, "_evaluate_epoch", lambda *a: {"val/mAP_50_95": 0.5, "val/ema_mAP_50_95": 0.5})
    cli.main(fit_argv(out, "--train.epochs", "1"))  # the old run: its EMA scored 0.5
    old_rows = len((out / "metrics.csv").read_text().splitlines())
    cheap_fit.setattr(fit, "_evaluate_epoch", lambda *a: {"val/mAP_50_95": 0.0, "val/ema_mAP_50_95": 0.0})
    with pytest.raises(ValueError, match=r"run\b.*already.*--train.resume auto.*--train.overwrite"):
        cli.main(fit_argv(out, "--train.epochs", "1", "--train.seed", "5"))
    assert len((out / "metrics.csv").read_text().splitlines()) == old_rows  # nothing touched

    cli.main(fit_argv(out, "--train.epochs", "1", "--train.seed", "5", "--train.overwrite"))
    assert len((out / "metrics.csv").read_text().splitlines()) == old_rows  # the new run's rows only
    _, best = checkpoint.load_weights(out / "checkpoint_best_total.pth")
    _, last = checkpoint.load_weights(out / "last_ema.pth")  # the new run never beat 0: best = its final EMA
    assert all(torch.equal(v, tree.flatten(last)[k]) for k, v in tree.flatten(best).items())
