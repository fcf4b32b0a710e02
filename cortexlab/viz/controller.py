"""Plotly figures for the metacognitive controller: signals along a text, layer sweeps, ablations.

Builders take what `cortexlab.eval.controller` (and the training results) return and only
reshape it into figures.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

SIGNAL_TITLES = {
    "surprise": "surprise ||v - a S^T k|| / ||v||",
    "entropy": "entropy (logit lens, / log V)",
    "beta": "write strength beta",
    "decay": "forget gate a",
    "beta_slow": "consolidation beta_slow",
    "mix": "memory vs window mix",
}


def signals_figure(trace: Mapping, spans: Sequence[tuple[int, int]], *,
                   signals: Sequence[str] = ("surprise", "entropy", "beta", "decay"),
                   title: str | None = None, height: int = 160) -> go.Figure:
    """One row per signal along the tokens; the inserted events are shaded."""
    fig = make_subplots(rows=len(signals), cols=1, shared_xaxes=True, vertical_spacing=0.03,
                        subplot_titles=[SIGNAL_TITLES.get(s, s) for s in signals])
    for row, name in enumerate(signals, start=1):
        values = trace[name].tolist()
        fig.add_trace(go.Scatter(y=values, mode="lines", name=name, line={"width": 1}), row=row, col=1)
        for start, end in spans:
            fig.add_vrect(x0=start, x1=end, fillcolor="orange", opacity=0.25, line_width=0, row=row, col=1)
    fig.update_layout(height=height * len(signals), showlegend=False,
                      title=title or "controller signals along the text (events shaded)")
    fig.update_xaxes(title_text="token", row=len(signals), col=1)
    return fig


def layer_sweep_figure(rows: Sequence[Mapping], *, title: str | None = None) -> go.Figure:
    """Event / rest ratio of surprise and entropy per layer (1 = no contrast)."""
    layers = [r["layer"] for r in rows]
    fig = go.Figure()
    for signal in ("surprise", "entropy"):
        fig.add_trace(go.Bar(x=[str(layer) for layer in layers], y=[r[f"{signal}_ratio"] for r in rows],
                             name=signal))
    fig.add_hline(y=1.0, line_dash="dot", annotation_text="no contrast")
    fig.update_layout(barmode="group", xaxis_title="decoder layer of the sidecar",
                      yaxis_title="mean on events / mean elsewhere",
                      title=title or "do the signals single out the inserted events?")
    return fig


def accuracy_by_distance_figure(curves: Mapping[str, Mapping], *, title: str | None = None,
                                chance: float | None = None) -> go.Figure:
    """Exact-match accuracy vs distance in calls, one line per variant ({name: {distance: acc}})."""
    fig = go.Figure()
    for name, by_distance in curves.items():
        distances = sorted(by_distance, key=float)
        fig.add_trace(go.Scatter(x=[float(d) for d in distances], y=[by_distance[d] for d in distances],
                                 mode="lines+markers", name=name))
    if chance is not None:
        fig.add_hline(y=chance, line_dash="dot", annotation_text="chance")
    fig.update_layout(xaxis_type="log", xaxis_title="distance (calls between fact and question)",
                      yaxis_title="exact match", yaxis_range=[-0.02, 1.02],
                      title=title or "recall across calls")
    return fig


def conflicts_figure(runs: Sequence[Mapping], *, chance: float | None = None, title: str | None = None) -> go.Figure:
    """Held-out accuracy on conflicted and clean queries per variant of the conflicts ablation
    (`cortexlab.train.conflicts`): one bar per variant and query kind at the mean over seeds, every seed a dot."""
    rows = {}
    for run in runs:
        rows.setdefault(run["variant"], []).append(run["accuracy"])
        if "neutralised" in run:
            rows.setdefault(f"{run['variant']}, neutralised at test", []).append(run["neutralised"]["accuracy"])
    fig = go.Figure()
    for kind, colour in (("conflicted", "#d62728"), ("clean", "#1f77b4")):
        names = list(rows)
        fig.add_trace(go.Bar(x=names, y=[sum(a[kind] for a in rows[n]) / len(rows[n]) for n in names],
                             name=f"{kind} queries (mean)", marker_color=colour, opacity=0.6,
                             offsetgroup=kind))
        fig.add_trace(go.Scatter(x=[n for n in names for _ in rows[n]], y=[a[kind] for n in names for a in rows[n]],
                                 mode="markers", name=f"{kind}, each seed", marker={"color": colour, "size": 7},
                                 offsetgroup=kind, showlegend=True))
    if chance is not None:
        fig.add_hline(y=chance, line_dash="dot", annotation_text="chance")
    fig.update_layout(barmode="group", scattermode="group", yaxis_range=[0, 1.02], yaxis_title="held-out accuracy",
                      title=title or "keep the first binding: accuracy by variant")
    return fig


def recall_conflicts_figure(readings: Mapping[str, Mapping], *, title: str | None = None) -> go.Figure:
    """Exact match on held-out conflict episodes (`cortexlab.train.recall_conflicts`), one group of bars per
    reading ({name: {"conflict": {N: {"first", "second"}}}}): the first key (the answer) solid, the conflicting
    second key faded, per number of calls N."""
    fig = go.Figure()
    calls = sorted({n for r in readings.values() for n in r["conflict"]}, key=int)
    for n, colour in zip(calls, ("#2ca02c", "#9467bd", "#8c564b", "#e377c2")):
        names = list(readings)
        for key, opacity in (("first", 1.0), ("second", 0.35)):
            fig.add_trace(go.Bar(x=names, y=[readings[name]["conflict"][n][key] for name in names],
                                 name=f"{key} key, {n} calls", marker_color=colour, opacity=opacity))
    fig.update_layout(barmode="group", yaxis_range=[0, 1.02], yaxis_title="exact match (held-out)",
                      title=title or "a second key in call 2: which key does the model answer?")
    return fig
