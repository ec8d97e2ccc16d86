"""SignalPruner: run any Optuna pruner on a per-trial series kept in user attrs."""

from __future__ import annotations

import copy
import math
from collections.abc import Container
from typing import Any

import optuna
from optuna.pruners import BasePruner, HyperbandPruner
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

__all__ = ["SignalPruner"]


def _series(trial: FrozenTrial, key: str) -> dict[int, float]:
    """The ``{str(step): value}`` user attr as ``{step: float}``; null/odd values read as NaN."""
    raw = trial.user_attrs.get(key)
    if not isinstance(raw, dict):
        return {}
    out: dict[int, float] = {}
    for step, value in raw.items():
        try:
            step_int = int(step)
        except (TypeError, ValueError):
            continue  # not a step: ignore rather than guess
        try:
            out[step_int] = math.nan if value is None else float(value)
        except (TypeError, ValueError):
            out[step_int] = math.nan
    return out


def _with_signal(trial: FrozenTrial, key: str) -> FrozenTrial:
    view = copy.copy(trial)
    view.intermediate_values = _series(trial, key)
    return view


class _SignalStudy:
    """A read-only view of a study whose trials' intermediate values are a user-attr series.

    Exposes what Optuna's pruners read (``get_trials``, ``trials``, ``direction(s)``,
    ``best_trial``, ``_storage``, ``_study_id``, ...); everything else falls through to the study.
    """

    def __init__(self, study: optuna.study.Study, key: str, direction: StudyDirection | None) -> None:
        self._study = study
        self._key = key
        self._direction = direction

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        # Views are fresh copies already, so `deepcopy` need not copy the originals again.
        trials = self._study.get_trials(deepcopy=False, states=states)
        return [_with_signal(t, self._key) for t in trials]

    def _get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None, use_cache: bool = False
    ) -> list[FrozenTrial]:
        return self.get_trials(deepcopy=deepcopy, states=states)

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()

    @property
    def direction(self) -> StudyDirection:
        return self._direction if self._direction is not None else self._study.direction

    @property
    def directions(self) -> list[StudyDirection]:
        return [self._direction] if self._direction is not None else self._study.directions

    @property
    def best_trial(self) -> FrozenTrial:
        return _with_signal(self._study.best_trial, self._key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


class SignalPruner(BasePruner):
    """Runs any Optuna pruner on another per-trial signal, such as the training loss.

    A trial has one intermediate series in Optuna; with :class:`RankCollapsePruner` that series is
    the rank retention. ``SignalPruner`` lets a standard pruner judge a second series instead: it
    shows ``pruner`` the trial and all other trials of the study with their intermediate values
    replaced by the user attr ``f"curve_{signal}"`` (a ``{str(step): float}`` dict, as written by
    :class:`optuna_triage.RankTriage`; ``None`` entries read as NaN). Trials without that attr
    look as if they reported nothing. Write the attr *before* calling ``trial.should_prune()``.

    Example:
        A median rule on the training loss, ORed with the rank rule.

        .. code-block:: python

            import optuna
            from optuna_triage import RankCollapsePruner, SignalPruner


            def objective(trial: optuna.Trial) -> float:
                slope = trial.suggest_float("slope", 0.1, 1.0)
                curve = {}
                for step in range(4):
                    loss = 3.0 - slope * step
                    curve[str(step)] = loss
                    trial.set_user_attr("curve_train_loss", curve)
                    trial.report(1.0, step)  # the retention: healthy here
                    if trial.should_prune():
                        raise optuna.TrialPruned()
                return loss


            loss_rule = SignalPruner(
                optuna.pruners.MedianPruner(n_startup_trials=3), "train_loss", direction="minimize"
            )
            pruner = RankCollapsePruner(0.5, n_warmup_steps=2, wrapped_pruner=loss_rule)
            study = optuna.create_study(pruner=pruner, sampler=optuna.samplers.RandomSampler(1))
            study.optimize(objective, n_trials=10)
            reasons = {t.user_attrs.get("prune_reason") for t in study.trials}
            assert reasons <= {None, "wrapped:SignalPruner"}

    Args:
        pruner: The pruner to run, e.g. ``MedianPruner(n_warmup_steps=5)``. Not
            :class:`~optuna.pruners.HyperbandPruner`, which builds its own study view.
        signal: The series name; the user attr read is ``f"curve_{signal}"``.
        direction: ``"minimize"`` or ``"maximize"`` for the signal (e.g. a loss is minimised even
            when the study maximises accuracy); ``None`` uses the study's direction.

    Raises:
        TypeError: If ``pruner`` is not a BasePruner or ``signal`` not a string.
        ValueError: If ``signal`` is empty, ``direction`` unknown or ``pruner`` is Hyperband.
    """

    def __init__(self, pruner: BasePruner, signal: str, *, direction: str | None = None) -> None:
        if not isinstance(pruner, BasePruner):
            raise TypeError(f"pruner must be an optuna BasePruner, but got {pruner!r}.")
        if isinstance(pruner, HyperbandPruner):
            raise ValueError("HyperbandPruner cannot run under SignalPruner: it builds its own study view.")
        if not isinstance(signal, str):
            raise TypeError(f"signal must be a str, but got {signal!r}.")
        if not signal:
            raise ValueError("signal must be a non-empty name, e.g. 'train_loss'.")
        if direction is not None and direction not in ("minimize", "maximize"):
            raise ValueError(f"direction must be None, 'minimize' or 'maximize', but got {direction=}.")
        self._pruner = pruner
        self._signal = signal
        self._direction = None if direction is None else StudyDirection[direction.upper()]

    @property
    def signal(self) -> str:
        """The signal name (the user attr read is ``curve_<signal>``)."""
        return self._signal

    def prune(self, study: optuna.study.Study, trial: FrozenTrial) -> bool:
        """Asks the inner pruner about ``trial`` as seen through the signal.

        Args:
            study: The study the trial belongs to.
            trial: The trial to judge.

        Returns:
            The inner pruner's verdict, as a bool.
        """
        view = _SignalStudy(study, f"curve_{self._signal}", self._direction)
        return bool(self._pruner.prune(view, _with_signal(trial, view._key)))  # type: ignore[arg-type]
