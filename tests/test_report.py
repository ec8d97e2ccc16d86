"""search.report / figures / export: pruned versus completed, never a retention presented as a val_bpb."""

from __future__ import annotations

import math
import re
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from search import report
from search.export import read_trials_parquet, trials_table, write_trials_parquet
from search.figures import write_html

RETENTION = 0.3141  # a pruned trial's Optuna value: must never show up as a val_bpb
DISTRIBUTIONS = {"matrix_lr": FloatDistribution(0.004, 4.0, log=True), "depth": CategoricalDistribution([1, 2, 3])}


def _completed(bpb: float, seconds: float, *, would_prune: bool | None = None) -> optuna.trial.FrozenTrial:
    attrs = {"val_bpb": bpb, "training_seconds": seconds, "triage_retention": 0.9, "train_loss": 3.0,
             "curve_retention": {"2": 0.95, "4": 0.9}, "curve_seconds": {"2": 1.0, "4": 2.0}, "budget": 30.0,
             "budget_unit": "seconds", "device": "cpu", "num_steps": 40}
    if would_prune is not None:
        attrs["audit_would_prune"] = would_prune
    return create_trial(state=TrialState.COMPLETE, value=bpb, params={"matrix_lr": 0.04, "depth": 2},
                        distributions=DISTRIBUTIONS, user_attrs=attrs, intermediate_values={2: 0.95, 4: 0.9})


def _pruned(quick: float | None, loss: float, spent: float, saved: float) -> optuna.trial.FrozenTrial:
    attrs = {"pruned_val_bpb_quick": quick, "pruned_train_loss": loss, "training_seconds": spent,
             "budget_seconds_saved": saved, "prune_reason": "rank_collapse", "prune_retention": RETENTION,
             "prune_threshold": 0.5, "prune_step": 6, "triage_retention": RETENTION,
             "curve_retention": {"2": 0.8, "6": RETENTION}, "curve_seconds": {"2": 1.0, "6": 3.0},
             "curve_train_loss": {"2": 6.0, "6": None}}
    return create_trial(state=TrialState.PRUNED, value=RETENTION, params={"matrix_lr": 3.9, "depth": 3},
                        distributions=DISTRIBUTIONS, user_attrs=attrs,
                        intermediate_values={2: 0.8, 6: RETENTION})


def _failed() -> optuna.trial.FrozenTrial:
    return create_trial(state=TrialState.FAIL, params={"matrix_lr": 4.0, "depth": 1}, distributions=DISTRIBUTIONS,
                        user_attrs={"fail_reason": "diverged: loss is nan at step 3"})


@pytest.fixture()
def study() -> optuna.Study:
    study = optuna.create_study(study_name="rep", direction="minimize")
    for key, value in {"preset": "cpu", "budget_unit": "seconds", "budget": 30.0, "triage_at": 6,
                       "threshold": 0.5, "pruner": "rank", "audit": False}.items():
        study.set_user_attr(key, value)
    for trial in (_completed(1.50, 30.0), _completed(1.40, 30.0), _completed(1.90, 30.0),
                  _pruned(2.40, 6.5, 6.0, 24.0), _pruned(2.80, 7.0, 6.0, 24.0), _pruned(None, 9.0, 5.0, 25.0),
                  _failed()):
        study.add_trial(trial)
    return study


def test_report_summary_counts_spreads_and_time(study: optuna.Study) -> None:
    summary = report.summarize(study)
    assert summary.counts == {"completed": 3, "pruned": 3, "failed": 1, "running": 0, "waiting": 0}
    assert sorted(summary.completed_bpb.values) == [1.40, 1.50, 1.90]
    assert sorted(summary.pruned_quick_bpb.values) == [2.40, 2.80]  # the None quick eval is left out
    assert sorted(summary.pruned_train_loss.values) == [6.5, 7.0, 9.0]
    assert summary.seconds_by_state == {"completed": 90.0, "pruned": 17.0, "failed": 0.0}
    assert summary.seconds_saved == 73.0


