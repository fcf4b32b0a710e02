"""Plotly figures for notebook 08 (cortical columns); builders only reshape what `cortexlab.eval.columns`
returns."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

TIER_COLOURS = {"syntactic": "rgba(99,110,250,0.12)", "semantic": "rgba(0,204,150,0.12)",
                "abstract": "rgba(239,85,59,0.12)"}


def specialization_figure(rows: Sequence[Mapping], tiers: Sequence[str] | None = None, *,
                          distance: Sequence[float] | None = None, title: str | None = None) -> go.Figure:
    """JS specialisation per layer: between columns, heads within a column, heads across columns; the
    organizer's tiers shaded; optionally the mean attention distance on a second axis."""
    layers = [r["layer"] for r in rows]
    fig = make_subplots(specs=[[{"secondary_y": distance is not None}]])
    for key, name in (("js_columns", "columns (CorticalColumnAttention)"), ("js_between", "heads, different columns"),
                      ("js_within", "heads, same column")):
        fig.add_trace(go.Scatter(x=layers, y=[r[key] for r in rows], mode="lines+markers", name=name))
    if distance is not None:
        fig.add_trace(go.Scatter(x=layers, y=list(distance), mode="lines", name="mean attention distance",
                                 line={"dash": "dot", "color": "grey"}), secondary_y=True)
        fig.update_yaxes(title_text="mean attention distance (tokens)", secondary_y=True)
    if tiers is not None:
        start = 0
        for i in range(1, len(layers) + 1):
            if i == len(layers) or tiers[i] != tiers[start]:
                fig.add_vrect(x0=layers[start] - 0.5, x1=layers[i - 1] + 0.5, fillcolor=TIER_COLOURS.get(tiers[start]),
                              line_width=0, annotation_text=tiers[start], annotation_position="top left")
                start = i
    fig.update_yaxes(title_text="mean Jensen-Shannon divergence (nats)", secondary_y=False)
    fig.update_layout(xaxis_title="layer", title=title or "column specialisation per layer")
    return fig


def inhibition_figure(result: Mapping, *, title: str | None = None) -> go.Figure:
    """Column co-activation (correlation across tokens) before and after lateral inhibition, and the learnt W."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=("correlation before (W = 0)", "correlation after",
                                                        "inhibition W (row g: inhibits g)"))
    names = [f"col {g}" for g in range(result["W"].shape[0])]
    for col, (key, zmin, zmax) in enumerate((("corr_before", -1, 1), ("corr_after", -1, 1), ("W", 0, None)), 1):
        z = result[key]
        fig.add_trace(go.Heatmap(z=z.tolist(), x=names, y=names, zmin=zmin, zmax=zmax, showscale=col == 3,
                                 colorscale="RdBu_r" if key != "W" else "Viridis",
                                 text=[[f"{v:.2f}" for v in row] for row in z.tolist()], texttemplate="%{text}"),
                      row=1, col=col)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(height=330, title=title or "lateral inhibition between columns")
    return fig


def activity_figure(before, after, *, title: str | None = None) -> go.Figure:
    """Each column's activity along the tokens [T, G], before (solid) and after (dotted) inhibition."""
    fig = go.Figure()
    for g in range(before.shape[1]):
        fig.add_trace(go.Scatter(y=before[:, g].tolist(), mode="lines", name=f"col {g} before",
                                 legendgroup=str(g)))
        fig.add_trace(go.Scatter(y=after[:, g].tolist(), mode="lines", name=f"col {g} after", legendgroup=str(g),
                                 line={"dash": "dot"}))
    fig.update_layout(xaxis_title="token", yaxis_title="column activity mean |x|",
                      title=title or "column activity before and after inhibition")
    return fig


def column_js_figure(matrix, *, title: str | None = None) -> go.Figure:
    """Heatmap of the pairwise JS divergence between columns [G, G] (`cortexlab.eval.columns.column_js_matrix`)."""
    z = matrix.tolist()
    names = [f"col {g}" for g in range(len(z))]
    fig = go.Figure(go.Heatmap(z=z, x=names, y=names, zmin=0, colorscale="Viridis", colorbar={"title": "nats"},
                               text=[[f"{v:.3f}" for v in row] for row in z], texttemplate="%{text}"))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(height=360, title=title or "Jensen-Shannon divergence between columns")
    return fig
