"""Training loops for Cortex sidecars (built on `accelerate`) and the recall-across-calls experiment.

Recipe "recall" (`python -m cortexlab.train recall ...`): a frozen base model (the bundled
SmolLM2-135M-Instruct) with one sidecar learns to carry a pass key across calls (see
`cortexlab.data.recall`). One optimisation step is one batch of episodes of N calls:

    memory = {}
    for call c = 1..N:   out = model(call_c, memory=memory);  memory = out.memory
    loss = cross-entropy of the answer as written in call N: the space that starts the number, then its digits

The memory is carried through all N calls *with* gradients (backprop through time over the
whole episode; `bptt_calls=k` detaches it every k calls instead). The space is scored with the
digits because the memory also acts there: a 1300-step sidecar trained on the digits alone
(`score_prefix=False`) read them right teacher-forced, space given, but itself wrote "0" where the
base writes the space, so free generation failed on the example checked. Only the sidecars'
parameters train (AdamW); the base model is frozen. N is drawn per step from a curriculum
("0:2-3,0.5:2-4,0.75:2-8,0.9:2-16": 2-3 calls in the first half of the steps, then 2-4,
2-8, 2-16), and the first `easy_fraction` of the steps uses shorter calls (less filler is
written over the fact, so the memory's signal is stronger while the sidecar learns to use it).

Cost: a call before the last one can only matter through the memory, so it runs the decoder
only up to the sidecar's layer (`memory_only_depth`). With a single sidecar layer, what the
sidecar reads in a call does not depend on the sidecar at all (the layers below it are
frozen), so it is computed once (`sidecar_inputs`) and the memory advanced from it
(`advance_memory`): filler calls come from a fixed pool whose inputs are computed before
training, and the held-out set's are computed once for every sidecar evaluated on it.
Both give exactly the memory of the plain forward (tested). With `crop_filler=n` the fact call
and the question call of a training batch are cut short (`crop_plan`: at most n filler tokens
beside the fact and before the question), which makes steps at 128-token calls several
times cheaper; evaluation always uses whole calls.

Evaluation (`evaluate_recall` on a `RecallEvalSet`): teacher-forced exact match of the
answer digits (all A argmax predictions right), per-digit accuracy and the accuracy at the
space before the number ("prefix_accuracy") on held-out episodes vs distance in calls, for
the trained sidecar and two baselines: "reset" (the sidecar with its memory reset before the
question call) and "base" (the bare base model, `model.disabled()`). Chance: 10^-A exact match, 1/10 per digit.
`evaluate_generation`: exact match when the model writes the answer itself (greedy `generate`, no teacher
forcing), on a `RecallEvalSet`'s episodes (the ones `evaluate_recall` reads) or on fresh ones from a task; the
recipe records it after training.

Recipe "recall-ablation": the controller ablation; trains the recipe with and without the
metacognitive controller (same seed, data and steps) and also evaluates the controller-trained
sidecar with its controller set back to neutral (`neutralise_controller_`).

Checkpoints are safetensors + JSON (`save_cortex` for the sidecars, the optimizer state as
tensors), written atomically, and `--resume` continues from the latest one with the same
data stream (every batch is determined by the seed and the step).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from cortexlab.checks import check_bool, check_int, check_number
from cortexlab.cortex import CortexWrapConfig, attach_cortex
from cortexlab.cortex.config import CONV_INITS
from cortexlab.cortex.controller import neutralise_controller_, predictive_entropy
from cortexlab.cortex.wrap import decoder_layers
from cortexlab.data.recall import (DIRECT_FACTS, DISTRACTOR_KINDS, FACT_TEMPLATES, FILLERS, TEMPLATES, RecallBatch,
                                   RecallTask)

from .common import (
    environment,
    evaluation_mode,
    git_revision,
    int_tuple,
    jsonable,
    publish_dir_atomic,
    read_checkpoint,
    warmup_cosine_lr,
    write_checkpoint,
    write_json_atomic,
)

__all__ = [
    "EVAL_SEED", "CropPlan", "RecallEvalSet", "RecallTrainConfig", "advance_memory", "answer_loss", "answer_metrics",
    "crop_plan", "digit_curves", "draw_filler_calls", "episode_forward", "evaluate_generation", "evaluate_recall",
    "filler_damage", "hard_filler_calls", "load_checkpoint", "memory_only_depth",
    "neutralise_controller_", "parse_curriculum", "question_logits", "save_adapter", "save_checkpoint", "score_answer",
    "scored_prefix", "sidecar_inputs", "takeoff_step", "train_recall", "training_curve",
]

EVAL_SEED = 1_000_003       # held-out episodes use this seed base (training uses the run's seed + step)
DEFAULT_DISTANCES = (0, 1, 2, 4, 8, 16)
SHARED_DIRECTION_CALLS = 64   # pool calls whose sidecar inputs find the shared directions (64 x T tokens)


# ---------------------------------------------------------------------------------------
# configuration


AFTER_TRAINING = ("generation_distances", "generation_examples")   # config fields that do not change training


@dataclass
class RecallTrainConfig:
    """Everything that determines a recall training run (saved in its results file)."""

    steps: int = 400
    batch_size: int = 8
    lr: float = 5e-3
    min_lr_ratio: float = 1.0            # cosine decay from lr to min_lr_ratio * lr after warm-up (1: constant)
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.0
    curriculum: str = "0:2-3,0.5:2-4,0.75:2-8,0.9:2-16"
    bptt_calls: int = 0                  # 0: backprop through the whole episode
    filler_pool: int = 256               # filler calls drawn from a pool whose sidecar inputs are computed once
    filler: str = "stdlib"               # main-stage filler text ("stdlib+packages": with the packages' docstrings)
    hard_filler: float = 0.0             # main stage: this fraction of filler calls comes from the pool's most
    hard_every: int = 300                #   damaging 1/8 (`filler_damage`), ranked after every hard_every main
                                         #   steps (the first hard_every main steps draw uniformly)
    templates: str = "listed"            # fact and question templates, both stages ("composed": 448 x 66;
                                         #   "listed+direct": with DIRECT_FACT_TEMPLATES;
                                         #   "listed+direct-composed": with composed_direct_templates();
                                         #   "listed+direct-bridged": with bridged_direct_templates())
    direct_from: float = 0.0             # templates="listed+direct(-...)": the direct facts join after this
                                         #   fraction of the steps (before: the listed facts; main stage only)
    distractors: float = 0.0             # after distractors_from * steps steps, this share of the filler calls
    distractors_from: float = 0.0        #   (and of the fact and question calls' filler spans, before cropping)
                                         #   carries other numbers stated like facts (`RecallTask(distractors=)`);
                                         #   main stage only: a start inside the easy stage waits for its end
    distractor_kind: str = "all"         # "plain": without the distractors framed like facts (`RecallTask`)
    easy_fraction: float = 0.5           # the first fraction of the steps uses easier episodes:
    easy_call_tokens: int = 24           #   shorter calls (less filler written over the fact) ...
    easy_filler: str = "stdlib"          #   ... and this filler ("repeat": the classic repeated pass-key text)
    crop_filler: int | None = None       # train on cropped fact and question calls (`crop_plan`; None: whole calls)
    score_prefix: bool = True            # score the space that starts the number with the digits (runs before
                                         # this field existed scored the digits alone, as False does)
    seed: int = 0
    call_tokens: int = 48
    key_digits: int = 5
    # the sidecar (CortexWrapConfig fields)
    layers: list[int] = field(default_factory=lambda: [12])
    rank_fast: int = 64
    num_heads: int = 4
    controller: bool = True
    use_hybrid: bool = False
    conv_size: int = 4                   # the short conv's taps: how many tokens back a key or query can see
    conv_init: str = "random"            # "induction": keys from the previous token (CortexWrapConfig.conv_init)
    shared_directions: int = 0           # project this many directions every input shares out of W_q and W_k at
                                         #   the start, found in the filler pool (`drop_shared_directions_`)
    # evaluation and bookkeeping
    eval_distances: tuple[int, ...] = DEFAULT_DISTANCES
    eval_examples: int = 64
    generation_distances: tuple[int, ...] = (1, 8)   # free generation (`evaluate_generation`) after training
    generation_examples: int = 32
    eval_batch_size: int = 16
    checkpoint_every: int = 50
    log_every: int = 10                  # write <checkpoint_dir>/progress.json every this many steps

    def __post_init__(self):
        for name in ("steps", "batch_size", "call_tokens", "key_digits", "eval_examples", "eval_batch_size",
                     "generation_examples", "checkpoint_every", "log_every"):
            check_int(name, getattr(self, name))
        for name in ("warmup_steps", "bptt_calls", "seed", "filler_pool"):
            check_int(name, getattr(self, name), 0)
        check_number("easy_fraction", self.easy_fraction, 0, 1)
        check_number("hard_filler", self.hard_filler, 0, 1)
        check_number("distractors", self.distractors, 0, 1, high_open=True)
        check_number("distractors_from", self.distractors_from, 0, 1)
        if self.distractors_from and not self.distractors:
            raise ValueError(f"distractors_from={self.distractors_from} needs distractors > 0")
        check_number("direct_from", self.direct_from, 0, 1)
        if self.direct_from and self.templates not in DIRECT_FACTS:
            raise ValueError(f"direct_from={self.direct_from} needs templates with direct facts, one of "
                             f"{tuple(DIRECT_FACTS)}, got {self.templates!r}")
        if self.distractor_kind not in DISTRACTOR_KINDS:
            raise ValueError(f"distractor_kind must be one of {DISTRACTOR_KINDS}, got {self.distractor_kind!r}")
        if self.distractor_kind != "all" and not self.distractors:
            raise ValueError(f"distractor_kind={self.distractor_kind!r} needs distractors > 0")
        if self.distractors and self.hard_filler:
            raise ValueError("hard_filler ranks a pool without distractors; use one of hard_filler and distractors")
        check_int("hard_every", self.hard_every)
        if self.hard_filler and not self.filler_pool:
            raise ValueError("hard_filler draws from the filler pool; set filler_pool > 0")
        if self.hard_filler and len(self.layers) != 1:
            raise ValueError(f"hard_filler ranks the pool with one sidecar layer's inputs; layers={self.layers}")
        check_bool("score_prefix", self.score_prefix)
        check_int("easy_call_tokens", self.easy_call_tokens, 16)
        for name, choices in (("filler", FILLERS), ("easy_filler", FILLERS), ("templates", TEMPLATES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        check_number("lr", self.lr, 0, low_open=True)
        check_number("weight_decay", self.weight_decay, 0)
        check_number("grad_clip", self.grad_clip, 0)
        check_int("crop_filler", self.crop_filler, 0, allow_none=True)
        check_number("min_lr_ratio", self.min_lr_ratio, 0, 1)
        self.eval_distances = tuple(self.eval_distances)
        if not self.eval_distances or any(not isinstance(d, int) or d < 0 for d in self.eval_distances):
            raise ValueError(f"eval_distances must be non-negative ints, got {self.eval_distances!r}")
        self.generation_distances = tuple(self.generation_distances)
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in self.generation_distances):
            raise ValueError(f"generation_distances must be ints >= 1, got {self.generation_distances!r}")
        parse_curriculum(self.curriculum)
        self.cortex_config()   # the sidecar's fields, checked by CortexWrapConfig
        check_int("shared_directions", self.shared_directions, 0)
        if self.shared_directions and not (self.filler_pool and len(self.layers) == 1):
            raise ValueError(f"shared_directions={self.shared_directions} finds them in the filler pool of one "
                             f"sidecar layer; set filler_pool > 0 and one layer (layers={self.layers})")

    def cortex_config(self) -> CortexWrapConfig:
        return CortexWrapConfig(layers=list(self.layers), rank_fast=self.rank_fast, num_heads=self.num_heads,
                                controller=self.controller, use_hybrid=self.use_hybrid, conv_size=self.conv_size,
                                conv_init=self.conv_init)


def parse_curriculum(spec: str) -> list[tuple[float, int, int]]:
    """"0:2-4,0.5:2-8" -> [(0.0, 2, 4), (0.5, 2, 8)]: from fraction f of the steps, N in [lo, hi]."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"curriculum must be a string like '0:2-4,0.5:2-8', got {spec!r}")
    stages = []
    for part in spec.split(","):
        try:
            start, span = part.split(":")
            lo, hi = span.split("-")
            stage = (float(start), int(lo), int(hi))
        except ValueError:
            raise ValueError(f"curriculum stage {part!r} is not 'fraction:lo-hi' (e.g. '0.5:2-8')") from None
        if not (0 <= stage[0] < 1 and 2 <= stage[1] <= stage[2]):
            raise ValueError(f"curriculum stage {part!r}: need 0 <= fraction < 1 and 2 <= lo <= hi calls")
        stages.append(stage)
    if stages[0][0] != 0 or any(a[0] >= b[0] for a, b in zip(stages, stages[1:])):
        raise ValueError(f"curriculum {spec!r}: fractions must start at 0 and increase")
    return stages


