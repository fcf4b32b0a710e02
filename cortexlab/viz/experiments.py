"""Plotly figures for the experiments E1-E4 (the results files of `cortexlab.train` and `cortexlab.eval.versions`).

Each builder takes the parsed results JSON (or the part named in its docstring) and only selects and averages
for display; every baseline the experiment measured is drawn beside the result.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = ["MIXER_COLORS", "digit_takeoff_figure", "mqar_figure", "mqar_live_figure", "mqar_merge", "mqar_rows",
           "position_loss_figure", "recall_figure", "takeoff_figure", "throughput_figure", "version_retention_figure"]

MIXER_COLORS = {"attention": "#1f77b4", "sliding_window": "#ff7f0e", "gdn": "#2ca02c", "hybrid": "#9467bd"}
VARIANT_STYLE = {"base_segments": ("base, segments", "#7f7f7f", "solid"),
                 "sidecar_segments": ("base + sidecar, segments", "#2ca02c", "solid"),
                 "sidecar_reset": ("base + sidecar, memory reset every segment", "#ff7f0e", "dash"),
                 "base_full_context": ("base, full context", "#1f77b4", "dot")}


def mqar_rows(runs: Sequence[Mapping]) -> list[dict]:
    """Flat rows (mixer, size, seq_len, pairs, state_size, accuracy, chance, untrained, steps, stopped) of E1's
    runs; "stopped" says why a run ended ("target", "plateau" or "steps", see `train_mqar`)."""
    return [{"mixer": r["config"]["mixer"], "size": f'd={r["config"]["d_model"]} H={r["config"]["num_heads"]}',
             "seq_len": r["config"]["task"]["seq_len"], "pairs": r["config"]["task"]["num_pairs"],
             "state_size": r["state_size"], "accuracy": r["accuracy"], "chance": r["chance"],
             "untrained": r["untrained_accuracy"], "steps": r["steps"], "stopped": r["stopped"]}
            for r in runs]


def mqar_merge(results: Mapping, *more: Mapping) -> dict:
    """One E1 results dict from files of the same sweep axes (e.g. `mqar_cpu.json` and `mqar_capacity.json`):
    `results`' header, the runs of all of them (a run in several, by its config, once: the first file's), complete
    only if each is; "commands" lists every file's command."""
    fixed = {k: results["grid"][k] for k in ("fixed_pairs", "fixed_len")}
    runs, seen = [], set()
    for part in (results, *more):
        other = {k: part["grid"][k] for k in fixed}
        if other != fixed:
            raise ValueError(f"the files sweep different axes: {fixed} and {other}")
        for run in part["runs"]:
            key = json.dumps(run["config"], sort_keys=True)
            if key not in seen:
                seen.add(key)
                runs.append(run)
    return {**results, "runs": runs, "complete": all(part.get("complete") for part in (results, *more)),
            "commands": [part["command"] for part in (results, *more)]}


