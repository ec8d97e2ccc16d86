"""The Optuna objective: one trial = one ``train.loop.train`` run watched by the rank-triage hook.

The training loop knows nothing of Optuna; it hands a ``Checkpoint`` to a callback at every mark. The callback
feeds ``RankTriage.report``, which reports the rank retention as the trial's intermediate value and asks the
study's pruner at the triage checkpoint. A prune raises ``optuna.TrialPruned`` out of ``train``; before it
leaves, the callback records what the trial had reached, because a pruned trial's Optuna ``value`` is its last
retention, not a ``val_bpb``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import optuna

from optuna_triage import RankTriage
from search.space import suggest
from search.study import budget_of
from train.loop import Checkpoint, TrainConfig, TrainingDiverged, train

#: Summary keys copied to every completed trial's user attrs (names fixed by the contract).
SUMMARY_ATTRS = (
    "val_bpb",
    "eff_rank_init",
    "eff_rank_final",
    "rank_retention",
    "grad_coherence",
    "training_seconds",
    "num_steps",
    "device",
    "preset",
    "budget_unit",
    "budget",
    "train_loss",
)

#: The quick val_bpb of a pruned trial uses this fraction of the final evaluation's tokens: cheap, and
#: therefore NOT comparable 1:1 with a completed trial's val_bpb (the report labels it so).
QUICK_EVAL_FRACTION = 1 / 8


def _json_number(value: float | None) -> float | None:
    """A float user attr as stored: non-finite becomes None (JSON has no NaN; dashboards choke on it)."""
    return None if value is None or not math.isfinite(value) else float(value)


def budget_seconds_left(config: TrainConfig, checkpoint: Checkpoint) -> float:
    """Estimated training seconds a trial pruned at ``checkpoint`` would still have spent.

    Time budget: what is left of it. Step budget: the steps left at the pace measured so far.
    """
    if config.time_budget is not None:
        return max(0.0, float(config.time_budget) - checkpoint.seconds)
    if config.step_budget is None or checkpoint.step <= 0:
        return 0.0
    per_step = checkpoint.seconds / checkpoint.step
    return max(0, config.step_budget - checkpoint.step) * per_step


@dataclass
class TrialTiming:
    """Wall-clock split of the last trial (read by the overhead benchmark, never stored)."""

    total: float = 0.0  # whole objective call
    train: float = 0.0  # inside train(), callbacks included
    callback: float = 0.0  # inside on_checkpoint: reporting to storage, asking the pruner, recording a prune
    extra_eval: float = 0.0  # quick val_bpb of a pruned trial (part of ``callback``)


@dataclass
class Objective:
    """Callable objective: ``study.optimize(Objective(...), catch=(Exception,))``.

    Attributes:
        base: preset configuration; every trial is ``space.suggest(trial, base)``.
        triage_at: triage checkpoint in the budget's unit.
        threshold: the rank pruner's threshold (informational here: the pruner decides).
        audit: record decisions but never stop a trial.
        log: training log sink (silent by default: a progress bar owns the terminal).
    """

    base: TrainConfig
    triage_at: int
    threshold: float
    audit: bool = False
    log: Callable[..., None] = lambda *args, **kwargs: None
    timing: TrialTiming = field(default_factory=TrialTiming)

    def __call__(self, trial: optuna.Trial) -> float:
        started = time.perf_counter()
        self.timing = TrialTiming()
        try:
            config = replace(suggest(trial, self.base), triage_time=self.triage_at, triage_kill=None)
            triage = RankTriage(trial, checkpoint=self.triage_at, audit=self.audit)
            summary = self._train(trial, config, triage)
        except optuna.TrialPruned:
            raise
        except TrainingDiverged as error:
            _set_quietly(trial, "fail_reason", f"diverged: {error}")
            raise
        except KeyboardInterrupt:
            _set_quietly(trial, "fail_reason", "interrupted (Ctrl-C)")
            raise
        except Exception as error:
            _set_quietly(trial, "fail_reason", f"{type(error).__name__}: {error}")
            raise
        finally:
            self.timing.total = time.perf_counter() - started
        for key in SUMMARY_ATTRS:
            trial.set_user_attr(key, summary.get(key))
        return float(summary["val_bpb"])

    def _train(self, trial: optuna.Trial, config: TrainConfig, triage: RankTriage) -> dict[str, Any]:
        def on_checkpoint(checkpoint: Checkpoint) -> None:
            started = time.perf_counter()
            try:
                triage.report(
                    checkpoint.mark,
                    checkpoint.retention,
                    train_loss=checkpoint.train_loss,
                    grad_coherence=checkpoint.grad_coherence,
                    seconds=checkpoint.seconds,
                    non_finite=bool(checkpoint.snapshot.non_finite),
                )
            except optuna.TrialPruned:
                self._record_pruned(trial, config, checkpoint)
                raise
            finally:
                self.timing.callback += time.perf_counter() - started

        train_started = time.perf_counter()
        try:
            return train(config, on_checkpoint=on_checkpoint, log=self.log)
        finally:
            self.timing.train = time.perf_counter() - train_started

    def _record_pruned(self, trial: optuna.Trial, config: TrainConfig, checkpoint: Checkpoint) -> None:
        """What a pruned trial had reached, labelled as such (its Optuna value will be a retention)."""
        started = time.perf_counter()
        quick: float | None = None
        if not checkpoint.snapshot.non_finite and math.isfinite(checkpoint.train_loss):
            # Evaluating a non-finite model only produces NaN, slowly.
            quick = checkpoint.evaluate(max(1, int(config.eval_tokens * QUICK_EVAL_FRACTION)))
        self.timing.extra_eval = time.perf_counter() - started
        trial.set_user_attr("pruned_val_bpb_quick", _json_number(quick))
        trial.set_user_attr("pruned_train_loss", _json_number(checkpoint.train_loss))
        trial.set_user_attr("training_seconds", float(checkpoint.seconds))
        trial.set_user_attr("budget_seconds_saved", budget_seconds_left(config, checkpoint))
        unit, budget = budget_of(config)
        for key, value in (("preset", config.preset), ("num_steps", checkpoint.step), ("budget_unit", unit),
                           ("budget", budget)):
            trial.set_user_attr(key, value)


def _set_quietly(trial: optuna.Trial, key: str, value: Any) -> None:
    """Set a user attr on a failing trial without masking the original error if the storage fails too."""
    with contextlib.suppress(Exception):  # the trial's own exception is the one worth reporting
        trial.set_user_attr(key, value)


def make_objective(
    base: TrainConfig, *, triage_at: int, threshold: float, audit: bool
) -> Callable[[optuna.Trial], float]:
    """The objective of a search (see ``Objective``); returns the trial's final ``val_bpb``."""
    return Objective(base=base, triage_at=triage_at, threshold=threshold, audit=audit)
