"""A run's output directory: what a run writes there, refusing to mix two runs, and the config record
a resume is checked against (trajectory-changing edits are refused unless allowed, then logged)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from rfdetr_fn.config import ConfigError, TrainConfig
from rfdetr_fn.io import dirlock
from rfdetr_fn.io.atomic import atomic_write

# What a run writes into its output_dir (the README's table): exact names, and the numbered snapshots, the
# temp and set-aside copies of saves and atomic writes' temp files, as patterns. A user's own file that merely
# shares a prefix (checkpoint_from_colleague.pth, last.yaml) is never a run file.
RUN_NAMES = {
    "training_config.json", "config_history.jsonl", "metrics.csv", "tensorboard", "metrics.png", "dataset_grids",
    "mlruns", "wandb", "last", "last_ema.pth", "checkpoint_best_regular.pth", "checkpoint_best_ema.pth",
    "checkpoint_best_total.pth",
}  # fmt: skip
_SNAPSHOT = r"(?:last|checkpoint_\d{4})"
RUN_PATTERNS = (
    re.compile(r"checkpoint_\d{4}"),
    re.compile(rf"{_SNAPSHOT}\.(?:tmp|old)-\d+"),  # a save's temp or set-aside copy (checkpoint.save_state)
)
_ATOMIC_TEMP = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp")  # atomic.atomic_write's temp of <name>


def is_run_file(name: str) -> bool:
    if name in RUN_NAMES or any(p.fullmatch(name) for p in RUN_PATTERNS):
        return True
    temp = _ATOMIC_TEMP.fullmatch(name)
    return temp is not None and temp["name"] in RUN_NAMES


def run_files(out_dir: Path, *, reads: tuple[str | Path | None, ...] = ()) -> list[Path]:
    """The files and folders a run wrote into `out_dir`, less any the current command reads (`reads`:
    pretrain weights, the resumed state, the config file, the dataset, found inside `out_dir`)."""
    if not out_dir.is_dir():
        return []
    kept = [Path(os.path.abspath(r)) for r in reads if r]
    found = [p for p in out_dir.iterdir() if is_run_file(p.name)]
    return sorted(p for p in found if not any(k == p.absolute() or k.is_relative_to(p.absolute()) for k in kept))


def has_saved_state(out_dir: Path) -> bool:
    return any((p / "rfdetr_fn_state.json").is_file() for p in out_dir.glob("last*") if p.is_dir())


def refuse_used_dir(out_dir: Path, *, resume: str | None = None) -> None:
    """A fresh run must not mix with an earlier one (its best weights would be taken for the new run's)."""
    found = run_files(out_dir)
    if not found:
        return
    names = ", ".join(p.name for p in found[:6]) + (", ..." if len(found) > 6 else "")
    if has_saved_state(out_dir):
        raise dirlock.OutputDirError(
            f"{out_dir} already holds a run ({names}): continue it with --train.resume auto, start over with "
            "--train.overwrite (deletes those files), or pick another --train.output-dir"
        )
    asked = "--train.resume auto has nothing to continue" if resume == "auto" else "there is nothing to resume"
    raise dirlock.OutputDirError(
        f"{out_dir} holds an earlier run ({names}) but no train state was saved (it stopped before its first "
        f"save), so {asked}: start over with --train.overwrite (deletes those files) or pick another "
        "--train.output-dir"
    )


def clear_run(out_dir: Path, *, reads: tuple[str | Path | None, ...] = ()) -> None:
    """Delete what an earlier run wrote (`--train.overwrite`): exactly its files, never one in `reads`."""
    for path in run_files(out_dir, reads=reads):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def clean_stale(out_dir: Path, *, keep: Path | None) -> list[Path]:
    """Remove the temp files and directories a killed run left (save copies, atomic-write temps), except
    `keep` (the copy being resumed from); returns what was removed."""
    keep_abs = Path(os.path.abspath(keep)) if keep is not None else None
    stale = [
        p
        for p in run_files(out_dir)
        if (p.name.endswith(".tmp") or ".tmp-" in p.name or ".old-" in p.name) and p.absolute() != keep_abs
    ]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


# Fields a resumed run may change freely: stopping, evaluation, logging and I/O, not the optimisation path.
RESUME_SAFE = {
    "train": {
        "epochs", "max_steps", "eval_interval", "checkpoint_interval", "eval_base_model", "compute_val_loss",
        "eval_batch_size", "early_stopping", "early_stopping_patience", "early_stopping_min_delta",
        "early_stopping_use_ema", "best_model_metric", "skip_best_epochs", "smooth_alpha", "run_test",
        "output_dir", "resume", "resume_allow_changes", "overwrite", "pretrain_weights", "tensorboard",
        "progress_bar", "log_every_n_steps", "save_every_n_steps", "compile", "allow_code_import",
    },
    "model": {"gradient_checkpointing"},  # the same numbers, less memory
    "data": {"num_workers", "check_images"},
    "eval": {"backend", "max_dets", "per_class", "threshold"},
}  # fmt: skip


def config_changes(old: dict, new: dict, *, cosine: bool) -> dict[str, list]:
    """{"section.field": [old, new]} for the trajectory-changing fields that differ between two config
    records (a cosine schedule's length depends on epochs and max_steps, so then those count too)."""
    new = json.loads(json.dumps(new, default=str))
    changes = {}
    for section in ("model", "train", "data", "eval"):
        safe = RESUME_SAFE.get(section, set()) - ({"epochs", "max_steps"} if cosine else set())
        before, after = old.get(section, {}), new.get(section, {})
        for key in sorted(set(before) | set(after)):
            if key not in safe and before.get(key) != after.get(key):
                changes[f"{section}.{key}"] = [before.get(key), after.get(key)]
    if old.get("class_names") != new.get("class_names"):
        changes["class_names"] = [old.get("class_names"), new.get("class_names")]
    return changes


def check_resume_changes(
    out_dir: Path, record: dict, tcfg: TrainConfig, step: int, *, source: Path | None = None
) -> None:
    """Refuse a resume whose config would silently change the run, unless allowed (then log each change).

    The record compared against is the one of the run that saved the state (`source`, a state directory:
    its parent holds that run's training_config.json), also when it is another run's directory."""
    path = (Path(source).parent if source is not None else out_dir) / "training_config.json"
    if not path.is_file():
        if source is not None and Path(source).parent.resolve() != out_dir.resolve():
            warnings.warn(
                f"{source}: no training_config.json beside it, so its settings cannot be compared", stacklevel=2
            )
        return
    previous = json.loads(path.read_text())
    changes = config_changes(previous, record, cosine=tcfg.lr_scheduler == "cosine")
    if not changes:
        return
    lines = "\n  ".join(f"{key}: {old} -> {new}" for key, (old, new) in changes.items())
    if not tcfg.resume_allow_changes:
        raise ConfigError(
            f"{path}: resuming with settings that change the training trajectory:\n  {lines}\n"
            "Resume with the saved values, or pass --train.resume-allow-changes to continue with the new ones"
        )
    print(f"resuming at step {step} with changed settings (recorded in config_history.jsonl):\n  {lines}")
    entry = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changes": changes, "previous": previous}
    with open(out_dir / "config_history.jsonl", "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")


def write_json(path: Path, value: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2, default=str)))