def mqar_figure(results: Mapping, *, height: int = 430) -> go.Figure:
    """E1: accuracy vs sequence length at the fixed number of pairs (left) and vs pairs at the fixed length
    (right), one colour per mixer, one dash per model size; chance dotted."""
    rows = mqar_rows(results["runs"])
    if not rows:
        raise ValueError("results has no runs")
    grid = results["grid"]
    fixed_pairs, fixed_len = grid["fixed_pairs"], grid["fixed_len"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"accuracy vs length ({fixed_pairs} pairs)",
                                                        f"accuracy vs pairs (length {fixed_len})"))
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    dashes = ("solid", "dash", "dot", "dashdot")
    for mixer in dict.fromkeys(r["mixer"] for r in rows):
        for s, size in enumerate(sizes):
            mine = [r for r in rows if r["mixer"] == mixer and r["size"] == size]
            for col, (key, fixed_key, fixed) in enumerate((("seq_len", "pairs", fixed_pairs),
                                                           ("pairs", "seq_len", fixed_len)), start=1):
                pts = sorted((r for r in mine if r[fixed_key] == fixed), key=lambda r: r[key])
                if not pts:
                    continue
                fig.add_trace(go.Scatter(x=[r[key] for r in pts], y=[r["accuracy"] for r in pts],
                                         name=f"{mixer} ({size})", legendgroup=f"{mixer}{size}",
                                         showlegend=col == 1, mode="lines+markers",
                                         line=dict(color=MIXER_COLORS.get(mixer), dash=dashes[s % len(dashes)]),
                                         customdata=[[r["state_size"], r["steps"]] for r in pts],
                                         hovertemplate="%{x}: %{y:.3f}<br>state %{customdata[0]}, "
                                                       "%{customdata[1]} steps<extra></extra>"),
                              row=1, col=col)
    chance = min(r["chance"] for r in rows)
    for col in (1, 2):
        fig.add_hline(y=chance, line=dict(color="gray", dash="dot", width=1), row=1, col=col)
    fig.update_xaxes(type="log", title_text="sequence length", row=1, col=1)
    fig.update_xaxes(type="log", title_text="key-value pairs", row=1, col=2)
    fig.update_yaxes(range=[-0.02, 1.02], title_text="accuracy", row=1, col=1)
    fig.update_layout(height=height, template="plotly_white", title="E1: multi-query associative recall")
    return fig


def recall_figure(evaluation: Mapping, *, call_tokens: int | None = None, height: int = 400) -> go.Figure:
    """E2: exact match vs distance in calls (>= 1) for the sidecar and its baselines ("reset", "base"), with
    chance; `evaluation` is the "eval" dict of a recall results file."""
    names = {"sidecar": ("trained sidecar (memory carried)", "#2ca02c"),
             "reset": ("sidecar, memory reset before the question", "#d62728"),
             "base": ("base model alone", "#7f7f7f")}
    fig = go.Figure()
    for variant, (label, color) in names.items():
        table = evaluation.get(variant)
        if not table:
            continue
        ds = sorted((int(d) for d in table if int(d) >= 1))
        fig.add_trace(go.Scatter(x=ds, y=[table[str(d)]["exact_match"] for d in ds], name=label, mode="lines+markers",
                                 line=dict(color=color),
                                 customdata=[d * call_tokens if call_tokens else None for d in ds],
                                 hovertemplate="distance %{x} calls (~%{customdata} tokens): %{y:.3f}<extra></extra>"))
    if "chance" in evaluation:
        fig.add_hline(y=evaluation["chance"]["exact_match"], line=dict(color="gray", dash="dot", width=1),
                      annotation_text="chance")
    fig.update_layout(height=height, template="plotly_white", xaxis_type="log", yaxis_range=[-0.02, 1.02],
                      xaxis_title="distance (calls from the fact to the question)", yaxis_title="exact match",
                      title="E2: recall across calls (held-out episodes)")
    return fig


def takeoff_figure(runs: Mapping[str, Mapping], *, window: int = 25, height: int = 400) -> go.Figure:
    """E2 training: exact match on the training batches, averaged over `window` steps, vs step, one line per
    recall results file in `runs` (by label); where the easy stage ends is marked."""
    from cortexlab.train.recall import training_curve

    if not runs:
        raise ValueError("runs is empty")
    fig = go.Figure()
    for label, run in runs.items():
        steps, exact = zip(*training_curve(run["history"], window)) if len(run["history"]) >= window else ((), ())
        fig.add_trace(go.Scatter(x=steps, y=exact, name=label, mode="lines"))
    easy = {(run["data"].get("easy") or {}).get("steps") for run in runs.values()} - {None}
    for steps in easy:
        fig.add_vline(x=steps, line=dict(color="gray", dash="dot", width=1), annotation_text="easy stage ends")
    fig.update_layout(height=height, template="plotly_white", yaxis_range=[-0.02, 1.02],
                      xaxis_title="training step", yaxis_title=f"exact match, training batches ({window}-step mean)",
                      title="E2: when the memory takes off", legend=dict(orientation="h", y=-0.25))
    return fig


