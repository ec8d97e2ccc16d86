"""Tests for SignalPruner: standard Optuna pruners judging a user-attr series."""

from __future__ import annotations

import math
import pickle

import optuna
import pytest
from optuna.pruners import (
    BasePruner,
    HyperbandPruner,
    MedianPruner,
    PatientPruner,
    PercentilePruner,
    ThresholdPruner,
    WilcoxonPruner,
)

from optuna_triage import SignalPruner

optuna.logging.set_verbosity(optuna.logging.WARNING)

_GOOD = {"0": 3.0, "1": 2.0, "2": 1.0}
_MID = {"0": 3.0, "1": 2.5, "2": 2.0}
_BAD = {"0": 3.0, "1": 2.9, "2": 2.8}


def _study(pruner: BasePruner, *, direction: str = "maximize") -> optuna.Study:
    """A study with three completed trials whose `curve_train_loss` is GOOD, MID and BAD.

    Their own intermediate values (retentions) are all 1.0, so only the signal tells them apart.
    The study maximises its objective (an accuracy), while the loss is minimised.
    """
    study = optuna.create_study(direction=direction, pruner=pruner)
    for curve in (_GOOD, _MID, _BAD):
        t = study.ask()
        t.set_user_attr("curve_train_loss", curve)
        for step in curve:
            t.report(1.0, int(step))
        study.tell(t, 0.9)
    return study


def _judge(study: optuna.Study, curve: dict | None, retention: float = 1.0) -> bool:
    trial = study.ask()
    if curve is not None:
        trial.set_user_attr("curve_train_loss", curve)
    steps = [int(s) for s in curve] if curve else [0]
    for step in steps:
        trial.report(retention, step)
    return trial.should_prune()


@pytest.mark.parametrize(
    ("curve", "expected"),
    [
        ({"0": 3.0, "1": 2.95, "2": 2.9}, True),  # worse than the median (MID) at step 2
        ({"0": 3.0, "1": 2.0, "2": 1.2}, False),  # better than the median
        ({"0": 3.0, "1": 2.5, "2": 2.0}, False),  # equal to the median: not worse
    ],
)
def test_signal_median_prunes_worse_loss_curve(curve: dict, expected: bool) -> None:
    study = _study(SignalPruner(MedianPruner(n_startup_trials=3), "train_loss", direction="minimize"))
    assert _judge(study, curve) is expected


def test_signal_plain_median_sees_only_retention() -> None:
    # Without SignalPruner the same bad-loss trial has the same retentions as everyone: kept.
    # (Optuna itself returns numpy bools here; SignalPruner returns builtin ones.)
    assert not _judge(_study(MedianPruner(n_startup_trials=3)), {"0": 3.0, "1": 2.95, "2": 2.9})


def test_signal_direction_defaults_to_study_direction() -> None:
    # In a minimising study the loss is minimised by default ...
    minimize = _study(SignalPruner(MedianPruner(n_startup_trials=3), "train_loss"), direction="minimize")
    assert _judge(minimize, {"0": 3.0, "1": 2.95, "2": 2.9}) is True
    # ... in a maximising one a high loss looks good unless direction="minimize" is given.
    maximize = _study(SignalPruner(MedianPruner(n_startup_trials=3), "train_loss"))
    assert _judge(maximize, {"0": 3.0, "1": 2.95, "2": 2.9}) is False
    assert _judge(maximize, {"0": 1.0, "1": 1.1, "2": 1.2}) is True


def test_signal_trial_without_series_is_not_pruned() -> None:
    study = _study(SignalPruner(MedianPruner(n_startup_trials=3), "train_loss", direction="minimize"))
    assert _judge(study, None, retention=0.0) is False


