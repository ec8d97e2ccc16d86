"""Runnable studies that use optuna_triage's public API only (``python -m optuna_triage.examples.digits``)."""