def digit_takeoff_figure(runs: Mapping[str, Mapping], *, window: int = 25, height: int = 360) -> go.Figure:
    """E2 training digit by digit: each answer digit's accuracy on the training batches (`window`-step mean) vs
    step, one panel per recall results file in `runs` (by label), chance (1/10) dashed."""
    from cortexlab.train.recall import digit_curves

    if not runs:
        raise ValueError("runs is empty")
    curves = {label: digit_curves(run["history"], window) for label, run in runs.items()}
    fig = make_subplots(rows=1, cols=len(curves), subplot_titles=list(curves), shared_yaxes=True)
    palette = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
    for col, per_digit in enumerate(curves.values(), start=1):
        for i, curve in enumerate(per_digit):
            steps, accuracy = zip(*curve) if curve else ((), ())
            fig.add_trace(go.Scatter(x=steps, y=accuracy, name=f"digit {i + 1}", mode="lines", showlegend=col == 1,
                                     line=dict(color=palette[i % len(palette)])), row=1, col=col)
        fig.add_hline(y=0.1, line=dict(color="gray", dash="dash", width=1), row=1, col=col)
        fig.update_xaxes(title_text="training step", row=1, col=col)
    fig.update_yaxes(title_text=f"digit accuracy, training batches ({window}-step mean)", range=[-0.02, 1.02],
                     row=1, col=1)
    fig.update_layout(height=height, template="plotly_white", title="E2: what the plateau has learnt, digit by digit",
                      legend=dict(orientation="h", y=-0.25))
    return fig


def digit_probe_figure(rows: Sequence[Mapping], *, marked: Sequence[int] = (), height: int = 380) -> go.Figure:
    """`cortexlab.eval.digit_probe` rows: how well each layer's input names a digit, the digit before it and its
    place (nearest class mean, held-out episodes), and the inputs' mean cosine, vs layer; chance dotted, the
    layers in `marked` (e.g. where sidecars sit) as vertical lines."""
    if not rows:
        raise ValueError("rows is empty")
    layers = [row["layer"] for row in rows]
    fig = go.Figure()
    named = (("digit", "the digit", 0.1), ("previous", "the digit before it", 1 / 11), ("place", "its place", None))
    for i, (key, label, chance) in enumerate(named):
        color = ("#1f77b4", "#ff7f0e", "#2ca02c")[i]
        fig.add_trace(go.Scatter(x=layers, y=[row[key] for row in rows], name=label, mode="lines+markers",
                                 line=dict(color=color)))
        if chance:
            fig.add_hline(y=chance, line=dict(color=color, dash="dot", width=1))
    fig.add_trace(go.Scatter(x=layers, y=[row["shared"] for row in rows], name="mean cosine between inputs",
                             mode="lines", line=dict(color="gray", dash="dash")))
    for layer in marked:
        fig.add_vline(x=layer, line=dict(color="black", width=1, dash="dot"), annotation_text=f"layer {layer}")
    fig.update_layout(height=height, template="plotly_white", xaxis_title="decoder layer (its normalised input)",
                      yaxis=dict(title="held-out accuracy / cosine", range=[0, 1.02]),
                      title="What each layer's input says about a digit of the key",
                      legend=dict(orientation="h", y=-0.25))
    return fig


def position_loss_figure(evaluation: Mapping, segment_tokens: int, *, bin_tokens: int = 16,
                         height: int = 420) -> go.Figure:
    """E3: mean next-token loss by position (averaged over bins of `bin_tokens`) for the three variants, with the
    segment boundaries; `evaluation` is the "eval" dict of a longtext results file."""
    if bin_tokens < 1:
        raise ValueError(f"bin_tokens must be >= 1, got {bin_tokens}")
    fig = go.Figure()
    for variant, (label, color, dash) in VARIANT_STYLE.items():
        curve = evaluation["per_position"].get(variant)
        if curve is None:
            continue
        xs, ys = [], []
        for s in range(0, len(curve), bin_tokens):
            part = curve[s:s + bin_tokens]
            xs.append(s + (len(part) - 1) / 2)
            ys.append(sum(part) / len(part))
        fig.add_trace(go.Scatter(x=xs, y=ys, name=label, mode="lines", line=dict(color=color, dash=dash)))
    for boundary in range(segment_tokens, evaluation["positions"], segment_tokens):
        fig.add_vline(x=boundary, line=dict(color="lightgray", width=1))
    fig.update_layout(height=height, template="plotly_white", xaxis_title="token position in the document",
                      yaxis_title=f"next-token loss (nats, mean over {len(evaluation['documents'])} held-out "
                                  f"modules, {bin_tokens}-token bins)",
                      title="E3: loss by position, read in segments (grey lines: segment boundaries)")
    return fig


