"""Early exit: System 1 (fast, confident, shallow) and System 2 (slow, full depth).

An exit head at layer l maps the residual stream to next-token logits,

    z_l = W_l RMSNorm_l(h_l)          (or z_l = head(h_l + A_l h_l) with a shared head, A_l = 0 at init)
    c_l = conf(softmax(z_l))          max_prob: max_v p_v;  margin: p_(1) - p_(2);  entropy: 1 - H(p) / log V

and the forward pass stops at the first exit layer where every sequence's *last* token has
c_l >= tau (for generation the decision is about the next token). What exits is "system1";
a pass that runs every layer is "system2". `AdaptiveComputationController` moves tau with
the error rate of the exits, the task's complexity and time pressure.

Layer indices follow Hugging Face's `output_hidden_states`: index 0 is the embedding
output, index l the output of the l-th decoder layer; a full pass has exit_layer = num_layers.

Memory: one head per exit layer, hidden x output_dim parameters each (none with a shared
head, hidden x hidden for its adapter); per call O(B x T x output_dim) for the logits.

References: Kahneman (2011) Thinking, Fast and Slow; Scardapane et al. (2020) Why should we
add early exits to neural networks?; Schuster et al. (2022) Confident Adaptive Language Modeling.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cortexlab.checks import check_int, check_number

CONFIDENCE_MEASURES = ("max_prob", "margin", "entropy")


def _check_number(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    """`check_number`, except that a non-number (or NaN / inf) is a TypeError here."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    check_number(name, value, low, high, low_open=low_open)


@dataclass
class EarlyExitConfig:
    """Where exits sit, when they fire, how the exit heads train and how the threshold adapts.

    exit_layers: decoder layers (1-based, see the module docstring) with an exit head, strictly
    increasing and >= min_layer (and < num_layers when num_layers is given: exiting after the
    last layer is not an early exit). confidence_threshold tau in (0, 1]. distill_weight alpha
    and distill_temperature T shape `EarlyExitEngine.exit_loss`. The remaining fields are the
    `AdaptiveComputationController`'s (see there).
    """

    exit_layers: Sequence[int] = (8, 16, 24)
    confidence_threshold: float = 0.9
    min_layer: int = 4
    confidence_measure: str = "max_prob"
    num_layers: int | None = None
    norm_eps: float = 1e-5
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    min_threshold: float = 0.1
    max_threshold: float = 1.0
    adaptation_rate: float = 0.05
    target_error_rate: float = 0.1
    complexity_gain: float = 0.1
    time_pressure_gain: float = 0.2
    latency_budget_ms: float | None = None

    def __post_init__(self):
        check_int("min_layer", self.min_layer)
        check_int("num_layers", self.num_layers, 2, allow_none=True)
        layers = tuple(self.exit_layers) if isinstance(self.exit_layers, (list, tuple, range)) else None
        if not layers:
            raise ValueError(f"exit_layers must be a non-empty list of ints, got {self.exit_layers!r}")
        for layer in layers:
            check_int("exit_layers", layer)
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"exit_layers must be strictly increasing (sorted, unique), got {list(layers)}")
        if layers[0] < self.min_layer:
            raise ValueError(f"exit_layers must all be >= min_layer={self.min_layer}, got {list(layers)}")
        if self.num_layers is not None and layers[-1] >= self.num_layers:
            raise ValueError(f"exit_layers must all be < num_layers={self.num_layers}, got {list(layers)}")
        self.exit_layers = layers
        if self.confidence_measure not in CONFIDENCE_MEASURES:
            raise ValueError(f"confidence_measure must be one of {CONFIDENCE_MEASURES}, "
                             f"got {self.confidence_measure!r}")
        _check_number("confidence_threshold", self.confidence_threshold, 0.0, 1.0, low_open=True)
        _check_number("norm_eps", self.norm_eps, 0.0, 1.0, low_open=True)
        _check_number("distill_weight", self.distill_weight, 0.0, 1.0)
        _check_number("distill_temperature", self.distill_temperature, 0.0, math.inf, low_open=True)
        _check_number("min_threshold", self.min_threshold, 0.0, 1.0, low_open=True)
        _check_number("max_threshold", self.max_threshold, self.min_threshold, 1.0)
        if not self.min_threshold <= self.confidence_threshold <= self.max_threshold:
            raise ValueError(f"confidence_threshold must lie in [min_threshold, max_threshold] = "
                             f"[{self.min_threshold}, {self.max_threshold}], got {self.confidence_threshold}")
        _check_number("adaptation_rate", self.adaptation_rate, 0.0, 1.0)
        _check_number("target_error_rate", self.target_error_rate, 0.0, 1.0)
        _check_number("complexity_gain", self.complexity_gain, 0.0, 1.0)
        _check_number("time_pressure_gain", self.time_pressure_gain, 0.0, 1.0)
        if self.latency_budget_ms is not None:
            _check_number("latency_budget_ms", self.latency_budget_ms, 0.0, math.inf, low_open=True)


