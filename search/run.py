"""``python -m search.run --trials 50``: a resumable Optuna search of the ``train`` GPT that prunes on rank collapse.

Every argument is checked before anything is written: bad input prints one line and exits 2, and an existing
study is never modified by a refused run. The search itself survives crashing and diverging trials (recorded as
FAIL with a ``fail_reason``) and Ctrl-C (the running trial is marked FAIL; the same command resumes).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import optuna
from optuna.trial import TrialState

from search.space import defaults
from search.storage import StorageError, default_storage_url, find_study, open_storage
from search.study import (
    DEFAULT_THRESHOLD,
    SettingsError,
    StudySettings,
    check_resume,
    make_pruner,
    make_sampler,
    prepare_data,
)

PRUNERS = ("rank", "median", "none")
SAMPLERS = ("tpe", "random")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``search.run`` command line."""
    parser = _Parser(prog="python -m search.run", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, required=True, help="new trials to run (a resumed study keeps its own)")
    parser.add_argument("--study-name", help="default: triage-<preset>")
    parser.add_argument("--storage", help="Optuna storage URL or journal file (default: sqlite:///studies/<name>.db)")
    parser.add_argument("--preset", help="training preset: gpu | cpu | tiny (default: the detected device's)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--time-budget", type=float, help="seconds of training per trial")
    budget.add_argument("--step-budget", type=int, help="optimizer steps per trial (reproducible)")
    parser.add_argument("--device", help="auto | cpu | cuda | mps")
    parser.add_argument("--triage-at", type=int, help="triage checkpoint in the budget's unit (default: preset's)")
    parser.add_argument("--matrix-optimizer", help="muon (default) | adamw: the optimizer of the block matrices; "
                        "the evidence benchmark found rank retention predictive with adamw only")
    parser.add_argument("--pruner", default="rank", help="rank (default) | median (train loss) | none")
    parser.add_argument("--threshold", default=str(DEFAULT_THRESHOLD), help="rank retention threshold in (0, 1], or auto")
    parser.add_argument("--calibrate-from", metavar="STUDY|RECORDS.parquet",
                        help="--threshold auto: audit study (same storage) or records file; default: this study")
    parser.add_argument("--audit", action="store_true", help="record every pruning decision, prune nothing")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed")
    parser.add_argument("--sampler", default="tpe", help="tpe (default) | random")
    parser.add_argument("--threads", type=int, help="CPU threads for training (default: torch's); 1 on a busy machine")
    parser.add_argument("--cache-dir", type=Path, help="prepared data and tokenizer (default: the train cache)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="do not run the preset's own configuration as the first trial of a new study")
    parser.add_argument("--verbose", action="store_true", help="show the training and Optuna logs")
    parser.add_argument("--no-report", action="store_true", help="skip the report at the end")
    return parser


def _number(value: object, spec: str = ".3f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


@dataclass
class _Progress:
    """Optuna callback driving a tqdm bar: trials done, pruned, failed, best val_bpb (tqdm shows elapsed)."""

    bar: Any

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        trials = study.get_trials(deepcopy=False)
        states = [t.state for t in trials]
        best = min((t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None), default=None)
        self.bar.set_postfix_str(f"pruned {states.count(TrialState.PRUNED)}, failed {states.count(TrialState.FAIL)}, "
                                 f"best val_bpb {_number(best, '.4f')}", refresh=False)
        self.bar.update(1)
        attrs = trial.user_attrs
        if trial.state == TrialState.FAIL:
            self._say(f"trial {trial.number} FAIL: {attrs.get('fail_reason', '?')}")
        elif trial.state == TrialState.PRUNED:
            self._say(f"trial {trial.number} pruned at {attrs.get('prune_step')} ({attrs.get('prune_reason')}): "
                           f"retention {_number(attrs.get('prune_retention'))}, "
                           f"quick val_bpb {_number(attrs.get('pruned_val_bpb_quick'), '.4f')}")
        elif attrs.get("audit_would_prune") is True:
            self._say(f"trial {trial.number} complete, val_bpb {_number(trial.value, '.4f')}; audit: would have "
                           f"pruned at {attrs.get('audit_prune_step')} ({attrs.get('audit_reason')})")
        if str(attrs.get("fail_reason", "")).startswith("DataError"):
            study.stop()  # the data went missing: every further trial would fail the same way

    def _say(self, line: str) -> None:
        self.bar.write(line, file=sys.stderr)  # above the bar, with it: progress goes to stderr


def _fail(message: str) -> int:
    print(f"python -m search.run: error: {message}", file=sys.stderr)
    return 2


@dataclass
class OpenedStudy:
    """A study ready to optimize, with the settings it was opened with and its storage URL."""

    study: optuna.Study
    settings: StudySettings
    url: str


def open_search(parser: argparse.ArgumentParser, args: argparse.Namespace) -> OpenedStudy | int:
    """Validate everything, then create or resume the study; an int is the exit status of a refusal.

    Nothing is written to the storage before every check passed (argparse refusals exit 2 directly).
    """
    if args.trials <= 0:
        parser.error(f"--trials must be > 0, got {args.trials}")
    if args.pruner not in PRUNERS:
        parser.error(f"unknown --pruner {args.pruner!r} (choose from {', '.join(PRUNERS)})")
    if args.sampler not in SAMPLERS:
        parser.error(f"unknown --sampler {args.sampler!r} (choose from {', '.join(SAMPLERS)})")
    if args.calibrate_from is not None and args.threshold.strip().lower() != "auto":
        parser.error("--calibrate-from only goes with --threshold auto")
    if args.threshold.strip().lower() == "auto" and args.pruner != "rank":
        parser.error(f"--threshold auto calibrates the rank pruner, not --pruner {args.pruner}")
    try:
        settings = StudySettings.from_args(args)
    except SettingsError as error:
        parser.error(str(error))

    study_name = args.study_name or f"triage-{settings.base.preset}"
    url = args.storage
    if url is None:
        Path("studies").mkdir(exist_ok=True)
        url = default_storage_url(study_name)
    try:
        storage = open_storage(url, heartbeat=True)
        url = getattr(storage, "url", url)  # the URL as opened (e.g. with its PostgreSQL driver)
        direction = find_study(storage, study_name)
        if direction is not None and direction != optuna.study.StudyDirection.MINIMIZE:
            return _fail(f"study {study_name!r} exists in {url} with direction {direction.name.lower()}, "
                         "this search minimizes val_bpb: use another --study-name")
        settings = settings.resolve_threshold(storage, study_name, args.calibrate_from)
        fingerprint = prepare_data(settings.base.cache_dir)
        if direction is not None:
            check_resume(optuna.load_study(study_name=study_name, storage=storage), settings, fingerprint)
    except (StorageError, SettingsError) as error:
        return _fail(str(error))

    study = optuna.create_study(study_name=study_name, storage=storage, direction="minimize", load_if_exists=True,
                                sampler=make_sampler(args.sampler, args.seed), pruner=make_pruner(settings))
    settings.store(study, fingerprint)
    if direction is None and not args.no_baseline:
        study.enqueue_trial(defaults(settings.base))  # trial 0: the preset as it is, the bar to beat
    return OpenedStudy(study, settings, url)


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) a search; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    opened = open_search(parser, args)
    if isinstance(opened, int):
        return opened
    return _search(opened, args)


def _search(opened: OpenedStudy, args: argparse.Namespace) -> int:
    """Optimize with a progress bar, then print the report and the dashboard command."""
    study, settings, url = opened.study, opened.settings, opened.url
    from tqdm import tqdm

    from search.objective import Objective
    from search.report import run_report

    if not args.verbose:
        optuna.logging.set_verbosity(optuna.logging.ERROR)
    objective = Objective(base=settings.base, triage_at=settings.triage_at, threshold=settings.threshold,
                          audit=settings.audit, log=print if args.verbose else (lambda *a, **k: None))
    started = time.perf_counter()
    status = 0
    with tqdm(total=args.trials, desc=study.study_name, unit="trial", file=sys.stderr, dynamic_ncols=True) as bar:
        try:
            study.optimize(objective, n_trials=args.trials, catch=(Exception,), callbacks=[_Progress(bar)])
        except KeyboardInterrupt:
            bar.write("interrupted: the running trial was marked FAIL; run the same command again to resume",
                      file=sys.stderr)
            status = 130
    print(f"search: {time.perf_counter() - started:.1f} s for this run", file=sys.stderr)
    if not args.no_report:
        print(run_report(study))
    print(f"open the study: optuna-dashboard {url}")
    return status


if __name__ == "__main__":
    sys.exit(main())
