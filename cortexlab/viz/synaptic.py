"""Plotly figures for notebook 07 (synaptic modulation); builders only reshape what `cortexlab.eval.synaptic`
returns."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots


def entropy_alpha_figure(alphas: Sequence[float], entropy, *, ceiling: float | None = None,
                         title: str | None = None) -> go.Figure:
    """Attention entropy per head (one line each) against the scaling alpha (log x axis); entropy [A, H]."""
    fig = go.Figure()
    for h in range(entropy.shape[1]):
        fig.add_trace(go.Scatter(x=list(alphas), y=entropy[:, h].tolist(), mode="lines+markers", name=f"head {h}"))
    fig.add_vline(x=1.0, line_dash="dot", annotation_text="alpha = 1 (the model)")
    if ceiling is not None:
        fig.add_hline(y=ceiling, line_dash="dash", annotation_text="uniform attention")
    fig.update_layout(xaxis_type="log", xaxis_title="synaptic scaling alpha (inverse temperature)",
                      yaxis_title="mean attention entropy (nats)", title=title or "attention entropy vs alpha")
    return fig


def attention_map_figure(probs, tokens: Sequence[str] | None = None, *, title: str | None = None) -> go.Figure:
    """One head's attention [T, T] as a heatmap (queries down, keys across)."""
    labels = [f"{i}:{t!r}" for i, t in enumerate(tokens)] if tokens is not None else None
    fig = go.Figure(go.Heatmap(z=probs.tolist(), x=labels, y=labels, colorscale="Viridis", zmin=0))
    fig.update_layout(title=title or "attention", yaxis_autorange="reversed", height=450, width=500,
                      xaxis_showticklabels=False, yaxis_showticklabels=False)
    return fig


def gate_figure(ablation_losses, baseline: float, output_share, *, title: str | None = None) -> go.Figure:
    """Left: LM loss with one head's gate closed (g_h = 0) against the open-gate baseline; right: the share of the
    attention output each head's gate scales."""
    heads = [f"head {h}" for h in range(len(ablation_losses))]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("LM loss with gate h closed", "head's share of the output"))
    fig.add_trace(go.Bar(x=heads, y=[v - baseline for v in ablation_losses.tolist()], name="loss - baseline"),
                  row=1, col=1)
    fig.add_trace(go.Bar(x=heads, y=output_share.tolist(), name="||W_o,h o_h|| / ||W_o o||"), row=1, col=2)
    fig.update_yaxes(title_text="loss increase (nats)", row=1, col=1)
    fig.update_yaxes(title_text="fraction of the output norm", row=1, col=2)
    fig.update_layout(showlegend=False, title=title or f"what a closed gate does (baseline loss {baseline:.4f})")
    return fig


def memory_figure(rows: Sequence[Mapping], *, title: str | None = None) -> go.Figure:
    """Peak bytes of the banded strengths vs the dense T x T form, against T (log-log); rows with keys
    "T", "band_bytes", "dense_bytes"."""
    fig = go.Figure()
    for key, name in (("band_bytes", "banded (module)"), ("dense_bytes", "dense T x T")):
        fig.add_trace(go.Scatter(x=[r["T"] for r in rows], y=[r[key] / 2**20 for r in rows],
                                 mode="lines+markers", name=name))
    fig.update_layout(xaxis_type="log", yaxis_type="log", xaxis_title="tokens T", yaxis_title="peak MiB",
                      title=title or "memory of the synaptic matrix: band vs dense")
    return fig
