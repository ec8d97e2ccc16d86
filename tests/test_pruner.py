"""Tests for RankCollapsePruner, in the style of Optuna's own pruner tests."""

from __future__ import annotations

import contextlib
import math
import pickle
import uuid
from collections.abc import Iterator

import numpy as np
import optuna
import pytest
from optuna.pruners import BasePruner, MedianPruner, NopPruner, ThresholdPruner
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalRedisBackend
from optuna.trial import TrialState

from optuna_triage import RankCollapsePruner, SignalPruner

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"threshold": 0.0}, ValueError, "threshold=0.0"),
        ({"threshold": -0.1}, ValueError, "threshold=-0.1"),
        ({"threshold": 1.5}, ValueError, "threshold=1.5"),
        ({"threshold": math.nan}, ValueError, "threshold=nan"),
        ({"threshold": math.inf}, ValueError, "threshold=inf"),
        ({"threshold": "0.5"}, TypeError, "'0.5'"),
        ({"threshold": True}, TypeError, "True"),
        ({"threshold": None}, TypeError, "None"),
        ({"n_warmup_steps": -1}, ValueError, "n_warmup_steps=-1"),
        ({"n_warmup_steps": 2.0}, TypeError, "2.0"),
        ({"n_warmup_steps": False}, TypeError, "False"),
        ({"interval_steps": 0}, ValueError, "interval_steps=0"),
        ({"interval_steps": -3}, ValueError, "interval_steps=-3"),
        ({"interval_steps": 1.5}, TypeError, "1.5"),
        ({"nan_is_collapse": 1}, TypeError, "1"),
        ({"nan_is_collapse": "yes"}, TypeError, "'yes'"),
        ({"wrapped_pruner": "median"}, TypeError, "'median'"),
        ({"wrapped_pruner": MedianPruner}, TypeError, "MedianPruner"),
    ],
)
def test_pruner_rejects_bad_arguments(kwargs: dict, error: type, needle: str) -> None:
    with pytest.raises(error, match=needle.replace(".", r"\.").replace("(", r"\(")):
        RankCollapsePruner(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": 1.0},
        {"threshold": 1e-9},
        {"threshold": 1},
        {"threshold": np.float32(0.5)},
        {"n_warmup_steps": 0},
        {"n_warmup_steps": np.int64(3)},
        {"interval_steps": 1},
        {"interval_steps": None},
        {"nan_is_collapse": False},
        {"wrapped_pruner": NopPruner()},
    ],
)
def test_pruner_accepts_boundaries(kwargs: dict) -> None:
    RankCollapsePruner(**kwargs)


def test_pruner_warns_when_wrapping_hyperband() -> None:
    with pytest.warns(UserWarning, match="bracket"):
        RankCollapsePruner(wrapped_pruner=optuna.pruners.HyperbandPruner())


def _verdicts(pruner: BasePruner, reports: list[tuple[int, float]], *, direction: str = "minimize",
              storage=None) -> list[bool]:
    """Reports each (step, value) in turn and returns should_prune() after each one."""
    study = optuna.create_study(pruner=pruner, direction=direction, storage=storage)
    trial = study.ask()
    out = []
    for step, value in reports:
        trial.report(value, step)
        verdict = trial.should_prune()
        assert type(verdict) is bool
        out.append(verdict)
    return out


def test_pruner_no_report_no_prune() -> None:
    study = optuna.create_study(pruner=RankCollapsePruner(0.5))
    assert study.ask().should_prune() is False


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
@pytest.mark.parametrize(
    ("warmup", "reports", "expected"),
    [
        # Before the checkpoint: a collapsed retention is not judged yet.
        (3, [(0, 0.1), (1, 0.1), (2, 0.1)], [False, False, False]),
        # Exactly at the checkpoint: decided there, and only there.
        (3, [(0, 0.1), (3, 0.1)], [False, True]),
        (3, [(3, 0.9), (4, 0.1), (5, 0.1)], [False, False, False]),
        # The first report after the checkpoint decides (reports need not hit it exactly).
        (3, [(1, 0.9), (5, 0.2)], [False, True]),
        (3, [(1, 0.9), (5, 0.6)], [False, False]),
        # Threshold itself is healthy: prune strictly below.
        (0, [(0, 0.5)], [False]),
        (0, [(0, 0.4999)], [True]),
        # Retention can exceed 1 (rank grew): healthy.
        (0, [(0, 1.7)], [False]),
    ],
)
def test_pruner_checkpoint(direction: str, warmup: int, reports, expected) -> None:
    pruner = RankCollapsePruner(0.5, n_warmup_steps=warmup)
    assert _verdicts(pruner, reports, direction=direction) == expected


