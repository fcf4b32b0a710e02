"""E4: Cortex v1 vs v2, the source design's comparison table, measured.

    python -m cortexlab.eval.versions    (-> results/cortex_v1_v2.json)

v1 (the design's prototype): the memory as a per-token sequential loop (`CortexBlock`) with the "bias hack"
forget gate a = sigmoid(w.x + 2) (~0.88 per token). v2 (production): the chunkwise-parallel gated delta rule
with the sliding window beside it (`HybridCortexBlock`) and the log-space gate g = -softplus(w.x - 7)
(~0.999 per token). Both start from a zero output projection.

Rows of the table:

- training throughput: tokens per second of forward + backward of one sidecar block alone (SmolLM2's width,
  4 heads x 64, no controller) at several lengths T, v1 and v2 timed round-robin in the same run
  (`block_throughput`); the ratio is v2 / v1.
- memory persistence: the retention half-life in tokens (`retention_half_lives`): for writes at many places in a
  held-out stdlib module read at the sidecar's layer of frozen SmolLM2, the fraction of each write still in the
  state n tokens later (`cortexlab.eval.memory_trace.retention`: forgetting and overwriting by later writes), and
  the first n where the mean falls below 1/2. Blocks: the trained recall sidecar (E2, v2's gate), the same
  sidecar with v1's gate (every weight kept, the gate's bias set to +2), and fresh blocks of both kinds. The
  mean over all writes is dominated by filler that later writes overwrite (the delta rule erases along
  similar keys), so it is short even where the forget gate alone would keep a write for ~760 tokens; what a
  trained memory keeps on purpose shows in the recall row.
- recall across calls (behaviour): E2's exact match vs distance, read from its results file, and the distance in
  tokens at which it halves (`recall_half_life`); no v1 sidecar is trained here (its gate leaves ~0.88^128 of a
  fact after one 128-token call, so it cannot carry one; see notebook 01).
- ghost start: max |logits - base logits| of a freshly wrapped SmolLM2 for each version (zero by construction).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from cortexlab.cortex import CortexBlock, CortexWrapConfig, HybridCortexBlock, attach_cortex
from cortexlab.results import FIRST_RECALL_ADAPTER

from .memory_trace import block_input, lag_to_fraction, retention, trace_block, with_forget_gate
from .speed import forward_backward_call, time_calls

__all__ = ["V1_CONFIG", "V2_CONFIG", "block_throughput", "ghost_gap", "recall_half_life", "retention_half_lives",
           "run_versions", "versions_table"]

V1_CONFIG = CortexWrapConfig(rank_fast=64, num_heads=4, forget_gate="sigmoid", use_hybrid=False, controller=False)
V2_CONFIG = CortexWrapConfig(rank_fast=64, num_heads=4, forget_gate="log", use_hybrid=True, controller=False)


def _make_sequential_(block: HybridCortexBlock) -> HybridCortexBlock:
    """Run `block`'s memory as v1's per-token loop (`CortexBlock`), keeping its weights; in place."""
    sequential = CortexBlock(block.out_proj.out_features, block.cfg)
    sequential.load_state_dict(block.gdn.state_dict())
    block.gdn = sequential
    return block


def _v1_block(d_model: int, cfg: CortexWrapConfig) -> HybridCortexBlock:
    """A fresh v1 sidecar: a `HybridCortexBlock` whose memory is the sequential `CortexBlock`."""
    return _make_sequential_(HybridCortexBlock(d_model, cfg))


def block_throughput(lengths: Sequence[int] = (128, 512, 2048), *, d_model: int = 576, batch_size: int = 1,
                     repeats: int = 3, seed: int = 0, v1: CortexWrapConfig = V1_CONFIG,
                     v2: CortexWrapConfig = V2_CONFIG) -> list[dict]:
    """Forward + backward tokens/s of a v1 and a v2 block at each length T (round-robin timing, median of
    `repeats`); rows {"T", "v1_seconds", "v2_seconds", "v1_tokens_per_s", "v2_tokens_per_s", "speedup"}."""
    if not lengths or any(not isinstance(T, int) or T < 1 for T in lengths):
        raise ValueError(f"lengths must be positive ints, got {lengths!r}")
    torch.manual_seed(seed)
    blocks = {"v1": _v1_block(d_model, v1), "v2": HybridCortexBlock(d_model, v2)}
    for block in blocks.values():   # a non-zero output so the backward pass reaches every weight
        torch.nn.init.normal_(block.out_proj.weight, std=0.02)
    rows = []
    for T in lengths:
        x = torch.randn(batch_size, T, d_model, generator=torch.Generator().manual_seed(seed))
        calls = {name: forward_backward_call(lambda x, b=block: b(x)[0], [x]) for name, block in blocks.items()}
        timing = time_calls(calls, warmup=1, repeats=repeats)
        t1, t2 = timing["v1"].median_s, timing["v2"].median_s
        rows.append({"T": T, "v1_seconds": round(t1, 6), "v2_seconds": round(t2, 6),
                     "v1_tokens_per_s": round(batch_size * T / t1, 1), "v2_tokens_per_s": round(batch_size * T / t2, 1),
                     "speedup": round(t1 / t2, 2)})
    return rows


def retention_half_lives(model, input_ids: torch.Tensor, layer: int, blocks: Mapping[str, HybridCortexBlock], *,
                         horizon: int = 1024, stride: int = 16) -> dict:
    """Retention of writes in each block over `input_ids` [1, T] read at `layer` of a `CortexModel`.

    Writes at every `stride`-th token of the first T - horizon are followed for `horizon` tokens.
    Returns {"lags": [0, 1, 2, 3, 4, 6, 8, 12, ..., horizon], "blocks": {name: {"half_life": tokens or None
    (not below 1/2 within horizon), "gate_only_half_life", "curve": mean retained fraction at those lags,
    "gate_only_curve"}}, ...}.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be a [1, T] tensor, got {getattr(input_ids, 'shape', input_ids)}")
    T = input_ids.shape[1]
    if not isinstance(horizon, int) or not 1 <= horizon < T:
        raise ValueError(f"horizon must be an int in [1, {T - 1}] for {T} tokens, got {horizon!r}")
    x, _, entropy = block_input(model, input_ids, layer)
    starts = list(range(0, T - horizon, stride))
    lags = sorted({0, horizon} | {m << e for e in range(horizon.bit_length()) for m in (2, 3) if m << e <= horizon}
                  | {1})
    out = {}
    for name, block in blocks.items():
        kept = retention(trace_block(block, x, entropy=entropy), starts, horizon)
        out[name] = {"half_life": lag_to_fraction(kept["mean"]),
                     "gate_only_half_life": lag_to_fraction(kept["gate_only_mean"]),
                     "curve": [round(v, 5) for v in kept["mean"][lags].tolist()],
                     "gate_only_curve": [round(v, 5) for v in kept["gate_only_mean"][lags].tolist()]}
    return {"tokens": T, "horizon": horizon, "stride": stride, "writes": len(starts), "layer": layer,
            "lags": lags, "blocks": out}


