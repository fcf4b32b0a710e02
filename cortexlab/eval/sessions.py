"""Sessions in use: a conversation across `generate` calls, a restart, and a long stream of text.

A `CortexModel` keeps its sidecars' memory in `model.sessions` between calls that share a
`session_id`; the base model's own context (its KV cache) restarts at every call. These
functions measure what that buys and costs, for notebook 04 and the tests:

- `chat_session(model, tokenizer, turns)`: one `generate` call per user turn, all in one
  session. Each call's prompt holds only that turn (through the chat template); anything
  from earlier turns can only come from the sidecars' memory. Records the reply, the tokens
  the memory has read so far and the state's bytes; `compare_base=True` also generates with
  the sidecars off (the baseline) and says whether the reply is the same.
- `stream_session(model, ids, call_tokens=256)`: feed a long token stream through one
  session in calls of `call_tokens` tokens and record, after each call, the tokens processed,
  the session state's bytes (in memory and on disk), the KV cache a plain transformer would
  need to see all those tokens (computed from the config, `kv_cache_nbytes`) and the wall
  time of the call. `baseline=True` also runs the bare base model over the same stream with
  one growing KV cache and records that cache's measured bytes and the call's wall time.
- `continue_in_fresh_process(ids, ...)`: continue a persisted session in a new Python
  process (`python -m cortexlab.eval.sessions continue ...`): it builds the model, loads the
  adapter, opens a `SessionStore` on the same folder, runs one forward and returns the logits.
- `random_readout_(model, std, seed)`: give every sidecar a small seeded random output
  projection. A freshly attached sidecar has a zero output projection (a "ghost": the model
  is exactly the base model, whatever the memory holds), so persistence checks on logits
  need a non-zero one; this is a stand-in for a trained sidecar, not a trained one.
- `state_breakdown`, `max_state_diff`: what a session's state is made of, and how far apart
  two states are. `stdlib_token_ids` (real text: the standard library's sources),
  `kv_cache_nbytes` (computed KV-cache bytes) and `cache_nbytes` (measured) are
  `cortexlab.eval.decode`'s, re-exported here.

Nothing here asserts a speed; wall times are only reported.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cortexlab.checks import check_int, check_number

from .decode import cache_nbytes, kv_cache_nbytes, stdlib_files, stdlib_token_ids

__all__ = [
    "cache_nbytes", "chat_session", "continue_in_fresh_process", "kv_cache_nbytes", "max_state_diff",
    "random_readout_", "state_breakdown", "stdlib_files", "stdlib_token_ids", "stream_session",
]


# ---------------------------------------------------------------------------------------
# bytes (real text, the computed and the measured KV cache: shared with `decode`)


def state_breakdown(state: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    """What a session's flat state ({"layer{i}.{name}": tensor}) is made of, summed over layers.

    Returns {name: {"shape": per-layer shape, "dtype": str, "layers": count, "bytes": total}},
    largest first, e.g. "S" (the gated-delta-rule memory), "win_k"/"win_v" (the sliding window's
    cache), "conv" (the short conv's last inputs), "tokens" (tokens read).
    """
    parts: dict[str, dict] = {}
    for key, t in state.items():
        _, name = key.split(".", 1) if "." in key else ("", key)
        part = parts.setdefault(name, {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                                       "layers": 0, "bytes": 0})
        part["layers"] += 1
        part["bytes"] += t.nbytes
    return dict(sorted(parts.items(), key=lambda item: -item[1]["bytes"]))


def max_state_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Largest absolute difference between two states with the same keys and shapes (0.0: identical)."""
    if set(a) != set(b):
        raise ValueError(f"the states hold different tensors: only in the first {sorted(set(a) - set(b))}, "
                         f"only in the second {sorted(set(b) - set(a))}")
    worst = 0.0
    for key in a:
        x, y = a[key], b[key]
        if x.shape != y.shape:
            raise ValueError(f"{key!r} has shape {tuple(x.shape)} in the first state, {tuple(y.shape)} in the second")
        if x.numel():
            worst = max(worst, (x.cpu().double() - y.cpu().double()).abs().max().item())
    return worst


# ---------------------------------------------------------------------------------------
# the model


def _check_cortex(model) -> None:
    if not (hasattr(model, "sessions") and hasattr(model, "sidecars") and hasattr(model, "base")):
        raise TypeError(f"model must be a CortexModel (from attach_cortex / load_with_cortex), "
                        f"got {type(model).__name__}")


def _tokens_key(model) -> str:
    return f"layer{model.layer_ids[0]}.tokens"


def random_readout_(model, *, std: float = 1e-3, seed: int = 0):
    """Set every sidecar's output projection to seeded N(0, std^2) noise, in place; returns `model`.

    Untrained sidecars have a zero output projection, so their memory never reaches the logits;
    with this small random one it does, a little, and persistence can be checked on the logits.
    It is a stand-in for training (what a trained memory recalls is a separate question), and
    the same `seed` gives the same weights in any process. Nothing else changes.
    """
    _check_cortex(model)
    check_number("std", std, 0, low_open=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in model.layer_ids:
            weight = model.sidecars[str(i)].out_proj.weight
            weight.copy_(torch.randn(weight.shape, generator=gen) * std)
    return model


# ---------------------------------------------------------------------------------------
# a conversation


def chat_session(model, tokenizer, turns: Sequence[str], *, session_id: str = "chat", max_new_tokens: int = 24,
                 reset: bool = True, compare_base: bool = False, system: str | None = None,
                 progress: bool = False) -> list[dict]:
    """One greedy `generate` call per user turn, all in session `session_id`.

    Each call's prompt is only that turn (plus `system`, if given) through the tokenizer's chat
    template: the base model sees nothing of earlier turns, the sidecars' memory has read them
    all. `reset=True` starts the session afresh on the first turn.

    Returns one row per call: call, user, reply, prompt_tokens, new_tokens, memory_tokens (the
    tokens the memory has read so far: each prompt and every generated token fed back; the
    last generated token of a call is returned but, as in any HF generate, not fed back),
    state_bytes, wall_s; with `compare_base`, also base_reply and same_as_base (sidecars off).
    """
    _check_cortex(model)
    if isinstance(turns, str) or not turns or not all(isinstance(t, str) for t in turns):
        raise ValueError("turns must be a non-empty sequence of str (one user message per call)")
    check_int("max_new_tokens", max_new_tokens)
    turns = list(turns)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(turns), desc="turns")
    rows = []
    for call, text in enumerate(turns, start=1):
        messages = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": text}]
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        ids = enc["input_ids"]
        mask = enc.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        settings = dict(max_new_tokens=max_new_tokens, do_sample=False, attention_mask=mask,
                        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                        else tokenizer.eos_token_id)
        start = time.perf_counter()
        out = model.generate(ids, session_id=session_id, reset_session=reset and call == 1, **settings)
        wall = time.perf_counter() - start
        new = out[0, ids.shape[1]:]
        state, _ = model.sessions.get(session_id)
        row = {"call": call, "user": text, "reply": tokenizer.decode(new, skip_special_tokens=True).strip(),
               "prompt_tokens": ids.shape[1], "new_tokens": new.shape[0],
               "memory_tokens": int(state[_tokens_key(model)][0]),
               "state_bytes": model.sessions.state_nbytes(session_id), "wall_s": wall}
        if compare_base:
            with model.disabled():
                base_out = model.generate(ids, **settings)
            base_new = base_out[0, ids.shape[1]:]
            row["base_reply"] = tokenizer.decode(base_new, skip_special_tokens=True).strip()
            row["same_as_base"] = base_new.shape == new.shape and bool((base_new == new).all())
        rows.append(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return rows


# ---------------------------------------------------------------------------------------
# a long stream


def _cache_kwarg(base) -> str:
    """The forward argument that takes a KV cache: "cache" (newer transformers 5) or "past_key_values"."""
    import inspect

    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def stream_session(model, ids: torch.Tensor, *, call_tokens: int = 256, session_id: str = "stream",
                   reset: bool = True, baseline: bool = False, progress: bool = False) -> list[dict]:
    """Feed `ids` ([B, T] or [T]) through one session in calls of `call_tokens` tokens (no_grad).

    After each call, one row: call, call_tokens, tokens (processed so far, per sequence),
    memory_tokens (what the sidecars' state says it has read), state_bytes (the session's
    state tensors), file_bytes (its file on disk; None without a store directory),
    kv_cache_bytes (computed: what a plain transformer keeps to attend to all `tokens`) and
    wall_s (the call, including storing the session). Only the last token's logits are formed.

    baseline=True also runs the bare base model (sidecars off) over the same calls with one
    KV cache carried across them, as a plain transformer that sees the whole stream would,
    and adds kv_cache_bytes_measured (that cache's tensors) and baseline_wall_s. It needs
    T <= the base's max_position_embeddings; the session alone has no such limit, since the
    base's positions restart every call.
    """
    _check_cortex(model)
    if not isinstance(ids, torch.Tensor) or ids.dim() not in (1, 2) or ids.shape[-1] < 1:
        raise ValueError(f"ids must be a [B, T] or [T] tensor of token ids with T >= 1, "
                         f"got {getattr(ids, 'shape', type(ids).__name__)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ids must be int64 (or int32) token ids, got {ids.dtype}")
    check_int("call_tokens", call_tokens)
    ids = ids[None] if ids.dim() == 1 else ids
    B, T = ids.shape
    config = model.base.config
    if baseline and T > getattr(config, "max_position_embeddings", T):
        raise ValueError(f"baseline=True needs T <= max_position_embeddings={config.max_position_embeddings} "
                         f"of the base model, got T={T}")
    path = model.sessions.path(session_id)  # validates the id before anything runs
    device = next(model.base.parameters()).device
    ids = ids.to(device)
    cache, cache_key = None, _cache_kwarg(model.base)
    if baseline:
        from transformers import DynamicCache

        cache = DynamicCache(config=config)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=T, desc="stream", unit="tok")
    rows = []
    with torch.no_grad():
        for call, pos in enumerate(range(0, T, call_tokens), start=1):
            chunk = ids[:, pos:pos + call_tokens]
            start = time.perf_counter()
            model(chunk, session_id=session_id, reset_session=reset and call == 1, use_cache=False,
                  logits_to_keep=1)
            wall = time.perf_counter() - start
            tokens = pos + chunk.shape[1]
            state, _ = model.sessions.get(session_id)
            row = {"call": call, "call_tokens": chunk.shape[1], "tokens": tokens,
                   "memory_tokens": int(state[_tokens_key(model)][0]),
                   "state_bytes": model.sessions.state_nbytes(session_id),
                   "file_bytes": path.stat().st_size if path is not None else None,
                   "kv_cache_bytes": kv_cache_nbytes(config, tokens, batch=B), "wall_s": wall}
            if baseline:
                with model.disabled():
                    start = time.perf_counter()
                    model.base(input_ids=chunk, use_cache=True, logits_to_keep=1, **{cache_key: cache})
                    row["baseline_wall_s"] = time.perf_counter() - start
                row["kv_cache_bytes_measured"] = cache_nbytes(cache)
            rows.append(row)
            if bar is not None:
                bar.update(chunk.shape[1])
    if bar is not None:
        bar.close()
    return rows


# ---------------------------------------------------------------------------------------
# a restart: continue a session in a fresh process


def continue_in_fresh_process(ids: torch.Tensor, *, session_id: str, session_dir, adapter_dir,
                              base: str | os.PathLike | None = None, tiny_arch: str | None = None,
                              num_threads: int | None = None, timeout: float = 600) -> torch.Tensor:
    """Continue a persisted session with `ids` [B, T] in a new Python process; return its logits [B, T, V].

    The child (`python -m cortexlab.eval.sessions continue`) builds the model from scratch (the
    base: `base`, a model folder or None for the bundled SmolLM2, or `tiny_arch`, a
    `cortexlab.models.tiny_model` with its default seed), loads the sidecars saved by
    `save_cortex(adapter_dir)`, opens a `SessionStore` on `session_dir`, and runs
    `model(ids, session_id=session_id)` under no_grad, which, like any call, stores the
    session's new state back. The session must already exist on disk. `num_threads`: the
    child's torch thread count (default: this process's, so that the arithmetic is the same).
    """
    if base is not None and tiny_arch is not None:
        raise ValueError("pass base= or tiny_arch=, not both")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(f"ids must be a [B, T] tensor of token ids, got {getattr(ids, 'shape', type(ids).__name__)}")
    num_threads = torch.get_num_threads() if num_threads is None else num_threads
    import cortexlab

    env = dict(os.environ)
    root = str(Path(cortexlab.__file__).resolve().parents[1])  # the child imports this very cortexlab
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryDirectory(prefix="cortexlab-continue-") as tmp:
        inp, out = Path(tmp) / "ids.safetensors", Path(tmp) / "logits.safetensors"
        save_file({"ids": ids.detach().cpu().to(torch.int64).contiguous()}, inp)
        cmd = [sys.executable, "-m", "cortexlab.eval.sessions", "continue", "--sessions", str(session_dir),
               "--session-id", session_id, "--adapter", str(adapter_dir), "--input", str(inp),
               "--output", str(out), "--threads", str(num_threads)]
        if base is not None:
            cmd += ["--base", str(base)]
        if tiny_arch is not None:
            cmd += ["--tiny", tiny_arch]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"the fresh process failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return load_file(out)["logits"]


def _continue(args) -> None:
    from cortexlab.cortex import CortexWrapConfig, SessionStore, attach_cortex, load_with_cortex
    from cortexlab.cortex.wrap import read_adapter_config

    if args.threads:
        torch.set_num_threads(args.threads)
    store = SessionStore(directory=args.sessions)
    if args.session_id not in store:
        raise SystemExit(f"error: session {args.session_id!r} is not in {args.sessions}; "
                         f"there is nothing to continue (found: {store.list_sessions()})")
    if args.tiny is not None:
        from cortexlab.models import tiny_model

        cfg = CortexWrapConfig.from_json(json.dumps(read_adapter_config(args.adapter)["cortex"]))
        model = attach_cortex(tiny_model(args.tiny), cfg, store).load_cortex(args.adapter)
    else:
        model = load_with_cortex(args.base, adapter=args.adapter, sessions=store)
    ids = load_file(args.input)["ids"]
    with torch.no_grad():
        logits = model(ids, session_id=args.session_id).logits
    save_file({"logits": logits.contiguous()}, args.output)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cortexlab.eval.sessions",
                                     description="Work with persisted Cortex sessions from a fresh process.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("continue", help="continue a session on disk with some tokens; save the logits")
    p.add_argument("--sessions", required=True, help="the SessionStore directory")
    p.add_argument("--session-id", required=True)
    p.add_argument("--adapter", required=True, help="a directory written by CortexModel.save_cortex")
    p.add_argument("--input", required=True, help="a safetensors file with 'ids' [B, T] int64")
    p.add_argument("--output", required=True, help="where to write 'logits' [B, T, V] (safetensors)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--base", default=None, help="base model folder or cached hub name (default: SmolLM2)")
    group.add_argument("--tiny", default=None, help="a cortexlab.models.tiny_model architecture (tests)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    if args.command == "continue":
        _continue(args)


if __name__ == "__main__":
    main()
