"""python -m train: summary format, standalone triage, exit statuses, one-line errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.__main__ import SUMMARY_KEYS, build_parser, main

TRIAGE_WORDS = ("triage", "rank", "coherence")


pytestmark = pytest.mark.usefixtures("one_thread")


def cli(capsys, prepared_cache: Path, *argv: str) -> tuple[int, str, str]:
    """Run main() in-process; argparse errors arrive as SystemExit and count as the exit status."""
    try:
        status = main(["--preset", "tiny", "--device", "cpu", "--threads", "1", "--cache-dir", str(prepared_cache),
                       *argv])
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def summary_of(out: str) -> dict[str, str]:
    tail = out.split("\n---\n", 1)[1]
    return dict(line.split(":", 1) for line in tail.strip().splitlines())


def test_cli_prints_autoresearch_summary(capsys, prepared_cache):
    status, out, err = cli(capsys, prepared_cache)
    assert status == 0, err
    summary = summary_of(out)
    assert list(summary) == list(SUMMARY_KEYS)
    for value in summary.values():
        float(value)
    assert int(summary["num_steps"]) == 20
    assert "[triage@6] rank_retention=" in out and "grad_coherence=" in out
    assert "[triage] eff_rank_init=" in out


def test_cli_triage_time_zero_prints_nothing_triage_related(capsys, prepared_cache):
    status, out, err = cli(capsys, prepared_cache, "--triage-time", "0")
    assert status == 0, err
    assert not [w for w in TRIAGE_WORDS if w in (out + err).lower()]
    assert "val_bpb" in summary_of(out)


def test_cli_triage_kill_exits_1_with_a_kill_line(capsys, prepared_cache):
    status, out, _ = cli(capsys, prepared_cache, "--triage-kill", "0.99")
    assert status == 1
    assert "[triage@6] KILL: rank_retention=" in out and "< 0.99" in out
    assert "\n---\n" not in out


def test_cli_divergence_prints_fail_and_exits_1(capsys, prepared_cache):
    status, out, _ = cli(capsys, prepared_cache, "--scalar-lr", "1e30")
    assert status == 1
    assert "FAIL" in out


def test_cli_every_config_field_has_a_kebab_flag():
    flags = {a.option_strings[0] for a in build_parser()._actions if a.option_strings[0] != "-h"}
    for flag in ("--matrix-lr", "--time-budget", "--step-budget", "--triage-time", "--triage-kill", "--cache-dir",
                 "--measure-every", "--matrix-optimizer", "--eval-tokens", "--compile", "--n-kv-head", "--threads"):
        assert flag in flags
    assert all("_" not in f for f in flags)


@pytest.fixture(scope="module")
def corrupt_cache(prepared_cache: Path, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("corrupt") / "cache"
    shutil.copytree(prepared_cache, cache)
    shard = min((cache / "data").glob("shard_*.parquet"))
    shard.write_bytes(b"not a parquet file" * 10)
    return cache


BAD_INPUTS = [
    (["--preset", "huge"], "huge"),
    (["--device", "tpu"], "tpu"),
    (["--time-budget", "0"], "time-budget"),
    (["--time-budget", "-5"], "time-budget"),
    (["--step-budget", "0"], "step-budget"),
    (["--time-budget", "10", "--step-budget", "10"], "not both"),
    (["--triage-kill", "0"], "triage_kill"),
    (["--triage-kill", "1.5"], "triage_kill"),
    (["--triage-time", "50"], "triage_time"),
    (["--seq-len", "abc"], "seq-len"),
    (["--total-batch-size", "100"], "multiple"),
]


@pytest.mark.parametrize("argv, fragment", BAD_INPUTS)
def test_cli_bad_input_is_one_line_exit_2(capsys, prepared_cache, argv, fragment):
    status, _, err = cli(capsys, prepared_cache, *argv)
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and fragment in err and "Traceback" not in err


def test_cli_missing_data_tells_to_prepare(capsys, tmp_path):
    status, _, err = cli(capsys, tmp_path)
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and "python -m train.prepare" in err


def test_cli_corrupt_shard_is_one_line_exit_2(capsys, corrupt_cache):
    status, _, err = cli(capsys, corrupt_cache)
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_without_cuda_is_one_line_exit_2(capsys, prepared_cache):
    status, _, err = cli(capsys, prepared_cache, "--device", "cuda")
    assert status == 2 and "CUDA requested" in err and len(err.strip().splitlines()) == 1


def test_cli_module_entry_point(prepared_cache):
    done = subprocess.run([sys.executable, "-m", "train", "--preset", "tiny", "--device", "cpu", "--step-budget", "3",
                           "--triage-time", "0", "--cache-dir", str(prepared_cache)],
                          capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert "\n---\nval_bpb:" in done.stdout
