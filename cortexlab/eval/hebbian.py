"""Hebbian attention on recorded attention inputs: the bias it adds, where attention moves, how H grows.

Every function takes an `AttentionRecord` from `cortexlab.eval.attention.record_attention` (the real
q, k and masked scores of one layer) and runs `cortexlab.neuro.HebbianAttention` /
`RewardModulatedHebbian` on it; nothing here re-implements the mechanism. Used by notebook 10.

    token_spans(tokenizer, pieces)        ids [1, T] of the pieces joined, and each piece's [start, end)
    hebbian_effect(record, config)        bias, Hebbian probabilities and plain ones (eta = 0 baseline)
    span_mass(probs, queries, keys)       per-head attention mass from a span of queries onto a span of keys
    eta_sweep(record, etas, keys=, queries=)  per eta: bias spread / score spread, and span masses onto keys
    hebbian_norm_trace(record, config)    per-head ||H||_F after every token, fed one token at a time
    reward_effect(record, config, split, rewards)  three-factor rule: H before/after a second call per reward
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from cortexlab.checks import check_int
from cortexlab.eval.attention import AttentionRecord
from cortexlab.neuro import HebbianAttention, RewardModulatedHebbian
from cortexlab.neuro.hebbian import HebbianConfig


def token_spans(tokenizer, pieces: Sequence[str]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Tokenise each piece on its own and join the ids: ids [1, T] and each piece's [start, end).

    Tokenising pieces separately keeps a repeated piece's tokens identical in every copy (a joined
    string can merge tokens across a boundary). No special tokens are added.
    """
    if isinstance(pieces, str) or not pieces or not all(isinstance(p, str) and p for p in pieces):
        raise ValueError("pieces must be a non-empty sequence of non-empty strings")
    ids: list[int] = []
    spans = []
    for piece in pieces:
        tokens = tokenizer(piece, add_special_tokens=False).input_ids
        spans.append((len(ids), len(ids) + len(tokens)))
        ids += tokens
    return torch.tensor([ids]), spans


def _check_record(record) -> None:
    if not isinstance(record, AttentionRecord):
        raise TypeError(f"record must be an AttentionRecord from record_attention, got {type(record).__name__}")


def _module(record: AttentionRecord, config: HebbianConfig, cls=HebbianAttention):
    return cls(record.q.shape[-1], record.q.shape[1], config)


@dataclass
class HebbianEffect:
    bias: torch.Tensor       # [B, H, T, T] the Hebbian bias (0 where the causal mask is)
    probs: torch.Tensor      # [B, H, T, T] softmax(scores + bias)
    plain: torch.Tensor      # [B, H, T, T] softmax(scores): eta = 0, plain attention
    state_norm: torch.Tensor  # [H] ||H||_F per head after the call (clipped)


def hebbian_effect(record: AttentionRecord, config: HebbianConfig | None = None) -> HebbianEffect:
    """Run `HebbianAttention.score_bias` on one layer's real q, k and scores, from an empty H."""
    _check_record(record)
    module = _module(record, config or HebbianConfig())
    with torch.no_grad():
        bias = module.score_bias(record.q, record.k, record.scores)
        probs = torch.softmax(record.scores + bias, dim=-1)
    bias = bias.masked_fill(~torch.isfinite(record.scores), 0.0)
    return HebbianEffect(bias, probs, record.probs, module.get_hebbian_strength(per_head=True))


def span_mass(probs: torch.Tensor, queries: tuple[int, int], keys: tuple[int, int]) -> torch.Tensor:
    """Mean over queries in [q0, q1) of the attention mass on keys [k0, k1): [H] (batch 0)."""
    if probs.ndim != 4:
        raise ValueError(f"probs must be [B, H, T, T], got {tuple(probs.shape)}")
    (q0, q1), (k0, k1) = queries, keys
    if not (0 <= q0 < q1 <= probs.shape[2] and 0 <= k0 < k1 <= probs.shape[3]):
        raise ValueError(f"spans {queries}, {keys} do not fit probs of shape {tuple(probs.shape)}")
    return probs[0, :, q0:q1, k0:k1].sum(-1).mean(-1)