def throughput_figure(rows: Sequence[Mapping], *, height: int = 380) -> go.Figure:
    """E4: forward + backward tokens/s of the v1 and v2 blocks vs length (log-log), with the speed-up."""
    if not rows:
        raise ValueError("rows is empty")
    fig = go.Figure()
    for version, color in (("v1", "#d62728"), ("v2", "#2ca02c")):
        fig.add_trace(go.Scatter(x=[r["T"] for r in rows], y=[r[f"{version}_tokens_per_s"] for r in rows],
                                 name=version, mode="lines+markers+text", line=dict(color=color),
                                 text=[f'{r["speedup"]:.1f}x' if version == "v2" else "" for r in rows],
                                 textposition="top center"))
    fig.update_layout(height=height, template="plotly_white", xaxis_type="log", yaxis_type="log",
                      xaxis_title="sequence length T", yaxis_title="tokens / s (forward + backward)",
                      title="E4: training throughput of one sidecar block (labels: v2 over v1)")
    return fig


def version_retention_figure(persistence: Mapping, *, height: int = 400) -> go.Figure:
    """E4: mean retained fraction of a write vs tokens after it, per block (solid: measured, dotted: the
    forget gate alone), from the "persistence" part of the E4 results."""
    fig = go.Figure()
    palette = ("#2ca02c", "#d62728", "#98df8a", "#ff9896")
    lags = persistence["lags"]
    for i, (name, block) in enumerate(persistence["blocks"].items()):
        color = palette[i % len(palette)]
        fig.add_trace(go.Scatter(x=lags[1:], y=block["curve"][1:], name=f"{name}", legendgroup=name,
                                 mode="lines", line=dict(color=color)))
        fig.add_trace(go.Scatter(x=lags[1:], y=block["gate_only_curve"][1:], name=f"{name}: gate alone",
                                 legendgroup=name, showlegend=False, mode="lines", line=dict(color=color, dash="dot")))
    fig.add_hline(y=0.5, line=dict(color="gray", dash="dot", width=1), annotation_text="half")
    fig.update_layout(height=height, template="plotly_white", xaxis_type="log", yaxis_range=[0, 1.02],
                      xaxis_title="tokens after the write", yaxis_title="retained fraction",
                      title="E4: memory persistence (dotted: the forget gate alone)")
    return fig


def mqar_live_figure(runs: Mapping[str, Mapping], *, title: str = "E1 live: tiny MQAR",
                     height: int = 400) -> go.Figure:
    """E1 live: held-out accuracy vs training step for each finished `train_mqar` result in `runs` (by mixer), from
    the untrained model at step 0; chance dotted."""
    if not runs:
        raise ValueError("runs is empty")
    fig = go.Figure()
    for mixer, run in runs.items():
        fig.add_trace(go.Scatter(x=[0] + [e["step"] for e in run["evals"]],
                                 y=[run["untrained_accuracy"]] + [e["accuracy"] for e in run["evals"]],
                                 name=f'{mixer}: {run["accuracy"]:.2f} after {run["steps"]} steps',
                                 mode="lines+markers", line=dict(color=MIXER_COLORS.get(mixer))))
    fig.add_hline(y=min(r["chance"] for r in runs.values()), line=dict(color="gray", dash="dot", width=1),
                  annotation_text="chance")
    fig.update_layout(height=height, template="plotly_white", yaxis_range=[-0.02, 1.02], title=title,
                      xaxis_title="training step", yaxis_title="held-out accuracy",
                      legend=dict(orientation="h", y=-0.25))
    return fig
