"""RankTriage: the few lines a training loop needs to report rank retention and act on pruning."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import optuna
from torch import nn

from optuna_triage._metrics import (
    StructuralSnapshot,
    gradient_coherence,
    rank_retention,
    structural_snapshot,
)
from optuna_triage._pruner import _json_float

__all__ = ["RankTriage"]

_PRUNE_KEYS = ("prune_reason", "prune_retention", "prune_threshold", "prune_step")


class RankTriage:
    """Measures a model's rank retention, reports it to an Optuna trial and acts on the verdict.

    Use :meth:`observe` with the model (it takes the snapshots itself), or :meth:`report` with a
    retention you measured (e.g. inside a training loop that already computes it).

    * The first :meth:`observe` takes the reference snapshot and returns ``None``. Every later
      call measures, reports and records one point of the curves: there are no silent calls, so
      the caller sets the cost by how often it calls. Before ``checkpoint`` each call also fills
      the reference's zero-initialised matrices (rank undefined at init) from the current
      snapshot. A call whose step is not after the last recorded one is ignored with a warning
      (Optuna ignores repeated steps too).
    * Every report calls ``trial.report(retention, step)`` and appends to the user attrs
      ``curve_retention``, ``curve_train_loss``, ``curve_grad_coherence``, ``curve_seconds``
      (``{str(step): value}``, non-finite values stored as ``None``) *before* asking the pruner,
      so a :class:`SignalPruner` sees the current point.
    * Decision points are the first report with ``step >= checkpoint`` (which also records
      ``triage_step``, ``triage_retention``, ``triage_train_loss``, ``triage_grad_coherence``)
      and, if ``interval`` is set, the first report in each later window of ``interval`` steps.
      There ``trial.should_prune()`` is asked. If True: normally :class:`optuna.TrialPruned` is
      raised with a readable message; in ``audit`` mode the hook records ``audit_would_prune``,
      ``audit_prune_step``, ``audit_reason`` (first such decision) and training carries on. The
      pruner's ``prune_*`` attrs are reset to ``None`` in audit mode, so a completed trial never
      looks pruned. ``audit_would_prune=False`` is recorded while no decision said prune.
    * The pruner is asked only at decision points, so give :class:`RankCollapsePruner` the same
      checkpoint (``n_warmup_steps=checkpoint``, ``interval_steps=interval``); a wrapped pruner
      is likewise judged only there.

    Example:
        A tiny regression model trained with a learning rate large enough to collapse it.

        .. code-block:: python

            import optuna
            import torch
            from optuna_triage import RankCollapsePruner, RankTriage


            def objective(trial: optuna.Trial) -> float:
                torch.manual_seed(0)
                lr = trial.suggest_float("lr", 1e-3, 1e3, log=True)
                model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                            torch.nn.Linear(64, 64))
                opt = torch.optim.SGD(model.parameters(), lr=lr)
                x = torch.randn(256, 64)
                triage = RankTriage(trial, checkpoint=5)
                triage.observe(model, 0)  # the reference
                for step in range(1, 11):
                    loss = ((model(x) - x) ** 2).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    triage.observe(model, step, train_loss=loss.item())  # may raise TrialPruned
                return loss.item()


            study = optuna.create_study(pruner=RankCollapsePruner(0.5, n_warmup_steps=5))
            study.enqueue_trial({"lr": 1e-2})
            study.enqueue_trial({"lr": 1e3})
            study.optimize(objective, n_trials=2)
            healthy, collapsed = study.trials
            assert healthy.state == optuna.trial.TrialState.COMPLETE
            assert collapsed.state == optuna.trial.TrialState.PRUNED

    Args:
        trial: The Optuna trial to report to.
        checkpoint: The triage step: first decision at the first report at or after it.
        interval: Re-decide at the first report in every later window of this many steps.
        audit: Record the verdict but never raise (shadow mode, to measure what pruning costs).
        min_dim: Matrices with a smaller side below this are not measured.
        include: fnmatch patterns of parameter names to measure (all 2-D ones if None).
        exclude: fnmatch patterns of parameter names to skip, e.g. ``("*embed*",)``.
    """

    def __init__(
        self,
        trial: optuna.trial.BaseTrial,
        *,
        checkpoint: int,
        interval: int | None = None,
        audit: bool = False,
        min_dim: int = 64,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
    ) -> None:
        if isinstance(checkpoint, bool) or not isinstance(checkpoint, int) or checkpoint < 0:
            raise ValueError(f"checkpoint must be a non-negative int, but got {checkpoint!r}.")
        if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
            raise ValueError(f"interval must be None or an int >= 1, but got {interval!r}.")
        if not isinstance(audit, bool):
            raise TypeError(f"audit must be a bool, but got {audit!r}.")
        self.trial = trial
        self.checkpoint = checkpoint
        self.interval = interval
        self.audit = audit
        self._select: dict[str, Any] = {"min_dim": min_dim, "include": include, "exclude": exclude}
        self.reference: StructuralSnapshot | None = None
        self._started = 0.0
        self._last_step = -1
        self._curves: dict[str, dict[str, float | None]] = {}
        self._triaged = False
        self._would_prune = False

    def observe(self, model: nn.Module, step: int, *, train_loss: float | None = None) -> float | None:
        """Takes the reference (first call) or measures and reports retention at ``step``.

        Args:
            model: The model being trained (left on its device, untouched).
            step: The training step, a non-negative int increasing between calls.
            train_loss: The current training loss, recorded in ``curve_train_loss``.

        Returns:
            The retention reported, or ``None`` for the reference call and ignored steps.

        Raises:
            optuna.TrialPruned: At a decision point where the study's pruner says prune (unless
                ``audit``).
        """
        if self.reference is None:
            self.reference = structural_snapshot(model, **self._select)
            self._started = time.perf_counter()
            self._last_step = step
            return None
        if step <= self._last_step:
            warnings.warn(f"RankTriage.observe: step {step} is not after {self._last_step}; ignored.",
                          stacklevel=2)
            return None
        current = structural_snapshot(model, **self._select)
        if step < self.checkpoint:
            self.reference = self.reference.filled_from(current)
        retention = rank_retention(current, self.reference)
        self.report(step, retention, train_loss=train_loss,
                    grad_coherence=gradient_coherence(model, **self._select),
                    seconds=time.perf_counter() - self._started,
                    non_finite=bool(current.non_finite))
        return retention

    def _is_decision(self, step: int) -> bool:
        if step < self.checkpoint:
            return False
        if not self._triaged:
            return True
        if self.interval is None:
            return False
        window = self.checkpoint + (step - self.checkpoint) // self.interval * self.interval
        return self._last_step < window

    def _record_curve(self, name: str, step: int, value: float | None) -> None:
        if value is None:
            return
        curve = self._curves.setdefault(name, {})
        curve[str(step)] = _json_float(value)
        self.trial.set_user_attr(f"curve_{name}", dict(curve))

    def report(
        self,
        step: int,
        retention: float,
        *,
        train_loss: float | None = None,
        grad_coherence: float | None = None,
        seconds: float | None = None,
        non_finite: bool = False,
    ) -> None:
        """Reports one measured point and, at decision points, asks the pruner.

        Args:
            step: The step (or budget mark) of this point; non-negative.
            retention: The rank retention (NaN when the weights are non-finite).
            train_loss: Optional training loss at this point.
            grad_coherence: Optional gradient coherence at this point.
            seconds: Optional training seconds so far.
            non_finite: The weights hold inf/nan; the retention is reported as NaN.

        Raises:
            optuna.TrialPruned: When the pruner says prune at a decision point (unless ``audit``).
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, but got {step!r}.")
        value = math.nan if non_finite else float(retention)
        decide = self._is_decision(step)
        self.trial.report(value, step)
        for name, v in (("retention", value), ("train_loss", train_loss),
                        ("grad_coherence", grad_coherence), ("seconds", seconds)):
            self._record_curve(name, step, v)
        self._last_step = max(self._last_step, step)
        if not decide:
            return
        if not self._triaged:
            self._triaged = True
            for key, v in (("step", step), ("retention", value), ("train_loss", train_loss),
                           ("grad_coherence", grad_coherence)):
                self.trial.set_user_attr(f"triage_{key}", v if key == "step" else _json_float(v))
        if not self.trial.should_prune():
            if self.audit and not self._would_prune:
                self.trial.set_user_attr("audit_would_prune", False)
            return
        attrs = self._stored_attrs()
        reason = attrs.get("prune_reason") or f"pruner:{self._pruner_name()}"
        if not self.audit:
            raise optuna.TrialPruned(self._message(step, value, attrs.get("prune_threshold"), reason))
        for key in _PRUNE_KEYS:
            if key in attrs:  # the pruner cannot know this is an audit: undo its record
                self.trial.set_user_attr(key, None)
        if not self._would_prune:
            self._would_prune = True
            self.trial.set_user_attr("audit_would_prune", True)
            self.trial.set_user_attr("audit_prune_step", step)
            self.trial.set_user_attr("audit_reason", reason)

    def _stored_attrs(self) -> dict[str, Any]:
        """The trial's user attrs as stored (the pruner writes them straight to the storage)."""
        try:
            return dict(self.trial.study._storage.get_trial_user_attrs(self.trial._trial_id))
        except Exception:  # noqa: BLE001 - e.g. FixedTrial: the message just gets less detail
            return {}

    def _pruner_name(self) -> str:
        try:
            return type(self.trial.study.pruner).__name__
        except Exception:  # noqa: BLE001
            return "unknown"

    @staticmethod
    def _message(step: int, retention: float, threshold: Any, reason: str) -> str:
        if reason in ("rank_collapse", "non_finite_weights") and isinstance(threshold, (int, float)):
            if reason == "non_finite_weights":
                return f"non-finite weights at step {step} (non_finite_weights)"
            return f"rank retention {retention:.2f} < {threshold:.2f} at step {step} ({reason})"
        return f"pruned at step {step} ({reason}); rank retention {retention:.2f}"