def curriculum_calls(stages, step: int, steps: int, rng: random.Random) -> int:
    """The number of calls N for `step` (0-based) of `steps`."""
    lo, hi = next((lo, hi) for start, lo, hi in reversed(stages) if step >= start * steps)
    return rng.randint(lo, hi)


# ---------------------------------------------------------------------------------------
# the forward pass through an episode


def _unwrap(model):
    return getattr(model, "module", model)   # DDP / FSDP wrappers keep the CortexModel in .module


@contextlib.contextmanager
def memory_only_depth(model):
    """Run only the decoder layers up to the last sidecar's inside this block.

    The layers after it cannot change what the sidecars write to memory, so a call whose
    output is not needed (a filler call) can skip them. The decoders of transformers
    (Llama, Qwen2, Qwen3, Mistral, ...) loop over `layers[:config.num_hidden_layers]`; this
    lowers that number for the duration of the block. The logits are meaningless inside.
    """
    cortex = _unwrap(model)
    config = cortex.base.config
    full = config.num_hidden_layers
    config.num_hidden_layers = max(cortex.layer_ids) + 1
    try:
        yield
    finally:
        config.num_hidden_layers = full


def detach_memory(memory: dict) -> dict:
    return {layer: {name: t.detach() for name, t in state.items()} for layer, state in memory.items()}


def entropy_layer(model) -> int:
    """The decoder layer whose input the controller's entropy signal reads (default: the first sidecar's)."""
    cortex = _unwrap(model)
    layer = getattr(cortex, "entropy_layer", None)
    if layer is None:
        layer = getattr(cortex.config, "entropy_layer", None)
    return cortex.layer_ids[0] if layer is None else layer


def single_sidecar_layer(model) -> int | None:
    """The decoder layer of the model's only sidecar, or None when it has several."""
    ids = _unwrap(model).layer_ids
    return ids[0] if len(ids) == 1 else None


