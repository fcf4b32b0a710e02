"""Attach Cortex sidecars to a frozen Hugging Face decoder: `attach_cortex`, `CortexModel`.

Each chosen decoder layer gets a `HybridCortexBlock` that reads the layer's normalised
input and adds its output to the attention output, before the MLP (in parallel with
attention, as in the design diagram):

    h = x + Attn(norm(x)) + Cortex(norm(x));      out = h + MLP(norm(h))

This is done with forward hooks on `layer.self_attn`, so the base model's modules,
weights and names stay untouched (Llama, Qwen2, Qwen3, Mistral, ... in transformers 5).

Memory: a dict {layer index: block state}. `forward(memory=...)` threads it explicitly
(for training through several calls); `session_id=...` keeps it in `self.sessions`, a
`SessionStore`, between `forward`/`generate` calls. The memory being filled lives in a
thread-local slot, so different threads can generate for different sessions at once.
"""
from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import CortexWrapConfig
from .controller import TokenEntropyCache, predictive_entropy
from .hybrid import HybridCortexBlock
from .session import SessionStore

CONFIG_FILE = "cortex_config.json"
WEIGHTS_FILE = "cortex.safetensors"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (`model.model.layers`)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(layer, "self_attn") for layer in layers):
        raise TypeError(f"{type(model).__name__} has no decoder layers with `self_attn` "
                        "(expected a transformers causal LM such as Llama, Qwen2, Qwen3 or Mistral)")
    return layers


def flatten_memory(memory: dict) -> dict[str, torch.Tensor]:
    """{layer: {name: tensor}} -> {"layer{layer}.{name}": tensor} (the session-store format)."""
    return {f"layer{i}.{name}": t.detach() for i, state in memory.items() for name, t in state.items()}


def unflatten_memory(flat: dict[str, torch.Tensor], device=None) -> dict:
    memory: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        layer, name = key.split(".", 1)
        memory.setdefault(int(layer.removeprefix("layer")), {})[name] = t.to(device)
    return memory


