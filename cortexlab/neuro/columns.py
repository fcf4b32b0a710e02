"""Cortical columns: GQA groups as columns, their specialisation, lateral inhibition and hierarchical tiers.

- `CorticalColumnAttention`: grouped-query attention that also measures how differently the columns attend
  (mean pairwise Jensen-Shannon divergence, differentiable, so `SpecializationLoss` can maximise it).
- `LateralInhibition`: co-active columns learn to inhibit each other (anti-Hebbian), a per-token gain on each column.
- `HierarchicalColumnOrganizer`: syntactic / semantic / abstract tiers by relative depth, and their targets.

Layouts (neuro contract): q [B, H, T, D] with H = G * heads_per_group, k and v [B, G, T, D], per-head outputs
[B, T, H, D]; column outputs [B, T, G, ...] (e.g. the head outputs viewed as [B, T, G, heads_per_group, D]).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from cortexlab.checks import check_int, check_number

TIERS = ("syntactic", "semantic", "abstract")
# the design's table: brain analogy, specialisation, and a target mix over TIERS for a layer of that tier
TIER_INFO = {
    "syntactic": ("V1/V2", "Low-level features, token patterns", (0.7, 0.2, 0.1)),
    "semantic": ("V4/IT", "Mid-level meaning, phrase structure", (0.1, 0.7, 0.2)),
    "abstract": ("PFC", "High-level reasoning, goal alignment", (0.1, 0.2, 0.7)),
}


def _check_index(name: str, value, size: int) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 0 <= value < size:
        raise ValueError(f"{name} must be an int in [0, {size}), got {value!r}")


def _check_float_tensor(name: str, x, min_ndim: int, max_ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not min_ndim <= x.ndim <= max_ndim:
        raise ValueError(f"{name} must have {min_ndim} to {max_ndim} dims, got shape {tuple(x.shape)}")


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats over the last dim, with 0 log 0 = 0 and a finite gradient at p = 0."""
    return -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1)


def mean_pairwise_js_divergence(column_probs: torch.Tensor) -> torch.Tensor:
    """Mean over batch, queries and column pairs g < h of JS(P_g, P_h), in nats (natural log, at most ln 2).

    column_probs [B, G, Tq, Tk]: each column's attention distribution per query. JS(P, Q) = H(M) - (H(P) + H(Q)) / 2
    with M = (P + Q) / 2 -- equal to scipy.spatial.distance.jensenshannon(P, Q) ** 2 (base e). Float32 scalar,
    differentiable; 0 for G = 1. Memory: one [B, G(G-1)/2, Tq, Tk] mixture.
    """
    num_columns = column_probs.shape[1]
    if num_columns < 2:
        return column_probs.new_zeros((), dtype=torch.float32)
    p = column_probs.float()
    gi, gj = torch.triu_indices(num_columns, num_columns, offset=1, device=p.device)
    column_entropy = _entropy(p)
    js = _entropy(0.5 * (p[:, gi] + p[:, gj])) - 0.5 * (column_entropy[:, gi] + column_entropy[:, gj])
    return js.mean()


