"""Habituation: stimulus-specific adaptation of attention (Ulanovsky et al. 2003).

Neurons in auditory cortex answer less and less to a tone that keeps repeating and recover
when it stops, while a rare tone still gets a full response. Mapped onto attention: a key that
earlier queries have attended to heavily is suppressed for later queries, the suppression
decays back with time, and a novel key is spared. Three pieces:

- `HabituatingAttention`: per-head suppression of over-attended keys, causal, inside one
  sequence (and across decoding calls with `use_cache=True`);
- `AttentionDecay`: the same idea across layers of one forward pass (keys that every earlier
  layer fixated on are lowered in the next layer);
- `NoveltyDetector`: a per-token novelty that shields novel keys from habituation
  (dishabituation).

All three act on pre-softmax scores [B, H, Tq, Tk] by adding a finite bias log(1 - h), so
masked (-inf) entries stay masked, and each is an exact no-op at its neutral setting.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cortexlab.checks import check_int, check_number

_CHUNK = 64  # queries per step of the discounted scan in `HabituatingAttention`


def _check_scores(scores, name: str = "scores") -> None:
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor [B, H, Tq, Tk], got {type(scores).__name__}"
                        f"{'' if not isinstance(scores, torch.Tensor) else ' of dtype ' + str(scores.dtype)}")
    if scores.ndim != 4:
        raise ValueError(f"{name} must be 4-D [B, H, Tq, Tk], got shape {tuple(scores.shape)}")
    if scores.shape[2] > scores.shape[3]:
        raise ValueError(f"{name}: more queries than keys (Tq={scores.shape[2]} > Tk={scores.shape[3]})")


def _plain_probs(scores: torch.Tensor) -> torch.Tensor:
    """softmax in fp32 without gradient; fully masked rows (all -inf) give zeros, not NaN."""
    with torch.no_grad():
        return scores.float().softmax(-1).nan_to_num_(nan=0.0)


@dataclass
class HabituationConfig:
    """Settings of `HabituatingAttention` (validated on construction).

    habituation_rate     r_h: suppression per unit of accumulated exposure (0: no habituation).
    recovery_rate        r_r: fraction of the exposure forgotten per later query, in [0, 1].
    attention_threshold  theta: attention a key must exceed (per query) to count as exposure, in [0, 1).
    max_habituation      h_max: cap on the suppression, in [0, 1) (a key is never fully silenced).
    """

    habituation_rate: float = 0.1
    recovery_rate: float = 0.01
    attention_threshold: float = 0.1
    max_habituation: float = 0.9

    def __post_init__(self):
        check_number("habituation_rate", self.habituation_rate, 0)
        check_number("recovery_rate", self.recovery_rate, 0, 1)
        check_number("attention_threshold", self.attention_threshold, 0, 1, high_open=True)
        check_number("max_habituation", self.max_habituation, 0, 1, high_open=True)


def _scan_chunk(fresh: torch.Tensor, decay: float, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exclusive discounted scan over c queries (dim -2) of fresh exposure x [..., c, Tk].

        E_0 = state,  E_{a+1} = decay * E_a + x_a   =>   E_a = decay^a state + sum_{b<a} decay^(a-1-b) x_b

    Returns (E [..., c, Tk], E_c [..., Tk], the carry for the next chunk). One small [c+1, c] matrix
    of powers of `decay` makes it parallel inside the chunk without negative powers.
    """
    c = fresh.shape[-2]
    a = torch.arange(c + 1, device=fresh.device, dtype=fresh.dtype)[:, None]
    b = torch.arange(c, device=fresh.device, dtype=fresh.dtype)[None, :]
    powers = torch.full_like(a, decay) ** a                                   # decay^a, a = 0..c
    mix = torch.where(b < a, torch.full_like(a - b, decay) ** (a - 1 - b).clamp_min(0), 0.0)
    ext = powers * state[..., None, :] + mix @ fresh                          # rows 0..c-1: E_a; row c: E_c
    return ext[..., :c, :], ext[..., c, :]


