"""Train NeuroLlama from scratch on real text, and the mechanism ablation (built on `accelerate`).

    python -m cortexlab.train neuro-lm --out results/neurollama_lm.json [--set enable_habituation=true ...]
    python -m cortexlab.train neuro-ablation --out results/neurollama_ablation.json [--variants baseline,hebbian]

Data: the Python standard library's sources (`cortexlab.data.TokenCorpus`), tokenised by a byte-level BPE
trained locally on the train split (`stdlib_tokenizer`); held-out modules are never trained on.
One step: a batch of `batch_size` random windows of `seq_len + 1` tokens, drawn from a generator seeded by
(seed, step), so a resumed run sees exactly the batches it would have seen.

    loss = CE(next token) + aux_loss        aux_loss: the model's own auxiliary objectives, when it reports any

AdamW, linear warm-up then cosine decay to `min_lr_ratio * lr`, gradient clipping. Evaluation: the mean next-token
cross-entropy (nats per token) over the first `eval_windows` consecutive held-out windows, every `eval_every` steps
and at the end (in eval mode: an early-exit model exits where it is confident, so its held-out loss includes its
exits); with early exit on, also the per-token saving/loss trade-off and the wall clock of real exits
(`cortexlab.eval.early_exit`). Checkpoints (model + optimizer as safetensors, trainer state as JSON) are
atomic; `--resume` continues from the latest one. `--model-out DIR` keeps the final model (`save_neurollama`:
fp16 weights, its config and a card), which `load_neurollama` rebuilds in fp32.

The ablation trains the same recipe (same seed, data and steps) once per variant of `ABLATION_VARIANTS`: every
mechanism off ("baseline") and each mechanism on alone, and reports the held-out loss of each beside the baseline.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from cortexlab.checks import check_int, check_number
from cortexlab.data.corpus import TokenCorpus, stdlib_tokenizer
from cortexlab.neuro.backbone import NeuroLlamaModel, create_neurollama
from cortexlab.neuro.config import NeuroLlamaConfig

from .common import (
    environment,
    git_revision,
    jsonable,
    read_checkpoint,
    warmup_cosine_lr,
    write_checkpoint,
    write_json_atomic,
)

__all__ = ["ABLATION_VARIANTS", "LMTrainConfig", "evaluate_lm", "load_neurollama", "load_neurollama_tokenizer",
           "save_neurollama", "train_lm", "train_lm_ablation"]

ABLATION_VARIANTS = {
    "baseline": {},
    "synaptic_static": {"enable_synaptic_modulation": True, "synaptic_mode": "static"},
    "synaptic_context": {"enable_synaptic_modulation": True, "synaptic_mode": "context_dependent"},
    "synaptic_matrix": {"enable_synaptic_modulation": True, "synaptic_mode": "full_matrix"},
    "columns": {"enable_cortical_columns": True, "enable_lateral_inhibition": True},
    "predictive_coding": {"enable_predictive_coding": True},
    "hebbian": {"enable_hebbian_attention": True},                       # the design's rate, hebbian_lr = 0.01
    "hebbian_strong": {"enable_hebbian_attention": True, "hebbian_lr": 0.1},
    "habituation": {"enable_habituation": True},
    "population": {"enable_population_coding": True},
    "early_exit": {"enable_early_exit": True},
}


@dataclass
class LMTrainConfig:
    """One NeuroLlama training run. `overrides` are `NeuroLlamaConfig` fields applied to `preset`."""

    preset: str = "small"
    overrides: dict = field(default_factory=dict)
    vocab_size: int = 2048
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 600
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 100
    eval_windows: int = 64
    eval_batch_size: int = 16
    checkpoint_every: int = 100
    max_train_files: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "batch_size", "steps", "eval_every", "eval_windows", "eval_batch_size",
                     "checkpoint_every"):
            check_int(name, getattr(self, name))
        check_int("warmup_steps", self.warmup_steps, 0)
        check_number("lr", self.lr, 0, low_open=True)
        check_number("min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_number("weight_decay", self.weight_decay, 0)
        check_number("grad_clip", self.grad_clip, 0, allow_inf=True)   # inf: no clipping
        self.model_config()   # an unknown preset or field, or an invalid value, fails here

    def model_config(self) -> NeuroLlamaConfig:
        return NeuroLlamaConfig.from_preset(self.preset, **{"vocab_size": self.vocab_size,
                                                            "max_seq_len": self.seq_len, **self.overrides})

    def lr_at(self, step: int) -> float:
        """Linear warm-up over `warmup_steps`, then cosine decay from lr to min_lr_ratio * lr at the last step."""
        return warmup_cosine_lr(step, self.lr, self.steps, self.warmup_steps, self.min_lr_ratio)


@torch.no_grad()
def evaluate_lm(model: NeuroLlamaModel, windows: torch.Tensor, batch_size: int = 16) -> dict:
    """Mean next-token cross-entropy (nats/token) and perplexity over `windows` [n, T+1], plus the loss by position.

    Returns {"loss", "perplexity", "tokens", "loss_by_position" (list of T means over the windows)}.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    for s in range(0, len(windows), batch_size):
        batch = windows[s:s + batch_size].to(device)
        logits = model(batch[:, :-1])["logits"].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        totals += nll.sum(0).double().cpu()
    model.train(was_training)
    by_position = totals / len(windows)
    loss = by_position.mean().item()
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(windows[:, 1:].numel()),
            "loss_by_position": [round(x, 5) for x in by_position.tolist()]}


