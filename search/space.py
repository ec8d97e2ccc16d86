"""The search space: every ``trial.suggest_*`` call of the project lives in this module.

Ranges are set around the preset's own values (``base``), so the preset's default configuration always lies
inside the space whatever the preset, and wide enough that some trials degenerate (a Muon or Adam learning rate
far above the default blows the weights up or collapses them), which gives the pruner something to catch.

Depth and batch size move one notch around the preset: under a time budget (the default) every trial trains
for the same wall-clock time whatever they are; under a step budget a trial costs at most ~2x the preset's.
Change the ranges -> bump ``SEARCH_SPACE_VERSION`` (stored on the study; a resume refuses a different one).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import optuna

from train.loop import TrainConfig

SEARCH_SPACE_VERSION = 1


@dataclass(frozen=True)
class LogRange:
    """A log-uniform range as factors of the preset's value: [base * low, base * high]."""

    low: float
    high: float


#: Learning rates, log-uniform around the preset's value. The top of each range is where trials degenerate.
LEARNING_RATES: dict[str, LogRange] = {
    "matrix_lr": LogRange(1 / 10, 100.0),
    "embedding_lr": LogRange(1 / 10, 20.0),
    "unembedding_lr": LogRange(1 / 10, 50.0),
}
WEIGHT_DECAY = (0.0, 0.6)  # uniform; widened to include the preset's value if needed
WARMUP_RATIO = (0.0, 0.2)  # uniform; warmup + warmdown stays <= 1
WARMDOWN_RATIO = (0.0, 0.8)
ADAM_BETA1 = (0.5, 0.97)
ADAM_BETA2 = (0.8, 0.999)
DEPTH_STEPS = (-1, 0, 1)  # added to the preset's depth (kept >= 1)
MEASURABLE_WIDTH = 64  # structural_snapshot's default min_dim
BATCH_FACTORS = (0.5, 1.0, 2.0)  # multiply the preset's total batch size (kept a multiple of one micro-batch)


def _uniform(low: float, high: float, base: float) -> tuple[float, float]:
    """The range (low, high) widened so that it contains ``base``."""
    return min(low, base), max(high, base)


def depth_choices(base: TrainConfig) -> list[int]:
    """Depths one notch around the preset's, keeping only widths the rank triage can measure.

    Width is ``depth * aspect_ratio``: a model narrower than the snapshot's ``min_dim`` has no measurable
    matrix, its retention is NaN and the pruner would call that a collapse.
    """
    depths = {max(1, base.depth + step) for step in DEPTH_STEPS}
    return sorted({d for d in depths if replace(base, depth=d).n_embd >= MEASURABLE_WIDTH} | {base.depth})


def batch_choices(base: TrainConfig) -> list[int]:
    """Total batch sizes (tokens per optimizer step) around the preset's, multiples of one micro-batch."""
    micro = base.device_batch_size * base.seq_len
    choices = {base.total_batch_size}
    for factor in BATCH_FACTORS:
        tokens = int(base.total_batch_size * factor)
        if tokens >= micro and tokens % micro == 0:
            choices.add(tokens)
    return sorted(choices)


def defaults(base: TrainConfig) -> dict[str, Any]:
    """The preset's own values under the searched names: ``study.enqueue_trial(defaults(base))`` runs the
    preset configuration as a baseline trial."""
    names = (*LEARNING_RATES, "weight_decay", "warmup_ratio", "warmdown_ratio", "adam_beta1", "adam_beta2",
             "depth", "total_batch_size")
    return {name: getattr(base, name) for name in names}


def suggest(trial: optuna.Trial, base: TrainConfig) -> TrainConfig:
    """Sample one configuration.

    Args:
        trial: the Optuna trial (its sampler decides the values; enqueued params are honoured).
        base: the preset configuration the ranges are centred on; everything not searched is kept.

    Returns:
        ``base`` with the sampled hyperparameters.
    """
    values: dict[str, float | int] = {}
    for name, span in LEARNING_RATES.items():
        centre = getattr(base, name)
        values[name] = trial.suggest_float(name, centre * span.low, centre * span.high, log=True)
    values["weight_decay"] = trial.suggest_float("weight_decay", *_uniform(*WEIGHT_DECAY, base.weight_decay))
    values["warmup_ratio"] = trial.suggest_float("warmup_ratio", *_uniform(*WARMUP_RATIO, base.warmup_ratio))
    values["warmdown_ratio"] = trial.suggest_float(
        "warmdown_ratio", *_uniform(*WARMDOWN_RATIO, base.warmdown_ratio)
    )
    values["adam_beta1"] = trial.suggest_float("adam_beta1", *_uniform(*ADAM_BETA1, base.adam_beta1))
    values["adam_beta2"] = trial.suggest_float("adam_beta2", *_uniform(*ADAM_BETA2, base.adam_beta2))
    values["depth"] = trial.suggest_categorical("depth", depth_choices(base))
    values["total_batch_size"] = trial.suggest_categorical("total_batch_size", batch_choices(base))
    return replace(base, **values)
