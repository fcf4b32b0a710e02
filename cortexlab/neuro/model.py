"""How the seven mechanisms are assembled into `NeuroLlamaModel` (the backbone in `backbone.py` stays plain Llama).

`attach_mechanisms(model)` runs at the end of `NeuroLlamaModel.__init__`, after the backbone's random init, so the
backbone weights for a given seed do not depend on the toggles and every mechanism keeps its own (neutral) init.
Nothing is attached for a toggle that is off: with every toggle off the model is the plain backbone, parameter for
parameter. What goes where (per layer, in forward order):

  pre-softmax scores [B, H, T, T]   synaptic "static": SynapticScaling (alpha_h = 1 at init: neutral)
                                    synaptic "full_matrix": SynapticModulationMatrix (W = 0 at init: neutral)
                                    Hebbian: + HebbianAttention.score_bias (within-sequence fast weight; NOT neutral
                                        at init for hebbian_lr > 0 -- it is parameter-free, neutral at hebbian_lr = 0)
                                    habituation: HabituatingAttention with NoveltyDetector(x) as `novelty`, then
                                        AttentionDecay over the layers of this forward (parameter-free; NOT neutral
                                        at init; neutral at habituation_rate = 0 and cross_layer_decay = 0)
  head outputs [B, T, H, D]         synaptic "context_dependent": NeuromodulatedAttention gates, per-token context
                                        = the layer's normed input x (fc2 = 0 at init: gates 1, neutral)
                                    lateral inhibition: LateralInhibition on heads viewed [B, T, G, H/G, D]
                                        (W = 0 at init: neutral; anti-Hebbian update in training mode)
                                    cortical columns: JS specialisation of the column attention (observer only:
                                        logits never change; it is reported and trains through the aux loss)
  aggregation [B, T, H, D] -> hidden population coding: "confidence" ConfidenceWeightedVoting(aggregate=False) then
                                        o_proj (neutral at init); "entropy" EntropyBasedVoting with the probs
                                        (parameter-free, NOT neutral for a finite voting_temperature); "tuning_curve"
                                        PopulationCodedAttention whose out_proj IS the layer's o_proj (tied, so
                                        pretrained weights load into it; NOT neutral: random preferred directions)
  after decoder layer i             predictive coding: pc[i] predicts the layer's input x_i top-down from its output
                                        x_{i+1} (P = I at init), surprise s_i = mean_d (sg(x_i) - P x_{i+1})^2, and the
                                        error is fed forward: x_{i+1} <- x_{i+1} + w E (x_i - P x_{i+1}), E = 0 at init
                                    early exit: exit heads at exit_layers = the model's final norm + lm_head through
                                        a zero-init adapter (the logit lens at init); in eval without labels a
                                        confident exit stops the layer loop

One PredictiveCodingLayer per decoder layer owns both the predictor P_i and the error units E_i of the pair
(x_i, x_{i+1}), x_0 being the embeddings, so there are num_layers surprises and every P and E is used.

State, three kinds (all cleared by `model.reset_state()`):
- across-call memory that changes outputs (Hebbian H_0): written only when forward is called with
  update_state=True; by default every call (training batches, held-out windows) starts from the same state;
- slow weights learnt by a local rule (lateral inhibition W): updated after use in every training-mode forward;
- diagnostics that never feed back into outputs (habituation maps, running surprises): track the last call.

Auxiliary losses (out["aux_losses"], unweighted; out["aux_loss"] = sum_k w_k L_k over the terms with w_k > 0):
  "surprise"        SurpriseLoss(surprises): mean over layers of the mean surprise; trains the predictors P (and
                    makes x_{i+1} predictive of x_i); w = objectives.prediction_error_weight
  "specialization"  -mean over layers of the columns' mean pairwise JS divergence (nats), as SpecializationLoss;
                    w = objectives.specialization_weight
  "early_exit"      EarlyExitEngine.exit_loss over the exit layers, next-token targets (labels, else input_ids --
                    the trainer passes none -- with padding ignored) and distillation (weight EXIT_DISTILL_WEIGHT)
                    to the detached final logits; training mode only; w = the model's exit_loss_weight
The default objectives are TrainingObjectiveConfig(prediction_error_weight=config.prediction_weight).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from cortexlab.checks import check_number

from .columns import LateralInhibition, mean_pairwise_js_divergence
from .config import NeuroLlamaConfig
from .early_exit import EarlyExitConfig, create_dual_process_pipeline
from .habituation import AttentionDecay, HabituatingAttention, HabituationConfig, NoveltyDetector
from .hebbian import HebbianAttention, HebbianConfig
from .objectives import SurpriseLoss, TrainingObjectiveConfig
from .population import ConfidenceWeightedVoting, EntropyBasedVoting, PopulationCodedAttention, PopulationConfig
from .predictive import PredictiveCodingConfig, PredictiveCodingLayer
from .synaptic import NeuromodulatedAttention, SynapticModulationMatrix, SynapticScaling

__all__ = ["ForwardState", "AttentionMechanisms", "ModelMechanisms", "attach_mechanisms", "default_objectives",
           "auxiliary_losses", "weighted_aux_loss", "DEFAULT_EXIT_LOSS_WEIGHT", "EXIT_DISTILL_WEIGHT"]

DEFAULT_EXIT_LOSS_WEIGHT = 0.5   # weight of the exit heads' loss in aux_loss (TrainingObjectiveConfig has no field)
EXIT_DISTILL_WEIGHT = 0.5        # alpha of EarlyExitEngine.exit_loss: half CE to the targets, half KL to the final

_ATTENTION_TOGGLES = ("enable_synaptic_modulation", "enable_hebbian_attention", "enable_habituation",
                      "enable_lateral_inhibition", "enable_cortical_columns", "enable_population_coding")
_MODEL_TOGGLES = ("enable_predictive_coding", "enable_early_exit", "enable_habituation")


@dataclass
class ForwardState:
    """What one forward pass carries from layer to layer (built fresh per call; nothing here outlives it)."""

    update_state: bool = False
    attention_decay: AttentionDecay | None = None
    decay_state: torch.Tensor | None = None          # AttentionDecay's [B, T, T] fixation of the layers so far
    column_specialization: list = field(default_factory=list)
    surprises: list = field(default_factory=list)


def default_objectives(config: NeuroLlamaConfig) -> TrainingObjectiveConfig:
    """TrainingObjectiveConfig defaults, with the surprise weighted by config.prediction_weight."""
    return TrainingObjectiveConfig(prediction_error_weight=config.prediction_weight)


def _require_below_one(config: NeuroLlamaConfig, *names: str) -> None:
    for name in names:
        if getattr(config, name) >= 1:
            raise ValueError(f"{name} must be < 1 when enable_habituation is on (the habituation modules need "
                             f"[0, 1)), got {getattr(config, name)}")


class AttentionMechanisms(nn.Module):
    """The attention-level mechanisms of one layer; `NeuroAttention` calls the three steps below."""

    def __init__(self, config: NeuroLlamaConfig, layer_idx: int, o_proj: nn.Linear):
        super().__init__()
        c, heads, dim = config, config.num_heads, config.head_dim
        self.layer_idx, self.num_groups = layer_idx, config.num_kv_heads
        self.lateral_inhibition_lr = c.lateral_inhibition_lr
        self.columns = c.enable_cortical_columns
        synaptic = c.synaptic_mode if c.enable_synaptic_modulation else None
        self.synaptic_scaling = SynapticScaling(heads) if synaptic == "static" else None
        self.synaptic_matrix = SynapticModulationMatrix(dim, c.synaptic_window) if synaptic == "full_matrix" else None
        self.neuromodulation = NeuromodulatedAttention(c.hidden_dim, heads) if synaptic == "context_dependent" \
            else None
        self.hebbian = HebbianAttention(dim, heads, HebbianConfig(
            learning_rate=c.hebbian_lr, decay_rate=c.hebbian_decay, max_hebbian_norm=c.max_hebbian_norm)) \
            if c.enable_hebbian_attention else None
        self.habituation = self.novelty = None
        if c.enable_habituation:
            _require_below_one(c, "habituation_threshold", "max_habituation")
            if c.novelty_boost > 1:
                raise ValueError(f"novelty_boost must be <= 1 (it scales habituation by 1 - boost), "
                                 f"got {c.novelty_boost}")
            self.habituation = HabituatingAttention(heads, c.max_seq_len, HabituationConfig(
                habituation_rate=c.habituation_rate, recovery_rate=c.recovery_rate,
                attention_threshold=c.habituation_threshold, max_habituation=c.max_habituation))
            self.novelty = NoveltyDetector(c.hidden_dim, strength=c.novelty_boost)
        self.lateral_inhibition = LateralInhibition(self.num_groups) if c.enable_lateral_inhibition else None
        self.voting = c.voting_method if c.enable_population_coding else None
        self.voter = None
        if self.voting == "confidence":
            self.voter = ConfidenceWeightedVoting(heads, dim, c.voting_threshold)
        elif self.voting == "entropy":
            self.voter = EntropyBasedVoting(heads, c.voting_temperature)
        elif self.voting == "tuning_curve":
            self.voter = PopulationCodedAttention(PopulationConfig(heads, dim, c.hidden_dim, "tuning_curve",
                                                                   tuning_width=c.tuning_width))
            self.voter.out_proj = o_proj   # tied to the layer's o_proj (see the module docstring)

    def pre_softmax(self, scores, q, k, x, state: ForwardState):
        """Synaptic, Hebbian, habituation (+ novelty), cross-layer decay, in that order."""
        if self.synaptic_scaling is not None:
            scores = self.synaptic_scaling(scores)
        if self.synaptic_matrix is not None:
            scores = self.synaptic_matrix(scores, q, k)
        if self.hebbian is not None:
            scores = scores + self.hebbian.score_bias(q, k, scores, update_state=state.update_state)
        if self.habituation is not None:
            scores = self.habituation(scores, novelty=self.novelty(x))
        if state.attention_decay is not None:
            scores = state.attention_decay(scores, state.decay_state, self.layer_idx)
        return scores

    def per_head(self, heads, probs, x, state: ForwardState):
        """Record what later layers / losses need from probs, then neuromodulation gates and lateral inhibition."""
        b, t, h, d = heads.shape
        if state.attention_decay is not None:
            state.decay_state = state.attention_decay.update(probs, state.decay_state)
        if self.columns:
            column_probs = probs.view(b, self.num_groups, h // self.num_groups, *probs.shape[2:]).mean(2)
            state.column_specialization.append(mean_pairwise_js_divergence(column_probs))
        if self.neuromodulation is not None:
            heads = self.neuromodulation(heads, x)
        if self.lateral_inhibition is not None:
            grouped = self.lateral_inhibition(heads.view(b, t, self.num_groups, h // self.num_groups, d))
            if self.training and self.lateral_inhibition_lr > 0:
                self.lateral_inhibition.update_inhibition(grouped.detach(), lr=self.lateral_inhibition_lr)
            heads = grouped.view(b, t, h, d)
        return heads

    def aggregate(self, heads, probs, x, o_proj: nn.Linear):
        """Population vote (or plain concat) + o_proj -> [B, T, hidden]."""
        if self.voting == "tuning_curve":
            return self.voter(heads, head_contexts=x)
        if self.voting == "confidence":
            heads = self.voter(heads, aggregate=False)
        elif self.voting == "entropy":
            heads = self.voter(heads, probs, aggregate=False)
        return o_proj(heads.reshape(*heads.shape[:2], -1))


class ModelMechanisms(nn.Module):
    """The layer-level mechanisms: predictive coding between layers, early exit, and the cross-layer decay."""

    def __init__(self, config: NeuroLlamaConfig, final_head: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        c = config
        self.predictive = nn.ModuleList(
            PredictiveCodingLayer(c.hidden_dim, PredictiveCodingConfig(c.prediction_weight, c.error_signal_decay))
            for _ in range(c.num_layers)) if c.enable_predictive_coding else None
        self.attention_decay = None
        if c.enable_habituation:
            _require_below_one(c, "cross_layer_decay")
            self.attention_decay = AttentionDecay(c.num_layers, c.cross_layer_decay)
        self.early_exit = self.exit_controller = None
        self.exit_layers: tuple[int, ...] = ()
        if c.enable_early_exit:
            tau = c.exit_confidence_threshold
            exit_config = EarlyExitConfig(exit_layers=c.exit_layers, confidence_threshold=tau,
                                          min_layer=c.min_exit_layer, num_layers=c.num_layers,
                                          norm_eps=c.rms_norm_eps, distill_weight=EXIT_DISTILL_WEIGHT,
                                          min_threshold=min(0.1, tau))
            self.early_exit, self.exit_controller = create_dual_process_pipeline(
                exit_config, c.hidden_dim, c.vocab_size, shared_head=final_head)
            self.exit_layers = tuple(c.exit_layers)

    def after_layer(self, layer_idx: int, x_in, x_out, state: ForwardState):
        """Predictive coding of the pair (x_i, x_{i+1}): surprise recorded, error fed into x_{i+1}."""
        if self.predictive is None:
            return x_out
        pc = self.predictive[layer_idx]
        error, surprise = pc.error_signal(x_in, pc.predict_below(x_out))
        state.surprises.append(surprise)
        return x_out + error

    def try_exit(self, depth: int, x):
        """The exit head's logits [B, T, V] when it is confident for every sequence's last token, else None.

        The decision reads only the last position (one [B, 1, V] head call); the full logits are computed on exit.
        """
        if self.early_exit.process_layer_output(x[:, -1:], depth) is None:
            return None
        return self.early_exit.exit_logits(x, depth)


def attach_mechanisms(model: nn.Module) -> None:
    """Build the mechanisms that model.config switches on (nothing for a toggle that is off)."""
    config = model.config
    if any(getattr(config, name) for name in _ATTENTION_TOGGLES):
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            attn.mechanisms = AttentionMechanisms(config, i, attn.o_proj)
    if any(getattr(config, name) for name in _MODEL_TOGGLES):
        model.mechanisms = ModelMechanisms(config, model.final_logits)


def auxiliary_losses(mechanisms: ModelMechanisms | None, state: ForwardState, exit_hidden: dict, final_logits,
                     targets: torch.Tensor, training: bool) -> dict:
    """The unweighted auxiliary terms present in this forward (see the module docstring).

    targets [B, T] are aligned with the inputs (-100 = ignore); the exit heads learn position t -> targets[t + 1].
    """
    terms = {}
    if state.surprises:
        terms["surprise"] = SurpriseLoss()(state.surprises)
    if state.column_specialization:
        terms["specialization"] = -torch.stack(state.column_specialization).mean()
    engine = mechanisms.early_exit if mechanisms is not None else None
    if training and engine is not None and targets.shape[1] > 1 and bool((targets[:, 1:] != -100).any()):
        hidden = {layer: h[:, :-1] for layer, h in exit_hidden.items()}
        terms["early_exit"] = engine.exit_loss(hidden, targets[:, 1:], final_logits[:, :-1])
    return terms


def weighted_aux_loss(terms: dict, weights: dict) -> torch.Tensor | None:
    """sum_k w_k L_k over the terms with w_k > 0; None when there is none."""
    used = [weights[name] * value for name, value in terms.items() if weights[name] > 0]
    return torch.stack(used).sum() if used else None


def aux_weights(objectives: TrainingObjectiveConfig, exit_loss_weight: float) -> dict:
    return {"surprise": objectives.prediction_error_weight, "specialization": objectives.specialization_weight,
            "early_exit": exit_loss_weight}


def check_exit_loss_weight(value) -> float:
    check_number("exit_loss_weight", value, 0)
    return float(value)
