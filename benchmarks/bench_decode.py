"""Decode latency, state size and prefill overhead of SmolLM2 wrapped with Cortex sidecars.

    python benchmarks/bench_decode.py                  # default CPU run (see below for its length)
    python benchmarks/bench_decode.py --quick          # tiny random model, seconds (what the tests run)
    python benchmarks/bench_decode.py --history 1024 8192 --out results/other.json
    python benchmarks/bench_decode.py --cortex-config '{"controller": false}'   # sidecars without the controller

Length of the default run on the 2-core CPU, 1 thread: about 10-15 minutes (depending on
the machine's load), most of it feeding the 32k history (32 wrapped forwards of 1024
tokens) and the prefill rounds; shorten --history for a quicker look.

Model: the bundled SmolLM2-135M-Instruct (fp32), sidecars on all 30 layers with the
default CortexWrapConfig (--cortex-config '{"field": value}' overrides fields; as attached:
fresh weights, the timing does not depend on their values). Text: the Python standard
library's own sources, tokenised with SmolLM2's tokenizer.

1. Session history. The history is fed through the wrapped model in calls of
   --call-tokens tokens (no_grad), carrying the sidecars' memory; the base model's own
   context restarts every call. The memory is kept after each --history length (the
   shorter one is the state after the first tokens of the same stream).
2. Decode (per token). For every variant, the same --prompt-tokens of current context
   are prefilled (KV cache), then greedy decode steps are timed round-robin across the
   variants: the bare base model, the wrapped model continuing each history's memory,
   the wrapped model with one sidecar (--single-layer, no history) and the sidecars'
   steps alone (no base model). A step is one token through the base (attending to its
   KV cache) and every sidecar's recurrent step. Reported: median seconds per token, the
   ratio longest/shortest history (target <= 1.1: the sidecars' cost is flat) and
   wrapped/bare (the sidecars' decode overhead), each also as the median of the per-round
   paired ratios.
3. State bytes: the sidecars' memory after each history (must be equal), as summed over
   the tensors and as `SessionStore.state_nbytes` reports it; beside it the KV cache a
   plain transformer would keep for the same history (computed from the config:
   2 * layers * kv_heads * head_dim * T * 4 bytes) and the measured KV cache of the
   decode's current context. Peak memory of one decode step: the growth of the
   resident-set high-water mark during one step (cortexlab.eval.speed.peak_memory) in a
   fresh process with a fixed glibc mmap threshold, after two warm-up steps.
4. Prefill: one forward of --prefill-tokens tokens (KV cache built, logits of the last
   token only, as generate's prefill), round-robin: bare, all-layer sidecars (target
   <= 1.3x the bare time), one sidecar, and the sidecars alone (every block called
   directly, no base model).
5. Where the sidecars' time goes: wrapped - bare is split into the sidecars alone and the
   rest (hooks, wrapper); one HybridCortexBlock is timed in parts (projections, the gated
   delta rule and its input checks, window attention, output) at the prefill length and
   at one token, and the parts' shares are applied to the sidecars' time. With a memory
   controller in the config, its entropy read-out (the output head applied once per forward
   at `entropy_layer`, so part of "rest") is timed on its own as well: computed on rows never
   seen, and, at entropy_layer 0 (the default with sidecars on every layer), looked up per
   token id as the wrapper does once a token has been seen (the timed forwards run after the
   history phase has seen the text, so they pay the lookup).

Every number, the plan, versions, git revision, threads and this command go to --out.
GPU numbers are not part of the default run (--device cuda exists but the CPU run is
what results/bench_decode_cpu.json holds).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from cortexlab.eval.decode import (
    GreedyDecoder,
    build_history,
    cache_nbytes,
    count_ops,
    kv_cache_nbytes,
    memory_layout,
    memory_nbytes,
    prefill_call,
    profile_block,
    sidecars_call,
    stdlib_token_ids,
    step_peak_memory,
)
from cortexlab.eval.speed import cpu_peak_memory_supported, environment_info, time_call, time_calls

REPO = Path(__file__).resolve().parents[1]
TARGETS = {
    "decode_history_ratio_max": 1.1,      # per-token latency, longest history / shortest
    "state_bytes_equal": True,            # sidecar memory bytes equal for every history length
    "prefill_overhead_max": 1.3,          # wrapped (all layers) / bare at the prefill length
}
FULL = {
    "model": "smollm2",
    "history": [1024, 32768],
    "call_tokens": 1024,
    "prompt_tokens": 64,
    "decode_warmup": 4,
    "decode_repeats": 64,
    "prefill_tokens": 2048,
    "prefill_warmup_tokens": 128,
    "prefill_repeats": 3,
    "single_layer": 12,
    "profile": True,
    "profile_repeats": 3,
    "profile_decode_repeats": 50,
    "step_memory": True,
    "cortex_overrides": {},
}
QUICK = {
    "model": "tiny-llama",
    "history": [64, 256],
    "call_tokens": 64,
    "prompt_tokens": 16,
    "decode_warmup": 1,
    "decode_repeats": 5,
    "prefill_tokens": 128,
    "prefill_warmup_tokens": 16,
    "prefill_repeats": 2,
    "single_layer": 1,
    "profile": True,
    "profile_repeats": 2,
    "profile_decode_repeats": 3,
    "step_memory": False,  # a fresh process costs more than the rest of the smoke run
    "cortex_overrides": {},
}
TINY = dict(num_hidden_layers=4)  # tiny_model("llama") with 4 layers: one sidecar differs from all


def git_revision() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    changed = git("status", "--porcelain", "--", "cortexlab", "benchmarks")
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(changed),
            "changed_files": changed.splitlines()}


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def fmt_s(x: float | None) -> str:
    return "-" if x is None else (f"{x * 1e3:.2f} ms" if x < 10 else f"{x:.2f} s")


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def load_models(plan: dict, device: str):
    """(all-layer CortexModel, single-layer CortexModel, tokenizer or None). Two copies of the
    base model, since a base model carries one set of sidecars at a time."""
    from cortexlab.cortex import CortexWrapConfig, attach_cortex
    from cortexlab.models import load_base_model, tiny_model

    if plan["model"] == "tiny-llama":
        bases, tokenizer = [tiny_model("llama", **TINY) for _ in range(2)], None
    else:
        name = None if plan["model"] == "smollm2" else plan["model"]
        (b1, tokenizer), (b2, _) = load_base_model(name), load_base_model(name)
        bases = [b1, b2]
    bases = [b.to(device) for b in bases]
    n_layers = bases[0].config.num_hidden_layers
    if not 0 <= plan["single_layer"] < n_layers:
        raise ValueError(f"--single-layer {plan['single_layer']} is out of range for {n_layers} layers")
    overrides = plan["cortex_overrides"]
    wrapped = attach_cortex(bases[0], CortexWrapConfig(**overrides))
    single = attach_cortex(bases[1], CortexWrapConfig(**{**overrides, "layers": [plan["single_layer"]]}))
    return wrapped, single, tokenizer


def nbytes_of(module) -> int:
    return sum(p.nbytes for p in module.parameters())


# --------------------------------------------------------------------------------------
# phases


def history_phase(wrapped, ids, plan, log) -> dict:
    from cortexlab.cortex.wrap import flatten_memory

    log(f"\n[history] feeding {max(plan['history'])} tokens in calls of {plan['call_tokens']} "
        f"(snapshots at {plan['history']}) ...")
    hist = build_history(wrapped, ids, call_tokens=plan["call_tokens"], snapshots=plan["history"], progress=True)
    state = {}
    for n, mem in hist["snapshots"].items():
        sid = f"history-{n}"
        wrapped.sessions.put(sid, flatten_memory(mem))
        state[n] = {"memory_nbytes": memory_nbytes(mem), "session_state_nbytes": wrapped.sessions.state_nbytes(sid),
                    "tokens_read": int(mem[min(mem)]["tokens"][0]),
                    "bare_kv_cache_nbytes_computed": kv_cache_nbytes(wrapped.base.config, n)}
    log(f"[history] {len(hist['call_times_s'])} calls in {hist['total_s']:.1f} s "
        f"({hist['total_s'] / ids.shape[1] * 1e3:.2f} ms/token)")
    return {"snapshots": hist["snapshots"], "state": state, "call_tokens": hist["call_tokens"],
            "call_times_s": hist["call_times_s"], "total_s": hist["total_s"],
            "layout": memory_layout(hist["memory"])}


def decode_phase(wrapped, single, prompt, snapshots, plan, threads, device, log) -> dict:
    hist = sorted(snapshots)
    labels = {"bare": "bare base model"}
    decoders = {"bare": GreedyDecoder(wrapped, prompt, disabled=True)}
    for n in hist:
        decoders[f"wrapped_h{n}"] = GreedyDecoder(wrapped, prompt, snapshots[n])
        labels[f"wrapped_h{n}"] = f"wrapped, all {len(wrapped.sidecars)} layers, history {n}"
    decoders["single_h0"] = GreedyDecoder(single, prompt, None)
    labels["single_h0"] = f"wrapped, layers={single.layer_ids}, no history"
    calls = {**decoders, "sidecars_only": sidecars_call(wrapped, 1, memory=snapshots[hist[-1]])}
    labels["sidecars_only"] = f"the {len(wrapped.sidecars)} sidecar steps alone"
    log(f"\n[decode] {plan['decode_repeats']} greedy steps per variant after a {prompt.shape[1]}-token prompt, "
        f"round-robin over {list(calls)} ...")
    timed = time_calls(calls, warmup=plan["decode_warmup"], repeats=plan["decode_repeats"], threads=threads,
                       device=device)
    rows = {}
    for key in calls:
        rows[key] = {"label": labels[key], "median_s": timed[key].median_s, "min_s": timed[key].min_s,
                     "times_s": timed[key].times_s}
        dec = decoders.get(key)
        if dec is not None:
            first = None if not dec.memory else dec.memory[min(dec.memory)]
            rows[key].update(context_tokens_at_end=dec.context_tokens(),
                             kv_cache_nbytes_measured=cache_nbytes(dec.cache),
                             memory_nbytes=None if dec.memory is None else memory_nbytes(dec.memory),
                             memory_tokens_read=None if first is None else int(first["tokens"][0]))
    for key in ("bare", f"wrapped_h{hist[-1]}", "sidecars_only"):
        rows[key]["ops_per_step"] = count_ops(calls[key])
    return rows


def prefill_phase(wrapped, single, ids, plan, threads, device, log) -> dict:
    def variants(x):
        return {"bare": prefill_call(wrapped, x, disabled=True), "wrapped_all": prefill_call(wrapped, x),
                "wrapped_single": prefill_call(single, x), "sidecars_only": sidecars_call(wrapped, x.shape[1])}

    for fn in variants(ids[:, :plan["prefill_warmup_tokens"]]).values():
        fn()  # warm-up on a short input: code paths and threads, without a full-length call
    calls = variants(ids)
    log(f"\n[prefill] {ids.shape[1]} tokens, {plan['prefill_repeats']} round-robin repeats of {list(calls)} ...")
    timed = time_calls(calls, warmup=0, repeats=plan["prefill_repeats"], threads=threads, device=device)
    return {key: {"median_s": t.median_s, "min_s": t.min_s, "times_s": t.times_s} for key, t in timed.items()}


def profile_phase(wrapped, snapshots, prefill_ids, plan, threads, log) -> dict:
    layer = plan["single_layer"]
    block = wrapped.sidecars[str(layer)]
    T = plan["prefill_tokens"]
    log(f"\n[profile] one sidecar (layer {layer}) in parts: T={T} and one decode step ...")
    prefill = profile_block(block, T, repeats=plan["profile_repeats"], threads=threads)
    state = snapshots[max(snapshots)][layer]
    decode = profile_block(block, 1, state=state, repeats=plan["profile_decode_repeats"], threads=threads)
    lens = lens_reference(wrapped, prefill_ids, plan, threads, log)
    return {"layer": layer, "prefill": prefill, "decode": decode, "entropy_lens": lens}


def lens_reference(wrapped, ids, plan, threads, log) -> dict | None:
    """With a memory controller in the config: the cost of its entropy signal, read once per
    forward, which `sidecars_call` does not include. "median_s": computed (the base's final
    norm + output head + entropy) on T rows that are all distinct, the cost when no token of
    the forward has been seen before; "looked_up_s" (entropy_layer 0 only): the same tokens
    read through the wrapper's per-token cache once they have been seen, as in the timed
    forwards (the history phase saw the text first). None without a controller."""
    if not wrapped.config.controller:
        return None
    from cortexlab.cortex.controller import predictive_entropy

    norm, head = wrapped.base.get_decoder().norm, wrapped.base.get_output_embeddings()
    d_model = wrapped.base.config.hidden_size
    cache = wrapped.token_entropy
    log(f"[profile] the controller's entropy read-out (final norm + output head + entropy), T={ids.shape[1]} and "
        f"T=1, computed{' and looked up' if cache is not None else ''} ...")
    out = {}
    for key, x_ids, repeats in (("prefill", ids, plan["profile_repeats"]),
                                ("decode", ids[:, -1:], plan["profile_decode_repeats"])):
        n = x_ids.shape[1]
        x = torch.randn(1, n, d_model, generator=torch.Generator().manual_seed(0)).to(ids.device)

        def call(x=x):
            with torch.no_grad():
                predictive_entropy(x, norm, head)

        call()
        t = time_call(call, warmup=0, repeats=repeats, threads=threads)
        out[key] = {"T": n, "median_s": t.median_s, "times_s": t.times_s}
        if cache is not None:
            embeds = wrapped.base.get_input_embeddings()(x_ids)

            def lookup(x_ids=x_ids, embeds=embeds):
                cache(x_ids, embeds)

            lookup()   # the first sight of any token not seen in the history
            t = time_call(lookup, warmup=0, repeats=repeats, threads=threads)
            out[key].update(looked_up_s=t.median_s, looked_up_times_s=t.times_s)
    return out


# --------------------------------------------------------------------------------------
# peak memory of a decode step, in a fresh process


def memory_worker(spec: dict) -> dict:
    """Inside a fresh interpreter: peak memory of one decode step of each variant."""
    torch.set_num_threads(spec["threads"])
    plan = spec["plan"]
    wrapped, single, tokenizer = load_models(plan, spec["device"])
    H, P = max(plan["history"]), plan["prompt_tokens"]
    prompt = stdlib_token_ids(H + P, tokenizer)[0][:, H:].to(spec["device"])
    out = {}
    for key, model, disabled in (("bare", wrapped, True), ("wrapped", wrapped, False), ("single", single, False)):
        out[key] = step_peak_memory(GreedyDecoder(model, prompt, None, disabled=disabled), device=spec["device"])
    return out


def measure_step_memory(plan: dict, threads: int, device: str, log) -> dict:
    method = ("growth of the resident-set high-water mark (VmHWM) during one greedy decode step, after two "
              "warm-up steps, in a fresh process with MALLOC_MMAP_THRESHOLD_=65536 (freed blocks over 64 KiB go back "
              "to the OS); the sidecars start from a fresh memory there (same shapes as after any history)")
    if device == "cpu" and not cpu_peak_memory_supported():
        return {"skipped": "needs Linux /proc/self/clear_refs", "method": method}
    log("\n[memory] peak memory of one decode step (fresh process) ...")
    spec = {"plan": plan, "threads": threads, "device": device}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, "--memory-worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=REPO, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        log(f"  memory worker failed: {proc.stderr.strip()[-500:]}")
        return {"failed": proc.stderr.strip()[-2000:], "method": method}
    return {"step_peak_bytes": json.loads(lines[-1]), "method": method}


# --------------------------------------------------------------------------------------
# report


def paired_ratios(num: list[float], den: list[float]) -> dict:
    """Per-round ratios of two round-robin series (each pair ran back to back)."""
    ratios = [a / b for a, b in zip(num, den)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "all": ratios}


def summarise(history, decode, prefill, profile, n_layers) -> dict:
    hist = sorted(history["state"])
    short, long = f"wrapped_h{hist[0]}", f"wrapped_h{hist[-1]}"
    bare = decode["bare"]["median_s"]
    state_bytes = [history["state"][n]["memory_nbytes"] for n in hist]
    session_bytes = [history["state"][n]["session_state_nbytes"] for n in hist]
    out = {
        "histories": hist,
        "decode_history_ratio": decode[long]["median_s"] / decode[short]["median_s"],
        "decode_history_ratio_paired": paired_ratios(decode[long]["times_s"], decode[short]["times_s"]),
        "decode_overhead_vs_bare": {key: row["median_s"] / bare for key, row in decode.items()
                                    if key not in ("bare", "sidecars_only")},
        "decode_overhead_vs_bare_paired": {key: paired_ratios(row["times_s"], decode["bare"]["times_s"])
                                           for key, row in decode.items() if key not in ("bare", "sidecars_only")},
        "state_bytes": dict(zip(map(str, hist), state_bytes)),
        "state_bytes_equal": len(set(state_bytes + session_bytes)) == 1,
        "bare_kv_cache_bytes_computed": {str(n): history["state"][n]["bare_kv_cache_nbytes_computed"] for n in hist},
        "prefill_overhead_all_layers": prefill["wrapped_all"]["median_s"] / prefill["bare"]["median_s"],
        "prefill_overhead_all_layers_paired": paired_ratios(prefill["wrapped_all"]["times_s"],
                                                            prefill["bare"]["times_s"]),
        "prefill_overhead_single_layer": prefill["wrapped_single"]["median_s"] / prefill["bare"]["median_s"],
        "prefill_overhead_single_layer_paired": paired_ratios(prefill["wrapped_single"]["times_s"],
                                                              prefill["bare"]["times_s"]),
    }
    out["kv_over_state_at_longest_history"] = out["bare_kv_cache_bytes_computed"][str(hist[-1])] / state_bytes[-1]
    out["targets_met"] = {
        "decode_history_ratio": out["decode_history_ratio"] <= TARGETS["decode_history_ratio_max"],
        "state_bytes_equal": out["state_bytes_equal"],
        "prefill_overhead": out["prefill_overhead_all_layers"] <= TARGETS["prefill_overhead_max"],
    }
    attribution = {}
    for phase, table, wrapped_key in (("prefill", prefill, "wrapped_all"), ("decode", decode, long)):
        extra = table[wrapped_key]["median_s"] - table["bare"]["median_s"]
        alone = table["sidecars_only"]["median_s"]
        att = {"wrapped_minus_bare_s": extra, "sidecars_only_s": alone, "rest_s": extra - alone,
               "bare_s": table["bare"]["median_s"], "sidecars_only_over_bare": alone / table["bare"]["median_s"]}
        if profile:  # the parts' shares of one block (timed round-robin together), applied to the sidecars' time
            p = profile[phase]
            parts = {**p["parts_s"], "other": p["other_s"]}
            att["part_share_of_block"] = {k: v / p["block_s"] for k, v in parts.items()}
            att["part_estimated_s"] = {k: alone * v / p["block_s"] for k, v in parts.items()}
            if profile.get("entropy_lens"):
                att["entropy_lens_s"] = profile["entropy_lens"][phase]["median_s"]  # once per forward, computed
                if "looked_up_s" in profile["entropy_lens"][phase]:
                    att["entropy_looked_up_s"] = profile["entropy_lens"][phase]["looked_up_s"]
        attribution[phase] = att
    out["attribution"] = attribution
    return out


def print_report(plan, history, decode, prefill, profile, step_memory, summary, n_layers, log) -> None:
    hist = summary["histories"]
    log("\n" + "=" * 100)
    log(f"Session history: {max(hist)} tokens in {len(history['call_times_s'])} calls of <= {plan['call_tokens']}: "
        f"{history['total_s']:.1f} s ({history['total_s'] / max(hist) * 1e3:.2f} ms/token, wrapped forward)")
    log("\nState bytes after the history (sidecar memory, all layers) vs a plain transformer's KV cache (computed):")
    log(f"  {'history':>8} {'sidecar state':>14} {'SessionStore':>14} {'bare KV cache':>14} {'KV / state':>11}")
    for n in hist:
        s = history["state"][n]
        log(f"  {n:>8} {fmt_bytes(s['memory_nbytes']):>14} {fmt_bytes(s['session_state_nbytes']):>14} "
            f"{fmt_bytes(s['bare_kv_cache_nbytes_computed']):>14} "
            f"{s['bare_kv_cache_nbytes_computed'] / s['memory_nbytes']:>10.3g}x")
    log(f"  per layer: {history['layout']['per_layer']}")

    peaks = step_memory.get("step_peak_bytes", {})
    peak_of = {"bare": peaks.get("bare"), "single_h0": peaks.get("single")}
    peak_of.update({f"wrapped_h{n}": peaks.get("wrapped") for n in hist})
    log(f"\nDecode, per token (median of {plan['decode_repeats']} greedy steps, round-robin; "
        f"prompt {plan['prompt_tokens']} tokens):")
    log(f"  {'variant':<44} {'median':>10} {'min':>10} {'vs bare':>8} {'KV ctx':>7} {'KV cache':>11} "
        f"{'state':>11} {'step peak':>11}")
    bare = decode["bare"]["median_s"]
    for key, r in decode.items():
        ctx = r.get("context_tokens_at_end", "-")
        log(f"  {r['label']:<44} {fmt_s(r['median_s']):>10} {fmt_s(r['min_s']):>10} {r['median_s'] / bare:>7.2f}x "
            f"{ctx:>7} {fmt_bytes(r.get('kv_cache_nbytes_measured')):>11} "
            f"{fmt_bytes(r.get('memory_nbytes')):>11} {fmt_bytes(peak_of.get(key)):>11}")
    log("  KV cache: measured, the current call's context only (the history is not in it). "
        "state: the sidecars' memory after decoding.")
    if peaks:
        log(f"  step peak: {step_memory['method']}")
    else:
        log(f"  step peak: not measured ({step_memory.get('skipped') or 'the worker failed'})")
    ops = {k: r["ops_per_step"] for k, r in decode.items() if "ops_per_step" in r}
    log(f"  torch ops per step: {ops}")

    log(f"\nPrefill of {plan['prefill_tokens']} tokens (median of {plan['prefill_repeats']}, round-robin):")
    for key, label in (("bare", "bare base model"), ("wrapped_all", f"wrapped, all {n_layers} layers"),
                       ("wrapped_single", f"wrapped, layers=[{plan['single_layer']}]"),
                       ("sidecars_only", f"the {n_layers} sidecars alone")):
        r = prefill[key]
        log(f"  {label:<30} {fmt_s(r['median_s']):>10}  (times {', '.join(fmt_s(t) for t in r['times_s'])})")

    log("\nWhere the sidecars' time goes (same-run round-robin medians):")
    for phase in ("prefill", "decode"):
        att = summary["attribution"][phase]
        label = f"prefill {plan['prefill_tokens']}" if phase == "prefill" else "decode step"
        log(f"  {label}: wrapped - bare = {fmt_s(att['wrapped_minus_bare_s'])}; the {n_layers} sidecars alone = "
            f"{fmt_s(att['sidecars_only_s'])} ({att['sidecars_only_over_bare']:.2f}x of bare); rest (hooks, "
            f"wrapper, interference) = {fmt_s(att['rest_s'])}")
        if profile:
            p = profile[phase]
            log(f"    one block (layer {profile['layer']}, T={p['T']}): {fmt_s(p['block_s'])}, {p['ops']} torch ops; "
                f"parts as share of the block -> share of the {n_layers} sidecars' time:")
            for part, share in att["part_share_of_block"].items():
                note = {"rule_checks": "  (part of rule)",
                        "other": "  (block minus the parts: work no part covers, or noise)"}.get(part, "")
                log(f"      {part:<12} {fmt_s(share * p['block_s']):>10} {share:6.1%} -> "
                    f"{fmt_s(att['part_estimated_s'][part])}{note}")
            if "entropy_lens_s" in att:
                lens = profile["entropy_lens"][phase]
                looked_up = f"; looked up per token id once seen: {fmt_s(lens['looked_up_s'])}" \
                    if "looked_up_s" in lens else ""
                log(f"    the controller's entropy read-out, once per forward (not in the sidecars alone): "
                    f"computed {fmt_s(lens['median_s'])} at T={lens['T']}{looked_up}")

    log("\nRatios (same run; median-of-rounds ratio, then the per-round paired ratios' median [min-max]):")
    met = summary["targets_met"]
    pr = summary["decode_history_ratio_paired"]
    log(f"  decode per token, history {hist[-1]} / history {hist[0]}: {summary['decode_history_ratio']:.3f} "
        f"[paired {pr['median']:.3f}, {pr['min']:.2f}-{pr['max']:.2f}] (target <= "
        f"{TARGETS['decode_history_ratio_max']}: {verdict(met['decode_history_ratio'])})")
    log(f"  sidecar state bytes equal for every history: {summary['state_bytes_equal']} "
        f"({verdict(met['state_bytes_equal'])}); a plain transformer's KV cache for {hist[-1]} tokens would be "
        f"{summary['kv_over_state_at_longest_history']:.3g}x the sidecar state (computed)")
    for key, ratio in summary["decode_overhead_vs_bare"].items():
        pr = summary["decode_overhead_vs_bare_paired"][key]
        log(f"  decode overhead, {decode[key]['label']} / bare: {ratio:.2f}x [paired {pr['median']:.2f}x]")
    for key, label, target in (("all_layers", f"all {n_layers} layers", True),
                               ("single_layer", f"layers=[{plan['single_layer']}]", False)):
        ratio, pr = summary[f"prefill_overhead_{key}"], summary[f"prefill_overhead_{key}_paired"]
        goal = (f"target <= {TARGETS['prefill_overhead_max']}: {verdict(met['prefill_overhead'])}" if target
                else "no target")
        log(f"  prefill overhead at {plan['prefill_tokens']} tokens, {label} / bare: {ratio:.2f}x "
            f"[paired {pr['median']:.2f}x, {pr['min']:.2f}-{pr['max']:.2f}] ({goal})")


# --------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random llama, tiny sizes: a smoke run (seconds)")
    parser.add_argument("--model", help="base model folder or cached hub name (default: bundled SmolLM2-135M)")
    parser.add_argument("--history", type=int, nargs="+", help="session history lengths to compare (tokens)")
    parser.add_argument("--call-tokens", type=int, help="tokens per call while feeding the history")
    parser.add_argument("--prompt-tokens", type=int, help="tokens of current context before decoding")
    parser.add_argument("--decode-steps", type=int, help="timed greedy decode steps per variant")
    parser.add_argument("--prefill-tokens", type=int, help="length of the prefill comparison")
    parser.add_argument("--prefill-repeats", type=int, help="timed prefill repeats per variant")
    parser.add_argument("--single-layer", type=int, help="the layer of the one-sidecar variant")
    parser.add_argument("--cortex-config", help='JSON overrides of CortexWrapConfig fields for both wrapped models, '
                                                 'e.g. \'{"window_size": 64}\' (default: the library defaults)')
    parser.add_argument("--no-profile", action="store_true", help="skip the per-part profile of one sidecar")
    parser.add_argument("--no-step-memory", action="store_true",
                        help="skip the decode step's peak memory (a fresh process)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine, OpenMP with 2 threads stalls "
                             "whenever another process holds a core)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="JSON output (default results/bench_decode_cpu.json; "
                                      "--quick: results/bench_decode_quick.json)")
    args = parser.parse_args(argv)
    if args.memory_worker:
        warnings.filterwarnings("ignore")
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return 0

    plan = dict(QUICK if args.quick else FULL)
    for key, value in (("model", args.model), ("history", args.history), ("call_tokens", args.call_tokens),
                       ("prompt_tokens", args.prompt_tokens), ("decode_repeats", args.decode_steps),
                       ("prefill_tokens", args.prefill_tokens), ("prefill_repeats", args.prefill_repeats),
                       ("single_layer", args.single_layer)):
        if value is not None:
            plan[key] = value
    if args.no_profile:
        plan["profile"] = False
    if args.no_step_memory:
        plan["step_memory"] = False
    if args.cortex_config:
        try:
            plan["cortex_overrides"] = json.loads(args.cortex_config)
        except json.JSONDecodeError as err:
            parser.error(f"--cortex-config is not valid JSON: {err}")
        if not isinstance(plan["cortex_overrides"], dict):
            parser.error("--cortex-config must be a JSON object of CortexWrapConfig fields")
    plan["history"] = sorted(set(plan["history"]))
    for key in ("call_tokens", "prompt_tokens", "decode_repeats", "prefill_tokens", "prefill_repeats"):
        if plan[key] < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if len(plan["history"]) < 2 or plan["history"][0] < 1:
        parser.error("--history needs at least two distinct positive lengths")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    out = Path(args.out) if args.out else REPO / "results" / (
        "bench_decode_quick.json" if args.quick else "bench_decode_cpu.json")

    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    device = args.device

    def log(msg=""):
        print(msg, flush=True)

    started = time.perf_counter()
    git_at_start = git_revision()
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    log(f"$ {command}")
    env = environment_info()
    env.update(threads=args.threads, device=device, python=sys.version.split()[0],
               load_average_before=os.getloadavg())
    log(f"torch {env['torch']}, transformers {env['transformers']}, threads {args.threads}, device {device}, "
        f"load average {env['load_average_before'][0]:.2f}")

    phase_s = {}
    t0 = time.perf_counter()
    wrapped, single, tokenizer = load_models(plan, device)
    n_layers = len(wrapped.sidecars)
    H, P, n_prefill = max(plan["history"]), plan["prompt_tokens"], plan["prefill_tokens"]
    ids, files = stdlib_token_ids(H + P + n_prefill, tokenizer)
    ids = ids.to(device)
    history_ids, prompt, prefill_ids = ids[:, :H], ids[:, H:H + P], ids[:, H + P:]
    phase_s["load_and_tokenise"] = time.perf_counter() - t0
    log(f"model: {plan['model']} ({n_layers} layers, hidden {wrapped.base.config.hidden_size}); text: "
        f"{len(files)} standard-library files ({files[0]} .. {files[-1]}), {ids.shape[1]} tokens")

    t0 = time.perf_counter()
    history = history_phase(wrapped, history_ids, plan, log)
    phase_s["history"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    decode = decode_phase(wrapped, single, prompt, history["snapshots"], plan, args.threads, device, log)
    phase_s["decode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prefill = prefill_phase(wrapped, single, prefill_ids, plan, args.threads, device, log)
    phase_s["prefill"] = time.perf_counter() - t0
    profile = None
    if plan["profile"]:
        t0 = time.perf_counter()
        profile = profile_phase(wrapped, history["snapshots"], prefill_ids, plan, args.threads, log)
        phase_s["profile"] = time.perf_counter() - t0

    step_memory = {"skipped": "not run (--quick or --no-step-memory)"}
    if plan["step_memory"]:
        t0 = time.perf_counter()
        step_memory = measure_step_memory(plan, args.threads, device, log)
        phase_s["step_memory"] = time.perf_counter() - t0

    summary = summarise(history, decode, prefill, profile, n_layers)
    print_report(plan, history, decode, prefill, profile, step_memory, summary, n_layers, log)
    gpu = ({"device": torch.cuda.get_device_name(0)} if device.startswith("cuda") else
           {"skipped": "GPU numbers were not run (this is a CPU run"
                       + ("" if torch.cuda.is_available() else "; no CUDA device on this machine") + ")"})
    if "skipped" in gpu:
        log(f"\n[gpu] {gpu['skipped']}")
    env["load_average_after"] = os.getloadavg()
    phase_s["total"] = time.perf_counter() - started

    config = wrapped.base.config
    result = {
        "command": command,
        "git": git_at_start,
        "git_at_end": git_revision(),
        "environment": env,
        "quick": args.quick,
        "plan": plan,
        "targets": TARGETS,
        "model": {"name": plan["model"], "layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
                  "kv_heads": getattr(config, "num_key_value_heads", None),
                  "head_dim": getattr(config, "head_dim", None), "base_param_bytes": nbytes_of(wrapped.base),
                  "sidecar_param_bytes_all_layers": nbytes_of(wrapped.sidecars),
                  "sidecar_param_bytes_single_layer": nbytes_of(single.sidecars),
                  "cortex_config": json.loads(wrapped.config.to_json()),
                  "sidecar_weights": "as attached (fresh; zero output projection), timing does not depend on them"},
        "text": {"source": "python standard library sources (sysconfig stdlib, *.py sorted by name)",
                 "files": len(files), "first_file": files[0], "last_file": files[-1], "tokens": int(ids.shape[1]),
                 "tokenizer": None if tokenizer is None else type(tokenizer).__name__},
        "history": {"total_s": history["total_s"], "call_tokens": history["call_tokens"],
                    "call_times_s": history["call_times_s"], "state": {str(k): v for k, v in history["state"].items()},
                    "state_layout": history["layout"]},
        "decode": decode,
        "decode_step_memory": step_memory,
        "prefill": prefill,
        "profile": profile,
        "summary": summary,
        "gpu": gpu,
        "phase_seconds": phase_s,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    log(f"\ntotal {phase_s['total']:.1f} s ({', '.join(f'{k} {v:.0f} s' for k, v in phase_s.items() if k != 'total')})")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
