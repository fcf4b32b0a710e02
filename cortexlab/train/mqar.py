"""E1: multi-query associative recall (`cortexlab.data.mqar`), small models trained from scratch (on `accelerate`).

    python -m cortexlab.train mqar --out results/mqar_cpu.json [--quick]

Model (`MQARModel`): token embedding -> N x [x += mixer(norm(x)); x += MLP(norm(x))] -> norm -> head, with RMSNorm,
a GELU MLP and one of four sequence mixers (H heads of dimension D). Every mixer computes q, k, v through the same
causal short convolution (kernel 4) + SiLU that the sidecar's memory uses (`cortexlab.cortex.gdn.ShortConv`), so the
comparison is between ways of remembering, not between token shifts: without it, attention must first learn a
previous-token head and, on the CPU budget here, stalls at ~1/16 accuracy (it guesses among the 16 values in view).

    "attention"       o_t = sum_{j<=t} softmax_j(q_t.k_j / sqrt D) v_j          (RoPE on q, k)
    "sliding_window"  the same over t - W < j <= t     (`cortexlab.cortex.window.sliding_window_attention`)
    "gdn"             the Gated DeltaNet core: S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T,
                      o_t = S_t^T q_t   (`HybridCortexBlock` without the window: short conv, L2 q/k, output norm/gate)
    "hybrid"          m_t GDN_t + (1 - m_t) SWA_t, a learned per-head mix (`HybridCortexBlock`)

State per layer (numbers a recurrent model carries from token to token; `state_size`): GDN H D^2 (the memory matrix;
the short conv's 3 (K-1) H D tail is not counted); sliding window 2 (W-1) H D (its key/value cache); hybrid the sum;
full attention 2 L H D (its key/value cache at the end of the sequence).

Training: a fresh batch of train-split sequences every step (seeded by (seed, step), so a run is reproducible),
cross-entropy on the answer positions only, AdamW with linear warm-up then cosine decay, gradient clipping.
Evaluation: accuracy of the argmax at the answer positions of a held-out set (test-split seeds), every `eval_every`
steps; a run stops early once it reaches `stop_accuracy` ("target"), or with `patience`, once `patience`
evaluations in a row failed to beat its best accuracy by `min_delta`, but not before `min_steps` ("plateau": MQAR
is learnt in sudden jumps after long flat stretches, so a plateau rule needs that floor). Baselines beside every
result: chance (1 / number of values) and the same model before training.

The recipe trains a grid (`mqar_grid`): mixers x sequence lengths at a fixed number of pairs (accuracy vs length),
mixers x numbers of pairs at a fixed length (accuracy vs state capacity), each at several model sizes, and writes
the results JSON after every run (`--resume` keeps the finished runs of a matching grid).
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cortexlab.checks import check_int, check_number
from cortexlab.cortex import CortexWrapConfig, HybridCortexBlock
from cortexlab.cortex.gdn import ShortConv
from cortexlab.cortex.window import empty_window, sliding_window_attention
from cortexlab.data.mqar import IGNORE, MQARTask, chance_accuracy, split_seed
from cortexlab.neuro.backbone import apply_rope, rope_cos_sin

from .common import environment, git_revision, int_tuple, jsonable, warmup_cosine_lr, write_json_atomic

__all__ = ["MIXERS", "MQARModel", "MQARModelConfig", "MQARTrainConfig", "evaluate_mqar", "mqar_grid",
           "train_mqar", "train_mqar_grid"]

MIXERS = ("attention", "sliding_window", "gdn", "hybrid")
CONV_SIZE = CortexWrapConfig().conv_size   # the short conv every mixer shares with the sidecar
# The mixers' architecture as a number: bump it whenever a code change alters what a config trains (as the q/k/v
# short conv and the hybrid's window norm did), so that --resume trains again what an older revision produced.
# Results saved without it are revision 1.
MODEL_REVISION = 1


@dataclass(frozen=True)
class MQARModelConfig:
    """The model: `mixer` one of MIXERS; head_dim None means d_model // num_heads."""

    mixer: str = "gdn"
    vocab_size: int = 512
    d_model: int = 128
    num_heads: int = 2
    head_dim: int | None = None
    num_layers: int = 2
    mlp_ratio: int = 2
    window_size: int = 32
    rope_theta: float = 10_000.0
    controller: bool = False

    def __post_init__(self):
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {self.mixer!r}")
        if self.controller and self.mixer not in ("gdn", "hybrid"):
            raise ValueError(f"controller needs a memory mixer ('gdn' or 'hybrid'), got mixer={self.mixer!r}")
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "mlp_ratio", "window_size"):
            check_int(name, getattr(self, name))
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; set head_dim")
        check_int("head_dim", self.dim)
        if self.mixer in ("attention", "sliding_window") and self.dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.dim}")
        if self.window_size < 2 and self.mixer in ("sliding_window", "hybrid"):
            raise ValueError(f"window_size must be >= 2 for a window mixer, got {self.window_size}")

    @property
    def dim(self) -> int:
        """D, the per-head dimension."""
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

    def state_size(self, seq_len: int) -> int:
        """Numbers one layer's mixer carries between tokens at the end of a `seq_len` sequence (see module doc)."""
        H, D, W = self.num_heads, self.dim, self.window_size
        return {"attention": 2 * seq_len * H * D, "sliding_window": 2 * (W - 1) * H * D,
                "gdn": H * D * D, "hybrid": H * D * D + 2 * (W - 1) * H * D}[self.mixer]


