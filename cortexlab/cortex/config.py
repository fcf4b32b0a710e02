"""`CortexWrapConfig`: every setting of the memory sidecar, validated on construction."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from cortexlab.checks import check_bool, check_int, check_number

FORGET_GATES = ("log", "sigmoid")
CONV_INITS = ("random", "induction")
DEFAULT_FORGET_BIAS = {"log": -7.0, "sigmoid": 2.0}


@dataclass
class CortexWrapConfig:
    """Settings of the sidecars attached to a frozen decoder.

    Memory: `num_heads` heads of a gated-delta-rule state, each [rank_fast, rank_fast].
    Forget gate a_t = exp(g_t), learned per token from the layer input x_t:
      - "log" (default):  g = log(alpha_max) - softplus(w.x + b), b = -7 -> a ~ 0.999 at
        initialisation, a half-life of ~760 tokens, so a fact survives many calls;
      - "sigmoid" (the source design's "bias hack"): a = alpha_max * sigmoid(w.x + b),
        b = +2 -> a ~ 0.88, a half-life of ~5 tokens (notebook 01 shows why it forgets).
    Hybrid: a sliding-window attention over the last `window_size` tokens beside the
    memory, mixed per head by a learned gate; the output projection starts at zero, so a
    freshly wrapped model is exactly the base model. `window_norm`: RMS-normalise the window's
    read per head before the mix, as the memory's read is (see hybrid.py; sidecars trained
    before it existed were saved with it off).
    `layers`: "all" or a list of decoder-layer indices that get a sidecar.
    `controller`: the metacognitive controller (surprise and entropy steer writing,
    forgetting and consolidation into a slow memory; neutral at initialisation).
    `entropy_layer`: where the controller reads the base model's predictive entropy (logit
    lens on the residual stream entering that layer, once per forward); None: the first
    layer with a sidecar. It may not come after the first sidecar.
    `conv_init`: how the memory's projections and short conv start. "random": nn.Linear's and
    nn.Conv1d's defaults. "induction": W_k = W_q, and the conv passes q and v through and
    delays k by one token, so at the start

        q_t . k_s = silu(W_q x_t) . silu(W_q x_{s-1})

    is largest where the token before s resembles token t: the memory already looks up "what
    came after this token before" (an induction head; `cortexlab.eval.key_lookup` measures it).
    The output projection still starts at zero. Measured on E2 (README, notebook 06) it moved
    which seeds take off late rather than ending that: in time on 1 of 3 seeds, "random" on 2.
    """

    rank_fast: int = 32
    num_heads: int = 4
    alpha_max: float = 1.0
    forget_gate: str = "log"
    forget_bias: float | None = None
    use_hybrid: bool = True
    window_size: int = 128
    window_norm: bool = True
    layers: str | list[int] = "all"
    controller: bool = True
    entropy_layer: int | None = None
    conv_size: int = 4
    conv_init: str = "random"
    chunk_size: int = 32   # tokens per chunk; on one CPU thread a default block at T=2048 took 194 ms vs 230 with 64
    backend: str = "auto"
    norm_eps: float = 1e-6

    def __post_init__(self):
        for name in ("rank_fast", "num_heads", "window_size", "conv_size", "chunk_size"):
            check_int(name, getattr(self, name))
        if self.forget_gate not in FORGET_GATES:
            raise ValueError(f"forget_gate must be one of {FORGET_GATES}, got {self.forget_gate!r}")
        if self.conv_init not in CONV_INITS:
            raise ValueError(f"conv_init must be one of {CONV_INITS}, got {self.conv_init!r}")
        if self.conv_init == "induction" and self.conv_size < 2:
            raise ValueError(f"conv_init='induction' delays the keys by one token: it needs conv_size >= 2, "
                             f"got {self.conv_size}")
        check_number("alpha_max", self.alpha_max, 0, 1, low_open=True)
        if self.forget_bias is None:
            self.forget_bias = DEFAULT_FORGET_BIAS[self.forget_gate]
        check_number("forget_bias", self.forget_bias)
        if self.layers != "all":
            if (not isinstance(self.layers, (list, tuple)) or not self.layers
                    or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers)):
                raise ValueError(f"layers must be 'all' or a non-empty list of ints, got {self.layers!r}")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers has duplicates: {self.layers!r}")
            self.layers = sorted(self.layers)
        from cortexlab.ops import BACKENDS

        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        check_int("entropy_layer", self.entropy_layer, 0, allow_none=True)
        for name in ("controller", "use_hybrid", "window_norm"):
            check_bool(name, getattr(self, name))
        if not (isinstance(self.norm_eps, float) and self.norm_eps > 0):
            raise ValueError(f"norm_eps must be a positive float, got {self.norm_eps!r}")

    def layer_indices(self, num_layers: int) -> list[int]:
        """The decoder layers that get a sidecar; ValueError if one does not exist."""
        if self.layers == "all":
            return list(range(num_layers))
        bad = [i for i in self.layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range for a model with {num_layers} decoder layers")
        return list(self.layers)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CortexWrapConfig:
        data = json.loads(text)
        data.setdefault("window_norm", False)   # saved before the option existed: trained without a window norm
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown CortexWrapConfig fields in JSON: {sorted(unknown)}")
        return cls(**data)
