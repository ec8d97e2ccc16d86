"""search.space: the search space is centred on the preset, valid, wide, and the only place that suggests."""

from __future__ import annotations

import ast
import math
import warnings
from dataclasses import fields
from pathlib import Path

import optuna
import pytest

from search import space
from train.loop import TrainConfig, preset_config

SEARCHED = ("matrix_lr", "embedding_lr", "unembedding_lr", "weight_decay", "warmup_ratio", "warmdown_ratio",
            "adam_beta1", "adam_beta2", "depth", "total_batch_size")


def _ask(study: optuna.Study, base: TrainConfig) -> tuple[optuna.trial.Trial, TrainConfig]:
    trial = study.ask()
    return trial, space.suggest(trial, base)


@pytest.mark.parametrize("preset", ["gpu", "cpu", "tiny"])
def test_space_preset_default_lies_inside(preset: str) -> None:
    base = preset_config(preset)
    study = optuna.create_study()
    study.enqueue_trial({name: getattr(base, name) for name in SEARCHED})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an out-of-range fixed param warns: the default must be in range
        _, config = _ask(study, base)
    assert config == base
    frozen = study.trials[0]
    for name in SEARCHED:
        assert frozen.distributions[name]._contains(frozen.distributions[name].to_internal_repr(getattr(base, name)))


@pytest.mark.parametrize("preset", ["gpu", "cpu", "tiny"])
def test_space_samples_are_valid_configs(preset: str) -> None:
    base = preset_config(preset)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(200):
        trial, config = _ask(study, base)
        config.validate()  # raises ValueError on any inconsistent combination
        assert set(trial.params) == set(SEARCHED)
        study.tell(trial, 1.0)


def test_space_keeps_everything_not_searched() -> None:
    base = preset_config("cpu", seq_len=128, device_batch_size=8, total_batch_size=2048, eval_tokens=999)
    _, config = _ask(optuna.create_study(), base)
    for field in fields(TrainConfig):
        if field.name not in SEARCHED:
            assert getattr(config, field.name) == getattr(base, field.name), field.name


@pytest.mark.parametrize(
    ("name", "at_least"),
    [("matrix_lr", 30.0), ("embedding_lr", 10.0), ("unembedding_lr", 10.0)],
)
def test_space_learning_rates_reach_degenerate_values(name: str, at_least: float) -> None:
    base = preset_config("cpu")
    trial = optuna.create_study().ask()
    space.suggest(trial, base)
    high = trial.distributions[name].high
    assert trial.distributions[name].log
    assert high >= at_least * getattr(base, name)
    assert trial.distributions[name].low <= getattr(base, name) / 5


@pytest.mark.parametrize("preset", ["gpu", "cpu", "tiny"])
def test_space_depth_and_batch_choices_are_one_notch_around_the_preset(preset: str) -> None:
    base = preset_config(preset)
    depths = space.depth_choices(base)
    assert base.depth in depths and all(abs(d - base.depth) <= 1 and d >= 1 for d in depths)
    batches = space.batch_choices(base)
    micro = base.device_batch_size * base.seq_len
    expected = {base.total_batch_size, 2 * base.total_batch_size}
    if base.total_batch_size // 2 >= micro and (base.total_batch_size // 2) % micro == 0:
        expected.add(base.total_batch_size // 2)
    assert batches == sorted(expected)


@pytest.mark.parametrize(
    ("overrides", "depths", "batches"),
    [({"depth": 2, "aspect_ratio": 64, "total_batch_size": 4096, "device_batch_size": 8, "seq_len": 256},
      [1, 2, 3], [2048, 4096, 8192]),
     ({"depth": 1, "aspect_ratio": 64, "total_batch_size": 2048, "device_batch_size": 8, "seq_len": 256},
      [1, 2], [2048, 4096]),
     ({"depth": 2, "aspect_ratio": 32, "head_dim": 32, "total_batch_size": 512, "device_batch_size": 8,
       "seq_len": 64},
      [2, 3], [512, 1024])],
)
def test_space_depth_and_batch_choices_table(overrides: dict, depths: list[int], batches: list[int]) -> None:
    base = preset_config("cpu", **overrides)
    assert space.depth_choices(base) == depths
    assert space.batch_choices(base) == batches


def test_space_depth_choices_are_measurable_widths() -> None:
    # tiny: depth 1 would be 32 wide, below the snapshot's min_dim 64: NaN retention, a false "collapse".
    base = preset_config("tiny")
    assert all(preset_config("tiny", depth=d).n_embd >= 64 for d in space.depth_choices(base))


def test_space_warmup_plus_warmdown_never_exceeds_one() -> None:
    assert space.WARMUP_RATIO[1] + space.WARMDOWN_RATIO[1] <= 1.0
    assert math.isclose(min(space.WARMUP_RATIO), 0.0)


def test_space_is_the_only_module_that_suggests() -> None:
    search_dir = Path(space.__file__).parent
    offenders = []
    for path in search_dir.glob("*.py"):
        if path.name == "space.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("suggest_"):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