class Attention(nn.Module):
    """Causal softmax attention with RoPE, full or over a sliding window of `window` tokens; q, k, v pass through
    the short conv (see the module doc)."""

    def __init__(self, cfg: MQARModelConfig, window: int | None):
        super().__init__()
        self.num_heads, self.head_dim, self.window, self.theta = cfg.num_heads, cfg.dim, window, cfg.rope_theta
        self.qkv_proj = nn.Linear(cfg.d_model, 3 * cfg.num_heads * cfg.dim, bias=False)
        self.conv = ShortConv(3 * cfg.num_heads * cfg.dim, CONV_SIZE)
        self.out_proj = nn.Linear(cfg.num_heads * cfg.dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        qkv, _ = self.conv(self.qkv_proj(x), None)
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        cos, sin = rope_cos_sin(torch.arange(T, device=x.device)[None], self.head_dim, self.theta, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)             # [B, H, T, D]
        if self.window is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            o, _ = sliding_window_attention(q, k, v, empty_window(B, self.num_heads, self.head_dim, self.window, q),
                                            None, self.window)
        return self.out_proj(o.flatten(-2))


class CortexMixer(nn.Module):
    """The sidecar's `HybridCortexBlock` as a plain mixer: the GDN core alone, or GDN + window ("hybrid"), with or
    without its metacognitive controller (here driven by the memory's surprise alone: no base model, no entropy)."""

    def __init__(self, cfg: MQARModelConfig):
        super().__init__()
        self.block = HybridCortexBlock(cfg.d_model, CortexWrapConfig(
            rank_fast=cfg.dim, num_heads=cfg.num_heads, use_hybrid=cfg.mixer == "hybrid",
            window_size=cfg.window_size, controller=cfg.controller))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)[0]


