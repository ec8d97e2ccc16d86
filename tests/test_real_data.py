"""The real thing, end to end: the built-in corpus prepared from scratch and a cpu-preset run that learns.

Slow (about a minute): run with ``python -m pytest -m slow``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_real_data_stdlib_corpus_trains_the_cpu_preset(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    prepared = _run("-m", "train.prepare", "--cache-dir", str(cache))
    assert prepared.returncode == 0, prepared.stderr
    assert (cache / "manifest.json").exists() and (cache / "data" / "val.parquet").exists()

    run = _run("-m", "train", "--preset", "cpu", "--cache-dir", str(cache), "--step-budget", "60",
               "--triage-time", "12")
    assert run.returncode == 0, run.stderr
    assert "[triage@12] rank_retention=" in run.stdout
    summary = dict(line.split(":", 1) for line in run.stdout.split("\n---\n", 1)[1].splitlines() if ":" in line)
    summary = {key.strip(): value.strip() for key, value in summary.items()}
    assert int(summary["num_steps"]) == 60
    # An untrained model sits near ln(8192) nats per token, about 3.7 bits per byte on this corpus.
    assert float(summary["val_bpb"]) < 2.8
    assert 0.5 < float(summary["rank_retention"]) <= 1.05
    assert float(summary["peak_memory_mb"]) < 2048
