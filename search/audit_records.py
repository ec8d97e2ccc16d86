"""Audit-study records: one :class:`TrialRecord` per trial, from an Optuna study or a parquet file.

An *audit* study runs every trial to completion while recording what the rank pruner would have
decided. Each trial becomes a record: its params, final ``val_bpb`` and the curves the triage hook
stored in user attrs (``{str(mark): value}``). Pure: no torch, no training.
"""


from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pyarrow as pa
import pyarrow.parquet as pq

CURVES = ("curve_retention", "curve_train_loss", "curve_seconds", "curve_grad_coherence")
DEFAULT_MATRIX_OPTIMIZER = "muon"  # TrainConfig's default; used when a study does not say


class ReplayError(ValueError):
    """Bad input for a replay (unknown study, missing file, too few trials); one-line message."""


@dataclass(frozen=True)
class TrialRecord:
    """What an audit trial left behind, enough to replay any checkpoint pruner over it.

    Attributes:
        number: Optuna trial number (replay order).
        state: Optuna state name: "COMPLETE", "FAIL", "PRUNED", "RUNNING", ...
        params: the sampled hyperparameters.
        val_bpb: final validation bits per byte; None when the trial did not finish.
        curve_retention: rank retention per mark, ``{str(mark): value}`` (marks in budget units).
        curve_train_loss: train loss (debiased EMA) per mark.
        curve_seconds: training seconds elapsed at each mark.
        curve_grad_coherence: gradient coherence per mark.
        training_seconds: training seconds of the whole trial (to the end, or to the failure).
        triage_mark: the checkpoint mark where the hook asked the pruner; None if never reached.
        matrix_optimizer: "muon" or "adamw" (the family the trial trained with).
        study_name: the study the record came from.
    """

    number: int
    state: str
    params: Mapping[str, Any]
    val_bpb: float | None
    curve_retention: Mapping[str, float]
    curve_train_loss: Mapping[str, float]
    curve_seconds: Mapping[str, float]
    curve_grad_coherence: Mapping[str, float]
    training_seconds: float
    triage_mark: int | None
    matrix_optimizer: str = DEFAULT_MATRIX_OPTIMIZER
    study_name: str = ""

    def decision_mark(self, mark: int | None = None) -> int | None:
        """The first recorded retention mark >= ``mark`` (default: the triage mark), or None."""
        mark = self.triage_mark if mark is None else mark
        if mark is None:
            return None
        later = [m for m in map(int, self.curve_retention) if m >= mark]
        return min(later) if later else None

    def at(self, curve: str, mark: int | None = None) -> float | None:
        """Value of ``curve`` (e.g. "curve_train_loss") at the decision mark, or None."""
        decided = self.decision_mark(mark)
        if decided is None:
            return None
        return getattr(self, curve).get(str(decided))

    def final_score(self) -> float:
        """val_bpb for ranking: a trial that failed (diverged) ranks below every finished one."""
        return math.inf if self.val_bpb is None else self.val_bpb

    def replayable(self, mark: int | None = None) -> bool:
        """Reached the checkpoint, and either finished with a val_bpb or failed (diverged) after it."""
        finished = (self.state == "COMPLETE" and self.val_bpb is not None) or self.state == "FAIL"
        return finished and self.at("curve_retention", mark) is not None and (
            self.at("curve_seconds", mark) is not None
        )


def _curve(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): float(v) if v is not None else math.nan for k, v in value.items()}


def record_from_trial(
    trial: optuna.trial.FrozenTrial, *, study_name: str = "", matrix_optimizer: str | None = None
) -> TrialRecord:
    """Build a :class:`TrialRecord` from a trial's user attrs (the contract's names)."""
    attrs = trial.user_attrs
    curves = {name: _curve(attrs.get(name)) for name in CURVES}
    val_bpb = attrs.get("val_bpb") if trial.state == optuna.trial.TrialState.COMPLETE else None
    seconds = attrs.get("training_seconds")
    if seconds is None:  # a failed trial records only fail_reason: take the last mark's clock
        seconds = max(curves["curve_seconds"].values(), default=0.0)
    mark = attrs.get("triage_step")
    family = trial.params.get("matrix_optimizer", attrs.get("matrix_optimizer", matrix_optimizer))
    return TrialRecord(
        number=trial.number,
        state=trial.state.name,
        params=dict(trial.params),
        val_bpb=None if val_bpb is None else float(val_bpb),
        training_seconds=float(seconds),
        triage_mark=None if mark is None else int(mark),
        matrix_optimizer=str(family or DEFAULT_MATRIX_OPTIMIZER),
        study_name=study_name,
        **curves,
    )


