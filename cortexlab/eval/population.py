"""Population-coded head aggregation on SmolLM2: per-token head weights, layer outputs, and the LM loss
when one layer's concatenation is replaced by a vote.

Uses `cortexlab.neuro.population` (`EntropyBasedVoting`, `ConfidenceWeightedVoting`, `combine_heads`) on
`AttentionRecord`s from `cortexlab.eval.attention.record_attention`; nothing re-implements the voting. Notebook 12.

    plain_output(record, o_proj)                the layer's own attention output o_proj(concat_h o_h) [B, T, hidden]
    voted_output(record, o_proj, weights)       the layer's attention output with heads re-weighted [B, T, hidden]
    voting_change(record, o_proj, voter)        ||y_voted - y|| / ||y||, the relative change the vote makes
    head_wins(weights)                          how many tokens each head has the largest weight for [H]
    lm_loss_with_voting(model, ids, layer, voter)  next-token loss with one layer's heads voted (None: unmodified)
"""
from __future__ import annotations

import torch
from torch import nn

from cortexlab.cortex.wrap import decoder_layers
from cortexlab.eval.attention import AttentionRecord, _project
from cortexlab.neuro import ConfidenceWeightedVoting, EntropyBasedVoting
from cortexlab.neuro.population import combine_heads


def voted_output(record: AttentionRecord, o_proj: nn.Module, weights: torch.Tensor) -> torch.Tensor:
    """o_proj(concat_h(H w_h o_h)): the layer output with per-token head weights w [B, T, H] (w = 1/H: unchanged)."""
    if not isinstance(record, AttentionRecord):
        raise TypeError(f"record must be an AttentionRecord, got {type(record).__name__}")
    heads = record.heads
    if weights.shape != heads.shape[:3]:
        raise ValueError(f"weights must have shape {tuple(heads.shape[:3])}, got {tuple(weights.shape)}")
    with torch.no_grad():
        return o_proj(combine_heads(heads, weights, aggregate=False).flatten(-2))


def _weights(voter, heads: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
    if isinstance(voter, EntropyBasedVoting):
        return voter.head_weights(probs)
    return voter.head_weights(heads)


def plain_output(record: AttentionRecord, o_proj: nn.Module) -> torch.Tensor:
    """y = o_proj(concat_h o_h): the layer's attention output without voting [B, T, hidden]."""
    if not isinstance(record, AttentionRecord):
        raise TypeError(f"record must be an AttentionRecord, got {type(record).__name__}")
    with torch.no_grad():
        return o_proj(record.heads.flatten(-2))


def voting_change(record: AttentionRecord, o_proj: nn.Module,
                  voter: EntropyBasedVoting | ConfidenceWeightedVoting) -> float:
    """||y_voted - y|| / ||y|| over all tokens: how much the voter's head weights change the layer's output
    (0 for a neutral voter)."""
    if not isinstance(voter, (EntropyBasedVoting, ConfidenceWeightedVoting)):
        raise TypeError(f"voter must be EntropyBasedVoting or ConfidenceWeightedVoting, got {type(voter).__name__}")
    plain = plain_output(record, o_proj)
    with torch.no_grad():
        voted = voted_output(record, o_proj, _weights(voter, record.heads, record.probs))
    return ((voted - plain).norm() / plain.norm()).item()


def head_wins(weights: torch.Tensor) -> torch.Tensor:
    """Per head h, the number of tokens t at which h has the largest weight, #{t: argmax_h' w_th' = h} [H]."""
    if weights.dim() < 1 or weights.shape[-1] < 1:
        raise ValueError(f"weights must be [..., H] head weights, got shape {tuple(weights.shape)}")
    return torch.bincount(weights.argmax(-1).flatten(), minlength=weights.shape[-1])


def lm_loss_with_voting(model, input_ids: torch.Tensor, layer: int,
                        voter: EntropyBasedVoting | ConfidenceWeightedVoting | None = None) -> float:
    """Mean next-token cross-entropy of `model` on input_ids [B, T] (no padding), with the head concatenation
    of decoder layer `layer` replaced by the voter's re-weighted heads, o_h * H w_h, before the layer's own
    o_proj (None: the unmodified model, the baseline).

    Two hooks, removed afterwards: a pre-hook on the layer's `self_attn` recomputes its attention
    probabilities from the layer's own projections (as `record_attention` does, for the entropy voter), and a
    pre-hook on `o_proj` re-weights the heads it receives. Neutral voters reproduce the baseline.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError(f"input_ids must be an integer tensor [B, T], got {getattr(input_ids, 'shape', input_ids)!r}")
    blocks = decoder_layers(model)
    if not isinstance(layer, int) or not 0 <= layer < len(blocks):
        raise ValueError(f"layer must be an int in [0, {len(blocks)}), got {layer!r}")
    if voter is not None and not isinstance(voter, (EntropyBasedVoting, ConfidenceWeightedVoting)):
        raise TypeError(f"voter must be EntropyBasedVoting, ConfidenceWeightedVoting or None, "
                        f"got {type(voter).__name__}")
    handles = []
    if voter is not None:
        attn = blocks[layer].self_attn
        seen: dict[str, torch.Tensor] = {}

        def grab(module, args, kwargs):
            if isinstance(voter, EntropyBasedVoting):
                x = kwargs.get("hidden_states", args[0] if args else None)
                q, k, _ = _project(module, x, *kwargs["position_embeddings"])
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                T = x.shape[1]
                scores = (q @ k.transpose(-1, -2)).float() * module.scaling
                future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
                seen["probs"] = scores.masked_fill(future, float("-inf")).softmax(-1)

        def vote(module, args):
            concat = args[0]
            heads = concat.view(*concat.shape[:2], attn.config.num_attention_heads, -1)
            weights = _weights(voter, heads, seen.get("probs"))
            return (combine_heads(heads, weights, aggregate=False).flatten(-2),)

        handles = [attn.register_forward_pre_hook(grab, with_kwargs=True), attn.o_proj.register_forward_pre_hook(vote)]
    try:
        with torch.no_grad():
            return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.item()
    finally:
        for h in handles:
            h.remove()
