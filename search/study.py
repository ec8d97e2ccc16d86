"""The settings of one search: validated command-line values, the study's user attrs, sampler and pruner.

Kept apart from the CLI so that tests and the overhead benchmark build exactly the same study as
``python -m search.run`` does.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.pruners import BasePruner, MedianPruner, NopPruner

from optuna_triage import RankCollapsePruner, SignalPruner
from search.space import SEARCH_SPACE_VERSION
from train.loop import TrainConfig, preset_config, resolve_device

DEFAULT_THRESHOLD = 0.5

#: Study attrs that must match for a resumed study: trials run under other values are not comparable.
COMPARABLE = ("preset", "budget_unit", "budget", "triage_at", "search_space_version", "data_fingerprint",
              "matrix_optimizer")


class SettingsError(ValueError):
    """A refused setting; the message is one line."""


def parse_threshold(text: str) -> float | None:
    """A threshold in (0, 1], or None for ``auto``."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise SettingsError(f"--threshold must be a number in (0, 1] or 'auto', got {text!r}") from None
    if not 0.0 < value <= 1.0:  # also refuses NaN
        raise SettingsError(f"--threshold must be in (0, 1], got {text}")
    return value


def budget_of(config: TrainConfig) -> tuple[str, float]:
    """The budget's unit ("seconds" | "steps") and size of a training configuration."""
    if config.time_budget is not None:
        return "seconds", float(config.time_budget)
    return "steps", float(config.step_budget or 0)


def default_triage_at(preset: TrainConfig, base: TrainConfig) -> int:
    """The preset's checkpoint, or the same fraction of the budget when the budget was changed."""
    if budget_of(preset) == budget_of(base):
        return round(preset.triage_time)
    fraction = preset.triage_time / budget_of(preset)[1]
    return max(1, round(fraction * budget_of(base)[1]))


