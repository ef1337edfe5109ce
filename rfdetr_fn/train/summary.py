"""What `fit` prints: a one-screen run summary at the start and the end, and one line per evaluation.

Pure functions from plain values to text, so the wording is tested without training anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HEADLINE = ("mAP_50_95", "mAP_50", "mAR", "segm_mAP_50_95", "kp_mAP_50_95", "kp_mAR", "F1", "loss")


def _table(title: str, rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [f"---- {title} " + "-" * max(0, 60 - len(title))]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)


def start_summary(
    *,
    model: str,
    num_params: int,
    num_classes: int,
    train_images: int,
    val_images: int,
    batch_size: int,
    grad_accum_steps: int,
    world_size: int,
    steps_per_epoch: int,
    epochs: int,
    max_steps: int | None,
    device: str,
    precision: str,
    compiled: bool,
    output_dir: Path,
    resumed_epoch: int | None = None,
) -> str:
    """Model, data, batch arithmetic, schedule length and the machine, before the first step."""
    effective = batch_size * grad_accum_steps * world_size
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    rows = [
        ("model", f"{model}, {num_params / 1e6:.2f} M parameters, {num_classes} classes"),
        ("data", f"{train_images} train / {val_images} valid images"),
        ("batch", f"{batch_size} x {grad_accum_steps} accumulation x {world_size} rank(s) = {effective} per step"),
        ("schedule", f"{epochs} epochs x {steps_per_epoch} steps = {total} optimizer steps"),
        ("device", f"{device}, {precision}, compile {'on' if compiled else 'off'}"),
        ("output", str(output_dir)),
    ]
    if resumed_epoch is not None:
        rows.append(("resumed", f"at epoch {resumed_epoch}"))
    return _table("rfdetr_fn fit", rows)


def scored_weights(eval_base_model: bool, use_ema: bool) -> str:
    """Which weights the primary val/* numbers belong to."""
    if not use_ema:
        return "base"
    return "base + EMA" if eval_base_model else "EMA"


def epoch_line(record: Mapping[str, Any], weights: str) -> str:
    """The headline numbers of one evaluation, with the weights they score."""
    keys = [f"{prefix}{n}" for prefix in ("val/", "val/ema_", "test/") for n in HEADLINE]
    numbers = ", ".join(f"{k}={record[k]:.4f}" for k in keys if k in record)
    return f"epoch {record.get('epoch')} ({weights} weights): {numbers}"


def end_summary(
    *,
    best_epoch: int | None,
    best_source: str,
    best_row: Mapping[str, Any],
    weights: Sequence[Path],
    times: Mapping[str, float],
    epochs_run: int,
) -> str:
    """Best epoch and its metrics, the weights files, and where the wall time went."""
    rows: list[tuple[str, str]] = []
    if best_epoch is None:
        rows.append(("best", "no evaluation improved on 0 (no best checkpoint chosen by metric)"))
    else:
        rows.append(("best", f"epoch {best_epoch} ({best_source} weights)"))
        prefix = "val/ema_" if best_source == "ema" and any(k.startswith("val/ema_") for k in best_row) else "val/"
        for name in HEADLINE:
            if prefix + name in best_row:
                rows.append((f"  {name}", f"{float(best_row[prefix + name]):.4f}"))
    rows += [("weights", str(p)) for p in weights]
    total = sum(times.values())
    split = ", ".join(f"{k} {v:.0f} s ({v / total:.0%})" for k, v in times.items()) if total > 0 else "-"
    rows.append(("wall time", f"{total:.0f} s over {epochs_run} epoch(s): {split}"))
    return _table("rfdetr_fn fit: done", rows)
