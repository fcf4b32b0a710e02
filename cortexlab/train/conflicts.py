"""The controller ablation on a task that needs it: MQAR with conflicting re-bindings.

    python -m cortexlab.train controller-ablation --out results/controller_conflicts.json --seeds 0,1,2,3,4

Task (`MQARTask(conflicts=R)`): P keys are bound to values, then R of them are bound again to other values, and the
queries ask for the *first* binding. Keeping it means refusing a write because of what the memory already holds.
A gated-delta-rule layer sets its write strength beta_t from the token x_t alone, and a conflicting value token
looks like any other value token, so one such layer writes the second binding as it wrote the first. The
metacognitive controller adds the memory's own surprise at that token,

    e_t = ||v_t - a_t P_{t-1}^T k_t|| / ||v_t||        beta_t = sigmoid(w_b.x_t + c . [e_t, 0])

(P: the probe memory, see `cortexlab.cortex.controller`; there is no base model here, so the entropy signal is 0).
A first binding meets an empty slot, a conflicting one meets the first value, so e_t tells them apart and the
controller can learn to refuse the second write.

Variants, per seed, trained on the same batches for the same steps (`train_mqar`, fixed steps, no early stop):
    "gdn"              one GDN layer (short conv, L2 q/k, output norm and gate, as in the sidecar), no controller
    "gdn+controller"   the same layer with the controller
    "gdn_2layers"      two GDN layers, no controller: can depth learn the check instead?
Readings on held-out sequences: accuracy on conflicted and on clean queries, how often a conflicted query gets the
second (conflicting) value (each run's "accuracy" is this dict; `train_mqar`'s single number is its "all"), the mean
beta and surprise at first vs conflicting value tokens per layer and, for the controller variant, the same model
with its controller reset to neutral (`neutralise_controller_`).
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, replace
from pathlib import Path
from statistics import mean

import torch
from safetensors.torch import load_file, save_file

from cortexlab.checks import check_int
from cortexlab.cortex import neutralise_controller_
from cortexlab.data.mqar import IGNORE, MQARTask, chance_accuracy, split_seed

from .common import environment, git_revision, int_tuple, jsonable, publish_dir_atomic, write_json_atomic
from .mqar import MODEL_REVISION, MQARModel, MQARModelConfig, MQARTrainConfig, _key, train_mqar

__all__ = ["VARIANTS", "conflict_accuracy", "load_model", "summarise", "train_conflict_ablation", "write_strengths"]

VARIANTS = {"gdn": (1, False), "gdn+controller": (1, True), "gdn_2layers": (2, False)}   # name -> (layers, ctrl)
DEFAULT_TASK = MQARTask(vocab_size=128, seq_len=64, num_pairs=8, conflicts=4)


@torch.no_grad()
def conflict_accuracy(model: MQARModel, task: MQARTask, inputs: torch.Tensor, labels: torch.Tensor,
                      batch_size: int = 128) -> dict:
    """Held-out readings: "conflicted" / "clean" accuracy (queries whose key was / was not bound again), "all",
    and "answered_second", the fraction of conflicted queries answered with the conflicting value."""
    check_int("batch_size", batch_size)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counts = dict.fromkeys(("conflicted", "clean", "second", "n_conflicted", "n_clean"), 0)
    for s in range(0, len(inputs), batch_size):
        ids, lab = inputs[s:s + batch_size].to(device), labels[s:s + batch_size].to(device)
        second = task.conflicting_values(ids, lab)
        pred = model(ids).argmax(-1)
        conflicted, clean = second != IGNORE, (lab != IGNORE) & (second == IGNORE)
        counts["conflicted"] += int((pred == lab)[conflicted].sum())
        counts["clean"] += int((pred == lab)[clean].sum())
        counts["second"] += int((pred == second)[conflicted].sum())
        counts["n_conflicted"] += int(conflicted.sum())
        counts["n_clean"] += int(clean.sum())
    model.train(was_training)
    n_c, n_u = max(counts["n_conflicted"], 1), max(counts["n_clean"], 1)
    return {"conflicted": round(counts["conflicted"] / n_c, 5), "clean": round(counts["clean"] / n_u, 5),
            "all": round((counts["conflicted"] + counts["clean"]) / (n_c + n_u), 5),
            "answered_second": round(counts["second"] / n_c, 5),
            "queries": {"conflicted": counts["n_conflicted"], "clean": counts["n_clean"]}}


@torch.no_grad()
def write_strengths(model: MQARModel, task: MQARTask, inputs: torch.Tensor) -> list[dict]:
    """Per layer and head, the mean write strength beta at the value tokens of first bindings (all P of them) and
    of conflicting ones (over sequences) and, with a controller, its surprise there and beta_slow, the strength of
    the write into its slow memory: {"first": {"beta": [per head], ...}, "conflicting": {...}} per layer."""
    if task.conflicts == 0:
        raise ValueError("task.conflicts must be > 0: without conflicting bindings there is nothing to compare")
    traces = []
    hooks = [layer.mixer.block.gdn.register_forward_hook(lambda _m, _a, out: traces.append(out[2]))
             for layer in model.layers]
    was_training = model.training
    model.eval()
    try:
        model(inputs.to(next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    P, R = task.num_pairs, task.conflicts
    positions = {"first": slice(1, 2 * P, 2), "conflicting": slice(2 * P + 1, 2 * (P + R), 2)}
    signals = ("beta", "surprise", "beta_slow")
    return [{name: {signal: [round(x, 4) for x in trace[signal][:, where].mean((0, 1)).tolist()]
                    for signal in signals if signal in trace}
             for name, where in positions.items()} for trace in traces]


def _readings(model: MQARModel, task: MQARTask, inputs, labels) -> dict:
    return {"accuracy": conflict_accuracy(model, task, inputs, labels),
            "writes": write_strengths(model, task, inputs[:256])}


def train_conflict_ablation(base: MQARTrainConfig, seeds, variants=tuple(VARIANTS), *, done=(), on_run=None,
                            save_models: Path | None = None, progress: bool = False) -> list[dict]:
    """Train every variant for every seed from `base` (its task must have conflicts); returns one result per run.

    `done`: earlier results, reused when their config matches. `on_run(results so far)` after every run.
    `save_models`: write the first seed's models there, one folder per variant (model.safetensors, config.json).
    """
    if base.task.conflicts == 0:
        raise ValueError("base.task must have conflicts > 0: without them there is nothing for the controller to do")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"variants: unknown {unknown}; valid: {', '.join(VARIANTS)}")
    finished = {_key(r["config"], r.get("model_revision", 1)): r for r in done}
    results = []
    for seed in seeds:
        test_inputs, test_labels = base.task.sample(base.test_size, split_seed("test", seed))
        for name in variants:
            layers, controller = VARIANTS[name]
            cfg = replace(base, seed=seed, num_layers=layers, controller=controller, mixer="gdn")
            key = _key(jsonable(asdict(cfg)), MODEL_REVISION)
            if key in finished and not (save_models and seed == seeds[0]):
                results.append(finished[key])
            else:
                run = train_mqar(cfg, progress=progress)
                model = run.pop("model")
                run.update(variant=name, **_readings(model, cfg.task, test_inputs, test_labels))
                if controller:
                    neutral = copy.deepcopy(model)
                    neutralise_controller_(neutral)
                    run["neutralised"] = _readings(neutral, cfg.task, test_inputs, test_labels)
                if save_models and seed == seeds[0]:
                    _save_model(model, Path(save_models) / name, run)
                results.append(run)
            if on_run is not None:
                on_run(results)
    return results


def _same_setting(run: dict, base: MQARTrainConfig) -> bool:
    """Whether a saved run trained `base` (up to its seed and variant) with the current model revision."""
    config = run["config"]
    mine = replace(base, seed=config["seed"], num_layers=config.get("num_layers", 2),
                   controller=config.get("controller", False), mixer="gdn")
    return _key(config, run.get("model_revision", 1)) == _key(jsonable(asdict(mine)), MODEL_REVISION)


def _save_model(model: MQARModel, directory: Path, run: dict) -> None:
    """model.safetensors + config.json (the MQARModelConfig) + card.json (the run's readings), written atomically."""
    def write(tmp: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(asdict(model.config), indent=2) + "\n")
        (tmp / "card.json").write_text(json.dumps({k: run[k] for k in ("config", "variant", "accuracy")},
                                                  indent=2) + "\n")
    publish_dir_atomic(directory, write)


def load_model(directory) -> MQARModel:
    """A model saved by the ablation (`--save-models`), in eval mode."""
    directory = Path(directory)
    model = MQARModel(MQARModelConfig(**json.loads((directory / "config.json").read_text())))
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model.eval()


def summarise(results: list[dict]) -> dict:
    """Per variant (and the neutralised controller): mean, min and max over seeds of each accuracy reading."""
    table = {}
    for name in VARIANTS:
        for label, pick in ((name, lambda r: r["accuracy"]),
                            (f"{name} (neutralised at test)", lambda r: r.get("neutralised", {}).get("accuracy"))):
            readings = [pick(r) for r in results if r["variant"] == name and pick(r) is not None]
            if readings:
                table[label] = {metric: {"mean": round(mean(a[metric] for a in readings), 4),
                                         "min": min(a[metric] for a in readings),
                                         "max": max(a[metric] for a in readings)}
                                for metric in ("conflicted", "clean", "answered_second")}
                table[label]["seeds"] = len(readings)
    return table


# ---------------------------------------------------------------------------------------
# command line

def add_cli(sub) -> None:
    """The subcommand "controller-ablation" of `python -m cortexlab.train`."""
    t, d = DEFAULT_TASK, MQARTrainConfig()
    p = sub.add_parser("controller-ablation",
                       help="the metacognitive controller on MQAR with conflicting re-bindings (keep the first)")
    p.add_argument("--out", default="results/controller_conflicts.json")
    p.add_argument("--seeds", type=int_tuple, default=(0, 1, 2, 3, 4))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--vocab-size", type=int, default=t.vocab_size)
    p.add_argument("--seq-len", type=int, default=t.seq_len)
    p.add_argument("--pairs", type=int, default=t.num_pairs)
    p.add_argument("--conflicts", type=int, default=t.conflicts)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=d.num_heads)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--test-size", type=int, default=d.test_size)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--save-models", default=None, help="write the first seed's models here, a folder per variant")
    p.add_argument("--resume", action="store_true", help="keep the finished runs of --out whose config matches")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run_cli)


