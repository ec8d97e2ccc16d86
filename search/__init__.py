"""Hyperparameter search of the ``train`` GPT with rank-collapse triage.

``python -m search.run`` runs or resumes a study; ``python -m search.report`` compares its pruned and completed
trials. The modules: ``space`` (every ``suggest_*`` call), ``objective`` (trial -> training with the hook),
``study`` (settings, sampler, pruner, study attrs), ``storage`` (storage URLs), ``report``/``figures``/``export``
(terminal table, plotly HTML, parquet), ``overhead`` (Optuna + storage cost per trial).
"""