@pytest.mark.parametrize(
    ("reports", "expected"),
    [
        # checkpoint 2, interval 3: windows [2,5), [5,8), [8,11); first report in each decides.
        ([(2, 0.9), (3, 0.1), (4, 0.1), (5, 0.1)], [False, False, False, True]),
        ([(2, 0.9), (6, 0.1), (7, 0.1)], [False, True, False]),
        ([(2, 0.9), (5, 0.9), (6, 0.1), (8, 0.3)], [False, False, False, True]),
        ([(0, 0.1), (1, 0.1), (2, 0.7), (9, 0.8)], [False, False, False, False]),
    ],
)
def test_pruner_interval_rechecks(reports, expected) -> None:
    pruner = RankCollapsePruner(0.5, n_warmup_steps=2, interval_steps=3)
    assert _verdicts(pruner, reports) == expected


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
@pytest.mark.parametrize(
    ("value", "nan_is_collapse", "expected"),
    [
        (math.nan, True, True),
        (math.inf, True, True),
        (-math.inf, True, True),
        (math.nan, False, False),
        (math.inf, False, False),
        (-math.inf, False, False),
    ],
)
def test_pruner_non_finite_retention(direction, value, nan_is_collapse, expected) -> None:
    pruner = RankCollapsePruner(0.5, nan_is_collapse=nan_is_collapse)
    assert _verdicts(pruner, [(0, value)], direction=direction) == [expected]


def _pruned_attrs(pruner: BasePruner, reports: list[tuple[int, float]], curve=None) -> dict:
    study = optuna.create_study(pruner=pruner)
    trial = study.ask()
    if curve is not None:
        trial.set_user_attr("curve_train_loss", curve)
    for step, value in reports:
        trial.report(value, step)
        if trial.should_prune():
            break
    return study._storage.get_trial_user_attrs(trial._trial_id)


@pytest.mark.parametrize(
    ("reports", "expected"),
    [
        ([(0, 0.9), (4, 0.31)], {"prune_reason": "rank_collapse", "prune_retention": 0.31,
                                 "prune_threshold": 0.5, "prune_step": 4}),
        ([(4, math.nan)], {"prune_reason": "non_finite_weights", "prune_retention": None,
                           "prune_threshold": 0.5, "prune_step": 4}),
        ([(4, 0.9)], {}),
    ],
)
def test_pruner_records_reason_in_user_attrs(reports, expected) -> None:
    assert _pruned_attrs(RankCollapsePruner(0.5, n_warmup_steps=3), reports) == expected


@pytest.mark.parametrize(
    ("retention", "loss", "expected_reason"),
    [
        (0.9, 1.0, None),  # both healthy
        (0.2, 1.0, "rank_collapse"),  # own verdict only
        (0.9, 50.0, "wrapped:SignalPruner"),  # wrapped verdict only
        (0.2, 50.0, "rank_collapse"),  # both: the own (cheaper, first) reason is recorded
    ],
)
def test_pruner_wrapped_verdict_is_ored(retention, loss, expected_reason) -> None:
    wrapped = SignalPruner(ThresholdPruner(upper=10.0), "train_loss")
    pruner = RankCollapsePruner(0.5, n_warmup_steps=2, wrapped_pruner=wrapped)
    attrs = _pruned_attrs(pruner, [(2, retention)], curve={"2": loss})
    assert attrs.get("prune_reason") == expected_reason
    if expected_reason == "wrapped:SignalPruner":
        assert attrs["prune_retention"] == pytest.approx(0.9) and attrs["prune_step"] == 2


def test_pruner_consults_wrapped_outside_own_decision_steps() -> None:
    # Before the checkpoint only the wrapped pruner can prune.
    wrapped = ThresholdPruner(lower=0.3)
    pruner = RankCollapsePruner(0.5, n_warmup_steps=10, wrapped_pruner=wrapped)
    assert _verdicts(pruner, [(0, 0.4), (1, 0.2)]) == [False, True]


class _RaisingPruner(BasePruner):
    def prune(self, study, trial) -> bool:
        raise RuntimeError("boom")


def test_pruner_never_raises_on_failing_wrapped_pruner() -> None:
    pruner = RankCollapsePruner(0.5, wrapped_pruner=_RaisingPruner())
    assert _verdicts(pruner, [(0, 0.9), (1, 0.9)]) == [False, False]
    assert _verdicts(RankCollapsePruner(0.5, wrapped_pruner=_RaisingPruner()), [(0, 0.1)]) == [True]


