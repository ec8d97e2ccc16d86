"""Tests for python -m optuna_triage.bench (layout, agreement, CLI); timings are printed, never asserted."""

from __future__ import annotations

from collections import Counter

import pytest

from optuna_triage import bench, structural_snapshot


def test_triage_bench_builds_autoresearch_layout() -> None:
    model = bench.build_gpt_matrices(depth=8, dim=64, vocab=256)
    shapes = Counter(tuple(p.shape) for p in model.parameters())
    # 8 layers x (c_q, c_k, c_v, c_proj) + 8 c_fc + 8 mlp c_proj, plus wte and lm_head.
    assert shapes == {(64, 64): 32, (256, 64): 8 + 2, (64, 256): 8}


def test_triage_bench_snapshot_agrees_with_svdvals_loop_across_spectra() -> None:
    model = bench.build_gpt_matrices(depth=4, dim=64, vocab=256)
    loop = bench.svdvals_loop(model)
    snap = structural_snapshot(model)
    assert set(loop) == set(snap.ranks)
    for name, rank in loop.items():
        assert snap.ranks[name] == pytest.approx(rank, rel=bench.TOLERANCE), name
    # The low-rank layer really is low rank, so agreement was tested off the easy case.
    assert min(loop.values()) < 10


def test_triage_bench_paths_cover_both_gram_precisions() -> None:
    # Gaussian layers stay on the fp32 Gram; the low-rank/power-law layers need the fp64 redo.
    model = bench.build_gpt_matrices(depth=4, dim=64, vocab=256)
    paths = bench.measurement_paths(model)
    assert paths["fp32 Gram"] > 0 and paths["fp64 Gram"] > 0
    assert sum(paths.values()) == len(list(model.parameters()))


def test_triage_bench_unchecked_fp32_restores_tolerance() -> None:
    from optuna_triage import _metrics

    before = _metrics._GRAM_TOLERANCE
    with pytest.raises(RuntimeError), bench.unchecked_fp32():
        assert _metrics._GRAM_TOLERANCE == float("inf")
        raise RuntimeError
    assert _metrics._GRAM_TOLERANCE == before


def test_triage_bench_cli_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--depth", "2", "--dim", "64", "--repeats", "1", "--threads", "1",
                       "--no-train-step"]) == 0
    out = capsys.readouterr().out
    assert "speed-up:" in out and "-> OK" in out and "paths:" in out and "ceiling" in out


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--dim", "32"], ["--threads", "0"]])
def test_triage_bench_cli_rejects_bad_input(argv, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err
