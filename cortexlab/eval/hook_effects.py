"""Measured effects of the inference-time hooks (`cortexlab.neuro.hooks`) on a pretrained model.

    python -m cortexlab.eval.hook_effects --out results/inference_hooks.json     # SmolLM2, the full CPU run
    python -m cortexlab.eval.hook_effects --quick --out /tmp/hooks_quick.json    # tiny random model, seconds

1. Repetition (habituation). Greedy decoding of every prompt of the shipped set
   `cortexlab.data.prompts` "repetition_prompts" (one user turn of the chat template, up to
   `max_new_tokens` tokens or the end-of-turn token; `batch_size` prompts at a time, padded so
   that each computes what it would alone), by the unhooked model (the baseline,
   habituation_rate 0) and with the habituation hook at each `habituation_rates` value (the
   pipeline is reset before every prompt). Per setting: the mean over prompts of the
   repeated-4-gram rate and distinct-1/2/3 (`cortexlab.eval.repetition`), the generated length,
   the guard perplexity of the generated text under the unhooked model, and the per-prompt
   paired difference from the baseline, mean +- standard error.
2. Held-out next-token loss. `windows` non-overlapping windows of `window_tokens` tokens spread
   evenly over the held-out standard-library modules (`heldout_windows`; the split of
   `cortexlab.data.corpus.stdlib_modules("heldout")`), each a fresh sequence (pipeline reset).
   Loss of window w: the mean next-token cross-entropy L_w (nats/token) over its
   window_tokens - 1 predictions. Per hook setting (temperature strength, voting temperature,
   Hebbian eta, habituation rate): mean_w L_w and the paired difference
   d_w = L_w(setting) - L_w(unhooked), reported as mean(d) +- sd(d)/sqrt(windows).
   The pipeline attached with every hook disabled (which hands every layer to SDPA through its own
   mask function) is checked against the unhooked model on the first `eager_check_windows` windows;
   the eager path itself is checked against the model in the test suite (tests/test_neuro_hooks.py).

The unhooked model is always the baseline. Results (config, git revision, versions, the
command, every number, per-prompt texts) go to --out; tables go to stdout. Time of the full run
on the 2-core CPU with 1 thread: see the "seconds" field of results/inference_hooks.json.
"""
from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from cortexlab.checks import check_int

__all__ = ["FULL", "HOOK_SOURCES", "QUICK", "heldout_windows", "hook_sources", "paired_difference", "quiet", "run",
           "window_losses"]

FULL = {
    "model": "smollm2",
    "threads": 1,
    "prompt_set": "repetition_prompts",
    "prompts": None,                      # None: all of the set
    "chat": True,
    "max_new_tokens": 128,
    "batch_size": 20,                     # prompts decoded together (exact: see cortexlab.eval.repetition)
    "ngram": 4,
    "distinct": [1, 2, 3],
    "habituation_rates": [0.1, 0.3, 1.0],
    "windows": 16,
    "window_tokens": 256,
    "eager_check_windows": 2,
    "loss_settings": {
        "temperature_strength": [-1.0, -0.5, 0.25, 0.5, 1.0, 2.0],
        "voting_temperature": [100.0, 10.0, 3.0, 1.0],
        "hebbian_eta": [1.0, 10.0, 100.0],
        "habituation_rate": [0.1, 0.3, 1.0],
    },
    "hook_overrides": {},                 # other InferenceHookConfig fields, the same for every setting
}
QUICK = {
    **FULL,
    "model": "tiny-llama",
    "prompts": 3,
    "chat": False,
    "max_new_tokens": 12,
    "batch_size": 2,
    "habituation_rates": [0.5],
    "windows": 3,
    "window_tokens": 32,
    "eager_check_windows": 1,
    "loss_settings": {"temperature_strength": [1.0], "voting_temperature": [1.0], "hebbian_eta": [1.0],
                      "habituation_rate": [0.5]},
}
HOOK_SOURCES = ("neuro/hooks.py", "neuro/temperature.py", "neuro/habituation.py", "neuro/hebbian.py",
                "neuro/population.py")
ENABLES = {"temperature_strength": "enable_temperature", "voting_temperature": "enable_voting",
           "hebbian_eta": "enable_hebbian", "habituation_rate": "enable_habituation"}


