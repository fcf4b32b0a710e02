"""Record what a pretrained decoder's attention layers compute, for the mechanism notebooks and dashboards.

`record_attention(model, input_ids, layers)` runs one ordinary forward of a transformers 5 decoder
(Llama, Qwen2, Qwen3, Mistral, SmolLM2...) and returns, per requested layer, the tensors a NeuroLlama
mechanism takes (layouts of `cortexlab.neuro`):

    x       [B, T, d]        the layer's normalised input (what q, k, v are projected from)
    q       [B, H, T, D]     queries after RoPE (and q_norm where the model has one)
    k, v    [B, H_kv, T, D]  keys after RoPE, values
    scores  [B, H, T, T]     q k^T * scaling with the causal (and padding) mask as -inf
    probs   [B, H, T, T]     softmax(scores)
    heads   [B, T, H, D]     per-head outputs probs @ v, what o_proj mixes

The forward itself is untouched: a pre-hook on each `self_attn` sees its inputs and the tensors are
recomputed from the layer's own projections (tested equal to the model's eager attention).
Memory: one [B, H, T, T] scores and probs per recorded layer; record a few layers of a short text.

Where the attention goes: `recent_mass(probs, window)` (the share on the last `window` keys) and `sink_mass(probs)`
(the share on token 0, the attention sink).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cortexlab.cortex.wrap import decoder_layers
from cortexlab.neuro.backbone import rotate_half


@dataclass
class AttentionRecord:
    layer: int
    x: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scores: torch.Tensor
    probs: torch.Tensor
    heads: torch.Tensor


def _project(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [B,H,T,D], k, v [B,H_kv,T,D] as the layer computes them: projections, optional q/k norms, RoPE."""
    B, T, _ = x.shape
    D = attn.head_dim
    q = attn.q_proj(x).view(B, T, -1, D)
    k = attn.k_proj(x).view(B, T, -1, D)
    v = attn.v_proj(x).view(B, T, -1, D).transpose(1, 2)
    if getattr(attn, "q_norm", None) is not None:   # Qwen3 normalises q and k per head before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v


def record_attention(model, input_ids: torch.Tensor, layers, attention_mask: torch.Tensor | None = None
                     ) -> dict[int, AttentionRecord]:
    """One no-grad forward of `model` on input_ids [B, T]; an `AttentionRecord` per index in `layers`."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError(f"input_ids must be an integer tensor [B, T], got {getattr(input_ids, 'shape', input_ids)!r}")
    blocks = decoder_layers(model)
    layers = [layers] if isinstance(layers, int) else list(layers)
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < len(blocks)]
    if not layers or bad:
        raise ValueError(f"layers must be indices in [0, {len(blocks)}), got {layers!r}")
    inputs: dict[int, tuple] = {}

    def grab(index):
        def hook(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            inputs[index] = (x.detach(), kwargs["position_embeddings"])
        return hook

    handles = [blocks[i].self_attn.register_forward_pre_hook(grab(i), with_kwargs=True) for i in layers]
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()

    B, T = input_ids.shape
    allowed = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    records = {}
    with torch.no_grad():
        for i in layers:
            attn = blocks[i].self_attn
            x, (cos, sin) = inputs[i]
            q, k, v = _project(attn, x, cos, sin)
            group = q.shape[1] // k.shape[1]
            k_all, v_all = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            scores = (q @ k_all.transpose(-1, -2)).float() * attn.scaling
            scores = scores.masked_fill(~allowed, float("-inf"))
            probs = scores.softmax(-1).nan_to_num(0.0)       # a fully padded row attends nowhere
            heads = (probs.to(v.dtype) @ v_all).transpose(1, 2)
            records[i] = AttentionRecord(i, x, q, k, v, scores, probs, heads)
    return records


def recent_mass(probs: torch.Tensor, window: int) -> float:
    """Mean attention share on the `window` most recent keys, sum_{0 <= i - j < window} A_ij, over the queries
    i >= window (those that see more than `window` keys) and every leading index. probs [..., T, T], causal."""
    if probs.dim() < 2 or probs.shape[-2] != probs.shape[-1]:
        raise ValueError(f"probs must be [..., T, T], got shape {tuple(probs.shape)}")
    T = probs.shape[-1]
    if not isinstance(window, int) or not 1 <= window < T:
        raise ValueError(f"window must be an int in [1, {T}), got {window!r}")
    lag = torch.arange(T, device=probs.device)[:, None] - torch.arange(T, device=probs.device)[None, :]
    recent = (lag >= 0) & (lag < window)
    return (probs * recent).sum(-1)[..., window:].float().mean().item()


def sink_mass(probs: torch.Tensor) -> float:
    """Mean attention on token 0 (the attention sink), mean over every query and leading index of A_{i0}.
    probs [..., Tq, Tk]."""
    if probs.dim() < 2:
        raise ValueError(f"probs must be [..., Tq, Tk], got shape {tuple(probs.shape)}")
    return probs[..., 0].float().mean().item()
