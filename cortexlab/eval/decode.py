"""Measure a wrapped model as it is used: long sessions, per-token decoding and prefill.

Building blocks of `benchmarks/bench_decode.py` (a notebook can call them too):

- `stdlib_token_ids(n, tokenizer)`: `n` token ids of real text, the Python standard
  library's own source files (sorted by name, so the same interpreter gives the same ids);
  `tokenizer=None` gives UTF-8 bytes (ids < 256, for the tiny test models).
- `build_history(model, ids, call_tokens=1024, snapshots=(...))`: feed a session's history
  through a `CortexModel` in calls of `call_tokens` tokens (under no_grad), carrying the
  sidecars' `memory` from call to call, and keep the memory at each snapshot length. The
  base model's own context (its KV cache) restarts every call: only the sidecars remember.
- `GreedyDecoder(model, prompt, memory)`: prefill a short current context (the prompt)
  with the base's KV cache, then each call is one greedy decode step: one token through
  the base (attending to its KV cache) and through every sidecar's recurrent step, the
  memory carried forward. `disabled=True` runs the bare base model (the baseline).
- `memory_nbytes`, `cache_nbytes`, `kv_cache_nbytes`: bytes of the sidecars' state, of a
  measured KV cache, and of the KV cache a plain transformer needs for T tokens (computed
  from the config).
- `prefill_call(model, ids)`: a closure running one prefill forward (wrapped or bare).
- `sidecars_call(model, T, memory)`: a closure running every sidecar block directly on
  T tokens (no base model, no hooks): timed beside the whole model, it splits the
  wrapped-minus-bare time into the sidecars' own compute and the rest (hooks, wrapper).
- `step_peak_memory(decoder)`: peak memory of one decode step (after warm-up steps).
- `profile_block(block, T)`: time the parts of one `HybridCortexBlock` (projections, the
  gated delta rule and its input checks, the window attention, the output) on T tokens
  (T=1: the decode step), to see where the sidecar's time goes.

Timing itself is `cortexlab.eval.speed.time_calls` (round-robin, medians); nothing here
asserts a speed.
"""
from __future__ import annotations

import contextlib
import inspect
import sysconfig
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from cortexlab.checks import check_int

from .speed import peak_memory, time_calls

__all__ = [
    "GreedyDecoder", "build_history", "cache_nbytes", "count_ops", "kv_cache_nbytes", "memory_layout",
    "memory_nbytes", "prefill_call", "profile_block", "sidecars_call", "stdlib_files", "stdlib_token_ids",
    "step_peak_memory",
]


# ---------------------------------------------------------------------------------------
# text


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library modules (`Lib/*.py`, top level), sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no standard-library source files found in {root}")
    return files


def stdlib_token_ids(n: int, tokenizer=None, *, files: Sequence[Path] | None = None) -> tuple[torch.Tensor, list[str]]:
    """The first `n` token ids of the standard-library sources, concatenated file by file.

    Returns (ids [1, n] int64, names of the files used). Each file is tokenised on its own
    (no special tokens) and the ids are joined; `tokenizer=None` uses the UTF-8 bytes.
    """
    check_int("n", n)
    ids: list[int] = []
    used = []
    for path in files if files is not None else stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace") + "\n\n"
        if tokenizer is None:
            ids.extend(text.encode("utf-8"))
        else:
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        used.append(path.name)
        if len(ids) >= n:
            return torch.tensor([ids[:n]], dtype=torch.int64), used
    raise ValueError(f"the standard-library sources hold only {len(ids)} tokens, fewer than n={n}")


# ---------------------------------------------------------------------------------------
# bytes


def memory_nbytes(memory: dict) -> int:
    """Bytes of all tensors in a sidecar memory {layer: {name: tensor}}."""
    return sum(t.nbytes for state in memory.values() for t in state.values())


def memory_layout(memory: dict) -> dict:
    """{name: [shape, dtype]} of one layer's state (every layer's is the same) and the layer count."""
    if not memory:
        return {"layers": 0, "per_layer": {}}
    first = memory[min(memory)]
    return {"layers": len(memory),
            "per_layer": {name: [list(t.shape), str(t.dtype).removeprefix("torch.")] for name, t in first.items()}}


