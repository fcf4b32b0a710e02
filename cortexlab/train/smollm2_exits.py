"""Early exit on SmolLM2: train exit heads at layers 8 / 16 / 24 of 30 briefly, and CALM's early-exit classifier
that decides where a token leaves, then measure what each exit rule saves.

    python -m cortexlab.train smollm2-exits    (-> results/smollm2_early_exit.json, results/adapters/smollm2_exits/)

Heads: z_l = lm_head(norm(h_l + A_l h_l)), SmolLM2's own final norm and output head behind a zero-initialised
adapter A_l (576 x 576) per exit layer (`hf_exit_heads`; at init the logit lens). Training, backbone frozen:

    for each step: a batch of windows [b, T+1] of train-split stdlib text (a seeded permutation, each window once
    per pass);  h_l = SmolLM2's hidden state after layer l (no grad);  z_L = its final logits (the teacher)
    loss = mean_l (1 - a) CE(z_l, x_{t+1}) + a KL(softmax z_L || softmax z_l),  a = 0.5   (EarlyExitEngine.exit_loss)

with AdamW (constant lr) on the adapters only. Cost per step: one frozen forward, then per exit head a [b T, V]
logits forward and backward (V = 49152). Then, backbone and heads frozen, the exit classifier (Schuster et al.
2022, section 3.3; `cortexlab.neuro.exit_classifier`):

    c_l(h) = sigmoid(w_l . n(h) + b_l)  fit to y_l = [argmax head_l(h_l) == argmax z_L]  (`train_exit_classifier`)

on further train-split windows the heads never saw. Two exit rules, side by side: "max_prob" (exit at the first
exit layer where max_v softmax(head_l(h_l))_v >= tau: every check runs the 49152 x 576 output layer) and
"classifier" (exit at the first l where c_l(h_l) >= tau: a check costs 2d MACs, the output layer runs once per
token). Measured on held-out stdlib modules: the teacher-forced per-token trade-off (`hf_exit_tradeoff`) of the
logit lens (untrained, max_prob) and of the trained heads under both rules at each tau, the classifier's accuracy
against the majority class, and the wall clock of real greedy decoding with a KV cache (`exit_decode_wall_clock`:
full depth vs `generate_with_exits` with either rule at each tau, CALM state propagation, round-robin). The heads
and the classifier are saved with a card.json (`save_exit_heads`); the results JSON holds the config, command, git
revision, versions and every number.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cortexlab.checks import check_int, check_number
from cortexlab.neuro.early_exit import EarlyExitEngine

from .common import environment, git_revision, publish_dir_atomic, write_json_atomic
from .exits import fit_exit_heads

__all__ = ["SmolLM2ExitsConfig", "add_cli", "run_smollm2_exits", "train_exit_classifier", "train_hf_exit_heads"]


@dataclass
class SmolLM2ExitsConfig:
    """One run: the heads, their training, and the held-out measurements."""

    exit_layers: tuple[int, ...] = (8, 16, 24)
    seq_len: int = 128
    batch_size: int = 4
    steps: int = 28
    lr: float = 3e-3
    seed: int = 0
    probe_windows: int = 24
    probe_steps: int = 300
    probe_lr: float = 1e-2
    probe_l2: float = 0.1
    heldout_windows: int = 8
    thresholds: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    decode_prompts: int = 3
    prompt_len: int = 32
    new_tokens: int = 20
    repeats: int = 3

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "steps", "probe_windows", "probe_steps", "heldout_windows",
                     "decode_prompts", "prompt_len", "repeats"):
            check_int(name, getattr(self, name))
        check_int("new_tokens", self.new_tokens, 2)
        for name in ("lr", "probe_lr"):
            check_number(name, getattr(self, name), 0, 1, low_open=True, high_open=True)
        check_number("probe_l2", self.probe_l2, 0)
        self.exit_layers, self.thresholds = tuple(self.exit_layers), tuple(self.thresholds)
        if not self.thresholds or not all(0 < t <= 1 for t in self.thresholds):
            raise ValueError(f"thresholds must be numbers in (0, 1], got {self.thresholds!r}")


def train_hf_exit_heads(model, heads: EarlyExitEngine, windows: torch.Tensor, *, steps: int, batch_size: int,
                        lr: float, seed: int = 0, progress: bool = True) -> list[float]:
    """Train `heads` (on `model`'s hidden states, model frozen) on windows [n, T+1]; the exit loss of each step
    (`cortexlab.train.exits.fit_exit_heads`)."""
    if not isinstance(heads, EarlyExitEngine):
        raise ValueError(f"heads must be an EarlyExitEngine, got {type(heads).__name__}")

    def backbone(inputs):
        out = model(inputs, output_hidden_states=True)
        return out.hidden_states, out.logits

    return fit_exit_heads(model, heads, windows, backbone, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                          progress=progress)


def train_exit_classifier(classifier, examples: dict, *, steps: int, lr: float, l2: float = 0.0) -> list[float]:
    """Fit CALM's exit classifier on `examples` ({l: (h_l [N, d], y_l [N] bool)}, `consistency_examples`; the
    backbone and heads are not involved any more): full-batch Adam on the L2-penalised logistic loss

        loss = mean_l [ BCE(w_l . n(h_l) + b_l, y_l) + l2 ||w_l||^2 ]

    (a few thousand tokens against d = 576 weights overfit without the penalty). Returns the loss of each step."""
    from cortexlab.neuro.exit_classifier import ExitClassifier

    if not isinstance(classifier, ExitClassifier):
        raise ValueError(f"classifier must be an ExitClassifier, got {type(classifier).__name__}")
    if not isinstance(examples, dict) or set(examples) != set(classifier.exit_layers):
        raise ValueError(f"examples must map each exit layer {list(classifier.exit_layers)} to (hidden, labels)")
    check_int("steps", steps)
    check_number("lr", lr, 0, 1, low_open=True, high_open=True)
    check_number("l2", l2, 0)
    device = classifier.weight.device
    data = [(layer, hidden.to(device), labels.to(device).float()) for layer, (hidden, labels) in examples.items()]
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = torch.stack([F.binary_cross_entropy_with_logits(classifier.logit(hidden, layer), labels)
                            for layer, hidden, labels in data]).mean() + l2 * classifier.weight.pow(2).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _save_adapter(heads: EarlyExitEngine, classifier, path: Path, card: dict) -> int:
    """`save_exit_heads` (heads + classifier) into a temp folder, fsync, then rename onto `path`; returns the
    weights' size in bytes."""
    from cortexlab.neuro.exit_decoding import ADAPTER_WEIGHTS, CLASSIFIER_WEIGHTS, save_exit_heads

    publish_dir_atomic(path, lambda tmp: save_exit_heads(heads, tmp, card, classifier=classifier))
    return sum((path / name).stat().st_size for name in (ADAPTER_WEIGHTS, CLASSIFIER_WEIGHTS))