@torch.no_grad()
def sidecar_inputs(model, input_ids: torch.Tensor, *, entropy: bool | None = None) -> dict:
    """What a model's single sidecar reads in one call: {"x": [B, T, d] fp32, "entropy": [B, T] or None}.

    x is the sidecar layer's normalised input and entropy the controller's logit-lens signal
    (read at `entropy_layer(model)`; computed when `entropy` is True; None: when the sidecar
    has a controller). Neither
    depends on the sidecar (the layers below it are frozen and carry no sidecar), so they
    can be computed once and reused: `advance_memory(model, memory, features=...)` then
    writes a call to memory without running the base model again. Only for models with
    one sidecar layer (with several, the upper one's input depends on the lower one).
    """
    cortex = _unwrap(model)
    idx = single_sidecar_layer(model)
    if idx is None:
        raise ValueError(f"sidecar_inputs needs a model with one sidecar layer, this one has {cortex.layer_ids}")
    layers = decoder_layers(cortex.base)
    want_entropy = cortex.config.controller if entropy is None else entropy
    captured = {}

    def grab(name):
        def hook(module, args, kwargs):
            captured[name] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return hook

    handles = [layers[idx].self_attn.register_forward_pre_hook(grab("x"), with_kwargs=True)]
    if want_entropy:
        handles.append(layers[entropy_layer(model)].register_forward_pre_hook(grab("residual"), with_kwargs=True))
    try:
        with cortex.disabled(), memory_only_depth(model):
            cortex.base(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    u = None
    if want_entropy:
        base = cortex.base
        u = predictive_entropy(captured["residual"], base.get_decoder().norm, base.get_output_embeddings())
    return {"x": captured["x"].float(), "entropy": u}


def advance_memory(model, memory: dict | None, *, input_ids: torch.Tensor | None = None,
                   features: dict | None = None) -> dict:
    """The memory after one more call: from its token ids (through the model, up to the last
    sidecar's layer) or from precomputed `sidecar_inputs` features (the single sidecar only)."""
    if features is None:
        with memory_only_depth(model):
            return model(input_ids, memory=memory, use_cache=False, logits_to_keep=1).memory
    cortex = _unwrap(model)
    idx = single_sidecar_layer(model)
    if idx is None:
        raise ValueError("features= needs a model with one sidecar layer; pass input_ids instead")
    block = cortex.sidecars[str(idx)]
    _, state = block(features["x"], (memory or {}).get(idx), None, features["entropy"])
    return {idx: state}


def question_logits(model, input_ids: torch.Tensor, memory: dict | None, answer_tokens: int,
                    disabled: bool = False) -> torch.Tensor:
    """Logits [B, A, V] predicting the last A tokens of the call `input_ids`, reading `memory`."""
    cortex = _unwrap(model)
    with cortex.disabled() if disabled else contextlib.nullcontext():
        out = model(input_ids, memory=memory, use_cache=False, logits_to_keep=answer_tokens + 1)
    return out.logits[:, :answer_tokens].float()


def episode_forward(model, batch: RecallBatch, *, features: list | None = None, fast: bool | None = None,
                    bptt_calls: int = 0, reset_before_question: bool = False, disabled: bool = False,
                    crop: CropPlan | None = None, prefix_tokens: int = 0):
    """Run the episodes' calls in order, carrying the memory; returns the answer logits [B, P + A, V].

    The answer is the last A tokens of the last call; its logits are those of the A
    positions before. prefix_tokens=P also returns the logits of the P tokens before the
    answer (the task's `answer_prefix`, the space that starts the number), first.
    features: precomputed `sidecar_inputs` for calls 1..N-1 (a list, None entries are
    computed); fast: compute the missing ones with `sidecar_inputs` (default: when the model
    has one sidecar layer) instead of through the model. Both give the same memory.
    reset_before_question: start the last call from an empty memory (the "reset"
    baseline; earlier calls are skipped). disabled: the bare base model, last call only (its
    context restarts every call, so earlier calls cannot reach it). bptt_calls: detach the
    memory every k calls (0: never). crop: run call 1 up to `crop.fact_end` and the last call
    from `crop.question_start` (`crop_plan`; None: whole calls).
    """
    A = batch.answer.shape[1] + prefix_tokens
    memory = None
    if not (disabled or reset_before_question):
        fast = single_sidecar_layer(model) is not None if fast is None else fast
        for c in range(batch.num_calls - 1):
            ids = batch.input_ids[:, c, :crop.fact_end] if crop is not None and c == 0 else batch.input_ids[:, c]
            feats = features[c] if features is not None else None
            if feats is None and fast:
                feats = sidecar_inputs(model, ids)
            memory = advance_memory(model, memory, input_ids=ids, features=feats)
            if bptt_calls and (c + 1) % bptt_calls == 0:
                memory = detach_memory(memory)
    question = batch.input_ids[:, -1, crop.question_start:] if crop is not None else batch.input_ids[:, -1]
    return question_logits(model, question, memory, A, disabled=disabled)


def answer_metrics(logits: torch.Tensor, answer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact match [B] bool, correct digits [B, A] bool) of the argmax predictions."""
    correct = logits.argmax(-1) == answer
    return correct.all(-1), correct


def answer_loss(logits: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), answer.flatten())


def scored_prefix(task: RecallTask, score: bool, device=None) -> torch.Tensor:
    """The answer-prefix token ids `score_answer` scores: the task's `answer_prefix` (score=True), or none."""
    return torch.tensor(task.answer_prefix if score else [], dtype=torch.int64, device=device)


def score_answer(model, batch: RecallBatch, prefix_ids: torch.Tensor, **forward):
    """The training loss of one batch, scoring the P tokens of `prefix_ids` (the space that starts the number;
    P = 0: the digits alone) and the A digits:

        loss = mean over the P + A answer tokens of -log p(token | calls so far)

    Returns (loss, the digits' logits [B, A, V], the fraction of episodes whose prefix is the argmax, or None
    when P = 0). `forward`: `episode_forward`'s options."""
    P = len(prefix_ids)
    logits = episode_forward(model, batch, prefix_tokens=P, **forward)
    loss = answer_loss(logits, torch.cat([prefix_ids.expand(len(batch.answer), -1), batch.answer], dim=1))
    spaced = (logits[:, :P].detach().argmax(-1) == prefix_ids).all(-1).float().mean().item() if P else None
    return loss, logits[:, P:], spaced


# ---------------------------------------------------------------------------------------
# evaluation


class RecallEvalSet:
    """Held-out episodes for `evaluate_recall` and `evaluate_generation`, with the frozen base's work done once.

    For each chunk of examples: one episode of D+1 calls (D = the largest distance; the
    fact call, D-1 filler calls, the question call) serves every distance d >= 1: the
    question call is asked after the first d calls. Distance 0 has its own one-call
    episodes (fact and question in one call: the in-context reference). With a single
    sidecar layer the sidecar inputs of calls 1..D are computed once here (with the
    entropy signal, so sidecars with and without a controller can share the set) and any
    sidecar attached to the same base model at that layer can be evaluated on it cheaply.
    """

    def __init__(self, model, task: RecallTask, *, distances=DEFAULT_DISTANCES, examples: int = 64,
                 batch_size: int = 16, seed: int = EVAL_SEED, progress: bool = False):
        from tqdm.auto import tqdm

        self.distances = sorted(set(int(d) for d in distances))
        if not self.distances or self.distances[0] < 0:
            raise ValueError(f"distances must be non-negative ints, got {distances!r}")
        check_int("examples", examples)
        check_int("batch_size", batch_size)
        self.task, self.examples, self.seed = task, examples, seed
        self.layer = single_sidecar_layer(model)
        self.entropy_layer = entropy_layer(model)
        device = next(_unwrap(model).sidecars.parameters()).device
        longest = self.distances[-1]
        self.chunks = []
        starts = list(range(0, examples, batch_size))
        bar = tqdm(total=len(starts) * longest, desc="eval set: sidecar inputs", disable=not progress, leave=False)
        for start in starts:
            n = min(batch_size, examples - start)
            chunk = {"single": task.batch(1, n, seed=seed + start).to(device) if 0 in self.distances else None,
                     "episode": None, "features": None}
            if longest >= 1:
                chunk["episode"] = episode = task.batch(longest + 1, n, seed=seed + start).to(device)
                if self.layer is not None:
                    chunk["features"] = []
                    for c in range(longest):
                        chunk["features"].append(sidecar_inputs(model, episode.input_ids[:, c], entropy=True))
                        bar.update()
            self.chunks.append(chunk)
        bar.close()

    def features_fit(self, model) -> bool:
        """Whether the precomputed sidecar inputs are what `model`'s sidecar reads: the same single layer, and
        the entropy signal from the same layer when it has a controller."""
        return self.layer is not None and self.layer == single_sidecar_layer(model) and (
            not _unwrap(model).config.controller or self.entropy_layer == entropy_layer(model))

    def describe(self) -> dict:
        return {"split": self.task.split, "examples": self.examples, "seed": self.seed, "distances": self.distances,
                "layout": "distance d >= 1: the question call is asked after the fact call and d-1 filler calls "
                          "of one shared episode per example; distance 0: fact and question in one call"}


@torch.no_grad()
def evaluate_recall(model, data, *, distances=DEFAULT_DISTANCES, examples: int = 64, batch_size: int = 16,
                    seed: int = EVAL_SEED, variants=("sidecar", "reset", "base"), progress: bool = False) -> dict:
    """Exact match and per-digit accuracy of the answer vs distance (calls between fact and question).

    data: a `RecallEvalSet`, or a `RecallTask` to build one from (distances, examples,
    batch_size, seed). Returns {variant: {str(distance): {"exact_match", "digit_accuracy",
    "prefix_accuracy", "examples"}}} plus "chance" (prefix_accuracy: the argmax at the space that
    starts the number is that space, which free generation needs). Variants: "sidecar" (memory
    carried through all calls), "reset" (the sidecar with an empty memory at the question call), "base" (the bare base
    model). For d >= 1 "reset" and "base" see only the question call, which is the same for
    every distance, so their numbers repeat across distances by construction.
    """
    from tqdm.auto import tqdm

    unknown = set(variants) - {"sidecar", "reset", "base"}
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; expected 'sidecar', 'reset' or 'base'")
    if isinstance(data, RecallTask):
        data = RecallEvalSet(model, data, distances=distances, examples=examples, batch_size=batch_size, seed=seed,
                             progress=progress)
    elif not isinstance(data, RecallEvalSet):
        raise TypeError(f"data must be a RecallEvalSet or RecallTask, got {type(data).__name__}")
    cortex = _unwrap(model)
    use_features = data.features_fit(model)
    A, prefix = data.task.key_digits, data.task.answer_prefix
    P = len(prefix)
    A_read = P + A   # the logits read per question: the prefix (the space before the number), then the digits
    prefix_ids = torch.tensor(prefix, dtype=torch.int64, device=next(cortex.sidecars.parameters()).device)
    far = [d for d in data.distances if d >= 1]
    tallies: dict = {}

    def tally(variant, distance, logits, answer):
        exact, digits = answer_metrics(logits[:, P:], answer)
        spaced = (logits[:, :P].argmax(-1) == prefix_ids).all(-1)
        t = tallies.setdefault((variant, distance), [0, 0, 0, 0])
        t[0] += int(exact.sum())
        t[1] += int(digits.sum())
        t[2] += answer.shape[0]
        t[3] += int(spaced.sum())

    with evaluation_mode(cortex):
        for chunk in tqdm(data.chunks, desc="eval recall", disable=not progress, leave=False):
            single, episode = chunk["single"], chunk["episode"]
            if single is not None:   # one call: "sidecar" and "reset" are the same computation
                logits = {}
                for variant in variants:
                    key = "base" if variant == "base" else "memory"
                    if key not in logits:
                        logits[key] = question_logits(model, single.input_ids[:, 0], None, A_read,
                                                      disabled=key == "base")
                    tally(variant, 0, logits[key], single.answer)
            if episode is None:
                continue
            question = episode.input_ids[:, -1]
            if "sidecar" in variants:
                memory = None
                for c in range(far[-1]):
                    feats = chunk["features"][c] if use_features else None
                    memory = advance_memory(model, memory, input_ids=episode.input_ids[:, c], features=feats)
                    if c + 1 in far:
                        tally("sidecar", c + 1, question_logits(model, question, memory, A_read), episode.answer)
            for variant in {"reset", "base"} & set(variants):
                logits = question_logits(model, question, None, A_read, disabled=variant == "base")
                for d in far:
                    tally(variant, d, logits, episode.answer)
    results = {v: {} for v in variants}
    for (variant, distance), (exact, digits, n, spaced) in sorted(tallies.items(), key=lambda kv: kv[0][1]):
        results[variant][str(distance)] = {"exact_match": exact / n, "digit_accuracy": digits / (n * A),
                                           "prefix_accuracy": spaced / n if P else None, "examples": n}
    results["chance"] = {"exact_match": 10.0 ** -A, "digit_accuracy": 0.1}
    return results


@torch.no_grad()
def evaluate_generation(model, data, *, distances=(1, 8), examples: int = 32, batch_size: int = 16,
                        seed: int = EVAL_SEED) -> dict[str, float]:
    """Exact match of free generation, no teacher forcing: after the calls before the question (the fact, then
    d - 1 filler calls), greedy `generate` continues the question call cut before its answer, and an episode
    counts when the P + A tokens it writes are the answer prefix (the space that starts the number) and the
    key's digits. Greedy decoding writes exactly the tokens whose teacher-forced argmax is right, so this checks
    that the model, generating as a chat would, gets what `evaluate_recall` reads.

    data: a `RecallEvalSet` (its episodes, the ones `evaluate_recall` reads, with their precomputed sidecar
    inputs; examples, batch_size and seed are the set's) or a `RecallTask` (episodes
    `task.batch(d + 1, ..., seed=seed + s)`, s the first example of each batch, drawn per distance).
    Returns {str(d): exact match}."""
    if isinstance(data, RecallTask):
        check_int("examples", examples)
        check_int("batch_size", batch_size)
    elif not isinstance(data, RecallEvalSet):
        raise TypeError(f"data must be a RecallEvalSet or RecallTask, got {type(data).__name__}")
    if not distances or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in distances):
        raise ValueError(f"distances must be ints >= 1 (the fact is in an earlier call), got {distances!r}")
    if isinstance(data, RecallEvalSet) and not set(distances) <= set(data.distances):
        raise ValueError(f"distances {sorted(set(distances) - set(data.distances))} are not in the eval set's "
                         f"{data.distances}")
    task = data.task if isinstance(data, RecallEvalSet) else data
    cortex = _unwrap(model)
    device = next(cortex.sidecars.parameters()).device
    exact = {}
    with evaluation_mode(cortex):
        for d in distances:
            right = total = 0
            for before, question, features in _generation_episodes(model, data, d, examples, batch_size, seed):
                memory = None
                for c in range(d):
                    memory = advance_memory(model, memory, input_ids=before[:, c].to(device),
                                            features=None if features is None else features[c])
                right += int(_writes_answer(cortex, task, question.to(device), memory).sum())
                total += question.shape[0]
            exact[str(d)] = round(right / total, 4)
    return exact


