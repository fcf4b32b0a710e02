"""Where E2's held-out gap comes from: the trained sidecar on episodes whose filler and phrasing are crossed.

    python -m cortexlab.eval.recall_shift    (-> results/recall_shift.json)

E2 trains on the "train" split (filler text from one set of stdlib modules, one set of fact and question
templates) and is scored on "heldout" (other modules, other templates). `RecallTask(split, phrasing=...)` takes
the filler from one split and the templates from another, so the four crossings give four readings of
teacher-forced exact match vs distance (`recall_shift`); the gap between train/train and heldout/heldout
roughly splits into a filler part (heldout filler, train phrasing) and a phrasing part (train filler, heldout
phrasing), and the four readings also show any interaction. Every reading uses fresh episodes of whole calls
(`evaluate_recall`'s layout, seed `EVAL_SEED + 7` by default): train/train is the control for what else
differs from the training batches (their cropped fact and question calls, their pool of 1024 filler calls).
One standard error of a reading is sqrt(p (1 - p) / examples).

`--distractors p` reads the crossings with other numbers stated like facts in the filler
(`RecallTask(distractors=p)`, the filler split's distractor templates): whether the sidecar keeps the pass key
when the text between holds numbers too (`results/recall_shift_distractors*.json`). `--crossings` picks which
crossings are read ("heldout/heldout" is filler split / phrasing split).

`--by-template` reads, for each crossing F/P, every fact template of split P on its own (the questions from the
training templates) and every question template of P on its own (the facts from the training templates), on F's
filler (`template_tasks`): which of the phrasings carry the gap. `--facts T [T ...]` reads fact templates of one's
own choosing the same way, on the filler of each crossing's filler split (`fact_tasks`), e.g. a held-out fact with
its ending changed ("Memorise the pass key {key}." beside "Memorise the pass key {key} for later.").
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from cortexlab.checks import check_bool, check_int
from cortexlab.data.recall import SPLITS, RecallTask
from cortexlab.results import FIRST_RECALL_ADAPTER

__all__ = ["CROSSINGS", "check_crossings", "crossing_tasks", "fact_tasks", "read_tasks", "recall_shift",
           "template_tasks"]

CROSSINGS = tuple((filler, phrasing) for filler in SPLITS for phrasing in SPLITS)


def check_crossings(crossings) -> tuple[tuple[str, str], ...]:
    """The crossings as (filler split, phrasing split) pairs, each one of `CROSSINGS`, at least one."""
    try:
        pairs = tuple(tuple(c) for c in crossings)
    except TypeError:
        pairs = ()
    if not pairs or any(c not in CROSSINGS for c in pairs):
        raise ValueError(f"crossings must be a non-empty list of (filler, phrasing) pairs from {CROSSINGS}, "
                         f"got {crossings!r}")
    return pairs


def crossing_tasks(tokenizer, *, call_tokens: int, key_digits: int = 5, distractors: float = 0.0,
                   crossings=CROSSINGS) -> dict[str, RecallTask]:
    """{"filler=F,phrasing=P": the RecallTask with split F's filler (and distractors) and split P's templates}
    for each of `crossings`."""
    return {f"filler={filler},phrasing={phrasing}": RecallTask(tokenizer, filler, call_tokens=call_tokens,
                                                               key_digits=key_digits, phrasing=phrasing,
                                                               distractors=distractors)
            for filler, phrasing in check_crossings(crossings)}


def template_tasks(tokenizer, *, call_tokens: int, key_digits: int = 5, distractors: float = 0.0,
                   crossings=CROSSINGS) -> dict[str, RecallTask]:
    """For each crossing F/P: {"filler=F,fact=<template>": F's filler, one of P's fact templates, the training
    questions} for each of P's fact templates, and {"filler=F,question=<template>": ..., the training facts} for
    each of P's question templates."""
    tasks = {}
    for filler, phrasing in check_crossings(crossings):
        known = RecallTask(tokenizer, filler, call_tokens=call_tokens, key_digits=key_digits, phrasing="train",
                           distractors=distractors)
        split = RecallTask(tokenizer, filler, call_tokens=call_tokens, key_digits=key_digits, phrasing=phrasing)
        tasks.update({f"filler={filler},fact={t}": known.with_templates(facts=(t,)) for t in split.fact_templates})
        tasks.update({f"filler={filler},question={t}": known.with_templates(questions=(t,))
                      for t in split.question_templates})
    return tasks


def fact_tasks(tokenizer, facts, *, call_tokens: int, key_digits: int = 5, distractors: float = 0.0,
               crossings=CROSSINGS) -> dict[str, RecallTask]:
    """{"filler=F,fact=<template>": F's filler, this one fact template, the training questions} for each of
    `facts` (a list of templates, each with one "{key}") and each filler split F among `crossings`."""
    tasks = {}
    for filler in dict.fromkeys(f for f, _ in check_crossings(crossings)):
        known = RecallTask(tokenizer, filler, call_tokens=call_tokens, key_digits=key_digits, phrasing="train",
                           distractors=distractors)
        known.with_templates(facts=facts)   # checks the list as a whole (ValueError naming facts)
        tasks.update({f"filler={filler},fact={t}": known.with_templates(facts=(t,)) for t in facts})
    return tasks


