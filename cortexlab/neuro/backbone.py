"""The NeuroLlama backbone: a Llama-3 decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) written out eagerly.

With every mechanism off, `NeuroLlamaModel` computes what transformers' `LlamaForCausalLM` (eager attention, default
RoPE) computes from the same weights; `from_hf_llama` / `load_llama_state_dict` load such weights. Parameter names
follow transformers' Llama without the leading "model." (see `hf_to_neuro_key`).

Where the mechanisms plug in (each point delegates to the modules `model.py` attaches; with every toggle off
nothing is attached and these are the plain Llama steps):
  `NeuroAttention._pre_softmax`   scores [B, H, Tq, Tk] (masked entries -inf)  synaptic, Hebbian, habituation, decay
  `NeuroAttention._per_head`      head outputs [B, T, H, D]                   neuromodulation gates, lateral inhibition
                                                                              (and column specialisation is measured)
  `NeuroAttention._aggregate`     [B, T, H, D] -> [B, T, hidden]              concat + o_proj, or population coding
  `NeuroLlamaModel.forward` loop  after each decoder layer                    predictive coding, early exit
See `cortexlab.neuro.model` for what is wired where, which mechanisms are neutral at init, and the state rules.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .config import NeuroLlamaConfig
from .model import (
    DEFAULT_EXIT_LOSS_WEIGHT,
    ForwardState,
    attach_mechanisms,
    aux_weights,
    auxiliary_losses,
    check_exit_loss_weight,
    default_objectives,
    weighted_aux_loss,
)
from .objectives import TrainingObjectiveConfig

__all__ = [
    "RMSNorm",
    "rope_cos_sin",
    "apply_rope",
    "repeat_kv",
    "causal_attention_mask",
    "NeuroAttention",
    "SwiGLU",
    "NeuroDecoderLayer",
    "NeuroLlamaModel",
    "create_neurollama",
    "causal_lm_loss",
    "hf_to_neuro_key",
    "load_llama_state_dict",
    "config_from_hf_llama",
    "from_hf_llama",
]


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalised in fp32 and cast back before the weight (as in Llama)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin [B, T, D] of angles p * theta^(-2i/D), i < D/2, each frequency repeated for both halves (fp32 math)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    angles = positions[..., None].float() * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """rotate_half([x1, x2]) = [-x2, x1] over the last dimension (RoPE's pairing of the two halves)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin; x [B, H, T, D], cos/sin [B, T, D]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, H_kv, T, D] -> [B, H_kv * groups, T, D]; query head h reads KV head h // groups."""
    if groups == 1:
        return x
    b, h_kv, t, d = x.shape
    return x[:, :, None].expand(b, h_kv, groups, t, d).reshape(b, h_kv * groups, t, d)


def causal_attention_mask(attention_mask: torch.Tensor | None, seq_len: int, device: torch.device) -> torch.Tensor:
    """Boolean "may attend" mask [B or 1, 1, T, T]: key j <= query i and key j not padding.

    A query always sees itself, so a padding query's row is never fully masked (no NaN from softmax); its output is
    ignored anyway (give it label -100).
    """
    idx = torch.arange(seq_len, device=device)
    allowed = (idx[None, :] <= idx[:, None])[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    return allowed | torch.eye(seq_len, dtype=torch.bool, device=device)


class NeuroAttention(nn.Module):
    """Grouped-query attention, eager: o = softmax(q k^T / sqrt(D) + mask) v, then o_proj(concat heads).

    q = RoPE(x W_q) [B, H, T, D]; k, v = RoPE(x W_k), x W_v [B, H_kv, T, D], each KV head shared by H / H_kv query
    heads. The three `_pre_softmax`, `_per_head`, `_aggregate` steps are where the mechanisms plug in.
    """

    def __init__(self, config: NeuroLlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.groups = config.num_kv_groups
        self.scale = config.head_dim ** -0.5
        self.q_proj = nn.Linear(config.hidden_dim, config.num_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_dim, config.num_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_dim, config.num_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_dim, bias=False)
        self.register_module("mechanisms", None)   # an AttentionMechanisms when a toggle is on (model.py)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor,
                state: ForwardState | None = None) -> torch.Tensor:
        """x [B, T, hidden] (normed) -> [B, T, hidden]; `state` carries the mechanisms' per-forward data."""
        state = state if state is not None else ForwardState()
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = repeat_kv(k, self.groups), repeat_kv(v, self.groups)

        scores = torch.matmul(q, k.transpose(2, 3)) * self.scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        # Re-mask after the modifiers: a multiplicative one could turn -inf into NaN (0 * -inf).
        scores = self._pre_softmax(scores, q, k, x, state).masked_fill(~allowed, float("-inf"))
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        heads = torch.matmul(probs, v).transpose(1, 2)  # [B, T, H, D]
        heads = self._per_head(heads, probs, x, state)
        return self._aggregate(heads, probs, x)

    # mechanism point 1: pre-softmax score modifiers (synaptic scaling / full matrix, Hebbian bias, habituation).
    def _pre_softmax(self, scores: torch.Tensor, q: torch.Tensor, k: torch.Tensor, x: torch.Tensor,
                     state: ForwardState) -> torch.Tensor:
        """scores [B, H, Tq, Tk] (masked = -inf), q and per-query-head k [B, H, T, D].

        x [B, T, hidden] here and below is the attention's (normed) input: the per-token context vector.
        """
        return scores if self.mechanisms is None else self.mechanisms.pre_softmax(scores, q, k, x, state)

    # mechanism point 2: per-head output modifiers (context-dependent neuromodulation, lateral inhibition).
    def _per_head(self, heads: torch.Tensor, probs: torch.Tensor, x: torch.Tensor,
                  state: ForwardState) -> torch.Tensor:
        """heads [B, T, H, D], probs [B, H, Tq, Tk]."""
        return heads if self.mechanisms is None else self.mechanisms.per_head(heads, probs, x, state)

    # mechanism point 3: head aggregation (concat + o_proj by default; population coding replaces it).
    def _aggregate(self, heads: torch.Tensor, probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H, D] -> o_proj(concat) [B, T, hidden]."""
        if self.mechanisms is not None:
            return self.mechanisms.aggregate(heads, probs, x, self.o_proj)
        return self.o_proj(heads.reshape(*heads.shape[:2], -1))


class SwiGLU(nn.Module):
    """y = W_down (silu(W_gate x) * W_up x)  (Shazeer, 2020)."""

    def __init__(self, hidden_dim: int, ffn_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(hidden_dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class NeuroDecoderLayer(nn.Module):
    """Pre-norm block: h = x + Attn(RMSNorm(x));  y = h + SwiGLU(RMSNorm(h))."""

    def __init__(self, config: NeuroLlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_dim, config.rms_norm_eps)
        self.self_attn = NeuroAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_dim, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_dim, config.ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor,
                state: ForwardState | None = None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, allowed, state)
        return h + self.mlp(self.post_attention_layernorm(h))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy: mean over t of -log softmax(logits[:, t])[labels[:, t+1]], skipping ignore_index."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=ignore_index)


class NeuroLlamaModel(nn.Module):
    """Embedding -> num_layers decoder layers -> RMSNorm -> lm_head: p(x_{t+1} | x_<=t) = softmax(W_out h_t).

    The mechanisms that config switches on are attached after the backbone's init (`model.attach_mechanisms`), so
    the backbone weights of a seed do not depend on the toggles. `objectives` (a TrainingObjectiveConfig; default
    `model.default_objectives(config)`) and `exit_loss_weight` weigh the auxiliary losses in out["aux_loss"].
    """

    def __init__(self, config: NeuroLlamaConfig, objectives: TrainingObjectiveConfig | None = None,
                 exit_loss_weight: float = DEFAULT_EXIT_LOSS_WEIGHT):
        super().__init__()
        if not isinstance(config, NeuroLlamaConfig):
            raise TypeError(f"config must be a NeuroLlamaConfig, got {type(config).__name__}")
        self.config = config
        self.objectives = _check_objectives(objectives) or default_objectives(config)
        self.exit_loss_weight = check_exit_loss_weight(exit_loss_weight)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_dim)
        self.layers = nn.ModuleList(NeuroDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_dim, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_dim, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        self.tie_weights()
        self.register_module("mechanisms", None)   # a ModelMechanisms when a layer-level toggle is on
        attach_mechanisms(self)

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head(RMSNorm(h)): the model's head (the early-exit heads share it through their adapters)."""
        return self.lm_head(self.norm(hidden))

    def reset_state(self) -> None:
        """Clear every mechanism's state: Hebbian H, habituation maps, lateral inhibition, running surprises, and
        the early-exit controller's adapted threshold. Outputs are then those of the freshly built model."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_state"):
                module.reset_state()
        if self.mechanisms is not None and self.mechanisms.exit_controller is not None:
            self.mechanisms.exit_controller.reset()

    def tie_weights(self) -> None:
        """With config.tie_embeddings, make lm_head share the embedding matrix (W_out = E)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        """Linear and embedding weights ~ N(0, initializer_range^2) as in Llama; RMSNorm weights stay 1.

        Skipped on the meta device (there is nothing to fill, and torch's meta normal_ is slow).
        """
        if isinstance(module, (nn.Linear, nn.Embedding)) and not module.weight.is_meta:
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied lm_head counts once); optionally without embedding and lm_head."""
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            for p in (self.embed_tokens.weight, self.lm_head.weight):
                params.pop(id(p), None)
        return sum(p.numel() for p in params.values())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                output_hidden_states: bool = False, update_state: bool = False,
                objectives: TrainingObjectiveConfig | None = None) -> dict[str, Any]:
        """Logits [B, T, V] for input_ids [B, T]; `loss` (next-token, labels shifted inside) when labels are given.

        attention_mask [B, T] (1 = token, 0 = padding) masks padded keys; position_ids [B, T] default to 0..T-1
        (pass mask.cumsum(-1) - 1 for left padding). hidden_states, when asked for, holds the residual stream
        after the embedding and after each layer run (before the final norm).
        update_state=True lets this call write the across-call memory (Hebbian H) that later calls read; by
        default a call leaves it unchanged. objectives overrides the model's aux-loss weights for this call.

        Returns {"logits", "exit_layer", "system_type", "surprises" (one [B, T] per layer with predictive coding),
        "column_specialization" (one JS scalar per layer with cortical columns), "aux_losses" (unweighted terms),
        "aux_loss" (their weighted sum, or None), "loss" (with labels), "hidden_states" (if asked)}.
        Early exit: in eval mode without labels, the pass stops at the first exit layer where the exit head is
        confident (>= the threshold) for every sequence's last token; the logits are then that head's, at every
        position, exit_layer = that layer and system_type = "system1". The decision reads the last token, so which
        layer answers depends on the whole input (per position, logits are still causal given that layer).
        """
        self._check_inputs(input_ids, attention_mask, labels, position_ids)
        if not isinstance(update_state, bool):
            raise TypeError(f"update_state must be a bool, got {type(update_state).__name__}")
        objectives = _check_objectives(objectives) or self.objectives
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        allowed = causal_attention_mask(attention_mask, t, input_ids.device)

        mech = self.mechanisms
        state = ForwardState(update_state=update_state, attention_decay=mech.attention_decay if mech else None)
        may_exit = mech is not None and mech.early_exit is not None and not self.training and labels is None
        hidden_states, exit_hidden, logits = [x], {}, None
        exit_layer, system_type = self.config.num_layers, "system2"
        for i, layer in enumerate(self.layers):
            x_next = layer(x, cos, sin, allowed, state)
            # mechanism point 4: layer-level hooks (predictive coding -> surprises; early exit -> break).
            x = x_next if mech is None else mech.after_layer(i, x, x_next, state)
            hidden_states.append(x)
            if mech is not None and i + 1 in mech.exit_layers:
                exit_hidden[i + 1] = x
                logits = mech.try_exit(i + 1, x) if may_exit else None
                if logits is not None:
                    exit_layer, system_type = i + 1, "system1"
                    break
        if logits is None:
            logits = self.final_logits(x)

        out = {"logits": logits, "exit_layer": exit_layer, "system_type": system_type, "surprises": state.surprises,
               "column_specialization": [js.detach() for js in state.column_specialization]}
        if labels is None:   # the exit heads' next-token targets when the caller computes the loss itself
            labels_or_inputs = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
        else:
            labels_or_inputs = labels
        terms = auxiliary_losses(mech, state, exit_hidden, logits, labels_or_inputs, self.training)
        out["aux_losses"] = terms
        out["aux_loss"] = weighted_aux_loss(terms, aux_weights(objectives, self.exit_loss_weight))
        if labels is not None:
            out["loss"] = causal_lm_loss(logits, labels)
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden_states)
        return out

    def _check_inputs(self, input_ids, attention_mask, labels, position_ids) -> None:
        """Refuse inputs the model would silently mis-handle, naming the argument."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.is_complex():
            raise TypeError(f"input_ids must be an integer torch.Tensor [B, T], got {_describe(input_ids)}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have shape [B, T] with T >= 1, got {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens, more than max_seq_len "
                             f"({self.config.max_seq_len})")
        if input_ids.device.type != "meta" and input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), got [{lo}, {hi}]")
        for name, value in (("attention_mask", attention_mask), ("labels", labels), ("position_ids", position_ids)):
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or value.dtype.is_floating_point:
                raise TypeError(f"{name} must be an integer or bool torch.Tensor, got {_describe(value)}")
            if value.shape != input_ids.shape:
                raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(value.shape)}")


