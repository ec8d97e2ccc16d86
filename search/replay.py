"""Counterfactual pruner replay over audit records, and threshold calibration.

:func:`replay` asks a pruner, trial by trial in the original order, whether it would have killed
each trial at the checkpoint. The rank and loss pruners are replayed through a real in-memory
Optuna study with the real ``optuna_triage`` pruner classes, so the replay cannot drift from the
library. ``search.run --threshold auto`` uses :func:`calibrated_threshold`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import optuna

from search.audit_records import (
    DEFAULT_MATRIX_OPTIMIZER,
    ReplayError,
    TrialRecord,
    load_records,
)

DEFAULT_THRESHOLDS = tuple(round(0.30 + 0.05 * i, 2) for i in range(14))  # 0.30 .. 0.95



@dataclass(frozen=True)
class PrunerSpec:
    """One counterfactual pruner.

    kind: "none" | "rank" (RankCollapsePruner at ``threshold``) | "median_loss" (MedianPruner on
    the train loss, through SignalPruner) | "rank_or_loss" (RankCollapsePruner wrapping that
    median-loss pruner) | "loss_percentile" (the plain baseline: kill when the loss at the
    checkpoint is above the ``percentile``-th percentile of the checkpoint losses of all earlier
    trials, killed ones included, since their checkpoint loss was seen too).
    """

    kind: str
    threshold: float | None = None
    percentile: float | None = None
    name: str = field(default="", compare=False)

    def label(self) -> str:
        """Short name for tables: "none", "rank<0.50", "median-loss", "rank<0.50 or median-loss"."""
        if self.name:
            return self.name
        if self.kind == "rank":
            return f"rank<{self.threshold:.2f}"
        if self.kind == "rank_or_loss":
            return f"rank<{self.threshold:.2f} or median-loss"
        if self.kind == "loss_percentile":
            return f"loss>p{self.percentile:g}"
        return {"median_loss": "median-loss"}.get(self.kind, self.kind)


def default_specs(
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    percentiles: Sequence[float] = (50.0, 75.0),
    combined: Sequence[float] | None = None,
) -> list[PrunerSpec]:
    """No pruning, rank at each threshold, median loss, loss percentiles, rank OR median loss."""
    specs = [PrunerSpec("none")]
    specs += [PrunerSpec("rank", threshold=t) for t in thresholds]
    specs += [PrunerSpec("median_loss")]
    specs += [PrunerSpec("loss_percentile", percentile=p) for p in percentiles]
    specs += [PrunerSpec("rank_or_loss", threshold=t) for t in (thresholds if combined is None else combined)]
    return specs


def _optuna_pruner(spec: PrunerSpec, mark: int, n_startup_trials: int) -> optuna.pruners.BasePruner:
    # Imported here: optuna_triage imports torch, which loading records and calibration never need.
    from optuna_triage import RankCollapsePruner, SignalPruner

    def loss() -> optuna.pruners.BasePruner:
        median = optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=mark)
        return SignalPruner(median, "train_loss", direction="minimize")

    if spec.kind == "rank":
        return RankCollapsePruner(spec.threshold, n_warmup_steps=mark)
    if spec.kind == "median_loss":
        return loss()
    if spec.kind == "rank_or_loss":
        return RankCollapsePruner(spec.threshold, n_warmup_steps=mark, wrapped_pruner=loss())
    raise ValueError(f"no Optuna pruner for kind {spec.kind!r}")


def _replay_optuna(records: Sequence[TrialRecord], pruner, mark: int, *, uses_loss: bool) -> list[bool]:
    """Ask/tell each record through a real in-memory study whose pruner is ``pruner``.

    Only what the pruners read is replayed: the retention series up to the decision (the trial's
    intermediate values) and, for the loss pruners, the ``curve_train_loss`` user attr, which the
    hook has written up to the checkpoint when it asks (and in full once a trial completes).
    """
    study = optuna.create_study(
        storage=optuna.storages.InMemoryStorage(),
        sampler=optuna.samplers.RandomSampler(seed=0),
        pruner=pruner,
        direction="minimize",
    )
    killed = []
    for rec in records:
        decided = rec.decision_mark(mark)
        trial = study.ask()
        for step in sorted(int(k) for k in rec.curve_retention if int(k) <= decided):
            trial.report(rec.curve_retention[str(step)], step)
        if uses_loss:
            trial.set_user_attr(
                "curve_train_loss", {k: v for k, v in rec.curve_train_loss.items() if int(k) <= decided}
            )
        prune = trial.should_prune()
        killed.append(prune)
        if prune:  # never completed: MedianPruner's startup count and median never see it
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        if uses_loss:
            trial.set_user_attr("curve_train_loss", dict(rec.curve_train_loss))
        if rec.val_bpb is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, rec.val_bpb)
    return killed


def _replay_percentile(
    records: Sequence[TrialRecord], percentile: float, mark: int, n_startup: int
) -> list[bool]:
    seen: list[float] = []
    killed = []
    for rec in records:
        loss = rec.at("curve_train_loss", mark)
        loss = math.nan if loss is None else loss
        if len(seen) >= n_startup and seen:
            cut = float(np.nanpercentile(seen, percentile)) if not np.isnan(seen).all() else math.nan
            killed.append(not math.isfinite(loss) or (math.isfinite(cut) and loss > cut))
        else:
            killed.append(False)
        seen.append(loss)
    return killed


def replay(
    records: Sequence[TrialRecord], spec: PrunerSpec, *, mark: int | None = None, n_startup_trials: int = 5
) -> list[bool]:
    """Would ``spec`` have killed each record at the checkpoint? One bool per record, same order.

    Records are replayed in the order given (sort by ``number`` for the original order); all must
    be :meth:`TrialRecord.replayable`. A killed trial is told as PRUNED, so it never becomes a
    completed trial that MedianPruner's ``n_startup_trials`` or median would count.

    Args:
        records: one family's replayable records.
        spec: the pruner to replay.
        mark: the checkpoint mark (budget units); default: the records' triage mark.
        n_startup_trials: completed trials before MedianPruner / the percentile kill may prune.
    """
    if not records:
        return []
    mark = records[0].triage_mark if mark is None else mark
    if mark is None or not all(r.replayable(mark) for r in records):
        raise ReplayError("every replayed record must have reached the checkpoint and finished")
    if spec.kind == "none":
        return [False] * len(records)
    if spec.kind == "loss_percentile":
        return _replay_percentile(records, float(spec.percentile), mark, n_startup_trials)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-API and duplicate-step warnings are noise here
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            pruner = _optuna_pruner(spec, mark, n_startup_trials)
            return _replay_optuna(records, pruner, mark, uses_loss=spec.kind != "rank")
        finally:
            optuna.logging.set_verbosity(verbosity)


# ----------------------------------------------------------------------------- calibration


def recommend_threshold(
    records: Sequence[TrialRecord], top_k: int = 3, *, mark: int | None = None, grid: float = 0.01
) -> float:
    """The highest rank-retention threshold that would not have killed any of the top-k trials.

    ``RankCollapsePruner`` kills when retention < threshold, so every threshold up to the lowest
    checkpoint retention among the ``top_k`` best finished trials (lowest ``val_bpb``) keeps them
    all. The answer is the largest multiple of ``grid`` strictly below that retention (a margin
    for noise), capped at 1.0.

    Args:
        records: an audit study's records (one family); unfinished ones are ignored.
        top_k: how many of the best trials must survive.
        mark: the checkpoint mark; default: the records' triage mark.
        grid: threshold resolution.

    Returns:
        A threshold in (0, 1].

    Raises:
        ReplayError: fewer than ``top_k`` finished trials reached the checkpoint, or a top trial's
            retention is so low (or non-finite) that no threshold in (0, 1] keeps it.
    """
    if top_k < 1:
        raise ReplayError(f"top-k must be >= 1, got {top_k}")
    done = [r for r in records if r.val_bpb is not None and r.replayable(mark)]
    if len(done) < top_k:
        raise ReplayError(f"need {top_k} finished trials that reached the checkpoint, have {len(done)}")
    best = sorted(done, key=lambda r: (r.val_bpb, r.number))[:top_k]
    lowest = min(r.at("curve_retention", mark) for r in best)
    if not math.isfinite(lowest):
        raise ReplayError("a top trial has non-finite retention at the checkpoint: no threshold keeps it")
    steps = math.ceil(round(lowest / grid, 9)) - 1  # largest multiple strictly below `lowest`
    threshold = min(1.0, round(steps * grid, 10))
    if threshold <= 0:
        raise ReplayError(f"top trials' retention {lowest:.3g} is too low for any threshold in (0, 1]")
    return threshold


def calibrated_threshold(
    source: str | optuna.storages.BaseStorage,
    study_name: str | None = None,
    top_k: int = 3,
    *,
    matrix_optimizer: str = DEFAULT_MATRIX_OPTIMIZER,
) -> float:
    """:func:`recommend_threshold` for a finished audit study or a records parquet file.

    Args:
        source: a storage URL as ``search.run`` accepts it (e.g. ``sqlite:///studies/audit.db``), an
            opened Optuna storage, or a records ``.parquet`` path.
        study_name: the study (required for a storage; optional filter for a parquet file).
        top_k: how many of the best trials must survive.
        matrix_optimizer: when a parquet file holds several studies (``search.bench`` writes one
            per family) and ``study_name`` is None, calibrate on this family's study (default
            "muon", the family ``search.run`` trains).

    Raises:
        ReplayError: unknown study or file, ambiguous records, or see :func:`recommend_threshold`.
    """
    records = load_records(source, study_name)
    studies = sorted({r.study_name for r in records})
    if len(studies) > 1:
        records = [r for r in records if r.matrix_optimizer == matrix_optimizer]
        mine = sorted({r.study_name for r in records})
        if len(mine) != 1:
            raise ReplayError(f"{source} holds studies {', '.join(studies)}: name the one to calibrate on")
    return recommend_threshold(records, top_k)