def test_report_table_labels_pruned_values_and_never_shows_a_retention(study: optuna.Study) -> None:
    table = report.format_table(report.summarize(study))
    assert re.search(r"completed: final val_bpb\s+3\s+1\.4000\s+1\.5000\s+1\.9000", table)
    assert re.search(r"pruned: quick val_bpb at prune point \(\*\)\s+2\s+2\.4000\s+2\.6000\s+2\.8000", table)
    assert re.search(r"pruned: train loss at prune point\s+3\s+6\.5000\s+7\.0000\s+9\.0000", table)
    assert "trials: 7 = 3 completed, 3 pruned, 1 failed" in table
    assert "training time spent: 107.0 s" in table and "time saved by pruning: 73.0 s" in table
    assert "41%" in table  # 73 / (107 + 73)
    assert "not comparable 1:1" in table
    assert "0.3141" not in table


def test_report_final_val_bpb_only_for_completed(study: optuna.Study) -> None:
    by_state = {t.state: report.final_val_bpb(t) for t in study.trials}
    assert by_state[TrialState.PRUNED] is None and by_state[TrialState.FAIL] is None
    assert by_state[TrialState.COMPLETE] is not None


def test_report_audit_rows(study: optuna.Study) -> None:
    audit = optuna.create_study(direction="minimize")
    audit.set_user_attr("audit", True)
    for bpb, flag in ((1.3, False), (1.6, False), (2.5, True)):
        audit.add_trial(_completed(bpb, 30.0, would_prune=flag))
    table = report.format_table(report.summarize(audit))
    assert re.search(r"audit, would prune: final val_bpb\s+1\s+2\.5000", table)
    assert re.search(r"audit, would keep: final val_bpb\s+2\s+1\.3000\s+1\.4500\s+1\.6000", table)
    assert "audit: nothing pruned" in table


def test_report_html_is_self_contained_with_four_figures(study: optuna.Study, tmp_path: Path) -> None:
    path = write_html(study, tmp_path / "r.html", table="TABLE")
    page = path.read_text()
    assert page.count('class="plotly-graph-div"') == 4
    assert "<script src=" not in page  # plotly.js inlined: opens offline
    assert len(page) > 1_000_000 and "TABLE" in page
    assert "pruned: quick val_bpb at prune point" in page and "threshold 0.5" in page


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def test_report_parquet_reads_back_equal(study: optuna.Study, tmp_path: Path) -> None:
    extra = _completed(1.7, 30.0)
    extra.user_attrs["mixed"] = [1, "two"]  # not a scalar column: stored as JSON text, read back equal
    study.add_trial(extra)
    rows = read_trials_parquet(write_trials_parquet(study, tmp_path / "t.parquet"))
    trials = study.get_trials()
    assert len(rows) == len(trials)
    for row, trial in zip(rows, trials):
        assert row["number"] == trial.number and row["state"] == trial.state.name
        assert row["params"] == trial.params
        assert _same(row["user_attrs"], {k: v for k, v in trial.user_attrs.items() if v is not None})
        assert row["intermediate_values"] == trial.intermediate_values
        assert row["value"] == trial.value
        assert row["datetime_start"] == trial.datetime_start
    meanings = {row["state"]: row["value_meaning"] for row in rows}
    assert meanings == {"COMPLETE": "val_bpb", "PRUNED": "rank_retention", "FAIL": None}


def test_report_parquet_has_typed_columns(study: optuna.Study) -> None:
    schema = trials_table(study).schema
    assert str(schema.field("user_attrs_val_bpb").type) == "double"
    assert str(schema.field("params_depth").type) == "int64"
    assert str(schema.field("user_attrs_curve_retention").type) == "map<string, double>"
    assert str(schema.field("user_attrs_fail_reason").type) == "string"


def test_report_cli_writes_files_and_refuses_missing_study(study: optuna.Study, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert report.main(["--study-name", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no study storage at studies/nope.db" in err
    assert not (tmp_path / "studies" / "nope.db").exists()  # a report never creates a storage
    url = f"sqlite:///{tmp_path}/s.db"
    optuna.copy_study(from_study_name="rep", from_storage=study._storage, to_storage=url)
    assert report.main(["--storage", url, "--out-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "trials: 7 = 3 completed, 3 pruned, 1 failed" in out
    assert (tmp_path / "out" / "rep-report.html").is_file() and (tmp_path / "out" / "rep-trials.parquet").is_file()
    assert report.main(["--storage", url, "--study-name", "other"]) == 2
    assert "no study 'other'" in capsys.readouterr().err