def _check_objectives(objectives: Any) -> TrainingObjectiveConfig | None:
    if objectives is not None and not isinstance(objectives, TrainingObjectiveConfig):
        raise TypeError(f"objectives must be a TrainingObjectiveConfig or None, got {type(objectives).__name__}")
    return objectives


def _describe(value: Any) -> str:
    return f"{type(value).__name__} of {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__


def create_neurollama(config: NeuroLlamaConfig | str, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None, objectives: TrainingObjectiveConfig | None = None,
                      **overrides: Any) -> NeuroLlamaModel:
    """Build a NeuroLlamaModel from a config or a preset name ("8B", "70B", "405B", "small"), plus field overrides.

    device="meta" builds any preset without allocating memory (shapes and `num_parameters()` only). objectives
    weighs the auxiliary losses (see NeuroLlamaModel).
    """
    if isinstance(config, str):
        config = NeuroLlamaConfig.from_preset(config, **overrides)
    elif isinstance(config, NeuroLlamaConfig):
        config = config.with_overrides(**overrides) if overrides else config
    else:
        raise TypeError(f"config must be a NeuroLlamaConfig or a preset name, got {type(config).__name__}")
    with torch.device(device if device is not None else torch.get_default_device()):
        model = NeuroLlamaModel(config, objectives=objectives)
    return model.to(dtype=dtype) if dtype is not None else model


