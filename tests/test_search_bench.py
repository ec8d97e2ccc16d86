"""``python -m search.bench`` (the pruner benchmark, not optuna_triage.bench): a real 3-trial tiny audit end to end,
replay, calibration, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_replay import TABLE, make_record

from search.audit_records import read_records, write_records
from search.bench import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        status = main(list(argv))
    except SystemExit as stop:  # argparse's parser.error
        status = int(stop.code)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture()
def synthetic_parquet(tmp_path: Path) -> Path:
    return write_records([make_record(n, *TABLE[n]) for n in sorted(TABLE)], tmp_path / "bench-synth.parquet")


def test_bench_replay_of_a_records_file_writes_table_and_html(capsys, tmp_path, synthetic_parquet):
    status, out, _ = _run(capsys, "--replay", str(synthetic_parquet), "--out-dir", str(tmp_path / "out"),
                          "--n-startup-trials", "2")
    assert status == 0
    # Hand-computed in test_replay: rank<0.50 kills trials 1 and 3, saving 44 of 175 s, no regret.
    assert "| muon | rank<0.50 | 2/6 | 25% | 1.0000 | 0.0000 | 0/3 | 0/1 | 1.00 | 0.67 |" in out
    assert "| muon | median-loss | 3/6 | 39% |" in out
    assert "| muon | 6 | 0 | 6 | 1.0000 | -0.83 |" in out
    md = (tmp_path / "out" / "bench-synth-replay.md").read_text()
    assert "| muon | rank<0.50 | 2/6 |" in md
    page = (tmp_path / "out" / "bench-synth-replay.html").read_text()
    assert "Compute saved vs regret" in page and "<script src=\"http" not in page  # plotly.js embedded
    assert not (tmp_path / "out" / "bench-synth-replay.parquet").exists()  # the input is the record


def test_bench_calibrate_on_a_records_file_prints_the_threshold(capsys, synthetic_parquet):
    status, out, err = _run(capsys, "--calibrate", "--replay", str(synthetic_parquet), "--top-k", "1")
    assert (status, out.strip()) == (0, "0.79")
    assert "top-1 of 6 trials" in err


def test_bench_end_to_end_on_a_tiny_audit_study(capsys, tmp_path, monkeypatch, prepared_cache):
    monkeypatch.chdir(tmp_path)
    args = ("--trials", "3", "--preset", "tiny", "--step-budget", "6", "--triage-at", "3",
            "--matrix-optimizer", "adamw", "--cache-dir", str(prepared_cache))
    status, out, _ = _run(capsys, *args)
    assert status == 0, out
    assert "audit: 1 family(ies) x 3 trials, preset tiny, 6 steps per trial, checkpoint at 3 steps" in out
    assert out.count("adamw trial ") == 3 and "ETA" in out
    records = read_records(tmp_path / "studies" / "bench-tiny.parquet")
    assert [(r.number, r.state, r.matrix_optimizer, r.triage_mark) for r in records] == [
        (n, "COMPLETE", "adamw", 3) for n in range(3)
    ]
    assert all(r.val_bpb > 0 and 0 < r.at("curve_seconds") <= r.training_seconds for r in records)
    assert "| adamw | rank<0.50 |" in (tmp_path / "studies" / "bench-tiny.md").read_text()
    assert (tmp_path / "studies" / "bench-tiny.html").stat().st_size > 100_000

    # Replaying the written records reproduces the same tables without training.
    table = out[out.index("| family | trials"):out.index("\nreplayed")]
    status, again, _ = _run(capsys, "--replay", "studies/bench-tiny.parquet")
    assert status == 0 and table in again

    # A rerun keeps the finished trials: nothing to train.
    status, out, _ = _run(capsys, *args)
    assert status == 0 and "audit-tiny-adamw: 3 finished trial(s) kept, 0 to run" in out

    status, out, _ = _run(capsys, "--calibrate", "--study-name", "audit-tiny-adamw", "--top-k", "1")
    best = min(records, key=lambda r: r.val_bpb)
    highest_below = math.ceil(best.at("curve_retention") * 100 - 1e-9) / 100 - 0.01
    assert status == 0 and float(out) == pytest.approx(min(1.0, highest_below))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--trials", "0"], "--trials must be > 0"),
        (["--trials", "-3"], "--trials must be > 0"),
        (["--replay", "missing.parquet"], "no records file at missing.parquet"),
        (["--replay", "records.csv"], "--replay takes a .parquet"),
        (["--study-name", "nope"], "no study storage at studies/nope.db"),
        (["--study-name", "nope", "--storage", "sqlite:///{tmp}/empty.db"], "no study named 'nope'"),
        (["--calibrate"], "--calibrate needs --study-name"),
        (["--matrix-optimizer", "sgd"], "unknown --matrix-optimizer 'sgd'"),
        (["--top-k", "0", "--replay", "x.parquet"], "--top-k must be >= 1"),
        (["--preset", "huge", "--trials", "1"], "unknown preset 'huge'"),
    ],
)
def test_bench_bad_input_is_one_line_exit_2(capsys, tmp_path, monkeypatch, argv, message):
    import optuna

    monkeypatch.chdir(tmp_path)
    optuna.create_study(study_name="other", storage=f"sqlite:///{tmp_path / 'empty.db'}")
    status, out, err = _run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert status == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "studies").exists()  # nothing created by a refused command


REPO = Path(__file__).resolve().parents[1]


def test_bench_replay_of_the_reference_records_reproduces_the_readme(capsys, tmp_path):
    """Every pruner row the README quotes is what replaying the committed audit records prints."""
    status, out, _ = _run(capsys, "--replay", str(REPO / "studies" / "reference" / "audit-cpu.parquet"),
                          "--out-dir", str(tmp_path))
    assert status == 0
    readme = (REPO / "README.md").read_text()
    quoted = [line for line in readme.splitlines() if line.startswith(("| muon | ", "| adamw | "))
              and "/" in line.split("|")[3]]  # pruner rows ("killed" is k/n), not the Spearman table
    assert len(quoted) >= 10
    for line in quoted:
        assert line in out, line
    for family, retention, loss in (("muon", "+0.18", "+0.70"), ("adamw", "-0.88", "+0.74")):
        assert f"| {retention} | {loss} |" in next(l for l in out.splitlines() if l.startswith(f"| {family} | "))
