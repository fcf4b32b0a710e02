"""Prefill overhead of the inference-time hooks (`cortexlab.neuro.hooks.InferenceHookPipeline`).

    python benchmarks/bench_hooks.py              # SmolLM2, 1024 tokens, writes results/bench_hooks_cpu.json
    python benchmarks/bench_hooks.py --quick      # tiny random llama, seconds (what the tests run)

One prefill forward of --tokens tokens of real text (the Python standard library's sources,
SmolLM2's tokenizer), as generate's prefill runs it: KV cache built, logits of the last token
only, no_grad. Variants, timed round-robin (a, b, c, ..., a, b, c, ...), median of --repeats:

- unhooked:    the model as loaded (SDPA attention, transformers' default);
- eager:       the model with transformers' own eager attention (the softmax probabilities the hooks
               need are only computed by an eager path: the floor a hook's cost is measured from);
- disabled:    the pipeline attached with every hook disabled (it hands every layer to SDPA);
- hebbian, habituation, temperature, voting: one hook enabled (default settings), on every layer;
- all:         the four hooks together.

Each timed call attaches its pipeline, resets it, runs the prefill and detaches; attaching and
detaching are timed on their own as well (`attach_detach_s`), so their share of a call is
visible. Reported: median and min seconds, and the ratios to unhooked (what a user pays over
the stock model) and to eager (what each hook costs over the eager attention it needs), each as
the ratio of medians and as the median of the per-round paired ratios. One thread by default.
A warm-up call of every variant on --warmup-tokens tokens comes first.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FULL = {"model": "smollm2", "tokens": 1024, "warmup_tokens": 128, "repeats": 5}
QUICK = {"model": "tiny-llama", "tokens": 128, "warmup_tokens": 16, "repeats": 2}
HOOKS = ("hebbian", "habituation", "temperature", "voting")


def variants() -> dict:
    """{name: InferenceHookConfig, None (unhooked) or "eager" (the model's eager attention)} in timing order."""
    from cortexlab.neuro.hooks import InferenceHookConfig

    out = {"unhooked": None, "eager": "eager", "disabled": InferenceHookConfig()}
    out.update({h: InferenceHookConfig(**{f"enable_{h}": True}) for h in HOOKS})
    out["all"] = InferenceHookConfig(**{f"enable_{h}": True for h in HOOKS})
    return out


def prefill_call(model, ids: torch.Tensor, config):
    """A closure: attach a fresh pipeline of `config` (None: none; "eager": switch the model to eager
    attention instead), one prefill forward, detach (or switch back)."""
    from cortexlab.neuro.hooks import InferenceHookPipeline

    pipe = None if config in (None, "eager") else InferenceHookPipeline(config)

    def call():
        own = model.config._attn_implementation
        if config == "eager":
            model.set_attn_implementation("eager")
        if pipe is not None:
            pipe.attach(model)
            pipe.reset()
        try:
            with torch.no_grad():
                model(input_ids=ids, use_cache=True, logits_to_keep=1)
        finally:
            if pipe is not None:
                pipe.detach()
            model.set_attn_implementation(own)

    return call


def attach_detach_seconds(model, repeats: int = 20) -> float:
    """Median seconds of one attach + detach of a pipeline (every hook enabled) without a forward."""
    from cortexlab.neuro.hooks import InferenceHookPipeline

    pipe = InferenceHookPipeline(variants()["all"])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipe.attach(model)
        pipe.detach()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired(num: list[float], den: list[float]) -> dict:
    ratios = [a / b for a, b in zip(num, den)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def run(plan: dict, threads: int, log=print) -> dict:
    from cortexlab.eval.decode import stdlib_token_ids
    from cortexlab.eval.speed import time_calls
    from cortexlab.models import load_base_model, tiny_model

    if plan["model"] == "tiny-llama":
        model, tokenizer = tiny_model("llama"), None
    else:
        model, tokenizer = load_base_model(None if plan["model"] == "smollm2" else plan["model"])
    ids, files = stdlib_token_ids(plan["tokens"], tokenizer)
    configs = variants()
    log(f"model {plan['model']} ({model.config.num_hidden_layers} layers, attention "
        f"{model.config._attn_implementation}); {plan['tokens']} tokens of {len(files)} stdlib files; "
        f"threads {threads}")
    warm = {name: prefill_call(model, ids[:, :plan["warmup_tokens"]], cfg) for name, cfg in configs.items()}
    calls = {name: prefill_call(model, ids, cfg) for name, cfg in configs.items()}
    log(f"warm-up ({plan['warmup_tokens']} tokens), then {plan['repeats']} round-robin rounds of {list(calls)} ...")
    time_calls(warm, warmup=1, repeats=1, threads=threads)
    timed = time_calls(calls, warmup=0, repeats=plan["repeats"], threads=threads)
    rows = {}
    for name, t in timed.items():
        rows[name] = {"median_s": t.median_s, "min_s": t.min_s, "times_s": t.times_s,
                      "config": configs[name] if configs[name] in (None, "eager") else
                      {k: v for k, v in vars(configs[name]).items() if not k.startswith("_")}}
    for name, row in rows.items():
        for ref in ("unhooked", "eager"):
            row[f"vs_{ref}"] = row["median_s"] / rows[ref]["median_s"]
            row[f"vs_{ref}_paired"] = paired(row["times_s"], rows[ref]["times_s"])
    return {"variants": rows, "attach_detach_s": attach_detach_seconds(model), "files": len(files),
            "attn_implementation_unhooked": model.config._attn_implementation,
            "layers": model.config.num_hidden_layers}


def print_report(plan: dict, res: dict, log=print) -> None:
    log(f"\nPrefill of {plan['tokens']} tokens (median of {plan['repeats']} round-robin rounds; "
        "ratio of medians [paired median]):")
    log(f"  {'variant':<12} {'median':>9} {'min':>9} {'vs unhooked':>20} {'vs eager':>20}")
    for name, r in res["variants"].items():
        log(f"  {name:<12} {r['median_s']:>8.3f}s {r['min_s']:>8.3f}s "
            f"{r['vs_unhooked']:>9.2f}x [{r['vs_unhooked_paired']['median']:.2f}x] "
            f"{r['vs_eager']:>9.2f}x [{r['vs_eager_paired']['median']:.2f}x]")
    log(f"  attach + detach alone: {res['attach_detach_s'] * 1e3:.2f} ms (inside every hooked call)")


def main(argv=None) -> int:
    from cortexlab.eval.hook_effects import hook_sources, quiet
    from cortexlab.eval.speed import num_threads
    from cortexlab.train.common import environment, git_revision, write_json_atomic

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random llama, 128 tokens: a smoke run (seconds)")
    parser.add_argument("--tokens", type=int, help="prefill length (default 1024)")
    parser.add_argument("--repeats", type=int, help="timed round-robin rounds (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", help="JSON output (default results/bench_hooks_cpu.json; --quick: "
                                      "results/bench_hooks_quick.json)")
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    for key in ("tokens", "repeats"):
        value = getattr(args, key)
        if value is not None:
            if value < 1:
                parser.error(f"--{key} must be >= 1")
            plan[key] = value
    plan["warmup_tokens"] = min(plan["warmup_tokens"], plan["tokens"])
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    out = Path(args.out) if args.out else REPO / "results" / (
        "bench_hooks_quick.json" if args.quick else "bench_hooks_cpu.json")
    raw = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "benchmarks/bench_hooks.py", *raw])
    print(f"$ {command}", flush=True)
    started = time.perf_counter()
    load_before = os.getloadavg()
    with num_threads(args.threads):
        env = environment()
        with quiet():
            res = run(plan, args.threads, log=lambda msg="": print(msg, flush=True))
    print_report(plan, res, log=lambda msg="": print(msg, flush=True))
    env.update(threads=args.threads, load_average_before=load_before, load_average_after=os.getloadavg())
    result = {"command": command, "git": git_revision(), "hook_sources": hook_sources(), "environment": env,
              "quick": args.quick, "plan": plan,
              **res, "seconds": time.perf_counter() - started}
    write_json_atomic(out, result)
    print(f"\ntotal {result['seconds']:.0f} s; wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
