"""``python -m search.bench``: does rank retention predict val_bpb? A counterfactual pruner benchmark.

Runs seeded *audit* studies (every trial trains to completion while the rank pruner's decision is
recorded), one per matrix optimizer, then replays pruners over the records as if each had been
active: compute saved, best val_bpb lost, good trials killed, Spearman of each checkpoint signal.

    python -m search.bench --trials 40                          # audit studies + replay (long)
    python -m search.bench --replay studies/reference/bench-cpu.parquet   # replay only, seconds
    python -m search.bench --study-name NAME [--storage URL]    # replay an existing audit study
    python -m search.bench --calibrate --study-name NAME [--storage URL] [--top-k 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

import optuna
from optuna.trial import TrialState

from search.audit_records import ReplayError, TrialRecord, load_records, write_records
from search.bench_metrics import benchmark
from search.bench_report import markdown, pruner_table, signal_table, write_html
from search.replay import recommend_threshold

FAMILIES = ("muon", "adamw")
#: Step budgets that make a preset's audit reproducible: about what its time budget trains here
#: (the cpu preset does roughly one 4096-token step per second on two cores).
STEP_BUDGETS = {"cpu": 30}
PROG = "python -m search.bench"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``search.bench`` command line."""
    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    run = parser.add_argument_group("audit run (default mode)")
    run.add_argument("--trials", type=int, default=40, help="trials per family (default 40); a rerun resumes")
    run.add_argument("--preset", default="cpu", help="training preset (default cpu)")
    budget = run.add_mutually_exclusive_group()
    budget.add_argument("--step-budget", type=int, help="steps per trial (default: 30 on cpu, else the preset's)")
    budget.add_argument("--time-budget", type=float, help="seconds per trial (not reproducible)")
    run.add_argument("--triage-at", type=int, help="checkpoint in the budget's unit (default: preset's share)")
    run.add_argument("--matrix-optimizer", nargs="+", default=list(FAMILIES), metavar="NAME",
                     help="families to audit: muon and/or adamw (default: both)")
    run.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    run.add_argument("--sampler", default="tpe", help="tpe (default) | random")
    run.add_argument("--study-prefix", default="audit", help="studies are <prefix>-<preset>-<family>")
    run.add_argument("--device", help="auto | cpu | cuda | mps")
    run.add_argument("--cache-dir", type=Path, help="prepared data (default: the train cache)")
    src = parser.add_argument_group("replay an existing record set instead")
    src.add_argument("--replay", metavar="PARQUET", help="audit records written by a previous bench")
    src.add_argument("--study-name", help="an existing audit study (with --storage)")
    src.add_argument("--storage", help="storage URL (default: sqlite:///studies/<study>.db)")
    src.add_argument("--at", type=int, help="replay at this checkpoint mark instead of the recorded one")
    src.add_argument("--n-startup-trials", type=int, default=5, help="completed trials before loss pruners act")
    cal = parser.add_argument_group("calibration")
    cal.add_argument("--calibrate", action="store_true", help="print the highest threshold keeping the top-k")
    cal.add_argument("--top-k", type=int, default=3, help="trials that must survive (default 3)")
    out = parser.add_argument_group("output")
    out.add_argument("--out-dir", type=Path, default=Path("studies"), help="where outputs go (default studies/)")
    out.add_argument("--name", help="output base name (default bench-<preset>, or bench-<source>-replay)")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.trials <= 0:
        parser.error(f"--trials must be > 0, got {args.trials}")
    if args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    if args.at is not None and args.at <= 0:
        parser.error(f"--at must be > 0, got {args.at}")
    if args.n_startup_trials < 0:
        parser.error(f"--n-startup-trials must be >= 0, got {args.n_startup_trials}")
    unknown = [f for f in args.matrix_optimizer if f not in FAMILIES]
    if unknown:
        parser.error(f"unknown --matrix-optimizer {unknown[0]!r} (choose from {', '.join(FAMILIES)})")
    if args.calibrate and not (args.replay or args.study_name):
        parser.error("--calibrate needs --study-name (and --storage) or --replay PARQUET")
    if args.replay and not args.replay.endswith(".parquet"):
        parser.error(f"--replay takes a .parquet records file, got {args.replay!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or replay / calibrate); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    try:
        if args.replay or args.study_name:
            source = args.replay or args.storage or f"sqlite:///studies/{args.study_name}.db"
            records = load_records(source, args.study_name)
            label = args.replay or f"{args.study_name} in {source}"
            if args.calibrate:
                return _calibrate(records, args.top_k, args.at)
            stem = Path(args.replay).stem if args.replay else args.study_name
            name = args.name or (stem if stem.startswith("bench-") else f"bench-{stem}") + "-replay"
            return _report(records, args, name, label, write_parquet=False)
        records, label, status = _audit(args)
        if status:
            return status
        return _report(records, args, args.name or f"bench-{args.preset}", label, write_parquet=True)
    except ReplayError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


def _calibrate(records: list[TrialRecord], top_k: int, mark: int | None) -> int:
    families = sorted({r.matrix_optimizer for r in records})
    for family in families:
        mine = [r for r in records if r.matrix_optimizer == family]
        threshold = recommend_threshold(mine, top_k, mark=mark)
        prefix = f"{family}: " if len(families) > 1 else ""
        print(f"{prefix}highest threshold that keeps the top-{top_k} of {len(mine)} trials:", file=sys.stderr)
        print(f"{prefix}{threshold:.2f}")
    return 0


def _report(records: list[TrialRecord], args: argparse.Namespace, name: str, label: str, *,
            write_parquet: bool) -> int:
    started = time.perf_counter()
    summaries, results = benchmark(records, mark=args.at, n_startup_trials=args.n_startup_trials)
    if not summaries:
        raise ReplayError(f"no replayable trials in {label}: an audit study's finished trials are needed")
    out = args.out_dir
    written = []
    if write_parquet:
        written.append(write_records(records, out / f"{name}.parquet"))
    md = out / f"{name}.md"
    out.mkdir(parents=True, exist_ok=True)
    md.write_text(markdown(summaries, results, source=label), encoding="utf-8")
    written += [md, write_html(out / f"{name}.html", summaries, results, records, source=label)]
    print(signal_table(summaries))
    print()
    print(pruner_table(results))
    print(f"\nreplayed {len(results)} pruner/family pairs in {time.perf_counter() - started:.1f} s; wrote "
          + ", ".join(str(p) for p in written))
    return 0


def _audit(args: argparse.Namespace) -> tuple[list[TrialRecord], str, int]:
    """Run (or resume) one audit study per family; returns all their records."""
    from search.objective import Objective
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

    step_budget = args.step_budget
    if step_budget is None and args.time_budget is None:
        step_budget = STEP_BUDGETS.get(args.preset)
    ns = argparse.Namespace(threshold=str(DEFAULT_THRESHOLD), device=args.device, cache_dir=args.cache_dir,
                            time_budget=args.time_budget, step_budget=step_budget, preset=args.preset,
                            triage_at=args.triage_at, pruner="rank", audit=True)
    try:
        settings = StudySettings.from_args(ns)
    except SettingsError as error:
        raise ReplayError(str(error)) from None
    base = settings.base
    unit, budget = ("seconds", base.time_budget) if base.time_budget is not None else ("steps", base.step_budget)
    names = {f: f"{args.study_prefix}-{base.preset}-{f}" for f in args.matrix_optimizer}
    urls = {f: args.storage or default_storage_url(n) for f, n in names.items()}
    print(f"audit: {len(names)} family(ies) x {args.trials} trials, preset {base.preset}, {budget:g} {unit} "
          f"per trial, checkpoint at {settings.triage_at} {unit}, seed {args.seed}, sampler {args.sampler}")
    if unit == "seconds":
        print(f"estimate: about {budget * 1.3 * args.trials * len(names) / 60:.0f} min "
              "(budget plus evaluation; finished trials of a resumed study are skipped)")
    else:
        print("estimate: measured after the first trial (steps cost different time per configuration)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    clock = _Clock(total=args.trials * len(names))
    try:
        if args.storage is None:
            Path("studies").mkdir(exist_ok=True)
        fingerprint = prepare_data(base.cache_dir)
        studies = []
        for family, name in names.items():
            storage = open_storage(urls[family], heartbeat=True)
            fam = replace(settings, base=replace(base, matrix_optimizer=family))
            if find_study(storage, name) is not None:
                existing = optuna.load_study(study_name=name, storage=storage)
                check_resume(existing, fam, fingerprint)  # matrix_optimizer is one of the comparable attrs
            study = optuna.create_study(study_name=name, storage=storage, direction="minimize",
                                        load_if_exists=True, sampler=make_sampler(args.sampler, args.seed),
                                        pruner=make_pruner(fam))
            fam.store(study, fingerprint)
            studies.append((family, fam, study))
    except (StorageError, SettingsError) as error:
        raise ReplayError(str(error)) from None
    for family, fam, study in studies:
        done = _finished(study)
        todo = max(0, args.trials - done)
        clock.skip(args.trials - todo)
        print(f"{study.study_name}: {done} finished trial(s) kept, {todo} to run ({urls[family]})")
        objective = Objective(base=fam.base, triage_at=fam.triage_at, threshold=DEFAULT_THRESHOLD, audit=True)
        try:
            study.optimize(objective, n_trials=todo, catch=(Exception,), callbacks=[clock.callback(family)])
        except KeyboardInterrupt:
            print("interrupted: the running trial was marked FAIL; run the same command to resume",
                  file=sys.stderr)
            return [], "", 130
    records = [r for _, _, s in studies for r in load_records(s._storage, s.study_name)]
    label = ", ".join(f"{n} ({urls[f]})" for f, n in names.items())
    return records, label, 0


class _Clock:
    """Per-trial progress lines with an ETA from this run's mean trial time."""

    def __init__(self, total: int) -> None:
        self.total, self.skipped, self.ran, self.started = total, 0, 0, time.perf_counter()

    def skip(self, n: int) -> None:
        self.skipped += n

    def callback(self, family: str):
        def report(study, trial) -> None:
            self.ran += 1
            spent = time.perf_counter() - self.started
            left = self.total - self.skipped - self.ran
            attrs = trial.user_attrs
            value = attrs.get("val_bpb")
            print(
                f"[{self.skipped + self.ran}/{self.total}] {family} trial {trial.number} {trial.state.name}: "
                f"val_bpb {'-' if value is None else f'{value:.4f}'}, retention {_f(attrs.get('triage_retention'))}"
                f" at {attrs.get('triage_step', '-')}, would prune {attrs.get('audit_would_prune', '-')}, "
                f"{_f(attrs.get('training_seconds'), '.0f')} s training; elapsed {spent / 60:.1f} min, "
                f"ETA {spent / self.ran * left / 60:.0f} min"
                + (f" [{attrs['fail_reason']}]" if "fail_reason" in attrs else ""),
                flush=True,
            )

        return report


def _f(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def _finished(study: optuna.Study) -> int:
    """Trials that count toward ``--trials``: completed, or failed by themselves (not by Ctrl-C)."""
    return sum(
        t.state == TrialState.COMPLETE
        or (t.state == TrialState.FAIL and not str(t.user_attrs.get("fail_reason", "")).startswith("interrupted"))
        for t in study.get_trials(deepcopy=False)
    )

if __name__ == "__main__":
    sys.exit(main())
