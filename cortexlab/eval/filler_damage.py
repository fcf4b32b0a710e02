"""Which filler text erases E2's pass key: every window of the filler modules ranked by `filler_damage`.

    python -m cortexlab.eval.filler_damage    (-> results/filler_damage.json)

`cortexlab.train.filler_damage` scores a call by how far writing it moves what the trained sidecar reads
where the answer is predicted (sidecar work only). Here every whole call of each split's modules
(`filler_windows`) is scored on the same held-out episodes, and the top calls of each split, beside random
ones, are checked against the loss itself (`answer_damage`: the answer's log-probability after the fact
call, the call written `repeats` times, then the question call). A held-out gap that grows with the filler
written shows up here as a few calls that move the read-out far more than the rest.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from cortexlab.checks import check_int
from cortexlab.data.recall import SPLITS, RecallTask, filler_windows
from cortexlab.results import FIRST_RECALL_ADAPTER

__all__ = ["answer_damage", "window_damage"]


@torch.no_grad()
def window_damage(model, task: RecallTask, ids: torch.Tensor, *, episodes: int = 4, seed: int = 0,
                  batch_size: int = 16) -> torch.Tensor:
    """`filler_damage` of each call in `ids` [n, T] (its sidecar inputs computed here), [n]."""
    from cortexlab.train.recall import call_pool, filler_damage

    pool = call_pool(model, ids.to(next(model.parameters()).device), batch_size)
    return filler_damage(model, pool, task, episodes=episodes, seed=seed)


@torch.no_grad()
def answer_damage(model, task: RecallTask, call: torch.Tensor, *, episodes: int = 8, seed: int = 0,
                  repeats: int = 4) -> dict:
    """What writing `call` [T] `repeats` times between the fact and the question costs the answer:
    {"nats": mean over episodes of log p(key | fact, question) - log p(key | fact, call x repeats, question)
    (summed over the key's digits), "exact_match": the fraction of episodes still answered exactly}."""
    from cortexlab.train.recall import advance_memory, question_logits

    check_int("repeats", repeats)
    check_int("episodes", episodes)
    device = next(model.parameters()).device
    batch, call = task.batch(2, episodes, seed=seed).to(device), call.to(device)
    after_fact = advance_memory(model, None, input_ids=batch.input_ids[:, 0])
    memory = after_fact
    for _ in range(repeats):
        memory = advance_memory(model, memory, input_ids=call.expand(episodes, -1))

    def read(mem):
        logits = question_logits(model, batch.input_ids[:, -1], mem, task.key_digits).log_softmax(-1)
        return logits.gather(-1, batch.answer[..., None]).squeeze(-1).sum(-1), (logits.argmax(-1) == batch.answer)

    clean, _ = read(after_fact)
    written, right = read(memory)
    return {"nats": round((clean - written).mean().item(), 4), "exact_match": right.all(-1).float().mean().item()}


def _split_report(model, tokenizer, task, split, *, top, episodes, seed, repeats) -> dict:
    windows = filler_windows(tokenizer, split, task.call_tokens)
    ids = torch.tensor([w[2] for w in windows])
    damage = window_damage(model, task, ids, episodes=episodes, seed=seed)
    by_file = defaultdict(list)
    for (name, _, _), d in zip(windows, damage.tolist()):
        by_file[name].append(d)

    def checked(i):
        name, start, window = windows[i]
        return {"file": name, "start_token": start, "damage": round(damage[i].item(), 6),
                "answer": answer_damage(model, task, ids[i], episodes=2 * episodes, seed=seed, repeats=repeats),
                "text": tokenizer.decode(window)}

    ranked = damage.argsort(descending=True).tolist()
    if len(ranked) < 2 * top:
        raise ValueError(f"top={top} needs at least {2 * top} calls in split {split!r}, it has {len(ranked)}")
    others = random.Random(f"filler_damage/{split}").sample(ranked[top:], top)
    share = damage[ranked[:max(1, len(ranked) // 100)]].sum() / damage.sum().clamp_min(1e-30)   # ghost: 0
    return {"windows": len(windows), "files": len(by_file),
            "damage": {"mean": round(damage.mean().item(), 6), "median": round(damage.median().item(), 6),
                       "max": round(damage.max().item(), 6), "top_percent_share": round(share.item(), 3)},
            "top": [checked(i) for i in ranked[:top]], "random": [checked(i) for i in others],
            "files_by_mean_damage": sorted(((round(sum(v) / len(v), 6), k, len(v)) for k, v in by_file.items()),
                                           reverse=True)[:top]}


def main(argv: Sequence[str] | None = None) -> dict:
    from cortexlab.cortex import load_with_cortex
    from cortexlab.train import EVAL_SEED
    from cortexlab.train.common import environment, git_revision, write_json_atomic

    p = argparse.ArgumentParser(prog="python -m cortexlab.eval.filler_damage", description=__doc__.split("\n")[0])
    p.add_argument("--adapter", default=f"results/{FIRST_RECALL_ADAPTER}",
                   help="the E2 sidecar to read (default: the first committed one, which the committed readings used)")
    p.add_argument("--out", default="results/filler_damage.json")
    p.add_argument("--top", type=int, default=8, help="check this many top calls (and as many random ones)")
    p.add_argument("--episodes", type=int, default=4, help="episodes the ranking reads (twice as many check it)")
    p.add_argument("--repeats", type=int, default=4, help="times a checked call is written")
    p.add_argument("--seed", type=int, default=EVAL_SEED + 21)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    for name in ("top", "episodes", "repeats"):
        check_int(name, getattr(args, name))
    git_revision(refresh=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model = load_with_cortex(adapter=args.adapter)
    model.eval()
    config = json.loads((Path(args.adapter) / "card.json").read_text())["config"]
    task = RecallTask(model.tokenizer, "heldout", call_tokens=config["call_tokens"], key_digits=config["key_digits"])
    splits = {split: _split_report(model, model.tokenizer, task, split, top=args.top, episodes=args.episodes,
                                   seed=args.seed, repeats=args.repeats) for split in SPLITS}
    command = "python -m cortexlab.eval.filler_damage " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"experiment": "E2: which filler calls erase the pass key (filler_damage, checked on the answer)",
              "adapter": args.adapter, "episodes": {"split": "heldout", "seed": args.seed, "ranking": args.episodes,
                                                    "check": 2 * args.episodes, "repeats": args.repeats},
              "splits": splits, "seconds": round(time.time() - t0, 1), "command": command, "git": git_revision(),
              "environment": environment()}
    write_json_atomic(Path(args.out), result)
    for split, report in splits.items():
        print(split, report["damage"], [(t["file"], t["damage"], t["answer"]) for t in report["top"][:4]])
    return result


if __name__ == "__main__":
    main()
