"""python -m search.run end to end on the tiny preset: prune, complete, resume, audit, report, bad input."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search import run
from search.export import read_trials_parquet
from search.space import defaults
from train.loop import preset_config

# 8 steps, triage at step 4, threshold 0.8: matrix_lr=1000 keeps ~0.6 of its rank, the preset ~0.97.
COLLAPSE = {"matrix_lr": 1000.0}
PRESET = defaults(preset_config("tiny", step_budget=8))
pytestmark = pytest.mark.filterwarnings("ignore:Fixed parameter matrix_lr:UserWarning")


def _args(cache: Path, name: str, *extra: str, threshold: str = "0.8") -> list[str]:
    return ["--preset", "tiny", "--step-budget", "8", "--triage-at", "4", "--threshold", threshold,
            "--cache-dir", str(cache), "--study-name", name, "--seed", "0", "--threads", "1", *extra]


def _url(name: str) -> str:
    return f"sqlite:///studies/{name}.db"


def _enqueue(name: str, *params: dict) -> None:
    Path("studies").mkdir(exist_ok=True)
    study = optuna.create_study(study_name=name, storage=_url(name), direction="minimize", load_if_exists=True)
    for p in params:
        study.enqueue_trial(p)


def _load(name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=_url(name))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("search_run")


@pytest.fixture(scope="module")
def searched(workdir: Path, prepared_cache: Path) -> tuple[Path, str, list, str]:
    """A new study runs the preset as its baseline trial (completes); a resume adds a forced collapse (pruned)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        assert run.main(_args(prepared_cache, "e2e", "--trials", "1")) == 0
        first = [(t.number, t.state, t.params, t.user_attrs) for t in _load("e2e").trials]
        _enqueue("e2e", PRESET | COLLAPSE)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert run.main(_args(prepared_cache, "e2e", "--trials", "1")) == 0
    return workdir, "e2e", first, out.getvalue()


def test_run_prunes_the_collapse_and_completes_the_baseline(searched, monkeypatch) -> None:
    workdir, name, _, _ = searched
    monkeypatch.chdir(workdir)
    healthy, collapsed = _load(name).trials
    assert healthy.params == PRESET  # a new study starts from the preset's own configuration
    assert healthy.state == TrialState.COMPLETE and healthy.user_attrs["val_bpb"] == healthy.value
    assert collapsed.state == TrialState.PRUNED and collapsed.user_attrs["prune_reason"] == "rank_collapse"
    assert "val_bpb" not in collapsed.user_attrs and collapsed.user_attrs["pruned_val_bpb_quick"] > 0


def test_run_resumes_and_counts_new_trials(searched, monkeypatch) -> None:
    workdir, name, first, out = searched
    monkeypatch.chdir(workdir)
    trials = _load(name).trials
    assert len(trials) == 2  # --trials 1, twice
    assert [(t.number, t.state, t.params, t.user_attrs) for t in trials[:1]] == first
    assert "trials: 2 = 1 completed, 1 pruned, 0 failed" in out
    assert f"open the study: optuna-dashboard {_url(name)}" in out


def test_run_records_the_study_attrs(searched, monkeypatch) -> None:
    workdir, name, _, _ = searched
    monkeypatch.chdir(workdir)
    attrs = _load(name).user_attrs
    assert {k: attrs[k] for k in ("preset", "budget_unit", "budget", "triage_at", "threshold", "pruner", "audit")} \
        == {"preset": "tiny", "budget_unit": "steps", "budget": 8.0, "triage_at": 4, "threshold": 0.8,
            "pruner": "rank", "audit": False}
    assert len(attrs["data_fingerprint"]) >= 16 and attrs["search_space_version"] >= 1
    assert set(attrs["versions"]) == {"python", "torch", "optuna"}


def test_run_writes_the_report_files(searched, monkeypatch) -> None:
    workdir, name, _, _ = searched
    monkeypatch.chdir(workdir)
    assert "plotly" in (workdir / "studies" / f"{name}-report.html").read_text()
    rows = read_trials_parquet(workdir / "studies" / f"{name}-trials.parquet")
    assert [r["state"] for r in rows] == ["COMPLETE", "PRUNED"]
    assert rows[1]["value_meaning"] == "rank_retention" and rows[1]["user_attrs"]["prune_reason"] == "rank_collapse"


