"""Degenerate repetition in greedy decoding: metrics and a generation harness.

For a token sequence x_1..x_L and its n-grams g_i = (x_i, ..., x_{i+n-1}), i = 1..m, m = L - n + 1:

    repeated_ngram_rate(x, n) = |{i : g_i = g_j for some j < i}| / m     (0: no n-gram recurs)
    distinct_n(x, n)          = |{g_1, ..., g_m}| / m                      (1: every n-gram is new)

so repeated_ngram_rate = 1 - distinct_n for the same n. Both are nan for a text with no n-gram (L < n).

`greedy_repetition(model, prompts, max_new_tokens, pipeline=..., batch_size=...)` decodes greedily
(argmax, KV cache) from every prompt until `eos_token_id` or `max_new_tokens`, optionally with an
`InferenceHookPipeline` attached (`pipeline.reset()` before every batch, detached afterwards), and
scores each continuation (the tokens before EOS) with these metrics. Batches of prompts are padded
in the middle (`greedy_continuations`): every row keeps its first tokens (the attention sinks) at
position 0 and computes what it would alone; only hooks whose state is per sequence and ignores
padding queries (habituation, voting) may share a batch, so a pipeline with the Hebbian matrix
(one per layer, shared by the batch) or the temperature set point (which would count the padding
queries) needs batch_size=1.

The quality guard is the perplexity of the generated tokens (EOS included when generated) under
the *unhooked* model, conditioned on the prompt: exp(sum NLL / number of generated tokens), pooled
over prompts. A repeating text is easy to predict, so a lower repetition rate comes with a somewhat
higher guard perplexity; a guard that explodes means the hooks produce text the model itself finds
implausible.

Memory: one KV cache of batch_size x (longest prompt + max_new_tokens) tokens, and one [1, T, vocab]
logits tensor for each prompt's guard forward.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch

from cortexlab.checks import check_int

__all__ = ["continuation_nll", "distinct_n", "greedy_continuations", "greedy_repetition", "repeated_ngram_rate"]


def _token_list(name: str, tokens) -> list[int]:
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(tokens.shape)}")
        return tokens.tolist()
    if not isinstance(tokens, Sequence) or isinstance(tokens, str):
        raise TypeError(f"{name} must be a sequence of token ids or a 1-D tensor, got {type(tokens).__name__}")
    return list(tokens)


def _check_n(n) -> None:
    check_int("n", n)


def _ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def repeated_ngram_rate(tokens, n: int = 4) -> float:
    """Fraction of the n-grams of `tokens` that already occurred earlier in the same sequence (nan if none)."""
    _check_n(n)
    grams = _ngrams(_token_list("tokens", tokens), n)
    if not grams:
        return math.nan
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def distinct_n(tokens, n: int) -> float:
    """Number of different n-grams of `tokens` over the number of n-grams (nan if none)."""
    _check_n(n)
    grams = _ngrams(_token_list("tokens", tokens), n)
    return len(set(grams)) / len(grams) if grams else math.nan


def _check_prompt(prompt) -> list[int]:
    ids = _token_list("prompt", prompt)
    if not ids:
        raise ValueError("prompt must hold at least one token id")
    return ids


def _padded(prompts: list[list[int]], keep_first: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, attention mask and position ids [B, L] of `prompts` padded to one length L, the padding put
    right after each prompt's first `keep_first` tokens (see `greedy_continuations`)."""
    L = max(map(len, prompts))
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    pos = torch.zeros(len(prompts), L, dtype=torch.long)
    for b, p in enumerate(prompts):
        k, pad = min(keep_first, len(p)), L - len(p)
        ids[b, :k], ids[b, k + pad:] = torch.tensor(p[:k]), torch.tensor(p[k:], dtype=torch.long)
        mask[b, :k], mask[b, k + pad:] = 1, 1
        pos[b, :k], pos[b, k + pad:] = torch.arange(k), torch.arange(k, len(p))
    return ids, mask, pos


@torch.no_grad()
def greedy_continuations(model, prompts: Sequence, max_new_tokens: int, *, eos_token_id: int | None = None,
                         keep_first: int = 1) -> list[list[int]]:
    """Greedy decoding (argmax at every step, KV cache) of a batch of prompts for at most `max_new_tokens`
    tokens each; a continuation stops after `eos_token_id` (which it keeps).

    Prompts of different lengths are padded in the middle: each keeps its first `keep_first` tokens at
    positions 0.. (where attention sinks sit, and where `InferenceHookPipeline` shields `sink_tokens`
    keys from habituation), then the padding (masked out as keys), then the rest of the prompt, with
    position ids that skip the padding. Each row then computes what it computes alone, up to
    floating-point summation order.
    """
    check_int("max_new_tokens", max_new_tokens)
    check_int("keep_first", keep_first, 0)
    prompts = [_check_prompt(p) for p in prompts]
    if not prompts:
        raise ValueError("prompts must not be empty")
    device = next(model.parameters()).device
    ids, mask, pos = (t.to(device) for t in _padded(prompts, keep_first))
    next_pos = torch.tensor([len(p) for p in prompts], device=device)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    cache = None
    for _ in range(max_new_tokens):
        result = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                       logits_to_keep=1)
        cache = result.cache
        tokens = result.logits[:, -1].argmax(-1)
        for b, token in enumerate(tokens.tolist()):
            if not done[b]:
                out[b].append(token)
                done[b] = token == eos_token_id
        if all(done):
            break
        ids, pos = tokens[:, None], next_pos[:, None]
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
        next_pos = next_pos + 1
    return out


