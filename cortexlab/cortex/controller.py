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
    """u_t at a layer whose input is the token embedding (layer 0), remembered per token id: after
    a token's first sight its entropy costs a lookup instead of a pass through the output head
    (the largest matrix product of a small model).

    A row is looked up only when it equals its token's embedding exactly, so a stream that is
    not the plain embedding (scaled or position-added embeddings, a caller's own `inputs_embeds`)
    is computed directly. The table is dropped when the embedding, final norm or output head
    change through autograd-visible in-place ops (`load_state_dict`, `copy_` on a parameter);
    edits through `.data` are invisible to that check: call `clear()` after them.
    """

    def __init__(self, embedding: nn.Module, final_norm: nn.Module, lm_head: nn.Module):
        self.embedding, self.final_norm, self.lm_head = embedding, final_norm, lm_head
        self.entropy = None          # [V], NaN where the token has not been seen
        self._weights_seen = None
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self.entropy = None

    def _weights_key(self):
        """Storage and version of every weight the values depend on; None when untrackable (inference tensors)."""
        try:
            return tuple((p.data_ptr(), p._version) for m in (self.embedding, self.final_norm, self.lm_head)
                         for p in m.parameters())
        except RuntimeError:
            return None

    def __call__(self, input_ids: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """[B, T] entropies of `residual` [B, T, d], the rows entering layer 0 for tokens `input_ids` [B, T]."""
        table = self.embedding.weight
        key = self._weights_key()
        if input_ids.shape != residual.shape[:2] or key is None or table.shape[1] != residual.shape[-1]:
            return predictive_entropy(residual, self.final_norm, self.lm_head)
        with torch.no_grad():
            rows = residual.reshape(-1, residual.shape[-1])
            ids = input_ids.reshape(-1).to(rows.device)
            V = table.shape[0]
            safe = ids.clamp(0, V - 1)
            embedded = (ids == safe) & (rows == table[safe].to(rows.dtype)).all(-1)
            with self._lock:
                if self.entropy is None or key != self._weights_seen or self.entropy.device != rows.device:
                    self.entropy = torch.full((V,), float("nan"), device=rows.device)
                    self._weights_seen = key
                entropy = self.entropy
                out = torch.where(embedded, entropy[safe], float("nan"))
            todo = torch.isnan(out).nonzero().squeeze(1)
            if todo.numel():   # outside the lock: the output-head pass of one thread does not stall others
                out[todo] = predictive_entropy(rows[todo][None], self.final_norm, self.lm_head)[0]
                fresh = todo[embedded[todo]]
                with self._lock:
                    if self.entropy is entropy:
                        entropy[ids[fresh]] = out[fresh]   # every row of one id is the same embedding row
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

    @torch.no_grad()
    def reset_(self) -> None:
        """Back to the neutral start, in place: no modulation and the slow memory unread, so the memory computes
        exactly what it computes without a controller (the consolidation bias and slow decay return to their
        initial values too, though they no longer matter once the slow memory is unread)."""
        for p in (self.write, self.forget, self.consolidate, self.consolidate_bias, self.slow_read):
            p.zero_()
        self.slow_decay_logit.fill_(SLOW_DECAY_LOGIT)

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


def neutralise_controller_(model: nn.Module) -> int:
    """`reset_` every metacognitive controller inside `model` (a wrapped LM, a sidecar, any module): the model then
    keeps all its other trained weights and computes what it would without controllers. Returns how many."""
    controllers = [m for m in model.modules() if isinstance(m, MetacognitiveController)]
    for controller in controllers:
        controller.reset_()
    return len(controllers)
