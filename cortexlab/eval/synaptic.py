"""Measurements behind notebook 07 (synaptic modulation) on a real model's attention.

- `head_entropy` / `scaled_probs` / `entropy_vs_alpha`: how `SynapticScaling`'s per-head inverse temperature
  changes each head's attention entropy, beside the uniform-attention ceiling (`uniform_entropy`).
- `set_constant_gates` / `gated_lm_loss` / `head_gate_loss` / `head_output_share`: what a `NeuromodulatedAttention`
  gate does to one layer of a pretrained decoder -- the language-modelling loss with the gate applied to that layer's
  heads (the module called from a hook on `o_proj`, with the layer's normalised input as the context).
- `dense_synaptic_reference` / `peak_cpu_bytes` / `synaptic_memory_vs_length`: the dense T x T form of
  `SynapticModulationMatrix` (the oracle its banded form is checked against) and the peak memory of a call, measured
  with the torch profiler.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from cortexlab.checks import check_int
from cortexlab.cortex.wrap import decoder_layers
from cortexlab.neuro import NeuromodulatedAttention, SynapticModulationMatrix, SynapticScaling


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    p = probs.float()
    return -(p * p.clamp_min(torch.finfo(torch.float32).tiny).log()).sum(-1)


def head_entropy(probs: torch.Tensor, skip: int = 1) -> torch.Tensor:
    """Mean attention entropy per head in nats, [H]: probs [B, H, T, T], averaged over the batch and the queries
    from `skip` on (query 0 of a causal head sees one key and always has entropy 0)."""
    if probs.dim() != 4:
        raise ValueError(f"probs must be [B, H, Tq, Tk], got shape {tuple(probs.shape)}")
    if not 0 <= skip < probs.shape[2]:
        raise ValueError(f"skip must lie in [0, {probs.shape[2]}), got {skip}")
    return _entropy(probs[:, :, skip:]).mean((0, 2))


def uniform_entropy(seq_len: int, skip: int = 1) -> float:
    """The ceiling: mean over queries i >= skip of ln(i + 1), the entropy of uniform causal attention."""
    if not 0 <= skip < seq_len:
        raise ValueError(f"skip must lie in [0, {seq_len}), got {skip}")
    return sum(math.log(i + 1) for i in range(skip, seq_len)) / (seq_len - skip)


@torch.no_grad()
def scaled_probs(scores: torch.Tensor, alpha: float, head: int | None = None) -> torch.Tensor:
    """Attention softmax_j(alpha * scores_ij) with the logits scaled by `SynapticScaling(alpha)`: every head's
    [B, H, Tq, Tk], or head `head`'s alone [B, Tq, Tk]. scores [B, H, Tq, Tk] with the mask as -inf; alpha = 1 is
    the model's attention."""
    if head is not None:
        if not isinstance(head, int) or not 0 <= head < scores.shape[1]:
            raise ValueError(f"head must be an int in [0, {scores.shape[1]}), got {head!r}")
        scores = scores[:, head:head + 1]
    alpha = float(alpha)
    scaling = SynapticScaling(scores.shape[1], init_alpha=alpha, alpha_min=min(0.1, alpha), alpha_max=max(10.0, alpha))
    probs = scaling(scores).softmax(-1)
    return probs if head is None else probs[:, 0]


def entropy_vs_alpha(scores: torch.Tensor, alphas: Sequence[float], skip: int = 1) -> torch.Tensor:
    """Per-head attention entropy [len(alphas), H] of `scaled_probs(scores, alpha)` for each alpha.

    scores [B, H, T, T] with the causal mask as -inf (as `record_attention` returns them); alpha = 1 is the model.
    """
    return torch.stack([head_entropy(scaled_probs(scores, alpha), skip) for alpha in alphas])