def eta_sweep(record: AttentionRecord, etas: Sequence[float], *, keys: tuple[int, int],
              queries: Mapping[str, tuple[int, int]], config: HebbianConfig | None = None) -> list[dict]:
    """`hebbian_effect` for each eta (the other settings from `config`): one row per eta with "eta",
    "bias_ratio" = std(bias) / std(scores) over the causal entries, and for each named span of queries
    its `span_mass` onto `keys`, averaged over heads."""
    _check_record(record)
    if not etas:
        raise ValueError("etas is empty")
    if {"eta", "bias_ratio"} & set(queries):
        raise ValueError(f"query span names must not be 'eta' or 'bias_ratio', got {sorted(queries)}")
    finite = torch.isfinite(record.scores)
    score_std = record.scores[finite].std().item()
    rows = []
    for eta in etas:
        effect = hebbian_effect(record, replace(config or HebbianConfig(), eta=float(eta)))
        rows.append({"eta": float(eta), "bias_ratio": effect.bias[finite].std().item() / score_std,
                     **{name: span_mass(effect.probs, span, keys).mean().item() for name, span in queries.items()}})
    return rows


def hebbian_norm_trace(record: AttentionRecord, config: HebbianConfig | None = None, *, step: int = 1
                       ) -> torch.Tensor:
    """Per-head ||H||_F [T // step, H] after each call, feeding the text `step` tokens per call (as in decoding).

    Each call continues from the state the previous one left (clipped to `max_hebbian_norm` after every
    call): this is how H grows and saturates over a sequence. Batch element 0 only.
    """
    _check_record(record)
    check_int("step", step)
    module = _module(record, config or HebbianConfig())
    q, k, scores = record.q[:1], record.k[:1], record.scores[:1]
    norms = []
    with torch.no_grad():
        for end in range(step, q.shape[2] + 1, step):
            start = end - step
            module.score_bias(q[:, :, start:end], k[:, :, :end], scores[:, :, start:end, :end])
            norms.append(module.get_hebbian_strength(per_head=True))
    return torch.stack(norms)


@dataclass
class RewardEffect:
    reward: float
    norm_before: torch.Tensor   # [H] ||H_0|| left by the first call
    norm_after: torch.Tensor    # [H] after the second call with this reward
    changed: float              # max |H_after - H_before|
    probs: torch.Tensor         # [B, H, Tq, T] attention of the second call's queries


def reward_effect(record: AttentionRecord, split: int, rewards: Sequence[float],
                  config: HebbianConfig | None = None) -> list[RewardEffect]:
    """Three-factor rule: tokens [0, split) are one call with reward 1 (it builds H_0), tokens [split, T) a
    second call with each reward r; H before and after the second call, and its attention.
    """
    _check_record(record)
    T = record.q.shape[2]
    if not isinstance(split, int) or not 0 < split < T:
        raise ValueError(f"split must be an int in (0, {T}), got {split!r}")
    q, k, scores = record.q, record.k, record.scores
    rows = []
    with torch.no_grad():
        for r in rewards:
            module = _module(record, config or HebbianConfig(), RewardModulatedHebbian)
            module.score_bias(q[:, :, :split], k[:, :, :split], scores[:, :, :split, :split], reward=1.0)
            before = module.hebbian.clone()
            bias = module.score_bias(q[:, :, split:], k, scores[:, :, split:], reward=float(r))
            rows.append(RewardEffect(float(r), before.flatten(1).norm(dim=1), module.get_hebbian_strength(True),
                                     (module.hebbian - before).abs().max().item(),
                                     torch.softmax(scores[:, :, split:] + bias, dim=-1)))
    return rows