def exit_confidence(logits: torch.Tensor, measure: str = "max_prob") -> torch.Tensor:
    """Per-token confidence in [0, 1] of logits [..., V] (fp32): max_prob, margin or 1 - H / log V."""
    if measure not in CONFIDENCE_MEASURES:
        raise ValueError(f"measure must be one of {CONFIDENCE_MEASURES}, got {measure!r}")
    logp = logits.float().log_softmax(-1)
    if measure == "max_prob":
        return logp.max(-1).values.exp()
    if measure == "margin":
        top2 = logp.topk(2, dim=-1).values.exp()
        return top2[..., 0] - top2[..., 1]
    entropy = -(logp.exp() * logp).sum(-1)
    return (1.0 - entropy / math.log(logits.shape[-1])).clamp(0.0, 1.0)


class AdaptiveComputationController:
    """Adapts the exit threshold tau to the exits' error rate, task complexity and time pressure.

        base <- clip(base + eta (eps - eps*), tau_min, tau_max)     after each `update` with feedback
        tau   = clip(base + kappa c - pi p, tau_min, tau_max)

    eps: fraction of early-exited tokens that were wrong, eps* = target_error_rate, eta =
    adaptation_rate: errors above the target raise tau (fewer, safer exits: more System 2),
    accurate exits lower it (more System 1) -- a Robbins-Monro controller that drives the exit
    error rate to eps*. c in [0, 1] is the task complexity (harder: higher tau), kappa =
    complexity_gain. p = clip(latency / latency_budget_ms - 1, 0, 1) is time pressure (over
    budget: lower tau; ignored without a budget), pi = time_pressure_gain. c and p hold their last value.
    Reference: Kahneman (2011), effortful System 2 is engaged when System 1 errs or stakes rise.
    """

    def __init__(self, config: EarlyExitConfig | None = None):
        self.config = config if config is not None else EarlyExitConfig()
        self.reset()

    def reset(self) -> None:
        """Back to the configured threshold, no complexity, no time pressure, empty history."""
        self._base = float(self.config.confidence_threshold)
        self.complexity = 0.0
        self.time_pressure = 0.0
        self.history: list[float] = []

    @property
    def base_threshold(self) -> float:
        """tau's base, before the complexity and time-pressure terms."""
        return self._base

    def set_threshold(self, tau: float) -> None:
        """Set the base threshold directly (e.g. to sweep tau), within [min_threshold, max_threshold]."""
        _check_number("tau", tau, self.config.min_threshold, self.config.max_threshold)
        self._base = float(tau)

    @property
    def threshold(self) -> float:
        cfg = self.config
        tau = self._base + cfg.complexity_gain * self.complexity - cfg.time_pressure_gain * self.time_pressure
        return min(max(tau, cfg.min_threshold), cfg.max_threshold)

    def update(self, correct: bool | torch.Tensor | None = None, latency_ms: float | None = None,
               complexity: float | None = None) -> float:
        """Feed back the correctness of early-exited tokens (bool or a 0/1 tensor; empty or None: no
        exits, tau's base unchanged), the latency of the last step and the task complexity; returns tau."""
        error_rate = self._error_rate(correct)
        if latency_ms is not None:
            _check_number("latency_ms", latency_ms, 0.0, math.inf)
        if complexity is not None:
            _check_number("complexity", complexity, 0.0, 1.0)
        cfg = self.config
        if error_rate is not None:
            step = cfg.adaptation_rate * (error_rate - cfg.target_error_rate)
            self._base = min(max(self._base + step, cfg.min_threshold), cfg.max_threshold)
        if latency_ms is not None and cfg.latency_budget_ms is not None:
            self.time_pressure = min(max(latency_ms / cfg.latency_budget_ms - 1.0, 0.0), 1.0)
        if complexity is not None:
            self.complexity = float(complexity)
        self.history.append(self.threshold)
        return self.threshold

    @staticmethod
    def _error_rate(correct) -> float | None:
        if correct is None:
            return None
        if isinstance(correct, bool):
            return 0.0 if correct else 1.0
        if not isinstance(correct, torch.Tensor):
            raise TypeError(f"correct must be a bool or a tensor, got {type(correct).__name__}")
        if correct.numel() == 0:
            return None
        values = correct.detach().float()
        if not bool(((values == 0) | (values == 1)).all()):
            raise ValueError("correct must hold only 0/1 (or bool) values")
        return 1.0 - values.mean().item()