def cache_nbytes(cache) -> int:
    """Bytes of the key and value tensors held by a transformers KV cache (measured)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56: one object per layer with .keys / .values
        return sum(t.nbytes for layer in layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                   if isinstance(t, torch.Tensor))
    return sum(t.nbytes for t in (*cache.key_cache, *cache.value_cache))  # older DynamicCache


def kv_cache_nbytes(config, tokens: int, *, batch: int = 1, bytes_per_element: int = 4) -> int:
    """Bytes a plain transformer's KV cache needs for `tokens` tokens (computed, not measured):

        2 (keys and values) * layers * kv_heads * head_dim * tokens * batch * bytes_per_element
    """
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * tokens * batch * bytes_per_element


# ---------------------------------------------------------------------------------------
# sessions, decoding, prefill


def _check_ids(name: str, ids) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 1:
        raise ValueError(f"{name} must be a [B, T] tensor of token ids with T >= 1, "
                         f"got {getattr(ids, 'shape', type(ids).__name__)}")


def build_history(model, ids: torch.Tensor, *, call_tokens: int = 1024, snapshots: Iterable[int] = (),
                  progress: bool = False) -> dict:
    """Feed `ids` [B, T] through `model` (a CortexModel) in calls of at most `call_tokens` tokens.

    The sidecars' memory is carried from call to call (`model(chunk, memory=memory)`); each
    call's logits are only formed for its last token (`logits_to_keep=1`) and no KV cache is
    kept (`use_cache=False`), since nothing reads them. A call ends at every snapshot length,
    so the memory after exactly that many tokens is kept.

    Returns {"memory": final memory, "snapshots": {length: memory}, "call_tokens": [...],
    "call_times_s": [...], "total_s": seconds}.
    """
    _check_ids("ids", ids)
    T = ids.shape[1]
    check_int("call_tokens", call_tokens)
    marks = sorted(set(snapshots))
    bad = [m for m in marks if not (isinstance(m, int) and 0 < m <= T)]
    if bad:
        raise ValueError(f"snapshots must be token counts in [1, {T}] (the history's length), got {bad}")
    ends, pos = [], 0
    for mark in [*marks, T]:
        while pos < mark:
            pos = min(pos + call_tokens, mark)
            ends.append(pos)
    ends = sorted(set(ends))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=T, desc="history", unit="tok")
    memory, kept, sizes, times = None, {}, [], []
    start_all = time.perf_counter()
    pos = 0
    with torch.no_grad():
        for end in ends:
            start = time.perf_counter()
            out = model(ids[:, pos:end], memory=memory, use_cache=False, logits_to_keep=1)
            times.append(time.perf_counter() - start)
            sizes.append(end - pos)
            memory = out.memory
            if end in marks:
                kept[end] = memory  # memory dicts are never modified in place: later calls make new ones
            if bar is not None:
                bar.update(end - pos)
            pos = end
    if bar is not None:
        bar.close()
    return {"memory": memory, "snapshots": kept, "call_tokens": sizes, "call_times_s": times,
            "total_s": time.perf_counter() - start_all}


def _cache_kwarg(base) -> str:
    """The forward argument that takes a KV cache: "cache" (newer transformers 5) or "past_key_values"."""
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


class GreedyDecoder:
    """Greedy decoding one token per call, with the base's KV cache and the sidecars' memory.

    On construction the prompt [B, P] (the current call's context) is prefilled, starting
    from `memory` (None: a fresh memory). Each `decoder()` then feeds the last chosen token
    through the model (one token; the base attends to its KV cache, every sidecar takes
    its O(1) recurrent step), carries the memory, and picks the next token by argmax, so
    consecutive calls are a real greedy generation (the KV cache grows by one per call).
    `disabled=True` runs the bare base model (sidecars off): the baseline.
    """

    def __init__(self, model, prompt: torch.Tensor, memory: dict | None = None, *, disabled: bool = False):
        _check_ids("prompt", prompt)
        self.model = model
        self.disabled = disabled
        self._cache_kwarg = _cache_kwarg(model.base)
        self.steps = 0
        self.tokens: list[torch.Tensor] = []
        with torch.no_grad(), self._mode():
            out = model(prompt, memory=None if disabled else memory, use_cache=True, logits_to_keep=1)
        self.cache = _output_cache(out)
        if self.cache is None:
            raise RuntimeError("the base model returned no KV cache; GreedyDecoder needs use_cache support")
        self.memory = None if disabled else out.memory
        self.next_token = out.logits[:, -1].argmax(-1, keepdim=True)

    def _mode(self):
        return self.model.disabled() if self.disabled else contextlib.nullcontext()

    def __call__(self) -> torch.Tensor:
        """One decode step; returns the token fed in (and records it in `self.tokens`)."""
        token = self.next_token
        with torch.no_grad(), self._mode():
            out = self.model(token, memory=self.memory, use_cache=True, logits_to_keep=1,
                             **{self._cache_kwarg: self.cache})
        self.cache = _output_cache(out)
        if not self.disabled:
            self.memory = out.memory
        self.next_token = out.logits[:, -1].argmax(-1, keepdim=True)
        self.tokens.append(token)
        self.steps += 1
        return token

    def context_tokens(self) -> int:
        """Tokens in the base's KV cache (the prompt plus the tokens decoded so far)."""
        return int(self.cache.get_seq_length())


def prefill_call(model, ids: torch.Tensor, *, disabled: bool = False, memory: dict | None = None) -> Callable[[], None]:
    """A closure running one prefill forward of `ids` under no_grad, as generate's prefill does
    (KV cache built, logits only for the last token). `disabled=True`: the bare base model."""
    _check_ids("ids", ids)

    def call():
        with torch.no_grad(), (model.disabled() if disabled else contextlib.nullcontext()):
            model(ids, memory=memory, use_cache=True, logits_to_keep=1)

    return call


def step_peak_memory(decoder: GreedyDecoder, *, warmup: int = 2, device: torch.device | str = "cpu") -> int:
    """Bytes one decode step needs at its peak beyond what was in use before it
    (`cortexlab.eval.speed.peak_memory`), after `warmup` untimed steps. On a CPU this is the
    growth of the resident-set high-water mark: run it in a fresh process with a fixed
    glibc mmap threshold (`MALLOC_MMAP_THRESHOLD_=65536`) for a number that follows the
    step's own allocations rather than what the allocator already holds."""
    for _ in range(warmup):
        decoder()
    return peak_memory(decoder, device=device)


# ---------------------------------------------------------------------------------------
# where the sidecar's time goes


def sidecars_call(model, T: int, *, memory: dict | None = None, seed: int = 0) -> Callable[[], None]:
    """A closure running every sidecar block of `model` (a CortexModel) once on x [1, T, d_model]
    (random, the same for every block), under no_grad: the sidecars' own compute, without
    the base model, the hooks or the wrapper. `memory` {layer: state} is the state each block
    continues (not advanced between calls; T=1 with a state takes the decode path)."""
    check_int("T", T)
    blocks = [(i, model.sidecars[str(i)]) for i in model.layer_ids]
    first = blocks[0][1].gdn.qkv_proj
    x = torch.randn(1, T, first.in_features, generator=torch.Generator().manual_seed(seed)).to(first.weight.device)
    states = {i: None if memory is None else memory.get(i) for i, _ in blocks}

    def call():
        with torch.no_grad():
            for i, block in blocks:
                block(x, states[i])

    return call


def count_ops(fn: Callable[[], object]) -> int:
    """Number of top-level torch operator calls one `fn()` makes (torch.profiler, CPU).

    Each costs a Python-to-C++ dispatch whatever its size, so for tiny tensors (a decode
    step) the count times a few microseconds is a floor on the wall time."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::"))


def profile_block(block, T: int, *, state: dict | None = None, warmup: int = 1, repeats: int = 5,
                  threads: int | None = None, seed: int = 0) -> dict:
    """Median seconds of one `HybridCortexBlock` on x [1, T, d_model] and of its parts.

    Parts (each timed alone, round-robin with the whole block, all under no_grad):
      "projections":  q/k/v projection + short conv, the gates (beta, forget), the output gate;
      "normalize":    L2 normalisation of q and k;
      "rule":         the memory: T=1 with a state -> `gated_delta_step`; otherwise
                      `gated_delta_rule` (chunked), which includes
      "rule_checks":  its input validation (`validate_inputs`: finiteness, ranges), timed alone;
      "window":       the sliding-window attention (with its cache);
      "output":       RMSNorm * gate, the memory/window mix and the output projection;
      "block":        the whole `block(x, state)`.
    `state`: the block state to continue (needed for T=1 to take the decode path); None
    starts fresh. Returns {"T", "parts_s": {part: median}, "sum_of_parts_s", "block_s",
    "other_s": block - sum of parts (work of the block that no part covers, e.g. a memory
    controller's extra passes; near zero, within noise, when the parts cover it all),
    "ops": top-level torch ops of one block call}.
    """
    from cortexlab.cortex.window import empty_window, sliding_window_attention
    from cortexlab.ops import gated_delta_rule, gated_delta_step
    from cortexlab.ops.gated_delta import validate_inputs

    gdn = block.gdn
    cfg = block.cfg
    d_model = gdn.qkv_proj.in_features
    dev = gdn.qkv_proj.weight.device
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, T, d_model, generator=gen).to(dev)
    state = state or {}
    with torch.no_grad():
        q, k, v, _ = gdn.features(x, state.get("conv"), None)
        g, beta = gdn.gates(gdn.gate_logits(x), None)
        qn, kn = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)
        o_mem, _ = gdn.memory(qn, kn, v, g, beta, state.get("S"))
        gate = F.silu(gdn.out_gate_proj(x)).unflatten(-1, (gdn.num_heads, gdn.head_dim))
        window_cache = ({key: state[key] for key in ("win_k", "win_v", "win_valid")} if "win_k" in state
                        else empty_window(1, gdn.num_heads, gdn.head_dim, cfg.window_size, q))
        o_win, _ = sliding_window_attention(q, k, v, window_cache, None, cfg.window_size)
    S0 = state.get("S")
    scale = gdn.head_dim ** -0.5

    def projections():
        gdn.features(x, state.get("conv"), None)
        gdn.gates(gdn.gate_logits(x), None)
        F.silu(gdn.out_gate_proj(x))

    def normalize():
        F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)

    if T == 1 and S0 is not None:
        def rule():
            gated_delta_step(qn[:, 0], kn[:, 0], v[:, 0], g[:, 0], beta[:, 0], S0, scale)
        rule_checks = None
    else:
        def rule():
            gated_delta_rule(qn, kn, v, g, beta, initial_state=S0, output_final_state=True,
                             chunk_size=cfg.chunk_size, backend=cfg.backend)

        def rule_checks():
            validate_inputs(qn, kn, v, g, beta, S0, scale=None, chunk_size=cfg.chunk_size, backend=cfg.backend,
                            allow_neg_eigval=False)

    def window():
        sliding_window_attention(q, k, v, window_cache, None, cfg.window_size)

    def output():
        o = gdn.out_norm(o_mem.to(x.dtype)) * gate
        if block.mix_proj is not None:
            m = torch.sigmoid(block.mix_proj(x))[..., None]
            o = m * o + (1 - m) * o_win
        block.out_proj(o.flatten(-2))

    def whole():
        block(x, state or None)

    parts = {"projections": projections, "normalize": normalize, "rule": rule, "window": window, "output": output}
    if block.mix_proj is None:
        del parts["window"]
    calls = {**parts, **({"rule_checks": rule_checks} if rule_checks is not None else {}), "block": whole}

    def no_grad(fn):
        def call():
            with torch.no_grad():
                fn()
        return call

    timed = time_calls({n: no_grad(f) for n, f in calls.items()}, warmup=warmup, repeats=repeats, threads=threads,
                       device=dev)
    medians = {n: t.median_s for n, t in timed.items()}
    covered = sum(medians[n] for n in parts)
    return {"T": T, "decode_path": T == 1 and S0 is not None,
            "parts_s": {n: medians[n] for n in calls if n != "block"},
            "sum_of_parts_s": covered, "other_s": medians["block"] - covered,
            "block_s": medians["block"], "ops": count_ops(whole),
            "times_s": {n: t.times_s for n, t in timed.items()}}
