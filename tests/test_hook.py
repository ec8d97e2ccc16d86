"""Tests for RankTriage: reference, reports, curves, checkpoint decisions, audit mode."""

from __future__ import annotations

import math

import optuna
import pytest
import torch
from optuna.pruners import NopPruner, ThresholdPruner
from optuna.trial import TrialState
from torch import nn

from optuna_triage import RankCollapsePruner, RankTriage, SignalPruner

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _trial(pruner=None) -> tuple[optuna.Study, optuna.Trial]:
    study = optuna.create_study(pruner=pruner or RankCollapsePruner(0.5, n_warmup_steps=6))
    return study, study.ask()


def _attrs(study: optuna.Study, trial: optuna.Trial) -> dict:
    return study._storage.get_trial_user_attrs(trial._trial_id)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"checkpoint": -1}, ValueError),
        ({"checkpoint": 1.5}, ValueError),
        ({"checkpoint": True}, ValueError),
        ({"checkpoint": 3, "interval": 0}, ValueError),
        ({"checkpoint": 3, "interval": 2.0}, ValueError),
        ({"checkpoint": 3, "audit": "yes"}, TypeError),
    ],
)
def test_hook_rejects_bad_arguments(kwargs, error) -> None:
    _, trial = _trial()
    with pytest.raises(error):
        RankTriage(trial, **kwargs)


def test_hook_report_records_curves_and_triage_attrs() -> None:
    study, trial = _trial()
    hook = RankTriage(trial, checkpoint=6)
    hook.report(2, 0.95, train_loss=3.0, grad_coherence=0.1, seconds=1.5)
    hook.report(6, 0.90, train_loss=2.5, grad_coherence=math.nan, seconds=3.0)
    hook.report(9, 0.10, train_loss=2.0)
    attrs = _attrs(study, trial)
    assert attrs["curve_retention"] == {"2": 0.95, "6": 0.90, "9": 0.10}
    assert attrs["curve_train_loss"] == {"2": 3.0, "6": 2.5, "9": 2.0}
    assert attrs["curve_grad_coherence"] == {"2": 0.1, "6": None}
    assert attrs["curve_seconds"] == {"2": 1.5, "6": 3.0}
    # Decided once, at the first report at/after the checkpoint; step 9 is not a decision.
    assert attrs["triage_step"] == 6 and attrs["triage_retention"] == 0.90
    assert attrs["triage_train_loss"] == 2.5 and attrs["triage_grad_coherence"] is None
    assert study.trials[0].intermediate_values == {2: 0.95, 6: 0.90, 9: 0.10}


@pytest.mark.parametrize(
    ("retention", "non_finite", "message"),
    [
        (0.31, False, r"rank retention 0\.31 < 0\.50 at step 6 \(rank_collapse\)"),
        (0.9, True, r"non-finite weights at step 6 \(non_finite_weights\)"),
    ],
)
def test_hook_raises_readable_trial_pruned(retention, non_finite, message) -> None:
    study, trial = _trial()
    hook = RankTriage(trial, checkpoint=6)
    hook.report(3, 0.2)  # before the checkpoint: no decision even though collapsed
    with pytest.raises(optuna.TrialPruned, match=message):
        hook.report(6, retention, non_finite=non_finite)
    assert _attrs(study, trial)["prune_step"] == 6


def test_hook_message_for_wrapped_reason() -> None:
    wrapped = SignalPruner(ThresholdPruner(upper=5.0), "train_loss")
    study, trial = _trial(RankCollapsePruner(0.5, n_warmup_steps=6, wrapped_pruner=wrapped))
    hook = RankTriage(trial, checkpoint=6)
    # The curve is written before the pruner is asked, so the signal sees this very point.
    with pytest.raises(optuna.TrialPruned, match=r"at step 6 \(wrapped:SignalPruner\); rank retention 0\.95"):
        hook.report(6, 0.95, train_loss=50.0)


def test_hook_message_for_foreign_pruner() -> None:
    study, trial = _trial(ThresholdPruner(lower=0.5))
    with pytest.raises(optuna.TrialPruned, match=r"\(pruner:ThresholdPruner\)"):
        RankTriage(trial, checkpoint=0).report(0, 0.1)


def test_hook_interval_decisions_follow_windows() -> None:
    study, trial = _trial(RankCollapsePruner(0.5, n_warmup_steps=2, interval_steps=3))
    hook = RankTriage(trial, checkpoint=2, interval=3, audit=True)
    for step, value in [(2, 0.9), (3, 0.1), (4, 0.1), (6, 0.2), (7, 0.1)]:
        hook.report(step, value)
    attrs = _attrs(study, trial)
    # 3 and 4 are inside the first window [2, 5): no decision; 6 opens [5, 8) and decides.
    assert attrs["audit_would_prune"] is True and attrs["audit_prune_step"] == 6
    assert attrs["audit_reason"] == "rank_collapse"


