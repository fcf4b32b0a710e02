"""`NeuroLlamaConfig`: the Llama-3 architecture plus every toggle and knob of the seven NeuroLlama mechanisms.

The config is a frozen dataclass, validated on construction: a bad value raises a ValueError (or a TypeError for a
wrong type) that names the field. Change it with `with_overrides(**fields)`, which validates again, and store it with
`to_json()` / `from_json(text)` (an exact round trip). Every mechanism is off by default, and with every mechanism off
the model is a plain Llama-3 decoder.

Presets (`PRESETS`, `NeuroLlamaConfig.from_preset(name, **overrides)`):

| preset  | layers | hidden | heads | kv heads | ffn   | vocab  | parameters (mechanisms off) |
|---------|--------|--------|-------|----------|-------|--------|-----------------------------|
| "8B"    | 32     | 4096   | 32    | 8        | 14336 | 128256 | 8,030,261,248 (= Llama-3.1-8B) |
| "70B"   | 80     | 8192   | 64    | 8        | 28672 | 128256 | 70,553,706,496 (= Llama-3.1-70B) |
| "405B"  | 126    | 16384  | 128   | 16       | 53248 | 128256 | 410,081,247,232 (see below) |
| "small" | 4      | 256    | 8     | 2        | 688   | 512    | 3,033,344 (trains on a 2-core CPU in minutes) |

The "405B" row is the NeuroLlama design's, which lists 16 KV heads; the released Llama-3.1-405B has 8 KV heads
(405,853,388,800 parameters). Pass `num_kv_heads=8` to get the released architecture. All presets use plain RoPE with
theta 500000 and untied embeddings; Llama-3.1's long-context RoPE rescaling ("llama3" rope type) is not implemented,
so `max_seq_len` of the large presets is a guard, not a promise of 128k-token quality.

"small" is sized for the CPU recipe: 4 layers of width 256 (head_dim 32, 4 query heads per KV head, SwiGLU width
688 ~ 8/3 x 256 rounded to a multiple of 16) and a 512-token vocabulary that the caller replaces with its tokenizer's
size (`from_preset("small", vocab_size=tokenizer.get_vocab_size())`).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["NeuroLlamaConfig", "PRESETS", "SYNAPTIC_MODES", "VOTING_METHODS", "MECHANISM_TOGGLES"]

SYNAPTIC_MODES = ("static", "context_dependent", "full_matrix")
VOTING_METHODS = ("confidence", "tuning_curve", "entropy")
MECHANISM_TOGGLES = (
    "enable_synaptic_modulation",
    "enable_cortical_columns",
    "enable_lateral_inhibition",
    "enable_predictive_coding",
    "enable_hebbian_attention",
    "enable_habituation",
    "enable_population_coding",
    "enable_early_exit",
)

_LLAMA_VOCAB = 128256
PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "8B": MappingProxyType(dict(num_layers=32, hidden_dim=4096, num_heads=32, num_kv_heads=8, ffn_dim=14336,
                                vocab_size=_LLAMA_VOCAB, max_seq_len=131072)),
    "70B": MappingProxyType(dict(num_layers=80, hidden_dim=8192, num_heads=64, num_kv_heads=8, ffn_dim=28672,
                                 vocab_size=_LLAMA_VOCAB, max_seq_len=131072)),
    "405B": MappingProxyType(dict(num_layers=126, hidden_dim=16384, num_heads=128, num_kv_heads=16, ffn_dim=53248,
                                  vocab_size=_LLAMA_VOCAB, max_seq_len=131072)),
    "small": MappingProxyType(dict(num_layers=4, hidden_dim=256, num_heads=8, num_kv_heads=2, ffn_dim=688,
                                   vocab_size=512, max_seq_len=1024)),
})


@dataclass(frozen=True)
class NeuroLlamaConfig:
    """Architecture and mechanism settings of a NeuroLlama model (defaults: Llama-3.1-8B, every mechanism off).

    `head_dim=None` means hidden_dim // num_heads; `exit_layers=None` means the quarter points of the stack
    (L//4, L//2, 3L//4: (8, 16, 24) for 32 layers). An exit layer l means "exit after running layers 0..l-1",
    so 1 <= l < num_layers. `with_overrides` re-derives these two when the fields they follow change.
    """

    # --- architecture (Llama-3) ---
    num_layers: int = 32
    hidden_dim: int = 4096
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int | None = None
    ffn_dim: int = 14336
    vocab_size: int = _LLAMA_VOCAB
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_seq_len: int = 8192
    tie_embeddings: bool = False
    initializer_range: float = 0.02
    # --- synaptic modulation: static per-head alpha, context-dependent gates, windowed pairwise matrix ---
    enable_synaptic_modulation: bool = False
    synaptic_mode: str = "static"
    synaptic_window: int = 512
    # --- cortical columns (GQA groups) and lateral inhibition between them ---
    enable_cortical_columns: bool = False
    enable_lateral_inhibition: bool = False
    lateral_inhibition_lr: float = 0.01
    # --- predictive coding (top-down prediction, surprise) and CPC ---
    enable_predictive_coding: bool = False
    prediction_weight: float = 0.1
    error_signal_decay: float = 0.9
    cpc_num_negatives: int = 16
    cpc_prediction_horizon: int = 1
    # --- Hebbian attention: softmax(QK^T/sqrt(d) + eta Q H K^T) ---
    enable_hebbian_attention: bool = False
    hebbian_lr: float = 0.01
    hebbian_decay: float = 0.99
    max_hebbian_norm: float = 10.0
    # --- habituation (stimulus-specific adaptation), cross-layer decay, novelty boost ---
    enable_habituation: bool = False
    habituation_rate: float = 0.1
    recovery_rate: float = 0.01
    habituation_threshold: float = 0.1
    max_habituation: float = 0.9
    cross_layer_decay: float = 0.9
    novelty_boost: float = 0.1
    # --- population-coded head aggregation ---
    enable_population_coding: bool = False
    voting_method: str = "confidence"
    voting_threshold: float = 0.1
    voting_temperature: float = 1.0
    tuning_width: float = 1.0
    # --- early exit (System 1 / System 2) ---
    enable_early_exit: bool = False
    exit_layers: tuple[int, ...] | None = None
    exit_confidence_threshold: float = 0.9
    min_exit_layer: int = 1

    def __post_init__(self) -> None:
        self._check_types()
        if self.head_dim is None and self.num_heads > 0:
            object.__setattr__(self, "head_dim", self.hidden_dim // self.num_heads)
        if self.exit_layers is None:
            object.__setattr__(self, "exit_layers", _quarter_layers(self.num_layers))
        self._check_architecture()
        self._check_mechanisms()
        self._check_early_exit()

    # ----------------------------------------------------------------------------------------- validation
    def _check_types(self) -> None:
        """Check each field against its annotation; ints become floats in float fields, lists tuples."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), f.type
            if kind == "bool":
                ok = isinstance(value, bool)
            elif kind == "str":
                ok = isinstance(value, str)
            elif kind == "float":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                if ok:
                    object.__setattr__(self, f.name, float(value))
            elif kind == "int" or kind == "int | None":
                ok = (value is None and kind != "int") or (isinstance(value, int) and not isinstance(value, bool))
            else:  # exit_layers: tuple[int, ...] | None
                ok = value is None or (isinstance(value, (list, tuple))
                                       and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
                if ok and value is not None:
                    object.__setattr__(self, f.name, tuple(value))
            if not ok:
                raise TypeError(f"{f.name} must be {kind}, got {value!r} ({type(value).__name__})")

    def _check_architecture(self) -> None:
        for name in ("num_layers", "hidden_dim", "num_heads", "num_kv_heads", "head_dim", "ffn_dim", "vocab_size",
                     "max_seq_len"):
            _require(getattr(self, name) > 0, name, "must be > 0", getattr(self, name))
        _require(self.hidden_dim % self.num_heads == 0, "num_heads",
                 f"must divide hidden_dim ({self.hidden_dim})", self.num_heads)
        _require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                 f"must divide num_heads ({self.num_heads}) for grouped-query attention", self.num_kv_heads)
        _require(self.head_dim % 2 == 0, "head_dim", "must be even (RoPE rotates pairs of dimensions)", self.head_dim)
        _require(self.rope_theta > 0, "rope_theta", "must be > 0", self.rope_theta)
        _require(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0", self.rms_norm_eps)
        _require(self.initializer_range > 0, "initializer_range", "must be > 0", self.initializer_range)

    def _check_mechanisms(self) -> None:
        _require(self.synaptic_mode in SYNAPTIC_MODES, "synaptic_mode", f"must be one of {SYNAPTIC_MODES}",
                 self.synaptic_mode)
        _require(self.voting_method in VOTING_METHODS, "voting_method", f"must be one of {VOTING_METHODS}",
                 self.voting_method)
        for name in ("synaptic_window", "cpc_num_negatives", "cpc_prediction_horizon"):
            _require(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        for name in ("lateral_inhibition_lr", "prediction_weight", "hebbian_lr", "novelty_boost"):
            _require(getattr(self, name) >= 0, name, "must be >= 0", getattr(self, name))
        for name in ("max_hebbian_norm", "voting_temperature", "tuning_width"):
            _require(getattr(self, name) > 0, name, "must be > 0", getattr(self, name))
        for name in ("error_signal_decay", "hebbian_decay", "habituation_rate", "recovery_rate",
                     "habituation_threshold", "max_habituation", "cross_layer_decay"):
            _require(0 <= getattr(self, name) <= 1, name, "must be in [0, 1]", getattr(self, name))
        _require(0 <= self.voting_threshold < 1, "voting_threshold", "must be in [0, 1)", self.voting_threshold)

    def _check_early_exit(self) -> None:
        layers, n = self.exit_layers, self.num_layers
        _require(0 < self.exit_confidence_threshold <= 1, "exit_confidence_threshold", "must be in (0, 1]",
                 self.exit_confidence_threshold)
        _require(1 <= self.min_exit_layer < max(n, 2), "min_exit_layer", f"must be in [1, num_layers={n})",
                 self.min_exit_layer)
        _require(all(1 <= layer < n for layer in layers), "exit_layers",
                 f"must lie in [1, num_layers={n}) (layer l = exit after l layers)", layers)
        _require(all(a < b for a, b in zip(layers, layers[1:])), "exit_layers",
                 "must be strictly increasing (sorted, no duplicates)", layers)
        _require(all(layer >= self.min_exit_layer for layer in layers), "exit_layers",
                 f"must all be >= min_exit_layer={self.min_exit_layer} (a lower exit would never fire)", layers)
        _require(bool(layers) or not self.enable_early_exit, "exit_layers",
                 "must not be empty when enable_early_exit is True", layers)

    # ----------------------------------------------------------------------------------------- API
    @property
    def num_kv_groups(self) -> int:
        """Query heads per KV head (the size of one cortical column)."""
        return self.num_heads // self.num_kv_heads

    @property
    def enabled_mechanisms(self) -> tuple[str, ...]:
        """Names of the mechanism toggles that are on, e.g. ("enable_hebbian_attention",)."""
        return tuple(name for name in MECHANISM_TOGGLES if getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (exit_layers as a list), ready for JSON."""
        data = dataclasses.asdict(self)
        data["exit_layers"] = list(self.exit_layers)
        return data

    def to_json(self) -> str:
        """JSON text of every field; `from_json(to_json())` gives back an equal config."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NeuroLlamaConfig:
        """Build from a mapping of field values (missing fields take their defaults; unknown ones are refused)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a mapping of field values, got {type(data).__name__}")
        _reject_unknown(data)
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> NeuroLlamaConfig:
        """Inverse of `to_json`: parse a JSON object of field values and validate it."""
        if not isinstance(text, (str, bytes)):
            raise TypeError(f"text must be a JSON string, got {type(text).__name__}")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"text is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"text must hold a JSON object of config fields, got {type(data).__name__}")
        return cls.from_dict(data)

    def with_overrides(self, **overrides: Any) -> NeuroLlamaConfig:
        """A new, validated config with `overrides` applied; unknown field names raise ValueError.

        head_dim and exit_layers that still hold their derived values are re-derived from the new fields.
        """
        _reject_unknown(overrides)
        for name, derive in _DERIVED.items():
            if name not in overrides and getattr(self, name) == derive(self):
                overrides[name] = None
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> NeuroLlamaConfig:
        """The preset `name` ("8B", "70B", "405B", "small"; see the module docstring) with `overrides` applied."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        _reject_unknown(overrides)
        return cls(**{**PRESETS[name], **overrides})


def _quarter_layers(num_layers: int) -> tuple[int, ...]:
    """(L//4, L//2, 3L//4) without zeros or duplicates: the default exit points."""
    return tuple(sorted({q for q in (num_layers // 4, num_layers // 2, 3 * num_layers // 4) if q >= 1}))


_DERIVED = {
    "head_dim": lambda c: c.hidden_dim // c.num_heads,
    "exit_layers": lambda c: _quarter_layers(c.num_layers),
}
_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(NeuroLlamaConfig))


def _require(ok: bool, name: str, expected: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} {expected}, got {value!r}")


def _reject_unknown(fields: Mapping[str, Any]) -> None:
    unknown = sorted(set(fields) - _FIELD_NAMES)
    if unknown:
        raise ValueError(f"unknown NeuroLlamaConfig field(s): {', '.join(unknown)}")
