"""Watch an inference-hook state form as a pretrained model reads a text (notebook 15, habituation dashboard).

`habituation_over_time(model, pipeline, input_ids, layer, every)` feeds input_ids [1, T] through the
model with the pipeline attached, `every` tokens per call with the KV cache (so each call continues
the hooks' state exactly as one forward would, see `InferenceHookPipeline`), and after each call
keeps the layer's habituation map h [H, t] over the t keys read so far. The last snapshot equals the
map after one forward over the whole text.

`hooked_attention(pipeline, record)` runs the pipeline's pre-attention hooks on one layer's recorded scores
(`cortexlab.eval.attention.record_attention`), no forward pass: the probabilities after the hooks, with the
pipeline's state (e.g. `habituation_map(record.layer)`) left as one hooked forward leaves it when the hooks act
on that layer alone (the earlier layers, unhooked, give it the recorded scores). The habituation dashboard uses
it to move the rate without running the model again.

Memory: the KV cache of T tokens and one [H, t] map per snapshot.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from cortexlab.checks import check_int
from cortexlab.eval.attention import AttentionRecord
from cortexlab.neuro.hooks import InferenceHookPipeline

__all__ = ["habituation_over_time", "hooked_attention"]


@torch.no_grad()
def habituation_over_time(model, pipeline: InferenceHookPipeline, input_ids: torch.Tensor, layer: int,
                          every: int = 8) -> list[tuple[int, torch.Tensor]]:
    """[(tokens read, habituation map [H, tokens read])] after each call of `every` tokens; state reset first."""
    if not isinstance(pipeline, InferenceHookPipeline) or not pipeline.config.enable_habituation:
        raise ValueError("pipeline must be an InferenceHookPipeline with enable_habituation=True")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be token ids [1, T], got {getattr(input_ids, 'shape', input_ids)!r}")
    check_int("every", every)
    pipeline.habituation_map(layer)                      # raises unless the hooks act on `layer`
    attached_here = not pipeline.is_attached
    if attached_here:
        pipeline.attach(model)
    pipeline.reset()
    cache, snapshots = DynamicCache(config=model.config), []
    try:
        for start in range(0, input_ids.shape[1], every):
            chunk = input_ids[:, start:start + every]
            model(input_ids=chunk, cache=cache, use_cache=True)
            snapshots.append((start + chunk.shape[1], pipeline.habituation_map(layer)[0].clone()))
    finally:
        if attached_here:
            pipeline.detach()
    return snapshots


@torch.no_grad()
def hooked_attention(pipeline: InferenceHookPipeline, record: AttentionRecord) -> torch.Tensor:
    """Probabilities [B, H, T, T] of `record`'s layer after the pipeline's pre-attention hooks (state reset first)."""
    if not isinstance(pipeline, InferenceHookPipeline):
        raise TypeError(f"pipeline must be an InferenceHookPipeline, got {type(pipeline).__name__}")
    if not isinstance(record, AttentionRecord):
        raise TypeError(f"record must be an AttentionRecord from record_attention, got {type(record).__name__}")
    if not pipeline.acts_on(record.layer):
        raise ValueError(f"no enabled hook of the pipeline acts on layer {record.layer}")
    pipeline.reset()
    scores = pipeline.apply_pre_attention(record.scores, record.layer, query=record.q, key=record.k)
    return scores.softmax(-1).nan_to_num(0.0)
