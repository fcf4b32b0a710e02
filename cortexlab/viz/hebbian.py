"""Plotly figures for Hebbian attention (notebook 10): bias maps, per-head attention shifts, the growth of H.

Builders take tensors / plain numbers from `cortexlab.eval.hebbian` and return `go.Figure`; they compute
nothing beyond reshaping.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
import torch

from .labels import token_labels

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def bias_heatmap(bias: torch.Tensor, tokens: Sequence[str] | None = None, *, title: str = "Hebbian bias",
                 spans: Sequence[tuple[int, int]] = (), height: int = 560) -> go.Figure:
    """Heatmap of a [Tq, Tk] bias (queries down, keys across); the causal upper triangle is left blank.

    `spans` ([start, end) token ranges, e.g. the two copies of a repeated line) are outlined.
    """
    if not isinstance(bias, torch.Tensor) or bias.ndim != 2 or bias.shape[0] != bias.shape[1]:
        raise ValueError(f"bias must be a square [T, T] tensor, got {getattr(bias, 'shape', bias)!r}")
    T = bias.shape[0]
    z = bias.detach().float()
    lim = float(z.tril().abs().max()) or 1.0
    # None (not NaN) for the blank triangle: NaN is not valid JSON and can stall a Jupyter kernel's output.
    rows = [[v if j <= i else None for j, v in enumerate(row)] for i, row in enumerate(z.tolist())]
    labels = token_labels(tokens, T)
    fig = go.Figure(go.Heatmap(z=rows, x=labels, y=labels, colorscale="RdBu", zmid=0, zmin=-lim, zmax=lim,
                               colorbar=dict(title="bias"),
                               hovertemplate="query %{y}<br>key %{x}<br>bias %{z:.3f}<extra></extra>"))
    for s0, s1 in spans:
        fig.add_shape(type="rect", x0=s0 - 0.5, x1=s1 - 0.5, y0=-0.5, y1=T - 0.5, line=dict(color="black", dash="dot"))
    fig.update_layout(title=title, height=height, xaxis=dict(title="key", showticklabels=False),
                      yaxis=dict(title="query", autorange="reversed", showticklabels=False))
    return fig


def head_bars(values: Mapping[str, Sequence[float]], *, title: str, yaxis: str, height: int = 380) -> go.Figure:
    """Grouped bars, one group per head, one bar per named series (e.g. plain vs Hebbian)."""
    if not values:
        raise ValueError("values is empty")
    fig = go.Figure()
    for i, (name, vals) in enumerate(values.items()):
        vals = [float(v) for v in vals]
        fig.add_bar(x=[f"head {h}" for h in range(len(vals))], y=vals, name=name, marker_color=_PALETTE[i % 6])
    fig.update_layout(title=title, barmode="group", height=height, yaxis_title=yaxis)
    return fig


def sweep_figure(x: Sequence[float], series: Mapping[str, Sequence[float]], *, title: str, xaxis: str, yaxis: str,
                 log_x: bool = True, baseline: float | None = None, height: int = 380) -> go.Figure:
    """Lines of named series against a swept setting (e.g. eta); an optional dashed baseline."""
    if not series:
        raise ValueError("series is empty")
    fig = go.Figure()
    for i, (name, ys) in enumerate(series.items()):
        fig.add_scatter(x=list(x), y=[float(y) for y in ys], mode="lines+markers", name=name,
                        line=dict(color=_PALETTE[i % 6]))
    if baseline is not None:
        fig.add_hline(y=baseline, line=dict(color="gray", dash="dash"), annotation_text="plain attention")
    fig.update_layout(title=title, height=height, xaxis=dict(title=xaxis, type="log" if log_x else "linear"),
                      yaxis_title=yaxis)
    return fig


def norm_trace_figure(traces: Mapping[str, torch.Tensor], *, clip: float | None = None,
                      tokens: Sequence[str] | None = None, title: str = "||H||_F while reading",
                      height: int = 400) -> go.Figure:
    """Per-head ||H||_F over the sequence: for each named trace [T, H], the mean over heads (solid) and the
    largest head (dotted); `clip` draws the max_hebbian_norm line.
    """
    if not traces:
        raise ValueError("traces is empty")
    fig = go.Figure()
    for i, (name, tr) in enumerate(traces.items()):
        if tr.ndim != 2:
            raise ValueError(f"trace {name!r} must be [T, H], got {tuple(tr.shape)}")
        x = list(range(1, tr.shape[0] + 1))
        text = None if tokens is None else [repr(t) for t in tokens[:tr.shape[0]]]
        color = _PALETTE[i % 6]
        fig.add_scatter(x=x, y=tr.mean(1).tolist(), name=f"{name}: mean of heads", line=dict(color=color),
                        text=text, hovertemplate="token %{x} %{text}<br>%{y:.2f}<extra></extra>")
        fig.add_scatter(x=x, y=tr.max(1).values.tolist(), name=f"{name}: largest head",
                        line=dict(color=color, dash="dot"))
    if clip is not None:
        fig.add_hline(y=clip, line=dict(color="gray", dash="dash"), annotation_text="max_hebbian_norm")
    fig.update_layout(title=title, height=height, xaxis_title="tokens read", yaxis_title="||H||_F per head")
    return fig