class CorticalColumnAttention(nn.Module):
    """GQA groups as cortical columns: plain grouped-query attention plus a measure of column specialisation.

    Equation: A_h = softmax(q_h K_g^T / sqrt(D) + causal mask), o_h = A_h V_g for query head h in column
    g = h // heads_per_group; column attention P_g = mean of A_h over its heads; specialisation =
    mean_{b, i, g<h} JS(P_g[b, i], P_h[b, i]) in nats (natural log; scipy's jensenshannon(., ., base=e) ** 2).
    Higher = columns attend to different keys. Queries are the last Tq of Tk positions when causal.
    Reference: cortical columns (Mountcastle, 1997) -- vertically organised groups of neurons sharing inputs act as
    semi-independent processing units that specialise for different features.
    Memory: per forward O(B H Tq Tk) probabilities like eager attention, plus O(B G(G-1)/2 Tq Tk) for the
    specialisation (skip it with compute_specialization=False); no state, no parameters.
    """

    def __init__(self, num_groups: int, heads_per_group: int, head_dim: int):
        super().__init__()
        for name, value in (("num_groups", num_groups), ("heads_per_group", heads_per_group), ("head_dim", head_dim)):
            check_int(name, value)
        self.num_groups, self.heads_per_group, self.head_dim = int(num_groups), int(heads_per_group), int(head_dim)
        self.num_heads = self.num_groups * self.heads_per_group

    def _check_inputs(self, q, k, v, causal) -> None:
        for name, x in (("Q", q), ("K", k), ("V", v)):
            _check_float_tensor(name, x, 4, 4)
        batch, heads, tq, dim = q.shape
        if heads != self.num_heads or dim != self.head_dim:
            raise ValueError(f"Q must be [B, {self.num_heads}, T, {self.head_dim}], got {tuple(q.shape)}")
        for name, x in (("K", k), ("V", v)):
            if x.shape[0] != batch or x.shape[1] != self.num_groups or x.shape[3] != self.head_dim:
                raise ValueError(f"{name} must be [B, {self.num_groups}, Tk, {self.head_dim}], got {tuple(x.shape)}")
        if k.shape[2] != v.shape[2]:
            raise ValueError(f"K and V must have the same length, got {tuple(k.shape)}, {tuple(v.shape)}")
        if causal and tq > k.shape[2]:
            raise ValueError(f"causal attention needs Tq <= Tk, got Q {tuple(q.shape)}, K {tuple(k.shape)}")

    def forward(
        self,
        Q: torch.Tensor,
        K: torch.Tensor,
        V: torch.Tensor,
        causal: bool = True,
        compute_specialization: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (per-head outputs [B, Tq, H, D] in Q's dtype, specialisation float32 scalar or None)."""
        self._check_inputs(Q, K, V, causal)
        batch, heads, tq, dim = Q.shape
        tk = K.shape[2]
        q = Q.float().reshape(batch, self.num_groups, self.heads_per_group, tq, dim)
        scores = q @ K.float().unsqueeze(2).transpose(-1, -2) / math.sqrt(dim)  # [B, G, n, Tq, Tk]
        if causal:
            future = torch.ones(tq, tk, dtype=torch.bool, device=Q.device).triu(tk - tq + 1)
            scores = scores.masked_fill(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = (probs @ V.float().unsqueeze(2)).reshape(batch, heads, tq, dim).transpose(1, 2).to(Q.dtype)
        div = mean_pairwise_js_divergence(probs.mean(2)) if compute_specialization else None
        return out, div


def column_activity(group_outputs: torch.Tensor) -> torch.Tensor:
    """Activity ("firing rate") of each column per token: mean |x| over the trailing dims -> float32 [B, T, G].

    A [B, T, G] input is taken as activities already (|x|). Mean |x| rather than an RMS keeps the gradient finite
    for a silent column.
    """
    x = group_outputs.float().abs()
    return x.flatten(3).mean(-1) if x.ndim > 3 else x


class LateralInhibition(nn.Module):
    """Lateral inhibition between columns, learnt by an anti-Hebbian rule from their co-activation.

    Activity a_g = mean |x_g| per token (`column_activity`). Inhibited activity a'_g = max(0, a_g - sum_h W_gh a_h);
    each column's output is rescaled to it, y_g = x_g * a'_g / a_g (direction kept, gain in [0, 1], per token, so
    causal). W is non-negative with a zero diagonal; W = 0 (the initial and reset state) is an exact no-op.
    Anti-Hebbian update: W_gh <- clip(W_gh + lr * C_gh, 0, max_inhibition) for g != h, with the normalised
    co-activation C_gh = mean_t(a_g a_h) / max_k mean_t(a_k^2) in [0, 1]: columns that fire together come to
    inhibit each other, columns never active together are left alone.
    Reference: lateral inhibition in cortex (Isaacson & Scanziani, 2011) -- inhibitory interneurons enforce
    competition between neighbouring columns, promoting sparse, non-redundant representations.
    Memory: a persistent G x G buffer; per forward O(B T G) activities and the rescaled copy of the outputs.
    """

    def __init__(self, num_groups: int, max_inhibition: float = 0.5):
        super().__init__()
        check_int("num_groups", num_groups)
        check_number("max_inhibition", max_inhibition, 0, 1, low_open=True)
        self.num_groups, self.max_inhibition = int(num_groups), float(max_inhibition)
        self.register_buffer("inhibition", torch.zeros(self.num_groups, self.num_groups))

    def _check_group_tensor(self, name: str, x) -> None:
        _check_float_tensor(name, x, 3, 8)
        if x.shape[2] != self.num_groups:
            raise ValueError(f"{name} must be [B, T, {self.num_groups}, ...], got shape {tuple(x.shape)}")

    def forward(self, group_outputs: torch.Tensor) -> torch.Tensor:
        """Inhibit each column's output [B, T, G, ...] by the others' activity; same shape and dtype."""
        self._check_group_tensor("group_outputs", group_outputs)
        activity = column_activity(group_outputs)
        # a copy, so that an update_inhibition before backward does not invalidate this graph
        inhibition = activity @ self.inhibition.to(torch.float32, copy=True).T
        gain = (1.0 - inhibition / activity.clamp_min(1e-12)).clamp_min(0.0)
        gain = gain.view(*gain.shape, *([1] * (group_outputs.ndim - 3)))
        return (group_outputs * gain).to(group_outputs.dtype)

    @torch.no_grad()
    def update_inhibition(self, group_activations: torch.Tensor, lr: float = 0.01) -> None:
        """One anti-Hebbian step from the columns' outputs or activities [B, T, G, ...] (see the class docstring)."""
        self._check_group_tensor("group_activations", group_activations)
        check_number("lr", lr, 0, low_open=True)
        if not torch.isfinite(group_activations).all():
            raise ValueError("group_activations must be finite (found NaN or inf)")
        activity = column_activity(group_activations).reshape(-1, self.num_groups)
        co_activation = activity.T @ activity / activity.shape[0]
        co_activation = co_activation / co_activation.diagonal().max().clamp_min(1e-12)
        updated = (self.inhibition + lr * co_activation.to(self.inhibition)).clamp(0.0, self.max_inhibition)
        self.inhibition.copy_(updated.fill_diagonal_(0.0))

    def get_inhibition(self) -> torch.Tensor:
        """A copy of the inhibition matrix W [G, G] (row g: how strongly each column inhibits column g)."""
        return self.inhibition.detach().clone()

    def reset_state(self) -> None:
        """Forget all learnt inhibition (W = 0: the exact no-op)."""
        self.inhibition.zero_()


class HierarchicalColumnOrganizer:
    """Assigns each layer's columns to a tier of the ventral-stream hierarchy: syntactic, semantic or abstract.

    Rule: layer l of L belongs to a tier by the relative depth of its centre, f = (l + 0.5) / L, against the design's
    boundaries for 32 layers: syntactic if f < 10/32, semantic if f < 20/32, else abstract. For L = 32 this is exactly
    the design's table (0-9 / 10-19 / 20-31); for L = 16 it gives 0-4 / 5-9 / 10-15, for L = 80 0-24 / 25-49 / 50-79;
    with L >= 3 every tier has at least one layer.
    Reference: the ventral visual hierarchy (Felleman & Van Essen, 1991) -- V1/V2 code simple features, V4/IT objects,
    prefrontal cortex abstract rules.
    Memory: one tier index per layer; no tensors are kept.
    """

    def __init__(self, num_layers: int, num_groups: int):
        check_int("num_layers", num_layers)
        check_int("num_groups", num_groups)
        self.num_layers, self.num_groups = int(num_layers), int(num_groups)
        # integer form of (l + 0.5) / L < 10/32 (resp. 20/32): 32 (2l + 1) < 20 L (resp. 40 L)
        self._tier_index = [
            0 if 32 * (2 * layer + 1) < 20 * num_layers else 1 if 32 * (2 * layer + 1) < 40 * num_layers else 2
            for layer in range(num_layers)
        ]

    def get_tier(self, layer_idx: int) -> str:
        """The tier name of a layer: "syntactic", "semantic" or "abstract"."""
        _check_index("layer_idx", layer_idx, self.num_layers)
        return TIERS[self._tier_index[layer_idx]]

    def layer_range(self, tier: str) -> range:
        """The layers of a tier, as a range (empty for a tier that a very shallow model does not have)."""
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
        layers = [layer for layer, index in enumerate(self._tier_index) if TIERS[index] == tier]
        return range(layers[0], layers[-1] + 1) if layers else range(0)

    def get_column_role(self, layer_idx: int, group_idx: int) -> str:
        """The role of column `group_idx` in layer `layer_idx`: its layer's tier (all columns of a layer share it)."""
        _check_index("group_idx", group_idx, self.num_groups)
        return self.get_tier(layer_idx)

    def get_specialization_targets(self, layer_idx: int) -> dict:
        """Targets for a layer: {"tier", "target_distribution" (float32 tensor over TIERS, sums to 1), "tiers",
        "layer_range", "brain_analogy", "specialization", "num_groups"}."""
        tier = self.get_tier(layer_idx)
        brain_analogy, specialization, target = TIER_INFO[tier]
        target = torch.tensor(target, dtype=torch.float64)
        return {
            "tier": tier,
            "target_distribution": (target / target.sum()).float(),
            "tiers": TIERS,
            "layer_range": self.layer_range(tier),
            "brain_analogy": brain_analogy,
            "specialization": specialization,
            "num_groups": self.num_groups,
        }
