"""Upstream's training callbacks as pure functions over small frozen records.

Best-model tracking (regular / EMA / best-total), early stopping and the eval/checkpoint cadence. The fit loop
holds the records, calls `update_*` after each evaluation, acts on the decisions (writes files, stops), and
saves the records in its train-state checkpoint through `to_dict` / `from_dict`. Epochs are 0-based, as in
Lightning's `current_epoch`.
"""

from __future__ import annotations

import math
from typing import Any, Literal, TypeVar

import attrs

__all__ = [
    "BestState",
    "EarlyStopState",
    "update_best",
    "best_total_source",
    "update_early_stop",
    "should_evaluate",
    "should_checkpoint",
    "to_dict",
    "from_dict",
    "Loop",
    "loop_to_dict",
    "loop_from_dict",
]


@attrs.frozen(kw_only=True)
class BestState:
    """Best-model high-water marks (upstream BestModelCallback state)."""

    best_regular: float | None = None
    """Best regular metric as compared (smoothed when smoothing is on); None = nothing saved yet."""
    best_regular_epoch: int = -1
    best_raw_regular: float = 0.0
    """Raw regular metric at the epoch that set best_regular (what best-total compares against EMA)."""
    best_ema: float = 0.0
    """Best EMA-model metric; starts at 0.0, so an EMA score must be > 0 to be saved."""
    best_ema_epoch: int = -1
    smoothed_regular: float = 0.0
    """Running EMA of the regular metric (only updated when smooth_alpha > 0)."""


@attrs.frozen(kw_only=True)
class EarlyStopState:
    """Early-stopping progress (upstream RFDETREarlyStopping / Lightning EarlyStopping state)."""

    best: float | None = None
    """Best monitored value so far; None before the first counted evaluation."""
    best_epoch: int = -1
    wait: int = 0
    """Counted evaluations since the last improvement."""
    stopped_epoch: int = -1


def update_best(
    state: BestState,
    *,
    epoch: int,
    regular: float | None,
    ema: float | None,
    skip_best_epochs: int = 0,
    smooth_alpha: float = 0.0,
) -> tuple[BestState, tuple[str, ...]]:
    """Fold one evaluation into the best-model state -> (state, files to (re)write: "regular" and/or "ema").

    `regular` is the base model's metric (None when the base model was not evaluated), `ema` the EMA model's
    (None without EMA). Rules, as upstream:
    - the smoothing accumulator s = a*s + (1-a)*raw runs on every evaluation, skipped epochs included, so it
      is warm at the first eligible one; the comparison uses s, and the raw value at the new best is kept;
    - epochs < skip_best_epochs decide nothing;
    - regular: the first eligible value is always saved (Lightning ModelCheckpoint with save_top_k=1), later
      ones only when strictly greater than the best;
    - EMA: strictly greater than the best, which starts at 0.0.
    """
    if not 0.0 <= smooth_alpha < 1.0:
        raise ValueError(f"smooth_alpha={smooth_alpha} must lie in [0, 1)")
    if skip_best_epochs < 0:
        raise ValueError(f"skip_best_epochs={skip_best_epochs} must be >= 0")
    decisions: list[str] = []
    smoothed = state.smoothed_regular
    if regular is not None and smooth_alpha > 0.0:
        smoothed = smooth_alpha * smoothed + (1.0 - smooth_alpha) * regular
        state = attrs.evolve(state, smoothed_regular=smoothed)
    if epoch < skip_best_epochs:
        return state, ()
    if regular is not None:
        current = smoothed if smooth_alpha > 0.0 else regular
        if math.isnan(current):
            current = -math.inf  # ModelCheckpoint's NaN rule in max mode
        if state.best_regular is None or current > state.best_regular:
            state = attrs.evolve(state, best_regular=current, best_regular_epoch=epoch, best_raw_regular=regular)
            decisions.append("regular")
    if ema is not None and ema > state.best_ema:
        state = attrs.evolve(state, best_ema=ema, best_ema_epoch=epoch)
        decisions.append("ema")
    return state, tuple(decisions)


def best_total_source(state: BestState, *, evaluates_base_model: bool) -> Literal["ema", "regular"]:
    """Which best checkpoint becomes best-total: EMA when the base model was never evaluated, or when the best
    EMA metric is strictly greater than the raw best regular one (ties keep regular)."""
    if not evaluates_base_model:
        return "ema"
    return "ema" if state.best_ema > state.best_raw_regular else "regular"