class HabituatingAttention(nn.Module):
    """Stimulus-specific adaptation of attention scores, causal and per head.

    With A = softmax(scores) the plain (un-habituated) probabilities, exposure of key j at query i

        E_ij = sum_{i' < i} (1 - r_r)^(i-1-i') relu(A_i'j - theta)
        h_ij = min(h_max, r_h E_ij) * (1 - n_j)          n_j: optional novelty in [0, 1] (dishabituation)
        out_ij = scores_ij + log(1 - h_ij)

    The bias is added in log space because softmax(s + log(1 - h)) multiplies the unnormalised
    probability exp(s) of the key by (1 - h): a habituated key keeps a fraction (1 - h >= 1 - h_max)
    of its drive, and -inf (masked) entries stay -inf. A is taken from the incoming scores of earlier
    queries, not from their habituated probabilities: that keeps the whole map parallel (a
    discounted cumulative sum over queries) instead of a T-step loop, and still only looks at
    queries < i, so row i depends on rows <= i (causal). A is detached: habituation is state, not
    a learned path. habituation_rate = 0 (or h_max = 0) is an exact no-op.

    Queries are the last Tq of the Tk positions (as with a KV cache). `use_cache=True` continues the
    exposure left by the previous call (decoding token by token); the default treats every call as
    a fresh sequence. After each call the exposure the next query would see, [B, H, Tk], is kept
    (no gradient) for `get_habituation_map()`.

    Memory: persistent state B x H x Tk fp32 (never H x L x L). Per forward the output (same size as
    the scores) plus fp32 temporaries for one chunk of 64 queries, [B, H, 64, Tk]: the map is built
    chunk by chunk, carrying the exposure [B, H, Tk] from chunk to chunk, and no autograd graph
    beyond the addition. Compute O(64 x B x H x Tq x Tk), about the cost of q k^T at head_dim 64.

    Reference: Ulanovsky, Las & Nelken (2003), Processing of low-probability sounds by cortical
    neurons, Nature Neuroscience 6:391.
    """

    def __init__(self, num_heads: int, max_seq_len: int, config: HabituationConfig | None = None):
        super().__init__()
        check_int("num_heads", num_heads)
        check_int("max_seq_len", max_seq_len)
        if config is not None and not isinstance(config, HabituationConfig):
            raise TypeError(f"config must be a HabituationConfig, got {type(config).__name__}")
        self.num_heads = num_heads
        self.max_seq_len = max_seq_len
        self.config = config or HabituationConfig()
        self.register_buffer("exposure", torch.zeros(0, num_heads, 0), persistent=False)

    def _validate(self, scores, seq_len, novelty, use_cache) -> None:
        _check_scores(scores)
        B, H, Tq, Tk = scores.shape
        if H != self.num_heads:
            raise ValueError(f"scores has {H} heads, expected num_heads={self.num_heads}")
        if Tk > self.max_seq_len:
            raise ValueError(f"scores has Tk={Tk} keys, more than max_seq_len={self.max_seq_len}")
        if seq_len is not None and seq_len != Tk:
            raise ValueError(f"seq_len must equal the number of keys Tk={Tk}, got {seq_len!r}")
        if novelty is not None:
            if not isinstance(novelty, torch.Tensor) or not novelty.is_floating_point():
                raise TypeError("novelty must be a floating-point tensor [B, Tk]")
            if tuple(novelty.shape) != (B, Tk):
                raise ValueError(f"novelty must have shape {(B, Tk)}, got {tuple(novelty.shape)}")
            if not bool(((novelty >= 0) & (novelty <= 1)).all()):
                raise ValueError("novelty must lie in [0, 1]")
        if use_cache:
            past = self.exposure.shape[-1] if self.exposure.numel() else 0
            if past != Tk - Tq or (past and tuple(self.exposure.shape[:2]) != (B, H)):
                raise ValueError(f"use_cache: the stored exposure covers {past} keys of batch "
                                 f"{tuple(self.exposure.shape[:2])}; this call needs Tk - Tq = {Tk - Tq} keys "
                                 f"of batch {(B, H)} (call reset_state() to start a new sequence)")

    def forward(self, scores: torch.Tensor, seq_len: int | None = None, novelty: torch.Tensor | None = None,
                use_cache: bool = False) -> torch.Tensor:
        """scores [B, H, Tq, Tk] (causal mask applied as -inf) -> habituated scores, same shape and dtype.

        seq_len: optional, must equal Tk (kept from the design's API); novelty: optional [B, Tk] in
        [0, 1] from `NoveltyDetector`; use_cache: continue the exposure of the previous call.
        """
        self._validate(scores, seq_len, novelty, use_cache)
        B, H, Tq, Tk = scores.shape
        state = scores.new_zeros(B, H, Tk, dtype=torch.float32)
        if use_cache and self.exposure.numel():
            state[..., :Tk - Tq] = self.exposure
        out = torch.empty_like(scores)
        for s in range(0, Tq, _CHUNK):
            rows = scores[:, :, s:s + _CHUNK]
            bias, state = self._chunk_bias(rows, state, novelty)
            out[:, :, s:s + _CHUNK] = rows + bias
        self.exposure = state
        return out

    @torch.no_grad()
    def _chunk_bias(self, rows: torch.Tensor, state: torch.Tensor, novelty: torch.Tensor | None):
        """log(1 - h) for a chunk of query rows [B, H, c, Tk], and the exposure carried past it."""
        cfg = self.config
        fresh = _plain_probs(rows).sub_(cfg.attention_threshold).clamp_min_(0.0)
        exposure, state = _scan_chunk(fresh, 1.0 - cfg.recovery_rate, state)
        h = exposure.mul(cfg.habituation_rate).clamp_max_(cfg.max_habituation)
        if novelty is not None:
            h.mul_(1.0 - novelty.float()[:, None, None, :])
        return h.neg_().log1p_().to(rows.dtype), state

    def get_habituation_map(self) -> torch.Tensor:
        """Suppression h = min(h_max, r_h E) [B, H, Tk] that the next query would apply (no novelty).

        Empty ([0, H, 0]) before the first call and after `reset_state()`.
        """
        cfg = self.config
        return (cfg.habituation_rate * self.exposure).clamp_max(cfg.max_habituation)

    def reset_state(self) -> None:
        """Forget all exposure (start of a new sequence)."""
        self.exposure = self.exposure.new_zeros(0, self.num_heads, 0)


