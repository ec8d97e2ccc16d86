"""The pruner benchmark's outputs: a markdown table and a self-contained plotly HTML page."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

from search.audit_records import TrialRecord
from search.bench_metrics import FamilySummary, PrunerResult


def _num(value: float, fmt: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if value == math.inf:
        return "inf"
    return format(value, fmt)


def signal_table(summaries: Sequence[FamilySummary]) -> str:
    """One row per family: how well retention and loss at the checkpoint rank final val_bpb."""
    lines = [
        "| family | trials | failed | checkpoint | best val_bpb | Spearman(retention, val_bpb) "
        "| Spearman(loss, val_bpb) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summaries:
        lines.append(
            f"| {s.family} | {s.n_trials} | {s.n_failed} | {s.mark} | {_num(s.best_val_bpb, '.4f')} "
            f"| {_num(s.spearman_retention, '+.2f')} | {_num(s.spearman_loss, '+.2f')} |"
        )
    return "\n".join(lines)


def pruner_table(results: Sequence[PrunerResult]) -> str:
    """One row per (family, pruner): the counterfactual outcome."""
    lines = [
        "| family | pruner | killed | compute saved | best val_bpb | regret | top-3 killed "
        "| top-10% killed | precision | recall |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.family} | {r.pruner} | {r.n_killed}/{r.n_trials} | {r.saved:.0%} "
            f"| {_num(r.best_val_bpb, '.4f')} | {_num(r.regret, '.4f')} | {r.top3_killed}/3 "
            f"| {r.top10_killed}/{r.n_top10} | {_num(r.precision, '.2f')} | {_num(r.recall, '.2f')} |"
        )
    return "\n".join(lines)


def markdown(summaries: Sequence[FamilySummary], results: Sequence[PrunerResult], *, source: str) -> str:
    """The whole markdown report: what was replayed, the signal table, the pruner table, a legend."""
    return "\n\n".join(
        [
            f"# Counterfactual pruner benchmark\n\nRecords: `{source}`. Every trial ran to completion "
            "(audit); each pruner is replayed in trial order as if it had been active, deciding once "
            "at the checkpoint.",
            "## Does the checkpoint signal rank final val_bpb?\n\n" + signal_table(summaries)
            + "\n\nNegative Spearman(retention) = trials that lost rank ended worse (what the rank "
            "pruner bets on); positive Spearman(loss) = high early loss ended worse.",
            "## Pruners\n\n" + pruner_table(results),
            "compute saved: share of all training seconds the kills would have saved (a killed trial "
            "still costs its seconds up to the checkpoint). regret: best surviving val_bpb minus the "
            "best with no pruning. precision: kills that truly ended in the worst half (val_bpb above "
            "the median); recall: share of the worst half killed. Failed (diverged) trials rank worst. "
            "rank<t: RankCollapsePruner(t); median-loss: MedianPruner on the train loss through "
            "SignalPruner (5 startup trials); loss>pXX: kill when the checkpoint loss is above the "
            "XXth percentile of all earlier trials' checkpoint losses; rank<t or median-loss: either.",
        ]
    ) + "\n"


def write_html(
    path: Path, summaries: Sequence[FamilySummary], results: Sequence[PrunerResult],
    records: Sequence[TrialRecord], *, source: str,
) -> Path:
    """Compute saved vs regret per pruner, and retention/loss at the checkpoint vs final val_bpb.

    Self-contained: plotly.js is embedded, so the page opens offline.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    tradeoff = go.Figure()
    for family in dict.fromkeys(r.family for r in results):
        rows = [r for r in results if r.family == family and math.isfinite(r.regret)]
        groups = {
            "rank": [r for r in rows if r.spec.kind == "rank"],
            "rank or median-loss": [r for r in rows if r.spec.kind == "rank_or_loss"],
            "loss": [r for r in rows if r.spec.kind in ("median_loss", "loss_percentile", "none")],
        }
        for group, members in groups.items():
            if not members:
                continue
            tradeoff.add_trace(go.Scatter(
                x=[100 * r.saved for r in members], y=[r.regret for r in members],
                mode="lines+markers+text" if group == "rank" else "markers+text",
                text=[r.pruner.replace(" or median-loss", " or loss") for r in members],
                textposition="top center", name=f"{family}: {group}",
                hovertext=[
                    f"{r.pruner}: killed {r.n_killed}/{r.n_trials}, top-3 killed {r.top3_killed}, "
                    f"precision {_num(r.precision, '.2f')}, recall {_num(r.recall, '.2f')}"
                    for r in members
                ],
                hoverinfo="text+x+y",
            ))
    tradeoff.update_layout(
        title="Compute saved vs regret (best val_bpb lost) per pruner",
        xaxis_title="compute saved (% of training seconds)", yaxis_title="regret (val_bpb)",
        height=600,
    )
    scatter = make_subplots(rows=1, cols=2,
                            subplot_titles=("retention at the checkpoint", "train loss at the checkpoint"))
    for s in summaries:
        rows = [r for r in records if r.matrix_optimizer == s.family and r.replayable(s.mark)
                and r.val_bpb is not None]
        for col, curve in ((1, "curve_retention"), (2, "curve_train_loss")):
            scatter.add_trace(go.Scatter(
                x=[r.at(curve, s.mark) for r in rows], y=[r.val_bpb for r in rows], mode="markers",
                name=s.family, legendgroup=s.family, showlegend=col == 1,
                hovertext=[f"trial {r.number}" for r in rows], hoverinfo="text+x+y",
            ), row=1, col=col)
    scatter.update_yaxes(title_text="final val_bpb", row=1, col=1)
    scatter.update_layout(title="Checkpoint signal vs final val_bpb (finished trials)", height=500)
    body = (
        f"<h1>Counterfactual pruner benchmark</h1><p>Records: {html.escape(source)}</p>"
        + tradeoff.to_html(full_html=False, include_plotlyjs=True)
        + scatter.to_html(full_html=False, include_plotlyjs=False)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>pruner benchmark</title>"
                    f"</head><body>{body}</body></html>", encoding="utf-8")
    return path
