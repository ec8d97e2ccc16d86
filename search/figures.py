"""The report's plotly figures, written as one self-contained HTML page (plotly.js inlined: opens offline).

Four figures: val_bpb of completed trials beside what pruned trials had reached; retention at the triage
checkpoint versus final val_bpb with the threshold; retention curves over training time; compute per trial.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import optuna
import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState

from search.report import QUICK_LABEL, final_val_bpb, state_name

COLOURS = {"completed": "#1f77b4", "pruned": "#d62728", "failed": "#7f7f7f", "running": "#bcbd22",
           "waiting": "#bcbd22"}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _curve(trial: FrozenTrial, name: str) -> dict[int, float]:
    curve = trial.user_attrs.get(f"curve_{name}") or {}
    return {int(step): float(value) for step, value in curve.items() if _number(value) is not None}


def bpb_figure(trials: list[FrozenTrial]) -> go.Figure:
    """Final val_bpb of completed trials; quick val_bpb at the prune point of pruned ones (labelled)."""
    fig = go.Figure()
    done = [(t.number, final_val_bpb(t)) for t in trials if final_val_bpb(t) is not None]
    cut = [(t.number, _number(t.user_attrs.get("pruned_val_bpb_quick"))) for t in trials
           if t.state == TrialState.PRUNED]
    cut = [(n, v) for n, v in cut if v is not None]
    fig.add_scatter(x=[n for n, _ in done], y=[v for _, v in done], mode="markers", name="completed: final val_bpb",
                    marker={"color": COLOURS["completed"], "size": 9})
    fig.add_scatter(x=[n for n, _ in cut], y=[v for _, v in cut], mode="markers",
                    name="pruned: quick val_bpb at prune point", marker={"color": COLOURS["pruned"], "size": 9,
                                                                          "symbol": "x"})
    fig.update_layout(title=f"val_bpb per trial (pruned: {QUICK_LABEL})", xaxis_title="trial",
                      yaxis_title="bits per byte (lower is better)")
    return fig


def retention_figure(trials: list[FrozenTrial], threshold: float | None) -> go.Figure:
    """Rank retention at the triage checkpoint versus final val_bpb, threshold drawn."""
    fig = go.Figure()
    groups: dict[str, list[tuple[float, float, int]]] = {}
    for trial in trials:
        retention = _number(trial.user_attrs.get("triage_retention"))
        bpb = final_val_bpb(trial)
        label = "completed"
        if bpb is None and trial.state == TrialState.PRUNED:
            bpb, label = _number(trial.user_attrs.get("pruned_val_bpb_quick")), "pruned (quick val_bpb at prune point)"
        elif trial.user_attrs.get("audit_would_prune") is True:
            label = "completed, audit would prune"
        if retention is not None and bpb is not None:
            groups.setdefault(label, []).append((retention, bpb, trial.number))
    for label, points in groups.items():
        colour = COLOURS["pruned"] if "prune" in label else COLOURS["completed"]
        fig.add_scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="markers", name=label,
                        text=[f"trial {p[2]}" for p in points],
                        marker={"color": colour, "size": 9, "symbol": "x" if label.startswith("pruned") else "circle"})
    if threshold is not None:
        fig.add_vline(x=threshold, line_dash="dash", annotation_text=f"threshold {threshold:.3g}")
    fig.update_layout(title="rank retention at the triage checkpoint vs val_bpb", xaxis_title="rank retention",
                      yaxis_title="val_bpb")
    return fig


def curves_figure(trials: list[FrozenTrial], threshold: float | None) -> go.Figure:
    """Rank retention over training seconds, one line per trial, coloured by state."""
    fig = go.Figure()
    shown: set[str] = set()
    for trial in trials:
        retention, seconds = _curve(trial, "retention"), _curve(trial, "seconds")
        steps = sorted(step for step in retention if step in seconds)
        if not steps:
            continue
        state = state_name(trial)
        fig.add_scatter(x=[seconds[s] for s in steps], y=[retention[s] for s in steps], mode="lines+markers",
                        name=state, legendgroup=state, showlegend=state not in shown,
                        line={"color": COLOURS[state], "width": 1}, text=f"trial {trial.number}")
        shown.add(state)
    if threshold is not None:
        fig.add_hline(y=threshold, line_dash="dash", annotation_text=f"threshold {threshold:.3g}")
    fig.update_layout(title="rank retention during training", xaxis_title="training seconds",
                      yaxis_title="rank retention")
    return fig


def compute_figure(trials: list[FrozenTrial]) -> go.Figure:
    """Training seconds spent per trial, and the remaining budget that pruning saved."""
    numbers = [t.number for t in trials]
    spent = [_number(t.user_attrs.get("training_seconds")) or 0.0 for t in trials]
    saved = [(_number(t.user_attrs.get("budget_seconds_saved")) or 0.0) if t.state == TrialState.PRUNED else 0.0
             for t in trials]
    fig = go.Figure()
    fig.add_bar(x=numbers, y=spent, name="training seconds spent",
                marker={"color": [COLOURS[state_name(t)] for t in trials]})
    fig.add_bar(x=numbers, y=saved, name="saved by pruning (remaining budget, estimated)",
                marker={"color": COLOURS["pruned"], "opacity": 0.3})
    fig.update_layout(barmode="stack", title="compute per trial (bar colour: state)", xaxis_title="trial",
                      yaxis_title="seconds")
    return fig


def write_html(study: optuna.Study, path: Path, *, table: str = "") -> Path:
    """Write the four figures and the terminal table as one self-contained HTML file."""
    trials = study.get_trials(deepcopy=False)
    threshold = _number(study.user_attrs.get("threshold")) if study.user_attrs.get("pruner") == "rank" else None
    figures = [bpb_figure(trials), retention_figure(trials, threshold), curves_figure(trials, threshold),
               compute_figure(trials)]
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0), default_height="480px")
             for i, fig in enumerate(figures)]
    title = html.escape(f"optuna-triage report: {study.study_name}")
    page = (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title></head>\n<body>\n"
            f"<h1>{title}</h1>\n<pre>{html.escape(table)}</pre>\n" + "\n".join(parts) + "\n</body></html>\n")
    path.write_text(page, encoding="utf-8")
    return path
