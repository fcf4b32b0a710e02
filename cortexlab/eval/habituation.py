"""Habituation on recorded attention: the suppression map, attention to repeats, cross-layer decay, memory.

Every function runs the `cortexlab.neuro` habituation modules (`HabituatingAttention`, `AttentionDecay`,
`NoveltyDetector`) on `AttentionRecord`s from `cortexlab.eval.attention.record_attention` — the real masked
scores of SmolLM2 — and never re-implements them. Used by notebook 11 and (issue 6) the habituation dashboard.

    habituate(record, config, novelty)        habituated probabilities beside the plain ones, and the map [B, H, T]
    habituation_snapshots(record, config, every)  the map after every `every` queries: how it forms
    repeat_attention(probs, spans)            per repeat r, attention its queries pay to the earlier repeats
    novelty(record, strength)                 NoveltyDetector on the layer's input x: boost per token [T]
    decay_across_layers(records, decay)       AttentionDecay through consecutive recorded layers, per-layer stats
    state_memory(num_heads, seq_len)          measured bytes of the persistent map vs the design's (H, L, L)
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from cortexlab.checks import check_int
from cortexlab.eval.attention import AttentionRecord, sink_mass
from cortexlab.neuro import AttentionDecay, HabituatingAttention, NoveltyDetector
from cortexlab.neuro.habituation import HabituationConfig


def _check_record(record) -> None:
    if not isinstance(record, AttentionRecord):
        raise TypeError(f"record must be an AttentionRecord from record_attention, got {type(record).__name__}")


@dataclass
class HabituationEffect:
    probs: torch.Tensor    # [B, H, T, T] softmax of the habituated scores
    plain: torch.Tensor    # [B, H, T, T] the model's own probabilities (habituation off)
    map: torch.Tensor      # [B, H, T] suppression h the next query would apply (get_habituation_map)


def habituate(record: AttentionRecord, config: HabituationConfig | None = None,
              novelty: torch.Tensor | None = None) -> HabituationEffect:
    """`HabituatingAttention` on one layer's real scores, over the whole sequence in one call."""
    _check_record(record)
    B, H, _, T = record.scores.shape
    module = HabituatingAttention(H, T, config)
    with torch.no_grad():
        probs = module(record.scores, novelty=novelty).softmax(-1).nan_to_num(0.0)
    return HabituationEffect(probs, record.probs, module.get_habituation_map())


def habituation_snapshots(record: AttentionRecord, config: HabituationConfig | None = None, *, every: int = 8
                          ) -> tuple[list[int], torch.Tensor]:
    """The map after each `every` queries, fed as successive calls with `use_cache=True`.

    Returns (the number of tokens read at each snapshot, maps [n, H, T] of batch 0 padded with 0 for keys
    not yet read). The last snapshot equals `habituate(...).map` (the calls continue one another exactly).
    """
    _check_record(record)
    check_int("every", every)
    scores = record.scores[:1]
    _, H, _, T = scores.shape
    module = HabituatingAttention(H, T, config)
    ends, maps = [], []
    with torch.no_grad():
        for start in range(0, T, every):
            end = min(start + every, T)
            module(scores[:, :, start:end, :end], use_cache=True)
            m = torch.zeros(H, T)
            m[:, :end] = module.get_habituation_map()[0]
            ends.append(end)
            maps.append(m)
    return ends, torch.stack(maps)


def repeat_attention(probs: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """For each repeat r >= 1 of a pattern at token spans [start, end): the attention mass its queries put on
    the keys of the repeats before it (mean over queries and heads, batch 0). Returns [len(spans) - 1].
    """
    if probs.ndim != 4:
        raise ValueError(f"probs must be [B, H, T, T], got {tuple(probs.shape)}")
    if len(spans) < 2:
        raise ValueError("spans must hold at least two repeats")
    T = probs.shape[-1]
    out = []
    for r in range(1, len(spans)):
        q0, q1 = spans[r]
        keys = torch.zeros(T, dtype=torch.bool)
        for k0, k1 in spans[:r]:
            keys[k0:k1] = True
        if not 0 <= q0 < q1 <= probs.shape[2]:
            raise ValueError(f"span {spans[r]} does not fit {probs.shape[2]} queries")
        out.append(probs[0, :, q0:q1][..., keys].sum(-1).mean())
    return torch.stack(out)


def novelty(record: AttentionRecord, strength: float = 1.0) -> torch.Tensor:
    """`NoveltyDetector` on the layer's normalised input x [B, T, d]: the dishabituation boost [B, T]."""
    _check_record(record)
    return NoveltyDetector(record.x.shape[-1], strength)(record.x)


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -torch.xlogy(probs, probs).sum(-1)


def decay_across_layers(records: Mapping[int, AttentionRecord], decay: float | Sequence[float] = 0.1
                        ) -> list[dict]:
    """`AttentionDecay` through the recorded layers in order (one forward pass, explicit state).

    Each layer's *recorded* scores are lowered where the earlier layers (after their own decay) fixated;
    the hidden states are the unmodified model's (the decay is not fed forward through the network).
    Per layer: mass on the first token (the attention sink), mean entropy and the largest single
    attention weight, plain and decayed (means over heads and queries, batch 0).
    """
    if not records:
        raise ValueError("records is empty")
    layers = sorted(records)
    module = AttentionDecay(len(layers), decay)
    state, rows = None, []
    with torch.no_grad():
        for idx, layer in enumerate(layers):
            rec = records[layer]
            _check_record(rec)
            probs = module(rec.scores, state, idx).softmax(-1).nan_to_num(0.0)
            state = module.update(probs, state)
            plain = rec.probs
            rows.append(dict(layer=layer, sink_plain=sink_mass(plain[0]),
                             sink_decayed=sink_mass(probs[0]),
                             entropy_plain=_entropy(plain[0]).mean().item(),
                             entropy_decayed=_entropy(probs[0]).mean().item(),
                             max_plain=plain[0].amax(-1).mean().item(), max_decayed=probs[0].amax(-1).mean().item()))
    return rows


def state_memory(num_heads: int, seq_len: int, *, queries: int = 64) -> dict:
    """Measured size of `HabituatingAttention`'s persistent state after reading `seq_len` keys.

    Runs the module once on causal scores [1, num_heads, queries, seq_len] (the last `queries` positions;
    the values do not matter for the size) and reports the bytes of every tensor the module keeps,
    beside the (num_heads, seq_len, seq_len) fp32 buffer of the source design.
    """
    if not isinstance(seq_len, int) or seq_len < queries:
        raise ValueError(f"seq_len must be an int >= queries={queries}, got {seq_len!r}")
    module = HabituatingAttention(num_heads, seq_len)
    pos = torch.arange(seq_len - queries, seq_len)
    scores = torch.zeros(1, num_heads, queries, seq_len).masked_fill(
        torch.arange(seq_len)[None, :] > pos[:, None], float("-inf"))
    with torch.no_grad():
        module(scores)
    kept = [b for b in module.buffers()] + [p for p in module.parameters()]
    measured = sum(t.numel() * t.element_size() for t in kept)
    return dict(seq_len=seq_len, num_heads=num_heads, state_shape=tuple(module.exposure.shape),
                state_bytes=measured, design_bytes=num_heads * seq_len * seq_len * 4)