class Layer(nn.Module):
    """x + mixer(norm(x)), then + MLP(norm(.))."""

    def __init__(self, cfg: MQARModelConfig):
        super().__init__()
        self.mixer_norm, self.mlp_norm = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        window = {"attention": None, "sliding_window": cfg.window_size}
        self.mixer = Attention(cfg, window[cfg.mixer]) if cfg.mixer in window else CortexMixer(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model), nn.GELU(),
                                 nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class MQARModel(nn.Module):
    """embedding -> num_layers x Layer -> RMSNorm -> head; `forward(ids [B, T])` gives logits [B, T, V]."""

    def __init__(self, cfg: MQARModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final normalised hidden states [B, T, d_model]."""
        if input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            raise ValueError(f"input_ids must be int64 [B, T], got {input_ids.dtype} {tuple(input_ids.shape)}")
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        """logits [B, T, V]; with `labels`, (logits [n_answers, V], targets [n_answers]) at the answer positions
        only (the head runs nowhere else)."""
        if labels is None:
            return self.head(self.hidden(input_ids))
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(labels.shape)}")
        mask = labels != IGNORE
        return self.head(self.hidden(input_ids)[mask]), labels[mask]


@torch.no_grad()
def evaluate_mqar(model: MQARModel, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 64) -> dict:
    """Accuracy of the argmax at the answer positions: {"accuracy", "answers", "sequence_accuracy"}.

    sequence_accuracy: the fraction of sequences whose every answer is right.
    """
    check_int("batch_size", batch_size)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    right, total, whole = 0, 0, 0
    for s in range(0, len(inputs), batch_size):
        ids, lab = inputs[s:s + batch_size].to(device), labels[s:s + batch_size].to(device)
        mask = lab != IGNORE
        hits = (model(ids).argmax(-1) == lab) & mask
        right += int(hits.sum())
        total += int(mask.sum())
        whole += int((hits.sum(1) == mask.sum(1)).sum())
    model.train(was_training)
    return {"accuracy": right / total, "answers": total, "sequence_accuracy": whole / len(inputs)}


@dataclass(frozen=True)
class MQARTrainConfig:
    """One run: the task, the model (its vocab_size is the task's) and the optimisation."""

    task: MQARTask = field(default_factory=MQARTask)
    mixer: str = "gdn"
    d_model: int = 128
    num_heads: int = 2
    head_dim: int | None = None
    window_size: int = 32
    num_layers: int = 2
    controller: bool = False
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    test_size: int = 512
    eval_every: int = 100
    stop_accuracy: float | None = 0.99
    patience: int | None = None
    min_delta: float = 0.01
    min_steps: int = 0

    def __post_init__(self):
        if not isinstance(self.task, MQARTask):
            raise ValueError(f"task must be an MQARTask, got {type(self.task).__name__}")
        for name in ("steps", "batch_size", "test_size", "eval_every"):
            check_int(name, getattr(self, name))
        for name in ("warmup_steps", "seed", "min_steps"):
            check_int(name, getattr(self, name), 0)
        check_number("lr", self.lr, 0, low_open=True)
        check_number("min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_number("weight_decay", self.weight_decay, 0)
        check_number("grad_clip", self.grad_clip, 0, allow_inf=True)   # inf: no clipping
        check_number("stop_accuracy", self.stop_accuracy, 0, 1, low_open=True, allow_none=True)
        check_int("patience", self.patience, allow_none=True)
        check_number("min_delta", self.min_delta, 0, 1, high_open=True)
        self.model_config()   # an invalid model setting fails here

    def model_config(self) -> MQARModelConfig:
        return MQARModelConfig(mixer=self.mixer, vocab_size=self.task.vocab_size, d_model=self.d_model,
                               num_heads=self.num_heads, head_dim=self.head_dim, window_size=self.window_size,
                               num_layers=self.num_layers, controller=self.controller)

    def lr_at(self, step: int) -> float:
        """Linear warm-up over `warmup_steps`, then cosine decay from lr to min_lr_ratio * lr at the last step."""
        return warmup_cosine_lr(step, self.lr, self.steps, self.warmup_steps, self.min_lr_ratio)


def train_mqar(cfg: MQARTrainConfig, *, progress: bool = True, accelerator=None, on_step=None) -> dict:
    """Train one model from `cfg` and evaluate it on the held-out set; the result dict holds the model under "model".

    Result: "accuracy" (held-out, at the end), "untrained_accuracy", "chance", "steps" (taken), "stopped" (why
    training ended: "target" = reached `stop_accuracy`, "plateau" = ran out of `patience`, "steps"), "evals" (step,
    accuracy, mean train loss since the last eval), "state_size" (per layer), "parameters", "train_seconds".
    `on_step(steps_done, loss)`, if given, is called after every optimisation step (e.g. to drive a progress bar).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    accelerator = accelerator or Accelerator()
    task = cfg.task
    test_inputs, test_labels = task.sample(cfg.test_size, split_seed("test", cfg.seed))
    torch.manual_seed(cfg.seed)
    model = MQARModel(cfg.model_config())
    decay = [p for p in model.parameters() if p.dim() >= 2]          # matrices decay; norms and biases do not
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    untrained = evaluate_mqar(unwrapped, test_inputs, test_labels)["accuracy"]

    model.train()
    evals, losses, train_seconds, step = [], [], 0.0, 0
    best, stale, stopped = untrained, 0, "steps"
    rank, world = accelerator.process_index, accelerator.num_processes   # each process draws its own batches
    bar = tqdm(range(cfg.steps), desc=f"mqar {cfg.mixer} L={task.seq_len} P={task.num_pairs} d={cfg.d_model}",
               disable=not (progress and accelerator.is_main_process), leave=False)
    for step in bar:
        t0 = time.time()
        ids, labels = task.sample(cfg.batch_size, split_seed("train", cfg.seed, step * world + rank))
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        logits, targets = model(ids.to(accelerator.device), labels.to(accelerator.device))
        loss = F.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg.grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        train_seconds += time.time() - t0
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            final = evaluate_mqar(unwrapped, test_inputs, test_labels)
            accuracy = final["accuracy"]
            evals.append({"step": step + 1, "accuracy": round(accuracy, 5),
                          "train_loss": round(sum(losses) / len(losses), 5)})
            losses = []
            bar.set_postfix(loss=f"{evals[-1]['train_loss']:.3f}", acc=f"{accuracy:.3f}")
            if cfg.stop_accuracy is not None and accuracy >= cfg.stop_accuracy:
                stopped = "target"
                break
            best, stale = (accuracy, 0) if accuracy >= best + cfg.min_delta else (best, stale + 1)
            if cfg.patience is not None and stale >= cfg.patience and cfg.min_steps <= step + 1 < cfg.steps:
                stopped = "plateau"
                break
    bar.close()   # the loop ends right after an evaluation (the last step's, or the one that stopped the run)
    model_cfg = unwrapped.config
    return {"config": jsonable(asdict(cfg)), "model_config": jsonable(asdict(model_cfg)),
            "accuracy": round(final["accuracy"], 5), "sequence_accuracy": round(final["sequence_accuracy"], 5),
            "test_answers": final["answers"], "untrained_accuracy": round(untrained, 5),
            "chance": chance_accuracy(task), "steps": step + 1, "stopped": stopped, "evals": evals,
            "model_revision": MODEL_REVISION,
            "state_size": model_cfg.state_size(task.seq_len),
            "parameters": sum(p.numel() for p in unwrapped.parameters()),
            "train_seconds": round(train_seconds, 1), "model": unwrapped}


def mqar_grid(*, mixers=MIXERS, seq_lens=(64, 128, 256, 512), fixed_pairs: int = 16,
              pairs=(4, 8, 16, 32, 64), fixed_len: int = 256, sizes=((64, 2), (128, 2)),
              base: MQARTrainConfig | None = None) -> list[MQARTrainConfig]:
    """The E1 grid: every mixer and size at (seq_len, fixed_pairs) for each length ("length" sweep) and at
    (fixed_len, P) for each number of pairs ("capacity" sweep); a setting in both sweeps appears once.

    sizes: (d_model, num_heads) pairs, the state-size knob (GDN state H (d_model / H)^2 per layer).
    `base` gives everything else (vocabulary, window, optimisation, seed). Order: size by size (the first size's
    curves are complete before the next starts), the length sweep before the capacity sweep, shorter first.
    """
    base = base or MQARTrainConfig()
    settings = dict.fromkeys([(L, fixed_pairs) for L in seq_lens] + [(fixed_len, P) for P in pairs])
    return [replace(base, mixer=mixer, d_model=d, num_heads=H, task=replace(base.task, seq_len=L, num_pairs=P))
            for (d, H) in sizes for (L, P) in settings for mixer in mixers]


def train_mqar_grid(configs: list[MQARTrainConfig], *, done: list[dict] = (), progress: bool = True,
                    on_run=None, jobs: int = 1, threads: int = 1) -> list[dict]:
    """Train every config (skipping those whose result is in `done`, matched by config and MODEL_REVISION);
    returns the results, without their models, in the order of `configs`. `on_run(results so far)` is called
    after every run (e.g. to save progress), with the finished results in the order of `configs`.

    jobs > 1 trains that many configs at a time in worker processes with `threads` torch threads each (on a CPU,
    two 1-thread runs side by side finish sooner than one 2-thread run after another); `threads` applies to the
    workers only. A run's numbers do not depend on `jobs` (each is seeded by its own config); its train_seconds
    do. If a run fails, the queued ones are cancelled and the error is raised; the finished ones were saved.
    """
    from tqdm.auto import tqdm

    check_int("jobs", jobs)
    check_int("threads", threads)
    keys = [_key(jsonable(asdict(cfg)), MODEL_REVISION) for cfg in configs]
    finished = {_key(r["config"], r.get("model_revision", 1)): r for r in done}
    todo = [cfg for cfg, key in zip(configs, keys) if key not in finished]

    def record(result):
        finished[_key(result["config"], result["model_revision"])] = result
        if on_run is not None:
            on_run([finished[key] for key in keys if key in finished])

    if jobs == 1:
        from accelerate import Accelerator

        accelerator = Accelerator()
        for cfg in tqdm(todo, desc="mqar grid", disable=not progress):
            record(_train_without_model(cfg, progress=progress, accelerator=accelerator))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_start_worker, initargs=(threads, os.getpid())) as pool:
            futures = [pool.submit(_train_without_model, cfg) for cfg in todo]
            try:
                for future in tqdm(as_completed(futures), total=len(futures), desc="mqar grid", disable=not progress):
                    record(future.result())
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)   # a failed run drops the queued ones, not the saved
                raise
    return [finished[key] for key in keys]


def _start_worker(threads: int, parent: int) -> None:
    """A grid worker: `threads` torch threads, and it exits as soon as the process that started it is gone (a
    killed grid must not leave its runs training)."""
    torch.set_num_threads(threads)

    def watch_parent():
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(1)

    threading.Thread(target=watch_parent, daemon=True).start()


def _train_without_model(cfg: MQARTrainConfig, progress: bool = False, accelerator=None) -> dict:
    """One grid run, its model dropped (in a worker process without progress bars: they would interleave)."""
    result = train_mqar(cfg, progress=progress, accelerator=accelerator)
    result.pop("model")
    return result


def _config_key(config: dict) -> str:
    """The config as a key, with the fields added since it was saved at their defaults (which is what it ran)."""
    defaults = jsonable(asdict(MQARTrainConfig()))
    full = {**defaults, **config, "task": {**defaults["task"], **config.get("task", {})}}
    return json.dumps(full, sort_keys=True)


def _key(config: dict, revision: int) -> str:
    return f"{revision}:{_config_key(config)}"


# ---------------------------------------------------------------------------------------
# command line

QUICK = {"seq_lens": (32,), "fixed_pairs": 4, "pairs": (8,), "fixed_len": 64, "sizes": ((32, 2),)}


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    """"64x2,128x4" -> ((64, 2), (128, 4))."""
    try:
        return tuple((int(d), int(h)) for d, h in (item.split("x") for item in text.split(",") if item))
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes must look like 64x2,128x2 (d_model x heads), got {text!r}") from None


def add_cli(sub) -> None:
    """The subcommand "mqar" of `python -m cortexlab.train`."""
    d, t = MQARTrainConfig(), MQARTask()
    p = sub.add_parser("mqar", help="E1: MQAR accuracy vs sequence length and state size, per sequence mixer")
    p.add_argument("--out", default="results/mqar_cpu.json", help="results JSON (rewritten after every run)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny grid (vocab 64, (L, pairs) = (32, 4) and (64, 8), d_model 32, 10 steps) that "
                        "checks the pipeline end to end")
    p.add_argument("--mixers", default=",".join(MIXERS), help=f"comma-separated subset of {', '.join(MIXERS)}")
    p.add_argument("--seq-lens", type=int_tuple, default=(64, 128, 256, 512), help="length sweep, at --fixed-pairs")
    p.add_argument("--fixed-pairs", type=int, default=16)
    p.add_argument("--pairs", type=int_tuple, default=(4, 8, 16, 32, 64), help="capacity sweep, at --fixed-len")
    p.add_argument("--fixed-len", type=int, default=256)
    p.add_argument("--sizes", type=_sizes, default=((64, 2), (128, 2)),
                   help="model sizes as d_model x heads, the state-size knob (default 64x2,128x2)")
    p.add_argument("--window-size", type=int, default=d.window_size)
    p.add_argument("--vocab-size", type=int, default=t.vocab_size)
    for option in ("steps", "batch_size", "warmup_steps", "seed", "test_size", "eval_every"):
        p.add_argument("--" + option.replace("_", "-"), type=int, default=getattr(d, option))
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--stop-accuracy", type=float, default=d.stop_accuracy,
                   help="stop a run once its held-out accuracy reaches this (0: never)")
    p.add_argument("--patience", type=int, default=0,
                   help="stop a run after this many evaluations in a row without beating its best accuracy by "
                        "--min-delta (0: never)")
    p.add_argument("--min-delta", type=float, default=d.min_delta)
    p.add_argument("--min-steps", type=int, default=d.min_steps, help="no plateau stop before this many steps")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished runs of --out whose config matches (and, after this grid's, those of "
                        "settings outside it)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (per run with --jobs)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at a time, each in its own process")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run_cli)


def run_cli(args, command: str) -> dict:
    """Run the MQAR grid from parsed arguments, writing --out after every run; returns the accuracy table."""
    mixers = [m for m in args.mixers.split(",") if m]
    unknown = sorted(set(mixers) - set(MIXERS))
    if unknown:
        raise ValueError(f"--mixers: unknown {unknown}; valid: {', '.join(MIXERS)}")
    sweep = {"seq_lens": args.seq_lens, "fixed_pairs": args.fixed_pairs, "pairs": args.pairs,
             "fixed_len": args.fixed_len, "sizes": args.sizes}
    task = MQARTask(vocab_size=args.vocab_size)
    base = MQARTrainConfig(task=task, window_size=args.window_size, steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed,
                           test_size=args.test_size, eval_every=args.eval_every,
                           stop_accuracy=args.stop_accuracy or None, patience=args.patience or None,
                           min_delta=args.min_delta, min_steps=args.min_steps)
    if args.quick:
        sweep = QUICK
        base = replace(base, task=MQARTask(vocab_size=64), window_size=8, steps=10, batch_size=8,
                       warmup_steps=5, test_size=32, eval_every=10)
    configs = mqar_grid(mixers=mixers, base=base, **sweep)
    out = Path(args.out)
    done = json.loads(out.read_text())["runs"] if args.resume and out.is_file() else []
    # runs of --out for settings outside this grid (another --mixers or --sizes, say) are kept, after the grid's
    grid = {_config_key(jsonable(asdict(cfg))) for cfg in configs}
    others = [r for r in done if _config_key(r["config"]) not in grid]
    header = {"experiment": "E1 multi-query associative recall (Zoology MQAR), 2-layer models from scratch",
              "metric": "accuracy of the argmax at the answer positions of held-out sequences",
              "baselines": "chance = 1 / number of values; untrained_accuracy = the same model before training",
              "state_size": "numbers per layer carried between tokens: GDN H*D*D, window 2*(W-1)*H*D, "
                            "attention 2*L*H*D",
              "command": command, "git": git_revision(), "environment": environment(),
              "grid": {**jsonable(sweep), "mixers": mixers, "base": jsonable(asdict(base))}}
    results = train_mqar_grid(configs, done=done, progress=not args.no_progress, jobs=args.jobs,
                              threads=args.threads or 1,
                              on_run=lambda runs: write_json_atomic(out, {**header, "complete": False,
                                                                          "runs": runs + others}))
    write_json_atomic(out, {**header, "complete": True, "runs": results + others})
    return {"out": str(out), "accuracy": [
        {"mixer": r["config"]["mixer"], "seq_len": r["config"]["task"]["seq_len"],
         "pairs": r["config"]["task"]["num_pairs"], "d_model": r["config"]["d_model"],
         "heads": r["config"]["num_heads"],
         "state_size": r["state_size"], "accuracy": r["accuracy"], "steps": r["steps"]} for r in results]}
