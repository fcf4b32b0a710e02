"""Synaptic modulation of attention, in three tiers from a per-head scalar to a learned pairwise strength.

- `SynapticScaling` (static): a per-head inverse temperature on the attention logits.
- `NeuromodulatedAttention` (context dependent): a context vector gates each head's output.
- `SynapticModulationMatrix` (full matrix): a learned bilinear strength added to the logits inside a causal window.

Layouts (neuro contract): scores [B, H, Tq, Tk] with masked entries at -inf, q [B, H, T, D], k [B, H_kv, T, D],
per-head outputs [B, T, H, D], context [B, hidden] (one per sequence) or [B, T, hidden] (one per token).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from cortexlab.checks import check_int, check_number


def _check_float_tensor(name: str, x, ndims: tuple[int, ...]) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.ndim not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dims, got shape {tuple(x.shape)}")


class SynapticScaling(nn.Module):
    """Static synaptic scaling: a learnable strength alpha_h per head multiplies that head's attention logits.

    Equation: scores'_{b,h,i,j} = alpha_h * scores_{b,h,i,j}, i.e. attention = softmax(alpha_h * q_i.k_j / sqrt(D)).
    alpha scales the *logits*, so it is a per-head inverse temperature: alpha > 1 sharpens the head (a strong synapse
    lets the best-matching key dominate), alpha < 1 flattens it towards uniform. It acts before the softmax because a
    scale on the probabilities would be undone by their normalisation, and scaling a head's *output* is what
    `NeuromodulatedAttention` does. alpha = 1 is an exact no-op; masked (-inf) logits stay -inf (alpha > 0) and never
    reach alpha's gradient as -inf * 0. alpha lives in [alpha_min, alpha_max] (default [0.1, 10]): `update_alpha`
    clamps the stored value and `forward` clamps the learnt one, so an optimiser step cannot flip the logits' sign.
    Reference: homeostatic synaptic scaling (Turrigiano, 2008) -- neurons multiplicatively rescale all their synapses
    to keep a stable firing rate.
    Memory: H parameters; forward allocates one tensor the size of the scores (per-forward, like eager attention).
    """

    def __init__(self, num_heads: int, init_alpha: float = 1.0, alpha_min: float = 0.1, alpha_max: float = 10.0):
        super().__init__()
        check_int("num_heads", num_heads)
        check_number("alpha_min", alpha_min, 0, low_open=True)
        check_number("alpha_max", alpha_max, alpha_min)
        check_number("init_alpha", init_alpha, alpha_min, alpha_max)
        self.num_heads = int(num_heads)
        self.alpha_min = float(alpha_min)
        self.alpha_max = float(alpha_max)
        self.alpha = nn.Parameter(torch.full((self.num_heads,), float(init_alpha)))

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """Scale the logits [B, H, Tq, Tk] of each head h by alpha_h; returns a tensor of the same shape and dtype."""
        _check_float_tensor("scores", scores, (4,))
        if scores.shape[1] != self.num_heads:
            raise ValueError(f"scores must be [B, {self.num_heads}, Tq, Tk], got shape {tuple(scores.shape)}")
        alpha = self.alpha.float().clamp(self.alpha_min, self.alpha_max).view(1, -1, 1, 1)
        finite = torch.isfinite(scores)
        scaled = (scores.masked_fill(~finite, 0.0) * alpha).to(scores.dtype)
        return torch.where(finite, scaled, scores)

    @torch.no_grad()
    def update_alpha(self, head_idx: int, delta: float) -> None:
        """alpha[head_idx] += delta, clamped to [alpha_min, alpha_max] (strengthen or weaken one head)."""
        if (
            not isinstance(head_idx, numbers.Integral)
            or isinstance(head_idx, bool)
            or not 0 <= head_idx < self.num_heads
        ):
            raise ValueError(f"head_idx must be an int in [0, {self.num_heads}), got {head_idx!r}")
        check_number("delta", delta)
        self.alpha[head_idx] = (self.alpha[head_idx] + delta).clamp(self.alpha_min, self.alpha_max)


class NeuromodulatedAttention(nn.Module):
    """Context-dependent neuromodulation: a two-layer network maps a context vector to one gate in [0, 1] per head.

    Equation: g = min(1, 2 * sigmoid(W2 silu(W1 c + b1) + b2)) in [0, 1]^H;  o'_{b,t,h,:} = g_{b,t,h} * o_{b,t,h,:}.
    The last layer (W2, b2) starts at zero, so every gate is exactly 1 at initialisation and the module starts as an
    exact no-op (a plain sigmoid, the design's gate, can only approach 1). Any smooth gate that is 1 at its maximum
    has zero slope there; the clipped 2*sigmoid instead keeps slope 1/2 at initialisation, so training can close
    heads at once; the price is that a pre-activation above 0 saturates the gate open (no gradient there).
    context [B, hidden] gives one gate per head per sequence; [B, T, hidden] one per token (the LM case). The gate at
    token t reads only context[:, t], so the module is causal whenever the context is (e.g. the layer's hidden state);
    a per-sequence context must itself be causal (not, say, a mean over the whole sequence) for LM training.
    Reference: neuromodulatory systems (Doya, 2002) -- dopamine, serotonin, acetylcholine and noradrenaline broadcast
    global signals that modulate local processing and learning.
    Memory: hidden*bottleneck + bottleneck*H parameters; per forward a [B, (T,) bottleneck] activation and the gated
    copy of the head outputs.
    """

    def __init__(self, hidden_dim: int, num_heads: int, bottleneck: int | None = None):
        super().__init__()
        check_int("hidden_dim", hidden_dim)
        check_int("num_heads", num_heads)
        bottleneck = max(num_heads, hidden_dim // 16) if bottleneck is None else bottleneck
        check_int("bottleneck", bottleneck)
        self.hidden_dim, self.num_heads, self.bottleneck = int(hidden_dim), int(num_heads), int(bottleneck)
        self.fc1 = nn.Linear(self.hidden_dim, self.bottleneck)
        self.fc2 = nn.Linear(self.bottleneck, self.num_heads)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def compute_modulation(self, context: torch.Tensor) -> torch.Tensor:
        """Gates in [0, 1], float32: [B, H] for a context [B, hidden], [B, T, H] for [B, T, hidden]."""
        _check_float_tensor("context", context, (2, 3))
        if context.shape[-1] != self.hidden_dim:
            raise ValueError(
                f"context's last dim must be hidden_dim={self.hidden_dim}, got shape {tuple(context.shape)}"
            )
        z = self.fc2(F.silu(self.fc1(context.to(self.fc1.weight.dtype))))
        return (2.0 * torch.sigmoid(z.float())).clamp(max=1.0)

    def forward(self, head_outputs: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Multiply each head's output [B, T, H, D] by its gate; returns the same shape and dtype."""
        _check_float_tensor("head_outputs", head_outputs, (4,))
        batch, seq, heads, _ = head_outputs.shape
        if heads != self.num_heads:
            raise ValueError(f"head_outputs must be [B, T, {self.num_heads}, D], got shape {tuple(head_outputs.shape)}")
        _check_float_tensor("context", context, (2, 3))
        expected = (batch, self.hidden_dim) if context.ndim == 2 else (batch, seq, self.hidden_dim)
        if tuple(context.shape) != expected:
            raise ValueError(f"context must have shape {expected} to match head_outputs, got {tuple(context.shape)}")
        gates = self.compute_modulation(context)
        gates = gates[:, None, :, None] if gates.ndim == 2 else gates[..., None]
        return (head_outputs * gates).to(head_outputs.dtype)


class SynapticModulationMatrix(nn.Module):
    """Full synaptic matrix: a learned bilinear strength between each query and the keys in a causal window.

    Equation: s_ij = q_i^T W k_j / sqrt(D) for 0 <= i - j < window (0 elsewhere);  scores'_ij = scores_ij + s_ij.
    W [D, D] is shared by all heads and starts at zero, so the module starts as an exact no-op (and still gets a
    gradient: dL/dW = sum_ij dL/ds_ij q_i k_j^T / sqrt(D)). The band covers the keys at or before each query -- the
    ones a causal LM can see; keys after it are masked anyway. Queries are the last Tq of the Tk key positions (so
    decoding with a KV cache works); k may have H_kv heads dividing H (query head h reads kv head h // (H / H_kv),
    as Llama's repeat_kv).
    `compute_synaptic_strength` returns the band [B, H, Tq, window] (band[..., i, w] = s_{i, i-w}, 0 where i - w < 0),
    computed block by block: each block of `window` queries meets only its window + block keys, so memory is
    O(B H Tq window) plus O(B H (Tq + window) D) -- never a Tq x Tk matrix. Only `forward` touches a dense tensor:
    the copy of the scores it adds the band into (per forward, the size of the scores themselves).
    Reference: spike-timing-dependent plasticity (Bi & Poo, 1998) -- each synapse's strength depends on its own
    pre/post pair within a short time window (the design gives no reference for this tier; this is our choice).
    """

    def __init__(self, head_dim: int, window_size: int):
        super().__init__()
        check_int("head_dim", head_dim)
        check_int("window_size", window_size)
        self.head_dim, self.window_size = int(head_dim), int(window_size)
        self.weight = nn.Parameter(torch.zeros(self.head_dim, self.head_dim))

    def _check_qk(self, q, k) -> None:
        _check_float_tensor("q", q, (4,))
        _check_float_tensor("k", k, (4,))
        (batch, heads, tq, dim), (batch_k, heads_kv, tk, dim_k) = q.shape, k.shape
        if dim != self.head_dim or dim_k != self.head_dim:
            raise ValueError(f"q and k must have head_dim={self.head_dim} last, got {tuple(q.shape)}, {tuple(k.shape)}")
        if batch_k != batch or heads % heads_kv or tq > tk:
            raise ValueError(
                f"k must be [B, H_kv, Tk, D] with H_kv dividing H and Tk >= Tq for q {tuple(q.shape)}, "
                f"got {tuple(k.shape)}"
            )

    def compute_synaptic_strength(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Banded strengths [B, H, Tq, window] in float32: band[b, h, i, w] = s_{i, i-w} (query i's w-th key back)."""
        self._check_qk(q, k)
        batch, heads, tq, dim = q.shape
        heads_kv, tk, window = k.shape[1], k.shape[2], self.window_size
        block = min(window, tq)
        n_blocks = -(-tq // block)
        pad = n_blocks * block - tq
        # rows W k_j; padded so that query i (absolute position i + Tk - Tq) finds key i - w at index i + window-1 - w
        kw = k.float() @ self.weight.float().T
        kw = F.pad(kw, (0, 0, window - 1, 0))[:, :, tk - tq :]
        kw = F.pad(kw, (0, 0, 0, pad)).unfold(2, block + window - 1, block)  # [B, Hkv, nb, D, block+window-1]
        qf = F.pad(q.float() / math.sqrt(dim), (0, 0, 0, pad))
        qf = qf.view(batch, heads_kv, heads // heads_kv, n_blocks, block, dim)
        local = qf @ kw.unsqueeze(2)  # [B, Hkv, rep, nb, block, block+window-1]
        rows = torch.arange(block, device=q.device)[:, None]
        idx = rows + window - 1 - torch.arange(window, device=q.device)[None, :]
        band = local.gather(-1, idx.expand(*local.shape[:-1], window))
        return band.reshape(batch, heads, n_blocks * block, window)[:, :, :tq]

    def forward(self, scores: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Add the banded strengths to the logits [B, H, Tq, Tk]; masked (-inf) entries stay masked."""
        _check_float_tensor("scores", scores, (4,))
        self._check_qk(q, k)
        expected = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if tuple(scores.shape) != expected:
            raise ValueError(f"scores must have shape {expected} (from q and k), got {tuple(scores.shape)}")
        band = self.compute_synaptic_strength(q, k)
        batch, heads, tq, window = band.shape
        tk = scores.shape[-1]
        key = torch.arange(tq, device=q.device)[:, None] + (tk - tq) - torch.arange(window, device=q.device)[None, :]
        band = band.masked_fill(key < 0, 0.0)
        flat_idx = (torch.arange(tq, device=q.device)[:, None] * tk + key.clamp(min=0)).reshape(-1)
        out = scores.float().flatten(2).scatter_add(-1, flat_idx.expand(batch, heads, -1), band.flatten(2))
        return out.view(scores.shape).to(scores.dtype)
