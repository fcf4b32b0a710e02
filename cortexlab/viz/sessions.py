"""Plotly figures for Cortex sessions: constant memory against a growing KV cache, and per-call time.

Builders take the rows of `cortexlab.eval.sessions.stream_session` (or `chat_session`) and
return a `plotly.graph_objects.Figure`; nothing here computes beyond unit conversion.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

COLORS = {"state": "#2ca02c", "file": "#98df8a", "kv": "#d62728", "kv_measured": "#7f0000"}
MB = 2 ** 20


def memory_vs_tokens_figure(rows: Sequence[Mapping], *, title: str | None = None, height: int = 420,
                            log_y: bool = False) -> go.Figure:
    """Left: bytes to keep vs tokens processed — the session state (measured, flat), its file on
    disk, and a plain transformer's KV cache (computed; measured markers when the rows have
    them). Right: wall time of each call vs tokens processed (and the baseline's, if present).
    """
    if not rows:
        raise ValueError("rows is empty: pass the output of stream_session")
    missing = {"tokens", "state_bytes", "kv_cache_bytes", "wall_s"} - set(rows[0])
    if missing:
        raise ValueError(f"rows lack {sorted(missing)}: pass the output of stream_session")
    x = [r["tokens"] for r in rows]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4],
                        subplot_titles=("memory kept to continue", "wall time of each call"))
    fig.add_trace(go.Scatter(x=x, y=[r["kv_cache_bytes"] / MB for r in rows], mode="lines+markers",
                             name="plain transformer: KV cache for all tokens (computed)",
                             line=dict(color=COLORS["kv"])), row=1, col=1)
    if "kv_cache_bytes_measured" in rows[0]:
        fig.add_trace(go.Scatter(x=x, y=[r["kv_cache_bytes_measured"] / MB for r in rows], mode="markers",
                                 name="plain transformer: KV cache (measured, DynamicCache)",
                                 marker=dict(color=COLORS["kv_measured"], symbol="x", size=9)), row=1, col=1)
    fig.add_trace(go.Scatter(x=x, y=[r["state_bytes"] / MB for r in rows], mode="lines+markers",
                             name="Cortex session state (measured)", line=dict(color=COLORS["state"], width=3)),
                  row=1, col=1)
    if rows[0].get("file_bytes") is not None:
        fig.add_trace(go.Scatter(x=x, y=[r["file_bytes"] / MB for r in rows], mode="lines",
                                 name="Cortex session file on disk", line=dict(color=COLORS["file"], dash="dot")),
                      row=1, col=1)
    fig.add_trace(go.Scatter(x=x, y=[r["wall_s"] for r in rows], mode="lines+markers", showlegend=False,
                             name="Cortex call", line=dict(color=COLORS["state"])), row=1, col=2)
    if "baseline_wall_s" in rows[0]:
        fig.add_trace(go.Scatter(x=x, y=[r["baseline_wall_s"] for r in rows], mode="lines+markers",
                                 showlegend=False, name="plain transformer call (with KV cache)",
                                 line=dict(color=COLORS["kv"])), row=1, col=2)
    fig.update_xaxes(title_text="tokens processed", rangemode="tozero")
    fig.update_yaxes(title_text="MiB", type="log" if log_y else "linear", row=1, col=1)
    fig.update_yaxes(title_text="seconds per call", rangemode="tozero", row=1, col=2)
    fig.update_layout(title=title, height=height, template="plotly_white", legend=dict(orientation="h", y=-0.25))
    return fig


def conversation_figure(rows: Sequence[Mapping], *, title: str | None = None, height: int = 340) -> go.Figure:
    """Tokens the memory has read (bars, left axis) and the session state's KiB (line, right axis)
    after each `generate` call of a conversation (rows of `chat_session`)."""
    if not rows:
        raise ValueError("rows is empty: pass the output of chat_session")
    calls = [r["call"] for r in rows]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Bar(x=calls, y=[r["memory_tokens"] for r in rows], name="tokens read by the memory",
                         marker_color="#1f77b4"), secondary_y=False)
    fig.add_trace(go.Scatter(x=calls, y=[r["state_bytes"] / 1024 for r in rows], name="state KiB",
                             mode="lines+markers", line=dict(color=COLORS["state"], width=3)), secondary_y=True)
    fig.update_xaxes(title_text="generate call", dtick=1)
    fig.update_yaxes(title_text="tokens read so far", secondary_y=False)
    fig.update_yaxes(title_text="session state (KiB)", rangemode="tozero", secondary_y=True)
    fig.update_layout(title=title, height=height, template="plotly_white", legend=dict(orientation="h", y=-0.25))
    return fig