@torch.no_grad()
def continuation_nll(model, prompt, continuation) -> torch.Tensor:
    """Per-token negative log-likelihood (nats, float64 [len(continuation)]) of `continuation` given `prompt`."""
    p, c = _check_prompt(prompt), _token_list("continuation", continuation)
    if not c:
        return torch.zeros(0, dtype=torch.float64)
    device = next(model.parameters()).device
    ids = torch.tensor([p + c], device=device)
    logits = model(input_ids=ids).logits[0, len(p) - 1:-1].double()
    return torch.nn.functional.cross_entropy(logits, ids[0, len(p):], reduction="none").cpu()


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def greedy_repetition(model, prompts: Sequence, max_new_tokens: int, *, pipeline=None, batch_size: int = 1,
                      eos_token_id: int | None = None, n: int = 4, distinct: Sequence[int] = (1, 2, 3)) -> dict:
    """Greedy continuations of every prompt (token-id lists), `batch_size` prompts at a time, and their
    repetition metrics.

    `pipeline`: an unattached `InferenceHookPipeline`; it is attached for the generation (reset before
    every batch) and detached before the guard perplexity is computed with the unhooked model.
    Returns {"per_prompt": [{"continuation", "new_tokens", "eos", "repeated_ngram_rate",
    "distinct_<k>"..., "guard_nll_sum", "guard_perplexity"}], "mean": {"repeated_ngram_rate",
    "distinct_<k>"..., "new_tokens", "eos_fraction"}, "guard_perplexity": pooled, "n": n}.
    Means are over the prompts whose continuation has an n-gram (nan metrics are skipped).
    """
    if len(prompts) == 0:
        raise ValueError("prompts must not be empty")
    prompts = [_check_prompt(p) for p in prompts]
    _check_n(n)
    for k in distinct:
        _check_n(k)
    check_int("batch_size", batch_size)
    keep_first = 1
    if pipeline is not None:
        cfg = pipeline.config
        if batch_size > 1 and (cfg.enable_hebbian or cfg.enable_temperature):
            raise ValueError("batch_size must be 1 with the Hebbian or temperature hook enabled: their state "
                             "is shared by the batch (Hebbian) or counts the padding queries (temperature)")
        if batch_size > 1 and cfg.enable_habituation and cfg.sink_tokens == 0:
            raise ValueError("batch_size must be 1 with habituation and sink_tokens=0: padding queries attend "
                             "the kept first token, which is then habituated unless it is shielded")
        keep_first = max(1, cfg.sink_tokens)
    attach = contextlib.nullcontext() if pipeline is None else pipeline.attached(model)
    with attach:
        continuations = []
        for start in range(0, len(prompts), batch_size):
            if pipeline is not None:
                pipeline.reset()
            continuations += greedy_continuations(model, prompts[start:start + batch_size], max_new_tokens,
                                                  eos_token_id=eos_token_id, keep_first=keep_first)
    rows = []
    for p, cont in zip(prompts, continuations):
        ended = bool(cont) and cont[-1] == eos_token_id
        text = cont[:-1] if ended else cont
        nll = continuation_nll(model, p, cont)
        row = {"continuation": cont, "new_tokens": len(cont), "eos": ended,
               "repeated_ngram_rate": repeated_ngram_rate(text, n)}
        row.update({f"distinct_{k}": distinct_n(text, k) for k in distinct})
        row.update(guard_nll_sum=float(nll.sum()), guard_perplexity=math.exp(float(nll.mean())))
        rows.append(row)
    keys = ["repeated_ngram_rate", *(f"distinct_{k}" for k in distinct)]
    mean = {k: _nanmean([r[k] for r in rows]) for k in keys}
    mean["new_tokens"] = sum(r["new_tokens"] for r in rows) / len(rows)
    mean["eos_fraction"] = sum(r["eos"] for r in rows) / len(rows)
    total = sum(r["new_tokens"] for r in rows)
    return {"per_prompt": rows, "mean": mean, "n": n,
            "guard_perplexity": math.exp(sum(r["guard_nll_sum"] for r in rows) / total)}