def test_pruner_never_raises_when_storage_write_fails() -> None:
    study = optuna.create_study()
    trial = study.ask()
    trial.report(0.1, 0)
    study.tell(trial, state=TrialState.PRUNED)
    frozen = study.trials[0]  # finished: the storage refuses user-attr writes
    assert RankCollapsePruner(0.5).prune(study, frozen) is True


def test_pruner_reads_only_its_own_trial() -> None:
    pruner = RankCollapsePruner(0.5, n_warmup_steps=1)
    crowded = optuna.create_study()
    for value in (0.01, 0.02, 0.03):
        t = crowded.ask()
        t.report(value, 1)
        crowded.tell(t, 1.0)
    assert _verdicts(pruner, [(1, 0.6)]) == [False]
    crowded.pruner = pruner
    t = crowded.ask()
    t.report(0.6, 1)
    assert t.should_prune() is False


def test_pruner_works_in_multi_objective_study_storage() -> None:
    # prune() never reads the study's direction, so it works where `direction` would raise.
    study = optuna.create_study(directions=["minimize", "maximize"])
    trial = study.ask()
    frozen = optuna.trial.create_trial(state=TrialState.RUNNING, intermediate_values={0: 0.1})
    assert RankCollapsePruner(0.5).prune(study, frozen) is True
    assert trial is not None


def test_pruner_pickle_roundtrip_keeps_behaviour() -> None:
    original = RankCollapsePruner(0.4, n_warmup_steps=2, interval_steps=2, nan_is_collapse=False,
                                  wrapped_pruner=SignalPruner(MedianPruner(), "train_loss"))
    restored = pickle.loads(pickle.dumps(original))
    assert restored.__dict__.keys() == original.__dict__.keys()
    reports = [(0, 0.1), (2, 0.9), (3, 0.1), (4, 0.3), (6, math.nan)]
    assert _verdicts(restored, reports) == _verdicts(original, reports) == [
        False, False, False, True, False]


# Every storage Optuna's StorageSupplier offers, built here so the test runs without fakeredis or
# grpc: the Redis journal uses the real server on 127.0.0.1:6379 (skipped if it is not running).
_MODES = ["inmemory", "sqlite", "cached_sqlite", "journal", "journal_redis"]


@contextlib.contextmanager
def _storage(mode: str, tmp_path) -> Iterator[optuna.storages.BaseStorage]:
    if mode == "inmemory":
        yield optuna.storages.InMemoryStorage()
    elif mode in ("sqlite", "cached_sqlite"):
        rdb = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
        yield optuna.storages._CachedStorage(rdb) if mode == "cached_sqlite" else rdb
        rdb.engine.dispose()
    elif mode == "journal":
        yield JournalStorage(JournalFileBackend(str(tmp_path / "journal.log")))
    else:
        redis = pytest.importorskip("redis")
        url = "redis://127.0.0.1:6379"
        try:
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        except redis.exceptions.ConnectionError:
            pytest.skip("no Redis server on 127.0.0.1:6379")
        prefix = f"optuna-triage-test-{uuid.uuid4().hex}"
        yield JournalStorage(JournalRedisBackend(url, prefix=prefix))
        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)


def _storage_scenario(storage) -> None:
    pruner = RankCollapsePruner(0.5, n_warmup_steps=2, interval_steps=2)
    reports = [(0, 0.1), (2, 0.9), (3, 0.1), (4, 0.2)]
    assert _verdicts(pruner, reports, storage=storage) == [False, False, False, True]
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    assert study.trials[0].user_attrs == {"prune_reason": "rank_collapse", "prune_retention": 0.2,
                                          "prune_threshold": 0.5, "prune_step": 4}


@pytest.mark.parametrize("mode", _MODES)
def test_pruner_under_every_storage(mode: str, tmp_path) -> None:
    with _storage(mode, tmp_path) as storage:
        _storage_scenario(storage)


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_pruner_under_optuna_storage_supplier() -> None:
    """The same scenario through optuna.testing's own supplier.

    Importing it needs fakeredis; its Redis mode also needs fakeredis' Lua support (``lupa``) and
    its gRPC modes need grpcio: modes whose extras are missing are left to the test above.
    """
    pytest.importorskip("fakeredis")
    from optuna.testing.storages import STORAGE_MODES, StorageSupplier

    missing = {"grpc_": _importable("grpc"), "journal_redis": _importable("lupa")}
    modes = [m for m in STORAGE_MODES if all(ok or not m.startswith(k) for k, ok in missing.items())]
    assert {"inmemory", "sqlite", "cached_sqlite", "journal"} <= set(modes)
    for mode in modes:
        with StorageSupplier(mode) as storage:
            _storage_scenario(storage)
