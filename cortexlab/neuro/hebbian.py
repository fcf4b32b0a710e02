"""Hebbian attention: co-activated query/key patterns bias later attention, within and across calls.

Reference: Hebb (1949) *The Organization of Behaviour*; Eliasmith et al. (2024) "Short-term Hebbian
learning as transformer attention", PLOS Comput. Biol.; three-factor rules: Fremaux & Gerstner (2016).

Per head, with scale s = 1/sqrt(D), queries q_i (i = 0..Tq-1 within this call), keys k_j:

    A_ij   = softmax_j( s q_i.k_j + eta s q_i^T H_i k_j )                       (causal mask kept)
    H_i    = c_i H_0 + r lr s sum_{t<i} lam^(i-1-t) q_t kbar_t^T                  (only queries t < i)
    kbar_t = sum_j P0_tj k_j,   P0 = softmax(s Q K^T + mask)                     (what query t attended)
    c_i    = 1 - min(|r|, 1) (1 - lam^i)

H_0 [H, D, D] is the co-activation (fast-weight) state carried across calls; lam = `decay_rate` per
token, lr = `learning_rate`, eta = `eta`; r = 1 for `HebbianAttention` (then c_i = lam^i and H follows
H_{i+1} = lam H_i + lr s q_i kbar_i^T), r = the reward for `RewardModulatedHebbian`. The co-activation
uses the attention *without* the Hebbian bias (P0), so the whole sequence is computed in parallel:

    q_i^T H_i = c_i q_i^T H_0 + r lr s sum_{t<i} lam^(i-1-t) (q_i.q_t) kbar_t^T   ->   bias = eta s M K^T

with M = c (Q H_0) + r lr s ((Lam * Q Q^T) Kbar) ("scores of scores"), never a per-token D x D matrix.
The bias for query i depends only on positions <= i: causal. After the forward (no_grad), H_0 <- H_Tq
averaged over the batch, each head clipped to Frobenius norm `max_hebbian_norm`. For batch size 1 and no
clipping, a prefill followed by token-by-token calls reproduces one forward over the whole sequence.

Memory: persistent H x D x D fp32 state; per forward O(B H Tq Tk) for P0 and the bias, like eager attention.
Neutral: eta = 0 gives plain softmax attention exactly (and so does H_0 = 0 for the first query).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cortexlab.checks import check_int, check_number


@dataclass
class HebbianConfig:
    """lr (`learning_rate`) and lam (`decay_rate`, per token) of the H update; eta scales the bias."""

    learning_rate: float = 0.01
    decay_rate: float = 0.99
    max_hebbian_norm: float = 10.0
    eta: float = 1.0

    def __post_init__(self):
        check_number("learning_rate", self.learning_rate, 0)
        check_number("decay_rate", self.decay_rate, 0, 1)
        check_number("max_hebbian_norm", self.max_hebbian_norm, 0, low_open=True)
        check_number("eta", self.eta)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, num_heads: int, head_dim: int) -> None:
    for name, x in (("Q", q), ("K", k)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
        if x.dim() != 4 or x.shape[-1] != head_dim:
            raise ValueError(f"{name} must be [B, heads, T, {head_dim}], got {tuple(x.shape)}")
    if q.shape[1] != num_heads:
        raise ValueError(f"Q must have {num_heads} heads, got {q.shape[1]}")
    if k.shape[0] != q.shape[0] or num_heads % k.shape[1]:
        raise ValueError(f"K {tuple(k.shape)} must share Q's batch and have heads dividing {num_heads}")
    if k.shape[2] < q.shape[2]:
        raise ValueError(f"K must cover at least Q's {q.shape[2]} positions, got {k.shape[2]}")


class HebbianAttention(nn.Module):
    """softmax(QK^T/sqrt(D) + eta Q H K^T) with a causal within-sequence H and a state across calls.

    See the module docstring for the equations. `forward(Q, K, V)` takes Q [B, H, Tq, D] and K, V
    [B, H_kv, Tk, D] (H_kv divides H; Tq <= Tk, queries are the last Tq positions, as in decoding
    with a KV cache) and returns the per-head outputs [B, Tq, H, D_v] (the cortexlab.neuro layout).
    `score_bias(q, k, scores)` is the same mechanism as a pre-softmax modifier for a backbone.
    The state H is a non-persistent buffer (a per-session fast weight, not saved in state_dict).
    """

    def __init__(self, head_dim: int, num_heads: int = 1, config: HebbianConfig | None = None):
        super().__init__()
        check_int("head_dim", head_dim)
        check_int("num_heads", num_heads)
        self.head_dim, self.num_heads = head_dim, num_heads
        self.config = config or HebbianConfig()
        self.register_buffer("hebbian", torch.zeros(num_heads, head_dim, head_dim), persistent=False)

    def forward(self, Q, K, V, causal: bool = True, *, update_state: bool = True, return_attention: bool = False):
        """Attention output [B, Tq, H, D_v] (and the probabilities [B, H, Tq, Tk] if return_attention)."""
        return self._attend(Q, K, V, causal, None, update_state, return_attention)

    def score_bias(self, q, k, scores, *, update_state: bool = True) -> torch.Tensor:
        """Finite bias [B, H, Tq, Tk] to add to masked logits `scores` (masked entries stay -inf)."""
        return self._checked_bias(q, k, scores, None, update_state)

    def get_hebbian_strength(self, per_head: bool = False):
        """Frobenius norm of H: a float, or a [H] tensor of per-head norms."""
        norms = self.hebbian.flatten(1).norm(dim=1)
        return norms.clone() if per_head else self.hebbian.norm().item()

    def reset_state(self) -> None:
        self.hebbian.zero_()

    def _attend(self, q, k, v, causal, reward, update_state, return_attention):
        _check_qkv(q, k, self.num_heads, self.head_dim)
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise TypeError("V must be a floating-point tensor")
        if v.dim() != 4 or v.shape[:3] != k.shape[:3]:
            raise ValueError(f"V must be [B, H_kv, Tk, D_v] matching K {tuple(k.shape[:3])}")
        keys = self._expand(q, k).float()
        scores = torch.matmul(q.float(), keys.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if causal:
            scores = scores.masked_fill(self._future_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
        probs = torch.softmax(scores + self._bias(q, k, scores, reward, update_state), dim=-1)
        out = torch.matmul(probs, self._expand(q, v).float()).to(v.dtype).transpose(1, 2)
        return (out, probs) if return_attention else out

    def _checked_bias(self, q, k, scores, reward, update_state):
        _check_qkv(q, k, self.num_heads, self.head_dim)
        expected = (*q.shape[:3], k.shape[2])
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != expected:
            raise ValueError(f"scores must be [B, H, Tq, Tk] = {expected}")
        return self._bias(q, k, scores, reward, update_state)

    def _bias(self, q, k, scores, reward, update_state):
        """eta s M K^T with M_i = q_i^T H_i (module docstring); commits H_Tq if update_state."""
        B, _, Tq, _ = q.shape
        k = self._expand(q, k).float()
        cfg, scale = self.config, 1.0 / math.sqrt(self.head_dim)
        r = torch.ones(B, device=q.device) if reward is None else reward
        lam_pow = cfg.decay_rate ** torch.arange(Tq + 1, device=q.device, dtype=torch.float32)       # lam^i, i<=Tq
        carry = 1 - r.abs().clamp(max=1)[:, None] * (1 - lam_pow)                                    # c_i [B, Tq+1]
        kbar = torch.matmul(torch.softmax(scores.float(), dim=-1).nan_to_num(0.0), k)   # [B,H,Tq,D]; 0: padding row
        trace = self._trace_weights(Tq, q.device)                                                    # Lam [Tq, Tq]
        qf = q.float()
        gain = (r * cfg.learning_rate * scale)[:, None, None, None]
        state = self.hebbian.to(torch.float32, copy=True)   # a copy: _commit may overwrite H before backward
        hebb_q = carry[:, None, :Tq, None] * torch.matmul(qf, state) \
            + gain * torch.matmul(trace * torch.matmul(qf, qf.transpose(-1, -2)), kbar)              # M = q_i^T H_i
        if update_state:
            self._commit(qf, kbar, carry[:, Tq], gain)
        return (cfg.eta * scale) * torch.matmul(hebb_q, k.transpose(-1, -2)).to(scores.dtype)

    @torch.no_grad()
    def _commit(self, qf, kbar, carry, gain) -> None:
        """H_0 <- clip(mean_b [c_Tq H_0 + r lr s sum_t lam^(Tq-1-t) q_t kbar_t^T]), per-head norm clip."""
        age = torch.arange(qf.shape[2] - 1, -1, -1, device=qf.device, dtype=torch.float32)
        weighted = qf * (self.config.decay_rate ** age)[:, None]
        new = carry[:, None, None, None] * self.hebbian + gain * torch.einsum("bhtd,bhte->bhde", weighted, kbar)
        new = new.mean(0)
        if not torch.isfinite(new).all():
            raise ValueError("Q/K (or reward) are not finite: the Hebbian state would be corrupted")
        norms = new.flatten(1).norm(dim=1).clamp_min(1e-30)
        scale = (self.config.max_hebbian_norm / norms).clamp(max=1.0)
        self.hebbian.copy_(new * scale[:, None, None])

    def _trace_weights(self, T: int, device) -> torch.Tensor:
        """Lam_it = lam^(i-1-t) for t < i, else 0: [T, T] fp32."""
        idx = torch.arange(T, device=device, dtype=torch.float32)
        lag = (idx[:, None] - 1 - idx[None, :]).clamp_min(0)
        return torch.tril(self.config.decay_rate ** lag, diagonal=-1)

    @staticmethod
    def _future_mask(Tq: int, Tk: int, device) -> torch.Tensor:
        pos = torch.arange(Tk - Tq, Tk, device=device)
        return torch.arange(Tk, device=device)[None, :] > pos[:, None]

    @staticmethod
    def _expand(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return kv.repeat_interleave(q.shape[1] // kv.shape[1], dim=1)


class RewardModulatedHebbian(HebbianAttention):
    """Three-factor Hebbian attention: pre x post x reward (Fremaux & Gerstner 2016; Hebb 1949).

    Same equations as `HebbianAttention` with r = `reward` (a float or one value per batch element):
    H_i = (1 - min(|r|, 1)(1 - lam^i)) H_0 + r lr s sum_{t<i} lam^(i-1-t) q_t kbar_t^T. |r| sets how
    plastic the synapses are (the decay of H_0 saturates at |r| = 1, so H_0 never flips sign), the sign of
    r whether co-activations are potentiated or depressed: r = 0 leaves H exactly unchanged (attention
    uses the stored H_0 only), r = 1 is `HebbianAttention`, r < 0 weakens the co-activated associations.
    Memory: as `HebbianAttention`.
    """

    def forward(self, Q, K, V, causal: bool = True, *, reward, update_state: bool = True,
                return_attention: bool = False):
        return self._attend(Q, K, V, causal, self._check_reward(reward, Q), update_state, return_attention)

    def score_bias(self, q, k, scores, *, reward, update_state: bool = True) -> torch.Tensor:
        return self._checked_bias(q, k, scores, self._check_reward(reward, q), update_state)

    @staticmethod
    def _check_reward(reward, q) -> torch.Tensor:
        if not isinstance(q, torch.Tensor) or q.dim() != 4:
            raise ValueError("Q must be [B, H, T, D]")
        if isinstance(reward, bool) or not isinstance(reward, (int, float, torch.Tensor)):
            raise TypeError(f"reward must be a float or a tensor, got {type(reward).__name__}")
        r = torch.as_tensor(reward, dtype=torch.float32, device=q.device)
        if r.dim() > 1 or (r.dim() == 1 and r.shape[0] != q.shape[0]):
            raise ValueError(f"reward must be a scalar or [B] = [{q.shape[0]}], got shape {tuple(r.shape)}")
        if not torch.isfinite(r).all():
            raise ValueError("reward must be finite")
        return r.expand(q.shape[0])
