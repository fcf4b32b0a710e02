"""NeuroLlama: a Llama-3 backbone with seven toggleable neuroscience mechanisms (one module each).

- `config`: `NeuroLlamaConfig` (every toggle and knob, presets "8B", "70B", "405B", "small").
- `backbone`: RMSNorm, RoPE, grouped-query attention, SwiGLU; `NeuroLlamaModel`, `create_neurollama`,
  and loading transformers' Llama weights (`from_hf_llama`).
- The mechanisms: `synaptic` (scaling, neuromodulation, windowed synaptic matrix), `columns` (column
  attention with Jensen-Shannon specialisation, lateral inhibition, hierarchical tiers), `predictive`
  (predictive coding, CPC), `hebbian` (Hebbian and reward-modulated attention), `habituation`
  (stimulus-specific adaptation, cross-layer decay, novelty), `population` (head voting), `early_exit`
  (System 1 / System 2 exits and the adaptive threshold).
- `objectives`: the five brain-inspired training losses and `NeuroCompositeLoss`.
- `temperature`: adaptive head temperature (homeostatic gain control of attention entropy).
- `hooks`: `InferenceHookPipeline`, the mechanisms as inference-time hooks on any pretrained HF decoder.
"""
from .backbone import NeuroLlamaModel, create_neurollama, from_hf_llama, load_llama_state_dict
from .columns import CorticalColumnAttention, HierarchicalColumnOrganizer, LateralInhibition
from .config import MECHANISM_TOGGLES, PRESETS, NeuroLlamaConfig
from .early_exit import (
    AdaptiveComputationController,
    EarlyExitConfig,
    EarlyExitEngine,
    create_dual_process_pipeline,
    run_with_early_exit,
)
from .habituation import AttentionDecay, HabituatingAttention, HabituationConfig, NoveltyDetector
from .hebbian import HebbianAttention, HebbianConfig, RewardModulatedHebbian
from .hooks import InferenceHookConfig, InferenceHookPipeline
from .objectives import (
    CalibrationLoss,
    CoherenceLoss,
    EfficiencyLoss,
    NeuroCompositeLoss,
    SpecializationLoss,
    SurpriseLoss,
    TrainingObjectiveConfig,
)
from .population import ConfidenceWeightedVoting, EntropyBasedVoting, PopulationCodedAttention, PopulationConfig
from .predictive import ContrastivePredictiveCoding, PredictiveCodingConfig, PredictiveCodingLayer
from .synaptic import NeuromodulatedAttention, SynapticModulationMatrix, SynapticScaling
from .temperature import AdaptiveHeadTemperature

__all__ = [
    "MECHANISM_TOGGLES", "PRESETS", "AdaptiveComputationController", "AdaptiveHeadTemperature", "AttentionDecay",
    "CalibrationLoss",
    "CoherenceLoss", "ConfidenceWeightedVoting", "ContrastivePredictiveCoding", "CorticalColumnAttention",
    "EarlyExitConfig", "EarlyExitEngine", "EfficiencyLoss", "EntropyBasedVoting", "HabituatingAttention",
    "HabituationConfig", "HebbianAttention", "HebbianConfig", "HierarchicalColumnOrganizer", "InferenceHookConfig",
    "InferenceHookPipeline", "LateralInhibition",
    "NeuroCompositeLoss", "NeuroLlamaConfig", "NeuroLlamaModel", "NeuromodulatedAttention", "NoveltyDetector",
    "PopulationCodedAttention", "PopulationConfig", "PredictiveCodingConfig", "PredictiveCodingLayer",
    "RewardModulatedHebbian", "SpecializationLoss", "SurpriseLoss", "SynapticModulationMatrix", "SynapticScaling",
    "TrainingObjectiveConfig", "create_dual_process_pipeline", "create_neurollama", "from_hf_llama",
    "load_llama_state_dict", "run_with_early_exit",
]