def save_neurollama(model: NeuroLlamaModel, directory, card: dict, tokenizer=None,
                    dtype: torch.dtype = torch.float16) -> Path:
    """Write `model` to `directory`: model.safetensors (floating tensors cast to `dtype`, buffers such as the learnt
    lateral inhibition included), config.json (its NeuroLlamaConfig), card.json (`card`: how it was made) and,
    given a `tokenizers.Tokenizer`, tokenizer.json (so the folder is complete on any Python version)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
               for name, t in model.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(model.config.to_json())
    if tokenizer is not None:
        tokenizer.save(str(directory / "tokenizer.json"))
    write_json_atomic(directory / "card.json", card)
    return directory


def load_neurollama(directory) -> NeuroLlamaModel:
    """The model `save_neurollama` wrote to `directory`, rebuilt in fp32 and in eval mode."""
    directory = Path(directory)
    config = NeuroLlamaConfig.from_json((directory / "config.json").read_text())
    model = create_neurollama(config)
    model.load_state_dict({name: t.float() for name, t in load_file(str(directory / "model.safetensors")).items()})
    return model.eval()


def load_neurollama_tokenizer(directory):
    """The tokenizer saved beside a NeuroLlama (tokenizer.json), else `stdlib_tokenizer` of its vocabulary size
    (folders written before tokenizers were saved; that tokenizer is rebuilt per Python version)."""
    from tokenizers import Tokenizer

    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(directory / "tokenizer.json"))
    config = NeuroLlamaConfig.from_json((directory / "config.json").read_text())
    return stdlib_tokenizer(config.vocab_size)


def train_lm(cfg: LMTrainConfig, *, checkpoint_dir=None, resume: bool = False, progress: bool = True,
             accelerator=None) -> dict:
    """Train one NeuroLlama from `cfg`; returns the results dict, with the trained model under "model"."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    t_start = time.time()
    accelerator = accelerator or Accelerator()
    tokenizer = stdlib_tokenizer(cfg.vocab_size)
    train = TokenCorpus(tokenizer, "train", max_files=cfg.max_train_files)
    heldout = TokenCorpus(tokenizer, "heldout")
    windows = heldout.eval_windows(cfg.seq_len, cfg.eval_windows)
    torch.manual_seed(cfg.seed)
    model = create_neurollama(cfg.model_config())
    decay = [p for p in model.parameters() if p.dim() >= 2]          # matrices decay; norms and biases do not
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    history, evals, start, train_seconds = [], [], 0, 0.0
    checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
    if checkpoint_dir is not None and resume:
        state = read_checkpoint(checkpoint_dir, optimizer,
                                lambda d: load_model(unwrapped, str(d / "model.safetensors")))
        if state is not None:
            if state["config"] != jsonable(asdict(cfg)):
                raise ValueError(f"checkpoint in {checkpoint_dir} was written by a different config; "
                                 "use another --checkpoint-dir or drop --resume")
            start, history, evals, train_seconds = state["step"], state["history"], state["evals"], \
                state["train_seconds"]
    elif checkpoint_dir is not None and accelerator.is_main_process:   # a fresh run: drop this recipe's old checkpoints
        for old in checkpoint_dir.glob("step-*"):
            shutil.rmtree(old, ignore_errors=True)
        (checkpoint_dir / "latest.json").unlink(missing_ok=True)

    model.train()
    rank, world = accelerator.process_index, accelerator.num_processes
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="neurollama",
               disable=not (progress and accelerator.is_main_process))
    for step in bar:
        t0 = time.time()
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * world + rank)
        batch = train.random_batch(cfg.batch_size, cfg.seq_len, generator).to(accelerator.device)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        out = model(batch[:, :-1])
        lm_loss = torch.nn.functional.cross_entropy(out["logits"].float().flatten(0, 1), batch[:, 1:].flatten())
        aux = out.get("aux_loss")
        loss = lm_loss if aux is None else lm_loss + aux
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip else None
        optimizer.step()
        dt = time.time() - t0
        train_seconds += dt
        history.append({"step": step + 1, "loss": round(lm_loss.item(), 5),
                        "aux_loss": None if aux is None else round(float(aux.detach()), 5),
                        "grad_norm": None if grad_norm is None else round(float(grad_norm), 4),
                        "lr": cfg.lr_at(step), "seconds": round(dt, 3)})
        bar.set_postfix(loss=f"{lm_loss.item():.3f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            ev = evaluate_lm(unwrapped, windows, cfg.eval_batch_size)
            evals.append({"step": step + 1, "heldout_loss": round(ev["loss"], 5)})
        if checkpoint_dir is not None and accelerator.is_main_process and (
                (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            write_checkpoint(checkpoint_dir, step + 1, optimizer,
                             {"config": jsonable(asdict(cfg)), "history": history, "evals": evals,
                              "train_seconds": train_seconds},
                             lambda d: save_model(unwrapped, str(d / "model.safetensors")))
    bar.close()

    final = evaluate_lm(unwrapped, windows, cfg.eval_batch_size)
    early_exit = None
    if unwrapped.config.enable_early_exit:   # the saving the exit heads buy, and its cost in held-out loss
        from cortexlab.eval.early_exit import exit_tradeoff, exit_wall_clock

        early_exit = {"tradeoff": exit_tradeoff(unwrapped, windows, batch_size=cfg.eval_batch_size),
                      "wall_clock": exit_wall_clock(unwrapped, windows[:16])}
    return {"config": jsonable(asdict(cfg)), "model_config": json.loads(unwrapped.config.to_json()),
            "parameters": unwrapped.num_parameters(),
            "data": {"train": train.describe(), "heldout": heldout.describe(),
                     "eval_windows": len(windows), "tokenizer": f"byte-level BPE, {cfg.vocab_size} entries, "
                                                               "trained on the train split"},
            "heldout": final, "early_exit": early_exit, "evals": evals, "history": history,
            "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.time() - t_start, 1),
            "model": unwrapped}


def train_lm_ablation(cfg: LMTrainConfig, variants=None, *, seeds=(0,), checkpoint_root=None, resume: bool = False,
                      progress: bool = True, on_run=None) -> dict:
    """Train `cfg` once per variant (name -> NeuroLlamaConfig overrides) and seed; held-out loss vs the baseline.

    The table gives, per variant, the held-out loss per seed, its mean, and the mean of the paired differences
    to the baseline trained with the same seed. `on_run(partial_result)` is called after every run (e.g. to
    save progress).
    """
    variants = ABLATION_VARIANTS if variants is None else variants
    if "baseline" not in variants:
        raise ValueError(f"variants must include 'baseline' (every mechanism off), got {sorted(variants)}")
    if not seeds or not all(isinstance(x, int) for x in seeds):
        raise ValueError(f"seeds must be a non-empty sequence of ints, got {seeds!r}")
    runs: dict[str, dict[int, dict]] = {}
    for seed in seeds:
        for name, overrides in variants.items():
            run_cfg = LMTrainConfig(**{**asdict(cfg), "seed": seed, "overrides": {**cfg.overrides, **overrides}})
            folder = None if checkpoint_root is None else Path(checkpoint_root) / f"{name}-seed{seed}"
            result = train_lm(run_cfg, checkpoint_dir=folder, resume=resume, progress=progress)
            result.pop("model")
            runs.setdefault(name, {})[seed] = result
            if on_run is not None:
                on_run({"table": _ablation_table(runs), "runs": runs})
    return {"table": _ablation_table(runs), "runs": runs}


def _ablation_table(runs: dict) -> dict:
    """Per variant: held-out loss per seed and its mean; paired mean difference to the same-seed baseline."""
    base = {seed: r["heldout"]["loss"] for seed, r in runs.get("baseline", {}).items()}
    table = {}
    for name, by_seed in runs.items():
        losses = {seed: r["heldout"]["loss"] for seed, r in by_seed.items()}
        paired = [losses[seed] - base[seed] for seed in losses if seed in base]
        table[name] = {"heldout_loss": {str(seed): round(x, 5) for seed, x in losses.items()},
                       "mean_heldout_loss": round(sum(losses.values()) / len(losses), 5),
                       "mean_delta_vs_baseline": round(sum(paired) / len(paired), 5) if paired else None,
                       "final_train_loss": {str(seed): r["history"][-1]["loss"] for seed, r in by_seed.items()},
                       "parameters": next(iter(by_seed.values()))["parameters"],
                       "train_seconds": {str(seed): r["train_seconds"] for seed, r in by_seed.items()}}
    return table


# ---------------------------------------------------------------------------------------
# command line


def _parse_set(items: list[str]) -> dict:
    """--set field=value pairs -> NeuroLlamaConfig overrides (values parsed as JSON, else kept as strings)."""
    overrides = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects field=value, got {item!r}")
        try:
            overrides[name] = json.loads(value)
        except json.JSONDecodeError:
            overrides[name] = value
    return overrides


def add_cli(sub) -> None:
    """The subcommands "neuro-lm" and "neuro-ablation" of `python -m cortexlab.train`."""
    d = LMTrainConfig()
    for name, help_text in (("neuro-lm", "train NeuroLlama (small preset) on the stdlib sources and evaluate it"),
                            ("neuro-ablation", "train once per mechanism variant; held-out loss vs the baseline")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--out", required=True, help="results JSON")
        p.add_argument("--preset", default=d.preset)
        p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="NeuroLlamaConfig override (repeat)")
        for option in ("vocab_size", "seq_len", "batch_size", "steps", "warmup_steps", "seed", "eval_every",
                       "eval_windows", "checkpoint_every"):
            p.add_argument("--" + option.replace("_", "-"), type=int, default=getattr(d, option))
        p.add_argument("--lr", type=float, default=d.lr)
        p.add_argument("--max-train-files", type=int, default=None)
        p.add_argument("--checkpoint-dir", default=None,
                       help="checkpoints (default: <cortexlab cache>/runs/<name of --out>)")
        p.add_argument("--resume", action="store_true")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        p.add_argument("--no-progress", action="store_true")
        if name == "neuro-lm":
            p.add_argument("--model-out", default=None,
                           help="also write the final model here (fp16 model.safetensors, config.json, card.json)")
        if name == "neuro-ablation":
            p.add_argument("--variants", default=",".join(ABLATION_VARIANTS),
                           help=f"comma-separated subset of {', '.join(ABLATION_VARIANTS)}")
            p.add_argument("--seeds", default="0", help="comma-separated seeds; every variant is trained per seed")
        p.set_defaults(run=run_cli)


def run_cli(args, command: str) -> dict:
    """Run a NeuroLlama recipe from parsed arguments, write its results JSON; returns the summary it printed."""
    from cortexlab.models import cache_dir

    cfg = LMTrainConfig(preset=args.preset, overrides=_parse_set(args.set), vocab_size=args.vocab_size,
                        seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, lr=args.lr,
                        warmup_steps=args.warmup_steps, seed=args.seed, eval_every=args.eval_every,
                        eval_windows=args.eval_windows, checkpoint_every=args.checkpoint_every,
                        max_train_files=args.max_train_files)
    out = Path(args.out)
    checkpoints = Path(args.checkpoint_dir) if args.checkpoint_dir else cache_dir() / "runs" / out.stem
    meta = {"command": command, "git": git_revision(), "environment": environment()}
    if args.recipe == "neuro-lm":
        result = train_lm(cfg, checkpoint_dir=checkpoints, resume=args.resume, progress=not args.no_progress)
        model = result.pop("model")
        write_json_atomic(out, {**meta, **result})
        summary = {"out": str(out), "heldout_loss": result["heldout"]["loss"]}
        if args.model_out:
            card = {"command": command, "git": meta["git"], "results": str(out),
                    "heldout_loss": summary["heldout_loss"], "tokenizer": f"stdlib_tokenizer({cfg.vocab_size})",
                    "parameters": result["parameters"], "dtype": "float16"}
            summary["model_out"] = str(save_neurollama(model, args.model_out, card, stdlib_tokenizer(cfg.vocab_size)))
        return summary
    names = [n for n in args.variants.split(",") if n]
    unknown = sorted(set(names) - set(ABLATION_VARIANTS))
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; valid: {', '.join(ABLATION_VARIANTS)}")
    header = {**meta, "experiment": "NeuroLlama mechanism ablation (small preset, stdlib text)",
              "metric": "mean next-token cross-entropy (nats/token) on held-out stdlib modules"}
    seeds = [int(x) for x in args.seeds.split(",") if x]
    result = train_lm_ablation(cfg, {n: ABLATION_VARIANTS[n] for n in names}, seeds=seeds, checkpoint_root=checkpoints,
                               resume=args.resume, progress=not args.no_progress,
                               on_run=lambda partial: write_json_atomic(out, {**header, "complete": False, **partial}))
    write_json_atomic(out, {**header, "complete": True, **result})
    return {"out": str(out), "table": result["table"]}
