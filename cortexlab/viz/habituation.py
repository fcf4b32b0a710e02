"""Plotly figures for habituation (notebook 11, and the habituation dashboard of issue 6).

Builders take tensors / rows from `cortexlab.eval.habituation` and return `go.Figure`; they compute
nothing beyond reshaping.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from .labels import token_labels

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def habituation_map_figure(hmap: torch.Tensor, tokens: Sequence[str] | None = None, *,
                           title: str = "Habituation map", zmax: float | None = None, height: int = 360) -> go.Figure:
    """Heatmap of a suppression map [H, T] (heads down, key tokens across), h in [0, h_max]."""
    if not isinstance(hmap, torch.Tensor) or hmap.ndim != 2:
        raise ValueError(f"hmap must be a [H, T] tensor, got {getattr(hmap, 'shape', hmap)!r}")
    H, T = hmap.shape
    fig = go.Figure(go.Heatmap(z=hmap.detach().float().tolist(), x=token_labels(tokens, T),
                               y=[f"head {h}" for h in range(H)], colorscale="Viridis", zmin=0,
                               zmax=zmax, colorbar=dict(title="h"),
                               hovertemplate="%{y}<br>key %{x}<br>h = %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title, height=height, xaxis=dict(title="key token", showticklabels=False),
                      yaxis=dict(autorange="reversed"))
    return fig


def lines_figure(x: Sequence, series: Mapping[str, Sequence[float]], *, title: str, xaxis: str, yaxis: str,
                 dashed: Sequence[str] = (), height: int = 380) -> go.Figure:
    """Named lines against x; names in `dashed` are drawn dashed (baselines)."""
    if not series:
        raise ValueError("series is empty")
    fig = go.Figure()
    for i, (name, ys) in enumerate(series.items()):
        fig.add_scatter(x=list(x), y=[float(y) for y in ys], mode="lines+markers", name=name,
                        line=dict(color=_PALETTE[i % 6], dash="dash" if name in dashed else None))
    fig.update_layout(title=title, height=height, xaxis_title=xaxis, yaxis_title=yaxis)
    return fig


def token_bars(values: torch.Tensor, tokens: Sequence[str], *, title: str, yaxis: str,
               highlight: Sequence[int] = (), height: int = 340) -> go.Figure:
    """One bar per token (e.g. the novelty boost); `highlight` positions in red."""
    vals = [float(v) for v in values]
    colors = ["#d62728" if i in set(highlight) else "#1f77b4" for i in range(len(vals))]
    fig = go.Figure(go.Bar(x=token_labels(tokens, len(vals)), y=vals, marker_color=colors))
    fig.update_layout(title=title, height=height, yaxis_title=yaxis, xaxis=dict(tickangle=-60))
    return fig


def layer_decay_figure(rows: Sequence[Mapping], *, title: str = "AttentionDecay across layers",
                       height: int = 400) -> go.Figure:
    """Per layer, the attention-sink mass and the mean entropy, plain (dashed) and decayed (solid)."""
    if not rows:
        raise ValueError("rows is empty: pass the output of decay_across_layers")
    layers = [r["layer"] for r in rows]
    fig = go.Figure()
    for key, name, color, axis in (("sink", "mass on token 0", "#d62728", "y"),
                                   ("entropy", "entropy (nats)", "#1f77b4", "y2")):
        fig.add_scatter(x=layers, y=[r[f"{key}_plain"] for r in rows], name=f"{name}, plain", yaxis=axis,
                        line=dict(color=color, dash="dash"))
        fig.add_scatter(x=layers, y=[r[f"{key}_decayed"] for r in rows], name=f"{name}, with decay", yaxis=axis,
                        line=dict(color=color))
    fig.update_layout(title=title, height=height, xaxis_title="layer", yaxis=dict(title="mass on token 0"),
                      yaxis2=dict(title="mean entropy (nats)", overlaying="y", side="right"))
    return fig


def attention_before_after_figure(before: torch.Tensor, after: torch.Tensor, tokens: Sequence[str] | None = None, *,
                                  title: str = "Attention before and after habituation",
                                  height: int = 420) -> go.Figure:
    """Two heatmaps side by side of one head's attention [T queries, T keys]: the model's, then habituated."""
    if not all(isinstance(a, torch.Tensor) and a.ndim == 2 for a in (before, after)) or before.shape != after.shape:
        raise ValueError(f"before and after must be [T, T] tensors of one shape, got "
                         f"{getattr(before, 'shape', before)!r} and {getattr(after, 'shape', after)!r}")
    labels = token_labels(tokens, before.shape[-1])
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=("before (the model)", "after habituation"))
    for col, probs in enumerate((before, after), start=1):
        fig.add_trace(go.Heatmap(z=probs.detach().float().tolist(), x=labels, y=labels, colorscale="Blues", zmin=0,
                                 zmax=1, showscale=col == 2, colorbar=dict(title="p"),
                                 hovertemplate="query %{y}<br>key %{x}<br>p = %{z:.3f}<extra></extra>"),
                      row=1, col=col)
    fig.update_xaxes(title="key token", showticklabels=False)
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_yaxes(title="query token", row=1, col=1)
    fig.update_layout(title=title, height=height)
    return fig
