"""Best-model tracking, early stopping and eval/checkpoint cadence follow upstream's callback rules."""

from __future__ import annotations

import math

import pytest

from rfdetr_fn.train.trackers import (
    BestState,
    EarlyStopState,
    best_total_source,
    from_dict,
    should_checkpoint,
    should_evaluate,
    to_dict,
    update_best,
    update_early_stop,
)


def run_best(values, **kw):
    """Feed (regular, ema) pairs for epochs 0.. and collect the decisions."""
    state, all_decisions = BestState(), []
    for epoch, (regular, ema) in enumerate(values):
        state, decisions = update_best(state, epoch=epoch, regular=regular, ema=ema, **kw)
        all_decisions.append(decisions)
    return state, all_decisions


def test_regular_strict_greater_and_first_always_saved():
    state, decisions = run_best([(0.0, None), (0.3, None), (0.3, None), (0.2, None), (0.31, None)])
    # The first eligible value is saved even at 0.0 (ModelCheckpoint with no best yet); ties do not save.
    assert decisions == [("regular",), ("regular",), (), (), ("regular",)]
    assert state.best_regular == 0.31 and state.best_regular_epoch == 4 and state.best_raw_regular == 0.31


def test_ema_strict_greater_than_zero_start():
    state, decisions = run_best([(None, 0.0), (None, 0.4), (None, 0.4), (None, 0.5)])
    assert decisions == [(), ("ema",), (), ("ema",)]
    assert state.best_ema == 0.5 and state.best_ema_epoch == 3
    assert state.best_regular is None


def test_both_tracks_decide_independently():
    _, decisions = run_best([(0.2, 0.1), (0.1, 0.3), (0.25, 0.3)])
    assert decisions == [("regular", "ema"), ("ema",), ("regular",)]


def test_skip_best_epochs_decides_nothing_but_smoothing_warms_up():
    state, decisions = run_best([(0.9, 0.9), (0.8, 0.8), (0.1, 0.2)], skip_best_epochs=2, smooth_alpha=0.5)
    assert decisions == [(), (), ("regular", "ema")]
    # s: 0.45 -> 0.625 -> 0.3625 (warmed during the skipped epochs); the raw value is remembered.
    assert state.smoothed_regular == pytest.approx(0.3625)
    assert state.best_regular == pytest.approx(0.3625) and state.best_raw_regular == 0.1
    assert state.best_ema == 0.2 and state.best_ema_epoch == 2


def test_smoothing_compares_smoothed_and_keeps_raw_at_smoothed_best():
    # alpha 0.5: s = 0.2, 0.2, 0.35, 0.275
    state, decisions = run_best([(0.4, None), (0.2, None), (0.5, None), (0.2, None)], smooth_alpha=0.5)
    assert decisions == [("regular",), (), ("regular",), ()]
    assert state.best_regular == pytest.approx(0.35)
    assert state.best_raw_regular == 0.5 and state.best_regular_epoch == 2


def test_smoothing_raw_is_not_the_all_time_peak():
    # alpha 0.5: raw peak 0.8 at epoch 0 (s=0.4); epoch 1 raw 0.6 -> s=0.5 becomes the best.
    state, _ = run_best([(0.8, None), (0.6, None)], smooth_alpha=0.5)
    assert state.best_regular_epoch == 1 and state.best_raw_regular == 0.6


def test_update_best_rejects_bad_alpha():
    with pytest.raises(ValueError, match="smooth_alpha"):
        update_best(BestState(), epoch=0, regular=0.1, ema=None, smooth_alpha=1.0)


def test_best_total_source():
    tie = BestState(best_regular=0.4, best_raw_regular=0.4, best_ema=0.4)
    assert best_total_source(tie, evaluates_base_model=True) == "regular"  # ties keep regular
    ema_wins = BestState(best_regular=0.4, best_raw_regular=0.4, best_ema=0.41)
    assert best_total_source(ema_wins, evaluates_base_model=True) == "ema"
    regular_wins = BestState(best_regular=0.5, best_raw_regular=0.5, best_ema=0.1)
    assert best_total_source(regular_wins, evaluates_base_model=False) == "ema"  # base model never evaluated
    assert best_total_source(regular_wins, evaluates_base_model=True) == "regular"
    # With smoothing, EMA is compared against the raw value at the smoothed best, not the smoothed one.
    smoothed = BestState(best_regular=0.2, best_raw_regular=0.5, best_ema=0.3)
    assert best_total_source(smoothed, evaluates_base_model=True) == "regular"
    assert best_total_source(BestState(), evaluates_base_model=True) == "regular"


