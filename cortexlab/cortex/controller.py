"""`MetacognitiveController`: live signals that steer what the memory writes, forgets and keeps.

Two causal signals per token t (and head h):

    surprise  e_t = ||v_t - a_t P_{t-1}^T k_t|| / ||v_t||      how wrong the memory's recall is
    entropy   u_t = H(softmax(lm_head(norm(r_t)))) / log V     the base model's uncertainty

P is a *probe* memory: the sidecar's memory run with the unmodulated gates (one extra
gated-delta-rule pass, so the signal stays parallel over the sequence; modulating the
gates with the modulated memory's own error would make the recurrence non-linear). The
entropy is read through the "logit lens": the base model's final norm and output head
applied to the residual stream r_t entering one layer (`CortexWrapConfig.entropy_layer`,
by default the first with a sidecar), once per forward and shared by every sidecar (no
gradient; the base is frozen). With f_t = [e_t, u_t] and per-head weights (all zero at the start):

    beta_t   = sigmoid(w_b.x_t + c_write . f_t)                  write strength
    g_t      = gate(w_a.x_t + b + c_forget . f_t)                forgetting
    beta^s_t = beta_t sigmoid(c_cons . f_t + b_cons)             consolidation into a slow memory
    o_t      = o^fast_t + r_h o^slow_t                           r_h = 0 at the start

The slow memory (same keys and values, a learned per-head decay starting at 0.9999)
absorbs what the controller chooses to consolidate and outlives the fast one. With every
weight and r_h at zero the controller changes nothing: the sidecar computes exactly what
it computes without one (tested); training moves the weights.
"""
from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

NUM_SIGNALS = 2          # surprise, entropy
SLOW_DECAY_LOGIT = -9.0  # slow memory: a = exp(-softplus(-9)) ~ 0.99988, half-life ~5.6k tokens


def predictive_entropy(residual: torch.Tensor, final_norm: nn.Module, lm_head: nn.Module,
                       block_tokens: int = 256) -> torch.Tensor:
    """u_t = H(softmax(lm_head(final_norm(r_t)))) / log V, [B, T] in [0, 1], without gradient.

    u_t depends on r_t alone, so it is computed once per distinct row and gathered back: at the
    first layer r_t is the token's embedding and a 2k-token text holds ~500 distinct tokens (4x
    less output-head work, exactly the same values). Blocks of rows keep the [rows, V] logits small.
    """
    B, T, d = residual.shape
    with torch.no_grad():
        rows, inverse = torch.unique(residual.reshape(B * T, d), dim=0, return_inverse=True)
        out = rows.new_empty(rows.shape[0], dtype=torch.float32)
        for s in range(0, rows.shape[0], block_tokens):
            logits = lm_head(final_norm(rows[s:s + block_tokens])).float()
            logp = logits.log_softmax(-1)
            out[s:s + block_tokens] = -(logp.exp() * logp).sum(-1) / math.log(logits.shape[-1])
    return out[inverse].view(B, T)


