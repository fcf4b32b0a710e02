"""Plotly figures for the inference-time hooks (notebook 15 and the habituation dashboard).

Builders take what `python -m cortexlab.eval.hook_effects` writes to `results/inference_hooks.json`
(its "repetition" and "heldout_loss" parts) and return `go.Figure`; they compute nothing beyond reshaping.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from .labels import token_labels


def repetition_figure(repetition: Mapping, *, title: str | None = None) -> go.Figure:
    """Repeated-n-gram rate and distinct-n against the habituation rate, guard perplexity on the right axis.

    `repetition`: the "repetition" part of the results (its "settings" rows, the baseline at rate 0).
    """
    rows = sorted(repetition["settings"], key=lambda r: r["habituation_rate"])
    if not rows:
        raise ValueError("repetition has no settings")
    x = [r["habituation_rate"] for r in rows]
    labels = [str(v) if v else "0 (off)" for v in x]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    metrics = [k for k in rows[0]["mean"] if k == "repeated_ngram_rate" or k.startswith("distinct_")]
    for name in metrics:
        fig.add_trace(go.Scatter(x=labels, y=[r["mean"][name] for r in rows], mode="lines+markers",
                                 name=name.replace("_", " ")), secondary_y=False)
    fig.add_trace(go.Scatter(x=labels, y=[r["guard_perplexity"] for r in rows], mode="lines+markers",
                             name="guard perplexity (unhooked model)", line={"dash": "dash", "color": "gray"}),
                  secondary_y=True)
    fig.update_layout(title=title or "habituation vs degenerate repetition in greedy decoding",
                      xaxis_title="habituation rate r_h", legend={"orientation": "h", "y": -0.25})
    fig.update_yaxes(title_text="rate (mean over prompts)", range=[0, 1], secondary_y=False)
    fig.update_yaxes(title_text="perplexity of the generated text", secondary_y=True)
    return fig


def loss_effects_figure(loss: Mapping, *, title: str | None = None) -> go.Figure:
    """Held-out loss change vs the unhooked model (mean and standard error over paired windows), per setting.

    `loss`: the "heldout_loss" part of the results (its "settings" rows, each with "hook", "param", "value" and
    "diff_vs_baseline" = {"mean", "se"}). Below zero: the hook lowers the loss of real text.
    """
    rows = loss["settings"]
    if not rows:
        raise ValueError("loss has no settings")
    fig = go.Figure()
    for hook in dict.fromkeys(r["hook"] for r in rows):
        mine = [r for r in rows if r["hook"] == hook]
        fig.add_trace(go.Bar(x=[f"{hook}<br>{r['param']}={r['value']:g}" for r in mine],
                             y=[r["diff_vs_baseline"]["mean"] for r in mine], name=hook,
                             error_y={"type": "data", "array": [r["diff_vs_baseline"]["se"] for r in mine]}))
    fig.add_hline(y=0, line_color="gray")
    base = loss["baseline"]["mean_nats"]
    fig.update_layout(title=title or f"held-out next-token loss vs the unhooked model ({base:.3f} nats/token)",
                      yaxis_title="Δ loss (nats/token), mean ± s.e.", xaxis_title="hook and setting",
                      showlegend=False)
    return fig


def habituation_growth_figure(snapshots: Sequence[tuple[int, torch.Tensor]], tokens: Sequence[str] | None = None, *,
                              title: str = "the habituation map forming as the text is read",
                              height: int = 380) -> go.Figure:
    """One heatmap per snapshot (heads down, keys across; keys not read yet blank) and a slider over them.

    `snapshots`: `cortexlab.eval.hook_maps.habituation_over_time(...)`, [(tokens read, map [H, t])].
    """
    if not snapshots:
        raise ValueError("snapshots is empty")
    total, heads = snapshots[-1][0], snapshots[-1][1].shape[0]
    x = token_labels(tokens, total)
    zmax = max(float(m.max()) for _, m in snapshots) or 1.0
    fig = go.Figure()
    for i, (seen, hmap) in enumerate(snapshots):
        z = [row + [None] * (total - seen) for row in hmap.detach().float().tolist()]
        fig.add_trace(go.Heatmap(z=z, x=x, y=[f"head {h}" for h in range(heads)], zmin=0, zmax=zmax,
                                 colorscale="Viridis", visible=i == len(snapshots) - 1, colorbar={"title": "h"},
                                 hovertemplate="%{y}<br>key %{x}<br>h = %{z:.3f}<extra></extra>"))
    steps = [{"method": "update", "label": str(seen),
              "args": [{"visible": [j == i for j in range(len(snapshots))]}]} for i, (seen, _) in enumerate(snapshots)]
    fig.update_layout(title=title, height=height, xaxis={"title": "key token", "showticklabels": False},
                      yaxis={"autorange": "reversed"},
                      sliders=[{"active": len(snapshots) - 1, "steps": steps,
                                "currentvalue": {"prefix": "tokens read: "}}])
    return fig
