"""Audit records, counterfactual replay, benchmark metrics and calibration on hand-computed cases."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest

from search.audit_records import ReplayError, TrialRecord, load_records, read_records, write_records
from search.bench_metrics import average_ranks, benchmark, score, spearman
from search.replay import PrunerSpec, calibrated_threshold, recommend_threshold, replay

MARK = 6

#: number -> (val_bpb, retention at the checkpoint, train loss at the checkpoint). Sorted by val_bpb:
#: 2, 5, 0, 4, 1, 3 -> top 3 = {2, 5, 0}, top 10 % = {2}; median 1.15 -> worst half = {4, 1, 3}.
TABLE = {
    0: (1.10, 0.90, 3.0),
    1: (1.50, 0.40, 4.0),
    2: (1.00, 0.80, 2.9),
    3: (1.60, 0.35, 3.5),
    4: (1.20, 0.60, 3.8),
    5: (1.05, 0.70, 3.1),
}
TOTAL_SECONDS = 5 * 30.0 + 25.0  # trial 3 is shorter: 25 s, 5 s of them before the checkpoint


def make_record(number: int, val_bpb: float | None, retention: float, loss: float, **kw) -> TrialRecord:
    """A record with marks 3, 6 (the checkpoint) and 30; the loss falls, so its best is the latest."""
    seconds_at_mark, total = (5.0, 25.0) if number == 3 else (6.0, 30.0)
    return TrialRecord(
        number=number,
        state=kw.pop("state", "COMPLETE"),
        params={"matrix_lr": 0.02 * (number + 1), "depth": 2, "name": f"t{number}"},
        val_bpb=val_bpb,
        curve_retention={"3": min(1.0, retention + 0.05), "6": retention, "30": retention - 0.1},
        curve_train_loss={"3": loss + 1.0, "6": loss, "30": loss - 1.0},
        curve_seconds={"3": seconds_at_mark / 2, "6": seconds_at_mark, "30": total},
        curve_grad_coherence={"3": 0.1, "6": 0.2, "30": 0.3},
        training_seconds=total,
        triage_mark=MARK,
        **kw,
    )


@pytest.fixture()
def records() -> list[TrialRecord]:
    return [make_record(n, *TABLE[n]) for n in sorted(TABLE)]


# (spec, n_startup_trials, killed trial numbers), worked by hand from TABLE.
CASES = [
    (PrunerSpec("none"), 2, set()),
    (PrunerSpec("rank", threshold=0.50), 2, {1, 3}),
    (PrunerSpec("rank", threshold=0.75), 2, {1, 3, 4, 5}),
    (PrunerSpec("rank", threshold=0.85), 2, {1, 2, 3, 4, 5}),
    # MedianPruner: trials 0, 1 are startup; 2: median(3.0, 4.0)=3.5 keeps 2.9; 3: median(3.0, 4.0, 2.9)=3.0
    # kills 3.5; 4 and 5: trial 3 was killed, so never completed: median still 3.0 -> kills 3.8 and 3.1.
    (PrunerSpec("median_loss"), 2, {3, 4, 5}),
    # Plain percentile: earlier checkpoint losses count, killed or not. 5: p50(3.0,4.0,2.9,3.5,3.8)=3.5.
    (PrunerSpec("loss_percentile", percentile=50), 2, {3, 4}),
    # Rank kills 1 and 3 (never completed); then median over {0, 2} = 2.95 kills 4 (3.8) and 5 (3.1).
    (PrunerSpec("rank_or_loss", threshold=0.50), 2, {1, 3, 4, 5}),
    (PrunerSpec("median_loss"), 5, set()),  # only three trials ever complete before the last one
]


@pytest.mark.parametrize(("spec", "startup", "expected"), CASES,
                         ids=[f"{c[0].label()}-{c[1]}" for c in CASES])
def test_replay_kills_hand_computed_trials(records, spec, startup, expected):
    killed = replay(records, spec, n_startup_trials=startup)
    assert {r.number for r, k in zip(records, killed) if k} == expected


# (spec, saved, best, regret, top3 killed, top10 killed, precision, recall)
SCORES = [
    (PrunerSpec("none"), 0.0, 1.00, 0.0, 0, 0, math.nan, 0.0),
    (PrunerSpec("rank", threshold=0.50), (24 + 20) / TOTAL_SECONDS, 1.00, 0.0, 0, 0, 1.0, 2 / 3),
    (PrunerSpec("rank", threshold=0.75), (3 * 24 + 20) / TOTAL_SECONDS, 1.00, 0.0, 1, 0, 3 / 4, 1.0),
    (PrunerSpec("rank", threshold=0.85), (4 * 24 + 20) / TOTAL_SECONDS, 1.10, 0.10, 2, 1, 3 / 5, 1.0),
    (PrunerSpec("median_loss"), (2 * 24 + 20) / TOTAL_SECONDS, 1.00, 0.0, 1, 0, 2 / 3, 2 / 3),
]


@pytest.mark.parametrize(("spec", "saved", "best", "regret", "top3", "top10", "precision", "recall"), SCORES)
def test_score_matches_hand_computation(records, spec, saved, best, regret, top3, top10, precision, recall):
    result = score(records, replay(records, spec, n_startup_trials=2), spec)
    assert result.saved == pytest.approx(saved)
    assert result.best_val_bpb == pytest.approx(best)
    assert result.regret == pytest.approx(regret)
    assert (result.top3_killed, result.top10_killed, result.n_top10) == (top3, top10, 1)
    assert result.precision == pytest.approx(precision, nan_ok=True)
    assert result.recall == pytest.approx(recall)


def test_score_when_everything_is_killed_has_infinite_regret(records):
    result = score(records, [True] * len(records), PrunerSpec("rank", threshold=1.0))
    assert math.isnan(result.best_val_bpb) and result.regret == math.inf and result.top3_killed == 3


def test_failed_trial_ranks_worst_and_its_kill_is_a_good_kill(records):
    failed = make_record(6, None, 0.10, 9.0, state="FAIL")
    result = score([*records, failed], replay([*records, failed], PrunerSpec("rank", threshold=0.5)),
                   PrunerSpec("rank", threshold=0.5))
    # Worst half of 7 = scores above the median (1.20): trials 1, 3 and the failed one; all three killed.
    assert (result.n_killed, result.precision, result.recall) == (3, 1.0, 1.0)
    assert result.best_val_bpb == pytest.approx(1.00)


@pytest.mark.parametrize(
    ("values", "expected"),
    [([3.0, 1.0, 2.0], [3.0, 1.0, 2.0]), ([1.0, 2.0, 2.0, 3.0], [1.0, 2.5, 2.5, 4.0]),
     ([5.0, 5.0, 5.0], [2.0, 2.0, 2.0]), ([math.inf, 1.0, math.inf], [2.5, 1.0, 2.5])],
)
def test_average_ranks_share_ties(values, expected):
    assert list(average_ranks(values)) == expected


@pytest.mark.parametrize(
    ("x", "y", "expected"),
    [
        # Ranks x = (1, 2.5, 2.5, 4), y = (1, 3, 2, 4): cov 4.5, var 4.5 and 5 -> 3 / sqrt(10).
        ([1, 2, 2, 3], [1, 3, 2, 4], 3 / math.sqrt(10)),
        ([1, 2, 3, 4], [8, 6, 4, 2], -1.0),
        ([1, 2, 3, math.nan, 4], [1, 2, 3, 0, 4], 1.0),  # the NaN pair is dropped
        ([1, 1, 1, 1], [1, 2, 3, 4], math.nan),  # constant side
        ([1, 2], [2, 1], math.nan),  # too few pairs
    ],
)
def test_spearman_hand_cases(x, y, expected):
    assert spearman(x, y) == pytest.approx(expected, nan_ok=True)


def test_benchmark_reports_spearman_and_skips_unreplayable_trials(records):
    pruned = make_record(9, None, 0.2, 5.0, state="PRUNED")  # a non-audit prune: no final val_bpb
    other = [make_record(n, *TABLE[n], matrix_optimizer="adamw") for n in sorted(TABLE)]
    summaries, results = benchmark([*records, pruned, *other], [PrunerSpec("rank", threshold=0.5)])
    assert [(s.family, s.n_trials, s.n_skipped) for s in summaries] == [("muon", 6, 1), ("adamw", 6, 0)]
    # Retention ranks (6, 2, 5, 1, 3, 4) vs val_bpb ranks (3, 5, 1, 6, 4, 2): sum d^2 = 64 -> 1 - 384/210.
    assert summaries[0].spearman_retention == pytest.approx(1 - 6 * 64 / (6 * 35))
    assert summaries[0].spearman_loss == pytest.approx(spearman([3.0, 4.0, 2.9, 3.5, 3.8, 3.1],
                                                                [1.10, 1.50, 1.00, 1.60, 1.20, 1.05]))
    assert [(r.family, r.n_killed) for r in results] == [("muon", 2), ("adamw", 2)]


def test_replay_at_an_earlier_mark_uses_that_marks_values(records):
    spec = PrunerSpec("rank", threshold=0.38)  # retention at mark 3 is 0.05 higher: trial 3 has 0.40 there
    assert replay(records, spec) == [n == 3 for n in sorted(TABLE)]
    assert replay(records, spec, mark=3) == [False] * 6


@pytest.mark.parametrize(("top_k", "expected"), [(1, 0.79), (2, 0.69), (3, 0.69), (4, 0.59)])
def test_recommend_threshold_keeps_the_top_k(records, top_k, expected):
    threshold = recommend_threshold(records, top_k)
    assert threshold == pytest.approx(expected)
    best = sorted(records, key=lambda r: r.val_bpb)[:top_k]
    killed = dict(zip((r.number for r in records), replay(records, PrunerSpec("rank", threshold=threshold))))
    assert not any(killed[r.number] for r in best)
    # Just above the lowest top-k retention kills that trial: the recommendation is the highest safe one.
    higher = dict(zip((r.number for r in records),
                      replay(records, PrunerSpec("rank", threshold=threshold + 0.02))))
    assert any(higher[r.number] for r in best)


def test_recommend_threshold_on_an_exact_grid_value_stays_strictly_below():
    recs = [make_record(0, 1.0, 0.70, 3.0), make_record(1, 2.0, 0.2, 3.0)]
    assert recommend_threshold(recs, 1) == pytest.approx(0.69)


@pytest.mark.parametrize(
    ("recs", "top_k", "message"),
    [
        ([make_record(0, 1.0, 0.5, 3.0)], 2, "need 2 finished trials"),
        ([make_record(0, 1.0, 0.005, 3.0)], 1, "too low"),
        ([make_record(0, 1.0, math.nan, 3.0)], 1, "non-finite"),
        ([make_record(0, 1.0, 0.5, 3.0)], 0, "top-k must be >= 1"),
    ],
)
def test_recommend_threshold_refuses_what_it_cannot_answer(recs, top_k, message):
    with pytest.raises(ReplayError, match=message):
        recommend_threshold(recs, top_k)


def test_records_parquet_round_trip(tmp_path, records):
    failed = make_record(6, None, 0.1, 9.0, state="FAIL", study_name="s", matrix_optimizer="adamw")
    path = write_records([*records, failed], tmp_path / "sub" / "records.parquet")
    assert read_records(path) == [*records, failed]
    assert calibrated_threshold(str(path), top_k=3) == pytest.approx(0.69)


def _add_audit_trial(study: optuna.Study, rec: TrialRecord) -> None:
    state = optuna.trial.TrialState[rec.state]
    attrs = {name: dict(getattr(rec, name)) for name in
             ("curve_retention", "curve_train_loss", "curve_seconds", "curve_grad_coherence")}
    attrs.update(triage_step=rec.triage_mark, triage_retention=rec.at("curve_retention"))
    if state == optuna.trial.TrialState.COMPLETE:
        attrs.update(val_bpb=rec.val_bpb, training_seconds=rec.training_seconds)
    study.add_trial(optuna.trial.create_trial(
        state=state, value=rec.val_bpb if state == optuna.trial.TrialState.COMPLETE else None,
        params=dict(rec.params), user_attrs=attrs,
        distributions={"matrix_lr": optuna.distributions.FloatDistribution(0.0, 1.0),
                       "depth": optuna.distributions.IntDistribution(1, 4),
                       "name": optuna.distributions.CategoricalDistribution([f"t{i}" for i in range(10)])},
        intermediate_values={int(k): v for k, v in rec.curve_retention.items()},
    ))


def test_records_from_a_sqlite_study_match_what_the_trials_recorded(tmp_path, records):
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    study = optuna.create_study(study_name="audit", storage=url)
    study.set_user_attr("matrix_optimizer", "adamw")
    # A failed trial records no training_seconds: its record takes the last mark's clock (30 s).
    failed = make_record(6, None, 0.1, 9.0, state="FAIL")
    for rec in [*records, failed]:
        _add_audit_trial(study, rec)
    loaded = load_records(url, "audit")
    expected = [TrialRecord(**{**rec.__dict__, "matrix_optimizer": "adamw", "study_name": "audit"})
                for rec in [*records, failed]]
    assert loaded == expected
    assert calibrated_threshold(url, "audit", top_k=1) == pytest.approx(0.79)


@pytest.mark.parametrize(
    ("source", "name", "message"),
    [
        ("missing.parquet", None, "no records file"),
        ("sqlite:///{tmp}/absent.db", "audit", "no study storage"),
        ("sqlite:///{tmp}/audit.db", "nope", "no study named 'nope'"),
        ("sqlite:///{tmp}/audit.db", None, "a study name is needed"),
        ("{tmp}/junk.parquet", None, "cannot read"),
    ],
)
def test_load_records_bad_input_is_one_line_and_creates_nothing(tmp_path, source, name, message):
    optuna.create_study(study_name="audit", storage=f"sqlite:///{tmp_path / 'audit.db'}")
    (tmp_path / "junk.parquet").write_text("not parquet")
    def files() -> list[str]:  # SQLite's own -wal/-shm side files of the existing study may come and go
        return sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(("-wal", "-shm")))

    before = files()
    with pytest.raises(ReplayError, match=message) as caught:
        load_records(source.format(tmp=tmp_path), name)
    assert "\n" not in str(caught.value)
    assert files() == before
    assert not Path("missing.parquet").exists()


def test_calibrated_threshold_on_a_two_family_file_uses_the_named_or_muon_study(tmp_path, records):
    muon = [TrialRecord(**{**r.__dict__, "study_name": "audit-muon"}) for r in records]
    adamw = [TrialRecord(**{**r.__dict__, "study_name": "audit-adamw", "matrix_optimizer": "adamw",
                            "curve_retention": {**r.curve_retention, "6": r.curve_retention["6"] / 2}})
             for r in records]
    path = str(write_records([*muon, *adamw], tmp_path / "both.parquet"))
    assert calibrated_threshold(path, top_k=3) == pytest.approx(0.69)
    assert calibrated_threshold(path, "audit-adamw", top_k=3) == pytest.approx(0.34)
    assert calibrated_threshold(path, top_k=3, matrix_optimizer="adamw") == pytest.approx(0.34)
    with pytest.raises(ReplayError, match="holds studies audit-adamw, audit-muon: name the one"):
        calibrated_threshold(path, top_k=3, matrix_optimizer="sgd")