def _monitored(regular: float | None, ema: float | None, use_ema: bool) -> float | None:
    if use_ema and ema is not None:
        return ema
    if regular is not None and ema is not None:
        return max(regular, ema)
    return ema if ema is not None else regular


def update_early_stop(
    state: EarlyStopState,
    *,
    epoch: int,
    regular: float | None,
    ema: float | None,
    use_ema: bool,
    patience: int,
    min_delta: float,
    skip_best_epochs: int = 0,
) -> tuple[EarlyStopState, bool]:
    """Fold one evaluation into early stopping -> (state, should_stop).

    Monitored value: the EMA metric when use_ema and it exists, else max(regular, ema), else whichever exists.
    Improvement means value - min_delta > best (the first counted value always improves); otherwise the wait
    grows and training stops once it reaches `patience`. A non-finite value stops at once (check_finite).
    Epochs < skip_best_epochs and epochs without metrics (both None) change nothing.
    """
    if patience < 1:
        raise ValueError(f"patience={patience} must be >= 1")
    if min_delta < 0:
        raise ValueError(f"min_delta={min_delta} must be >= 0")
    value = _monitored(regular, ema, use_ema)
    if epoch < skip_best_epochs or value is None:
        return state, False
    if not math.isfinite(value):
        return attrs.evolve(state, stopped_epoch=epoch), True
    if state.best is None or value - min_delta > state.best:
        return attrs.evolve(state, best=value, best_epoch=epoch, wait=0), False
    wait = state.wait + 1
    if wait >= patience:
        return attrs.evolve(state, wait=wait, stopped_epoch=epoch), True
    return attrs.evolve(state, wait=wait), False


def should_evaluate(epoch: int, *, eval_interval: int, epochs: int) -> bool:
    """Evaluate after epoch `epoch` (0-based): every eval_interval epochs, and always after the last one."""
    if eval_interval < 1:
        raise ValueError(f"eval_interval={eval_interval} must be >= 1")
    return (epoch + 1) % eval_interval == 0 or epoch == epochs - 1


def should_checkpoint(epoch: int, *, checkpoint_interval: int, epochs: int) -> bool:
    """Keep a numbered checkpoint after epoch `epoch` (0-based): every checkpoint_interval epochs (upstream's
    checkpoint_<N>.pth with N = epoch + 1), and always after the last one."""
    if checkpoint_interval < 1:
        raise ValueError(f"checkpoint_interval={checkpoint_interval} must be >= 1")
    return (epoch + 1) % checkpoint_interval == 0 or epoch == epochs - 1


Record = TypeVar("Record", BestState, EarlyStopState)


def to_dict(state: BestState | EarlyStopState) -> dict[str, Any]:
    """Plain dict of a tracker record (for train-state checkpoints)."""
    return attrs.asdict(state)


def from_dict(cls: type[Record], data: dict[str, Any]) -> Record:
    """Rebuild a tracker record; missing fields take their defaults (older checkpoints), unknown ones are an
    error, and a non-finite stored float falls back to its default (as upstream's load_state_dict does)."""
    fields = {f.name: f for f in attrs.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}")
    values = {}
    for name, value in data.items():
        if isinstance(value, float) and not math.isfinite(value):
            continue
        values[name] = value
    return cls(**values)


# ---------------------------------------------------------------- the fit loop's position


@attrs.frozen(kw_only=True)
class Loop:
    """Where the fit loop stands, saved with the train state: the next epoch and batch to run, the epoch whose
    evaluation is still owed (-1: none), and the best-model and early-stopping records. Updated only by
    `attrs.evolve` and the pure functions above, so a resumed run continues from exactly this value."""

    epoch: int = 0
    batch: int = 0
    eval_pending: int = -1
    best: BestState = BestState()
    stop: EarlyStopState = EarlyStopState()


def loop_to_dict(loop: Loop) -> dict[str, Any]:
    """The loop record as the nested dict a train-state checkpoint stores."""
    return {
        "loop": {"epoch": loop.epoch, "batch": loop.batch, "eval_pending": loop.eval_pending},
        "best": to_dict(loop.best),
        "stop": to_dict(loop.stop),
    }


def loop_from_dict(data: dict[str, Any]) -> Loop:
    """Inverse of `loop_to_dict` (tensors or numbers)."""
    position = {k: int(v) for k, v in data["loop"].items()}
    return Loop(**position, best=from_dict(BestState, data["best"]), stop=from_dict(EarlyStopState, data["stop"]))