def _pipeline(param: str | None = None, value: float | None = None, overrides: dict | None = None):
    """An unattached pipeline with the one hook of `param` enabled at `value` (None: every hook disabled)."""
    from cortexlab.neuro.hooks import InferenceHookConfig, InferenceHookPipeline

    fields = dict(overrides or {})
    if param is not None:
        if param not in ENABLES:
            raise ValueError(f"param must be one of {sorted(ENABLES)}, got {param!r}")
        fields.update({ENABLES[param]: True, param: value})
    return InferenceHookPipeline(InferenceHookConfig(**fields))


def hook_sources() -> dict:
    """{path: SHA-256} of the hooks' source files (new files are not in the git revision's dirty flag)."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    return {f"cortexlab/{p}": hashlib.sha256((root / p).read_bytes()).hexdigest() for p in HOOK_SOURCES}


def paired_difference(values, baseline) -> dict:
    """mean, standard error (sd / sqrt(n)) and n of the paired differences values - baseline (nan entries skipped)."""
    if len(values) != len(baseline):
        raise ValueError(f"values and baseline must pair up, got {len(values)} and {len(baseline)} entries")
    d = [a - b for a, b in zip(values, baseline) if not (math.isnan(a) or math.isnan(b))]
    if not d:
        return {"mean": math.nan, "se": math.nan, "n": 0}
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    return {"mean": statistics.fmean(d), "se": se, "n": len(d)}


def heldout_windows(tokenizer, windows: int, window_tokens: int) -> tuple[torch.Tensor, list[str]]:
    """`windows` windows of `window_tokens` tokens spread evenly over the held-out stdlib modules.

    The whole split is tokenised file by file (as `cortexlab.eval.decode.stdlib_token_ids` does:
    each file's text plus a blank line, no special tokens; `tokenizer=None`: UTF-8 bytes) and joined
    into one stream of N tokens; window w starts at w * (N // windows). Returns ([windows,
    window_tokens] ids, the file each window starts in).
    """
    from cortexlab.data.corpus import stdlib_modules

    check_int("windows", windows)
    check_int("window_tokens", window_tokens, 2)
    ids: list[int] = []
    starts: list[tuple[int, str]] = []
    for path in stdlib_modules("heldout"):
        text = path.read_text(encoding="utf-8", errors="replace") + "\n\n"
        starts.append((len(ids), path.name))
        ids.extend(text.encode("utf-8") if tokenizer is None else
                   tokenizer(text, add_special_tokens=False)["input_ids"])
    stride = len(ids) // windows
    if stride < window_tokens:
        raise ValueError(f"the held-out split holds {len(ids)} tokens, too few for {windows} windows of "
                         f"{window_tokens}")
    offsets = [w * stride for w in range(windows)]
    files = [next(name for begin, name in reversed(starts) if begin <= o) for o in offsets]
    return torch.tensor([ids[o:o + window_tokens] for o in offsets], dtype=torch.long), files


@torch.no_grad()
def window_losses(model, windows: torch.Tensor, pipeline=None) -> list[float]:
    """Mean next-token cross-entropy (nats/token) of each window [W, T], one sequence at a time;
    `pipeline` (unattached) is attached for the call and reset before every window."""
    device = next(model.parameters()).device
    losses = []
    with nullcontext() if pipeline is None else pipeline.attached(model):
        for row in windows:
            if pipeline is not None:
                pipeline.reset()
            x = row[None].to(device)
            logits = model(input_ids=x).logits[0, :-1].double()
            losses.append(float(torch.nn.functional.cross_entropy(logits, x[0, 1:])))
    return losses


def _load(plan: dict):
    from cortexlab.models import load_base_model, tiny_model

    if plan["model"] == "tiny-llama":
        return tiny_model("llama"), None
    return load_base_model(None if plan["model"] == "smollm2" else plan["model"])


def _decode(tokenizer, ids: list[int]) -> str:
    if tokenizer is None:
        return bytes(ids).decode("utf-8", errors="replace")
    return tokenizer.decode(ids)


def repetition_experiment(model, tokenizer, plan: dict, log) -> dict:
    from cortexlab.data.prompts import load_prompts, prompt_token_ids
    from cortexlab.eval.repetition import greedy_repetition

    prompts = load_prompts(plan["prompt_set"])[:plan["prompts"]]
    ids = [prompt_token_ids(p.text, tokenizer, chat=plan["chat"]) for p in prompts]
    eos = None if tokenizer is None else tokenizer.eos_token_id
    metrics = ["repeated_ngram_rate", *(f"distinct_{k}" for k in plan["distinct"]), "new_tokens", "guard_perplexity"]
    settings = [("baseline", None), *((f"habituation_rate={r:g}", r) for r in plan["habituation_rates"])]
    rows, base = [], None
    for name, rate in settings:
        log(f"[repetition] {name}: greedy decoding of {len(ids)} prompts, <= {plan['max_new_tokens']} tokens ...")
        start = time.perf_counter()
        pipe = None if rate is None else _pipeline("habituation_rate", rate, plan["hook_overrides"])
        res = greedy_repetition(model, ids, plan["max_new_tokens"], pipeline=pipe, eos_token_id=eos,
                                batch_size=plan["batch_size"],
                                n=plan["ngram"], distinct=plan["distinct"])
        per_prompt = [{"id": p.id, "kind": p.kind, **{k: v for k, v in r.items() if k != "continuation"},
                       "text": _decode(tokenizer, r["continuation"])} for p, r in zip(prompts, res["per_prompt"])]
        row = {"setting": name, "habituation_rate": 0.0 if rate is None else rate, "mean": res["mean"],
               "guard_perplexity": res["guard_perplexity"], "seconds": time.perf_counter() - start,
               "per_prompt": per_prompt}
        if base is None:
            base = per_prompt
        else:
            row["diff_vs_baseline"] = {m: paired_difference([r[m] for r in per_prompt], [r[m] for r in base])
                                       for m in metrics}
        rows.append(row)
        log(f"  rep-{plan['ngram']} {res['mean']['repeated_ngram_rate']:.4f}, guard ppl "
            f"{res['guard_perplexity']:.3f}, {row['seconds']:.0f} s")
    return {"prompt_set": plan["prompt_set"], "prompts": [p._asdict() for p in prompts], "chat": plan["chat"],
            "max_new_tokens": plan["max_new_tokens"], "eos_token_id": eos, "settings": rows}


def loss_experiment(model, tokenizer, plan: dict, log) -> dict:
    windows, files = heldout_windows(tokenizer, plan["windows"], plan["window_tokens"])
    log(f"[loss] {plan['windows']} held-out windows of {plan['window_tokens']} tokens, spread over the split "
        f"(in {len(set(files))} files: {', '.join(dict.fromkeys(files))}) ...")
    start = time.perf_counter()
    base = window_losses(model, windows)
    baseline = {"mean_nats": statistics.fmean(base), "per_window": base, "seconds": time.perf_counter() - start}
    k = plan["eager_check_windows"]
    eager = window_losses(model, windows[:k], _pipeline(overrides=plan["hook_overrides"]))
    eager_check = {"windows": k, "per_window": eager,
                   "max_abs_diff_nats": max(abs(a - b) for a, b in zip(eager, base[:k]))}
    log(f"  unhooked: {baseline['mean_nats']:.4f} nats/token; pipeline attached, all hooks disabled, vs unhooked on "
        f"{k} windows: max |diff| {eager_check['max_abs_diff_nats']:.2e}")
    rows = []
    for param, values in plan["loss_settings"].items():
        for value in values:
            start = time.perf_counter()
            losses = window_losses(model, windows, _pipeline(param, value, plan["hook_overrides"]))
            row = {"hook": ENABLES[param].removeprefix("enable_"), "param": param, "value": value,
                   "mean_nats": statistics.fmean(losses), "diff_vs_baseline": paired_difference(losses, base),
                   "per_window": losses, "seconds": time.perf_counter() - start}
            rows.append(row)
            d = row["diff_vs_baseline"]
            log(f"  {param}={value:g}: {row['mean_nats']:.4f} nats/token, diff {d['mean']:+.4f} +- {d['se']:.4f} "
                f"({row['seconds']:.0f} s)")
    return {"source": "held-out python standard library modules (cortexlab.data.corpus, split by file-name hash)",
            "window_files": files, "windows": plan["windows"], "window_tokens": plan["window_tokens"],
            "baseline": baseline, "eager_check": eager_check, "settings": rows}


def print_tables(result: dict, log) -> None:
    rep = result.get("repetition")
    if rep:
        log(f"\nRepetition in greedy decoding ({len(rep['prompts'])} prompts, <= {rep['max_new_tokens']} new tokens; "
            "mean over prompts; guard = perplexity under the unhooked model; paired diff +- s.e.):")
        log(f"  {'setting':<24} {'rep-4':>7} {'dist-1':>7} {'dist-2':>7} {'dist-3':>7} {'tokens':>7} {'guard':>7}"
            f"  {'rep-4 diff':>17}  {'guard diff':>17}")
        for r in rep["settings"]:
            m = r["mean"]
            diff = r.get("diff_vs_baseline")
            cell = (lambda k: f"{diff[k]['mean']:+.4f} +- {diff[k]['se']:.4f}") if diff else (lambda k: "")
            log(f"  {r['setting']:<24} {m['repeated_ngram_rate']:>7.4f} {m.get('distinct_1', math.nan):>7.4f} "
                f"{m.get('distinct_2', math.nan):>7.4f} {m.get('distinct_3', math.nan):>7.4f} "
                f"{m['new_tokens']:>7.1f} {r['guard_perplexity']:>7.3f}  {cell('repeated_ngram_rate'):>17}  "
                f"{cell('guard_perplexity'):>17}")
    loss = result.get("heldout_loss")
    if loss:
        log(f"\nHeld-out next-token loss ({loss['windows']} windows x {loss['window_tokens']} tokens; nats/token; "
            "paired diff vs unhooked +- s.e.):")
        log(f"  {'setting':<28} {'loss':>8} {'diff':>9} {'s.e.':>8}")
        log(f"  {'unhooked (baseline)':<28} {loss['baseline']['mean_nats']:>8.4f}")
        for r in loss["settings"]:
            d = r["diff_vs_baseline"]
            log(f"  {r['param'] + '=' + format(r['value'], 'g'):<28} {r['mean_nats']:>8.4f} {d['mean']:>+9.4f} "
                f"{d['se']:>8.4f}")


def run(plan: dict, *, command: str, parts=("repetition", "loss"), log=print) -> dict:
    """Run the experiments of `parts` under `plan` (a FULL/QUICK-shaped dict) and return the result dict."""
    from cortexlab.eval.speed import num_threads
    from cortexlab.train.common import environment, git_revision

    unknown = set(parts) - {"repetition", "loss"}
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of ('repetition', 'loss'), got {parts!r}")
    started = time.perf_counter()
    with num_threads(plan["threads"]):
        model, tokenizer = _load(plan)
        result = {"command": command, "git": git_revision(), "hook_sources": hook_sources(),
                  "environment": environment(), "config": plan,
                  "model": {"name": plan["model"], "class": type(model).__name__,
                            "attn_implementation": model.config._attn_implementation,
                            "layers": model.config.num_hidden_layers, "heads": model.config.num_attention_heads}}
        seconds = {}
        if "repetition" in parts:
            t0 = time.perf_counter()
            result["repetition"] = repetition_experiment(model, tokenizer, plan, log)
            seconds["repetition"] = time.perf_counter() - t0
        if "loss" in parts:
            t0 = time.perf_counter()
            result["heldout_loss"] = loss_experiment(model, tokenizer, plan, log)
            seconds["loss"] = time.perf_counter() - t0
        seconds["total"] = time.perf_counter() - started
        result["seconds"] = seconds
    print_tables(result, log)
    return result


@contextmanager
def quiet():
    """Silence Python warnings and transformers' logging below errors for the block, then restore both."""
    import transformers

    level = transformers.logging.get_verbosity()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        try:
            yield
        finally:
            transformers.logging.set_verbosity(level)


