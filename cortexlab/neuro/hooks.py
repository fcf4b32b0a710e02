"""Inference-time hooks: NeuroLlama's mechanisms acting on a pretrained model's attention, no training.

`InferenceHookPipeline` applies, per decoder layer and head, four mechanisms of `cortexlab.neuro` to
the attention of any transformers-5 decoder (Llama, Qwen2, Qwen3, Mistral, SmolLM2...). For a layer
with scores s = scale q k^T [B, H, Tq, Tk] (causal and padding mask as -inf):

    pre-attention   s <- g s                        adaptive temperature (`AdaptiveHeadTemperature`)
                    s <- s + eta scale q^T H k      Hebbian co-activation (`HebbianAttention.score_bias`;
                                                    q, k unit-normalised by default)
                    s <- s + log(1 - h)             habituation of over-attended keys (`HabituatingAttention`)
    attention       A = softmax(s)
    post-attention  S_hi = entropy of A_hi          (kept for plots; what the voting reads)
    aggregation     o_h <- o_h * H w_h,  w = softmax_h(-S / voting_temperature)   (`EntropyBasedVoting`)

Every hook is causal (query i only sees keys and earlier queries <= i), keeps state across calls
(decoding with a KV cache continues the habituation and the temperature set point; the Hebbian matrix
is a fast weight carried until `reset()`, averaged over the batch), and is an exact no-op when
disabled. The first `sink_tokens` keys each row may see (after any left padding) are shielded from
habituation: attention sinks (Xiao et al. 2024) take most of every head's attention by design, and
suppressing them breaks the model rather than a repetition. Padding queries do not count towards the
temperature set point. A call that cannot continue the stored state (another batch size, a cache
that dropped keys: sliding-window or static caches) raises before any state moves.

Attached (`attach(model)`), the model's attention runs through `AttentionInterface` under a name
of this pipeline, with a matching entry in `AttentionMaskInterface` that builds a boolean causal
mask (transformers builds no mask at all for an attention name it does not know). On a layer a hook
acts on, the function is eager attention in fp32 (float64 for a float64 model) with the hooks in
between; elsewhere it is transformers' SDPA with that mask. With every hook at its neutral setting
the logits equal the unhooked model's (to rounding: tested to 1e-6 on tiny models; eager and SDPA
differ by ~1e-4 on SmolLM2's fp32 logits of ~30, and by ~1e-13 in float64, tested <= 1e-5).
`detach()` restores the model's own attention implementation.

Memory and compute per layer and call, beyond eager attention's own [B, H, Tq, Tk] scores and
probabilities and its key/value copies per query head (nothing of size T x T outlives the call):
- temperature: one fp32 softmax of the scores and the rescaled scores (two [B, H, Tq, Tk]); state
  [B, H] + the last [B, H, Tq] temperatures.
- Hebbian: one more softmax, the bias (two [B, H, Tq, Tk]) and [B, H, Tq, Tq] query similarities;
  state H x D x D.
- habituation: the output scores ([B, H, Tq, Tk]) and [B, H, 64, Tk] fp32 per chunk of 64 queries;
  state [B, H, Tk] exposure.
- voting: [B, H, Tq] entropies (one pass over the probabilities); the last [B, Tq, H] weights are kept.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from cortexlab.checks import check_int, check_number
from cortexlab.cortex.wrap import decoder_layers

from .habituation import HabituatingAttention, HabituationConfig
from .hebbian import HebbianAttention, HebbianConfig
from .population import EntropyBasedVoting, attention_entropy, combine_heads
from .temperature import AdaptiveHeadTemperature

__all__ = ["InferenceHookConfig", "InferenceHookPipeline"]

_MAX_KEYS = 1 << 30       # HabituatingAttention checks Tk against a bound; the hooks impose none


@dataclass(frozen=True)
class InferenceHookConfig:
    """Which hooks act, on which decoder layers (0-based indices or "all"), and their settings.

    Hebbian: eta (bias scale), learning_rate, decay (per token), max_norm (Frobenius clip per head),
    normalize (use unit-length q and k: a pretrained model's q/k norms of 10-20 would otherwise make the
    bias, quadratic in both, swamp the scores even at small eta).
    Habituation: habituation_rate, recovery_rate, attention_threshold, max_habituation (see
    `HabituationConfig`), sink_tokens (first keys never habituated). Temperature: strength and target
    (None: each head's causal running mean). Voting: voting_temperature (inf: uniform = neutral).
    """

    enable_hebbian: bool = False
    enable_habituation: bool = False
    enable_temperature: bool = False
    enable_voting: bool = False
    layers: str | Sequence[int] = "all"
    hebbian_eta: float = 1.0
    hebbian_learning_rate: float = 0.01
    hebbian_decay: float = 0.99
    hebbian_max_norm: float = 10.0
    hebbian_normalize: bool = True
    habituation_rate: float = 0.1
    recovery_rate: float = 0.01
    attention_threshold: float = 0.1
    max_habituation: float = 0.9
    sink_tokens: int = 1
    temperature_strength: float = 1.0
    temperature_target: float | None = None
    voting_temperature: float = 1.0
    _hebbian: HebbianConfig = field(init=False, repr=False, compare=False)
    _habituation: HabituationConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("enable_hebbian", "enable_habituation", "enable_temperature", "enable_voting",
                     "hebbian_normalize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.layers != "all":
            layers = list(self.layers) if isinstance(self.layers, (list, tuple, range)) else None
            if not layers or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers):
                raise ValueError(f'layers must be "all" or a non-empty list of layer indices >= 0, got {self.layers!r}')
            object.__setattr__(self, "layers", sorted(set(layers)))
        check_int("sink_tokens", self.sink_tokens, 0)
        check_number("temperature_strength", self.temperature_strength)
        check_number("temperature_target", self.temperature_target, 0, 1, allow_none=True)
        check_number("voting_temperature", self.voting_temperature, 0, low_open=True, allow_inf=True)
        hebbian = HebbianConfig(learning_rate=self.hebbian_learning_rate, decay_rate=self.hebbian_decay,
                                max_hebbian_norm=self.hebbian_max_norm, eta=self.hebbian_eta)
        habituation = HabituationConfig(habituation_rate=self.habituation_rate, recovery_rate=self.recovery_rate,
                                        attention_threshold=self.attention_threshold,
                                        max_habituation=self.max_habituation)
        object.__setattr__(self, "_hebbian", hebbian)                  # frozen: derived once, never stale
        object.__setattr__(self, "_habituation", habituation)

    @property
    def any_enabled(self) -> bool:
        return self.enable_hebbian or self.enable_habituation or self.enable_temperature or self.enable_voting


class _LayerHooks:
    """The mechanisms of one decoder layer, built on the first tensors the layer sees."""

    def __init__(self, config: InferenceHookConfig, num_heads: int):
        self.config, self.num_heads = config, num_heads
        self.hebbian: HebbianAttention | None = None          # built by `hebbian_for`: it needs the head dim
        self.habituation = (HabituatingAttention(num_heads, _MAX_KEYS, config._habituation)
                            if config.enable_habituation else None)
        self.temperature = (AdaptiveHeadTemperature(num_heads, config.temperature_strength, config.temperature_target)
                            if config.enable_temperature else None)
        self.voting = EntropyBasedVoting(num_heads, config.voting_temperature) if config.enable_voting else None
        self.entropy = torch.zeros(0, num_heads, 0)
        self.weights = torch.zeros(0, 0, num_heads)
        self.sinks = torch.zeros(0, 0, dtype=torch.bool)       # [B, Tk] shielded keys of the last call

    def hebbian_for(self, head_dim: int, device: torch.device) -> HebbianAttention:
        if self.hebbian is None:
            self.hebbian = HebbianAttention(head_dim, self.num_heads, self.config._hebbian).to(device)
        return self.hebbian.to(device)

    def check(self, B: int, Tq: int, Tk: int, head_dim: int | None) -> None:
        """Raise before any state moves if this call cannot continue the layer's state."""
        if self.hebbian is not None and head_dim is not None and self.hebbian.head_dim != head_dim:
            raise ValueError(f"query has head dim {head_dim}, this layer's Hebbian state {self.hebbian.head_dim}")
        if Tk == Tq:
            return                                        # a new sequence: habituation and temperature restart
        past = self.habituation.exposure if self.habituation is not None else None
        if past is not None and (past.shape[-1] != Tk - Tq or (past.numel() and past.shape[0] != B)):
            raise ValueError(f"this call continues a sequence of {Tk - Tq} keys (batch {B}), but the habituation "
                             f"state covers {past.shape[-1]} keys of batch {past.shape[0]}: call reset() before a "
                             "new sequence (sliding-window or static caches are not supported)")
        if self.temperature is not None and self.temperature.entropy_sum.shape[0] not in (0, B):
            raise ValueError(f"this call has batch {B}, the temperature state batch "
                             f"{self.temperature.entropy_sum.shape[0]}: call reset() before a new sequence")

    def reset(self) -> None:
        for module in (self.hebbian, self.habituation, self.temperature):
            if module is not None:
                module.reset_state()
        self.entropy = torch.zeros(0, self.num_heads, 0)
        self.weights = torch.zeros(0, 0, self.num_heads)
        self.sinks = torch.zeros(0, 0, dtype=torch.bool)


def _boolean_causal_mask(*args, **kwargs):
    """transformers' SDPA mask (True = attend) that is never skipped: the hooks always need the mask."""
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _allowed(attention_mask, Tq: int, Tk: int, device) -> torch.Tensor:
    """Boolean [B or 1, 1, Tq, Tk] of allowed keys from a boolean or additive mask (causal if None)."""
    if attention_mask is None:
        queries = torch.arange(Tk - Tq, Tk, device=device)
        return (torch.arange(Tk, device=device)[None, :] <= queries[:, None])[None, None]
    mask = attention_mask[..., -Tk:]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


class InferenceHookPipeline:
    """Hebbian, habituation, adaptive temperature and population voting on a pretrained model's attention.

    Use the tensor-level methods (`apply_pre_attention`, `apply_post_attention`,
    `apply_output_aggregation`) inside your own attention, or `attach(model)` to run them in every
    forward and `generate` of a transformers decoder. See the module docstring for the equations
    and the memory each hook costs.
    """

    def __init__(self, config: InferenceHookConfig | None = None):
        if config is not None and not isinstance(config, InferenceHookConfig):
            raise TypeError(f"config must be an InferenceHookConfig, got {type(config).__name__}")
        self.config = config or InferenceHookConfig()
        self._layers: dict[int, _LayerHooks] = {}
        self._model = None
        self._original_attention: str | None = None
        self._name = f"cortexlab_hooks_{id(self):x}"

    # ---- which layers, and their state -------------------------------------------------------

    def acts_on(self, layer_idx: int) -> bool:
        """Whether any enabled hook acts on decoder layer `layer_idx`."""
        layers = self.config.layers
        return self.config.any_enabled and (layers == "all" or layer_idx in layers)

    def _hooks(self, layer_idx: int, num_heads: int) -> _LayerHooks:
        hooks = self._layers.get(layer_idx)
        if hooks is None:
            hooks = self._layers[layer_idx] = _LayerHooks(self.config, num_heads)
        elif hooks.num_heads != num_heads:
            raise ValueError(f"layer {layer_idx} was seen with {hooks.num_heads} heads, now {num_heads}")
        return hooks

    def _state(self, layer_idx: int) -> _LayerHooks | None:
        if not isinstance(layer_idx, int) or isinstance(layer_idx, bool) or not self.acts_on(layer_idx):
            raise ValueError(f"layer_idx {layer_idx!r}: no enabled hook acts on this layer "
                             f"(layers={self.config.layers!r})")
        return self._layers.get(layer_idx)

    def habituation_map(self, layer_idx: int) -> torch.Tensor:
        """Suppression h [B, H, Tk] that the next query of layer `layer_idx` would apply (empty before a call)."""
        if not self.config.enable_habituation:
            raise ValueError("habituation is not enabled (enable_habituation=False)")
        state = self._state(layer_idx)
        if state is None:
            return torch.zeros(0, 0, 0)
        suppression = state.habituation.get_habituation_map()
        if state.sinks.shape == (suppression.shape[0], suppression.shape[-1]):
            suppression = suppression.masked_fill(state.sinks[:, None, :].to(suppression.device), 0.0)
        return suppression

    def hebbian_matrix(self, layer_idx: int) -> torch.Tensor:
        """Co-activation state H [heads, D, D] of layer `layer_idx` (empty before a call)."""
        if not self.config.enable_hebbian:
            raise ValueError("the Hebbian hook is not enabled (enable_hebbian=False)")
        state = self._state(layer_idx)
        return state.hebbian.hebbian.clone() if state is not None and state.hebbian is not None \
            else torch.zeros(0, 0, 0)

    def temperatures(self, layer_idx: int) -> torch.Tensor:
        """Per-query temperatures 1/g [B, H, Tq] of layer `layer_idx` in the last call (empty before one)."""
        if not self.config.enable_temperature:
            raise ValueError("the temperature hook is not enabled (enable_temperature=False)")
        state = self._state(layer_idx)
        return state.temperature.temperature.clone() if state is not None else torch.zeros(0, 0, 0)

    def voting_weights(self, layer_idx: int) -> torch.Tensor:
        """Per-token head weights w [B, Tq, H] of layer `layer_idx` in the last call (sum to 1 over heads)."""
        if not self.config.enable_voting:
            raise ValueError("voting is not enabled (enable_voting=False)")
        state = self._state(layer_idx)
        return state.weights.clone() if state is not None else torch.zeros(0, 0, 0)

    def attention_entropy(self, layer_idx: int) -> torch.Tensor:
        """Entropy (nats) [B, H, Tq] of each head's attention in the last call of layer `layer_idx`."""
        state = self._state(layer_idx)
        return state.entropy.clone() if state is not None else torch.zeros(0, 0, 0)

    def reset(self) -> None:
        """Forget every layer's state: habituation, Hebbian matrix, temperature set point, last weights."""
        for hooks in self._layers.values():
            hooks.reset()

    # ---- the design's tensor-level API ------------------------------------------------------

    def apply_pre_attention(self, attention_logits: torch.Tensor, layer_idx: int,
                            query: torch.Tensor | None = None, key: torch.Tensor | None = None) -> torch.Tensor:
        """Masked scores [B, H, Tq, Tk] -> temperature, Hebbian bias, habituation applied (same shape).

        query [B, H, Tq, D] and key [B, H_kv, Tk, D] (after RoPE) are needed by the Hebbian hook.
        Tq < Tk continues the sequence of the previous call (decoding with a KV cache); Tq == Tk
        starts a new one for habituation and temperature. A layer no hook acts on is returned as is.
        """
        if not isinstance(attention_logits, torch.Tensor) or not attention_logits.is_floating_point() \
                or attention_logits.ndim != 4:
            raise ValueError(f"attention_logits must be a floating-point tensor [B, H, Tq, Tk], got "
                             f"{getattr(attention_logits, 'shape', type(attention_logits).__name__)}")
        B, H, Tq, Tk = attention_logits.shape
        if Tq > Tk:
            raise ValueError(f"attention_logits has more queries ({Tq}) than keys ({Tk})")
        if not self.acts_on(layer_idx):
            return attention_logits
        if self.config.enable_hebbian and (query is None or key is None):
            raise ValueError("query and key are required when enable_hebbian=True")
        hooks = self._hooks(layer_idx, H)
        hooks.check(B, Tq, Tk, query.shape[-1] if query is not None else None)
        continuing = Tk > Tq
        scores = attention_logits
        if hooks.temperature is not None:
            scores = hooks.temperature(scores, use_cache=continuing)
        if self.config.enable_hebbian:
            q, k = (F.normalize(query.float(), dim=-1), F.normalize(key.float(), dim=-1)) \
                if self.config.hebbian_normalize else (query, key)
            scores = scores + hooks.hebbian_for(query.shape[-1], query.device).score_bias(q, k, scores)
        if hooks.habituation is not None:
            visible = torch.isfinite(attention_logits[:, 0, -1, :])             # keys the last query may see
            hooks.sinks = visible & (visible.cumsum(-1) <= self.config.sink_tokens)   # the first ones: sinks
            scores = hooks.habituation(scores, novelty=hooks.sinks.float(), use_cache=continuing)
        return scores

    def apply_post_attention(self, attention_weights: torch.Tensor, query: torch.Tensor | None = None,
                             key: torch.Tensor | None = None, layer_idx: int = 0) -> torch.Tensor:
        """Record each head's attention entropy S [B, H, Tq] (nats) for layer `layer_idx` and return it.

        The stateful hooks advance their state in `apply_pre_attention`, in the same pass over the
        probabilities that their biases need; query and key are accepted for the design's signature.
        """
        if not isinstance(attention_weights, torch.Tensor) or attention_weights.ndim != 4:
            raise ValueError(f"attention_weights must be a tensor [B, H, Tq, Tk], got "
                             f"{getattr(attention_weights, 'shape', type(attention_weights).__name__)}")
        entropy = attention_entropy(attention_weights)
        if self.acts_on(layer_idx):
            self._hooks(layer_idx, attention_weights.shape[1]).entropy = entropy
        return entropy

    def apply_output_aggregation(self, head_outputs: torch.Tensor, attention_weights: torch.Tensor,
                                 layer_idx: int = 0, entropy: torch.Tensor | None = None) -> torch.Tensor:
        """Per-head outputs [B, Tq, H, D] -> re-weighted o_h * H w_h (the layer's o_proj then mixes them).

        w = softmax over heads of -entropy / voting_temperature (`EntropyBasedVoting`); identity when
        voting is disabled or the layer is not hooked. `entropy` [B, H, Tq]: the heads' entropy of these
        attention weights when already computed (`apply_post_attention` returns it), so it is not computed twice.
        """
        if not (self.config.enable_voting and self.acts_on(layer_idx)):
            return head_outputs
        if not isinstance(head_outputs, torch.Tensor) or head_outputs.ndim != 4:
            raise ValueError(f"head_outputs must be a tensor [B, Tq, H, D], got "
                             f"{getattr(head_outputs, 'shape', type(head_outputs).__name__)}")
        hooks = self._hooks(layer_idx, head_outputs.shape[2])
        if entropy is not None and entropy.shape != attention_weights.shape[:3]:
            raise ValueError(f"entropy must be [B, H, Tq] = {tuple(attention_weights.shape[:3])}, "
                             f"got {tuple(entropy.shape)}")
        weights = hooks.voting.head_weights(attention_weights) if entropy is None \
            else hooks.voting.weights_from_entropy(entropy)
        if weights.shape[:2] != head_outputs.shape[:2]:
            raise ValueError(f"attention_weights has batch/queries {tuple(weights.shape[:2])}, head_outputs "
                             f"{tuple(head_outputs.shape[:2])}")
        hooks.weights = weights
        return combine_heads(head_outputs, weights, aggregate=False)

    # ---- attaching to a transformers model ---------------------------------------------------

    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """transformers' attention-function signature: eager attention with the hooks in between (SDPA
        on a layer no enabled hook acts on).

        query [B, H, Tq, D], key/value [B, H_kv, Tk, D] (cache included) -> ([B, Tq, H, D], probs [B, H, Tq, Tk]).
        """
        layer = module.layer_idx
        if not self.acts_on(layer):                  # nothing to do here: transformers' own SDPA, same mask
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        B, H, Tq, D = query.shape
        Tk = key.shape[2]
        group = H // key.shape[1]
        keys = key.repeat_interleave(group, dim=1) if group > 1 else key
        values = value.repeat_interleave(group, dim=1) if group > 1 else value
        scale = D ** -0.5 if scaling is None else scaling
        dtype = torch.promote_types(query.dtype, torch.float32)      # fp32 at least, float64 stays float64
        scores = torch.matmul(query.to(dtype), keys.to(dtype).transpose(-1, -2)) * scale
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            scores = scores + attention_mask[..., -Tk:].to(dtype)
        scores = scores.masked_fill(~_allowed(attention_mask, Tq, Tk, query.device), -math.inf)
        scores = self.apply_pre_attention(scores, layer, query=query, key=key)
        probs = scores.softmax(-1).nan_to_num(0.0)            # a fully masked (padding) row attends nowhere
        entropy = self.apply_post_attention(probs, query, key, layer)
        weights = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
        out = torch.matmul(weights.to(values.dtype), values).transpose(1, 2)
        out = self.apply_output_aggregation(out, probs, layer, entropy=entropy)
        return out.contiguous(), probs

    def attach(self, model) -> InferenceHookPipeline:
        """Route `model`'s attention through this pipeline (every forward and `generate`); returns self."""
        if self._model is not None:
            raise RuntimeError("this pipeline is already attached; detach() it first")
        config = getattr(model, "config", None)
        if not hasattr(config, "_attn_implementation") or not hasattr(model, "set_attn_implementation"):
            raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
        blocks = decoder_layers(model)
        if any(getattr(getattr(b, "self_attn", None), "layer_idx", None) is None for b in blocks):
            raise TypeError("model's decoder layers have no self_attn.layer_idx: not a supported decoder")
        if self.config.layers != "all" and max(self.config.layers) >= len(blocks):
            raise ValueError(f"layers {self.config.layers} out of range for a model with {len(blocks)} layers")
        AttentionInterface.register(self._name, self._attention)
        AttentionMaskInterface.register(self._name, _boolean_causal_mask)
        self._original_attention = config._attn_implementation
        model.set_attn_implementation(self._name)
        if model.config._attn_implementation != self._name:
            self._unregister()
            raise TypeError(f"{type(model).__name__} cannot switch its attention implementation "
                            "(it does not use transformers' AttentionInterface)")
        self._model = model
        return self

    def detach(self) -> None:
        """Give `model` its own attention implementation back; the hooks' state is kept for inspection."""
        if self._model is None:
            raise RuntimeError("this pipeline is not attached")
        self._model.set_attn_implementation(self._original_attention)
        self._unregister()
        self._model = None

    def _unregister(self) -> None:
        AttentionInterface._global_mapping.pop(self._name, None)
        AttentionMaskInterface._global_mapping.pop(self._name, None)

    @contextmanager
    def attached(self, model):
        """`with pipeline.attached(model): ...` attaches for the block and always detaches."""
        self.attach(model)
        try:
            yield self
        finally:
            self.detach()

    @property
    def is_attached(self) -> bool:
        return self._model is not None