def test_hook_audit_mode_records_and_carries_on() -> None:
    study, trial = _trial()
    hook = RankTriage(trial, checkpoint=6, audit=True)
    hook.report(6, 0.2, train_loss=2.0)
    study.tell(trial, 1.23)
    t = study.trials[0]
    assert t.state == TrialState.COMPLETE
    assert t.user_attrs["audit_would_prune"] is True
    assert t.user_attrs["audit_prune_step"] == 6
    assert t.user_attrs["audit_reason"] == "rank_collapse"
    # A completed trial must not look pruned: the pruner's record is reset.
    assert all(t.user_attrs[k] is None for k in ("prune_reason", "prune_retention", "prune_step"))


def test_hook_audit_mode_records_false_when_healthy() -> None:
    study, trial = _trial()
    hook = RankTriage(trial, checkpoint=6, audit=True)
    hook.report(2, 0.1)
    assert "audit_would_prune" not in _attrs(study, trial)  # no decision yet
    hook.report(7, 0.8)
    assert _attrs(study, trial)["audit_would_prune"] is False


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.proj = nn.Linear(64, 64, bias=False)
        nn.init.zeros_(self.proj.weight)  # like autoresearch's output projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.tanh(self.fc(x)))


def test_hook_observe_reference_then_retention() -> None:
    study, trial = _trial(NopPruner())
    hook = RankTriage(trial, checkpoint=5)
    net = _Net()
    assert hook.observe(net, 0) is None
    assert hook.reference is not None and hook.reference.zero == ("proj.weight",)
    # Before the checkpoint, the zero-initialised matrix takes its reference from later snapshots.
    with torch.no_grad():
        net.proj.weight.normal_()
    assert hook.observe(net, 1) == pytest.approx(1.0)
    assert hook.reference.zero == () and "proj.weight" in hook.reference.ranks
    # At/after the checkpoint, no more repairs: a matrix zeroed now counts as a collapse.
    with torch.no_grad():
        net.proj.weight.zero_()
    retention = hook.observe(net, 5)
    fc = hook.reference.ranks["fc.weight"]
    assert retention == pytest.approx(fc / (fc + hook.reference.ranks["proj.weight"]))
    assert set(_attrs(study, trial)["curve_seconds"]) == {"1", "5"}


def test_hook_observe_ignores_repeated_step() -> None:
    study, trial = _trial(NopPruner())
    hook = RankTriage(trial, checkpoint=5)
    net = _Net()
    hook.observe(net, 0)
    hook.observe(net, 2)
    with pytest.warns(UserWarning, match="not after"):
        assert hook.observe(net, 2) is None
    assert list(study.trials[0].intermediate_values) == [2]


def test_hook_observe_non_finite_weights_prune_instantly() -> None:
    _, trial = _trial(RankCollapsePruner(0.5, n_warmup_steps=1))
    hook = RankTriage(trial, checkpoint=1)
    net = _Net()
    hook.observe(net, 0)
    with torch.no_grad():
        net.fc.weight[0, 0] = math.nan
    with pytest.raises(optuna.TrialPruned, match="non_finite_weights"):
        hook.observe(net, 1)


def test_hook_works_with_fixed_trial() -> None:
    # A FixedTrial (re-running best params) has no storage and never prunes: the hook just runs.
    hook = RankTriage(optuna.trial.FixedTrial({}), checkpoint=1)
    net = _Net()
    hook.observe(net, 0)
    assert hook.observe(net, 1, train_loss=1.0) == pytest.approx(1.0)


def _train(trial: optuna.Trial, lr: float, *, audit: bool = False) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x = torch.randn(256, 64)
    hook = RankTriage(trial, checkpoint=4, audit=audit)
    hook.observe(model, 0)
    for step in range(1, 7):
        loss = ((model(x) - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        hook.observe(model, step, train_loss=loss.item())
    return loss.item()


@pytest.mark.parametrize("audit", [False, True])
def test_hook_prunes_collapsed_real_model_not_healthy_one(audit: bool) -> None:
    study = optuna.create_study(pruner=RankCollapsePruner(0.5, n_warmup_steps=4))
    study.enqueue_trial({"lr": 1e-2})
    study.enqueue_trial({"lr": 1e3})  # the weights blow up along a few directions: rank collapses
    study.optimize(lambda t: _train(t, t.suggest_float("lr", 1e-3, 1e3, log=True), audit=audit),
                   n_trials=2)
    healthy, collapsed = study.trials
    assert healthy.state == TrialState.COMPLETE
    assert healthy.user_attrs["triage_retention"] > 0.9
    if audit:
        assert collapsed.state == TrialState.COMPLETE
        assert collapsed.user_attrs["audit_would_prune"] is True
        assert healthy.user_attrs["audit_would_prune"] is False
    else:
        assert collapsed.state == TrialState.PRUNED
        assert collapsed.user_attrs["prune_reason"] == "rank_collapse"
        assert collapsed.user_attrs["prune_retention"] < 0.5
        assert collapsed.last_step == 4