def records_from_study(study: optuna.Study) -> list[TrialRecord]:
    """Every trial of ``study`` as a record, in trial-number order."""
    family = study.user_attrs.get("matrix_optimizer")
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    return [record_from_trial(t, study_name=study.study_name, matrix_optimizer=family) for t in trials]


def load_study(storage: str | optuna.storages.BaseStorage, study_name: str) -> optuna.Study:
    """Load an existing study without ever creating a storage (a missing SQLite file stays missing).

    Args:
        storage: a storage URL as ``search.run`` accepts it (sqlite/postgresql/redis URL or journal
            file path), or an opened storage.
        study_name: the study.

    Raises:
        ReplayError: the storage or the study does not exist, or the storage is unreadable.
    """
    from search.storage import StorageError, open_storage

    if isinstance(storage, str):
        path = storage[len("sqlite:///") :] if storage.startswith("sqlite:///") else storage
        if (storage.startswith("sqlite:///") or "://" not in storage) and not Path(path).is_file():
            raise ReplayError(f"no study storage at {path}")
        try:
            storage = open_storage(storage)
        except StorageError as err:
            raise ReplayError(str(err)) from None
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise ReplayError(f"no study named {study_name!r} in {_describe(storage)}") from None
    except Exception as err:  # noqa: BLE001 - any storage failure becomes one line for the CLI
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ReplayError(f"cannot read study {study_name!r}: {first}") from None


def _describe(storage: optuna.storages.BaseStorage) -> str:
    url = getattr(storage, "url", None)
    return str(url) if url else type(storage).__name__


_SCHEMA = pa.schema(
    [
        ("number", pa.int64()),
        ("state", pa.string()),
        ("params_json", pa.string()),  # mixed-type params: JSON keeps ints, floats and strings exact
        ("val_bpb", pa.float64()),
        *[(name, pa.map_(pa.string(), pa.float64())) for name in CURVES],
        ("training_seconds", pa.float64()),
        ("triage_mark", pa.int64()),
        ("matrix_optimizer", pa.string()),
        ("study_name", pa.string()),
    ]
)


def write_records(records: Iterable[TrialRecord], path: str | Path) -> Path:
    """Write records to a parquet file (pyarrow); :func:`read_records` reads back equal records."""
    records = list(records)
    columns: dict[str, list[Any]] = {name: [] for name in _SCHEMA.names}
    for rec in records:
        for name in _SCHEMA.names:
            value = json.dumps(dict(rec.params), sort_keys=True) if name == "params_json" else (
                getattr(rec, name)
            )
            columns[name].append(dict(value) if name in CURVES else value)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=_SCHEMA), path)
    return path


def read_records(path: str | Path) -> list[TrialRecord]:
    """Read records written by :func:`write_records`.

    Raises:
        ReplayError: the file is missing or is not a records file.
    """
    path = Path(path)
    if not path.is_file():
        raise ReplayError(f"no records file at {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise ReplayError(f"cannot read {path} as parquet: {str(err).splitlines()[0]}") from None
    missing = [name for name in _SCHEMA.names if name not in table.column_names]
    if missing:
        raise ReplayError(f"{path} is not an audit records file (missing {', '.join(missing)})")
    records = []
    for row in table.select(_SCHEMA.names).to_pylist():
        params = json.loads(row.pop("params_json"))
        curves = {name: dict(row.pop(name) or []) for name in CURVES}
        records.append(TrialRecord(params=params, **curves, **row))
    return records


def load_records(
    source: str | optuna.storages.BaseStorage, study_name: str | None = None
) -> list[TrialRecord]:
    """Records from a parquet file (``source`` ends in .parquet) or from a study in a storage.

    For a parquet file ``study_name`` (optional) keeps only that study's records.
    """
    if isinstance(source, str) and source.endswith(".parquet"):
        records = read_records(source)
        if study_name is not None:
            records = [r for r in records if r.study_name == study_name]
            if not records:
                raise ReplayError(f"no records of study {study_name!r} in {source}")
        return records
    if study_name is None:
        raise ReplayError(f"a study name is needed to read from {source}")
    return records_from_study(load_study(source, study_name))
