"""Plotly figures for timing rows from `cortexlab.eval.speed.time_backends_vs_length`."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

BACKEND_COLORS = {
    "recurrent": "#d62728",
    "chunk": "#1f77b4",
    "triton": "#2ca02c",
    "transformers": "#ff7f0e",
    "fla": "#9467bd",
}
_METRICS = {"fwd_s": ("forward", "solid"), "fwdbwd_s": ("forward + backward", "dash")}


def speed_vs_length_figure(rows: Sequence[Mapping], *, reference: str = "recurrent", height: int = 420,
                           title: str | None = None) -> go.Figure:
    """Left: seconds vs sequence length T (log-log), one colour per backend, solid = forward,
    dashed = forward + backward. Right: speed-up over `reference` (its time / the backend's
    time at the same T) for every other backend.
    """
    if not rows:
        raise ValueError("rows is empty: pass the output of time_backends_vs_length")
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    if reference not in backends:
        raise ValueError(f"reference {reference!r} is not among the timed backends {backends}")
    metrics = [m for m in _METRICS if any(r.get(m) for r in rows)]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("time per call", f"speed-up over {reference}"))
    ref = {(r["T"], m): r[m] for r in rows if r["backend"] == reference for m in metrics}
    for name in backends:
        mine = sorted((r for r in rows if r["backend"] == name), key=lambda r: r["T"])
        color = BACKEND_COLORS.get(name)
        for m in metrics:
            label, dash = _METRICS[m]
            pts = [r for r in mine if r.get(m)]
            fig.add_trace(go.Scatter(x=[r["T"] for r in pts], y=[r[m] for r in pts], name=name,
                                     legendgroup=name, showlegend=m == metrics[0], mode="lines+markers",
                                     line=dict(color=color, dash=dash),
                                     hovertemplate=f"{name} {label}<br>T=%{{x}}<br>%{{y:.3g}} s<extra></extra>"),
                          row=1, col=1)
            if name == reference:
                continue
            up = [(r["T"], ref[(r["T"], m)] / r[m]) for r in pts if ref.get((r["T"], m))]
            fig.add_trace(go.Scatter(x=[t for t, _ in up], y=[u for _, u in up], name=name, legendgroup=name,
                                     showlegend=False, mode="lines+markers", line=dict(color=color, dash=dash),
                                     hovertemplate=f"{name} {label}<br>T=%{{x}}<br>%{{y:.1f}}x<extra></extra>"),
                          row=1, col=2)
    fig.update_xaxes(type="log", title_text="sequence length T")
    fig.update_yaxes(type="log", title_text="seconds (solid fwd, dashed fwd+bwd)", row=1, col=1)
    fig.update_yaxes(type="log", title_text=f"x faster than {reference}", row=1, col=2)
    fig.update_layout(height=height, title=title, template="plotly_white")
    return fig
