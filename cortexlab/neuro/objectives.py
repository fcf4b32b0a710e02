"""NeuroLlama's five brain-inspired training losses and their phase-weighted composite.

    L = CE(predictions, targets) + w_s L_surprise + w_j L_specialization + w_c L_calibration
        + w_e L_efficiency + w_g L_coherence

Every auxiliary term enters only when its inputs are given (and its weight is > 0); each is a
small nn.Module usable on its own. All reductions run in fp32.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cortexlab.checks import check_int, check_number

WEIGHT_NAMES = ("prediction_error_weight", "specialization_weight", "calibration_weight",
                "efficiency_weight", "coherence_weight")
TERMS = ("surprise", "specialization", "calibration", "efficiency", "coherence")

# Multipliers of the configured weights per training phase (see NeuroCompositeLoss.adjust_weights).
PHASE_SCHEDULE = {
    1: {"surprise": 1.0, "specialization": 1.0, "calibration": 0.0, "efficiency": 0.0, "coherence": 0.0},
    2: {"surprise": 0.5, "specialization": 0.5, "calibration": 1.0, "efficiency": 0.5, "coherence": 0.5},
    3: {"surprise": 0.1, "specialization": 0.1, "calibration": 2.0, "efficiency": 1.0, "coherence": 1.0},
}


def _check_tensor(name: str, value, ndim: Sequence[int] | None = None, floating: bool = True) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if ndim is not None and value.ndim not in ndim:
        raise ValueError(f"{name} must have ndim in {tuple(ndim)}, got shape {tuple(value.shape)}")
    if floating and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be finite (no NaN/inf)")


def _check_unit_interval(name: str, value: torch.Tensor) -> None:
    if bool((value < 0).any()) or bool((value > 1).any()):
        raise ValueError(f"{name} must lie in [0, 1]")


@dataclass
class TrainingObjectiveConfig:
    """Weights of the auxiliary losses (non-negative, finite) and their settings.

    calibration_bins: bins of the ECE; calibration_temperature: softness of the binning of the
    training surrogate, in squared bin widths (smaller: closer to the hard ECE); coherence_pooling:
    "mean" or "last" token of the hidden states; ignore_index: targets left out of the CE.
    """

    prediction_error_weight: float = 0.1
    specialization_weight: float = 0.01
    calibration_weight: float = 0.01
    efficiency_weight: float = 0.05
    coherence_weight: float = 0.05
    calibration_bins: int = 15
    calibration_temperature: float = 0.1
    coherence_pooling: str = "mean"
    ignore_index: int = -100

    def __post_init__(self):
        for name in WEIGHT_NAMES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"{name} must be a finite number, got {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        check_int("calibration_bins", self.calibration_bins)
        check_number("calibration_temperature", self.calibration_temperature, 0, low_open=True)
        if self.coherence_pooling not in ("mean", "last"):
            raise ValueError(f"coherence_pooling must be 'mean' or 'last', got {self.coherence_pooling!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")


class SurpriseLoss(nn.Module):
    """L = (1/L) sum_l mean(e_l): the mean per-layer prediction error (surprise) of predictive coding.

    surprises: a sequence of per-layer tensors (any shape, one per layer) or one tensor whose
    first axis is the layer. Reference: Rao & Ballard (1999); Friston (2005), prediction error.
    """

    def forward(self, surprises: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        layers = list(surprises.unbind(0)) if isinstance(surprises, torch.Tensor) and surprises.ndim > 0 \
            else surprises
        if not isinstance(layers, (list, tuple)) or len(layers) == 0:
            raise ValueError("surprises must be a non-empty sequence of tensors (one per layer) or a tensor [L, ...]")
        for i, value in enumerate(layers):
            _check_tensor(f"surprises[{i}]", value)
            if value.numel() == 0:
                raise ValueError(f"surprises[{i}] is empty")
        return torch.stack([value.float().mean() for value in layers]).mean()


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """JS(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2, in nats, over the last axis.

    Equals scipy.spatial.distance.jensenshannon(p, q) ** 2 (natural log). Zeros (masked keys)
    are safe: 0 log 0 = 0 with finite gradients. Reference: Lin (1991), IEEE Trans. Inf. Theory.
    """
    p, q = p.float(), q.float()
    tiny = torch.finfo(torch.float32).tiny
    m = 0.5 * (p + q)
    log_m = m.clamp_min(tiny).log()
    kl_pm = (p * (p.clamp_min(tiny).log() - log_m)).sum(-1)
    kl_qm = (q * (q.clamp_min(tiny).log() - log_m)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


class SpecializationLoss(nn.Module):
    """L = -(2 / (C (C - 1))) sum_{i<j} mean JS(P_i, P_j): minimising it pushes columns apart.

    attention_distributions: [C, N] or [B, C, ..., N] (e.g. per-column attention probabilities
    [B, C, Tq, Tk]): the column axis is 0 for 2-D input and 1 otherwise; the last axis holds
    normalised distributions. The JS of each pair is averaged over the remaining axes. Pairs are
    looped, so memory stays O(B x Tq x Tk). Reference: Mountcastle (1997), cortical columns.
    """

    def forward(self, attention_distributions: torch.Tensor) -> torch.Tensor:
        name = "attention_distributions"
        _check_tensor(name, attention_distributions)
        if attention_distributions.ndim < 2:
            raise ValueError(f"{name} must be [C, N] or [B, C, ..., N], "
                             f"got shape {tuple(attention_distributions.shape)}")
        _check_unit_interval(name, attention_distributions)
        column_dim = 0 if attention_distributions.ndim == 2 else 1
        columns = attention_distributions.unbind(column_dim)
        if len(columns) < 2:
            raise ValueError(f"{name} needs at least 2 columns on axis {column_dim}, got {len(columns)}")
        pairs = [js_divergence(columns[i], columns[j]).mean()
                 for i in range(len(columns)) for j in range(i + 1, len(columns))]
        return -torch.stack(pairs).mean()


def expected_calibration_error(confidences: torch.Tensor, correctness: torch.Tensor, num_bins: int = 15
                               ) -> torch.Tensor:
    """Binned ECE = sum_b (|B_b| / N) |acc(B_b) - conf(B_b)| with equal-width bins (lo, hi]
    (confidence 0 goes to the first bin). For reporting: no gradient. Reference: Guo et al. (2017)."""
    conf, correct = _flat_calibration_inputs(confidences, correctness)
    with torch.no_grad():
        bins = (torch.ceil(conf * num_bins).long() - 1).clamp(0, num_bins - 1)
        gap = torch.zeros(num_bins, device=conf.device).index_add_(0, bins, correct - conf)   # n_b (acc_b - conf_b)
        return gap.abs().sum() / conf.numel()


def _flat_calibration_inputs(confidences, correctness) -> tuple[torch.Tensor, torch.Tensor]:
    _check_tensor("confidences", confidences)
    _check_tensor("correctness", correctness, floating=False)
    if confidences.shape != correctness.shape or confidences.numel() == 0:
        raise ValueError(f"correctness must have the shape of confidences {tuple(confidences.shape)} "
                         f"(non-empty), got {tuple(correctness.shape)}")
    _check_unit_interval("confidences", confidences)
    correct = correctness.float()
    if not bool(((correct == 0) | (correct == 1)).all()):
        raise ValueError("correctness must hold only 0/1 (or bool) values")
    return confidences.float().reshape(-1), correct.reshape(-1)


class CalibrationLoss(nn.Module):
    """Differentiable soft-binned ECE (the training term); `ece` is the hard binned ECE (reporting).

        u_b(c) = softmax_b(-(M (c - mu_b))^2 / T)        soft membership, mu_b = centres of the M bins
        L = sum_b (S_b / N) |A_b - C_b|,   S_b = sum_i u_b(c_i),  A_b, C_b = u-weighted accuracy, confidence

    T is in squared bin widths: a confidence within ~T/2 of a bin edge is shared between the two
    bins. As T -> 0 the memberships become the hard bins and L -> ECE. Gradients reach the
    confidences (correctness is a label). Reference: Karandikar et al. (2021), soft calibration
    objectives; Guo et al. (2017), ECE.
    """

    def __init__(self, num_bins: int = 15, temperature: float = 0.1):
        super().__init__()
        check_int("num_bins", num_bins)
        check_number("temperature", temperature, 0, low_open=True)
        self.num_bins, self.temperature = num_bins, temperature

    def ece(self, confidences: torch.Tensor, correctness: torch.Tensor) -> torch.Tensor:
        return expected_calibration_error(confidences, correctness, self.num_bins)

    def forward(self, confidences: torch.Tensor, correctness: torch.Tensor) -> torch.Tensor:
        conf, correct = _flat_calibration_inputs(confidences, correctness)
        centres = (torch.arange(self.num_bins, device=conf.device, dtype=torch.float32) + 0.5) / self.num_bins
        member = (-((conf[:, None] - centres) * self.num_bins) ** 2 / self.temperature).softmax(-1)   # [N, bins]
        gap = (member * (correct - conf)[:, None]).sum(0)                                   # S_b (A_b - C_b)
        return gap.abs().sum() / conf.numel()


def layer_usage_from_exit_probs(exit_probs: torch.Tensor, exit_layers: Sequence[int], num_layers: int
                                ) -> torch.Tensor:
    """u_l = prod_{k: e_k < l} (1 - h_k): probability that layer l (1-based) runs, [..., num_layers],
    from the halting probabilities h_k [..., K] at exit layers e_k (exit after layer e_k skips the rest)."""
    _check_tensor("exit_probs", exit_probs)
    if exit_probs.ndim < 1 or exit_probs.shape[-1] != len(exit_layers):
        raise ValueError(f"exit_probs must be [..., {len(exit_layers)}] (one per exit layer), "
                         f"got {tuple(exit_probs.shape)}")
    _check_unit_interval("exit_probs", exit_probs)
    if any(not 1 <= e < num_layers for e in exit_layers):
        raise ValueError(f"exit_layers must lie in [1, num_layers={num_layers}), got {list(exit_layers)}")
    survive = torch.cumprod(1 - exit_probs.float(), dim=-1)                  # alive after exit k
    layer = torch.arange(1, num_layers + 1, device=exit_probs.device)
    passed = (torch.as_tensor(list(exit_layers), device=exit_probs.device)[None, :] < layer[:, None]).sum(-1)
    padded = torch.cat([torch.ones_like(survive[..., :1]), survive], dim=-1)   # index = exits passed
    return padded[..., passed]


class EfficiencyLoss(nn.Module):
    """L = mean over inputs of (1/L) sum_l u_l: the expected fraction of layers used (metabolic cost).

    layer_usage [..., L]: a 0/1 mask of executed layers or usage probabilities in [0, 1] (e.g. from
    `layer_usage_from_exit_probs`, which makes the term differentiable). Reference: Graves (2016),
    adaptive computation time; Laughlin (2001), the energy cost of neural computation.
    """

    def forward(self, layer_usage: torch.Tensor) -> torch.Tensor:
        name = "layer_usage"
        if isinstance(layer_usage, torch.Tensor) and layer_usage.dtype == torch.bool:
            layer_usage = layer_usage.float()
        _check_tensor(name, layer_usage)
        if layer_usage.ndim < 1 or layer_usage.numel() == 0:
            raise ValueError(f"{name} must be a non-empty tensor [..., num_layers]")
        _check_unit_interval(name, layer_usage)
        return layer_usage.float().mean()


class CoherenceLoss(nn.Module):
    """L = mean_b (1 - cos(pool(h_b), g_b)): keep the output on the goal embedding g.

    hidden_states [B, T, D] (pooled by mean or last token) or [B, D]; goal_embedding [B, D] or
    [D] (shared). Reference: Miller & Cohen (2001), prefrontal goal maintenance.
    """

    def __init__(self, pooling: str = "mean"):
        super().__init__()
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        self.pooling = pooling

    def forward(self, hidden_states: torch.Tensor, goal_embedding: torch.Tensor) -> torch.Tensor:
        _check_tensor("hidden_states", hidden_states, ndim=(2, 3))
        _check_tensor("goal_embedding", goal_embedding, ndim=(1, 2))
        dim, batch = hidden_states.shape[-1], hidden_states.shape[0]
        if goal_embedding.shape[-1] != dim or (goal_embedding.ndim == 2 and goal_embedding.shape[0] != batch):
            raise ValueError(f"goal_embedding must be [{batch}, {dim}] or [{dim}], got {tuple(goal_embedding.shape)}")
        pooled = hidden_states.float()
        if pooled.ndim == 3:
            pooled = pooled.mean(1) if self.pooling == "mean" else pooled[:, -1]
        goal = goal_embedding.float().expand(batch, dim)
        return (1 - F.cosine_similarity(pooled, goal, dim=-1, eps=1e-8)).mean()


class NeuroCompositeLoss(nn.Module):
    """total = CE(predictions, targets) + sum_k w_k L_k over the auxiliary terms whose inputs are given.

    predictions [B, T, V] (or [N, V]) logits; targets [B, T] (or [N]) aligned with them (shift
    beforehand for next-token prediction), ignore_index left out. Inputs per term: surprise <-
    surprises; specialization <- attention_distributions; calibration <- confidences and
    correctness; efficiency <- layer_usage; coherence <- hidden_states and goal_embedding. A
    given term is always reported in `components` (key = term name, "lm" for the CE) but added
    to the total only when its weight is > 0, so zero weights give total == CE exactly.
    """

    def __init__(self, config: TrainingObjectiveConfig | None = None):
        super().__init__()
        self.config = config if config is not None else TrainingObjectiveConfig()
        if not isinstance(self.config, TrainingObjectiveConfig):
            raise TypeError(f"config must be a TrainingObjectiveConfig, got {type(self.config).__name__}")
        self.surprise = SurpriseLoss()
        self.specialization = SpecializationLoss()
        self.calibration = CalibrationLoss(self.config.calibration_bins, self.config.calibration_temperature)
        self.efficiency = EfficiencyLoss()
        self.coherence = CoherenceLoss(self.config.coherence_pooling)
        self.base_weights = {term: float(getattr(self.config, name)) for term, name in zip(TERMS, WEIGHT_NAMES)}
        self.weights = dict(self.base_weights)
        self.phase: int | None = None

    def adjust_weights(self, phase: int) -> dict[str, float]:
        """w_k = configured w_k x PHASE_SCHEDULE[phase][k]; returns the new weights.

        1 pretrain: surprise and specialization only (shape representations; calibration,
        efficiency and goal coherence mean little before predictions do); 2 continued: every term,
        self-supervised ones halved; 3 finetune: calibration doubled, efficiency and coherence at
        full weight, surprise and specialization at a tenth. Before any call the weights are the
        configured ones.
        """
        if isinstance(phase, bool) or phase not in PHASE_SCHEDULE:
            raise ValueError(f"phase must be 1 (pretrain), 2 (continued) or 3 (finetune), got {phase!r}")
        self.phase = phase
        self.weights = {term: self.base_weights[term] * PHASE_SCHEDULE[phase][term] for term in TERMS}
        return dict(self.weights)

    def compute(self, predictions: torch.Tensor, targets: torch.Tensor, attention_distributions=None,
                confidences=None, correctness=None, layer_usage=None, hidden_states=None, goal_embedding=None,
                surprises=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total, components) -- see the class docstring for which inputs switch which term on."""
        pairs = ((("confidences", confidences), ("correctness", correctness)),
                 (("hidden_states", hidden_states), ("goal_embedding", goal_embedding)))
        for (name_a, a), (name_b, b) in pairs:
            if (a is None) != (b is None):
                missing, given = (name_a, name_b) if a is None else (name_b, name_a)
                raise ValueError(f"{missing} is required when {given} is given")
        components = {"lm": self._language_model_loss(predictions, targets)}
        if surprises is not None:
            components["surprise"] = self.surprise(surprises)
        if attention_distributions is not None:
            components["specialization"] = self.specialization(attention_distributions)
        if confidences is not None:
            components["calibration"] = self.calibration(confidences, correctness)
        if layer_usage is not None:
            components["efficiency"] = self.efficiency(layer_usage)
        if hidden_states is not None:
            components["coherence"] = self.coherence(hidden_states, goal_embedding)
        total = components["lm"]
        for term in TERMS:
            if term in components and self.weights[term] > 0:
                total = total + self.weights[term] * components[term]
        return total, components

    forward = compute

    def _language_model_loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _check_tensor("predictions", predictions, ndim=(2, 3))
        if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
            raise TypeError("targets must be an integer (int64/int32) tensor of class ids")
        if targets.shape != predictions.shape[:-1]:
            raise ValueError(f"targets must have shape {tuple(predictions.shape[:-1])} (predictions without the "
                             f"vocabulary axis), got {tuple(targets.shape)}")
        valid = targets != self.config.ignore_index
        if bool((targets[valid] < 0).any()) or bool((targets[valid] >= predictions.shape[-1]).any()):
            raise ValueError(f"targets must be in [0, {predictions.shape[-1]}) or ignore_index")
        return F.cross_entropy(predictions.float().reshape(-1, predictions.shape[-1]), targets.reshape(-1).long(),
                               ignore_index=self.config.ignore_index)