RULES = ("max_prob", "classifier")


def _decode_by_rule(decode: dict) -> dict:
    """The wall-clock variants regrouped: {"max_prob": {tau: row}, "classifier": {tau: row}} (rows as measured)."""
    variants = decode["variants"]
    return {"max_prob": {name: row for name, row in variants.items() if name not in ("full", "hf_generate")
                         and not name.startswith("classifier@")},
            "classifier": {name.split("@", 1)[1]: row for name, row in variants.items()
                           if name.startswith("classifier@")}}


def _side_by_side(tradeoffs: dict, decode_rules: dict) -> dict:
    """{tau: {rule: headline numbers}}: teacher-forced trade-off and decode wall clock of both rules per tau."""
    table = {}
    for rule in RULES:
        for row in tradeoffs[rule]["by_threshold"]:
            tau = str(row["threshold"])
            measured = decode_rules[rule][tau]
            table.setdefault(tau, {})[rule] = {
                "early_fraction": row["early_fraction"], "layers_fraction": row["layers_fraction"],
                "agreement": row["agreement"], "loss_increase": row["loss_increase"],
                "decode_speedup": measured["speedup"], "decode_cpu_speedup": measured["cpu_speedup"],
                "decode_macs_ratio": measured["macs_ratio"],
                "decode_mean_exit_layer": measured["mean_exit_layer"],
                "decode_token_agreement": measured["token_agreement"]}
    return table