def _generation_episodes(model, data, d: int, examples: int, batch_size: int, seed: int):
    """(the d calls before the question [B, d, T], the question call [B, T], the sidecar inputs of those d calls
    or None) per batch of the episodes `evaluate_generation` reads at distance d: an eval set's (its question
    asked after the first d calls, as `evaluate_recall` does) or a task's fresh d + 1 calls."""
    if isinstance(data, RecallEvalSet):
        use_features = data.features_fit(model)
        for chunk in data.chunks:
            episode = chunk["episode"].input_ids
            yield episode[:, :d], episode[:, -1], chunk["features"] if use_features else None
    else:
        for s in range(0, examples, batch_size):
            episode = data.batch(d + 1, min(batch_size, examples - s), seed=seed + s).input_ids
            yield episode[:, :-1], episode[:, -1], None


def _writes_answer(cortex, task: RecallTask, question_call: torch.Tensor, memory: dict | None) -> torch.Tensor:
    """[B] bool: plain greedy `generate`, after the question call cut before its answer, writes that answer."""
    cut = task.call_tokens - len(task.answer_prefix) - task.key_digits     # the question ends here
    question = question_call[:, :cut]
    written = cortex.generate(question, memory=memory, attention_mask=torch.ones_like(question),
                              max_new_tokens=task.call_tokens - cut, do_sample=False,
                              repetition_penalty=1.0, no_repeat_ngram_size=0)[:, cut:]   # plain greedy
    written = F.pad(written, (0, task.call_tokens - cut - written.shape[1]), value=-1)  # stopped early
    return (written == question_call[:, cut:]).all(-1)


# ---------------------------------------------------------------------------------------
# checkpoints (safetensors + JSON, atomic)


def save_adapter(model, path, card: dict | None = None) -> Path:
    """`save_cortex` into `path` atomically (temp folder, fsync, rename), plus an optional card.json."""
    def write(tmp: Path) -> None:
        _unwrap(model).save_cortex(tmp)
        if card is not None:
            (tmp / "card.json").write_text(json.dumps(card, indent=2) + "\n")

    return publish_dir_atomic(path, write)


def save_checkpoint(directory, model, optimizer, step: int, state: dict, keep: int = 2) -> Path:
    """Write `directory/step-XXXXXX/` (sidecars, optimizer tensors, trainer state) and point `latest` at it."""
    return write_checkpoint(directory, step, optimizer, state, _unwrap(model).save_cortex, keep)


def _clear_checkpoints(directory) -> None:
    """Remove the checkpoints a previous run left in `directory` (a fresh run starts from step 0)."""
    directory = Path(directory)
    for old in directory.glob("step-*"):
        shutil.rmtree(old, ignore_errors=True)
    (directory / "latest.json").unlink(missing_ok=True)


def load_checkpoint(directory, model, optimizer) -> dict | None:
    """Load the latest checkpoint in `directory` into model and optimizer; its trainer state, or None."""
    return read_checkpoint(directory, optimizer, _unwrap(model).load_cortex)


# ---------------------------------------------------------------------------------------
# training


def _lr_at(step: int, cfg: RecallTrainConfig) -> float:
    return warmup_cosine_lr(step, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)


@dataclass(frozen=True)
class CropPlan:
    """A training batch's shortened calls: the fact at token `fact_at` of call 1, which ends at
    `fact_end`; the question call starts at token `question_start`."""

    fact_at: int
    fact_end: int
    question_start: int


def crop_plan(task: RecallTask, max_filler: int, seed: int) -> CropPlan:
    """Shorter fact and question calls for one training batch: call 1 = [filler][fact][filler] and
    call N = [filler][question + answer], each filler part a uniform draw from 0..max_filler tokens
    (plus the slack of a fact or question shorter than the longest template).

    The base model's passes over these two calls dominate a training step (the filler calls
    come from a precomputed pool), so at T = 128 this makes a step several times cheaper. The
    price: less filler is written between the fact and the question than in whole calls (at
    N = 2 at most about 2 max_filler tokens instead of ~1.5 T on average), so the distances the
    memory trains on are shorter; the filler calls of N > 2 still add T tokens each.
    Evaluation always uses whole calls.
    """
    check_int("max_filler", max_filler, 0)
    rng = random.Random(f"crop_plan/{seed}")
    T = task.call_tokens
    fact_at = rng.randint(0, min(max_filler, T - task.max_fact_tokens))
    fact_end = min(T, fact_at + task.max_fact_tokens + rng.randint(0, max_filler))
    room = T - task.max_tail_tokens
    return CropPlan(fact_at, fact_end, room - rng.randint(0, min(max_filler, room)))