class CortexModel(nn.Module):
    """A frozen causal LM with trainable Cortex sidecars; `.base` is the untouched HF model."""

    def __init__(self, base: nn.Module, cfg: CortexWrapConfig, sessions: SessionStore | None = None):
        super().__init__()
        if not isinstance(cfg, CortexWrapConfig):
            raise TypeError(f"cfg must be a CortexWrapConfig, got {type(cfg).__name__}")
        layers = decoder_layers(base)
        if getattr(base, "_cortex_attached", False):
            raise ValueError("this base model already has Cortex sidecars attached; call detach() on "
                             "the CortexModel that holds them first, or load a fresh base model")
        self.base = base
        self.config = cfg
        self.layer_ids = cfg.layer_indices(len(layers))
        base.requires_grad_(False)
        d_model = base.config.hidden_size
        device = next(base.parameters()).device
        self.sidecars = nn.ModuleDict(
            {str(i): HybridCortexBlock(d_model, cfg).to(device) for i in self.layer_ids})
        self.sessions = sessions if sessions is not None else SessionStore()
        self._local = threading.local()
        self._hooks = [layers[i].self_attn.register_forward_hook(self._make_hook(i), with_kwargs=True)
                       for i in self.layer_ids]
        self.token_entropy = None
        if cfg.controller:
            # the controller's entropy signal: the logit lens on the residual stream entering one
            # layer, computed once per forward and shared by every sidecar (the output head is the
            # most expensive matmul of a small model; reading it per sidecar would dominate the cost)
            self.entropy_layer = self.layer_ids[0] if cfg.entropy_layer is None else cfg.entropy_layer
            if self.entropy_layer > self.layer_ids[0]:
                raise ValueError(f"entropy_layer={self.entropy_layer} must not come after the first sidecar "
                                 f"(layer {self.layer_ids[0]}): every controller needs the signal in the same forward")
            if self.entropy_layer >= len(layers):
                raise ValueError(f"entropy_layer={self.entropy_layer} out of range for {len(layers)} decoder layers")
            self._final_norm = getattr(base.get_decoder(), "norm", None)
            self._lm_head = base.get_output_embeddings()
            if self._final_norm is None or self._lm_head is None:
                raise TypeError(f"{type(base).__name__} exposes no final norm / output head for the "
                                "controller's entropy signal; use CortexWrapConfig(controller=False)")
            self._hooks.append(layers[self.entropy_layer].register_forward_pre_hook(self._read_entropy,
                                                                                     with_kwargs=True))
            # layer 0 reads the token embeddings: each token's entropy is computed once, then looked up
            self.token_entropy = TokenEntropyCache(base.get_input_embeddings(), self._final_norm, self._lm_head) \
                if self.entropy_layer == 0 else None
        self._hooks.append(base.register_forward_pre_hook(self._capture_inputs, with_kwargs=True))
        base._cortex_attached = True

    def detach(self) -> nn.Module:
        """Remove the sidecars' hooks and return the base model, as it was (still frozen)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.base._cortex_attached = False
        return self.base

    def parameter_counts(self) -> dict[str, int]:
        """Numbers of parameters: "base" (the wrapped model), "sidecars", "trainable" (requires_grad, all
        modules) and "base_trainable" (0 while the base is frozen)."""
        def count(params):
            return sum(p.numel() for p in params)

        return {"base": count(self.base.parameters()), "sidecars": count(self.sidecars.parameters()),
                "trainable": count(p for p in self.parameters() if p.requires_grad),
                "base_trainable": count(p for p in self.base.parameters() if p.requires_grad)}

    # ------------------------------------------------------------------ hooks
    def _capture_inputs(self, module, args, kwargs):
        """Remember the 2D padding mask (None when there is no padding) and the input ids of this forward."""
        mask = kwargs.get("attention_mask")
        self._local.mask = mask.bool() if mask is not None and mask.dim() == 2 and not mask.all() else None
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._local.input_ids = ids if isinstance(ids, torch.Tensor) else None

    def _read_entropy(self, module, args, kwargs):
        """Predictive entropy of the residual stream entering `entropy_layer` (see controller.py)."""
        if not getattr(self._local, "disabled", False):
            residual = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            ids = getattr(self._local, "input_ids", None)
            if self.token_entropy is not None and ids is not None:
                self._local.entropy = self.token_entropy(ids, residual)
            else:
                self._local.entropy = predictive_entropy(residual, self._final_norm, self._lm_head)

    def _make_hook(self, idx: int):
        def hook(module, args, kwargs, output):
            if getattr(self._local, "disabled", False):
                return output
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            memory = getattr(self._local, "memory", None)
            mask = getattr(self._local, "mask", None)
            token_mask = None if mask is None else mask[:, mask.shape[1] - hidden.shape[1]:]
            block = self.sidecars[str(idx)]
            entropy = getattr(self._local, "entropy", None) if self.config.controller else None
            traces = getattr(self._local, "traces", None)
            y, new_state, trace = block(hidden.float(), None if memory is None else memory.get(idx), token_mask,
                                        entropy, return_trace=True)
            if memory is not None:
                memory[idx] = new_state
            if traces is not None:
                traces.setdefault(idx, []).append({name: t.detach() for name, t in trace.items()})
            return (output[0] + y.to(output[0].dtype),) + tuple(output[1:])
        return hook

    @contextlib.contextmanager
    def recording(self):
        """Collect each sidecar's per-token trace (gates, controller signals, q/k/v) in this thread.

        Yields {layer: [trace of each forward call, in order]}; see `GatedDeltaNet.forward`.
        """
        previous = getattr(self._local, "traces", None)
        self._local.traces = traces = {}
        try:
            yield traces
        finally:
            self._local.traces = previous

    @contextlib.contextmanager
    def disabled(self):
        """Run the bare base model (sidecars off) inside this block, in this thread: the baseline."""
        previous = getattr(self._local, "disabled", False)
        self._local.disabled = True
        try:
            yield self
        finally:
            self._local.disabled = previous

    @contextlib.contextmanager
    def _filling(self, memory: dict):
        """Run the base model with `memory` as the sidecars' live state (updated in place)."""
        if getattr(self._local, "memory", None) is not None:
            raise RuntimeError("a CortexModel forward is already running in this thread (nested call)")
        self._local.memory = memory
        try:
            yield memory
        finally:
            self._local.memory = None
            self._local.mask = None
            self._local.input_ids = None
            self._local.entropy = None

    @contextlib.contextmanager
    def _session(self, session_id: str | None, reset: bool, memory: dict | None):
        """Yield the memory to fill: the session's (locked, stored back on success) or `memory`."""
        if session_id is None:
            yield {} if memory is None else dict(memory)
            return
        if memory is not None:
            raise ValueError("pass either memory= or session_id=, not both")
        config = self.config.to_json()
        with self.sessions.lock(session_id):
            found = None if reset else self.sessions.get(session_id)
            if found is not None and found.metadata.get("cortex_config", config) != config:
                raise ValueError(f"session {session_id!r} was written by sidecars with another "
                                 "CortexWrapConfig; pass reset_session=True to start it afresh")
            device = next(self.sidecars.parameters()).device
            live = {} if found is None else unflatten_memory(found.state, device)
            yield live
            self.sessions.put(session_id, flatten_memory(live), {"cortex_config": config})

    # ------------------------------------------------------------------ public API
    def forward(self, input_ids=None, attention_mask=None, *, memory: dict | None = None,
                session_id: str | None = None, reset_session: bool = False, **kwargs):
        """The base model's forward with the sidecars on; the output gains `.memory`.

        memory: {layer: state} to continue from (gradients flow through it); None starts fresh.
        session_id: continue (and store back) that session's memory instead.
        """
        _check_ids(input_ids, attention_mask)
        with self._session(session_id, reset_session, memory) as live, self._filling(live):
            out = self.base(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        out.memory = live
        return out

    @torch.no_grad()
    def generate(self, input_ids, session_id: str | None = None, reset_session: bool = False,
                 memory: dict | None = None, **generate_kwargs):
        """`transformers` generate with the sidecars reading and writing memory at every step.

        The prompt and each generated token that is fed back are written to memory (the
        very last sampled token is returned but, as in any HF generate, never fed back).
        Beam search and assisted decoding are not supported (they rewind the sequence).
        """
        _check_ids(input_ids, generate_kwargs.get("attention_mask"))
        if generate_kwargs.get("num_beams", 1) != 1 or "assistant_model" in generate_kwargs:
            raise NotImplementedError("Cortex generate supports greedy and sampling decoding "
                                      "(num_beams=1, no assistant_model): memory cannot be rewound")
        if generate_kwargs.get("use_cache") is False:
            raise ValueError("use_cache=False re-feeds the whole sequence at every step, which "
                             "would write it to memory again; Cortex generate needs use_cache=True")
        with self._session(session_id, reset_session, memory) as live, self._filling(live):
            out = self.base.generate(input_ids, **generate_kwargs)
        return out

    # ------------------------------------------------------------------ adapters
    def save_cortex(self, path) -> Path:
        """Write the sidecars as `cortex.safetensors` + `cortex_config.json` in directory `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        weights = {f"layer{i}.{name}": p.detach().cpu().contiguous()
                   for i, block in self.sidecars.items() for name, p in block.state_dict().items()}
        save_file(weights, path / WEIGHTS_FILE)
        meta = {"cortex": json.loads(self.config.to_json()),
                "base_model": getattr(self.base.config, "_name_or_path", None),
                "hidden_size": self.base.config.hidden_size}
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        return path

    def load_cortex(self, path) -> CortexModel:
        """Load sidecar weights saved by `save_cortex`; the configs must match."""
        path = Path(path)
        meta = read_adapter_config(path)
        saved = CortexWrapConfig.from_json(json.dumps(meta["cortex"]))
        if saved != self.config:
            raise ValueError(f"adapter at {path} was saved with a different CortexWrapConfig: {saved} "
                             f"(this model has {self.config})")
        weights = load_file(path / WEIGHTS_FILE)
        for i, block in self.sidecars.items():
            prefix = f"layer{i}."
            block.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
        return self


def read_adapter_config(path) -> dict:
    path = Path(path)
    file = path / CONFIG_FILE
    if not file.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"no Cortex adapter at {path}: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
    return json.loads(file.read_text())


def _check_ids(input_ids, attention_mask) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, T] tensor of token ids, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 (or int32) token ids, got {input_ids.dtype}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must match input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")


def attach_cortex(model: nn.Module, cfg: CortexWrapConfig | None = None,
                  sessions: SessionStore | None = None) -> CortexModel:
    """Freeze `model` and attach sidecars; returns the `CortexModel` that wraps it."""
    return CortexModel(model, cfg or CortexWrapConfig(), sessions)


def load_with_cortex(name_or_path: str | None = None, cortex_cfg: CortexWrapConfig | None = None, *,
                     adapter: str | None = None, sessions: SessionStore | None = None,
                     dtype: torch.dtype = torch.float32) -> CortexModel:
    """Load a base model (None: the bundled SmolLM2-135M-Instruct) and attach sidecars.

    adapter: a directory written by `save_cortex`; its config is used (cortex_cfg must be
    None or equal to it) and its weights loaded. The tokenizer is `model.tokenizer`.
    """
    from cortexlab.models import load_base_model

    if adapter is not None:
        saved = CortexWrapConfig.from_json(json.dumps(read_adapter_config(adapter)["cortex"]))
        if cortex_cfg is not None and cortex_cfg != saved:
            raise ValueError("cortex_cfg differs from the adapter's saved config; pass one or the other")
        cortex_cfg = saved
    base, tokenizer = load_base_model(name_or_path, dtype=dtype)
    model = attach_cortex(base, cortex_cfg, sessions)
    model.tokenizer = tokenizer
    if adapter is not None:
        model.load_cortex(adapter)
    return model


def load_qwen_with_cortex(name_or_path: str, cortex_cfg: CortexWrapConfig | None = None, **kwargs) -> CortexModel:
    """The source design's name: `load_with_cortex` for a Qwen (or any) checkpoint."""
    return load_with_cortex(name_or_path, cortex_cfg, **kwargs)
