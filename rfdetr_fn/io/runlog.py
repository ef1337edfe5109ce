"""What a run writes besides checkpoints: metrics.csv (always), TensorBoard events (when installed),
PNG plots at the end (when matplotlib is installed). Only rank 0 writes."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any

from rfdetr_fn.io.atomic import atomic_write


class RunLog:
    """Appends rows to metrics.csv; a resumed run keeps the earlier rows (the header grows as keys appear)."""

    def __init__(self, output_dir: Path, *, tensorboard: bool = True, enabled: bool = True, sinks=()):
        self.path = output_dir / "metrics.csv"
        self.sinks = list(sinks)  # experiment loggers (rfdetr_fn.io.loggers): each gets every row
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = _read_rows(self.path) if enabled else []
        self.writer = _tensorboard_writer(output_dir / "tensorboard") if enabled and tensorboard else None

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {k: _plain(v) for k, v in row.items()}
        self.rows.append(row)
        self._write()
        for sink in self.sinks:
            sink.log(row)
        if self.writer is not None:
            step = int(row.get("step", 0))
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, float) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def rewind(self, step: int, *, evaluated: bool) -> None:
        """Forget rows after `step` (and its evaluation row unless `evaluated`): a resumed run logs them again."""
        if not self.enabled:
            return

        def kept(row: dict[str, Any]) -> bool:
            at = int(row.get("step", 0))
            return at < step or (at == step and (evaluated or not any(k.startswith("val/") for k in row)))

        self.rows = [row for row in self.rows if kept(row)]
        self._write()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        if self.writer is not None:
            self.writer.close()

    def _write(self) -> None:
        fields = _keys(self.rows)

        def write(tmp: Path) -> None:
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(self.rows)

        atomic_write(self.path, write)


PLOT_FILE = "metrics.png"
PANELS = (
    ("losses", ("loss", "loss_ce", "loss_bbox", "loss_giou", "loss_mask_ce", "loss_mask_dice")),
    ("mAP", ("mAP_50_95", "mAP_50", "mAP_75", "mAR", "segm_mAP_50_95", "segm_mAP_50")),
    ("F1, precision, recall", ("F1", "precision", "recall")),
    ("learning rate", ("lr", "lr_encoder")),
)


def panel_series(rows: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, list[tuple[float, float]]]:
    """The (step, value) points of each logged key whose metric name is in `names`: train/x, val/x,
    val/ema_x, test/x. COCO's -1 "no such objects" sentinel and non-finite values are dropped, not drawn."""
    series: dict[str, list[tuple[float, float]]] = {}
    for key in _keys(rows):
        split, _, metric = key.partition("/")
        if split not in ("train", "val", "test") or metric.removeprefix("ema_") not in names:
            continue
        points = []
        for r in rows:
            value = r.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0 and "step" in r:
                points.append((float(r["step"]), float(value)))
        if points:
            series[key] = points
    return series


def plot(rows: list[dict[str, Any]], output_dir: Path) -> list[Path]:
    """One figure, one panel per kind of curve (losses, mAP, F1/precision/recall, learning rate): a colour per
    metric, line style per weights (solid base or primary, dashed EMA, dotted test). Skipped (with a
    warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no plots written", stacklevel=2)
        return []
    panels = [(title, panel_series(rows, names), names) for title, names in PANELS]
    panels = [p for p in panels if p[1]]
    if not panels:
        return []
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3.2 * len(panels)), squeeze=False)
    colours = plt.get_cmap("tab10").colors
    for ax, (title, series, names) in zip(axes[:, 0], panels):
        for key, points in series.items():
            split, _, metric = key.partition("/")
            name = metric.removeprefix("ema_")
            style = ":" if split == "test" else "--" if metric.startswith("ema_") else "-"
            colour = colours[(names.index(name) + (len(names) if split == "val" and title == "losses" else 0)) % 10]
            ax.plot(*zip(*points), style, color=colour, label=key, marker="." if len(points) < 30 else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = output_dir / PLOT_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def _keys(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return value


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [{k: _number(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def _tensorboard_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(directory))
