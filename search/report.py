"""``python -m search.report``: pruned versus completed trials of a search, in the terminal, HTML and parquet.

A pruned trial's Optuna ``value`` is its last rank retention: nothing here reads it as a ``val_bpb``. What a
pruned trial had reached comes from its user attrs (``pruned_val_bpb_quick``, ``pruned_train_loss``), always
labelled as measured at the prune point.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.objective import QUICK_EVAL_FRACTION
from search.storage import StorageError, default_storage_url, open_storage

QUICK_LABEL = (
    f"quick val_bpb at the prune point, on 1/{round(1 / QUICK_EVAL_FRACTION)} of the evaluation tokens "
    "(not comparable 1:1 with a final val_bpb)"
)


def _floats(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)]


@dataclass(frozen=True)
class Spread:
    """Count, best (lowest), median and worst (highest) of a series; the empty spread prints dashes."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    def row(self, label: str) -> str:
        if not self.values:
            return f"  {label:<44} {0:>4}  {'-':>8}  {'-':>8}  {'-':>8}"
        best, median, worst = min(self.values), statistics.median(self.values), max(self.values)
        return f"  {label:<44} {self.n:>4}  {best:>8.4f}  {median:>8.4f}  {worst:>8.4f}"


@dataclass
class Summary:
    """What the report says about one study."""

    study_name: str
    attrs: dict[str, Any]
    counts: dict[str, int]
    completed_bpb: Spread
    pruned_quick_bpb: Spread
    pruned_train_loss: Spread
    seconds_by_state: dict[str, float]
    seconds_saved: float
    audit_flagged_bpb: Spread = field(default_factory=lambda: Spread(()))
    audit_kept_bpb: Spread = field(default_factory=lambda: Spread(()))

    @property
    def seconds_spent(self) -> float:
        return sum(self.seconds_by_state.values())


def state_name(trial: FrozenTrial) -> str:
    """'completed' | 'pruned' | 'failed' | 'running' | 'waiting'."""
    return {
        TrialState.COMPLETE: "completed",
        TrialState.PRUNED: "pruned",
        TrialState.FAIL: "failed",
        TrialState.RUNNING: "running",
        TrialState.WAITING: "waiting",
    }[trial.state]


def final_val_bpb(trial: FrozenTrial) -> float | None:
    """A completed trial's final val_bpb; None for every other state (a pruned value is a retention)."""
    if trial.state != TrialState.COMPLETE:
        return None
    value = trial.user_attrs.get("val_bpb", trial.value)
    return None if value is None else float(value)


def summarize(study: optuna.Study) -> Summary:
    """Count, spread and time totals of a study's trials."""
    trials = study.get_trials(deepcopy=False)
    counts = {name: 0 for name in ("completed", "pruned", "failed", "running", "waiting")}
    seconds = {"completed": 0.0, "pruned": 0.0, "failed": 0.0}
    for trial in trials:
        counts[state_name(trial)] += 1
        spent = trial.user_attrs.get("training_seconds")
        if state_name(trial) in seconds and isinstance(spent, (int, float)):
            seconds[state_name(trial)] += float(spent)
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    flagged = [t for t in completed if t.user_attrs.get("audit_would_prune") is True]
    kept = [t for t in completed if t.user_attrs.get("audit_would_prune") is False]
    return Summary(
        study_name=study.study_name,
        attrs=dict(study.user_attrs),
        counts=counts,
        completed_bpb=Spread(tuple(_floats([final_val_bpb(t) for t in completed]))),
        pruned_quick_bpb=Spread(tuple(_floats([t.user_attrs.get("pruned_val_bpb_quick") for t in pruned]))),
        pruned_train_loss=Spread(tuple(_floats([t.user_attrs.get("pruned_train_loss") for t in pruned]))),
        seconds_by_state=seconds,
        seconds_saved=sum(_floats([t.user_attrs.get("budget_seconds_saved") for t in pruned])),
        audit_flagged_bpb=Spread(tuple(_floats([final_val_bpb(t) for t in flagged]))),
        audit_kept_bpb=Spread(tuple(_floats([final_val_bpb(t) for t in kept]))),
    )