def main(argv=None) -> int:
    from cortexlab.train.common import git_revision, write_json_atomic

    git_revision(refresh=True)   # the code as the run starts
    parser = argparse.ArgumentParser(prog="python -m cortexlab.eval.hook_effects", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, a few seconds (what the tests run)")
    parser.add_argument("--out", required=True, help="JSON output path")
    parser.add_argument("--only", choices=["repetition", "loss"], help="run one of the two experiments")
    parser.add_argument("--threads", type=int, help="torch threads (default 1)")
    parser.add_argument("--prompts", type=int, help="use the first N prompts of the set (default: all)")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--batch-size", type=int, help="prompts decoded together (default: all 20)")
    parser.add_argument("--windows", type=int)
    parser.add_argument("--window-tokens", type=int)
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    for key in ("threads", "prompts", "max_new_tokens", "batch_size", "windows", "window_tokens"):
        value = getattr(args, key)
        if value is not None:
            if value < 1:
                parser.error(f"--{key.replace('_', '-')} must be >= 1")
            plan[key] = value
    raw = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "-m", "cortexlab.eval.hook_effects", *raw])
    print(f"$ {command}", flush=True)
    with quiet():
        result = run(plan, command=command, parts=(args.only,) if args.only else ("repetition", "loss"),
                     log=lambda msg="": print(msg, flush=True))
    write_json_atomic(Path(args.out), result)
    print(f"\ntotal {result['seconds']['total']:.0f} s; wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