def recall_half_life(exact_match: Mapping[str, float], call_tokens: int) -> dict:
    """From E2's exact match by distance in calls ({"1": 0.9, "2": ...}): the smallest distance (in calls and
    tokens, distance x call_tokens) at which exact match is at most half its value at distance 1 (None: never
    within the distances measured), and the longest distance measured."""
    far = sorted((int(d), v) for d, v in exact_match.items() if int(d) >= 1)
    if not far or far[0][0] != 1:
        raise ValueError(f"exact_match needs distance 1 and beyond, got {sorted(exact_match)}")
    first = far[0][1]
    half = next((d for d, v in far if v <= first / 2), None)
    return {"at_distance_1": first, "half_life_calls": half,
            "half_life_tokens": None if half is None else half * call_tokens,
            "longest_calls": far[-1][0], "longest_tokens": far[-1][0] * call_tokens,
            "exact_match_at_longest": far[-1][1]}


@torch.no_grad()
def ghost_gap(base, input_ids: torch.Tensor, configs: Mapping[str, CortexWrapConfig],
              sequential: Sequence[str] = ("v1",)) -> dict[str, float]:
    """max |logits(base + fresh sidecars) - logits(base)| for each config: a fresh sidecar changes nothing.
    The sidecars of the configs named in `sequential` run their memory as v1's per-token loop (`CortexBlock`)."""
    reference = base(input_ids).logits
    gaps = {}
    for name, cfg in configs.items():
        model = attach_cortex(base, cfg)
        try:
            if name in sequential:
                for block in model.sidecars.values():
                    _make_sequential_(block)
            gaps[name] = (model(input_ids).logits - reference).abs().max().item()
        finally:
            model.detach()
    return gaps