def train_recall(cfg: RecallTrainConfig, *, model=None, tokenizer=None, checkpoint_dir=None, resume: bool = False,
                 progress: bool = True, accelerator=None, evaluate: bool = True, stop_at: int | None = None) -> dict:
    """Train a sidecar on recall across calls; returns a results dict (config, curve, eval, wall times).

    stop_at: stop after this many steps of the `cfg.steps`-step schedule (a probe of the run's start, e.g. of
    when it takes off; the schedule, data and checkpoints are the whole run's, so `resume=True` finishes it);
    a stopped run is not evaluated and its results hold "stopped_at".

    model/tokenizer: a `CortexModel` and tokenizer to train (None: the bundled SmolLM2 with
    `cfg.cortex_config()` attached, the sidecar initialised from `cfg.seed`). The trained
    model is returned under "model" (not serialisable; pop it before saving the dict).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    t_start = time.time()
    if stop_at is not None:
        check_int("stop_at", stop_at)
    stop = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    if model is None:
        from cortexlab.models import load_base_model

        base, tokenizer = load_base_model()
        torch.manual_seed(cfg.seed)
        model = attach_cortex(base, cfg.cortex_config())
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with the model")
    accelerator = accelerator or Accelerator()
    train_task = RecallTask(tokenizer, "train", call_tokens=cfg.call_tokens, key_digits=cfg.key_digits,
                            filler=cfg.filler, templates=cfg.templates)
    easy_steps = round(cfg.easy_fraction * cfg.steps)
    distractor_step = max(round(cfg.distractors_from * cfg.steps), easy_steps) if cfg.distractors else cfg.steps
    direct_step = max(round(cfg.direct_from * cfg.steps), easy_steps)
    # the main stage's tasks, by (direct facts joined, distractors started)
    plain = {False: train_task.with_templates(facts=FACT_TEMPLATES["train"]) if cfg.direct_from else train_task,
             True: train_task}
    main_tasks = {(direct, False): task for direct, task in plain.items()}
    if cfg.distractors:
        main_tasks.update({(direct, True): task.with_distractors(cfg.distractors, cfg.distractor_kind)
                           for direct, task in plain.items()})
    distracted_task = main_tasks.get((True, True))
    try:
        easy_task = RecallTask(tokenizer, "train", call_tokens=cfg.easy_call_tokens, key_digits=cfg.key_digits,
                               filler=cfg.easy_filler, templates="listed" if cfg.direct_from else cfg.templates
                               ) if easy_steps else None
    except ValueError as error:   # its call_tokens is easy_call_tokens: name the config field
        raise ValueError(f"easy_call_tokens={cfg.easy_call_tokens} (templates={cfg.templates!r}): {error}") from None
    heldout = RecallTask(tokenizer, "heldout", call_tokens=cfg.call_tokens, key_digits=cfg.key_digits)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    stages = parse_curriculum(cfg.curriculum)
    t0 = time.time()
    show = progress and accelerator.is_main_process
    pools = {"main": _filler_pool(model, train_task, cfg, accelerator.device, show,
                                  distracted_task if distractor_step < cfg.steps else None) if easy_steps < cfg.steps
             else None,
             "easy": _filler_pool(model, easy_task, cfg, accelerator.device, show) if easy_steps else None}
    pool_seconds = time.time() - t0
    if cfg.shared_directions:   # a resumed run loads its trained weights over this below
        pool = pools["main"] or pools["easy"]
        _unwrap(model).sidecars[str(single_sidecar_layer(model))].gdn.drop_shared_directions_(
            pool["x"][:SHARED_DIRECTION_CALLS].flatten(0, 1), cfg.shared_directions)

    history, start_step, train_seconds, hard = [], 0, 0.0, None
    if checkpoint_dir is not None and not resume and accelerator.is_main_process:
        _clear_checkpoints(checkpoint_dir)
    if resume and checkpoint_dir is not None:
        state = load_checkpoint(checkpoint_dir, model, optimizer)
        if state is not None:
            if not _same_config(state.get("config"), cfg):
                raise ValueError(f"checkpoint in {checkpoint_dir} was written by a different config; "
                                 "use another --checkpoint-dir or drop --resume")
            start_step, history, train_seconds = state["step"], state["history"], state["train_seconds"]
            hard = None if state.get("hard_calls") is None else torch.tensor(state["hard_calls"])

    # the space that starts the number, scored before the digits (the easy and main tasks share the tokenizer)
    prefix_ids = scored_prefix(train_task, cfg.score_prefix, accelerator.device)
    model.train()
    _unwrap(model).base.eval()   # the frozen base stays in eval mode (no dropout)
    rank = accelerator.process_index
    bar = tqdm(range(start_step, stop), desc=f"recall ctrl={cfg.controller}", initial=start_step,
               total=stop, disable=not (progress and accelerator.is_main_process))
    for step in bar:
        t0 = time.time()
        step_seed = cfg.seed * 1_000_000 + step * accelerator.num_processes + rank
        calls = curriculum_calls(stages, step, cfg.steps, random.Random(f"curriculum/{cfg.seed}/{step}"))
        stage = "easy" if step < easy_steps else "main"
        distract = stage == "main" and step >= distractor_step
        pool = pools[stage]
        task = easy_task if stage == "easy" else main_tasks[step >= direct_step, distract]
        pool_size = 0 if pool is None else len(pool["ids"]) if distract else pool["clean"]
        crop = None if cfg.crop_filler is None else crop_plan(task, cfg.crop_filler, step_seed)
        batch = task.batch(calls, cfg.batch_size, seed=step_seed,
                           fact_at=None if crop is None else crop.fact_at).to(accelerator.device)
        features = None
        if cfg.hard_filler and stage == "main" and step > easy_steps and (step - easy_steps) % cfg.hard_every == 0:
            # re-rank the pool on the same episodes in every process (the seed leaves out the rank)
            hard = hard_filler_calls(filler_damage(model, pool, task, seed=cfg.seed * 1_000_000 + step))
        if pool is not None and calls > 2:   # filler calls from the pool (the batch records which)
            pick = draw_filler_calls(pool_size, (calls - 2, cfg.batch_size), step_seed,
                                     hard if stage == "main" else None, cfg.hard_filler).to(accelerator.device)
            batch.input_ids[:, 1:-1] = pool["ids"][pick].transpose(0, 1)
            features = [None] + [{"x": pool["x"][i], "entropy": None if pool["entropy"] is None else pool["entropy"][i]}
                                 for i in pick]
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss, logits, spaced = score_answer(model, batch, prefix_ids, features=features, bptt_calls=cfg.bptt_calls,
                                            crop=crop)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip else None
        optimizer.step()
        exact, digits = answer_metrics(logits.detach(), batch.answer)
        dt = time.time() - t0
        train_seconds += dt
        history.append({"step": step + 1, "calls": calls, "stage": stage, "loss": round(loss.item(), 5),
                        "exact_match": exact.float().mean().item(), "digit_accuracy": digits.float().mean().item(),
                        "prefix_accuracy": spaced,
                        "digit_position_accuracy": [round(x, 4) for x in digits.float().mean(0).tolist()],
                        "grad_norm": None if grad_norm is None else round(float(grad_norm), 5),
                        "lr": _lr_at(step, cfg), "seconds": round(dt, 3)})
        bar.set_postfix(loss=f"{loss.item():.3f}", N=calls, em=f"{exact.float().mean().item():.2f}")
        if checkpoint_dir is not None and accelerator.is_main_process and (step + 1) % cfg.log_every == 0:
            write_json_atomic(Path(checkpoint_dir) / "progress.json", {"steps": cfg.steps, "history": history})
        if checkpoint_dir is not None and accelerator.is_main_process and (
                (step + 1) % cfg.checkpoint_every == 0 or step + 1 == stop):
            save_checkpoint(checkpoint_dir, accelerator.unwrap_model(model), optimizer, step + 1,
                            {"config": jsonable(asdict(cfg)), "history": history, "train_seconds": train_seconds,
                             "hard_calls": None if hard is None else hard.tolist()})
    bar.close()

    result = {"config": jsonable(asdict(cfg)), "cortex_config": json.loads(cfg.cortex_config().to_json()),
              "train_seconds": round(train_seconds, 1), "steps_run": len(history),
              "filler_pool_seconds": round(pool_seconds, 1),
              **({"stopped_at": len(history)} if len(history) < cfg.steps else {}),
              "seeds": {"init": cfg.seed, "train_batches": "seed * 1e6 + step (split 'train')",
                        "eval": EVAL_SEED},
              "data": {"train": train_task.describe(), "heldout": heldout.describe(),   # file lists: disjoint splits
                       "easy": None if easy_task is None else {**easy_task.describe(), "steps": easy_steps},
                       "direct_from_step": direct_step if cfg.direct_from else None,
                       "distracted": None if distracted_task is None else {
                           **distracted_task.describe(), "from_step": distractor_step, "pool_calls": None
                           if pools["main"] is None else len(pools["main"]["ids"]) - pools["main"]["clean"]}},
              "history": history}
    unwrapped = accelerator.unwrap_model(model)
    if evaluate and accelerator.is_main_process and len(history) == cfg.steps:
        t0 = time.time()
        eval_set = RecallEvalSet(unwrapped, heldout, distances=cfg.eval_distances, examples=cfg.eval_examples,
                                 batch_size=cfg.eval_batch_size, progress=progress)
        result["eval"] = evaluate_recall(unwrapped, eval_set, progress=progress)
        result["eval_set"] = eval_set.describe()
        if cfg.generation_distances:   # what a chat would see: the model writes the answer itself
            result["generation"] = {"exact_match": evaluate_generation(
                unwrapped, heldout, distances=cfg.generation_distances, examples=cfg.generation_examples,
                batch_size=cfg.eval_batch_size), "examples": cfg.generation_examples, "seed": EVAL_SEED}
        result["eval_seconds"] = round(time.time() - t0, 1)
    result["wall_seconds"] = round(time.time() - t_start, 1)
    result["model"] = unwrapped
    result["tokenizer"] = tokenizer
    return result


def training_curve(history: list[dict], window: int = 25) -> list[tuple[int, float]]:
    """(last step, mean exact match) of each run of `window` training steps in a recall run's history."""
    check_int("window", window)
    return _window_means(history, window, lambda h: h["exact_match"])


