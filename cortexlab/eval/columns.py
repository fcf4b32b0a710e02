"""Measurements behind notebook 08 (cortical columns) on a real model's grouped-query attention.

- `layer_specialization`: per layer, `CorticalColumnAttention`'s Jensen-Shannon specialisation between the GQA
  columns, beside the same divergence between heads *inside* a column (the baseline: how different two heads are
  when they share their keys and values) and between heads of different columns.
- `js_scipy`: the same mean divergence computed with scipy, the independent check.
- `attention_distance`: mean |i - j| under each layer's attention, a locality measure to set beside the tiers.
- `inhibition_run`: `LateralInhibition` learnt on one text's column outputs, measured on another: column
  co-activation (correlation across tokens) and activity, before (W = 0) and after the anti-Hebbian updates.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from cortexlab.neuro import CorticalColumnAttention, LateralInhibition
from cortexlab.neuro.columns import TIERS, _entropy, column_activity


def pairwise_js(probs: torch.Tensor) -> torch.Tensor:
    """JS divergence (nats) between every pair of heads [H, H], mean over batch and queries; probs [B, H, Tq, Tk].
    The same formula as `cortexlab.neuro.columns.mean_pairwise_js_divergence`, one pair at a time (tested equal)."""
    p = probs.float()
    heads = p.shape[1]
    a, b = torch.triu_indices(heads, heads, offset=1)
    own = _entropy(p)
    js = (_entropy(0.5 * (p[:, a] + p[:, b])) - 0.5 * (own[:, a] + own[:, b])).mean((0, 2))
    out = torch.zeros(heads, heads)
    out[a, b] = js
    return out + out.T


@torch.no_grad()
def layer_specialization(records: Mapping, num_groups: int) -> list[dict]:
    """One row per recorded layer (an `AttentionRecord` per layer, as `record_attention` returns them).

    Keys: layer, js_columns (CorticalColumnAttention's specialisation, columns = mean of their heads' attention),
    js_within (mean JS between two heads of the same column), js_between (two heads of different columns),
    max_out_err (max |column attention output - the model's heads|, the check that the module is the model's
    attention). All means run over every query, as the module's does (query 0 sees one key: JS 0 for every pair).
    """
    rows = []
    for layer, rec in records.items():
        heads, dim = rec.q.shape[1], rec.q.shape[3]
        per_group = heads // num_groups
        module = CorticalColumnAttention(num_groups, per_group, dim)
        out, js = module(rec.q, rec.k, rec.v)
        pair = pairwise_js(rec.probs)
        column = torch.arange(heads) // per_group
        same = (column[:, None] == column[None, :]) & ~torch.eye(heads, dtype=torch.bool)
        different = column[:, None] != column[None, :]
        rows.append({
            "layer": int(layer),
            "js_columns": js.item(),
            "js_within": pair[same].mean().item() if same.any() else 0.0,
            "js_between": pair[different].mean().item(),
            "max_out_err": (out.float() - rec.heads.float()).abs().max().item(),
        })
    return rows


def js_scipy(probs: torch.Tensor, num_groups: int) -> float:
    """Mean over batch, queries and column pairs of scipy.spatial.distance.jensenshannon(P_g, P_h) ** 2 (base e),
    with P_g the mean attention of column g's heads: the independent check of `js_columns`."""
    import numpy as np
    from scipy.spatial.distance import jensenshannon

    B, H, T, _ = probs.shape
    cols = probs.double().reshape(B, num_groups, H // num_groups, T, -1).mean(2).numpy()
    values = [jensenshannon(cols[:, g], cols[:, h], axis=-1) ** 2
              for g in range(num_groups) for h in range(g + 1, num_groups)]
    return float(np.mean(values))


def attention_distance(probs: torch.Tensor, skip: int = 1) -> float:
    """Mean over heads and queries of sum_j p_ij (i - j): how far back a layer's attention reaches, in tokens."""
    T = probs.shape[-1]
    lag = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).clamp_min(0).float()
    return (probs.float() * lag).sum(-1)[:, :, skip:].mean().item()