def test_run_audit_completes_every_trial_and_calibrates(workdir, prepared_cache, monkeypatch, capsys) -> None:
    monkeypatch.chdir(workdir)
    _enqueue("audit", PRESET | COLLAPSE, PRESET, PRESET | {"depth": 3})
    assert run.main(_args(prepared_cache, "audit", "--trials", "3", "--audit")) == 0
    trials = _load("audit").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert [t.user_attrs["audit_would_prune"] for t in trials] == [True, False, False]
    assert _load("audit").user_attrs["audit"] is True
    capsys.readouterr()
    # --threshold auto calibrates on this audit study: highest threshold keeping its top-3 trials
    assert run.main(_args(prepared_cache, "audit", "--trials", "1", threshold="auto")) == 0
    lowest = min(t.user_attrs["triage_retention"] for t in trials)
    attrs = _load("audit").user_attrs
    assert 0 < attrs["threshold"] < lowest and attrs["threshold_source"] == "auto: audit"
    assert attrs["audit"] is False and len(_load("audit").trials) == 4


BAD = [
    (["--pruner", "hyperband"], "unknown --pruner 'hyperband'"),
    (["--sampler", "cmaes"], "unknown --sampler 'cmaes'"),
    (["--trials", "0"], "--trials must be > 0"),
    (["--trials", "-3"], "--trials must be > 0"),
    (["--threshold", "0"], "--threshold must be in (0, 1]"),
    (["--threshold", "1.5"], "--threshold must be in (0, 1]"),
    (["--threshold", "nan"], "--threshold must be in (0, 1]"),
    (["--threshold", "high"], "--threshold must be a number"),
    (["--triage-at", "9"], "--triage-at must be in (0, 8]"),
    (["--triage-at", "0"], "--triage-at must be in (0, 8]"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--threads", "-1"], "threads must be >= 0"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--storage", "nosuchdb://x/y"], "cannot open storage 'nosuchdb://x/y'"),
    (["--storage", "sqlite:////no/such/dir/x.db"], "directory /no/such/dir does not exist"),
    (["--study-name", "maxi"], "exists in sqlite:///studies/guarded.db with direction maximize"),
    (["--step-budget", "10"], "was run with budget=8.0, this run has 10.0"),
    (["--threshold", "auto", "--calibrate-from", "guarded"], "--threshold auto: "),
    (["--threshold", "0.7", "--calibrate-from", "x"], "--calibrate-from only goes with --threshold auto"),
    (["--time-budget", "5", "--step-budget", "5"], "not allowed with argument"),
    (["--matrix-optimizer", "sgd"], "matrix_optimizer"),
]


def _status(argv: list[str]) -> int | str | None:
    try:
        return run.main(argv)
    except SystemExit as exit_:  # argparse's refusals
        return exit_.code


def _snapshot() -> tuple[list, dict]:
    study = optuna.load_study(study_name="guarded", storage=_url("guarded"))
    return [(t.number, t.state, t.params, t.user_attrs) for t in study.trials], study.user_attrs