def _header(attrs: dict[str, Any]) -> str:
    """One line with the study's setup, from its user attrs (missing ones print as '?')."""
    budget, threshold = attrs.get("budget", "?"), attrs.get("threshold")
    budget_text = f"{budget:g}" if isinstance(budget, (int, float)) else str(budget)
    text = (f"preset {attrs.get('preset', '?')}, budget {budget_text} {attrs.get('budget_unit', '')}, "
            f"triage at {attrs.get('triage_at', '?')}, pruner {attrs.get('pruner', '?')}")
    if attrs.get("pruner") == "rank" and isinstance(threshold, (int, float)):
        text += f" (threshold {threshold:.3g})"
    if attrs.get("audit"):
        text += ", audit: nothing pruned, decisions recorded"
    return text


def format_table(summary: Summary) -> str:
    """The terminal comparison of pruned versus completed trials."""
    setup = _header(summary.attrs)
    c = summary.counts
    total = sum(c.values())
    states = ", ".join(f"{c[k]} {k}" for k in ("completed", "pruned", "failed", "running", "waiting") if c[k] or k in ("completed", "pruned", "failed"))
    lines = [
        f"study {summary.study_name}: {setup}",
        f"trials: {total} = {states}",
        f"  {'':<44} {'n':>4}  {'best':>8}  {'median':>8}  {'worst':>8}",
        summary.completed_bpb.row("completed: final val_bpb"),
        summary.pruned_quick_bpb.row("pruned: quick val_bpb at prune point (*)"),
        summary.pruned_train_loss.row("pruned: train loss at prune point"),
    ]
    if summary.audit_flagged_bpb.n or summary.audit_kept_bpb.n:
        lines.append(summary.audit_flagged_bpb.row("audit, would prune: final val_bpb"))
        lines.append(summary.audit_kept_bpb.row("audit, would keep: final val_bpb"))
    spent = summary.seconds_spent
    s = summary.seconds_by_state
    lines.append(
        f"training time spent: {spent:.1f} s (completed {s['completed']:.1f}, pruned {s['pruned']:.1f}, "
        f"failed {s['failed']:.1f})"
    )
    share = summary.seconds_saved / (spent + summary.seconds_saved) if spent + summary.seconds_saved > 0 else 0.0
    lines.append(
        f"time saved by pruning: {summary.seconds_saved:.1f} s (remaining budget of pruned trials, "
        f"{share:.0%} of what the search would have trained)"
    )
    lines.append(f"(*) {QUICK_LABEL}")
    return "\n".join(lines)


def run_report(study: optuna.Study, out_dir: Path = Path("studies")) -> str:
    """Write ``<out_dir>/<name>-report.html`` and ``-trials.parquet``; return the table and the file names."""
    from search.export import write_trials_parquet
    from search.figures import write_html

    summary = summarize(study)
    table = format_table(summary)
    out_dir.mkdir(parents=True, exist_ok=True)
    html = write_html(study, out_dir / f"{study.study_name}-report.html", table=table)
    parquet = write_trials_parquet(study, out_dir / f"{study.study_name}-trials.parquet")
    return f"{table}\nwrote {html} and {parquet}"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``search.report`` command line."""
    parser = _Parser(prog="python -m search.report", description=__doc__.splitlines()[0])
    parser.add_argument("--study-name", help="default: the only study in the storage")
    parser.add_argument("--storage", help="default: sqlite:///studies/<study-name>.db (or the only studies/*.db)")
    parser.add_argument("--out-dir", type=Path, default=Path("studies"), help="where the HTML and parquet go")
    return parser


def _locate(args: argparse.Namespace) -> tuple[str, str]:
    """(storage URL, study name) from the flags, without ever creating a storage."""
    url = args.storage
    if url is None:
        if args.study_name is not None:
            path = Path("studies") / f"{args.study_name}.db"
        else:
            found = sorted(Path("studies").glob("*.db"))
            if len(found) != 1:
                raise StorageError(f"{len(found)} studies/*.db files: give --study-name (or --storage)")
            path = found[0]
        if not path.is_file():
            raise StorageError(f"no study storage at {path}: give --storage, or run `python -m search.run` first")
        url = default_storage_url(path.stem, path.parent)
    storage = open_storage(url)
    names = [s.study_name for s in storage.get_all_studies()]
    name = args.study_name
    if name is None:
        if len(names) != 1:
            raise StorageError(f"{len(names)} studies in {url}: give --study-name")
        name = names[0]
    if name not in names:
        raise StorageError(f"no study {name!r} in {url}")
    return url, name


def main(argv: Sequence[str] | None = None) -> int:
    """Print and write the report; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        url, name = _locate(args)
        study = optuna.load_study(study_name=name, storage=open_storage(url))
    except StorageError as error:
        print(f"python -m search.report: error: {error}", file=sys.stderr)
        return 2
    print(run_report(study, args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
