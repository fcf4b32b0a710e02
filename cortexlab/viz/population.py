"""Plotly figures for population-coded head aggregation (notebook 12): per-token head weights, losses."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
import torch

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def head_weight_heatmap(weights: torch.Tensor, tokens: Sequence[str] | None = None, *,
                        title: str = "Per-token head weights", height: int = 360) -> go.Figure:
    """Heatmap of head weights w [T, H] (heads down, tokens across); 1/H is the plain concatenation."""
    if not isinstance(weights, torch.Tensor) or weights.ndim != 2:
        raise ValueError(f"weights must be a [T, H] tensor, got {getattr(weights, 'shape', weights)!r}")
    T, H = weights.shape
    x = list(range(T)) if tokens is None else [f"{i}:{t!r}"[:24] for i, t in enumerate(tokens)]
    if len(x) != T:
        raise ValueError(f"{len(x)} tokens for {T} positions")
    fig = go.Figure(go.Heatmap(z=weights.detach().float().T.tolist(), x=x, y=[f"head {h}" for h in range(H)],
                               colorscale="Viridis", zmin=0, zmax=1, colorbar=dict(title="w"),
                               hovertemplate="%{y}<br>token %{x}<br>w = %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title, height=height, xaxis=dict(title="token", showticklabels=False),
                      yaxis=dict(autorange="reversed"))
    return fig


def grouped_bars(x: Sequence, series: Mapping[str, Sequence[float]], *, title: str, xaxis: str, yaxis: str,
                 baseline: float | None = None, baseline_name: str = "baseline", height: int = 380) -> go.Figure:
    """Grouped bars of named series over categories x, with an optional dashed baseline."""
    if not series:
        raise ValueError("series is empty")
    fig = go.Figure()
    for i, (name, ys) in enumerate(series.items()):
        fig.add_bar(x=[str(v) for v in x], y=[float(y) for y in ys], name=name, marker_color=_PALETTE[i % 6])
    if baseline is not None:
        fig.add_hline(y=baseline, line=dict(color="gray", dash="dash"), annotation_text=baseline_name)
    fig.update_layout(title=title, barmode="group", height=height, xaxis_title=xaxis, yaxis_title=yaxis)
    return fig
