"""Adaptive head temperature: homeostatic gain control of each head's attention sharpness.

Cortical neurons keep their activity near a set point: when input drive changes, synaptic gain
is scaled to bring the firing back (homeostatic plasticity, Turrigiano 2008; gain control by
divisive normalisation, Carandini & Heeger 2012). Mapped onto attention, the "activity" of a head
at query i is how focused its attention is, measured by the normalised entropy of its row

    u_hi = H(softmax(s_hi)) / log n_i  in [0, 1]          n_i: keys the query may see (u = 0 when n_i = 1)

and the gain on the row's scores moves u back towards the head's set point m_hi:

    out_hi = g_hi * s_hi,   g_hi = exp(strength * (u_hi - m_hi)),   temperature tau_hi = 1 / g_hi
    m_hi   = target                                         (a fixed set point), or
    m_hi   = (U_h + sum_{t <= i} u_ht) / (N_h + i + 1)      (target=None: the head's causal running mean;
                                                             queries that see no key, i.e. padding, are skipped)

strength > 0 sharpens rows that are more diffuse than the set point and softens rows that are
sharper (homeostasis); strength < 0 exaggerates the deviation; strength = 0 is an exact no-op.
The running mean only looks at queries <= i, so the rule is causal, and U_h, N_h carry it across
calls (decoding with a KV cache) until `reset_state()`. Masked scores (-inf) stay masked since
g > 0. u is computed without gradient: the gain is a read-out of the attention, not a learned path.

Memory: persistent [B, H] running sums and counts; per call the [B, H, Tq] temperatures (kept for plots) and one
fp32 softmax of the scores, [B, H, Tq, Tk], freed after the call.
"""
from __future__ import annotations

import torch
from torch import nn

from cortexlab.checks import check_int, check_number


class AdaptiveHeadTemperature(nn.Module):
    """Per-head, per-query temperature that pulls each head's attention entropy to a set point.

    `forward(scores, use_cache=False)`: scores [B, H, Tq, Tk] (masked entries -inf; the queries are the
    last Tq of the Tk positions) -> scores * gain, same shape and dtype. use_cache continues the
    running mean of the previous call. See the module docstring for the equations.
    """

    def __init__(self, num_heads: int, strength: float = 1.0, target: float | None = None):
        super().__init__()
        check_int("num_heads", num_heads)
        check_number("strength", strength)
        check_number("target", target, 0, 1, allow_none=True)
        self.num_heads, self.strength, self.target = num_heads, float(strength), target
        self.register_buffer("entropy_sum", torch.zeros(0, num_heads), persistent=False)
        self.register_buffer("count", torch.zeros(0, num_heads), persistent=False)
        self.register_buffer("temperature", torch.ones(0, num_heads, 0), persistent=False)

    @staticmethod
    @torch.no_grad()
    def normalised_entropy(scores: torch.Tensor) -> torch.Tensor:
        """u [B, H, Tq] = H(softmax(scores)) / log(number of unmasked keys); 0 where one key (or none) is visible."""
        s = scores.float()
        p = s.softmax(-1).nan_to_num_(0.0)
        entropy = -torch.xlogy(p, p).sum(-1)
        visible = torch.isfinite(s).sum(-1).clamp_min(1).float()
        return torch.where(visible > 1, entropy / visible.log().clamp_min(1e-12), torch.zeros_like(entropy))

    def forward(self, scores: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        if not isinstance(scores, torch.Tensor) or not scores.is_floating_point() or scores.ndim != 4:
            raise ValueError(f"scores must be a floating-point tensor [B, H, Tq, Tk], got "
                             f"{getattr(scores, 'shape', type(scores).__name__)}")
        B, H, Tq, _ = scores.shape
        if H != self.num_heads:
            raise ValueError(f"scores has {H} heads, expected num_heads={self.num_heads}")
        carry = use_cache and self.entropy_sum.shape[0] == B
        if use_cache and self.entropy_sum.numel() and not carry:
            raise ValueError(f"use_cache: the running mean was kept for batch {self.entropy_sum.shape[0]}, "
                             f"this call has batch {B} (call reset_state() to start a new sequence)")
        u = self.normalised_entropy(scores)                                            # [B, H, Tq]
        seen = torch.isfinite(scores).any(-1).to(u.dtype)                              # 0: a padding query
        prior_sum = self.entropy_sum if carry else u.new_zeros(B, H)
        prior_n = self.count if carry else u.new_zeros(B, H)
        if self.target is None:
            steps = (prior_n[..., None] + seen.cumsum(-1)).clamp_min(1.0)
            set_point = (prior_sum[..., None] + (u * seen).cumsum(-1)) / steps
        else:
            set_point = torch.full_like(u, float(self.target))
        gain = torch.exp(self.strength * (u - set_point))
        self.entropy_sum = prior_sum + (u * seen).sum(-1)
        self.count = prior_n + seen.sum(-1)
        self.temperature = gain.reciprocal()
        return scores * gain[..., None].to(scores.dtype)

    def reset_state(self) -> None:
        """Forget the running set point and the last temperatures (start of a new sequence)."""
        self.entropy_sum = self.entropy_sum.new_zeros(0, self.num_heads)
        self.count = self.count.new_zeros(0, self.num_heads)
        self.temperature = self.temperature.new_ones(0, self.num_heads, 0)
