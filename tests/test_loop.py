"""train(): a real tiny run on the prepared test cache (step budgets, so everything is reproducible)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from train.loop import PRESETS, Checkpoint, TrainConfig, TrainingDiverged, TriageKilled, preset_config, train
from train.prepare import DataError

SUMMARY_KEYS = {"val_bpb", "training_seconds", "total_seconds", "peak_memory_mb", "num_steps", "num_params_M",
                "depth", "eff_rank_init", "eff_rank_final", "rank_retention", "grad_coherence", "tokens_per_sec",
                "train_loss", "device", "preset", "budget_unit", "budget", "triage_time"}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(cache: Path, **overrides) -> TrainConfig:
    return preset_config("tiny", **{"cache_dir": cache, "device": "cpu", "threads": 1, **overrides})


def run(config: TrainConfig, on_checkpoint=None) -> tuple[dict, list[str]]:
    lines: list[str] = []
    summary = train(config, on_checkpoint=on_checkpoint, log=lambda *a: lines.append(" ".join(map(str, a))))
    return summary, lines


@pytest.fixture(scope="module")
def tiny_run(prepared_cache: Path) -> tuple[dict, list[str], list[Checkpoint]]:
    checkpoints: list[Checkpoint] = []
    summary, lines = run(tiny(prepared_cache), on_checkpoint=checkpoints.append)
    return summary, lines, checkpoints


def test_train_summary_has_every_key(tiny_run):
    summary, _, _ = tiny_run
    assert SUMMARY_KEYS <= set(summary)
    assert summary["num_steps"] == 20 and summary["budget_unit"] == "steps" and summary["device"] == "cpu"
    for key in ("val_bpb", "eff_rank_init", "eff_rank_final", "rank_retention", "grad_coherence", "train_loss"):
        assert math.isfinite(summary[key]), key
    assert 0 < summary["val_bpb"] < 10
    assert summary["peak_memory_mb"] > 0 and summary["tokens_per_sec"] > 0


def test_train_loss_falls(tiny_run):
    _, _, checkpoints = tiny_run
    losses = [c.train_loss for c in checkpoints]
    assert losses[-1] < losses[0] - 1.0, losses


def test_train_calls_checkpoint_at_every_mark(tiny_run):
    _, _, checkpoints = tiny_run
    # measure_every defaults to budget / 10 = 2 steps; the triage mark (6) is one of them.
    assert [c.mark for c in checkpoints] == list(range(2, 21, 2))
    assert [c.step for c in checkpoints] == list(range(2, 21, 2))
    assert [c.mark for c in checkpoints if c.is_triage] == [6]
    for c in checkpoints:
        assert math.isfinite(c.retention) and math.isfinite(c.grad_coherence)
        assert c.reference.zero == ()  # zero-init matrices were filled from the snapshot after step 1
        assert c.retention == pytest.approx(sum(c.snapshot.ranks[n] for n in c.reference.ranks)
                                            / sum(c.reference.ranks.values()))


def test_train_reference_fills_zero_init_matrices(tiny_run):
    _, lines, checkpoints = tiny_run
    zero_init = {n for n in checkpoints[0].reference.ranks if n.endswith("c_proj.weight")}
    assert len(zero_init) == 4  # attn and mlp output projections of both layers (>= 64 on each side)
    assert any(line.startswith("[triage] eff_rank_init=") and "4 zero-init" in line for line in lines)


def test_train_logs_triage_line_and_step_lines(tiny_run):
    _, lines, _ = tiny_run
    triage = [line for line in lines if line.startswith("[triage@6]")]
    assert len(triage) == 1 and "rank_retention=" in triage[0] and "grad_coherence=" in triage[0]
    assert any(line.startswith("step 00020") and "tok/s" in line and "loss" in line for line in lines)


def test_train_step_budget_is_reproducible(prepared_cache, tiny_run):
    summary, _, _ = tiny_run
    again, _ = run(tiny(prepared_cache))
    assert again["val_bpb"] == summary["val_bpb"]
    assert again["rank_retention"] == summary["rank_retention"]
    other_seed, _ = run(tiny(prepared_cache, seed=7))
    assert other_seed["val_bpb"] != summary["val_bpb"]


def test_train_checkpoint_evaluate_is_fixed_and_restores_train_mode(prepared_cache):
    seen = []

    def on_checkpoint(c: Checkpoint) -> None:
        seen.append((c.evaluate(256), c.evaluate(256), c.model.training))

    run(tiny(prepared_cache, step_budget=4, triage_time=2, measure_every=4), on_checkpoint)
    assert len(seen) == 2
    for first, second, training in seen:
        assert first == second and math.isfinite(first) and training


def test_train_checkpoint_exception_propagates(prepared_cache):
    class Stop(Exception):
        pass

    marks = []

    def on_checkpoint(c: Checkpoint) -> None:
        marks.append(c.mark)
        if c.mark == 4:
            raise Stop

    with pytest.raises(Stop):
        run(tiny(prepared_cache), on_checkpoint)
    assert marks == [2, 4]


def test_train_triage_kill(prepared_cache):
    with pytest.raises(TriageKilled) as caught:
        run(tiny(prepared_cache, triage_kill=0.99))
    assert caught.value.mark == 6 and caught.value.threshold == 0.99 and caught.value.retention < 0.99


def test_train_triage_time_zero_measures_and_logs_nothing(prepared_cache, tiny_run):
    summary, lines = run(tiny(prepared_cache, triage_time=0))
    assert not [line for line in lines if "triage" in line or "rank" in line or "coherence" in line]
    assert math.isnan(summary["rank_retention"])
    assert summary["val_bpb"] == tiny_run[0]["val_bpb"]  # measuring never changes the training itself


def test_train_divergence_fails_fast(prepared_cache):
    with pytest.raises(TrainingDiverged, match="loss is nan at step 2"):
        run(tiny(prepared_cache, scalar_lr=1e30))


def test_train_adamw_matrix_optimizer(prepared_cache, tiny_run):
    summary, lines = run(tiny(prepared_cache, matrix_optimizer="adamw", matrix_lr=0.004))
    assert math.isfinite(summary["val_bpb"]) and "adamw" in lines[0]
    assert summary["val_bpb"] != tiny_run[0]["val_bpb"]


def test_train_time_budget(prepared_cache):
    summary, _ = run(tiny(prepared_cache, time_budget=0.3, triage_time=0.1))
    assert summary["budget_unit"] == "seconds"
    assert summary["training_seconds"] >= 0.3
    assert summary["num_steps"] > PRESETS["tiny"]["startup_steps"]
    assert math.isfinite(summary["val_bpb"])


def test_train_missing_data_says_how_to_prepare(tmp_path):
    with pytest.raises(DataError, match="python -m train.prepare"):
        run(tiny(tmp_path))


@pytest.mark.parametrize("overrides, message", [
    (dict(time_budget=10.0, step_budget=10), "exactly one"),
    (dict(step_budget=None), "exactly one"),
    (dict(step_budget=0), "positive"),
    (dict(step_budget=10, triage_time=11), "triage_time"),
    (dict(triage_kill=0.0), "triage_kill"),
    (dict(triage_kill=1.5), "triage_kill"),
    (dict(measure_every=0.0), "measure_every"),
    (dict(total_batch_size=500), "multiple"),
    (dict(matrix_optimizer="sgd"), "matrix_optimizer"),
    (dict(device="tpu"), "unknown device"),
    (dict(window_pattern="SX"), "window_pattern"),
])
def test_train_rejects_bad_config(prepared_cache, overrides, message):
    with pytest.raises(ValueError, match=message):
        run(tiny(prepared_cache, **overrides))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_cuda_request_without_cuda(prepared_cache):
    with pytest.raises(ValueError, match="CUDA requested"):
        run(tiny(prepared_cache, device="cuda"))


def test_preset_config_defaults_and_overrides():
    assert preset_config().preset == ("gpu" if torch.cuda.is_available() else "cpu")
    switched = preset_config("cpu", step_budget=50)
    assert switched.time_budget is None and switched.budget_unit == "steps"
    gpu = preset_config("gpu")
    assert (gpu.depth, gpu.seq_len, gpu.total_batch_size, gpu.time_budget, gpu.triage_time) == (
        8, 2048, 2**19, 300.0, 60.0)
    assert preset_config("tiny").n_embd == 64
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("huge")
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        preset_config("cpu", learning_rate=1.0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_loop_keep_freed_memory_sets_glibc_thresholds() -> None:
    from train.loop import keep_freed_memory

    assert keep_freed_memory() is True
