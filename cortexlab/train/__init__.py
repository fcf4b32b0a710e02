"""Training recipes (built on `accelerate`); run them with `python -m cortexlab.train <recipe>`.

- `recall`: a Cortex sidecar on frozen SmolLM2 learns to carry a pass key across calls, and the
  controller ablation ("recall", "recall-ablation").
- `lm`: NeuroLlama trained from scratch on the standard library's sources, and the mechanism
  ablation ("neuro-lm", "neuro-ablation").
- `longtext`: E3, a sidecar trained on long stdlib text read in segments; loss by token position.
- `mqar`: E1, multi-query associative recall with small models trained from scratch.
- `common`: atomic result and checkpoint writes, the git revision and environment recorded with results.
"""
from .longtext import LongTextConfig, evaluate_longtext, train_longtext
from .lm import ABLATION_VARIANTS, LMTrainConfig, evaluate_lm, train_lm, train_lm_ablation
from .recall import (
    EVAL_SEED,
    CropPlan,
    RecallEvalSet,
    RecallTrainConfig,
    advance_memory,
    answer_loss,
    answer_metrics,
    crop_plan,
    episode_forward,
    evaluate_recall,
    load_checkpoint,
    memory_only_depth,
    neutralise_controller_,
    parse_curriculum,
    question_logits,
    save_adapter,
    save_checkpoint,
    sidecar_inputs,
    train_recall,
)

__all__ = [
    "ABLATION_VARIANTS", "CropPlan", "EVAL_SEED", "LMTrainConfig", "LongTextConfig", "RecallEvalSet",
    "RecallTrainConfig", "advance_memory", "answer_loss", "answer_metrics", "crop_plan", "episode_forward",
    "evaluate_lm", "evaluate_longtext", "evaluate_recall", "load_checkpoint", "memory_only_depth",
    "neutralise_controller_", "parse_curriculum", "question_logits", "save_adapter", "save_checkpoint",
    "sidecar_inputs", "train_lm", "train_lm_ablation", "train_longtext", "train_recall",
]
