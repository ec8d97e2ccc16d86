"""RankCollapsePruner: prune a trial whose reported rank retention falls below a threshold."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import optuna
from optuna.pruners import BasePruner, HyperbandPruner

__all__ = ["RankCollapsePruner"]

_logger = optuna.logging.get_logger(__name__)


def _record(study: optuna.study.Study, trial: optuna.trial.FrozenTrial, attrs: dict[str, Any]) -> None:
    """Writes the prune explanation into the trial's user attrs; storage errors only warn.

    ``prune()`` must never raise, and a failed write must not turn a prune into a crash. The
    storage is used directly because ``prune()`` receives a FrozenTrial, not the live Trial.
    """
    try:
        for key, value in attrs.items():
            study._storage.set_trial_user_attr(trial._trial_id, key, value)
    except Exception as exc:  # noqa: BLE001 - any storage failure is reported, never raised
        _logger.warning(f"RankCollapsePruner could not record why trial {trial.number} was pruned: {exc!r}")


def _json_float(value: float | None) -> float | None:
    """A float as stored in user attrs: NaN/inf are not valid JSON for the dashboard, so they become null."""
    return None if value is None or not math.isfinite(value) else float(value)


class RankCollapsePruner(BasePruner):
    """Prunes trials whose weight matrices lose effective rank early in training.

    The trial's intermediate values must be *rank retentions* (mean effective rank now divided by
    the mean at a reference point, see :func:`optuna_triage.rank_retention`), as reported by
    :class:`optuna_triage.RankTriage`. Retention is always "higher is healthier": the study's
    direction refers to the objective (e.g. validation loss) and is ignored here.

    The pruner decides at the first report with ``step >= n_warmup_steps`` and, if
    ``interval_steps`` is set, again at the first report in each later window of
    ``interval_steps`` steps. It reads only the trial it is given, so it decides the same under
    any storage and any number of workers. An optional ``wrapped_pruner`` (e.g. a loss-based
    :class:`optuna_triage.SignalPruner`) is consulted on every call and combined with OR.

    When it prunes it writes ``prune_reason`` (``"rank_collapse"``, ``"non_finite_weights"`` or
    ``"wrapped:<ClassName>"``), ``prune_retention`` (``None`` when not finite),
    ``prune_threshold`` and ``prune_step`` into the trial's user attrs, where optuna-dashboard
    shows them.

    Example:
        A complete study; objectives that collapse (here: simulated) are pruned at step 2.

        .. code-block:: python

            import optuna
            from optuna_triage import RankCollapsePruner


            def objective(trial: optuna.Trial) -> float:
                lr = trial.suggest_float("lr", 1e-3, 10.0, log=True)
                for step in range(5):
                    retention = 1.0 if lr < 1.0 else 0.2  # stands in for a measured retention
                    trial.report(retention, step)
                    if trial.should_prune():
                        raise optuna.TrialPruned()
                return lr


            pruner = RankCollapsePruner(threshold=0.5, n_warmup_steps=2)
            study = optuna.create_study(pruner=pruner, sampler=optuna.samplers.RandomSampler(0))
            study.optimize(objective, n_trials=8)
            for t in study.get_trials(states=(optuna.trial.TrialState.PRUNED,)):
                assert t.user_attrs["prune_reason"] == "rank_collapse"
                assert t.user_attrs["prune_step"] == 2

    Args:
        threshold: Prune when retention is below this, in (0, 1].
        n_warmup_steps: The triage checkpoint: no decision before this step (a non-negative int).
        interval_steps: Re-check at the first report in every window of this many steps after
            the checkpoint (an int >= 1); ``None`` decides once.
        nan_is_collapse: Treat a non-finite retention (NaN from non-finite weights, or inf) as a
            collapse with reason ``"non_finite_weights"``. If False, a non-finite retention is
            never pruned by this rule (the wrapped pruner may still prune).
        wrapped_pruner: Another pruner whose verdict is ORed with this one's, with reason
            ``"wrapped:<ClassName>"``. Wrapping :class:`~optuna.pruners.HyperbandPruner` works
            for pruning but samplers lose its bracket filtering (a warning says so).

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If an argument is out of range.
    """

    def __init__(
        self,
        threshold: float = 0.5,
        *,
        n_warmup_steps: int = 0,
        interval_steps: int | None = None,
        nan_is_collapse: bool = True,
        wrapped_pruner: BasePruner | None = None,
    ) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
            raise TypeError(f"threshold must be a float in (0, 1], but got {threshold!r}.")
        if not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], but got {threshold=}.")
        if isinstance(n_warmup_steps, bool) or not isinstance(n_warmup_steps, numbers.Integral):
            raise TypeError(f"n_warmup_steps must be an int, but got {n_warmup_steps!r}.")
        if n_warmup_steps < 0:
            raise ValueError(f"n_warmup_steps cannot be negative, but got {n_warmup_steps=}.")
        if interval_steps is not None:
            if isinstance(interval_steps, bool) or not isinstance(interval_steps, numbers.Integral):
                raise TypeError(f"interval_steps must be None or an int, but got {interval_steps!r}.")
            if interval_steps < 1:
                raise ValueError(f"interval_steps must be at least 1, but got {interval_steps=}.")
        if not isinstance(nan_is_collapse, bool):
            raise TypeError(f"nan_is_collapse must be a bool, but got {nan_is_collapse!r}.")
        if wrapped_pruner is not None and not isinstance(wrapped_pruner, BasePruner):
            raise TypeError(
                f"wrapped_pruner must be None or an optuna BasePruner, but got {wrapped_pruner!r}."
            )
        if isinstance(wrapped_pruner, HyperbandPruner):
            warnings.warn(
                "HyperbandPruner wrapped in RankCollapsePruner still prunes, but samplers no "
                "longer see its brackets (they only do when it is the study's own pruner).",
                stacklevel=2,
            )
        self._threshold = float(threshold)
        self._n_warmup_steps = int(n_warmup_steps)
        self._interval_steps = None if interval_steps is None else int(interval_steps)
        self._nan_is_collapse = nan_is_collapse
        self._wrapped_pruner = wrapped_pruner

    @property
    def threshold(self) -> float:
        """The retention below which a trial is pruned."""
        return self._threshold

    def _is_decision_step(self, step: int, steps: Any) -> bool:
        """True at the first report in the current decision window (steps may be unsorted)."""
        start = self._n_warmup_steps
        if self._interval_steps is not None:
            start += (step - start) // self._interval_steps * self._interval_steps
        return not any(start <= s < step for s in steps)

    def _own_reason(self, trial: optuna.trial.FrozenTrial) -> tuple[str, int, float] | None:
        step = trial.last_step
        if step is None or step < self._n_warmup_steps:
            return None
        if not self._is_decision_step(step, trial.intermediate_values.keys()):
            return None
        retention = float(trial.intermediate_values[step])
        if not math.isfinite(retention):
            return ("non_finite_weights", step, retention) if self._nan_is_collapse else None
        if retention < self._threshold:
            return "rank_collapse", step, retention
        return None

    def prune(self, study: optuna.study.Study, trial: optuna.trial.FrozenTrial) -> bool:
        """Judges the trial's latest retention; see the class docstring.

        Args:
            study: The trial's study (only its storage is used, to record the reason).
            trial: The trial to judge.

        Returns:
            True if the trial should be pruned. Never raises: a failing wrapped pruner or storage
            write is logged as a warning and the trial continues.
        """
        try:
            found = self._own_reason(trial)
        except Exception as exc:  # noqa: BLE001 - odd trials must not crash a study
            _logger.warning(f"RankCollapsePruner skipped trial {trial.number}: {exc!r}")
            found = None
        if found is None and self._wrapped_pruner is not None:
            try:
                wrapped = bool(self._wrapped_pruner.prune(study, trial))
            except Exception as exc:  # noqa: BLE001
                _logger.warning(
                    f"{type(self._wrapped_pruner).__name__} raised inside RankCollapsePruner for "
                    f"trial {trial.number}; not pruning: {exc!r}"
                )
                wrapped = False
            if wrapped and trial.last_step is not None:
                step = trial.last_step
                found = (f"wrapped:{type(self._wrapped_pruner).__name__}", step,
                         float(trial.intermediate_values[step]))
            elif wrapped:
                found = (f"wrapped:{type(self._wrapped_pruner).__name__}", -1, math.nan)
        if found is None:
            return False
        reason, step, retention = found
        _record(study, trial, {
            "prune_reason": reason,
            "prune_retention": _json_float(retention),
            "prune_threshold": self._threshold,
            "prune_step": None if step < 0 else int(step),
        })
        return True
