"""Plotly figures for NeuroLlama's training results: the mechanism ablation and the early-exit trade-off.

Builders take what `cortexlab.train.lm` writes to `results/` and `cortexlab.eval.early_exit` returns.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go


def ablation_figure(table: Mapping[str, Mapping], *, title: str | None = None) -> go.Figure:
    """Held-out loss change vs the same-seed baseline, one bar per variant (mean) and a dot per seed.

    `table`: `train_lm_ablation(...)["table"]` (variant -> {"heldout_loss": {seed: loss}, ...}); lower is better.
    """
    base = table["baseline"]["heldout_loss"]
    names = [n for n in table if n != "baseline"]
    names.sort(key=lambda n: table[n]["mean_delta_vs_baseline"])
    fig = go.Figure(go.Bar(x=names, y=[table[n]["mean_delta_vs_baseline"] for n in names], name="mean over seeds",
                           marker_color=["seagreen" if table[n]["mean_delta_vs_baseline"] < 0 else "indianred"
                                         for n in names]))
    for seed in base:
        fig.add_trace(go.Scatter(x=names, y=[table[n]["heldout_loss"][seed] - base[seed] for n in names],
                                 mode="markers", name=f"seed {seed}", marker={"color": "black", "size": 6}))
    fig.add_hline(y=0, line_color="gray")
    fig.update_layout(title=title or "held-out loss vs the baseline (nats/token; below 0 = the mechanism helps)",
                      yaxis_title="Δ held-out loss vs baseline", xaxis_title="mechanism on (all others off)")
    return fig


def training_curves_figure(runs: Mapping[str, Mapping], *, seed: str = "0", title: str | None = None) -> go.Figure:
    """Held-out loss at each evaluation step, one line per variant (`runs[variant][seed]["evals"]`)."""
    fig = go.Figure()
    for name, by_seed in runs.items():
        evals = by_seed[seed]["evals"]
        fig.add_trace(go.Scatter(x=[e["step"] for e in evals], y=[e["heldout_loss"] for e in evals],
                                 mode="lines+markers", name=name,
                                 line={"width": 3 if name == "baseline" else 1.5}))
    fig.update_layout(title=title or f"held-out loss during training (seed {seed})", xaxis_title="step",
                      yaxis_title="held-out loss (nats/token)")
    return fig


def exit_tradeoff_figure(tradeoffs: Mapping[str, Mapping], *, title: str | None = None) -> go.Figure:
    """Loss increase vs fraction of the layer stack computed, one line per model, thresholds as labels.

    `tradeoffs`: {name: `exit_tradeoff(...)` result}.
    """
    fig = go.Figure()
    for name, result in tradeoffs.items():
        rows: Sequence[Mapping] = result["by_threshold"]
        fig.add_trace(go.Scatter(x=[r["layers_fraction"] for r in rows], y=[r["loss_increase"] for r in rows],
                                 mode="lines+markers+text", name=name, text=[f"τ={r['threshold']:g}" for r in rows],
                                 textposition="top center"))
    fig.update_layout(title=title or "early exit: compute kept vs loss paid (per-token exits)",
                      xaxis_title="fraction of layers computed (1 = full model)",
                      yaxis_title="held-out loss increase (nats/token)")
    return fig


def exit_share_figure(result: Mapping, *, title: str | None = None) -> go.Figure:
    """Where tokens leave, per threshold: stacked shares of each exit layer (and the full stack)."""
    rows = result["by_threshold"]
    layers = list(rows[0]["exit_share"])
    fig = go.Figure([go.Bar(x=[f"τ={r['threshold']:g}" for r in rows], y=[r["exit_share"][layer] for r in rows],
                            name=f"layer {layer}" + (" (full)" if int(layer) == result["num_layers"] else ""))
                     for layer in layers])
    fig.update_layout(barmode="stack", yaxis_title="share of tokens", yaxis_range=[0, 1],
                      title=title or "where tokens exit")
    return fig


def threshold_trace_figure(history: Sequence[float], error_rates: Sequence[float], *, target: float,
                           title: str | None = None) -> go.Figure:
    """The adaptive threshold over feedback steps beside the exits' error rate (and its target)."""
    fig = go.Figure([go.Scatter(y=list(history), mode="lines", name="threshold τ"),
                     go.Scatter(y=list(error_rates), mode="lines", name="error rate of exits", yaxis="y2")])
    fig.add_shape(type="line", xref="paper", x0=0, x1=1, yref="y2", y0=target, y1=target, line_dash="dot")
    fig.update_layout(title=title or "AdaptiveComputationController: τ follows the exits' errors",
                      xaxis_title="feedback step", yaxis={"title": "τ"},
                      yaxis2={"title": "error rate", "overlaying": "y", "side": "right", "range": [0, 1]})
    return fig
