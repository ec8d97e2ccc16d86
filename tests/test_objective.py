"""search.objective: a trial trains through the hook; pruned, completed and failed trials carry their attrs."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from optuna_triage import RankCollapsePruner
from search.objective import SUMMARY_ATTRS, Objective, budget_seconds_left, make_objective
from search.space import defaults
from train.loop import Checkpoint, TrainingDiverged, preset_config

pytestmark = pytest.mark.filterwarnings("ignore:Fixed parameter matrix_lr:UserWarning")

# tiny preset, 8 steps, triage at step 4: a healthy trial keeps ~0.97 of its rank, matrix_lr=1000 keeps ~0.6.
STEPS, TRIAGE, THRESHOLD = 8, 4, 0.8
COLLAPSE = {"matrix_lr": 1000.0}
CURVES = ("curve_retention", "curve_train_loss", "curve_grad_coherence", "curve_seconds")


def _base(cache: Path):
    return preset_config("tiny", cache_dir=cache, step_budget=STEPS, threads=1)


def _study(pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    return optuna.create_study(direction="minimize", pruner=pruner or RankCollapsePruner(THRESHOLD,
                                                                                          n_warmup_steps=TRIAGE),
                               sampler=optuna.samplers.RandomSampler(seed=0))


def _run(study: optuna.Study, objective, params: dict | None = None) -> optuna.trial.FrozenTrial:
    study.enqueue_trial(params or {})
    study.optimize(objective, n_trials=1, catch=(Exception,))
    return study.trials[-1]


@pytest.fixture(scope="module")
def healthy_and_collapsed(prepared_cache: Path) -> tuple[optuna.trial.FrozenTrial, optuna.trial.FrozenTrial]:
    study = _study()
    objective = make_objective(_base(prepared_cache), triage_at=TRIAGE, threshold=THRESHOLD, audit=False)
    preset = defaults(_base(prepared_cache))
    return _run(study, objective, preset), _run(study, objective, preset | COLLAPSE)


def test_objective_healthy_trial_completes_with_summary_attrs(healthy_and_collapsed) -> None:
    trial, _ = healthy_and_collapsed
    assert trial.state == TrialState.COMPLETE
    for key in SUMMARY_ATTRS:
        assert trial.user_attrs.get(key) is not None, key
    assert trial.value == trial.user_attrs["val_bpb"]
    assert trial.user_attrs["num_steps"] == STEPS and trial.user_attrs["budget_unit"] == "steps"
    assert trial.user_attrs["triage_step"] == TRIAGE and trial.user_attrs["triage_retention"] > THRESHOLD
    assert sorted(trial.intermediate_values) == list(range(1, STEPS + 1))
    for curve in CURVES:
        assert sorted(int(k) for k in trial.user_attrs[curve]) == list(range(1, STEPS + 1)), curve
    assert "pruned_val_bpb_quick" not in trial.user_attrs and "fail_reason" not in trial.user_attrs


def test_objective_collapsed_trial_is_pruned_and_says_what_it_reached(healthy_and_collapsed) -> None:
    _, trial = healthy_and_collapsed
    attrs = trial.user_attrs
    assert trial.state == TrialState.PRUNED
    assert attrs["prune_reason"] == "rank_collapse" and attrs["prune_step"] == TRIAGE
    assert attrs["prune_retention"] < THRESHOLD and attrs["prune_threshold"] == THRESHOLD
    # Optuna's value of a pruned trial is the last retention, never a val_bpb.
    assert trial.value == pytest.approx(attrs["prune_retention"])
    assert "val_bpb" not in attrs
    assert 1.0 < attrs["pruned_val_bpb_quick"] < 10.0
    assert math.isfinite(attrs["pruned_train_loss"])
    assert attrs["training_seconds"] > 0 and attrs["num_steps"] == TRIAGE
    # step budget: half the steps remain, at the measured pace
    per_step = attrs["training_seconds"] / TRIAGE
    assert attrs["budget_seconds_saved"] == pytest.approx((STEPS - TRIAGE) * per_step)
    assert max(int(k) for k in attrs["curve_retention"]) == TRIAGE


def test_objective_audit_runs_a_collapsed_trial_to_completion(prepared_cache: Path) -> None:
    study = _study()
    objective = make_objective(_base(prepared_cache), triage_at=TRIAGE, threshold=THRESHOLD, audit=True)
    trial = _run(study, objective, defaults(_base(prepared_cache)) | COLLAPSE)
    assert trial.state == TrialState.COMPLETE
    assert trial.user_attrs["audit_would_prune"] is True
    assert trial.user_attrs["audit_prune_step"] == TRIAGE
    assert trial.user_attrs["audit_reason"] == "rank_collapse"
    assert trial.user_attrs.get("prune_reason") is None  # a completed trial never looks pruned
    assert trial.value == trial.user_attrs["val_bpb"]


def test_objective_crash_is_a_failed_trial_with_its_reason(tmp_path: Path) -> None:
    study = _study()
    objective = Objective(base=_base(tmp_path / "no-data"), triage_at=TRIAGE, threshold=THRESHOLD)
    trial = _run(study, objective)
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"].startswith("DataError: no prepared data")


class _Raising(optuna.pruners.BasePruner):
    """Raises at the triage decision, as training would on a divergence or a Ctrl-C."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        raise self.error


def test_objective_divergence_is_failed_with_diverged_reason(prepared_cache: Path) -> None:
    study = _study(_Raising(TrainingDiverged("loss is nan at step 4")))
    trial = _run(study, Objective(base=_base(prepared_cache), triage_at=TRIAGE, threshold=THRESHOLD))
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"] == "diverged: loss is nan at step 4"


def test_objective_ctrl_c_marks_the_trial_failed_and_propagates(prepared_cache: Path) -> None:
    study = _study(_Raising(KeyboardInterrupt()))
    study.enqueue_trial({})
    with pytest.raises(KeyboardInterrupt):
        study.optimize(Objective(base=_base(prepared_cache), triage_at=TRIAGE, threshold=THRESHOLD), n_trials=3,
                       catch=(Exception,))
    assert [t.state for t in study.trials] == [TrialState.FAIL]
    assert study.trials[0].user_attrs["fail_reason"] == "interrupted (Ctrl-C)"


def _checkpoint(step: int, seconds: float) -> Checkpoint:
    return Checkpoint(mark=step, step=step, seconds=seconds, model=None, snapshot=None, reference=None,  # type: ignore[arg-type]
                      retention=1.0, grad_coherence=0.0, train_loss=1.0, is_triage=True, evaluate=lambda n: 0.0)


@pytest.mark.parametrize(
    ("budget", "step", "seconds", "left"),
    [
        ({"time_budget": 30.0}, 50, 6.0, 24.0),
        ({"time_budget": 30.0}, 500, 31.0, 0.0),
        ({"step_budget": 100}, 25, 5.0, 15.0),
        ({"step_budget": 100}, 100, 20.0, 0.0),
        ({"step_budget": 100}, 0, 0.0, 0.0),
    ],
)
def test_objective_budget_seconds_left(budget: dict, step: int, seconds: float, left: float) -> None:
    config = preset_config("cpu", **budget)
    assert budget_seconds_left(config, _checkpoint(step, seconds)) == pytest.approx(left)