@pytest.mark.parametrize(("extra", "message"), BAD, ids=[" ".join(b[0]) for b in BAD])
def test_run_refuses_bad_input_without_touching_the_study(extra, message, workdir, prepared_cache, monkeypatch,
                                                          capsys) -> None:
    monkeypatch.chdir(workdir)
    if not (workdir / "studies" / "guarded.db").exists():
        _enqueue("guarded")
        study = optuna.load_study(study_name="guarded", storage=_url("guarded"))
        for key, value in (("preset", "tiny"), ("budget_unit", "steps"), ("budget", 8.0), ("triage_at", 4)):
            study.set_user_attr(key, value)
        study.add_trial(optuna.trial.create_trial(value=1.0))
        optuna.create_study(study_name="maxi", storage=_url("guarded"), direction="maximize")
    argv = _args(prepared_cache, "guarded", "--trials", "1", "--storage", _url("guarded"))
    for flag in {e for e in extra if e.startswith("--")}:  # the bad value replaces the good one
        if flag in argv:
            at = argv.index(flag)
            del argv[at:at + 2]
    before = _snapshot()
    assert _status(argv + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert _snapshot() == before


def test_run_prepares_missing_data_first(tmp_path, tiny_corpus, monkeypatch, capsys) -> None:
    import train.prepare
    from search.study import prepare_data

    real = train.prepare.prepare
    calls: list[Path] = []

    def on_tiny_corpus(cache_dir=None, **kwargs):  # the default source, swapped for the test corpus
        calls.append(cache_dir)
        return real(cache_dir, source=str(tiny_corpus), vocab_size=512, log=lambda *a, **k: None)

    monkeypatch.setattr(train.prepare, "prepare", on_tiny_corpus)
    fingerprint = prepare_data(tmp_path / "cache")
    assert calls == [tmp_path / "cache"] and len(fingerprint) >= 16
    assert "no prepared data in" in capsys.readouterr().err
    assert prepare_data(tmp_path / "cache") == fingerprint and len(calls) == 1  # prepared once


class _CtrlC(optuna.pruners.BasePruner):
    """Presses Ctrl-C at the triage decision (Optuna calls the pruner from inside training)."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        raise KeyboardInterrupt


def test_run_ctrl_c_marks_the_trial_failed_and_a_rerun_resumes(workdir, prepared_cache, monkeypatch,
                                                                 capsys) -> None:
    monkeypatch.chdir(workdir)
    parser = run.build_parser()
    args = parser.parse_args(_args(prepared_cache, "ctrlc", "--trials", "2", "--no-report"))
    opened = run.open_search(parser, args)
    opened.study.pruner = _CtrlC()
    assert run._search(opened, args) == 130
    assert "interrupted: the running trial was marked FAIL" in capsys.readouterr().err
    trials = _load("ctrlc").trials
    assert [t.state for t in trials] == [TrialState.FAIL]
    assert trials[0].user_attrs["fail_reason"] == "interrupted (Ctrl-C)"
    assert run.main(_args(prepared_cache, "ctrlc", "--trials", "1", "--no-report")) == 0
    assert [t.state for t in _load("ctrlc").trials] == [TrialState.FAIL, TrialState.COMPLETE]


class _Bar:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.postfix = ""
        self.n = 0

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def update(self, n: int = 1) -> None:
        self.n += n

    def write(self, line: str, file=None) -> None:
        self.lines.append(line)


def test_run_progress_line_survives_missing_numbers() -> None:
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=1.25, user_attrs={"val_bpb": 1.25}))
    pruned = optuna.trial.create_trial(state=TrialState.PRUNED, user_attrs={"prune_retention": None,
                                                                            "prune_reason": "non_finite_weights",
                                                                            "prune_step": 6})
    study.add_trial(pruned)
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": "diverged: x"}))
    bar = _Bar()
    progress = run._Progress(bar)
    for trial in study.trials:
        progress(study, trial)
    assert bar.n == 3 and bar.postfix == "pruned 1, failed 1, best val_bpb 1.2500"
    assert bar.lines == ["trial 1 pruned at 6 (non_finite_weights): retention n/a, quick val_bpb n/a",
                         "trial 2 FAIL: diverged: x"]


def test_run_storage_urls_open_journal_and_rdb(tmp_path) -> None:
    from search.storage import StorageError, find_study, open_storage

    journal = open_storage(str(tmp_path / "study.log"))
    assert isinstance(journal, optuna.storages.JournalStorage)
    optuna.create_study(study_name="j", storage=journal, direction="maximize")
    assert find_study(open_storage(str(tmp_path / "study.log")), "j") == optuna.study.StudyDirection.MAXIMIZE
    assert find_study(journal, "other") is None
    sqlite = open_storage(f"sqlite:///{tmp_path}/s.db")
    with sqlite.engine.connect() as connection:  # WAL: cheap commits, readers never block the search
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    with pytest.raises(StorageError, match="not a journal file path"):
        open_storage(str(tmp_path))
    try:
        postgres = open_storage("postgresql://postgres@127.0.0.1:5432/test")
    except StorageError as error:
        pytest.skip(f"no PostgreSQL here: {error}")
    assert isinstance(postgres, optuna.storages.RDBStorage)
    name = f"search-test-{tmp_path.name}"
    optuna.create_study(study_name=name, storage=postgres)
    assert find_study(postgres, name) == optuna.study.StudyDirection.MINIMIZE
    optuna.delete_study(study_name=name, storage=postgres)


@pytest.mark.parametrize(
    ("pruner", "retention", "loss", "prunes"),
    [("rank", 0.3, 3.0, True), ("rank", 0.9, 9.0, False), ("median", 0.3, 3.0, False), ("median", 0.9, 9.0, True),
     ("none", 0.3, 9.0, False)],
)
def test_run_pruners_decide_on_their_signal_at_the_checkpoint(pruner, retention, loss, prunes) -> None:
    from search.study import StudySettings, make_pruner

    settings = StudySettings(base=preset_config("tiny"), triage_at=4, threshold=0.5, pruner=pruner)
    study = optuna.create_study(pruner=make_pruner(settings))
    for _ in range(5):  # MedianPruner's startup trials: train loss 3.0..3.4 at the checkpoint
        study.add_trial(optuna.trial.create_trial(
            value=1.0, intermediate_values={4: 0.9}, user_attrs={"curve_train_loss": {"4": 3.0 + 0.1 * _}}))
    trial = study.ask()
    trial.set_user_attr("curve_train_loss", {"3": loss})  # as the hook does: the signal, then the report
    trial.report(retention, 3)
    assert not trial.should_prune()  # before the checkpoint nobody decides
    trial.set_user_attr("curve_train_loss", {"3": loss, "4": loss})
    trial.report(retention, 4)
    assert trial.should_prune() is prunes


def test_run_matrix_optimizer_is_recorded_and_a_resume_cannot_mix_families(workdir, prepared_cache, monkeypatch,
                                                                           capsys) -> None:
    monkeypatch.chdir(workdir)
    assert run.main(_args(prepared_cache, "adamw", "--trials", "1", "--matrix-optimizer", "adamw")) == 0
    study = _load("adamw")
    assert study.user_attrs["matrix_optimizer"] == "adamw"
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]
    capsys.readouterr()
    assert _status(_args(prepared_cache, "adamw", "--trials", "1")) == 2  # muon now: not comparable
    assert "matrix_optimizer='adamw'" in capsys.readouterr().err
    assert len(_load("adamw").trials) == 1


POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def test_run_two_workers_share_one_postgresql_study(prepared_cache, tmp_path) -> None:
    """Two search.run processes on one PostgreSQL study (how a user spreads a search): no trial lost or doubled."""
    import subprocess
    import sys
    from uuid import uuid4

    from search.storage import StorageError, open_storage

    try:
        storage = open_storage(POSTGRES)
    except StorageError as error:
        pytest.skip(f"no PostgreSQL here: {error}")
    name = f"workers-{uuid4().hex[:8]}"
    argv = [sys.executable, "-m", "search.run", *_args(prepared_cache, name, "--trials", "2", "--storage", POSTGRES,
                                                       "--no-baseline", "--no-report")]
    workers = [subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    try:
        results = [worker.communicate(timeout=300) for worker in workers]
        assert [worker.returncode for worker in workers] == [0, 0], [err for _, err in results]
        study = optuna.load_study(study_name=name, storage=storage)
        assert len(study.trials) == 4
        assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
        assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
        assert all("curve_retention" in t.user_attrs for t in study.trials)
        assert study.user_attrs["budget_unit"] == "steps"
    finally:
        with contextlib.suppress(KeyError):  # never created if the workers failed: keep their error
            optuna.delete_study(study_name=name, storage=storage)
