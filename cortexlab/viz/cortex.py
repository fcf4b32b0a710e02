"""Plotly figures for a Cortex sidecar's memory: what it writes and reads, its spectrum, retention.

Every builder takes what `cortexlab.eval.memory_trace` returns (a `MemoryTrace`, the dict of
`retention`, the rows of `repeat_surprise`) and returns a `plotly.graph_objects.Figure`;
nothing here computes beyond selecting, averaging over heads and smoothing for display.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from cortexlab.eval.memory_trace import MemoryTrace, smooth

HEAD_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
GATE_COLORS = {"log": "#2ca02c", "sigmoid": "#d62728"}
_PALETTE = ("#2ca02c", "#d62728", "#1f77b4", "#9467bd", "#ff7f0e", "#8c564b")


def _color(name: str, i: int) -> str:
    for gate, color in GATE_COLORS.items():
        if name.startswith(gate):
            return color
    return _PALETTE[i % len(_PALETTE)]


def _check_traces(traces: Mapping[str, MemoryTrace]) -> None:
    if not traces:
        raise ValueError("traces is empty: pass a mapping name -> MemoryTrace")
    bad = [name for name, t in traces.items() if not isinstance(t, MemoryTrace)]
    if bad:
        raise TypeError(f"traces {bad} are not MemoryTrace objects (from cortexlab.eval.memory_trace)")


def trace_figure(trace: MemoryTrace, tokens: Sequence[str] | None = None, *, batch: int = 0,
                 title: str | None = None, height: int = 760) -> go.Figure:
    """Four stacked panels over the tokens read, one line per head: the write strength
    beta_t, the forget gate a_t, the relative prediction error ||e_t|| / ||v_t|| (1 = the
    error of a memory that predicts nothing, dashed) and ||S||_F at the checkpoints.
    `tokens`: the text of each token, shown on hover."""
    if not isinstance(trace, MemoryTrace):
        raise TypeError(f"trace must be a MemoryTrace, got {type(trace).__name__}")
    T, H = trace.tokens, trace.beta.shape[-1]
    if tokens is not None and len(tokens) != T:
        raise ValueError(f"tokens has {len(tokens)} entries but the trace has {T} tokens")
    fig = make_subplots(rows=4, cols=1, shared_xaxes=True, vertical_spacing=0.04,
                        subplot_titles=("write strength β_t", "forget gate a_t",
                                        "prediction error ‖v_t − a_t S_{t−1}ᵀ k_t‖ / ‖v_t‖", "‖S‖_F"))
    xs = np.arange(T)
    hover = [repr(t) for t in tokens] if tokens is not None else None
    per_token = (trace.beta, trace.forget, trace.relative_error)
    for h in range(H):
        color = HEAD_COLORS[h % len(HEAD_COLORS)]
        for row, series in enumerate(per_token, start=1):
            fig.add_trace(go.Scatter(x=xs, y=series[batch, :, h].numpy(), name=f"head {h}", legendgroup=f"h{h}",
                                     showlegend=row == 1, mode="lines", line=dict(color=color, width=1),
                                     text=hover, hovertemplate="token %{x} %{text}<br>%{y:.4f}" if hover else None),
                          row=row, col=1)
        fig.add_trace(go.Scatter(x=trace.checkpoints.numpy(), y=trace.state_norm[batch, :, h].numpy(),
                                 name=f"head {h}", legendgroup=f"h{h}", showlegend=False, mode="lines",
                                 line=dict(color=color, width=1.5)), row=4, col=1)
    fig.add_hline(y=1.0, line=dict(color="gray", dash="dash", width=1), row=3, col=1,
                  annotation_text="predicts nothing", annotation_position="top left")
    fig.update_xaxes(title_text="tokens read", row=4, col=1)
    fig.update_layout(title=title, height=height, template="plotly_white", legend=dict(orientation="h", y=-0.08))
    return fig


def spectrum_figure(traces: Mapping[str, MemoryTrace], *, head: int = 0, batch: int = 0,
                    title: str | None = None, height: int = 620) -> go.Figure:
    """One column per named trace. Top: the singular values of S (one head) at each
    checkpoint vs tokens read, one line per index (dark = largest), log scale. Bottom: the
    effective rank of S for every head."""
    _check_traces(traces)
    names = list(traces)
    fig = make_subplots(rows=2, cols=len(names), shared_xaxes=True, shared_yaxes="rows", vertical_spacing=0.08,
                        subplot_titles=[f"{n}: singular values of S (head {head})" for n in names]
                        + [f"{n}: effective rank of S" for n in names])
    for col, name in enumerate(names, start=1):
        trace = traces[name]
        xs = trace.checkpoints.numpy()
        sv = trace.singular_values[batch, :, head]                   # [C, R]
        R = sv.shape[-1]
        colors = sample_colorscale("Viridis", [i / max(R - 1, 1) for i in range(R)])
        for i in range(R):
            # the starting state may be exactly zero: leave those points out of the log axis
            ys = torch.where(sv[:, i] > 0, sv[:, i], torch.nan).numpy()
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=colors[i], width=1),
                                     name=f"σ_{i + 1}", showlegend=False,
                                     hovertemplate=f"σ_{i + 1}" + " after %{x} tokens: %{y:.3g}"), row=1, col=col)
        er = trace.effective_rank[batch]
        for h in range(er.shape[-1]):
            fig.add_trace(go.Scatter(x=xs, y=er[:, h].numpy(), mode="lines", name=f"head {h}", legendgroup=f"h{h}",
                                     showlegend=col == 1, line=dict(color=HEAD_COLORS[h % len(HEAD_COLORS)])),
                          row=2, col=col)
        fig.update_xaxes(title_text="tokens read", row=2, col=col)
    fig.update_yaxes(type="log", row=1)
    fig.update_yaxes(title_text="singular value", row=1, col=1)
    fig.update_yaxes(title_text="effective rank", row=2, col=1)
    fig.update_layout(title=title, height=height, template="plotly_white", legend=dict(orientation="h", y=-0.12))
    return fig


def retention_figure(curves: Mapping[str, Mapping], *, title: str | None = None, height: int = 420) -> go.Figure:
    """Fraction of one write still in S after n more tokens (`retention` dicts), mean over
    probe positions and heads: solid = measured with the later writes, dotted = the forget
    gate alone (prod a_j). Log x axis, lags from 1."""
    if not curves:
        raise ValueError("curves is empty: pass a mapping name -> retention(...) dict")
    fig = go.Figure()
    for i, (name, r) in enumerate(curves.items()):
        color = _color(name, i)
        lags = r["lag"][1:].numpy()
        fig.add_trace(go.Scatter(x=lags, y=r["mean"][1:].numpy(), name=f"{name}: measured", legendgroup=name,
                                 mode="lines", line=dict(color=color)))
        fig.add_trace(go.Scatter(x=lags, y=r["gate_only_mean"][1:].numpy(), name=f"{name}: forget gate alone",
                                 legendgroup=name, mode="lines", line=dict(color=color, dash="dot")))
    fig.add_hline(y=0.5, line=dict(color="gray", dash="dot", width=1), annotation_text="half")
    fig.update_layout(title=title, height=height, template="plotly_white", xaxis_type="log",
                      xaxis_title="tokens n after the write", yaxis_title="retained fraction k_tᵀ P k_t",
                      yaxis_range=[0, 1.02])
    return fig


def surprise_figure(traces: Mapping[str, MemoryTrace], *, boundary: int | None = None, window: int = 16,
                    batch: int = 0, title: str | None = None, height: int = 420) -> go.Figure:
    """Relative prediction error along the text (mean over heads, trailing mean over
    `window` tokens), one line per named trace; `boundary` marks where a second copy starts."""
    _check_traces(traces)
    fig = go.Figure()
    for i, (name, trace) in enumerate(traces.items()):
        ys = smooth(trace.relative_error[batch].mean(-1), window)
        dash = "dot" if "control" in name else "solid"
        fig.add_trace(go.Scatter(x=np.arange(trace.tokens), y=ys.numpy(), name=name, mode="lines",
                                 line=dict(color=_color(name, i), dash=dash)))
    fig.add_hline(y=1.0, line=dict(color="gray", dash="dash", width=1), annotation_text="predicts nothing")
    if boundary is not None:
        fig.add_vline(x=boundary, line=dict(color="black", dash="dot", width=1), annotation_text="second part starts")
    fig.update_layout(title=title, height=height, template="plotly_white", xaxis_title="token",
                      yaxis_title=f"‖e_t‖ / ‖v_t‖ (mean of heads, last {window} tokens)")
    return fig


def repeat_figure(rows: Sequence[Mapping], *, title: str | None = None, height: int = 420) -> go.Figure:
    """Left: mean relative prediction error vs the length L of the repeated text, on its
    first reading, its repeat, and after a control text (rows of `repeat_surprise`), one
    colour per block. Right: repeat / control (1 = repetition does not help)."""
    if not rows:
        raise ValueError("rows is empty: pass the output of repeat_surprise")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("mean ‖e_t‖ / ‖v_t‖ on the text X",
                                                        "repeat / control"))
    styles = {"first": ("X first (memory empty)", "dash"), "control": ("X after a control text", "dot"),
              "repeat": ("X after X", "solid")}
    for i, block in enumerate(dict.fromkeys(r["block"] for r in rows)):
        rr = sorted((r for r in rows if r["block"] == block), key=lambda r: r["length"])
        color = _color(block, i)
        xs = [r["length"] for r in rr]
        for key, (label, dash) in styles.items():
            fig.add_trace(go.Scatter(x=xs, y=[r[key] for r in rr], name=f"{block}: {label}", legendgroup=block,
                                     mode="lines+markers", line=dict(color=color, dash=dash)), row=1, col=1)
        fig.add_trace(go.Scatter(x=xs, y=[r["ratio"] for r in rr], name=f"{block}: repeat / control",
                                 legendgroup=block, showlegend=False, mode="lines+markers", line=dict(color=color)),
                      row=1, col=2)
    fig.add_hline(y=1.0, line=dict(color="gray", dash="dash", width=1), row=1, col=2)
    fig.update_xaxes(type="log", title_text="length L of the text X (tokens)")
    fig.update_layout(title=title, height=height, template="plotly_white", legend=dict(orientation="h", y=-0.25))
    return fig


def _checkpoint_index(trace: MemoryTrace, checkpoint: int) -> int:
    count = len(trace.checkpoints)
    if not isinstance(checkpoint, int) or isinstance(checkpoint, bool) or not -count <= checkpoint < count:
        raise ValueError(f"checkpoint must be an int in [{-count}, {count - 1}], got {checkpoint!r}")
    return checkpoint % count


def state_heatmap(trace: MemoryTrace, checkpoint: int, head: int, *, tokens: Sequence[str] | None = None,
                  batch: int = 0, height: int = 430) -> go.Figure:
    """S [D_k, D_v] of one head after `trace.checkpoints[checkpoint]` tokens, as a heatmap.

    The colour range is fixed to the largest |S_ij| over all checkpoints of that head, so the
    memory visibly fills (and fades) while a player scrubs through the tokens. `tokens`: the
    text of each token read, named in the title.
    """
    index = _checkpoint_index(trace, checkpoint)
    heads = trace.states.shape[2]
    if not isinstance(head, int) or isinstance(head, bool) or not 0 <= head < heads:
        raise ValueError(f"head must be an int in [0, {heads - 1}], got {head!r}")
    states = trace.states[batch, :, head]
    bound = float(states.abs().max()) or 1.0
    read = int(trace.checkpoints[index])
    last = f" (last: {tokens[read - 1]!r})" if tokens is not None and read > 0 else ""
    fig = go.Figure(go.Heatmap(z=states[index].numpy(), zmin=-bound, zmax=bound, colorscale="RdBu", reversescale=True,
                               colorbar=dict(title="S_ij"), hovertemplate="key dim %{y}, value dim %{x}: %{z:.3g}"))
    fig.update_layout(title=f"memory S of head {head} after {read} tokens{last}", height=height,
                      template="plotly_white", xaxis_title="value dimension", yaxis_title="key dimension",
                      yaxis_autorange="reversed")
    return fig


def state_summary_figure(trace: MemoryTrace, *, checkpoint: int | None = None, batch: int = 0,
                         height: int = 430) -> go.Figure:
    """||S||_F and the effective rank of S (exp of the entropy of its normalised singular values)
    at every checkpoint, one line per head; `checkpoint` draws a marker at that point."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        subplot_titles=("‖S‖_F", "effective rank of S"))
    xs = trace.checkpoints.numpy()
    norm, rank = trace.state_norm[batch], trace.effective_rank[batch]
    for h in range(norm.shape[-1]):
        color = HEAD_COLORS[h % len(HEAD_COLORS)]
        for row, series in enumerate((norm, rank), start=1):
            fig.add_trace(go.Scatter(x=xs, y=series[:, h].numpy(), name=f"head {h}", legendgroup=f"h{h}",
                                     showlegend=row == 1, mode="lines", line=dict(color=color)), row=row, col=1)
    if checkpoint is not None:
        fig.add_vline(x=int(trace.checkpoints[_checkpoint_index(trace, checkpoint)]),
                      line=dict(color="black", dash="dot", width=1))
    fig.update_xaxes(title_text="tokens read", row=2, col=1)
    fig.update_layout(height=height, template="plotly_white", legend=dict(orientation="h", y=-0.15))
    return fig


def read_figure(trace: MemoryTrace, tokens: Sequence[str], *, batch: int = 0, height: int = 330) -> go.Figure:
    """What each token of a call read from memory: ||o_t|| = ||scale S_t^T q_t|| per head, as bars."""
    if len(tokens) != trace.tokens:
        raise ValueError(f"tokens has {len(tokens)} entries but the trace has {trace.tokens} tokens")
    fig = go.Figure()
    labels = [f"{i}:{t}" for i, t in enumerate(tokens)]
    for h in range(trace.read_norm.shape[-1]):
        fig.add_trace(go.Bar(x=labels, y=trace.read_norm[batch, :, h].numpy(), name=f"head {h}",
                             marker_color=HEAD_COLORS[h % len(HEAD_COLORS)]))
    fig.update_layout(title="what the question read from memory: ‖o_t‖ = ‖scale S_tᵀ q_t‖", barmode="group",
                      height=height, template="plotly_white", yaxis_title="‖o_t‖", xaxis_tickangle=-45)
    return fig