def run_cli(args, command: str) -> dict:
    task = MQARTask(vocab_size=args.vocab_size, seq_len=args.seq_len, num_pairs=args.pairs, conflicts=args.conflicts)
    base = MQARTrainConfig(task=task, mixer="gdn", d_model=args.d_model, num_heads=args.heads, steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, test_size=args.test_size,
                           eval_every=args.eval_every, stop_accuracy=None)
    variants = [v for v in args.variants.split(",") if v]
    out = Path(args.out)
    done = json.loads(out.read_text())["runs"] if args.resume and out.is_file() else []
    # with --resume, runs of other seeds or variants in --out are kept, after this call's, if they ran this setting
    asked = {(seed, name) for seed in args.seeds for name in variants}
    others = [r for r in done if (r["config"]["seed"], r["variant"]) not in asked and _same_setting(r, base)]
    header = {"experiment": "controller ablation: MQAR with conflicting re-bindings, the queries ask for the first",
              "metric": "accuracy of the argmax at held-out answer positions, split into conflicted and clean "
                        "queries; answered_second = conflicted queries answered with the conflicting value",
              "baselines": {"chance": chance_accuracy(task), "variants": "one GDN layer without the controller; "
                            "two GDN layers without it; the controller's model with its controller neutralised"},
              "command": command, "git": git_revision(), "environment": environment(),
              "base": jsonable(asdict(base))}

    def save(results, complete=False):
        runs = results + others
        seeds = sorted({r["config"]["seed"] for r in runs})
        write_json_atomic(out, {**header, "seeds": seeds, "complete": complete, "summary": summarise(runs),
                                "runs": runs})

    results = train_conflict_ablation(base, args.seeds, variants, done=done, on_run=save,
                                      save_models=args.save_models, progress=not args.no_progress)
    save(results, complete=True)
    return {"out": str(out), "summary": summarise(results + others)}