def run_versions(adapter: str | Path = f"results/{FIRST_RECALL_ADAPTER}", recall_results: str | Path | None = None, *,
                 lengths: Sequence[int] = (128, 512, 2048), horizon: int = 1024, text_tokens: int = 2048,
                 repeats: int = 3) -> dict:
    """Every row of the E4 table (see the module doc); returns the results dict."""
    from cortexlab.cortex import load_with_cortex
    from cortexlab.data import stdlib_documents

    t0 = time.time()
    adapter = Path(adapter)
    model = load_with_cortex(adapter=adapter)
    model.eval()
    layer = model.layer_ids[0]
    trained = model.sidecars[str(layer)]
    d_model = model.base.config.hidden_size
    name, ids = next(iter(stdlib_documents(model.tokenizer, "heldout", min_tokens=text_tokens, max_docs=1).items()))
    torch.manual_seed(0)
    fresh_v2 = HybridCortexBlock(d_model, dataclasses.replace(trained.cfg, forget_gate="log", forget_bias=None))
    blocks = {"v2 trained (E2 sidecar)": trained,
              "v1 gate on the trained sidecar": with_forget_gate(trained, "sigmoid"),
              "v2 fresh": fresh_v2,
              "v1 fresh": with_forget_gate(fresh_v2, "sigmoid")}
    persistence = retention_half_lives(model, ids[None, :text_tokens], layer, blocks, horizon=horizon)
    persistence["document"] = name
    result = {"experiment": "E4: Cortex v1 (sequential, bias-hack gate) vs v2 (chunked hybrid, log gate)",
              "v1_config": json.loads(V1_CONFIG.to_json()), "v2_config": json.loads(V2_CONFIG.to_json()),
              "throughput": {"rows": block_throughput(lengths, d_model=d_model, repeats=repeats),
                             "threads": torch.get_num_threads(),
                             "what": "forward + backward of one sidecar block alone, batch 1, fp32 CPU"},
              "persistence": persistence,
              "adapter": str(adapter)}
    if recall_results is not None and Path(recall_results).is_file():
        e2 = json.loads(Path(recall_results).read_text())
        table = {d: r["exact_match"] for d, r in e2["eval"]["sidecar"].items()}
        result["recall"] = {"file": str(recall_results), "exact_match": table,
                            **recall_half_life(table, e2["config"]["call_tokens"])}
    ghost_ids = ids[None, :256]
    result["ghost_gap"] = ghost_gap(model.detach(), ghost_ids, {"v1": V1_CONFIG, "v2": V2_CONFIG})
    result["seconds"] = round(time.time() - t0, 1)
    return result