@torch.no_grad()
def set_constant_gates(module: NeuromodulatedAttention, gates) -> None:
    """Make `module` output the fixed gates [H] in [0, 1] for every context (fc2 weight 0, bias logit(g / 2)).

    A gate of exactly 1 restores the initial state (bias 0); a gate of 0 becomes ~1e-13 (bias -30).
    """
    gates = torch.as_tensor(gates, dtype=torch.float32).flatten()
    if gates.numel() != module.num_heads or not ((gates >= 0) & (gates <= 1)).all():
        raise ValueError(f"gates must be {module.num_heads} values in [0, 1], got {gates.tolist()}")
    half = (gates / 2).clamp(1e-13, 0.5)
    bias = torch.where(gates >= 1, torch.zeros_like(half), torch.log(half) - torch.log1p(-half))
    module.fc2.weight.zero_()
    module.fc2.bias.copy_(bias.clamp_min(-30.0))


def _lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten()).item()


@contextmanager
def _gating(model, layer: int, module: NeuromodulatedAttention | None):
    """Apply `module` to layer `layer`'s per-head outputs (a pre-hook on o_proj), context = the layer's x_t."""
    blocks = decoder_layers(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer must lie in [0, {len(blocks)}), got {layer}")
    if module is None:
        yield
        return
    attn = blocks[layer].self_attn
    context = {}

    def grab(_, args, kwargs):
        context["x"] = kwargs.get("hidden_states", args[0] if args else None)

    def gate(_, args):
        heads = args[0]
        B, T, _ = heads.shape
        gated = module(heads.view(B, T, module.num_heads, -1), context["x"])
        return (gated.reshape(B, T, -1),) + tuple(args[1:])

    handles = [attn.register_forward_pre_hook(grab, with_kwargs=True), attn.o_proj.register_forward_pre_hook(gate)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def gated_lm_loss(model, input_ids: torch.Tensor, layer: int, module: NeuromodulatedAttention | None) -> float:
    """Mean next-token loss (nats) of `model` on input_ids [B, T] with `module` gating layer `layer`'s heads.

    The context of the gate at token t is the layer's normalised input x_t (what q, k, v are projected from), so
    the gates are per token and causal. module=None runs the plain model (the baseline).
    """
    with _gating(model, layer, module):
        return _lm_loss(model(input_ids=input_ids, use_cache=False).logits, input_ids)


class LayerSuffix:
    """`gated_lm_loss` for many gate settings of one layer, running only the layers from `layer` on.

    One full forward (no grad) keeps the hidden state entering decoder layer `layer` and the arguments the model
    passes its layers (mask, position embeddings); `loss(module)` then runs layers `layer`.. and the head.
    Layers before `layer` do not see the gate, so the result equals `gated_lm_loss` (tested) at a fraction of the
    cost. `baseline` is the plain model's loss from that first forward. For decoders whose layers all take the same
    arguments (Llama, Qwen2, Mistral with full attention).
    """

    def __init__(self, model, input_ids: torch.Tensor, layer: int):
        blocks = decoder_layers(model)
        if not 0 <= layer < len(blocks):
            raise ValueError(f"layer must lie in [0, {len(blocks)}), got {layer}")
        self.model, self.input_ids, self.layer, self.blocks = model, input_ids, layer, blocks
        saved = {}

        def keep(_, args, kwargs):
            saved["args"], saved["kwargs"] = args, kwargs

        handle = blocks[layer].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            with torch.no_grad():
                self.baseline = _lm_loss(model(input_ids=input_ids, use_cache=False).logits, input_ids)
        finally:
            handle.remove()
        self._hidden, self._kwargs = saved["args"][0], saved["kwargs"]

    @torch.no_grad()
    def loss(self, module: NeuromodulatedAttention | None) -> float:
        with _gating(self.model, self.layer, module):
            hidden = self._hidden
            for block in self.blocks[self.layer:]:
                hidden = block(hidden, **self._kwargs)
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            logits = self.model.get_output_embeddings()(self.model.base_model.norm(hidden))
        return _lm_loss(logits, self.input_ids)


def head_gate_loss(suffix: LayerSuffix, module: NeuromodulatedAttention, head: int, g: float) -> float:
    """`suffix.loss(module)` with head `head`'s gate held at g and every other gate at 1 (g_h = g, g_h' = 1);
    restores all gates to 1 after."""
    if not isinstance(head, int) or not 0 <= head < module.num_heads:
        raise ValueError(f"head must be an int in [0, {module.num_heads}), got {head!r}")
    gates = torch.ones(module.num_heads)
    gates[head] = g
    set_constant_gates(module, gates)
    try:
        return suffix.loss(module)
    finally:
        set_constant_gates(module, torch.ones(module.num_heads))


def head_ablation_losses(model, input_ids: torch.Tensor, layer: int, module: NeuromodulatedAttention,
                         suffix: LayerSuffix | None = None) -> torch.Tensor:
    """LM loss [H] with one head's gate closed (g_h = 0, the others 1) at a time: `head_gate_loss(.., h, 0)`.
    Pass a `LayerSuffix` of the same model, ids and layer to skip recomputing the layers before `layer`."""
    suffix = suffix or LayerSuffix(model, input_ids, layer)
    return torch.tensor([head_gate_loss(suffix, module, h, 0.0) for h in range(module.num_heads)])


@torch.no_grad()
def head_output_share(heads: torch.Tensor, o_proj) -> torch.Tensor:
    """||W_o[:, h] o_h|| / ||W_o o|| per head [H], mean over tokens: how much of the attention output one gate
    scales (closing gate h changes the attention output by exactly this fraction of its norm, per token)."""
    B, T, H, D = heads.shape
    weight = o_proj.weight.float().view(-1, H, D)                        # [d, H, D]
    per_head = torch.einsum("bthd,ehd->bthe", heads.float(), weight)     # [B, T, H, d]
    total = per_head.sum(2).norm(dim=-1).clamp_min(1e-12)                # [B, T]
    return (per_head.norm(dim=-1) / total[..., None]).mean((0, 1))


def dense_synaptic_reference(weight: torch.Tensor, q: torch.Tensor, k: torch.Tensor, window: int) -> torch.Tensor:
    """The dense form of `SynapticModulationMatrix`: s_ij = q_i^T W k_j / sqrt(D) for 0 <= i - j < window, else 0.

    q [B, H, Tq, D], k [B, H_kv, Tk, D] (queries are the last Tq positions); returns float32 [B, H, Tq, Tk] --
    a Tq x Tk matrix per head, the memory the banded module avoids.
    """
    heads, heads_kv = q.shape[1], k.shape[1]
    tq, tk, dim = q.shape[2], k.shape[2], q.shape[3]
    k_all = k.float().repeat_interleave(heads // heads_kv, dim=1)
    dense = (q.float() @ weight.float()) @ k_all.transpose(-1, -2) / math.sqrt(dim)
    i = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
    j = torch.arange(tk, device=q.device)[None, :]
    return dense.masked_fill(~((i - j >= 0) & (i - j < window)), 0.0)


def peak_cpu_bytes(fn: Callable[[], object]) -> int:
    """Peak CPU memory allocated while `fn()` runs (bytes above the start), from the torch profiler's allocation
    and free records in time order. Measures torch tensors only; run it under no_grad for inference numbers."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return int(peak)


@torch.no_grad()
def synaptic_memory_vs_length(matrix: SynapticModulationMatrix, q: torch.Tensor, k: torch.Tensor,
                              lengths: Sequence[int]) -> list[dict]:
    """Peak CPU bytes (`peak_cpu_bytes`) of the banded strengths `matrix.compute_synaptic_strength(q, k)`,
    O(T w), and of `dense_synaptic_reference`, O(T^2), at each length T: one dict {"T", "band_bytes",
    "dense_bytes"} per T. q [B, H, T0, D], k [B, H_kv, T0, D] are tiled along the sequence to T (the bytes
    depend only on the shapes)."""
    rows = []
    for length in lengths:
        check_int("lengths", length)
        reps = -(-length // q.shape[2])
        q_t, k_t = q.repeat(1, 1, reps, 1)[:, :, :length], k.repeat(1, 1, reps, 1)[:, :, :length]
        band = peak_cpu_bytes(lambda: matrix.compute_synaptic_strength(q_t, k_t))
        dense = peak_cpu_bytes(lambda: dense_synaptic_reference(matrix.weight, q_t, k_t, matrix.window_size))
        rows.append({"T": length, "band_bytes": band, "dense_bytes": dense})
    return rows
