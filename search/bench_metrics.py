"""What a replayed pruner would have cost and saved, and how well the checkpoint signals rank trials.

Pure numpy over :class:`~search.audit_records.TrialRecord` lists; :func:`benchmark` groups records
by family (matrix optimizer), replays every pruner spec in trial-number order and scores it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from search.audit_records import TrialRecord
from search.replay import PrunerSpec, default_specs, replay


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties sharing the average of the ranks they span (inf ranks last)."""
    x = np.asarray(values, dtype=float)
    uniq, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    start = np.concatenate(([0], np.cumsum(counts)[:-1]))  # ranks before each distinct value
    return (start + (counts + 1) / 2.0)[inverse]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho with average ranks for ties; pairs with a NaN are dropped.

    Returns NaN when fewer than 3 pairs remain or either side is constant.
    """
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if a.size < 3:
        return math.nan
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return math.nan if denom == 0 else float((ra * rb).sum() / denom)


@dataclass(frozen=True)
class PrunerResult:
    """One pruner's counterfactual outcome on one family's audit records.

    Attributes:
        family: matrix optimizer of the records ("muon", "adamw").
        pruner: the spec's label, e.g. "rank<0.50".
        spec: the replayed spec.
        n_trials: replayed trials.
        n_killed: trials the pruner would have killed at the checkpoint.
        saved: fraction of the total training seconds the kills would have saved.
        best_val_bpb: best val_bpb among the survivors (NaN if none finished).
        regret: best_val_bpb minus the best val_bpb with no pruning (inf if nothing survives).
        top3_killed: how many of the 3 best trials it killed.
        top10_killed: how many of the best 10 % (at least one trial) it killed.
        n_top10: size of that top 10 %.
        precision: killed trials that truly ended in the worst half / killed (NaN if no kill).
        recall: worst-half trials killed / worst-half trials (NaN if no worst half).
    """

    family: str
    pruner: str
    spec: PrunerSpec
    n_trials: int
    n_killed: int
    saved: float
    best_val_bpb: float
    regret: float
    top3_killed: int
    top10_killed: int
    n_top10: int
    precision: float
    recall: float


@dataclass(frozen=True)
class FamilySummary:
    """How well the checkpoint signals rank one family's trials by final val_bpb.

    Attributes:
        family: matrix optimizer.
        mark: the checkpoint mark replayed (budget units).
        n_trials: replayed trials (finished, or failed after the checkpoint).
        n_failed: of which failed (diverged) trials, ranked worst.
        n_skipped: trials of the family that could not be replayed (never reached the checkpoint,
            pruned in a non-audit study, still running).
        best_val_bpb: best final val_bpb with no pruning.
        spearman_retention: rho(retention at the checkpoint, final val_bpb). Negative = rank
            collapse goes with a worse val_bpb, which is what the rank pruner bets on.
        spearman_loss: rho(train loss at the checkpoint, final val_bpb), the baseline signal.
    """

    family: str
    mark: int
    n_trials: int
    n_failed: int
    n_skipped: int
    best_val_bpb: float
    spearman_retention: float
    spearman_loss: float


def score(
    records: Sequence[TrialRecord], killed: Sequence[bool], spec: PrunerSpec, *, mark: int | None = None
) -> PrunerResult:
    """Score one replay: ``killed[i]`` says whether ``records[i]`` was killed at the checkpoint.

    A killed trial costs its training seconds up to the checkpoint; it saves the rest.
    """
    n = len(records)
    scores = np.array([r.final_score() for r in records])
    kill = np.asarray(killed, dtype=bool)
    total = sum(r.training_seconds for r in records)
    saved = sum(
        max(0.0, r.training_seconds - float(r.at("curve_seconds", mark))) for r, k in zip(records, kill) if k
    )
    order = sorted(range(n), key=lambda i: (scores[i], records[i].number))
    n_top10 = max(1, math.ceil(0.1 * n))
    finite = scores[np.isfinite(scores)]
    best_all = float(finite.min()) if finite.size else math.nan
    alive = scores[~kill & np.isfinite(scores)]
    best = float(alive.min()) if alive.size else math.nan
    worst_half = scores > np.median(scores)
    return PrunerResult(
        family=records[0].matrix_optimizer if records else "",
        pruner=spec.label(),
        spec=spec,
        n_trials=n,
        n_killed=int(kill.sum()),
        saved=saved / total if total > 0 else 0.0,
        best_val_bpb=best,
        regret=best - best_all if alive.size else math.inf,
        top3_killed=int(kill[order[:3]].sum()),
        top10_killed=int(kill[order[:n_top10]].sum()),
        n_top10=n_top10,
        precision=float((kill & worst_half).sum() / kill.sum()) if kill.any() else math.nan,
        recall=float((kill & worst_half).sum() / worst_half.sum()) if worst_half.any() else math.nan,
    )


def summarize_family(
    records: Sequence[TrialRecord], replayed: Sequence[TrialRecord], *, mark: int
) -> FamilySummary:
    """Signal quality over ``replayed`` (``records`` = all of the family's records, for counts)."""
    finals = [r.final_score() for r in replayed]
    finite = [s for s in finals if math.isfinite(s)]
    retention = [r.at("curve_retention", mark) for r in replayed]
    loss = [r.at("curve_train_loss", mark) for r in replayed]
    return FamilySummary(
        family=replayed[0].matrix_optimizer if replayed else records[0].matrix_optimizer,
        mark=mark,
        n_trials=len(replayed),
        n_failed=sum(r.val_bpb is None for r in replayed),
        n_skipped=len(records) - len(replayed),
        best_val_bpb=min(finite) if finite else math.nan,
        spearman_retention=spearman([math.nan if v is None else v for v in retention], finals),
        spearman_loss=spearman([math.nan if v is None else v for v in loss], finals),
    )


def benchmark(
    records: Sequence[TrialRecord],
    specs: Sequence[PrunerSpec] | None = None,
    *,
    mark: int | None = None,
    n_startup_trials: int = 5,
) -> tuple[list[FamilySummary], list[PrunerResult]]:
    """Replay every spec over every family's records (trial-number order) and score it.

    Args:
        records: audit records, any number of families and studies.
        specs: pruners to replay; default :func:`~search.replay.default_specs`.
        mark: checkpoint mark; default: each family's triage mark (the most common one).
        n_startup_trials: completed trials before the loss pruners may prune.

    Returns:
        One summary per family and one result per (family, spec), families in first-seen order.
    """
    specs = default_specs() if specs is None else specs
    families: dict[str, list[TrialRecord]] = {}
    for rec in records:  # families in the order given, each family's trials in trial order
        families.setdefault(rec.matrix_optimizer, []).append(rec)
    summaries, results = [], []
    for unsorted in families.values():
        family_records = sorted(unsorted, key=lambda r: (r.study_name, r.number))
        marks = [r.triage_mark for r in family_records if r.triage_mark is not None]
        at = mark if mark is not None else (max(set(marks), key=marks.count) if marks else None)
        if at is None:
            continue  # nothing reached a checkpoint: there is nothing to replay
        replayed = [r for r in family_records if r.replayable(at)]
        if not replayed:
            continue
        summaries.append(summarize_family(family_records, replayed, mark=at))
        for spec in specs:
            killed = replay(replayed, spec, mark=at, n_startup_trials=n_startup_trials)
            results.append(score(replayed, killed, spec, mark=at))
    return summaries, results
