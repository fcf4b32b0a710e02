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
from cortexlab.neuro.columns import _entropy, column_activity


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
    before = column_activity(columns(test_heads))
    after = column_activity(module(columns(test_heads)))
    return {
        "W": module.get_inhibition(),
        "W_history": torch.stack(history),
        "activity_before": before[0],
        "activity_after": after[0],
        "corr_before": activity_correlation(before),
        "corr_after": activity_correlation(after),
        "mean_before": before.reshape(-1, num_groups).mean(0),
        "mean_after": after.reshape(-1, num_groups).mean(0),
        "silent_after": (after.reshape(-1, num_groups) == 0).float().mean(0),
    }
