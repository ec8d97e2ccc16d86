"""optuna_triage: prune Optuna trials whose weight matrices collapse in rank early in training.

Public API:

* metrics (pure torch): :func:`effective_rank`, :func:`effective_ranks`,
  :func:`structural_snapshot` / :class:`StructuralSnapshot`, :func:`rank_retention`,
  :func:`gradient_coherence`;
* pruners: :class:`RankCollapsePruner` (retention below a threshold) and :class:`SignalPruner`
  (runs any Optuna pruner on another per-trial series, e.g. the training loss);
* the training-loop hook :class:`RankTriage`.
"""

from optuna_triage._hook import RankTriage
from optuna_triage._metrics import (
    StructuralSnapshot,
    effective_rank,
    effective_ranks,
    gradient_coherence,
    rank_retention,
    structural_snapshot,
)
from optuna_triage._pruner import RankCollapsePruner
from optuna_triage._signal import SignalPruner

__all__ = [
    "RankCollapsePruner",
    "RankTriage",
    "SignalPruner",
    "StructuralSnapshot",
    "effective_rank",
    "effective_ranks",
    "gradient_coherence",
    "rank_retention",
    "structural_snapshot",
]
