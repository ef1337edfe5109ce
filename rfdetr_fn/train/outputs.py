"""The weights files fit leaves beside its train state, in upstream's layout: the best regular and EMA
weights as they are found, then best_total (upstream's strict `>` rule between the two) and last_ema at
the end. Non-finite weights are never written."""

from __future__ import annotations

from pathlib import Path

import attrs
import torch

from rfdetr_fn import tree
from rfdetr_fn.errors import TrainingDiverged
from rfdetr_fn.io import weights
from rfdetr_fn.io.weights import load_weights
from rfdetr_fn.train import trackers


def write_weights(name: str, params, cfg, tcfg, epoch: int, class_names, out_dir: Path, source=None) -> None:
    """One upstream-layout weights file (checkpoint_best_*.pth, last_ema.pth); never non-finite weights."""
    bad = [k for k, v in tree.flatten(params).items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise TrainingDiverged(f"{out_dir / name}: not written: non-finite weights in {bad[:5]}")
    args = {**attrs.asdict(tcfg), "class_names": class_names}
    weights.write_upstream_best(
        out_dir / name, params, cfg, epoch=epoch, class_names=class_names, train_args=args, source=source
    )


def save_best(decisions, state, cfg, tcfg, epoch, class_names, out_dir: Path) -> None:
    if "regular" in decisions:
        write_weights("checkpoint_best_regular.pth", state["params"], cfg, tcfg, epoch, class_names, out_dir)
    if "ema" in decisions:
        write_weights("checkpoint_best_ema.pth", state["ema_state"]["params"], cfg, tcfg, epoch, class_names, out_dir)


def finish(state, cfg, tcfg, epoch, class_names, out_dir: Path, best) -> None:
    """Upstream's end-of-fit files: best EMA backfill, best_total (strict > rule) and last_ema."""
    final = state["ema_state"]["params"] if tcfg.use_ema else state["params"]
    if tcfg.use_ema and not (out_dir / "checkpoint_best_ema.pth").exists():
        write_weights("checkpoint_best_ema.pth", final, cfg, tcfg, epoch, class_names, out_dir)
    source = trackers.best_total_source(best, evaluates_base_model=tcfg.eval_base_model or not tcfg.use_ema)
    winner = out_dir / f"checkpoint_best_{source}.pth"
    if winner.exists():
        _, params = load_weights(winner, cfg)
        write_weights("checkpoint_best_total.pth", params, cfg, tcfg, epoch, class_names, out_dir, source=source)
    write_weights("last_ema.pth", final, cfg, tcfg, epoch, class_names, out_dir)
