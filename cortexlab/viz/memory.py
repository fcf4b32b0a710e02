"""Plotly figures for fast-weight memory: recall capacity, recency and forget-gate decay.

Every builder takes the plain rows produced by `cortexlab.eval.capacity` and returns a
`plotly.graph_objects.Figure`; nothing here computes anything beyond reshaping rows.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

RULE_COLORS = {
    "linear_attention": "#d62728",
    "delta": "#1f77b4",
    "gated_delta": "#2ca02c",
    "chance": "#7f7f7f",
}
_PALETTE = ("#d62728", "#2ca02c", "#1f77b4", "#9467bd", "#ff7f0e", "#8c564b")
_METRIC_TITLES = {
    "accuracy": "recall accuracy",
    "readout_error": "readout error ||o - v|| / ||v||",
    "retained": "retained coefficient <o, v0>",
    "cosine": "cos(o, v0)",
}


def _panel_key(row: Mapping) -> tuple:
    return (row.get("keys", "random"), row.get("key_overlap", 0.0))


def _panel_title(key: tuple) -> str:
    keys, overlap = key
    title = "orthogonal keys" if keys == "orthogonal" else "random unit keys"
    return f"{title}, overlap {overlap:g}" if overlap else title


def capacity_figure(rows: Sequence[Mapping], *, metric: str = "accuracy", title: str | None = None,
                    height: int = 420) -> go.Figure:
    """Recall `metric` vs number of stored pairs n, one line per write rule.

    rows: from `capacity_curve` (several calls may be concatenated: one panel per distinct
    (keys, key_overlap)). Error bars are the std over seeds; the chance row is drawn as a
    dashed baseline (accuracy only) and a dotted vertical line marks n = d_k.
    """
    if not rows:
        raise ValueError("rows is empty: pass the output of capacity_curve")
    if metric not in ("accuracy", "readout_error"):
        raise ValueError(f"metric must be 'accuracy' or 'readout_error', got {metric!r}")
    panels = list(dict.fromkeys(_panel_key(r) for r in rows))
    fig = make_subplots(rows=1, cols=len(panels), shared_yaxes=True,
                        subplot_titles=[_panel_title(p) for p in panels])
    for col, panel in enumerate(panels, start=1):
        prow = [r for r in rows if _panel_key(r) == panel]
        for rule in dict.fromkeys(r["rule"] for r in prow):
            rr = sorted((r for r in prow if r["rule"] == rule), key=lambda r: r["n"])
            if rule == "chance" and metric != "accuracy":
                continue
            label = rr[0].get("label", rule)
            if rule == "gated_delta" and rr[0].get("a") is not None:
                label = f"{label} (a={rr[0]['a']:g})"
            is_chance = rule == "chance"
            error = None
            if metric == "accuracy" and not is_chance:
                error = dict(type="data", array=[r["accuracy_std"] for r in rr], visible=True, thickness=1)
            fig.add_trace(go.Scatter(
                x=[r["n"] for r in rr], y=[r[metric] for r in rr], name=label, legendgroup=rule,
                showlegend=col == 1, mode="lines" if is_chance else "lines+markers", error_y=error,
                line=dict(color=RULE_COLORS.get(rule), dash="dash" if is_chance else "solid"),
            ), row=1, col=col)
        d_k = prow[0].get("d_k")
        if d_k:
            fig.add_vline(x=d_k, line=dict(color="black", dash="dot", width=1), row=1, col=col,
                          annotation_text="n = d_k", annotation_position="top")
        fig.update_xaxes(title_text="stored pairs n", row=1, col=col)
    fig.update_yaxes(title_text=_METRIC_TITLES[metric], row=1, col=1)
    if metric == "accuracy":
        fig.update_yaxes(range=[0, 1.05])
    fig.update_layout(title=title, height=height, template="plotly_white", legend=dict(orientation="h", y=-0.2))
    return fig


def position_figure(rows: Sequence[Mapping], *, title: str | None = None, height: int = 380) -> go.Figure:
    """Recall accuracy of each stored pair vs its age (writes after it), one line per rule;
    rows from `recall_by_position`."""
    if not rows:
        raise ValueError("rows is empty: pass the output of recall_by_position")
    fig = go.Figure()
    for rule in dict.fromkeys(r["rule"] for r in rows):
        rr = sorted((r for r in rows if r["rule"] == rule), key=lambda r: r["age"])
        label = rr[0].get("label", rule)
        if rule == "gated_delta" and rr[0].get("a") is not None:
            label = f"{label} (a={rr[0]['a']:g})"
        fig.add_trace(go.Scatter(x=[r["age"] for r in rr], y=[r["accuracy"] for r in rr], name=label,
                                 mode="lines", line=dict(color=RULE_COLORS.get(rule))))
    fig.update_layout(title=title, height=height, template="plotly_white",
                      xaxis_title="age of the pair (writes stored after it)",
                      yaxis_title="recall accuracy", yaxis_range=[0, 1.05])
    return fig


def gate_decay_figure(gates: Mapping[str, float], *, max_tokens: int = 800,
                      marks: Sequence[int] = (48, 800), title: str | None = None,
                      height: int = 380) -> go.Figure:
    """Fraction of the state a per-token gate a leaves after N tokens, a ** N (log y axis),
    for each named gate, with vertical marks (e.g. one 48-token call, 800 tokens) and the
    half-life level 0.5."""
    if not gates:
        raise ValueError("gates is empty: pass a mapping name -> per-token gate a")
    xs = list(range(max_tokens + 1))
    fig = go.Figure()
    for i, (name, a) in enumerate(gates.items()):
        fig.add_trace(go.Scatter(x=xs, y=[max(a ** n, 1e-300) for n in xs], name=f"{name} (a={a:.4g})",
                                 mode="lines", line=dict(color=_PALETTE[i % len(_PALETTE)])))
    fig.add_hline(y=0.5, line=dict(color="gray", dash="dot", width=1), annotation_text="half-life")
    for m in marks:
        fig.add_vline(x=m, line=dict(color="black", dash="dot", width=1), annotation_text=f"{m} tokens")
    fig.update_layout(title=title, height=height, template="plotly_white", xaxis_title="tokens N",
                      yaxis_title="retained fraction a^N", yaxis_type="log", yaxis_range=[-8, 0.1])
    return fig


def filler_figure(curves: Mapping[str, Sequence[Mapping]], *, metric: str = "retained",
                  show_gate_only: bool = True, title: str | None = None, height: int = 400) -> go.Figure:
    """Recall of one stored fact after N filler writes (rows from `recall_after_filler`),
    one solid line per named curve, with the decay-only prediction beta a^N dotted and,
    for accuracy, the chance level dashed."""
    if not curves:
        raise ValueError("curves is empty: pass a mapping name -> recall_after_filler rows")
    if metric not in ("retained", "cosine", "accuracy"):
        raise ValueError(f"metric must be 'retained', 'cosine' or 'accuracy', got {metric!r}")
    fig = go.Figure()
    for i, (name, rows) in enumerate(curves.items()):
        color = _PALETTE[i % len(_PALETTE)]
        xs = [r["n_filler"] for r in rows]
        fig.add_trace(go.Scatter(x=xs, y=[r[metric] for r in rows], name=name, mode="lines",
                                 legendgroup=name, line=dict(color=color)))
        if show_gate_only and metric == "retained":
            fig.add_trace(go.Scatter(x=xs, y=[r["gate_only"] for r in rows], name=f"{name}: beta a^N",
                                     mode="lines", legendgroup=name, line=dict(color=color, dash="dot")))
    if metric == "accuracy":
        chance = 1.0 / next(iter(curves.values()))[0]["codebook_size"]
        fig.add_hline(y=chance, line=dict(color=RULE_COLORS["chance"], dash="dash"), annotation_text="chance")
    fig.add_vline(x=48, line=dict(color="black", dash="dot", width=1), annotation_text="one 48-token call")
    fig.update_layout(title=title, height=height, template="plotly_white",
                      xaxis_title="filler writes N after the fact", yaxis_title=_METRIC_TITLES[metric])
    return fig
