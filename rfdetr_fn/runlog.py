"""What a run writes besides checkpoints: metrics.csv (always), TensorBoard events (when installed),
PNG plots at the end (when matplotlib is installed). Only rank 0 writes."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any

from rfdetr_fn.atomic import atomic_write


class RunLog:
    """Appends rows to metrics.csv; a resumed run keeps the earlier rows (the header grows as keys appear)."""

    def __init__(self, output_dir: Path, *, tensorboard: bool = True, enabled: bool = True):
        self.path = output_dir / "metrics.csv"
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = _read_rows(self.path) if enabled else []
        self.writer = _tensorboard_writer(output_dir / "tensorboard") if enabled and tensorboard else None

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {k: _plain(v) for k, v in row.items()}
        self.rows.append(row)
        self._write()
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


def plot(rows: list[dict[str, Any]], output_dir: Path) -> list[Path]:
    """Loss, learning-rate and mAP curves as PNG files; skipped (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no plots written", stacklevel=2)
        return []
    panels = {
        "losses.png": [k for k in _keys(rows) if k.startswith("train/loss")],
        "lr.png": [k for k in _keys(rows) if k.startswith("train/lr")],
        "map.png": [k for k in _keys(rows) if "mAP" in k or k.endswith("/F1")],
    }
    written = []
    for name, keys in panels.items():
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            points = [(float(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
            if points:
                ax.plot(*zip(*points), label=key, marker="." if len(points) < 30 else None)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(output_dir / name, dpi=100)
        plt.close(fig)
        written.append(output_dir / name)
    return written


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
