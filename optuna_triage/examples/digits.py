"""A second study, outside the GPT code: an MLP on scikit-learn's digits with rank triage.

Run: ``python -m optuna_triage.examples.digits --trials 20``. Uses only the public API of
optuna_triage. The study maximises validation accuracy; the pruner judges two other signals:
rank retention (RankCollapsePruner, higher is healthier) ORed with a median rule on the training
loss (SignalPruner(MedianPruner), lower is better). Large learning rates collapse the hidden
layers' rank and are pruned at the triage checkpoint.
"""

from __future__ import annotations

import argparse
import sys

import optuna
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from optuna_triage import RankCollapsePruner, RankTriage, SignalPruner

EPOCHS = 12
CHECKPOINT = 3  # the triage epoch


def load_data(seed: int = 0) -> tuple[torch.Tensor, ...]:
    x, y = load_digits(return_X_y=True)
    x_tr, x_va, y_tr, y_va = train_test_split(x / 16.0, y, test_size=0.25, random_state=seed)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return as_x(x_tr), as_y(y_tr), as_x(x_va), as_y(y_va)


def make_objective(data: tuple[torch.Tensor, ...], epochs: int = EPOCHS):
    x_tr, y_tr, x_va, y_va = data

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-3, 30.0, log=True)
        hidden = trial.suggest_categorical("hidden", [64, 128])
        torch.manual_seed(trial.number)
        model = torch.nn.Sequential(  # hidden >= 64 so both hidden matrices are measured
            torch.nn.Linear(64, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, 10),
        )
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        triage = RankTriage(trial, checkpoint=CHECKPOINT)
        triage.observe(model, 0)  # the reference snapshot, at init
        for epoch in range(1, epochs + 1):
            losses = []
            for idx in torch.randperm(len(x_tr)).split(128):
                loss = torch.nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            # Reports retention and the epoch's mean loss; raises optuna.TrialPruned when the
            # pruner says so at the checkpoint.
            triage.observe(model, epoch, train_loss=sum(losses) / len(losses))
        with torch.no_grad():
            return (model(x_va).argmax(dim=1) == y_va).float().mean().item()

    return objective


def make_study(storage: str | None = None, seed: int = 0, threshold: float = 0.5) -> optuna.Study:
    loss_rule = SignalPruner(
        optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=CHECKPOINT),
        "train_loss",
        direction="minimize",
    )
    pruner = RankCollapsePruner(threshold, n_warmup_steps=CHECKPOINT, wrapped_pruner=loss_rule)
    return optuna.create_study(direction="maximize", storage=storage, pruner=pruner,
                               sampler=optuna.samplers.TPESampler(seed=seed))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m optuna_triage.examples.digits",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="number of trials (default 20)")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"epochs per trial (default {EPOCHS})")
    parser.add_argument("--threshold", type=float, default=0.5, help="rank retention threshold in (0, 1]")
    parser.add_argument("--storage", default=None, help="Optuna storage URL (default: in memory)")
    parser.add_argument("--seed", type=int, default=0, help="sampler and data-split seed")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error(f"--trials must be at least 1, got {args.trials}")
    if args.epochs <= CHECKPOINT:
        parser.error(f"--epochs must exceed the triage epoch {CHECKPOINT}, got {args.epochs}")
    if not 0.0 < args.threshold <= 1.0:
        parser.error(f"--threshold must be in (0, 1], got {args.threshold}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = make_study(args.storage, args.seed, args.threshold)
    study.optimize(make_objective(load_data(args.seed), args.epochs), n_trials=args.trials)
    print(f"{'trial':>5} {'state':>8} {'lr':>9} {'hidden':>6} {'val_acc':>7}  pruned because")
    for t in study.trials:
        # A pruned trial's value is its last retention, not an accuracy: never print it as one.
        acc = f"{t.value:.3f}" if t.state == optuna.trial.TrialState.COMPLETE else "-"
        why = t.user_attrs.get("prune_reason") or ""
        if why:
            why += f" at epoch {t.user_attrs.get('prune_step')}"
        print(f"{t.number:>5} {t.state.name:>8} {t.params['lr']:>9.4f} {t.params['hidden']:>6} {acc:>7}  {why}")
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    if complete:
        print(f"best val_acc {study.best_value:.3f} with {study.best_params}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