def activity_correlation(activity: torch.Tensor) -> torch.Tensor:
    """Pearson correlation [G, G] of the columns' activities across tokens; activity [B, T, G]."""
    a = activity.reshape(-1, activity.shape[-1]).double()
    return torch.corrcoef(a.T).float()


@torch.no_grad()
def inhibition_run(train_heads: torch.Tensor, test_heads: torch.Tensor, num_groups: int, steps: int = 20,
                   lr: float = 0.01, max_inhibition: float = 0.5) -> dict:
    """Learn `LateralInhibition` from one text's per-head outputs [B, T, H, D] and measure it on another's.

    `steps` anti-Hebbian updates on train_heads viewed as columns [B, T, G, H/G, D]; then, on test_heads, the
    columns' activities before (W = 0, the exact no-op) and after inhibition. Returns {"W" [G, G], "W_history"
    [steps + 1, G, G], "activity_before"/"activity_after" [T, G] (batch 0), "corr_before"/"corr_after" [G, G],
    "mean_before"/"mean_after" [G] and "silent_after" [G] (fraction of tokens where a column's gain is 0)}.
    """
    def columns(heads):
        B, T, H, D = heads.shape
        return heads.reshape(B, T, num_groups, H // num_groups, D)

    module = LateralInhibition(num_groups, max_inhibition=max_inhibition)
    history = [module.get_inhibition()]
    for _ in range(steps):
        module.update_inhibition(columns(train_heads), lr=lr)
        history.append(module.get_inhibition())
    return {**_inhibition_result(module, columns(test_heads), num_groups), "W_history": torch.stack(history)}


def _inhibition_result(module: LateralInhibition, columns: torch.Tensor, num_groups: int) -> dict:
    """Column activity on `columns` [B,T,G,H/G,D] without and with `module`'s inhibition, their correlations,
    means and the fraction of tokens each column is silenced on."""
    before = column_activity(columns)
    after = column_activity(module(columns))
    return {
        "W": module.get_inhibition(),
        "activity_before": before[0],
        "activity_after": after[0],
        "corr_before": activity_correlation(before),
        "corr_after": activity_correlation(after),
        "mean_before": before.reshape(-1, num_groups).mean(0),
        "mean_after": after.reshape(-1, num_groups).mean(0),
        "silent_after": (after.reshape(-1, num_groups) == 0).float().mean(0),
    }


# ---------------------------------------------------------------------------------------
# the same measurements on a NeuroLlama (the columns dashboard)


def column_js_matrix(probs: torch.Tensor, num_groups: int) -> torch.Tensor:
    """JS(P_g, P_h) (nats) for every pair of columns [G, G], mean over batch and queries; probs [B, H, Tq, Tk] and
    P_g the mean attention of column g's heads (query head h in column h // (H / G)). Symmetric, zero diagonal;
    the mean of its upper triangle is `layer_specialization`'s js_columns."""
    B, H, Tq, Tk = probs.shape
    return pairwise_js(probs.float().reshape(B, num_groups, H // num_groups, Tq, Tk).mean(2))


def _pre_softmax_mechanisms(config) -> list[str]:
    found = [name for name in ("enable_hebbian_attention", "enable_habituation") if getattr(config, name)]
    if config.enable_synaptic_modulation and config.synaptic_mode != "context_dependent":
        found.append(f"synaptic_mode={config.synaptic_mode}")
    return found


@torch.no_grad()
def record_neuro_attention(model, input_ids: torch.Tensor, layers) -> dict:
    """`cortexlab.eval.attention.record_attention` for a `NeuroLlamaModel`: one forward of input_ids [B, T], and
    per layer in `layers` an `AttentionRecord` with q, k (after RoPE), v, scores = q k^T / sqrt(D) + mask,
    probs = softmax(scores) and heads = probs v [B, T, H, D] (before lateral inhibition, what it acts on).

    The forward runs as the model is set (eval mode: lateral inhibition reads W, never updates it). Refuses models
    with a mechanism that changes the scores before the softmax (Hebbian, habituation, static or matrix synaptic
    modulation), whose probs are not the backbone's; refuses a forward that exited before a requested layer.
    """
    from cortexlab.eval.attention import AttentionRecord
    from cortexlab.neuro.backbone import apply_rope, repeat_kv

    unsupported = _pre_softmax_mechanisms(model.config)
    if unsupported:
        raise ValueError(f"record_neuro_attention cannot record a model with {', '.join(unsupported)} on")
    layers = [layers] if isinstance(layers, int) else list(layers)
    if not layers or any(not isinstance(i, int) or not 0 <= i < len(model.layers) for i in layers):
        raise ValueError(f"layers must be indices in [0, {len(model.layers)}), got {layers!r}")
    inputs: dict[int, tuple] = {}

    def grab(index):
        def hook(module, args):
            inputs[index] = args[:4]   # x (normed), cos, sin, allowed
        return hook

    handles = [model.layers[i].self_attn.register_forward_pre_hook(grab(i)) for i in layers]
    try:
        model(input_ids)
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(layers) - set(inputs))
    if missing:
        raise ValueError(f"the forward exited before layers {missing} (early exit): nothing recorded there")
    records = {}
    for i in layers:
        attn = model.layers[i].self_attn
        x, cos, sin, allowed = inputs[i]
        b, t, _ = x.shape
        q = apply_rope(attn.q_proj(x).view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(attn.k_proj(x).view(b, t, attn.num_kv_heads, attn.head_dim).transpose(1, 2), cos, sin)
        v = attn.v_proj(x).view(b, t, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        scores = (q @ repeat_kv(k, attn.groups).transpose(2, 3)).float() * attn.scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = scores.softmax(-1)
        heads = (probs.to(v.dtype) @ repeat_kv(v, attn.groups)).transpose(1, 2)
        records[i] = AttentionRecord(i, x, q, k, v, scores, probs, heads)
    return records


def learned_inhibition(model) -> dict[int, torch.Tensor]:
    """Each layer's learnt lateral-inhibition matrix W [G, G] (row g: how strongly each column inhibits g) of a
    NeuroLlama with enable_lateral_inhibition; {} without it."""
    out = {}
    for i, layer in enumerate(model.layers):
        mech = layer.self_attn.mechanisms
        if mech is not None and mech.lateral_inhibition is not None:
            out[i] = mech.lateral_inhibition.get_inhibition()
    return out


@torch.no_grad()
def inhibition_effect(heads: torch.Tensor, W: torch.Tensor, num_groups: int) -> dict:
    """A fixed `LateralInhibition` W [G, G] on per-head outputs heads [B, T, H, D]: the columns' activities
    a_g = mean |x_g| before and after a'_g = max(0, a_g - sum_h W_gh a_h). Same keys as `inhibition_run` but
    "W_history": {"W", "activity_before"/"activity_after" [T, G] (batch 0), "corr_before"/"corr_after" [G, G],
    "mean_before"/"mean_after" [G], "silent_after" [G]}."""
    B, T, H, D = heads.shape
    columns = heads.reshape(B, T, num_groups, H // num_groups, D)
    module = LateralInhibition(num_groups)
    module.inhibition.copy_(W)
    return _inhibition_result(module, columns, num_groups)


def tier_summary(rows, distance, organizer) -> list[dict]:
    """Per tier of `organizer` (a `HierarchicalColumnOrganizer`), the mean over its layers of the
    `layer_specialization` rows' js_columns, js_between and js_within, their ratio across / within,
    and the mean `attention_distance` (`distance[layer]`). Tiers with no row are left out."""
    by_layer = {r["layer"]: r for r in rows}
    out = []
    for tier in TIERS:
        span = organizer.layer_range(tier)
        selected = [by_layer[layer] for layer in span if layer in by_layer]
        if not selected:
            continue
        mean = {key: sum(r[key] for r in selected) / len(selected) for key in ("js_columns", "js_between", "js_within")}
        out.append({"tier": tier, "first_layer": span.start, "last_layer": span.stop - 1, **mean,
                    "across_within": mean["js_between"] / mean["js_within"] if mean["js_within"] > 0 else float("nan"),
                    "distance": sum(distance[r["layer"]] for r in selected) / len(selected)})
    return out
