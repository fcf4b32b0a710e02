"""Plotly figures for notebook 09 (predictive coding); builders only reshape what `cortexlab.eval.predictive`
returns."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go


def training_figure(losses: Sequence[float], baselines: Mapping[str, float] | None = None, *,
                    heldout: Sequence[float] | None = None, ylabel: str = "mean surprise",
                    title: str | None = None) -> go.Figure:
    """A training curve, optionally the held-out curve beside it, with horizontal baselines ({name: value})."""
    fig = go.Figure(go.Scatter(y=list(losses), mode="lines", name="training loss"))
    if heldout is not None:
        fig.add_trace(go.Scatter(y=list(heldout), mode="lines", name="held-out loss"))
    for name, value in (baselines or {}).items():
        fig.add_hline(y=value, line_dash="dot", annotation_text=f"{name}: {value:.3f}")
    fig.update_layout(xaxis_title="step", yaxis_title=ylabel, title=title or "training")
    return fig


def surprise_figure(series: Mapping[str, Sequence[float]], tokens: Sequence[str] | None = None,
                    span: tuple[int, int] | None = None, *, title: str | None = None) -> go.Figure:
    """Per-token signals along a text, each normalised by its own median ({name: [T]}); the inserted span
    shaded; hover shows the token."""
    fig = go.Figure()
    for name, values in series.items():
        values = [float(v) for v in values]
        finite = sorted(v for v in values if v == v)
        median = finite[len(finite) // 2] or 1.0
        fig.add_trace(go.Scatter(y=[v / median for v in values], mode="lines", name=name,
                                 text=list(tokens) if tokens is not None else None,
                                 hovertemplate="%{text}: %{y:.2f}<extra></extra>" if tokens is not None else None))
    if span is not None:
        fig.add_vrect(x0=span[0] - 0.5, x1=span[1] - 0.5, fillcolor="orange", opacity=0.25, line_width=0,
                      annotation_text="inserted sentence")
    fig.update_layout(xaxis_title="token", yaxis_title="signal / its median over the text",
                      title=title or "surprise along the text")
    return fig


def cpc_figure(rows: Sequence[Mapping], chance: float, *, title: str | None = None) -> go.Figure:
    """Held-out InfoNCE per (layer, horizon): trained vs untrained W_k, against chance ln(1 + N).
    rows: {"label", "trained", "untrained"}."""
    labels = [r["label"] for r in rows]
    fig = go.Figure([go.Bar(x=labels, y=[r["untrained"] for r in rows], name="untrained W_k"),
                     go.Bar(x=labels, y=[r["trained"] for r in rows], name="trained W_k")])
    fig.add_hline(y=chance, line_dash="dot", annotation_text=f"chance ln(1+N) = {chance:.3f}")
    fig.update_layout(barmode="group", yaxis_title="held-out InfoNCE (nats)",
                      title=title or "contrastive predictive coding on hidden states")
    return fig