def versions_table(result: Mapping) -> list[dict]:
    """The design's comparison table filled with E4's measurements: rows {"metric", "v1", "v2"}."""
    rows = result["throughput"]["rows"]
    longest = max(rows, key=lambda r: r["T"])
    persistence = result["persistence"]
    blocks, lags, horizon = persistence["blocks"], persistence["lags"], persistence["horizon"]

    def life(name, key="half_life"):
        value = blocks[name][key]
        return f"> {horizon}" if value is None else str(value)

    def kept(name, lag):
        return f"{blocks[name]['curve'][lags.index(lag)]:.2f}"

    far = [lag for lag in (128, horizon) if lag in lags]
    table = [
        {"metric": "architecture", "v1": "per-token sequential loop, bias-hack gate",
         "v2": "chunkwise-parallel gated delta rule + sliding window, log-space gate"},
        {"metric": f"training throughput at T={longest['T']} (tokens/s, fwd+bwd, one block)",
         "v1": f"{longest['v1_tokens_per_s']:.0f}",
         "v2": f"{longest['v2_tokens_per_s']:.0f} ({longest['speedup']:.1f}x)"},
        {"metric": "forget-gate half-life, fresh block (tokens)", "v1": life("v1 fresh", "gate_only_half_life"),
         "v2": life("v2 fresh", "gate_only_half_life")},
        {"metric": "half-life of one write, fresh block (tokens; with overwriting)", "v1": life("v1 fresh"),
         "v2": life("v2 fresh")},
        {"metric": "share of a write left after " + " / ".join(str(lag) for lag in far) + " tokens, fresh block",
         "v1": " / ".join(kept("v1 fresh", lag) for lag in far),
         "v2": " / ".join(kept("v2 fresh", lag) for lag in far)},
        {"metric": "half-life of one write, trained E2 sidecar (tokens)", "v1": life("v1 gate on the trained sidecar"),
         "v2": life("v2 trained (E2 sidecar)")},
        {"metric": "share of a write left after " + " / ".join(str(lag) for lag in far) + " tokens, trained sidecar",
         "v1": " / ".join(kept("v1 gate on the trained sidecar", lag) for lag in far),
         "v2": " / ".join(kept("v2 trained (E2 sidecar)", lag) for lag in far)},
        {"metric": "ghost start: max |logits - base| at init", "v1": f"{result['ghost_gap']['v1']:.1g}",
         "v2": f"{result['ghost_gap']['v2']:.1g}"},
    ]
    if "recall" in result:
        r = result["recall"]
        v2 = (f"exact match {r['at_distance_1']:.2f} one call later, {r['exact_match_at_longest']:.2f} after "
              f"{r['longest_tokens']} tokens (not halved)" if r["half_life_tokens"] is None
              else f"halves by {r['half_life_tokens']} tokens")
        table.append({"metric": "recall of a pass key across calls (E2)",
                      "v1": "not trained (its gate keeps ~0.88^128 of a fact after one call)", "v2": v2})
    return table


def main(argv: Sequence[str] | None = None) -> dict:
    from cortexlab.train.common import environment, git_revision, int_tuple, write_json_atomic

    p = argparse.ArgumentParser(prog="python -m cortexlab.eval.versions", description=__doc__.split("\n")[0])
    p.add_argument("--adapter", default=f"results/{FIRST_RECALL_ADAPTER}",
                   help="the E2 sidecar to read (default: the first committed one, which the committed readings used)")
    p.add_argument("--recall-results", default="results/recall_across_calls.json", help="E2's results JSON")
    p.add_argument("--out", default="results/cortex_v1_v2.json")
    p.add_argument("--lengths", type=int_tuple, default=(128, 512, 2048))
    p.add_argument("--horizon", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    git_revision(refresh=True)   # the code as the run starts
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_versions(args.adapter, args.recall_results, lengths=args.lengths, horizon=args.horizon,
                          repeats=args.repeats)
    command = "python -m cortexlab.eval.versions " + " ".join(sys.argv[1:] if argv is None else argv)
    result.update(command=command, git=git_revision(), environment=environment())
    write_json_atomic(Path(args.out), result)
    print(json.dumps({"throughput": result["throughput"]["rows"],
                      "half_lives": {k: v["half_life"] for k, v in result["persistence"]["blocks"].items()},
                      "recall": result.get("recall"), "ghost_gap": result["ghost_gap"]}, indent=1))
    return result


if __name__ == "__main__":
    main()