@pytest.mark.parametrize(
    ("curve", "expected"),
    [
        ({"0": 3.0, "1": None, "2": None}, True),  # stored NaN (JSON null): Median prunes all-NaN
        ({"0": 3.0, "x": 0.1, "2": 2.9}, True),  # non-step keys are ignored
        ({"0": 3.0, "2": "oops"}, True),  # unreadable values read as NaN
    ],
)
def test_signal_odd_series_values(curve: dict, expected: bool) -> None:
    study = _study(SignalPruner(MedianPruner(n_startup_trials=3), "train_loss", direction="minimize"))
    trial = study.ask()
    trial.set_user_attr("curve_train_loss", curve)
    trial.report(1.0, 2)
    assert trial.should_prune() is expected


@pytest.mark.parametrize(
    ("inner", "curve", "expected"),
    [
        (PercentilePruner(25.0, n_startup_trials=3), {"0": 3.0, "1": 2.6, "2": 2.4}, True),
        (PercentilePruner(90.0, n_startup_trials=3), {"0": 3.0, "1": 2.6, "2": 2.4}, False),
        (ThresholdPruner(upper=2.5), {"0": 3.0, "1": 2.6, "2": 2.6}, True),
        (ThresholdPruner(upper=2.5), {"0": 3.0, "1": 2.0, "2": 2.0}, False),
        (PatientPruner(None, patience=1), {"0": 3.0, "1": 3.1, "2": 3.2}, True),
        (PatientPruner(None, patience=1), {"0": 3.0, "1": 2.0, "2": 1.0}, False),
    ],
)
def test_signal_runs_other_pruners(inner: BasePruner, curve: dict, expected: bool) -> None:
    study = _study(SignalPruner(inner, "train_loss", direction="minimize"))
    trial = study.ask()
    trial.set_user_attr("curve_train_loss", curve)
    for step in curve:
        trial.report(1.0, int(step))
    # The inner pruners check only at the latest step: ask once at the end.
    assert trial.should_prune() is expected


def test_signal_wilcoxon_reads_best_trial_through_view() -> None:
    pruner = SignalPruner(WilcoxonPruner(p_threshold=0.1), "eval_loss", direction="minimize")
    study = optuna.create_study(direction="maximize", pruner=pruner)
    best = study.ask()
    best.set_user_attr("curve_eval_loss", {str(i): 1.0 for i in range(12)})
    best.report(1.0, 0)
    study.tell(best, 0.99)
    for curve, expected in (({str(i): 2.0 + i for i in range(12)}, True),
                            ({str(i): 0.5 for i in range(12)}, False)):
        trial = study.ask()
        trial.set_user_attr("curve_eval_loss", curve)
        trial.report(1.0, 11)
        assert trial.should_prune() is expected


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "needle"),
    [
        (("median", "loss"), {}, TypeError, "'median'"),
        ((HyperbandPruner(), "loss"), {}, ValueError, "HyperbandPruner"),
        ((MedianPruner(), 3), {}, TypeError, "3"),
        ((MedianPruner(), ""), {}, ValueError, "non-empty"),
        ((MedianPruner(), "loss"), {"direction": "down"}, ValueError, "'down'"),
    ],
)
def test_signal_rejects_bad_arguments(args, kwargs, error, needle) -> None:
    with pytest.raises(error, match=needle):
        SignalPruner(*args, **kwargs)


def test_signal_is_picklable_and_keeps_verdicts() -> None:
    pruner = SignalPruner(MedianPruner(n_startup_trials=3), "train_loss", direction="minimize")
    restored = pickle.loads(pickle.dumps(pruner))
    assert restored.signal == "train_loss"
    bad = {"0": 3.0, "1": 2.95, "2": 2.9}
    assert _judge(_study(restored), bad) is _judge(_study(pruner), bad) is True


def test_signal_view_does_not_change_stored_trials() -> None:
    study = _study(SignalPruner(MedianPruner(n_startup_trials=3), "train_loss", direction="minimize"))
    _judge(study, {"0": 3.0, "1": 2.95, "2": 2.9})
    assert all(t.intermediate_values == {0: 1.0, 1: 1.0, 2: 1.0} for t in study.trials)
    assert not math.isnan(study.best_value)