# ---------------------------------------------------------------------------------------------- transformers Llama
_HF_DROPPED_SUFFIXES = ("rotary_emb.inv_freq",)  # non-persistent buffers that old checkpoints still carry


def hf_to_neuro_key(key: str) -> str:
    """Map a transformers Llama parameter name to ours: drop the leading "model." (all else is identical).

    model.embed_tokens.weight -> embed_tokens.weight;  model.layers.{i}.self_attn.{q,k,v,o}_proj.weight and
    model.layers.{i}.mlp.{gate,up,down}_proj.weight, model.layers.{i}.{input,post_attention}_layernorm.weight,
    model.norm.weight -> the same without "model.";  lm_head.weight -> lm_head.weight.
    """
    return key.removeprefix("model.")


def _backbone_keys(config: NeuroLlamaConfig) -> list[str]:
    keys = ["embed_tokens.weight", "norm.weight", "lm_head.weight"]
    per_layer = [f"self_attn.{p}_proj.weight" for p in "qkvo"]
    per_layer += [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    per_layer += ["input_layernorm.weight", "post_attention_layernorm.weight"]
    return keys + [f"layers.{i}.{name}" for i in range(config.num_layers) for name in per_layer]


def load_llama_state_dict(model: NeuroLlamaModel, hf_state_dict: Mapping[str, torch.Tensor]) -> NeuroLlamaModel:
    """Copy a transformers `LlamaForCausalLM` state dict into `model` (names mapped by `hf_to_neuro_key`).

    Every backbone weight must be present with the right shape (a missing lm_head.weight is taken from the embedding
    for tied checkpoints); keys that are not Llama weights are refused. Mechanism parameters are left untouched.
    Raises ValueError naming the offending keys before anything is copied.
    """
    mapped = {hf_to_neuro_key(k): v for k, v in hf_state_dict.items() if not k.endswith(_HF_DROPPED_SUFFIXES)}
    if "lm_head.weight" not in mapped and "embed_tokens.weight" in mapped:
        mapped["lm_head.weight"] = mapped["embed_tokens.weight"]
    expected = _backbone_keys(model.config)
    own = model.state_dict()
    missing = [k for k in expected if k not in mapped]
    unexpected = [k for k in mapped if k not in expected]
    wrong = [f"{k} {tuple(mapped[k].shape)} != {tuple(own[k].shape)}"
             for k in expected if k in mapped and mapped[k].shape != own[k].shape]
    for problem, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            raise ValueError(f"hf_state_dict has {problem} keys: {', '.join(keys[:8])}"
                             + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""))
    if model.config.tie_embeddings and not torch.equal(mapped["lm_head.weight"], mapped["embed_tokens.weight"]):
        raise ValueError("hf_state_dict has different lm_head and embed_tokens weights but config.tie_embeddings "
                         "is True")
    with torch.no_grad():
        for key in expected:
            own[key].copy_(mapped[key])
    return model