class TokenEntropyCache:
    """u_t for a residual stream that is a function of the token alone (the input of layer 0 is the
    token's embedding), remembered per token id: after the first sight of a token its entropy
    costs a lookup instead of a pass through the output head (the largest matmul of a small model).

    Every row is checked against the row the cached value was computed from (by its sum), so a
    stream that is not a pure function of the id (added position embeddings, a caller's own
    `inputs_embeds`) is computed directly, never looked up wrongly; the cache is cleared when the
    final norm or output head weights change in place.
    """

    def __init__(self, final_norm: nn.Module, lm_head: nn.Module, vocab_size: int):
        self.final_norm, self.lm_head = final_norm, lm_head
        self.vocab_size = vocab_size
        self.entropy = self.row_sum = None
        self._weights_seen = None
        self._lock = threading.Lock()

    def _weights_key(self):
        return tuple((p.data_ptr(), p._version) for m in (self.final_norm, self.lm_head) for p in m.parameters())

    def __call__(self, input_ids: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """[B, T] entropies of `residual` [B, T, d] whose rows belong to tokens `input_ids` [B, T]."""
        if input_ids.shape != residual.shape[:2]:
            return predictive_entropy(residual, self.final_norm, self.lm_head)
        with torch.no_grad(), self._lock:
            ids = input_ids.reshape(-1)
            rows = residual.reshape(ids.shape[0], -1)
            sums = rows.float().sum(-1)
            if self.entropy is None or self._weights_key() != self._weights_seen or \
                    self.entropy.device != rows.device:
                self.entropy = torch.full((self.vocab_size,), float("nan"), device=rows.device)
                self.row_sum = torch.full((self.vocab_size,), float("nan"), device=rows.device)
                self._weights_seen = self._weights_key()
            inside = (ids >= 0) & (ids < self.vocab_size)
            safe = ids.clamp(0, self.vocab_size - 1)
            known = inside & (self.row_sum[safe] == sums)
            out = torch.where(known, self.entropy[safe], torch.zeros_like(sums))
            if not bool(known.all()):
                todo = (~known).nonzero().squeeze(1)
                u = predictive_entropy(rows[todo][None], self.final_norm, self.lm_head)[0]
                out[todo] = u
                fresh = todo[inside[todo] & torch.isnan(self.row_sum[safe[todo]])]   # first sight of the id
                self.entropy[ids[fresh]] = out[fresh]
                self.row_sum[ids[fresh]] = sums[fresh]
        return out.view(input_ids.shape)


def recall_error(k, v, g, beta, S0, memory):
    """Relative prediction error e_t = ||v_t - a_t S_{t-1}^T k_t|| / ||v_t|| of `memory` [B,T,H].

    S_{t-1}^T k_t is the memory's read-out one token earlier with k_t as the query: run the
    memory with queries shifted by one (q'_{t-1} = k_t) and take the first read from S0.
    Returns (e, final state of this memory).
    """
    B, T, H, D = k.shape
    scale = D ** -0.5
    next_keys = torch.cat([k[:, 1:], torch.zeros_like(k[:, :1])], dim=1)
    o, S = memory(next_keys, k, v, g, beta, S0)
    first = torch.zeros_like(v[:, 0]) if S0 is None else torch.einsum("bhkv,bhk->bhv", S0, k[:, 0].float())
    recalled = torch.cat([first[:, None].to(o.dtype), o[:, :-1] / scale], dim=1)   # S_{t-1}^T k_t
    error = v - g.exp()[..., None] * recalled
    return error.norm(dim=-1) / (v.norm(dim=-1) + 1e-6), S


class MetacognitiveController(nn.Module):
    """Maps [surprise, entropy] to write / forget / consolidate modulations, per head."""

    def __init__(self, num_heads: int):
        super().__init__()
        self.write = nn.Parameter(torch.zeros(num_heads, NUM_SIGNALS))
        self.forget = nn.Parameter(torch.zeros(num_heads, NUM_SIGNALS))
        self.consolidate = nn.Parameter(torch.zeros(num_heads, NUM_SIGNALS))
        self.consolidate_bias = nn.Parameter(torch.zeros(num_heads))          # beta^s = beta / 2 at start
        self.slow_decay_logit = nn.Parameter(torch.full((num_heads,), SLOW_DECAY_LOGIT))
        self.slow_read = nn.Parameter(torch.zeros(num_heads))                 # r_h: slow memory starts unread

    @staticmethod
    def signals(surprise: torch.Tensor, entropy: torch.Tensor | None) -> torch.Tensor:
        """f_t [B, T, H, 2] from surprise [B,T,H] and entropy [B,T] (None: zero, e.g. no LM head)."""
        u = torch.zeros_like(surprise) if entropy is None else entropy[..., None].expand_as(surprise)
        return torch.stack([surprise, u.to(surprise.dtype)], dim=-1)

    def modulations(self, f: torch.Tensor):
        """(write, forget, consolidate) logit offsets, each [B, T, H]."""
        write = (f * self.write).sum(-1)
        forget = (f * self.forget).sum(-1)
        consolidate = (f * self.consolidate).sum(-1) + self.consolidate_bias
        return write, forget, consolidate

    def slow_gate(self, like: torch.Tensor) -> torch.Tensor:
        """g^s = -softplus(z_h): the slow memory's log decay per head, broadcast to [B, T, H]."""
        return (-F.softplus(self.slow_decay_logit)).expand_as(like)