def digit_curves(history: list[dict], window: int = 25) -> list[list[tuple[int, float]]]:
    """One curve per answer digit i: (last step, mean accuracy of digit i on the training batches) of each run of
    `window` recorded steps. Shows what a plateau has learnt (the first digit alone, say) before the take-off.
    Steps recorded before histories held "digit_position_accuracy" are left out."""
    check_int("window", window)
    rows = [h for h in history if "digit_position_accuracy" in h]
    if not rows:
        raise ValueError("history records no digit_position_accuracy (a run from before it was recorded)")
    return [_window_means(rows, window, lambda h, i=i: h["digit_position_accuracy"][i])
            for i in range(len(rows[0]["digit_position_accuracy"]))]


def _window_means(rows: list[dict], window: int, value) -> list[tuple[int, float]]:
    """(last step, mean of value(row)) of each run of `window` consecutive rows of a history."""
    return [(rows[s + window - 1]["step"], sum(value(h) for h in rows[s:s + window]) / window)
            for s in range(0, len(rows) - window + 1, window)]


def takeoff_step(history: list[dict], *, threshold: float = 0.5, window: int = 25) -> int | None:
    """When the memory took off: the last step of the first run of `window` training steps whose mean
    exact match (teacher-forced, on the training batches) reaches `threshold`; None if none does."""
    check_number("threshold", threshold, 0, 1)
    return next((step for step, exact in training_curve(history, window) if exact >= threshold), None)


def _filler_pool(model, task: RecallTask, cfg: RecallTrainConfig, device, progress: bool,
                 distracted: RecallTask | None = None) -> dict | None:
    """cfg.filler_pool filler calls and their sidecar inputs, computed once (None: no pool), "clean" of them;
    a `distracted` task (distractors p) appends round(filler_pool * p / (1 - p)) calls that each carry its
    distractors, a share p of all."""
    if not cfg.filler_pool or single_sidecar_layer(model) is None:
        return None
    ids = task.filler_calls(cfg.filler_pool, seed=cfg.seed)
    if distracted is not None:
        p = distracted.distractors
        extra = round(cfg.filler_pool * p / (1 - p))
        ids = torch.cat([ids, distracted.with_distractors(1.0).filler_calls(extra, seed=cfg.seed)])
    return {**call_pool(model, ids.to(device), progress=progress), "clean": cfg.filler_pool}


def call_pool(model, ids: torch.Tensor, batch_size: int = 16, progress: bool = False) -> dict:
    """{"ids": ids [n, T], "x", "entropy"}: the `sidecar_inputs` of n calls, computed batch_size at a time."""
    from tqdm.auto import tqdm

    check_int("batch_size", batch_size)
    if ids.dim() != 2 or not len(ids):
        raise ValueError(f"ids must be [n >= 1, T] token ids, got shape {tuple(ids.shape)}")
    parts = [sidecar_inputs(model, ids[s:s + batch_size])
             for s in tqdm(range(0, len(ids), batch_size), desc="filler pool", disable=not progress, leave=False)]
    entropy = None if parts[0]["entropy"] is None else torch.cat([p["entropy"] for p in parts])
    return {"ids": ids, "x": torch.cat([p["x"] for p in parts]), "entropy": entropy}


HARD_SHARE = 8   # hard filler calls are the most damaging 1 / HARD_SHARE of the pool


@torch.no_grad()
def filler_damage(model, pool: dict, task: RecallTask, *, episodes: int = 4, seed: int = 0,
                  chunk: int = 16) -> torch.Tensor:
    """How much each pool call moves what the sidecar reads where the answer is predicted, [len(pool)]:

        damage(c) = mean over episodes e of |o_e(M_e + c) - o_e(M_e)|^2 / |o_e(M_e)|^2

    M_e: the memory after episode e's fact call (`task.batch(2, episodes, seed)`), M_e + c: after
    the pool call c as well; o_e(M): the sidecar's output over the positions of e's question call
    that predict the answer (and its prefix), read from M. Sidecar work only (the pool holds its
    inputs), so ranking a 1024-call pool takes about half a minute on 2 CPU threads: a filler call
    that overwrites the fact scores high. The single sidecar only (`sidecar_inputs`).
    """
    check_int("episodes", episodes)
    check_int("chunk", chunk)
    cortex = _unwrap(model)
    idx = single_sidecar_layer(model)
    if idx is None:
        raise ValueError(f"filler_damage needs a model with one sidecar layer, this one has {cortex.layer_ids}")
    block = cortex.sidecars[str(idx)]
    device = pool["x"].device
    batch = task.batch(2, episodes, seed=seed).to(device)
    fact, question = (sidecar_inputs(model, batch.input_ids[:, c]) for c in (0, 1))
    reads = len(task.answer_prefix) + task.key_digits + 1

    def read(state, n):   # the sidecar's output at the answer-predicting positions, n copies of each episode
        ent = question["entropy"]
        out = block(question["x"].repeat(n, 1, 1), state, None, None if ent is None else ent.repeat(n, 1))[0]
        return out[:, -reads:-1]

    was_training = block.training
    block.eval()
    try:
        _, after_fact = block(fact["x"], None, None, fact["entropy"])
        reference = read(after_fact, 1)
        norm = reference.pow(2).sum((1, 2)).clamp_min(torch.finfo(reference.dtype).tiny)   # a ghost sidecar: 0
        damage = []
        for start in range(0, len(pool["ids"]), chunk):
            n = min(chunk, len(pool["ids"]) - start)
            x = pool["x"][start:start + n].repeat_interleave(episodes, 0)      # call-major: [n * episodes, T, d]
            ent = None if pool["entropy"] is None else pool["entropy"][start:start + n].repeat_interleave(episodes, 0)
            state = {k: v.repeat(n, *[1] * (v.dim() - 1)) for k, v in after_fact.items()}
            _, state = block(x, state, None, ent)
            moved = (read(state, n) - reference.repeat(n, 1, 1)).pow(2).sum((1, 2)) / norm.repeat(n)
            damage.append(moved.view(n, episodes).mean(1))
    finally:
        block.train(was_training)
    return torch.cat(damage).cpu()


def draw_filler_calls(pool_size: int, shape: tuple[int, int], seed: int, hard: torch.Tensor | None = None,
                      hard_fraction: float = 0.0) -> torch.Tensor:
    """Pool indices [calls, batch] drawn uniformly; with `hard` given, each is replaced with probability
    `hard_fraction` by a uniform draw from `hard` (`hard_filler_calls`). Deterministic given the seed."""
    check_int("pool_size", pool_size)
    check_number("hard_fraction", hard_fraction, 0, 1)
    draw = torch.Generator().manual_seed(seed)
    pick = torch.randint(pool_size, shape, generator=draw)
    if hard is not None and hard_fraction:
        swap = torch.rand(shape, generator=draw) < hard_fraction
        pick[swap] = hard[torch.randint(len(hard), (int(swap.sum()),), generator=draw)]
    return pick