def config_from_hf_llama(hf_config: Any, **overrides: Any) -> NeuroLlamaConfig:
    """NeuroLlamaConfig with the architecture of a transformers LlamaConfig (default RoPE, no biases, SiLU only)."""
    rope = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    problems = {"model_type": (getattr(hf_config, "model_type", "llama"), "llama"),
                "rope_parameters.rope_type": (rope_type, "default"),
                "hidden_act": (getattr(hf_config, "hidden_act", "silu"), "silu"),
                "attention_bias": (getattr(hf_config, "attention_bias", False), False),
                "mlp_bias": (getattr(hf_config, "mlp_bias", False), False)}
    for name, (value, supported) in problems.items():
        if value != supported:
            raise ValueError(f"hf_config.{name}={value!r} is not supported (only {supported!r})")
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", None))
    fields = dict(num_layers=hf_config.num_hidden_layers, hidden_dim=hf_config.hidden_size,
                  num_heads=hf_config.num_attention_heads,
                  num_kv_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
                  head_dim=getattr(hf_config, "head_dim", None), ffn_dim=hf_config.intermediate_size,
                  vocab_size=hf_config.vocab_size, rms_norm_eps=hf_config.rms_norm_eps,
                  max_seq_len=hf_config.max_position_embeddings,
                  tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
                  initializer_range=hf_config.initializer_range)
    if theta is not None:
        fields["rope_theta"] = float(theta)
    return NeuroLlamaConfig(**{**fields, **overrides})


def from_hf_llama(hf_model: nn.Module, **overrides: Any) -> NeuroLlamaModel:
    """A NeuroLlamaModel holding the weights of a transformers LlamaForCausalLM (same device and dtype).

    `overrides` set NeuroLlamaConfig fields, e.g. mechanism toggles; the backbone fields come from hf_model.config.
    A model that holds nothing but Llama weights is built on the meta device and materialised uninitialised (every
    weight is then copied), which skips a random init that takes minutes at 8B; otherwise it is built normally.
    """
    config = config_from_hf_llama(hf_model.config, **overrides)
    weight = hf_model.get_input_embeddings().weight
    model = create_neurollama(config, device="meta", dtype=weight.dtype)
    if set(model.state_dict()) == set(_backbone_keys(config)):
        model = model.to_empty(device=weight.device)
        model.tie_weights()  # to_empty gives each module a fresh parameter
    else:
        model = create_neurollama(config, device=weight.device, dtype=weight.dtype)
    return load_llama_state_dict(model, hf_model.state_dict())