class AttentionDecay(nn.Module):
    """Cross-layer cumulative decay: keys that earlier layers fixated on are lowered in later ones.

    With P^(l) the attention probabilities of layer l and C^(l) the head-averaged attention that
    query i has already paid to key j in layers 0..l-1 of the same forward pass,

        C^(l)_ij = sum_{l' < l} mean_h P^(l')_hij        (in [0, l])
        out^(l)  = scores^(l) + C^(l)_ij * log(1 - d_l)

    so each layer that fully fixated on (i, j) multiplies its unnormalised probability in the next
    layers by (1 - d_l): exponential, cumulative decay that stops every layer locking onto the
    same key. Heads are averaged because head h of one layer has no relation to head h of another.
    Row i only uses row i of earlier layers (causal). The state is explicit and passed layer to
    layer (no hidden state across calls); it is detached (a stop-gradient signal).
    `decay` = 0 (all layers) is an exact no-op.

        state = None
        for l, layer in enumerate(layers):
            scores = decay(scores, state, l)
            probs = scores.softmax(-1)
            state = decay.update(probs, state)

    Memory: one fp32 [B, Tq, Tk] state per forward pass (an attention map without heads).

    Reference: Ulanovsky et al. (2003), Nature Neuroscience 6:391 (adaptation accumulating along
    the processing hierarchy).
    """

    def __init__(self, num_layers: int, decay: float | Sequence[float] = 0.1):
        super().__init__()
        check_int("num_layers", num_layers)
        values = [decay] * num_layers if isinstance(decay, (int, float)) else list(decay)
        if len(values) != num_layers:
            raise ValueError(f"decay must be a number or {num_layers} numbers (one per layer), got {len(values)}")
        for value in values:
            check_number("decay", value, 0, 1, high_open=True)
        self.num_layers = num_layers
        self.register_buffer("log_keep", torch.log1p(-torch.tensor(values, dtype=torch.float64)).float(),
                             persistent=False)

    def forward(self, scores: torch.Tensor, state: torch.Tensor | None, layer_idx: int) -> torch.Tensor:
        """scores [B, H, Tq, Tk] of layer `layer_idx` -> scores lowered where earlier layers fixated."""
        _check_scores(scores)
        if not isinstance(layer_idx, int) or not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx must be an int in [0, {self.num_layers}), got {layer_idx!r}")
        if state is None:
            return scores
        B, _, Tq, Tk = scores.shape
        if not isinstance(state, torch.Tensor) or tuple(state.shape) != (B, Tq, Tk):
            raise ValueError(f"state must be a tensor of shape {(B, Tq, Tk)} from update(), got "
                             f"{tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__}")
        bias = (state.float() * self.log_keep[layer_idx]).to(scores.dtype)
        return scores + bias[:, None]

    def update(self, probs: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """Add this layer's head-averaged probabilities [B, H, Tq, Tk] to the state -> new state [B, Tq, Tk]."""
        _check_scores(probs, "probs")
        fixation = torch.nan_to_num(probs.detach().float().mean(1), nan=0.0)    # fully masked rows: no fixation
        if state is None:
            return fixation
        if not isinstance(state, torch.Tensor) or state.shape != fixation.shape:
            raise ValueError(f"state must have shape {tuple(fixation.shape)}")
        return state + fixation


class NoveltyDetector(nn.Module):
    """Per-token novelty, causal: how unlike every earlier token a token is.

        n_t = clamp(1 - max_{s < t} cos(x_t, x_s), 0, 1),   n_0 = 1,   boost_t = strength * n_t

    A token that repeats an earlier one (same direction) gets n ~ 0; one orthogonal to all earlier
    tokens gets 1. Max cosine to earlier tokens (rather than distance to a running mean) is chosen
    because habituation is stimulus-specific: a repeat of any single earlier stimulus is familiar,
    even when the running mean of a varied context is far from it. The boost is passed as
    `novelty` to `HabituatingAttention`, which scales a key's habituation by (1 - boost).
    strength = 0 gives a zero boost (no dishabituation). Parameter-free.

    Input x [B, T, dim]: hidden states, or one head's keys. Memory: one fp32 [B, T, T] similarity
    matrix per forward (no heads).

    Reference: Ulanovsky et al. (2003), Nature Neuroscience 6:391 (deviant stimuli escape adaptation).
    """

    def __init__(self, dim: int, strength: float = 1.0, eps: float = 1e-6):
        super().__init__()
        check_int("dim", dim)
        check_number("strength", strength, 0, 1)
        self.dim = dim
        self.strength = strength
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, dim] -> dishabituation boost [B, T] in [0, strength]."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating-point tensor [B, T, dim]")
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [B, T, {self.dim}], got {tuple(x.shape)}")
        with torch.no_grad():
            unit = x.float() / x.float().norm(dim=-1, keepdim=True).clamp_min(self.eps)
            cos = unit @ unit.transpose(1, 2)
            T = x.shape[1]
            earlier = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
            familiarity = cos.masked_fill(~earlier, -math.inf).amax(-1)
            novelty = (1.0 - familiarity).clamp(0.0, 1.0)
        return (self.strength * novelty).to(x.dtype)