def recall_shift(model, *, call_tokens: int, key_digits: int = 5, distances=(1, 8, 16), examples: int = 64,
                 batch_size: int = 16, seed: int | None = None, distractors: float = 0.0,
                 crossings=CROSSINGS, by_template: bool = False, facts=None) -> dict:
    """{"filler=F,phrasing=P": {str(d): {"exact_match", "digit_accuracy"}}} for each crossing of the splits
    (`crossing_tasks`; by_template: one reading per template instead, `template_tasks`; facts: one reading per given
    fact template, `fact_tasks`), read by `read_tasks`.
    model: a `CortexModel` with its tokenizer as `model.tokenizer` (as `load_with_cortex` gives it)."""
    check_bool("by_template", by_template)
    if by_template and facts is not None:
        raise ValueError("by_template reads the split's own templates and facts reads the given ones; pass one")
    shape = {"call_tokens": call_tokens, "key_digits": key_digits, "distractors": distractors, "crossings": crossings}
    if facts is not None:
        tasks = fact_tasks(model.tokenizer, facts, **shape)
    else:
        tasks = (template_tasks if by_template else crossing_tasks)(model.tokenizer, **shape)
    return read_tasks(model, tasks, distances=distances, examples=examples, batch_size=batch_size, seed=seed)


def read_tasks(model, tasks: dict, *, distances=(1, 8, 16), examples: int = 64, batch_size: int = 16,
               seed: int | None = None) -> dict:
    """{name: {str(d): {"exact_match", "digit_accuracy"}}}: `evaluate_recall`'s "sidecar" reading of each task,
    the memory carried through the calls, on the same episode seed (default EVAL_SEED + 7)."""
    from cortexlab.train import EVAL_SEED, evaluate_recall

    check_int("examples", examples)
    seed = EVAL_SEED + 7 if seed is None else seed
    readings = {}
    for name, task in tasks.items():
        ev = evaluate_recall(model, task, distances=distances, examples=examples, batch_size=batch_size, seed=seed,
                             variants=("sidecar",))
        readings[name] = {d: {k: r[k] for k in ("exact_match", "digit_accuracy")} for d, r in ev["sidecar"].items()}
    return readings


def _crossings(text: str) -> tuple[tuple[str, str], ...]:
    """'heldout/heldout,train/train' -> (("heldout", "heldout"), ("train", "train"))."""
    try:
        return check_crossings(tuple(part.split("/")) for part in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: Sequence[str] | None = None) -> dict:
    from cortexlab.cortex import load_with_cortex
    from cortexlab.train import EVAL_SEED
    from cortexlab.train.common import environment, git_revision, int_tuple, write_json_atomic

    p = argparse.ArgumentParser(prog="python -m cortexlab.eval.recall_shift", description=__doc__.split("\n")[0])
    p.add_argument("--adapter", default=f"results/{FIRST_RECALL_ADAPTER}",
                   help="the E2 sidecar to read (default: the first committed one, which the committed readings used)")
    p.add_argument("--out", default="results/recall_shift.json")
    p.add_argument("--distances", type=int_tuple, default=(1, 8, 16))
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--seed", type=int, default=EVAL_SEED + 7, help="episode seed (default: EVAL_SEED + 7)")
    p.add_argument("--distractors", type=float, default=0.0,
                   help="the probability that a filler span carries other numbers stated like facts")
    p.add_argument("--crossings", type=_crossings, default=CROSSINGS,
                   help="comma-separated filler/phrasing splits to read (default: all four)")
    p.add_argument("--by-template", action="store_true",
                   help="one reading per fact and per question template of each crossing's phrasing split")
    p.add_argument("--facts", nargs="+", metavar="TEMPLATE",
                   help="one reading per given fact template (with one {key}), on each crossing's filler split")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.by_template and args.facts:
        p.error("--by-template and --facts: pass one")
    git_revision(refresh=True)   # the code as the run starts
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model = load_with_cortex(adapter=args.adapter)
    config = json.loads((Path(args.adapter) / "card.json").read_text())["config"]
    shape = {"call_tokens": config["call_tokens"], "key_digits": config["key_digits"]}
    reading = {**shape, "distractors": args.distractors, "crossings": args.crossings}
    data = (fact_tasks(model.tokenizer, args.facts, **reading) if args.facts else
            (template_tasks if args.by_template else crossing_tasks)(model.tokenizer, **reading))
    readings = read_tasks(model, data, distances=args.distances, examples=args.examples, seed=args.seed)
    command = "python -m cortexlab.eval.recall_shift " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"experiment": "E2's held-out gap: filler and phrasing splits crossed (teacher-forced exact match)",
              "adapter": args.adapter, **shape, "distances": list(args.distances), "examples": args.examples,
              "seed": args.seed, "distractors": args.distractors, "by_template": args.by_template,
              "facts": args.facts, "readings": readings,
              "data": {name: task.describe() for name, task in data.items()},
              "seconds": round(time.time() - t0, 1), "command": command, "git": git_revision(),
              "environment": environment()}
    write_json_atomic(Path(args.out), result)
    print(json.dumps(readings, indent=1))
    return result


if __name__ == "__main__":
    main()