def hard_filler_calls(damage: torch.Tensor) -> torch.Tensor:
    """The pool indices of the most damaging 1 / HARD_SHARE of its calls (at least one)."""
    return damage.topk(max(1, len(damage) // HARD_SHARE)).indices


# ---------------------------------------------------------------------------------------
# command line


def _add_common(p: argparse.ArgumentParser) -> None:
    d = RecallTrainConfig()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                   help="cosine decay to this fraction of --lr after the warm-up (1: constant)")
    p.add_argument("--crop-filler", type=int, default=d.crop_filler,
                   help="train on fact and question calls cropped to at most this many filler tokens beside the "
                        "fact / before the question (much cheaper steps; default: whole calls)")
    p.add_argument("--score-prefix", action=argparse.BooleanOptionalAction, default=d.score_prefix,
                   help="score the space that starts the number with the digits (--no-score-prefix: the digits "
                        "alone, as runs before this option did)")
    p.add_argument("--curriculum", default=d.curriculum)
    p.add_argument("--bptt-calls", type=int, default=d.bptt_calls)
    p.add_argument("--easy-fraction", type=float, default=d.easy_fraction,
                   help="the first fraction of the steps uses easier episodes: shorter calls "
                        "(--easy-call-tokens) and --easy-filler")
    p.add_argument("--easy-call-tokens", type=int, default=d.easy_call_tokens)
    p.add_argument("--easy-filler", choices=FILLERS, default=d.easy_filler)
    p.add_argument("--filler-pool", type=int, default=d.filler_pool,
                   help="filler calls come from a pool of this many (0: fresh filler every step)")
    p.add_argument("--filler", choices=FILLERS, default=d.filler,
                   help="main-stage filler text (stdlib+packages: the train split's docstrings and the packages'; "
                        "the easy stage takes --easy-filler)")
    p.add_argument("--hard-filler", type=float, default=d.hard_filler,
                   help="main stage: this fraction of filler calls comes from the pool's most damaging eighth "
                        "(ranked by filler_damage after every --hard-every main steps; 0: uniform draws)")
    p.add_argument("--hard-every", type=int, default=d.hard_every,
                   help="rank the pool after every this many main steps (the first ones draw uniformly)")
    p.add_argument("--distractors", type=float, default=d.distractors,
                   help="the share of main-stage filler calls (and the probability for the fact and question calls' "
                        "filler spans, before --crop-filler crops most of them away) that carries other numbers "
                        "stated like facts ('The port number is 8025.'); the answer stays the pass key; the pool "
                        "grows by the distracted calls")
    p.add_argument("--distractors-from", type=float, default=d.distractors_from,
                   help="the fraction of the steps after which distractors start (before: none; not before the "
                        "easy stage ends)")
    p.add_argument("--distractor-kind", choices=DISTRACTOR_KINDS, default=d.distractor_kind,
                   help="all distractors, or the plain ones: code and prose numbers, without those framed like a "
                        "fact ('Remember this: the door code is 4071.')")
    p.add_argument("--templates", choices=TEMPLATES, default=d.templates,
                   help="fact and question templates of both stages (composed: every combination of their parts; "
                        "listed+direct: the listed ones and facts with the key right after 'pass key'; "
                        "listed+direct-composed: the listed ones and 72 such facts, 6 verbs x 12 endings after "
                        "the key; listed+direct-bridged: the same 72 with 7 bridges before the key in turn, "
                        "'pass key below: 40213')")
    p.add_argument("--direct-from", type=float, default=d.direct_from,
                   help="with --templates listed+direct(-composed/-bridged): the fraction of the steps after which the "
                        "direct facts join (before: the listed ones; not before the easy stage ends)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--call-tokens", type=int, default=d.call_tokens)
    p.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=d.layers)
    p.add_argument("--rank", type=int, default=d.rank_fast)
    p.add_argument("--heads", type=int, default=d.num_heads)
    p.add_argument("--hybrid", action=argparse.BooleanOptionalAction, default=d.use_hybrid,
                   help="add the sliding-window attention beside the memory (default off, as in the DESIGN probe)")
    p.add_argument("--conv-size", type=int, default=d.conv_size,
                   help="the memory's short conv taps: a key or query sees this many tokens (itself included)")
    p.add_argument("--conv-init", choices=CONV_INITS, default=d.conv_init,
                   help="how the memory's projections and conv start (induction: keys from the previous token, "
                        "queries from the current one; see CortexWrapConfig)")
    p.add_argument("--shared-directions", type=int, default=d.shared_directions,
                   help="project this many directions that every sidecar input shares (found in the filler pool) "
                        "out of the query and key projections at the start (0: none)")
    p.add_argument("--eval-distances", type=int_tuple, default=d.eval_distances)
    p.add_argument("--eval-examples", type=int, default=d.eval_examples)
    p.add_argument("--generation-distances", type=int_tuple,
                   default=d.generation_distances,
                   help="distances at which free generation is scored after training ('': none)")
    p.add_argument("--generation-examples", type=int, default=d.generation_examples)
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--checkpoint-dir", default=None,
                   help="where checkpoints go (default: <cortexlab cache>/runs/<name of --out>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")


def _config_from(args, controller: bool, seed: int | None = None) -> RecallTrainConfig:
    return RecallTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             min_lr_ratio=args.min_lr_ratio, crop_filler=args.crop_filler,
                             score_prefix=args.score_prefix,
                             curriculum=args.curriculum,
                             bptt_calls=args.bptt_calls, filler_pool=args.filler_pool, filler=args.filler,
                             templates=args.templates, direct_from=args.direct_from, hard_filler=args.hard_filler,
                             hard_every=args.hard_every,
                             distractors=args.distractors, distractors_from=args.distractors_from,
                             distractor_kind=args.distractor_kind,
                             easy_fraction=args.easy_fraction, easy_call_tokens=args.easy_call_tokens,
                             easy_filler=args.easy_filler, seed=args.seed if seed is None else seed,
                             call_tokens=args.call_tokens, layers=args.layers, rank_fast=args.rank,
                             num_heads=args.heads, controller=controller, use_hybrid=args.hybrid,
                             conv_size=args.conv_size, conv_init=args.conv_init,
                             shared_directions=args.shared_directions,
                             eval_distances=args.eval_distances, eval_examples=args.eval_examples,
                             generation_distances=args.generation_distances,
                             generation_examples=args.generation_examples,
                             eval_batch_size=args.eval_batch_size, checkpoint_every=args.checkpoint_every)


def _checkpoint_dir(args, name: str) -> Path:
    if args.checkpoint_dir:
        return Path(args.checkpoint_dir) / name
    from cortexlab.models import cache_dir

    return cache_dir() / "runs" / name


def _card(result: dict, out: Path) -> dict:
    return {"task": "recall across calls (cortexlab.data.recall)", "command": result["command"], "git": result["git"],
            "seeds": result["seeds"], "config": result["config"], "eval": result.get("eval"),
            "generation": result.get("generation"),
            "train_seconds": result["train_seconds"], "results_file": str(out)}


def _run_one(args, controller: bool, out: Path, adapter: Path | None, command: str, evaluate: bool = True,
             seed: int | None = None, stop_at: int | None = None) -> dict:
    """Train one variant; write its results JSON (and adapter + card.json); returns the results."""
    cfg = _config_from(args, controller, seed)
    result = train_recall(cfg, checkpoint_dir=_checkpoint_dir(args, out.stem), resume=args.resume,
                          progress=not args.no_progress, evaluate=evaluate, stop_at=stop_at)
    model = result.pop("model")
    result.pop("tokenizer")
    result.update(command=command, git=git_revision(), environment=environment())
    if adapter is not None and "stopped_at" not in result:
        save_adapter(model, adapter, _card(result, out))
        result["adapter"] = {"path": str(adapter), "bytes": (adapter / "cortex.safetensors").stat().st_size}
    write_json_atomic(out, result)
    return result


def _exact_table(ev: dict) -> dict:
    return {variant: {d: r["exact_match"] for d, r in per.items()}
            for variant, per in ev.items() if variant != "chance"}


ABLATION_RUNS = (("noctrl", False), ("ctrl", True))
# what is evaluated: reading -> (the run it reads, the field of that run's results that holds it)
ABLATION_READINGS = {"ctrl": ("ctrl", "eval"), "ctrl_neutralised": ("ctrl", "eval_neutralised"),
                     "noctrl": ("noctrl", "eval")}


def ablation_paths(out: Path, adapters: Path, name: str, seed: int) -> tuple[Path, Path]:
    """The results file and adapter folder of one ablation run (seed 0 keeps the unsuffixed names)."""
    suffix = "" if seed == 0 else f"_seed{seed}"
    stem = out.stem.removesuffix("_ablation")
    return out.with_name(f"{stem}_{name}{suffix}.json"), adapters / f"recall_{name}{suffix}"