class ExitHead(nn.Module):
    """z = W RMSNorm(h), or z = shared_head(h + A h) with A zero-initialised (starts as the logit lens)."""

    def __init__(self, hidden_dim: int, output_dim: int, eps: float = 1e-5, shared_head: Callable | None = None):
        super().__init__()
        self._shared = (shared_head,)   # a tuple so a pretrained head is not registered (nor saved) twice
        if shared_head is None:
            self.norm = nn.RMSNorm(hidden_dim, eps=eps)
            self.proj = nn.Linear(hidden_dim, output_dim, bias=False)
        else:
            self.adapter = nn.Linear(hidden_dim, hidden_dim, bias=False)
            nn.init.zeros_(self.adapter.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shared = self._shared[0]
        if shared is None:
            return self.proj(self.norm(hidden))
        return shared(hidden + self.adapter(hidden))


class EarlyExitEngine(nn.Module):
    """One exit head per exit layer and the System 1 / System 2 decision.

    Exit rule: at an exit layer, exit iff c_l[b, -1] >= tau for every sequence b (the last
    token: in generation the decision is about the next token; use left padding for batches).
    tau is the attached controller's threshold, else config.confidence_threshold.
    shared_head: optional callable hidden -> logits (e.g. lambda h: lm_head(final_norm(h)) of a
    pretrained model) used by every exit through a zero-initialised residual adapter, so the
    exits start as the model's own head; it is not registered as a submodule (move it yourself).
    """

    def __init__(self, config: EarlyExitConfig, hidden_dim: int, output_dim: int,
                 shared_head: Callable | None = None, controller: AdaptiveComputationController | None = None):
        super().__init__()
        check_int("hidden_dim", hidden_dim)
        check_int("output_dim", output_dim, 2)
        if not isinstance(config, EarlyExitConfig):
            raise TypeError(f"config must be an EarlyExitConfig, got {type(config).__name__}")
        if shared_head is not None and not callable(shared_head):
            raise TypeError("shared_head must be callable (hidden -> logits) or None")
        self.config, self.hidden_dim, self.output_dim = config, hidden_dim, output_dim
        self.controller = controller
        self.heads = nn.ModuleDict({str(layer): ExitHead(hidden_dim, output_dim, config.norm_eps, shared_head)
                                    for layer in config.exit_layers})

    @property
    def exit_layers(self) -> tuple[int, ...]:
        return self.config.exit_layers

    @property
    def threshold(self) -> float:
        return self.controller.threshold if self.controller is not None else self.config.confidence_threshold

    def _check_hidden(self, hidden: torch.Tensor, name: str = "hidden_state") -> None:
        if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor")
        if hidden.ndim not in (2, 3) or hidden.shape[-1] != self.hidden_dim or hidden.numel() == 0:
            raise ValueError(f"{name} must be a non-empty [B, T, {self.hidden_dim}] or [B, {self.hidden_dim}], "
                             f"got {tuple(hidden.shape)}")

    def exit_logits(self, hidden_state: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """Logits [..., output_dim] of the exit head at `layer_idx` (always computed, for training/analysis)."""
        self._check_hidden(hidden_state)
        if layer_idx not in self.exit_layers:
            raise ValueError(f"layer_idx={layer_idx} is not an exit layer {list(self.exit_layers)}")
        return self.heads[str(layer_idx)](hidden_state)

    def process_layer_output(self, hidden_state: torch.Tensor, layer_idx: int,
                             threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """None at a non-exit layer or when not confident, else (logits [.., V], confidence [B, T] or [B])."""
        self._check_hidden(hidden_state)
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
            raise TypeError(f"layer_idx must be an int, got {layer_idx!r}")
        tau = self.threshold if threshold is None else threshold
        _check_number("threshold", tau, 0.0, 1.0, low_open=True)
        if layer_idx not in self.exit_layers:
            return None
        logits = self.heads[str(layer_idx)](hidden_state)
        confidence = exit_confidence(logits, self.config.confidence_measure)
        last = confidence if confidence.ndim == 1 else confidence[:, -1]
        return (logits, confidence) if bool((last >= tau).all()) else None

    def exit_loss(self, hidden_states_per_layer: Sequence[torch.Tensor] | Mapping[int, torch.Tensor],
                  labels: torch.Tensor, final_logits: torch.Tensor | None = None, *,
                  ignore_index: int = -100, detach_hidden: bool = False) -> torch.Tensor:
        """Training loss of the exit heads, averaged over exit layers l:

            L = mean_l [ (1 - alpha) CE(z_l, y) + alpha T^2 KL(softmax(z_L / T) || softmax(z_l / T)) ]

        hidden_states_per_layer: HF-style tuple (index l = output of layer l) or {l: hidden}.
        labels [B, T] are aligned with the positions (shift them beforehand for next-token
        prediction); positions equal to ignore_index are left out of both terms. final_logits
        z_L (detached: the teacher) enable distillation with alpha = config.distill_weight;
        without them L is the mean cross-entropy. detach_hidden=True trains only the heads
        (a frozen backbone gives no gradient anyway). Reference: Scardapane et al. (2020).
        """
        if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
            raise TypeError("labels must be an integer (int64/int32) tensor")
        valid = labels != ignore_index
        if not bool(valid.any()):
            raise ValueError("labels has no position that is not ignore_index")
        teacher = None
        if final_logits is not None:
            if not isinstance(final_logits, torch.Tensor) or final_logits.shape != (*labels.shape, self.output_dim):
                raise ValueError(f"final_logits must be a tensor of shape {(*labels.shape, self.output_dim)}")
            teacher = (final_logits.detach().float()[valid] / self.config.distill_temperature).log_softmax(-1)
        losses = []
        for layer in self.exit_layers:
            hidden = self._hidden_at(hidden_states_per_layer, layer)
            if hidden.shape[:-1] != labels.shape:
                raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} (the hidden states' "
                                 f"leading dims), got {tuple(labels.shape)}")
            logits = self.heads[str(layer)](hidden.detach() if detach_hidden else hidden).float()[valid]
            loss = F.cross_entropy(logits, labels[valid].long())
            if teacher is not None and self.config.distill_weight > 0:
                alpha, temp = self.config.distill_weight, self.config.distill_temperature
                student = (logits / temp).log_softmax(-1)
                kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
                loss = (1 - alpha) * loss + alpha * temp ** 2 * kl
            losses.append(loss)
        return torch.stack(losses).mean()

    def _hidden_at(self, hidden_states, layer: int) -> torch.Tensor:
        name = "hidden_states_per_layer"
        if isinstance(hidden_states, Mapping):
            if layer not in hidden_states:
                raise ValueError(f"{name} has no entry for exit layer {layer}")
            hidden = hidden_states[layer]
        elif isinstance(hidden_states, (list, tuple)):
            if layer >= len(hidden_states):
                raise ValueError(f"{name} has {len(hidden_states)} entries; exit layer {layer} needs "
                                 f"index {layer} (index 0 = embeddings, l = output of layer l)")
            hidden = hidden_states[layer]
        else:
            raise TypeError(f"{name} must be a sequence or a mapping of tensors")
        self._check_hidden(hidden, name=f"{name}[{layer}]")
        return hidden


def create_dual_process_pipeline(config: EarlyExitConfig | None = None, hidden_dim: int = 4096,
                                 output_dim: int = 128256, shared_head: Callable | None = None
                                 ) -> tuple[EarlyExitEngine, AdaptiveComputationController]:
    """(engine, controller): the engine's threshold is the controller's, so `controller.update`
    steers which inputs take the System 1 path."""
    config = config if config is not None else EarlyExitConfig()
    controller = AdaptiveComputationController(config)
    engine = EarlyExitEngine(config, hidden_dim, output_dim, shared_head=shared_head, controller=controller)
    return engine, controller


def run_with_early_exit(layers: Sequence[Callable], hidden: torch.Tensor, engine: EarlyExitEngine, *,
                        final_head: Callable | None = None, threshold: float | None = None,
                        layer_kwargs: Mapping | None = None) -> dict:
    """Run `layers` in order and stop calling them once the engine exits (the compute really is skipped).

    layers[i] is decoder layer i + 1 (hidden -> hidden, or a tuple whose first item is the hidden
    state; `layer_kwargs` go to every call). After layer l, an exit layer with l < len(layers),
    the engine decides; on exit the result is {"hidden_states": h_l, "logits": z_l, "confidence":
    c_l, "exit_layer": l, "system_type": "system1"}; otherwise after the last layer {"logits":
    final_head(h_L) or None, "confidence": None, "exit_layer": len(layers), "system_type": "system2"}.
    For cached generation the skipped layers' KV entries must be filled by the caller (CALM
    copies the exit hidden state into them); this helper is one forward pass.
    """
    if not isinstance(engine, EarlyExitEngine):
        raise TypeError(f"engine must be an EarlyExitEngine, got {type(engine).__name__}")
    if len(layers) == 0 or not all(callable(layer) for layer in layers):
        raise ValueError("layers must be a non-empty sequence of callables")
    if engine.exit_layers[-1] >= len(layers):
        raise ValueError(f"layers has {len(layers)} layers; the engine's exit layers {list(engine.exit_layers)} "
                         "must all be < len(layers)")
    engine._check_hidden(hidden, name="hidden")
    kwargs = dict(layer_kwargs or {})
    for idx, layer in enumerate(layers, start=1):
        hidden = layer(hidden, **kwargs)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        if idx < len(layers):
            result = engine.process_layer_output(hidden, idx, threshold=threshold)
            if result is not None:
                return {"hidden_states": hidden, "logits": result[0], "confidence": result[1],
                        "exit_layer": idx, "system_type": "system1"}
    logits = final_head(hidden) if final_head is not None else None
    return {"hidden_states": hidden, "logits": logits, "confidence": None,
            "exit_layer": len(layers), "system_type": "system2"}
