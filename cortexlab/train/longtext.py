"""E3: loss by token position on long held-out documents, read in segments: does memory make later tokens cheaper?

    python -m cortexlab.train longtext    (-> results/longtext_loss.json, results/adapters/longtext/)

A frozen base model (the bundled SmolLM2-135M-Instruct) reads a document in segments of S tokens and its own
context restarts at every segment, as in a chat whose window is S tokens; a Cortex sidecar (the hybrid block:
gated-delta memory + sliding window, both carried from segment to segment) is the only thing that crosses a
segment boundary. Every token t >= 1 is scored by the next-token loss -log p(x_t | what the model can see):

    base (segments)      the base alone; at token t it sees only t's own segment (the floor the memory starts from)
    sidecar (segments)   base + trained sidecar, memory carried through all earlier segments
    sidecar (reset)      the same sidecar with its memory emptied at every segment: what it adds within a
                         segment alone, so that sidecar (segments) below it is what crossed the boundaries
    base (full context)  the base reading the whole prefix x_0..x_{t-1} at once (what a perfect memory could reach)

Loss j scores token j + 1 from position j. In the segmented variants position j sees only its own segment up to
j (j mod S + 1 tokens), so "base (segments)" is a sawtooth of period S, high just after each boundary; a memory
that helps pulls it down there and keeps lowering the later segments. That is the honest form of "inverse
scaling": more text read, lower loss per token.

Training (`train_longtext`, on `accelerate`): windows of K S + 1 tokens at random places in the training split's
modules (`cortexlab.data.stdlib_documents`; held-out modules never seen); the memory is carried through the K
segments with gradients (backprop through time over the window); loss: mean next-token cross-entropy over every
scored token; AdamW on the sidecar only, warm-up then cosine decay. Evaluation: the first N S + 1 tokens of each
held-out module long enough, the three variants above, the mean loss at each position and per segment.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from cortexlab.checks import check_int, check_number
from cortexlab.cortex import CortexWrapConfig, attach_cortex
from cortexlab.data import stdlib_documents

from .common import environment, evaluation_mode, git_revision, jsonable, warmup_cosine_lr, write_json_atomic

__all__ = ["LongTextConfig", "carried_gain_by_offset", "evaluate_longtext", "full_context_losses", "random_windows",
           "segment_losses", "train_longtext"]

VARIANTS = ("base_segments", "sidecar_segments", "sidecar_reset", "base_full_context")


@dataclass
class LongTextConfig:
    """Everything that determines an E3 run (saved in its results file)."""

    segment_tokens: int = 128
    train_segments: int = 4
    eval_segments: int = 16
    eval_docs: int = 16
    steps: int = 300
    batch_size: int = 4
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    grad_clip: float = 1.0
    seed: int = 0
    # the sidecar (CortexWrapConfig fields)
    layers: list[int] = field(default_factory=lambda: [12])
    rank_fast: int = 64
    num_heads: int = 4
    controller: bool = True
    use_hybrid: bool = True
    window_size: int = 128
    window_norm: bool = True

    def __post_init__(self):
        for name in ("segment_tokens", "train_segments", "eval_segments", "eval_docs", "steps", "batch_size"):
            check_int(name, getattr(self, name))
        check_int("warmup_steps", self.warmup_steps, 0)
        check_number("lr", self.lr, 0, low_open=True)
        check_number("min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_number("grad_clip", self.grad_clip, 0, allow_inf=True)   # inf: no clipping
        self.cortex_config()   # an invalid sidecar setting fails here

    def cortex_config(self) -> CortexWrapConfig:
        return CortexWrapConfig(layers=list(self.layers), rank_fast=self.rank_fast, num_heads=self.num_heads,
                                controller=self.controller, use_hybrid=self.use_hybrid, window_size=self.window_size,
                                window_norm=self.window_norm)


def _check_ids(ids: torch.Tensor, segment_tokens: int) -> int:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.int64:
        raise ValueError(f"ids must be an int64 [B, N * S + 1] tensor, got {getattr(ids, 'shape', ids)}")
    if not isinstance(segment_tokens, int) or segment_tokens < 1 or (ids.shape[1] - 1) % segment_tokens:
        raise ValueError(f"ids has {ids.shape[1]} tokens: need N * segment_tokens + 1 (segment_tokens="
                         f"{segment_tokens!r})")
    return (ids.shape[1] - 1) // segment_tokens


def segment_losses(model, ids: torch.Tensor, segment_tokens: int, *, disabled: bool = False,
                   carry: bool = True) -> torch.Tensor:
    """Next-token losses [B, N S] of reading ids [B, N S + 1] as N calls of S tokens, the memory carried.

    Loss j is -log p(ids[:, j + 1]); call c reads ids[:, c S:(c + 1) S] from the memory of calls 0..c-1.
    disabled: the bare base model (its context restarts every call and nothing crosses a boundary);
    carry=False: every call starts from an empty memory.
    Gradients flow through the carried memory unless run under no_grad.
    """
    n = _check_ids(ids, segment_tokens)
    losses, memory = [], None
    for c in range(n):
        part = ids[:, c * segment_tokens:(c + 1) * segment_tokens + 1]
        if disabled:
            with model.disabled():
                logits = model(part[:, :-1], use_cache=False).logits
        else:
            out = model(part[:, :-1], memory=memory if carry else None, use_cache=False)
            logits, memory = out.logits, out.memory
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), part[:, 1:].flatten(), reduction="none")
                      .view(part.shape[0], -1))
    return torch.cat(losses, dim=1)


@torch.no_grad()
def full_context_losses(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token losses [B, L - 1] of the bare base model reading ids [B, L] in one call (no segments)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"ids must be a [B, L >= 2] tensor, got {getattr(ids, 'shape', ids)}")
    with model.disabled():
        logits = model(ids[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(ids.shape[0], -1)


def random_windows(docs: list[torch.Tensor], batch_size: int, length: int, seed: int) -> torch.Tensor:
    """[batch_size, length] windows, each inside one document (a uniformly random document among those long
    enough, then a uniformly random offset), determined by `seed`."""
    usable = [d for d in docs if len(d) >= length]
    if not usable:
        raise ValueError(f"no document has {length} tokens")
    rng = random.Random(f"longtext/windows/{seed}")
    rows = []
    for _ in range(batch_size):
        doc = usable[rng.randrange(len(usable))]
        start = rng.randrange(len(doc) - length + 1)
        rows.append(doc[start:start + length])
    return torch.stack(rows)


@torch.no_grad()
def evaluate_longtext(model, docs: dict[str, torch.Tensor], segment_tokens: int, segments: int,
                      batch_size: int = 4) -> dict:
    """Per-position and per-segment mean loss of each variant (`VARIANTS`) on the first N S + 1 tokens of
    every document in `docs` ({name: ids}) that is long enough.

    Returns {"documents": [names], "segment_tokens": S, "positions": N S, "per_position": {variant: [N S floats]},
    "per_segment": {variant: [N floats]}, "mean": {variant: float}, "first_segment" / "later_segments":
    {variant: float}} (losses in nats; position j scores token j + 1).
    """
    length = segments * segment_tokens + 1
    names = [name for name, ids in docs.items() if len(ids) >= length]
    if not names:
        raise ValueError(f"no document has {length} tokens (segments={segments} x segment_tokens={segment_tokens})")
    sums = {v: torch.zeros(length - 1, dtype=torch.float64) for v in VARIANTS}
    with evaluation_mode(model):
        for s in range(0, len(names), batch_size):
            ids = torch.stack([docs[n][:length] for n in names[s:s + batch_size]])
            ids = ids.to(next(model.parameters()).device)
            sums["base_segments"] += segment_losses(model, ids, segment_tokens, disabled=True).sum(0).double().cpu()
            sums["sidecar_segments"] += segment_losses(model, ids, segment_tokens).sum(0).double().cpu()
            sums["sidecar_reset"] += segment_losses(model, ids, segment_tokens, carry=False).sum(0).double().cpu()
            sums["base_full_context"] += full_context_losses(model, ids).sum(0).double().cpu()
    per_position = {v: (t / len(names)) for v, t in sums.items()}
    per_segment = {v: t.view(segments, segment_tokens).mean(1) for v, t in per_position.items()}
    return {"documents": names, "segment_tokens": segment_tokens, "positions": length - 1,
            "per_position": {v: [round(x, 5) for x in t.tolist()] for v, t in per_position.items()},
            "per_segment": {v: [round(x, 5) for x in t.tolist()] for v, t in per_segment.items()},
            "mean": {v: round(t.mean().item(), 5) for v, t in per_position.items()},
            "first_segment": {v: round(t[0].item(), 5) for v, t in per_segment.items()},
            "later_segments": {v: round(t[1:].mean().item(), 5) if segments > 1 else None
                               for v, t in per_segment.items()}}


def carried_gain_by_offset(evaluation: dict, *, edges=(0, 8, 32)) -> dict[str, float]:
    """What the carried memory saves, by a token's offset inside its segment of S tokens, over the later segments:

        gain(band) = mean over positions j >= S with j mod S in band of  loss_reset(j) - loss_carried(j)

    (nats; positive: the memory from earlier segments helped). `evaluation` is `evaluate_longtext`'s result,
    which records S; the bands are [edges[i], edges[i + 1]) and [edges[-1], S). The first segment is left out:
    there both variants start empty.
    """
    if "segment_tokens" not in evaluation:
        raise ValueError("evaluation must be evaluate_longtext's result: it has no 'segment_tokens'")
    S = evaluation["segment_tokens"]
    check_int("evaluation['segment_tokens']", S)
    edges = list(edges)
    if not edges or edges[0] != 0 or any(a >= b for a, b in zip(edges, edges[1:])) or edges[-1] >= S:
        raise ValueError(f"edges must rise from 0 and stay below segment_tokens={S}, got {edges}")
    carried = torch.tensor(evaluation["per_position"]["sidecar_segments"], dtype=torch.float64)
    reset = torch.tensor(evaluation["per_position"]["sidecar_reset"], dtype=torch.float64)
    if len(carried) <= S or len(carried) % S:
        raise ValueError(f"the evaluation has {len(carried)} positions: need whole segments of {S}, more than one")
    gap = (reset - carried)[S:].view(-1, S)
    bounds = edges + [S]
    return {f"{lo}-{hi - 1}": round(gap[:, lo:hi].mean().item(), 5) for lo, hi in zip(bounds, bounds[1:])}


def train_longtext(cfg: LongTextConfig, *, model=None, tokenizer=None, progress: bool = True,
                   accelerator=None, evaluate: bool = True, train_docs=None, heldout_docs=None) -> dict:
    """Train a sidecar on segment-by-segment next-token loss; returns a results dict (config, curve, eval).

    model/tokenizer: a `CortexModel` and its tokenizer (None: the bundled SmolLM2 with `cfg.cortex_config()`,
    the sidecar initialised from `cfg.seed`); train_docs / heldout_docs: {name: ids} (None: the stdlib splits).
    The trained model is returned under "model".
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    t_start = time.time()
    if model is None:
        from cortexlab.models import load_base_model

        base, tokenizer = load_base_model()
        torch.manual_seed(cfg.seed)
        model = attach_cortex(base, cfg.cortex_config())
    S, K = cfg.segment_tokens, cfg.train_segments
    if train_docs is None or heldout_docs is None:
        if tokenizer is None:
            raise ValueError("pass the tokenizer (or train_docs and heldout_docs) together with the model")
        train_docs = stdlib_documents(tokenizer, "train", min_tokens=K * S + 1)
        heldout_docs = stdlib_documents(tokenizer, "heldout", min_tokens=cfg.eval_segments * S + 1,
                                        max_docs=cfg.eval_docs)
    accelerator = accelerator or Accelerator()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    model.train()
    unwrapped.base.eval()
    docs = list(train_docs.values())
    history, train_seconds = [], 0.0
    bar = tqdm(range(cfg.steps), desc="longtext", disable=not (progress and accelerator.is_main_process))
    for step in bar:
        t0 = time.time()
        seed = cfg.seed * 1_000_000 + step * accelerator.num_processes + accelerator.process_index
        ids = random_windows(docs, cfg.batch_size, K * S + 1, seed).to(accelerator.device)
        lr = warmup_cosine_lr(step, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = segment_losses(model, ids, S)
        loss = losses.mean()
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip else None
        optimizer.step()
        per_segment = losses.detach().view(cfg.batch_size, K, S).mean((0, 2))
        dt = time.time() - t0
        train_seconds += dt
        history.append({"step": step + 1, "loss": round(loss.item(), 5),
                        "segment_loss": [round(x, 4) for x in per_segment.tolist()],
                        "grad_norm": None if grad_norm is None else round(float(grad_norm), 5),
                        "lr": lr, "seconds": round(dt, 3)})
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    result = {"config": jsonable(asdict(cfg)), "cortex_config": json.loads(unwrapped.config.to_json()),
              "train_seconds": round(train_seconds, 1), "steps_run": len(history),
              "seeds": {"init": cfg.seed, "train_windows": "seed * 1e6 + step"},
              "data": {"train": {"split": "train", "documents": list(train_docs), "window_tokens": K * S + 1,
                                 "tokens": sum(len(d) for d in docs)},
                       "heldout": {"split": "heldout", "documents": list(heldout_docs)}},
              "history": history}
    if evaluate and accelerator.is_main_process:
        t0 = time.time()
        result["eval"] = evaluate_longtext(unwrapped, heldout_docs, S, cfg.eval_segments)
        result["eval_seconds"] = round(time.time() - t0, 1)
    result["wall_seconds"] = round(time.time() - t_start, 1)
    result["model"] = unwrapped
    return result


# ---------------------------------------------------------------------------------------
# command line


def add_cli(sub) -> None:
    """The subcommand "longtext" of `python -m cortexlab.train`."""
    d = LongTextConfig()
    p = sub.add_parser("longtext", help="E3: train a sidecar on long stdlib text read in segments; loss by position")
    p.add_argument("--out", default="results/longtext_loss.json", help="results JSON")
    p.add_argument("--adapter", default="results/adapters/longtext", help="save the trained sidecar here")
    for name in ("segment_tokens", "train_segments", "eval_segments", "eval_docs", "steps", "batch_size", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=d.layers)
    p.add_argument("--no-window-norm", action="store_true",
                   help="the hybrid block without its window norm (as the committed E3 sidecar was trained)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run_cli)


def run_cli(args, command: str) -> dict:
    from .recall import save_adapter

    cfg = LongTextConfig(segment_tokens=args.segment_tokens, train_segments=args.train_segments,
                         eval_segments=args.eval_segments, eval_docs=args.eval_docs, steps=args.steps,
                         batch_size=args.batch_size, seed=args.seed, lr=args.lr, layers=args.layers,
                         window_norm=not args.no_window_norm)
    result = train_longtext(cfg, progress=not args.no_progress)
    model = result.pop("model")
    result.update(command=command, git=git_revision(), environment=environment())
    out = Path(args.out)
    if args.adapter:
        card = {"task": "E3 long-text loss by position (cortexlab.train.longtext)", "command": command,
                "git": result["git"], "config": result["config"], "results_file": str(out),
                "eval_mean": result.get("eval", {}).get("mean")}
        save_adapter(model, Path(args.adapter), card)
        result["adapter"] = {"path": args.adapter,
                             "bytes": (Path(args.adapter) / "cortex.safetensors").stat().st_size}
    write_json_atomic(out, result)
    ev = result.get("eval", {})
    return {"out": str(out), "mean": ev.get("mean"), "first_segment": ev.get("first_segment"),
            "later_segments": ev.get("later_segments")}