def _same_config(previous: dict | None, cfg: RecallTrainConfig) -> bool:
    """Whether a saved run's config is `cfg`, up to the fields that only choose what is measured after training
    (`AFTER_TRAINING`); fields added since it was written count as their defaults."""
    if previous is None:
        return False
    defaults = {**jsonable(asdict(RecallTrainConfig())), "score_prefix": False}   # older runs scored the digits alone
    theirs = {**defaults, **previous}
    return all(theirs[k] == v for k, v in jsonable(asdict(cfg)).items() if k not in AFTER_TRAINING)


def _same_eval_set(previous: dict | None, cfg: RecallTrainConfig) -> bool:
    """Whether a run's recorded eval set is the held-out set `cfg` asks for."""
    previous = previous or {}
    return (previous.get("split"), previous.get("examples"), previous.get("seed"),
            list(previous.get("distances", ()))) == ("heldout", cfg.eval_examples, EVAL_SEED,
                                                    sorted(set(cfg.eval_distances)))


def _mean_table(tables: list[dict]) -> dict:
    """The per-distance mean of exact-match tables {variant: {distance: value}} (one per seed)."""
    return {variant: {d: sum(t[variant][d] for t in tables) / len(tables) for d in tables[0][variant]}
            for variant in tables[0]}


def _ablation(args, command: str) -> dict:
    """Train with and without the controller for every seed, then evaluate each (and the controller-trained
    one neutralised) on one held-out set; with --reuse, runs and evaluations already on disk are kept."""
    out, adapters = Path(args.out), Path(args.adapters)
    seeds = sorted(set(args.seeds))
    runs, files = {}, {}
    for seed in seeds:
        for name, controller in ABLATION_RUNS:
            files[seed, name], adapter = ablation_paths(out, adapters, name, seed)
            if args.reuse and files[seed, name].is_file() and (adapter / "cortex.safetensors").is_file():
                previous = json.loads(files[seed, name].read_text())
                if _same_config(previous.get("config"), _config_from(args, controller, seed)):
                    runs[seed, name] = previous
                    continue
            runs[seed, name] = _run_one(args, controller, files[seed, name], adapter, command, evaluate=False,
                                        seed=seed)

    # one held-out eval set (the frozen base's work done once) for every sidecar not yet evaluated
    cfg = _config_from(args, True)
    evals, todo, eval_set, eval_set_seconds = {}, [], None, None
    for seed in seeds:
        for reading, (name, result_key) in ABLATION_READINGS.items():
            run = runs[seed, name]
            if args.reuse and run.get(result_key) and _same_eval_set(run.get("eval_set"), cfg):
                evals[seed, reading] = run[result_key]
            else:
                todo.append((seed, reading))
    bare = next((ev["base"] for ev in evals.values() if ev.get("base")), None)   # the same for every sidecar
    if todo or bare is None:
        from cortexlab.models import load_base_model

        base, tokenizer = load_base_model()
        heldout = RecallTask(tokenizer, "heldout", call_tokens=cfg.call_tokens, key_digits=cfg.key_digits)
        for seed, reading in todo or [(seeds[0], "ctrl")]:   # nothing left but the bare model: measure it once
            name, result_key = ABLATION_READINGS[reading]
            model = attach_cortex(base, _config_from(args, name == "ctrl").cortex_config())
            model.load_cortex(ablation_paths(out, adapters, name, seed)[1])
            if eval_set is None:
                t0 = time.time()
                eval_set = RecallEvalSet(model, heldout, distances=cfg.eval_distances, examples=cfg.eval_examples,
                                         batch_size=cfg.eval_batch_size, progress=not args.no_progress)
                eval_set_seconds = round(time.time() - t0, 1)
            if reading == "ctrl_neutralised":
                neutralise_controller_(model)
            if not todo:
                variants = ("base",)
            else:
                variants = ("sidecar", "reset") if bare else ("sidecar", "reset", "base")
            t0 = time.time()
            ev = evaluate_recall(model, eval_set, variants=variants, progress=not args.no_progress)
            model.detach()
            bare = bare or ev["base"]
            if todo:
                evals[seed, reading] = ev
                run = runs[seed, name]
                run["eval_set"], run[f"{result_key}_seconds"] = eval_set.describe(), round(time.time() - t0, 1)
    for (seed, reading), ev in evals.items():   # every run file and adapter card gets its evaluation and the bare row
        ev["base"] = bare
        name, result_key = ABLATION_READINGS[reading]
        runs[seed, name][result_key] = ev
    for (seed, name), run in runs.items():
        write_json_atomic(files[seed, name], run)
        write_json_atomic(ablation_paths(out, adapters, name, seed)[1] / "card.json", _card(run, files[seed, name]))

    by_seed = {seed: {"controller_trained": _exact_table(evals[seed, "ctrl"]),
                      "no_controller_trained": _exact_table(evals[seed, "noctrl"]),
                      "controller_trained_neutralised_at_test": _exact_table(evals[seed, "ctrl_neutralised"])}
               for seed in seeds}
    first = runs[seeds[0], "ctrl"]
    combined = {
        "experiment": "controller ablation on recall across calls (frozen SmolLM2-135M-Instruct + one sidecar)",
        "command": command, "git": git_revision(), "environment": environment(),
        "config": {name: runs[seeds[0], name]["config"] for name, _ in ABLATION_RUNS},
        "seeds": {**first["seeds"], "init": seeds},
        "metric": "teacher-forced exact match of all answer digits (argmax at each of the 5 positions) on held-out "
                  "episodes (filler files, phrasings and seeds disjoint from training); distance = calls between "
                  "the fact call and the question call; 'base' = bare SmolLM2, 'reset' = sidecar with its memory "
                  "emptied before the question call (both see only the question call for distance >= 1); "
                  "exact_match is the mean over the seeds, exact_match_by_seed each seed's",
        "eval_set": first["eval_set"] if eval_set is None else eval_set.describe(),
        "exact_match": {**{reading: _mean_table([by_seed[seed][reading] for seed in seeds])
                           for reading in by_seed[seeds[0]]}, "chance": 10.0 ** -cfg.key_digits},
        "exact_match_by_seed": {str(seed): table for seed, table in by_seed.items()},
        "eval": {f"{name}_seed{seed}": ev for (seed, name), ev in evals.items()},
        "train_seconds": {f"{name}_seed{seed}": run["train_seconds"] for (seed, name), run in runs.items()},
        "eval_seconds": {**({} if eval_set_seconds is None else {"eval_set": eval_set_seconds}),
                         **{f"{reading}_seed{seed}": runs[seed, name].get(f"{result_key}_seconds")
                            for seed in seeds for reading, (name, result_key) in ABLATION_READINGS.items()}},
        "curves": {f"{name}_seed{seed}": [{k: h[k] for k in ("step", "calls", "loss", "exact_match", "seconds")}
                                          for h in run["history"]] for (seed, name), run in runs.items()},
        "adapters": {f"{name}_seed{seed}": run.get("adapter") for (seed, name), run in runs.items()},
        "runs": {f"{name}_seed{seed}": str(f) for (seed, name), f in files.items()},
    }
    write_json_atomic(out, combined)
    return combined


def add_cli(sub) -> None:
    """The subcommands "recall" and "recall-ablation" of `python -m cortexlab.train`."""
    p = sub.add_parser("recall", help="train one sidecar on recall across calls and evaluate it")
    p.add_argument("--controller", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--adapter", default=None, help="save the trained sidecar here (save_cortex + card.json)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after this many of the --steps steps (a probe of the run's start: no evaluation, "
                        "no adapter; --resume finishes it)")
    _add_common(p)
    p.set_defaults(run=run_cli)
    p = sub.add_parser("recall-ablation", help="the controller ablation: train with and without the controller")
    p.add_argument("--out", required=True, help="combined results JSON")
    p.add_argument("--adapters", default="results/adapters",
                   help="folder for recall_ctrl/ and recall_noctrl/ (recall_ctrl_seedN/ ... for seeds other than 0)")
    p.add_argument("--reuse", action="store_true",
                   help="reuse a run's existing results + adapter (and its evaluation) when its config matches")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0],
                   help="train both variants once per seed (e.g. 0,1,2); --seed is ignored")
    _add_common(p)
    p.set_defaults(run=run_cli)


def run_cli(args, command: str) -> dict:
    """Run a recall recipe from parsed arguments; returns the exact-match table it printed."""
    if args.recipe == "recall":
        out = Path(args.out)
        result = _run_one(args, args.controller, out, Path(args.adapter) if args.adapter else None, command,
                          stop_at=args.stop_at)
        if "stopped_at" in result:
            return {"out": str(out), "stopped_at": result["stopped_at"], "took_off_at": takeoff_step(result["history"])}
        return {"out": str(out), "exact_match": _exact_table(result["eval"])}
    return _ablation(args, command)["exact_match"]