def run_stop(values, **kw):
    kw = {"use_ema": True, "patience": 2, "min_delta": 0.01, **kw}
    state, stops = EarlyStopState(), []
    for epoch, (regular, ema) in enumerate(values):
        state, stop = update_early_stop(state, epoch=epoch, regular=regular, ema=ema, **kw)
        stops.append(stop)
    return state, stops


def test_early_stop_patience_and_min_delta():
    # 0.505 is within min_delta of 0.5 (no improvement), 0.52 improves, then two flat evaluations stop.
    state, stops = run_stop([(None, 0.5), (None, 0.505), (None, 0.52), (None, 0.52), (None, 0.525)])
    assert stops == [False, False, False, False, True]
    assert state.best == 0.52 and state.best_epoch == 2 and state.wait == 2 and state.stopped_epoch == 4


def test_early_stop_min_delta_zero_needs_strict_improvement():
    _, stops = run_stop([(None, 0.5), (None, 0.5), (None, 0.5)], min_delta=0.0)
    assert stops == [False, False, True]


def test_early_stop_monitored_value():
    # use_ema: the EMA value is monitored even when regular is higher.
    state, _ = run_stop([(0.6, 0.5)], use_ema=True)
    assert state.best == 0.5
    # not use_ema: max of both.
    state, _ = run_stop([(0.6, 0.5)], use_ema=False)
    assert state.best == 0.6
    # only one available: that one, whatever use_ema says.
    assert run_stop([(0.7, None)], use_ema=True)[0].best == 0.7
    assert run_stop([(None, 0.4)], use_ema=False)[0].best == 0.4


def test_early_stop_non_eval_and_skipped_epochs_are_noops():
    state, stops = run_stop([(None, 0.5), (None, None), (None, None), (None, 0.5)], patience=2)
    assert stops == [False, False, False, False] and state.wait == 1
    # Skipped epochs neither set the baseline nor count towards patience.
    state, stops = run_stop([(None, 0.9), (None, 0.9), (None, 0.3)], skip_best_epochs=2, patience=1)
    assert stops == [False, False, False] and state.best == 0.3 and state.best_epoch == 2


def test_early_stop_non_finite_stops():
    state, stops = run_stop([(None, 0.5), (None, math.nan)])
    assert stops == [False, True] and state.stopped_epoch == 1 and state.best == 0.5


def test_should_evaluate_every_interval_and_last_epoch():
    assert [e for e in range(10) if should_evaluate(e, eval_interval=3, epochs=10)] == [2, 5, 8, 9]
    assert [e for e in range(4) if should_evaluate(e, eval_interval=1, epochs=4)] == [0, 1, 2, 3]
    assert [e for e in range(3) if should_evaluate(e, eval_interval=5, epochs=3)] == [2]


def test_should_checkpoint_every_interval_and_last_epoch():
    assert [e for e in range(25) if should_checkpoint(e, checkpoint_interval=10, epochs=25)] == [9, 19, 24]
    with pytest.raises(ValueError, match="checkpoint_interval"):
        should_checkpoint(0, checkpoint_interval=0, epochs=3)


def test_records_round_trip_through_dicts():
    best, _ = run_best([(0.2, 0.1), (0.3, 0.35)], smooth_alpha=0.3)
    assert from_dict(BestState, to_dict(best)) == best
    stop, _ = run_stop([(None, 0.5), (None, 0.5)])
    assert from_dict(EarlyStopState, to_dict(stop)) == stop
    assert to_dict(BestState())["best_regular"] is None


def test_from_dict_defaults_unknown_and_non_finite():
    assert from_dict(BestState, {"best_ema": 0.4}) == BestState(best_ema=0.4)  # older checkpoint
    assert from_dict(BestState, {"best_ema": math.nan}) == BestState()  # non-finite -> default
    with pytest.raises(ValueError, match="best_emma"):
        from_dict(BestState, {"best_emma": 0.4})
