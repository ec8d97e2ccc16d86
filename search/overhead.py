"""``python -m search.overhead``: what Optuna and its storage cost per trial, next to the training they organise.

Runs a few trials exactly as ``python -m search.run`` does (same flags, same study set-up; default ``--preset cpu``
in a fresh SQLite study under a temporary directory) and splits each trial's wall-clock time, measured in this
one run:

* training: inside ``train()``, minus the time spent in the checkpoint callback (model, data, optimizer, the
  loop's own rank measurements, final evaluation);
* Optuna + storage: everything else -- ``ask`` and the sampler, ``suggest``, every ``report``/``set_user_attr``
  the hook writes, the pruner, ``tell``, the progress callbacks;
* quick evaluation of a pruned trial, apart (a search choice, not Optuna's cost).

The ratio Optuna + storage / training is the number to keep below 1 %.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from search.objective import Objective
from search.run import OpenedStudy, build_parser, open_search

TARGET = 0.01


@dataclass
class TrialCost:
    """One trial's split."""

    number: int
    state: str
    wall: float
    training: float
    quick_eval: float

    @property
    def optuna(self) -> float:
        return max(0.0, self.wall - self.training - self.quick_eval)


@dataclass
class _Clock:
    """Optuna callback (registered last) closing each trial's wall-clock window."""

    objective: Objective
    last: float = field(default_factory=time.perf_counter)
    costs: list[TrialCost] = field(default_factory=list)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        now = time.perf_counter()
        timing = self.objective.timing
        self.costs.append(TrialCost(trial.number, trial.state.name, now - self.last,
                                    timing.train - timing.callback, timing.extra_eval))
        self.last = time.perf_counter()


def measure(opened: OpenedStudy, trials: int) -> list[TrialCost]:
    """Run ``trials`` trials of the opened study and return their costs."""
    from search.run import _Progress

    settings = opened.settings
    objective = Objective(base=settings.base, triage_at=settings.triage_at, threshold=settings.threshold,
                          audit=settings.audit)
    clock = _Clock(objective)

    class _Bar:  # the progress callback's work is overhead too: keep it, print nothing
        def set_postfix_str(self, *args: object, **kwargs: object) -> None: ...
        def update(self, *args: object) -> None: ...
        def write(self, *args: object) -> None: ...

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    clock.last = time.perf_counter()
    opened.study.optimize(objective, n_trials=trials, catch=(Exception,), callbacks=[_Progress(_Bar()), clock])
    return clock.costs


def format_costs(costs: list[TrialCost], preset: str, url: str) -> str:
    """The table and the ratio."""
    header = (f"{'trial':>5}  {'state':<8}  {'wall s':>8}  {'training s':>10}  {'optuna ms':>9}  "
              f"{'quick eval ms':>13}  {'ratio':>7}")
    lines = [f"overhead of Optuna + storage per trial ({url}, preset {preset})", header]
    for c in costs:
        lines.append(f"{c.number:>5}  {c.state:<8}  {c.wall:>8.2f}  {c.training:>10.2f}  {1000 * c.optuna:>9.1f}  "
                     f"{1000 * c.quick_eval:>13.1f}  {c.optuna / c.training if c.training else 0:>7.3%}")
    training = sum(c.training for c in costs)
    optuna_s = sum(c.optuna for c in costs)
    ratio = optuna_s / training if training else float("nan")
    lines.append(f"total: {optuna_s * 1000:.0f} ms of Optuna + storage for {training:.1f} s of training: {ratio:.3%} "
                 f"(target < {TARGET:.0%}: {'met' if ratio < TARGET else 'NOT met'})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``search.run``'s flags, with ``--trials`` (default 3) and ``--preset cpu`` defaults and a fresh study."""
    parser = build_parser()
    parser.prog = "python -m search.overhead"
    parser.set_defaults(preset="cpu")
    for action in parser._actions:  # --trials is optional here
        if action.dest == "trials":
            action.required, action.default = False, 3
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.storage is None:
            args.storage = f"sqlite:///{Path(tmp) / 'overhead.db'}"
        args.study_name = args.study_name or f"overhead-{time.strftime('%Y%m%d-%H%M%S')}"
        opened = open_search(parser, args)
        if isinstance(opened, int):
            return opened
        costs = measure(opened, args.trials)
        print(format_costs(costs, opened.settings.base.preset, args.storage))
    return 0


if __name__ == "__main__":
    sys.exit(main())