def run_smollm2_exits(cfg: SmolLM2ExitsConfig, *, out: Path, adapter: Path, command: str,
                      progress: bool = True) -> dict:
    """Train the heads and the exit classifier, measure both exit rules, save the heads + classifier to `adapter`
    and the results to `out`; returns the results."""
    from cortexlab.data.corpus import stdlib_modules
    from cortexlab.eval.decode import stdlib_token_ids
    from cortexlab.eval.early_exit import exit_classifier_accuracy, exit_decode_wall_clock, hf_exit_tradeoff
    from cortexlab.models import default_model_path, load_base_model
    from cortexlab.neuro.exit_classifier import ExitClassifier, consistency_examples
    from cortexlab.neuro.exit_decoding import hf_exit_heads

    started = time.perf_counter()
    model, tokenizer = load_base_model()
    T, n_train, n_probe, n_held = cfg.seq_len, cfg.steps * cfg.batch_size, cfg.probe_windows, cfg.heldout_windows
    train, train_files = stdlib_token_ids((n_train + n_probe) * (T + 1), tokenizer, files=stdlib_modules("train"))
    held, held_files = stdlib_token_ids(n_held * (T + 1) + cfg.decode_prompts * cfg.prompt_len, tokenizer,
                                        files=stdlib_modules("heldout"))
    train = train.view(n_train + n_probe, T + 1)
    train, probe = train[:n_train], train[n_train:]
    heldout = held[0, :n_held * (T + 1)].view(n_held, T + 1)
    prompts = list(held[0, n_held * (T + 1):].view(cfg.decode_prompts, 1, cfg.prompt_len))
    heads = hf_exit_heads(model, cfg.exit_layers)
    classifier = ExitClassifier(cfg.exit_layers, model.config.hidden_size, model.config.rms_norm_eps)
    seconds = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        value = fn()
        seconds[name] = time.perf_counter() - t0
        return value

    lens = timed("tradeoff_logit_lens", lambda: hf_exit_tradeoff(model, heads, heldout, cfg.thresholds))
    losses = timed("training", lambda: train_hf_exit_heads(model, heads, train, steps=cfg.steps,
                                                           batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                                                           progress=progress))
    examples = timed("classifier_examples", lambda: consistency_examples(model, heads, probe))
    heldout_examples = timed("classifier_heldout_examples", lambda: consistency_examples(model, heads, heldout))
    probe_losses = timed("classifier_training", lambda: train_exit_classifier(
        classifier, examples, steps=cfg.probe_steps, lr=cfg.probe_lr, l2=cfg.probe_l2))
    tradeoffs = timed("tradeoff_trained", lambda: {
        "max_prob": hf_exit_tradeoff(model, heads, heldout, cfg.thresholds),
        "classifier": hf_exit_tradeoff(model, heads, heldout, cfg.thresholds, classifier=classifier)})
    decode = timed("decode_wall_clock", lambda: exit_decode_wall_clock(
        model, heads, prompts, cfg.thresholds, classifier=classifier, max_new_tokens=cfg.new_tokens,
        repeats=cfg.repeats))
    decode_rules = _decode_by_rule(decode)

    data = {"train": {"split": "train", "windows": n_train, "tokens_per_window": T + 1,
                      "tokens_seen": cfg.steps * cfg.batch_size * T, "files": len(train_files),
                      "first_file": train_files[0], "last_file": train_files[-1]},
            "classifier": {"split": "train", "windows": n_probe, "tokens_per_window": T + 1,
                           "note": "the windows after the heads' training windows in the same stream (unseen by "
                                   "the heads)"},
            "heldout": {"split": "heldout", "tradeoff_windows": n_held, "tokens_per_window": T + 1,
                        "decode_prompts": cfg.decode_prompts, "prompt_tokens": cfg.prompt_len,
                        "files": held_files, "note": "the prompts follow the trade-off windows in the same stream"}}
    git, env = git_revision(), environment()
    training = {"steps": cfg.steps, "batch_size": cfg.batch_size, "seq_len": T, "lr": cfg.lr, "optimizer": "AdamW",
                "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
                "loss_last_5_mean": round(sum(losses[-5:]) / len(losses[-5:]), 4),
                "seconds_per_step": round(seconds["training"] / cfg.steps, 2),
                "losses": [round(x, 4) for x in losses], "seconds": round(seconds["training"], 1)}
    classifier_training = {
        "rule": "c_l(h) = sigmoid(w_l . h / rms(h) + b_l); exit at the first exit layer with c_l >= tau",
        "target": "y_l = [argmax head_l(h_l) == argmax of the full model]",
        "tokens": len(examples[cfg.exit_layers[0]][1]),
        "steps": cfg.probe_steps, "lr": cfg.probe_lr, "l2": cfg.probe_l2, "optimizer": "Adam (full batch)",
        "loss_first": round(probe_losses[0], 4), "loss_last": round(probe_losses[-1], 4),
        "parameters": sum(p.numel() for p in classifier.parameters()),
        "accuracy_train": exit_classifier_accuracy(classifier, examples),
        "accuracy_heldout": exit_classifier_accuracy(classifier, heldout_examples),
        "seconds": round(seconds["classifier_training"] + seconds["classifier_examples"], 1)}
    side_by_side = _side_by_side(tradeoffs, decode_rules)
    card = {"base_model": str(default_model_path().name), "command": command, "git": git,
            "trained_parameters": sum(p.numel() for p in heads.parameters()), "data": data,
            "training": {k: v for k, v in training.items() if k != "losses"},
            "classifier_training": classifier_training,
            "measured": {"heldout_full_loss": tradeoffs["max_prob"]["full_loss"],
                         "tokens": tradeoffs["max_prob"]["tokens"], "by_threshold": side_by_side},
            "results": str(out)}
    adapter_bytes = _save_adapter(heads, classifier, adapter, card)
    decode_common = {k: v for k, v in decode.items() if k != "variants"}
    result = {"experiment": "early exit on SmolLM2-135M-Instruct: exit heads after layers "
                            f"{'/'.join(map(str, cfg.exit_layers))} of {model.config.num_hidden_layers}, "
                            "max-prob rule vs CALM's early-exit classifier",
              "command": command, "git": git, "environment": env, "config": asdict(cfg), "data": data,
              "training": training, "classifier": classifier_training,
              "side_by_side": side_by_side,
              "tradeoff": {"what": "teacher-forced, per token: exit at the first exit layer whose confidence >= tau "
                                   "(max_prob: the head's max softmax probability; classifier: c_l(h_l)); agreement "
                                   "= same argmax as the full model",
                           "logit_lens": lens, **tradeoffs},
              "decode": {"what": "greedy decoding with a KV cache, batch 1; exits per token with CALM state "
                                 "propagation; speedup = full-depth decode seconds / exit decode seconds (wall "
                                 "clock; cpu_speedup: the same in process CPU time, robust to other load); all "
                                 "variants round-robin in one loop",
                         **decode_common, "hf_generate": decode["variants"]["hf_generate"],
                         "full": decode["variants"]["full"], **decode_rules},
              "adapter": {"path": str(adapter), "bytes": adapter_bytes},
              "seconds": {k: round(v, 1) for k, v in {**seconds, "total": time.perf_counter() - started}.items()}}
    write_json_atomic(out, result)
    return result