@dataclass(frozen=True)
class StudySettings:
    """Everything a search is configured with, validated.

    Attributes:
        base: the preset configuration with the pass-through overrides (the space is centred on it).
        triage_at: triage checkpoint in the budget's unit, 0 < triage_at <= budget.
        threshold: rank retention threshold, or None until ``resolve_threshold`` for ``--threshold auto``.
        pruner: "rank" | "median" | "none".
        audit: record decisions without pruning.
        threshold_source: "flag" | "default" | "auto:<how>".
    """

    base: TrainConfig
    triage_at: int
    threshold: float | None
    pruner: str = "rank"
    audit: bool = False
    threshold_source: str = "flag"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> StudySettings:
        """Validate the command line into settings (raises SettingsError, one line)."""
        threshold = parse_threshold(args.threshold)
        common: dict[str, Any] = {}
        if args.device is not None:
            common["device"] = args.device
        if args.cache_dir is not None:
            common["cache_dir"] = Path(args.cache_dir)
        if getattr(args, "threads", None) is not None:
            common["threads"] = args.threads
        if getattr(args, "matrix_optimizer", None) is not None:
            common["matrix_optimizer"] = args.matrix_optimizer
        overrides: dict[str, Any] = {}
        if args.time_budget is not None:
            if not (args.time_budget > 0 and math.isfinite(args.time_budget)):
                raise SettingsError(f"--time-budget must be > 0, got {args.time_budget}")
            overrides.update(time_budget=args.time_budget, step_budget=None)
        if args.step_budget is not None:
            if args.step_budget <= 0:
                raise SettingsError(f"--step-budget must be > 0, got {args.step_budget}")
            overrides.update(time_budget=None, step_budget=args.step_budget)
        try:
            preset = preset_config(args.preset, **common)
            base = preset_config(args.preset, **common, **overrides)
        except (ValueError, KeyError, TypeError) as error:
            raise SettingsError(str(error).splitlines()[0] if str(error) else repr(error)) from None
        unit, budget = budget_of(base)
        triage_at = default_triage_at(preset, base) if args.triage_at is None else args.triage_at
        if not 0 < triage_at <= budget:
            raise SettingsError(f"--triage-at must be in (0, {budget:g}] {unit} (the budget), got {triage_at}")
        try:  # refuse now what would fail every trial later
            replace(base, triage_time=triage_at).validate()
            resolve_device(base.device)
        except ValueError as error:
            raise SettingsError(str(error).splitlines()[0]) from None
        source = "flag" if args.threshold != str(DEFAULT_THRESHOLD) else "default"
        return cls(base=base, triage_at=triage_at, threshold=threshold, pruner=args.pruner, audit=args.audit,
                   threshold_source=source if threshold is not None else "auto")

    def resolve_threshold(
        self, storage: optuna.storages.BaseStorage, study_name: str, calibrate_from: str | None = None
    ) -> StudySettings:
        """Settings with ``--threshold auto`` replaced by the calibrated threshold.

        The threshold is ``search.replay.calibrated_threshold``: the highest one that would not have pruned
        any of the top-3 trials of a finished audit study. ``calibrate_from`` is a records ``.parquet`` file or
        a study name in ``storage``; default: this very study (run ``--audit`` first, then resume it with
        ``--threshold auto``).
        """
        if self.threshold is not None:
            return self
        from search.audit_records import ReplayError
        from search.replay import calibrated_threshold

        source = calibrate_from or study_name
        try:
            if source.endswith(".parquet"):
                value = calibrated_threshold(source)
            else:
                value = calibrated_threshold(storage, source)
        except ReplayError as error:
            raise SettingsError(f"--threshold auto: {str(error).splitlines()[0]} (calibrating from "
                                f"{source!r}; run an --audit search first or give --calibrate-from)") from None
        print(f"--threshold auto: {value:.3f}, calibrated on {source!r}", file=sys.stderr)
        return replace(self, threshold=float(value), threshold_source=f"auto: {source}")

    def attrs(self, fingerprint: str) -> dict[str, Any]:
        """The study's user attrs (names fixed by the contract)."""
        unit, budget = budget_of(self.base)
        return {
            "preset": self.base.preset,
            "budget_unit": unit,
            "budget": budget,
            "triage_at": self.triage_at,
            "matrix_optimizer": self.base.matrix_optimizer,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "pruner": self.pruner,
            "audit": self.audit,
            "data_fingerprint": fingerprint,
            "versions": versions(),
            "search_space_version": SEARCH_SPACE_VERSION,
        }

    def store(self, study: optuna.Study, fingerprint: str) -> None:
        """Write the study attrs (a resumed study takes the new pruner settings, for its new trials)."""
        for key, value in self.attrs(fingerprint).items():
            if study.user_attrs.get(key, object()) != value:
                study.set_user_attr(key, value)


def check_resume(study: optuna.Study, settings: StudySettings, fingerprint: str) -> None:
    """Refuse to add trials to a study whose trials were trained under another budget, preset or data."""
    old = study.user_attrs
    new = settings.attrs(fingerprint)
    for key in COMPARABLE:
        if key in old and old[key] != new[key]:
            raise SettingsError(
                f"study {study.study_name!r} was run with {key}={old[key]!r}, this run has {new[key]!r}: "
                "its trials would not be comparable; use another --study-name"
            )


def versions() -> dict[str, str]:
    """Library versions recorded on the study."""
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "optuna": optuna.__version__}


def make_pruner(settings: StudySettings) -> BasePruner:
    """The study's pruner; every decision happens at ``triage_at`` (the hook asks only there)."""
    if settings.pruner == "rank":
        assert settings.threshold is not None
        return RankCollapsePruner(settings.threshold, n_warmup_steps=settings.triage_at)
    if settings.pruner == "median":
        return SignalPruner(MedianPruner(n_warmup_steps=settings.triage_at), "train_loss")
    return NopPruner()


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """Seeded TPE (default) or random sampler."""
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def prepare_data(cache_dir: Path | None) -> str:
    """The prepared data's fingerprint; prepares the embedded default source first if it is missing."""
    from train.prepare import DataError, load_manifest, prepare

    try:
        manifest = load_manifest(cache_dir)
    except DataError as missing:
        print(f"search: {missing}; doing that now, on the default source", file=sys.stderr)
        try:
            manifest = prepare(cache_dir)
        except DataError as failure:
            raise SettingsError(str(failure).splitlines()[0]) from None
    return str(manifest.get("fingerprint", ""))
