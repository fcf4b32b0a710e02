"""The controller ablation on frozen SmolLM2: recall across calls when a later call gives a conflicting key.

    python -m cortexlab.train recall-conflicts --variant controller --out results/recall_conflicts_controller.json
    python -m cortexlab.train recall-conflicts --variant no_controller --out results/recall_conflicts_no_controller.json

Episodes (`RecallTask.conflict_batch`): call 1 gives pass key A, call 2 gives another key B in the same phrasings,
filler follows, and the last call asks for the pass key; the answer is A (the first key a session is given
counts). The base model's context restarts every call, so call 2 reads exactly like call 1 to everything but the
memory: a sidecar whose gates see only the current call cannot tell that it contradicts what it stored, while the
controller's surprise compares B's digits with what the memory recalls under the same context.

Both variants start from the same trained sidecar (`--adapter`, by default the controller-trained adapter of
`recall-ablation`, which already carries a key across calls) and train on the same batches for the same steps:
    "controller"      the adapter as trained, its controller on
    "no_controller"   the same weights with the controller removed (what the sidecar computes with it neutral)
Half the training episodes (`plain_fraction`) are ordinary recall episodes, so both must keep answering those.
The loss scores the space that starts the number as well as the digits (`score_prefix`, as in `recall`);
the committed results predate that and scored the digits alone (`--no-score-prefix`).
Readings on held-out episodes, before and after training: exact match on the first key ("first") and on the
conflicting one ("second") at each number of calls of `eval_calls`, and on plain episodes one call later; for the
controller variant also with its controller neutralised at test.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from cortexlab.checks import check_bool, check_int, check_number
from cortexlab.cortex import CortexModel, attach_cortex, load_with_cortex, neutralise_controller_
from cortexlab.data.recall import RecallTask

from .common import environment, evaluation_mode, git_revision, int_tuple, jsonable, warmup_cosine_lr, write_json_atomic
from .recall import answer_metrics, episode_forward, save_adapter, score_answer, scored_prefix

__all__ = ["VARIANTS", "ConflictFinetuneConfig", "conflict_readings", "finetune_on_conflicts",
           "sidecar_without_controller"]

VARIANTS = ("controller", "no_controller")
EVAL_SEED = 2_000_003


@dataclass
class ConflictFinetuneConfig:
    """One fine-tuning run (saved in its results file)."""

    adapter: str = "results/adapters/recall_ctrl"
    variant: str = "controller"
    steps: int = 150
    batch_size: int = 8
    lr: float = 2e-3
    controller_lr: float | None = None     # the controller's own rate (None: lr); see finetune_on_conflicts
    warmup_steps: int = 10
    grad_clip: float = 1.0
    calls: list[int] = field(default_factory=lambda: [3, 4])      # conflict episodes: N drawn from these
    plain_calls: list[int] = field(default_factory=lambda: [2, 3])
    plain_fraction: float = 0.5
    score_prefix: bool = True       # score the space that starts the number with the digits (`score_answer`);
                                    # runs saved before this field existed scored the digits alone, as False does
    seed: int = 0
    eval_calls: list[int] = field(default_factory=lambda: [3, 6])
    eval_examples: int = 96
    eval_batch_size: int = 16

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        for name in ("steps", "batch_size", "eval_examples", "eval_batch_size"):
            check_int(name, getattr(self, name))
        for name in ("warmup_steps", "seed"):
            check_int(name, getattr(self, name), 0)
        check_number("lr", self.lr, 0, low_open=True)
        check_number("controller_lr", self.controller_lr, 0, low_open=True, allow_none=True)
        if self.controller_lr is not None and self.variant != "controller":
            raise ValueError("controller_lr applies to the 'controller' variant only (the other has no controller)")
        check_number("grad_clip", self.grad_clip, 0)
        check_number("plain_fraction", self.plain_fraction, 0, 1)
        check_bool("score_prefix", self.score_prefix)
        for name, least in (("calls", 3), ("plain_calls", 2), ("eval_calls", 3)):
            values = getattr(self, name)
            if not values or any(not isinstance(n, int) or isinstance(n, bool) or n < least for n in values):
                raise ValueError(f"{name} must be a non-empty list of ints >= {least}, got {values!r}")


def sidecar_without_controller(model: CortexModel) -> CortexModel:
    """The same base and sidecar weights without the controller: what `model` computes with its controller
    neutralised. `model` gives up its base (its sidecars are detached) and must not be used afterwards."""
    weights = {k: v for k, v in model.sidecars.state_dict().items() if ".controller." not in k}
    tokenizer = getattr(model, "tokenizer", None)
    plain = attach_cortex(model.detach(), replace(model.config, controller=False))
    plain.sidecars.load_state_dict(weights)
    plain.tokenizer = tokenizer
    return plain


@torch.no_grad()
def conflict_readings(model, task: RecallTask, cfg: ConflictFinetuneConfig) -> dict:
    """Exact match on held-out episodes: {"conflict": {N: {"first", "second"}}, "plain": {N: exact}}."""
    out = {"conflict": {}, "plain": {}}
    n, bs = cfg.eval_examples, cfg.eval_batch_size
    with evaluation_mode(model):
        for calls in cfg.eval_calls:
            first = second = 0
            for s in range(0, n, bs):
                batch = task.conflict_batch(calls, min(bs, n - s), seed=EVAL_SEED + s)
                logits = episode_forward(model, batch)
                first += int(answer_metrics(logits, batch.answer)[0].sum())
                second += int(answer_metrics(logits, batch.second)[0].sum())
            out["conflict"][str(calls)] = {"first": round(first / n, 4), "second": round(second / n, 4)}
        right = 0
        for s in range(0, n, bs):
            batch = task.batch(2, min(bs, n - s), seed=EVAL_SEED + s)
            right += int(answer_metrics(episode_forward(model, batch), batch.answer)[0].sum())
        out["plain"]["2"] = round(right / n, 4)
    return out


def finetune_on_conflicts(cfg: ConflictFinetuneConfig, *, progress: bool = True) -> dict:
    """Fine-tune one variant from `cfg.adapter`; returns the results (readings before and after, the curve) with
    the trained model under "model"."""
    from tqdm.auto import tqdm

    t_start = time.time()
    model = load_with_cortex(adapter=cfg.adapter)
    if cfg.variant == "no_controller":
        model = sidecar_without_controller(model)
    elif not model.config.controller:
        raise ValueError(f"the adapter at {cfg.adapter} has no controller; the 'controller' variant needs one")
    tokenizer = model.tokenizer
    train_task, heldout = RecallTask(tokenizer, "train"), RecallTask(tokenizer, "heldout")
    result = {"config": jsonable(asdict(cfg)), "cortex_config": json.loads(model.config.to_json()),
              "before": conflict_readings(model, heldout, cfg)}
    # the controller's weights start at zero and must reach O(1) to act (in the MQAR ablation they ended near 3),
    # while Adam moves a weight by about lr per step: a short fine-tune can give them a larger rate of their own
    controller = [p for name, p in model.named_parameters() if p.requires_grad and ".controller." in name]
    rest = [p for name, p in model.named_parameters() if p.requires_grad and ".controller." not in name]
    params = rest + controller
    scale = (cfg.controller_lr or cfg.lr) / cfg.lr
    optimizer = torch.optim.AdamW([{"params": rest, "scale": 1.0}, {"params": controller, "scale": scale}],
                                  lr=cfg.lr, weight_decay=0.0)
    prefix_ids = scored_prefix(train_task, cfg.score_prefix)
    model.train()
    model.base.eval()
    history, t0 = [], time.time()
    for step in tqdm(range(cfg.steps), desc=f"conflicts {cfg.variant}", disable=not progress):
        rng = random.Random(f"conflicts/{cfg.seed}/{step}")
        step_seed = cfg.seed * 1_000_000 + step
        if rng.random() < cfg.plain_fraction:
            kind, batch = "plain", train_task.batch(rng.choice(cfg.plain_calls), cfg.batch_size, seed=step_seed)
        else:
            kind, batch = "conflict", train_task.conflict_batch(rng.choice(cfg.calls), cfg.batch_size, seed=step_seed)
        for group in optimizer.param_groups:   # warm-up, then flat
            group["lr"] = group["scale"] * warmup_cosine_lr(step, cfg.lr, cfg.steps, cfg.warmup_steps, 1.0)
        loss, logits, spaced = score_answer(model, batch, prefix_ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        history.append({"step": step + 1, "kind": kind, "calls": batch.num_calls, "loss": round(loss.item(), 5),
                        "exact_match": answer_metrics(logits.detach(), batch.answer)[0].float().mean().item(),
                        "prefix_accuracy": spaced})
    result["train_seconds"] = round(time.time() - t0, 1)
    result["history"] = history
    result["after"] = conflict_readings(model, heldout, cfg)
    if cfg.variant == "controller":   # the trained weights with the controller reset, then restored
        trained = {k: v.clone() for k, v in model.sidecars.state_dict().items()}
        result["controller_weights"] = {k: [round(x, 4) for x in v.flatten().tolist()]
                                        for k, v in trained.items() if ".controller." in k}
        neutralise_controller_(model)
        result["after_neutralised"] = conflict_readings(model, heldout, cfg)
        model.sidecars.load_state_dict(trained)
    result["eval"] = {"split": "heldout", "examples": cfg.eval_examples, "seed": EVAL_SEED}
    result["wall_seconds"] = round(time.time() - t_start, 1)
    result["model"] = model
    return result


# ---------------------------------------------------------------------------------------
# command line

def add_cli(sub) -> None:
    """The subcommand "recall-conflicts" of `python -m cortexlab.train`."""
    d = ConflictFinetuneConfig()
    p = sub.add_parser("recall-conflicts", help="the controller ablation on SmolLM2: keep the first pass key when "
                                                "a later call gives another")
    p.add_argument("--variant", choices=VARIANTS, required=True)
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--save-adapter", default=None, help="write the fine-tuned sidecar here")
    p.add_argument("--adapter", default=d.adapter, help="the trained sidecar both variants start from")
    for name in ("steps", "batch_size", "warmup_steps", "seed", "eval_examples", "eval_batch_size"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--controller-lr", type=float, default=d.controller_lr,
                   help="learning rate of the controller's weights (default: --lr)")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--plain-fraction", type=float, default=d.plain_fraction)
    p.add_argument("--score-prefix", action=argparse.BooleanOptionalAction, default=d.score_prefix,
                   help="score the space that starts the number as well as the digits (free generation needs it)")
    for name in ("calls", "plain_calls", "eval_calls"):
        p.add_argument("--" + name.replace("_", "-"), type=int_tuple, default=getattr(d, name))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run_cli)


def run_cli(args, command: str) -> dict:
    cfg = ConflictFinetuneConfig(**{name: getattr(args, name) for name in ConflictFinetuneConfig.__dataclass_fields__})
    result = finetune_on_conflicts(cfg, progress=not args.no_progress)
    model = result.pop("model")
    result.update(command=command, git=git_revision(), environment=environment())
    if args.save_adapter:
        card = {"task": "recall with a conflicting key (cortexlab.train.recall_conflicts)", "command": command,
                "config": result["config"], "after": result["after"]}
        save_adapter(model, args.save_adapter, card)
        result["adapter"] = str(args.save_adapter)
    write_json_atomic(Path(args.out), result)
    return {k: result[k] for k in ("before", "after", "after_neutralised", "train_seconds") if k in result}