def add_cli(sub) -> None:
    """The subcommand "smollm2-exits" of `python -m cortexlab.train`."""
    d = SmolLM2ExitsConfig()
    p = sub.add_parser("smollm2-exits", help="train SmolLM2 exit heads (8/16/24) briefly; trade-off and decode speed")
    p.add_argument("--out", default="results/smollm2_early_exit.json", help="results JSON")
    p.add_argument("--adapter", default="results/adapters/smollm2_exits", help="folder for the heads + card.json")
    for option in ("seq_len", "batch_size", "steps", "seed", "probe_windows", "probe_steps", "heldout_windows",
                   "decode_prompts", "prompt_len", "new_tokens", "repeats"):
        p.add_argument("--" + option.replace("_", "-"), type=int, default=getattr(d, option))
    for option in ("lr", "probe_lr", "probe_l2"):
        p.add_argument("--" + option.replace("_", "-"), type=float, default=getattr(d, option))
    p.add_argument("--exit-layers", default=",".join(map(str, d.exit_layers)))
    p.add_argument("--thresholds", default=",".join(map(str, d.thresholds)))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: timings robust to other load)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run_cli)


def run_cli(args, command: str) -> dict:
    """Run the recipe from parsed arguments; returns the summary it printed."""
    cfg = SmolLM2ExitsConfig(
        exit_layers=tuple(int(x) for x in args.exit_layers.split(",") if x),
        thresholds=tuple(float(x) for x in args.thresholds.split(",") if x),
        **{k: getattr(args, k) for k in ("seq_len", "batch_size", "steps", "lr", "seed", "probe_windows",
                                         "probe_steps", "probe_lr", "probe_l2", "heldout_windows", "decode_prompts",
                                         "prompt_len", "new_tokens", "repeats")})
    result = run_smollm2_exits(cfg, out=Path(args.out), adapter=Path(args.adapter), command=command,
                               progress=not args.no_progress)
    return {"out": args.out, "adapter": args.adapter, "seconds": result["seconds"],
            "classifier_accuracy_heldout": result["classifier"]["accuracy_heldout"],
            "side_by_side": result["side_by_side"]}
