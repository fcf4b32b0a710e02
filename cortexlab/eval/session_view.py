"""Looking inside a live Cortex session: what one call writes to memory, and what a question reads back.

A session (`CortexModel.sessions`) holds each sidecar's state between calls. `read_call` feeds
one call into a session, as `model(input_ids, session_id=...)` does, and returns what the
chosen sidecar did along the way: its `MemoryTrace` from the state the session held before
the call (S at every `every` tokens, the gates, the prediction error ||v_t - a_t S_{t-1}^T k_t||)
and the controller's signals, averaged over heads. The trace's final state is the state stored
back in the session.

`recall_probe` asks a question in a session and answers it twice, greedily: with the session's
memory (which is then updated with the question and the answer, as any call in a session is)
and with an empty memory (the same sidecars starting from S = 0: what the base model can
say without the session). It also traces the question from the session's memory:
||o_t|| = ||scale S_t^T q_t|| per token is how much the question read from memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cortexlab.checks import check_int
from cortexlab.cortex.wrap import unflatten_memory

from .controller import controller_signals
from .memory_trace import MemoryTrace, trace_memory

__all__ = ["CallView", "RecallProbe", "read_call", "recall_probe", "session_memory"]


@dataclass
class CallView:
    """One call read into a session: the sidecar's trace, the controller signals ({name: [T]}; empty
    without a controller) and the number of calls the session had read before this one."""

    trace: MemoryTrace
    signals: dict[str, torch.Tensor]
    calls_before: int


@dataclass
class RecallProbe:
    """A question asked in a session: the greedy answer with the session's memory and with an empty
    memory, and the trace of the question read from the session's memory."""

    answer: str
    answer_without_memory: str
    trace: MemoryTrace


def session_memory(model, session_id: str) -> dict | None:
    """The session's stored memory {layer: {name: tensor}} (a copy), or None for a new session."""
    found = model.sessions.get(session_id, copy=True)
    if found is None:
        return None
    device = next(model.sidecars.parameters()).device
    return unflatten_memory(found.state, device)


def _check_ids(input_ids) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        shape = getattr(input_ids, "shape", input_ids)
        raise ValueError(f"input_ids must be a [1, T] tensor of token ids, got {shape}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: a call needs at least one token")


@torch.no_grad()
def read_call(model, input_ids: torch.Tensor, session_id: str, layer: int, *, every: int = 1) -> CallView:
    """Read one call into `session_id` (created if new) and return `layer`'s trace and signals."""
    _check_ids(input_ids)
    before = session_memory(model, session_id)
    calls = 0 if before is None else int(model.sessions.get(session_id).metadata.get("calls", "0"))
    trace = trace_memory(model, input_ids, layer, before, every=every)
    with model.recording() as traces:
        model(input_ids, session_id=session_id)
    _count_call(model, session_id, calls + 1)
    signals = controller_signals(traces[layer][0]) if model.config.controller else {}
    return CallView(trace, {name: t[0] for name, t in signals.items()}, calls)


def _count_call(model, session_id: str, calls: int) -> None:
    """Store the number of calls the session has read in its metadata (kept with the state)."""
    found = model.sessions.get(session_id)
    model.sessions.put(session_id, found.state, {**found.metadata, "calls": str(calls)})


@torch.no_grad()
def recall_probe(model, question_ids: torch.Tensor, session_id: str, layer: int, *,
                 max_new_tokens: int = 8) -> RecallProbe:
    """Answer `question_ids` greedily with the session's memory and with an empty one (see the module doc)."""
    _check_ids(question_ids)
    check_int("max_new_tokens", max_new_tokens)
    before = session_memory(model, session_id)
    if before is None:
        raise ValueError(f"session {session_id!r} has read nothing yet: read a call into it first")
    tokenizer = model.tokenizer
    trace = trace_memory(model, question_ids, layer, before, every=max(1, question_ids.shape[1]))
    options = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    calls = int(model.sessions.get(session_id).metadata.get("calls", "0"))
    with_memory = model.generate(question_ids, session_id=session_id, **options)
    _count_call(model, session_id, calls + 1)
    without = model.generate(question_ids, memory={}, **options)
    n = question_ids.shape[1]
    return RecallProbe(tokenizer.decode(with_memory[0, n:], skip_special_tokens=True),
                       tokenizer.decode(without[0, n:], skip_special_tokens=True), trace)
