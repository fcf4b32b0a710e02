"""Training recipes (built on `accelerate`); run them with `python -m cortexlab.train <recipe>`.

- `recall`: a Cortex sidecar on frozen SmolLM2 learns to carry a pass key across calls, and the
  controller ablation ("recall", "recall-ablation").
- `recall_conflicts`: the controller ablation on SmolLM2 when a later call gives a conflicting key
  ("recall-conflicts").
- `lm`: NeuroLlama trained from scratch on the standard library's sources, and the mechanism
  ablation ("neuro-lm", "neuro-ablation").
- `longtext`: E3, a sidecar trained on long stdlib text read in segments; loss by token position.
- `mqar`: E1, multi-query associative recall with small models trained from scratch.
- `conflicts`: the metacognitive controller's ablation on MQAR with conflicting re-bindings ("controller-ablation").
- `common`: atomic result and checkpoint writes, the git revision and environment recorded with results,
  `evaluation_mode` (eval mode for a block, each module's own mode restored after it).
"""
import importlib

_EXPORTS = {
    "common": ("evaluation_mode",),
    "longtext": ("LongTextConfig", "carried_gain_by_offset", "evaluate_longtext", "train_longtext"),
    "lm": ("ABLATION_VARIANTS", "LMTrainConfig", "evaluate_lm", "train_lm", "train_lm_ablation"),
    "recall": ("EVAL_SEED", "CropPlan", "RecallEvalSet", "RecallTrainConfig", "advance_memory", "answer_loss",
               "answer_metrics", "crop_plan", "digit_curves", "draw_filler_calls", "episode_forward",
               "evaluate_generation", "evaluate_recall", "filler_damage", "hard_filler_calls", "load_checkpoint",
               "memory_only_depth", "neutralise_controller_", "parse_curriculum", "question_logits", "save_adapter",
               "save_checkpoint", "score_answer", "scored_prefix", "sidecar_inputs", "takeoff_step", "train_recall",
               "training_curve"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    """Import a recipe module on first use (`cortexlab.train.mqar` alone does not pay for the others)."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [
    "ABLATION_VARIANTS", "CropPlan", "EVAL_SEED", "LMTrainConfig", "LongTextConfig", "RecallEvalSet",
    "RecallTrainConfig", "advance_memory", "answer_loss", "answer_metrics", "carried_gain_by_offset", "crop_plan",
    "digit_curves", "draw_filler_calls", "episode_forward", "evaluate_generation", "evaluate_lm", "evaluate_longtext",
    "evaluate_recall", "evaluation_mode", "filler_damage", "hard_filler_calls", "load_checkpoint",
    "memory_only_depth", "neutralise_controller_", "parse_curriculum", "question_logits", "save_adapter",
    "save_checkpoint", "score_answer", "scored_prefix", "sidecar_inputs", "takeoff_step", "train_lm",
    "train_lm_ablation", "train_longtext", "train_recall", "training_curve",
]
