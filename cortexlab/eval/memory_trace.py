"""What a Cortex sidecar's memory writes and reads, token by token, over a real text.

A sidecar's `GatedDeltaNet` keeps, per head, a state S [D_k, D_v] updated by the gated
delta rule (a_t = exp(g_t), k_t unit length):

    e_t = v_t - a_t S_{t-1}^T k_t          the prediction error ("surprise") for key k_t
    S_t = a_t S_{t-1} + beta_t k_t e_t^T    the write: a rank-one update of size beta_t ||e_t||
    o_t = scale S_t^T q_t                   the read

`trace_block` records these quantities without re-implementing the layer: q, k, v and
the gates the layer actually uses (after its metacognitive controller, if it has one)
come from the block's own `gdn` forward, and the state from `cortexlab.ops.gated_delta_rule`,
run segment by segment with `initial_state` so that S is kept at checkpoints (every few
tokens: its norm and singular values). The op returns reads S_t^T r_t for any reader r_t;
reading with the *next* key (r_t = k_{t+1}, scale 1) gives S_t^T k_{t+1}, from which the
memory's prediction a_{t+1} S_t^T k_{t+1} for token t+1 follows, so one extra batch copy
of the sequence yields the prediction error of every token exactly. With a controller,
only the fast memory S is traced (not its probe or slow memories).

`retention` isolates what survives of one write. For fixed keys, gates and write
strengths the rule is linear in (S, v), so running it from S = k_t u^T (u a unit value
direction) with zero values afterwards leaves exactly the part of write t still in the
state after n more tokens; read with k_t it gives the retained fraction k_t^T P k_t in
[0, 1], where P is the product of the later steps a_j (I - beta_j k_j k_j^T). The forget
gate alone would leave prod a_j; the rest is erased by later writes along similar keys.

`repeat_surprise` asks whether the memory predicts repeated content better: the error
on a text's second copy, against the same text after an unrelated text of the same
length (a memory as full, but not of this content).

Everything runs under `torch.no_grad()`; batch size is kept, padding is not supported.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from cortexlab.checks import check_int
from cortexlab.cortex.hybrid import HybridCortexBlock
from cortexlab.ops import gated_delta_rule

__all__ = [
    "BlockInput", "MemoryTrace", "block_input", "effective_rank", "lag_to_fraction", "repeat_rows", "repeat_surprise",
    "key_cosine", "repeat_traces", "retention", "smooth", "trace_block", "trace_memory", "with_forget_gate",
]


@dataclass
class MemoryTrace:
    """One sidecar's memory over a sequence (fp32, CPU). B batch, T tokens, H heads.

    Per token:
      beta [B,T,H]          write strength beta_t
      log_forget [B,T,H]    g_t = ln a_t, the log forget gate (`forget` is a_t)
      keys [B,T,H,D_k]      the unit keys k_t (kept for `retention`)
      error [B,T,H]         ||e_t|| = ||v_t - a_t S_{t-1}^T k_t||, the prediction error
      value_norm [B,T,H]    ||v_t||, the error of a memory that predicts nothing
      read_norm [B,T,H]     ||o_t|| = ||scale S_t^T q_t||, the raw read (before the output norm)
    Per checkpoint (C of them):
      checkpoints [C]       tokens read: 0 (the starting state), every, 2 every, ..., T
      states [B,C,H,D_k,D_v]  S after that many tokens
    layer: the decoder layer, when traced through a model.
    """

    beta: torch.Tensor
    log_forget: torch.Tensor
    keys: torch.Tensor
    error: torch.Tensor
    value_norm: torch.Tensor
    read_norm: torch.Tensor
    checkpoints: torch.Tensor
    states: torch.Tensor
    layer: int | None = None

    @property
    def tokens(self) -> int:
        return self.beta.shape[1]

    def select(self, batch: int) -> MemoryTrace:
        """The trace of one sequence of the batch (batch axis kept, of size 1)."""
        if not -self.beta.shape[0] <= batch < self.beta.shape[0]:
            raise ValueError(f"batch {batch} out of range for a trace of batch size {self.beta.shape[0]}")
        batch %= self.beta.shape[0]
        b = slice(batch, batch + 1)
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return MemoryTrace(**{name: value[b] if isinstance(value, torch.Tensor) and name != "checkpoints" else value
                              for name, value in fields.items()})

    @property
    def forget(self) -> torch.Tensor:
        """The forget gate a_t = exp(g_t) [B,T,H]."""
        return self.log_forget.exp()

    @property
    def final_state(self) -> torch.Tensor:
        """S after the last token [B,H,D_k,D_v] (what the layer hands to the next call)."""
        return self.states[:, -1]

    @property
    def relative_error(self) -> torch.Tensor:
        """||e_t|| / ||v_t|| [B,T,H]: 1 = no better than predicting zero, 0 = exact recall."""
        return self.error / self.value_norm.clamp_min(1e-12)

    @property
    def write_norm(self) -> torch.Tensor:
        """||beta_t k_t e_t^T||_F = beta_t ||e_t|| [B,T,H] (k_t has unit length)."""
        return self.beta * self.error

    @property
    def state_norm(self) -> torch.Tensor:
        """||S||_F at each checkpoint [B,C,H]."""
        return self.states.flatten(-2).norm(dim=-1)

    @property
    def singular_values(self) -> torch.Tensor:
        """Singular values of S at each checkpoint, descending [B,C,H,min(D_k, D_v)]."""
        return torch.linalg.svdvals(self.states)

    @property
    def effective_rank(self) -> torch.Tensor:
        """`effective_rank` of S at each checkpoint [B,C,H]."""
        return effective_rank(self.singular_values)


def effective_rank(singular_values: torch.Tensor) -> torch.Tensor:
    """Entropy effective rank exp(-sum p_i ln p_i), p = s / sum(s), over the last axis.

    1 for a rank-one matrix, R for R equal singular values, 0 for the zero matrix.
    """
    s = singular_values.double().clamp_min(0)
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(1e-300)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    return torch.where(total[..., 0] > 0, entropy.exp(), torch.zeros_like(entropy)).float()


# --------------------------------------------------------------------------- tracing


class _Captured(Exception):
    """Raised by `block_input`'s hook to stop the base model once the block's input is known."""


def _sidecar(model, layer: int) -> HybridCortexBlock:
    sidecars = getattr(model, "sidecars", None)
    if sidecars is None:
        raise TypeError(f"model must be a CortexModel (from attach_cortex), got {type(model).__name__}")
    if str(layer) not in sidecars:
        raise ValueError(f"layer {layer!r} has no sidecar; this model has sidecars on layers "
                         f"{sorted(int(i) for i in sidecars)}")
    return sidecars[str(layer)]


class BlockInput(NamedTuple):
    """What a sidecar is called with: x [B,T,d_model] (fp32), its state (None: fresh) and the
    controller's entropy signal [B,T] (None without a controller)."""

    x: torch.Tensor
    state: dict | None
    entropy: torch.Tensor | None


@torch.no_grad()
def block_input(model, input_ids: torch.Tensor, layer: int, memory: dict | None = None) -> BlockInput:
    """The input of `layer`'s sidecar: x, the state it starts from and the entropy signal.

    Runs `model(input_ids, memory=memory)` and stops it at the sidecar (layers after it are
    never computed). x and entropy depend on the base model only (the sidecars before
    `layer` add zero while their output projections are zero), so any block can be traced on them.
    """
    block = _sidecar(model, layer)
    captured = {}

    def grab(module, args, kwargs):
        names = ("x", "state", "token_mask", "entropy")
        captured.update({name: value for name, value in zip(names, args)})
        captured.update({name: kwargs[name] for name in names[1:] if name in kwargs})
        raise _Captured

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids, memory=memory)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "x" not in captured:
        raise RuntimeError(f"the sidecar of layer {layer} was not called (are the sidecars disabled?)")
    return BlockInput(captured["x"].detach(), captured.get("state"), captured.get("entropy"))


@torch.no_grad()
def trace_block(block: HybridCortexBlock, x: torch.Tensor, state: dict | None = None,
                entropy: torch.Tensor | None = None, *, every: int = 16, layer: int | None = None) -> MemoryTrace:
    """Trace the memory of `block` (a `HybridCortexBlock`) over x [B,T,d_model]; see the module doc.

    state, entropy: as in `block(x, state, entropy=entropy)` (None: a fresh sequence; no
    entropy signal); `block_input` returns both. every: keep S after every `every` tokens
    (and after the last one); the op runs segment by segment between these checkpoints,
    each from the previous one's final state.
    """
    if not isinstance(block, HybridCortexBlock):
        raise TypeError(f"block must be a HybridCortexBlock, got {type(block).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a [B, T, d_model] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    check_int("every", every)
    state = state or {}
    cfg = block.cfg
    x = x.float()
    _, _, used = block.gdn(x, state, None, entropy)     # the layer's own features and the gates it uses
    q, k = F.normalize(used["q"], dim=-1, eps=1e-6), F.normalize(used["k"], dim=-1, eps=1e-6)  # as the layer does
    q, k, v, g, beta = (t.float() for t in (q, k, used["v"], used["g"], used["beta"]))
    B, T, H, Dk = k.shape
    S = state.get("S")
    S = torch.zeros(B, H, Dk, v.shape[-1], device=x.device) if S is None else S.float()
    # two reads per token: copy 0 with the next key (S_t^T k_{t+1}: the prediction for token t+1),
    # copy 1 with the query (the layer's own read); the last token has no next key (zeros, unused)
    readers = torch.cat([torch.cat([k[:, 1:], torch.zeros_like(k[:, :1])], dim=1), q], dim=0)
    first_prediction = g[:, 0].exp()[..., None] * torch.einsum("bhkv,bhk->bhv", S, k[:, 0])
    states, next_reads, reads, checkpoints = [S], [], [], [0]
    for s in range(0, T, every):
        e = min(s + every, T)
        both = (t[:, s:e].repeat(2, *([1] * (t.dim() - 1))) for t in (k, v, g, beta))
        o, S2 = gated_delta_rule(readers[:, s:e], *both, scale=1.0, initial_state=S.repeat(2, 1, 1, 1),
                                 output_final_state=True, chunk_size=cfg.chunk_size, backend=cfg.backend)
        next_reads.append(o[:B].float())
        reads.append(o[B:].float() * Dk ** -0.5)
        S = S2[:B]
        states.append(S)
        checkpoints.append(e)
    next_read = torch.cat(next_reads, dim=1)                                            # S_t^T k_{t+1}
    predicted = torch.cat([first_prediction[:, None], g[:, 1:].exp()[..., None] * next_read[:, :-1]], dim=1)
    return MemoryTrace(beta=beta.cpu(), log_forget=g.cpu(), keys=k.cpu(), error=(v - predicted).norm(dim=-1).cpu(),
                       value_norm=v.norm(dim=-1).cpu(), read_norm=torch.cat(reads, dim=1).norm(dim=-1).cpu(),
                       checkpoints=torch.tensor(checkpoints), states=torch.stack(states, dim=1).cpu(), layer=layer)


def trace_memory(model, input_ids: torch.Tensor, layer: int, memory: dict | None = None, *,
                 every: int = 16) -> MemoryTrace:
    """`trace_block` of `layer`'s sidecar of a `CortexModel` over `input_ids` (from `memory`).

    Its `final_state` equals `model(input_ids, memory=memory).memory[layer]["S"]`.
    """
    x, state, entropy = block_input(model, input_ids, layer, memory)
    return trace_block(_sidecar(model, layer), x, state, entropy, every=every, layer=layer)


def with_forget_gate(block: HybridCortexBlock, forget_gate: str, forget_bias: float | None = None) -> HybridCortexBlock:
    """A copy of `block` with another forget gate ("log" or "sigmoid", see `CortexWrapConfig`).

    Every weight is copied except the gate's bias, which takes `forget_bias` (None: the new
    gate's default, -7 for "log", +2 for "sigmoid"). The copy is not attached to any model.
    """
    if not isinstance(block, HybridCortexBlock):
        raise TypeError(f"block must be a HybridCortexBlock, got {type(block).__name__}")
    cfg = dataclasses.replace(block.cfg, forget_gate=forget_gate, forget_bias=forget_bias)
    param = next(block.parameters())
    new = HybridCortexBlock(block.out_proj.out_features, cfg).to(device=param.device, dtype=param.dtype)
    weights = block.state_dict()
    weights["gdn.gate_proj.bias"] = new.gdn.gate_proj.bias.detach().clone()
    new.load_state_dict(weights)
    return new


# --------------------------------------------------------------------------- analyses


@torch.no_grad()
def retention(trace: MemoryTrace, starts: Sequence[int], horizon: int, *, batch: int = 0) -> dict:
    """How much of the write at each token t in `starts` is left after n = 0..horizon more tokens.

    Runs `gated_delta_rule` on the traced keys, gates and write strengths from S = k_t u^T
    with zero values (see the module doc) and reads with k_t. Returns a dict of tensors:
    "lag" [N+1]; "retained" and "gate_only" (prod of a_j) [P, N+1, H]; their means over
    probes and heads, "mean" and "gate_only_mean" [N+1]; "starts" [P]. Needs
    t + horizon < trace.tokens for every start.
    """
    T = trace.tokens
    check_int("horizon", horizon)
    starts = [int(t) for t in starts]
    if not starts:
        raise ValueError("starts is empty: pass the token positions whose writes to follow")
    bad = [t for t in starts if not 0 <= t < T - horizon]
    if bad:
        raise ValueError(f"starts {bad} leave fewer than horizon={horizon} tokens in a trace of {T}")
    k, g, beta = trace.keys[batch], trace.log_forget[batch], trace.beta[batch]        # [T, H, D], [T, H]
    H = k.shape[1]
    idx = torch.tensor(starts)[:, None] + torch.arange(1, horizon + 1)                  # [P, N]
    k0 = k[torch.tensor(starts)]                                                        # [P, H, Dk]
    zeros = k.new_zeros(len(starts), horizon, H, 1)
    read, _ = gated_delta_rule(k0[:, None].expand(-1, horizon, -1, -1).contiguous(), k[idx], zeros, g[idx],
                               beta[idx], scale=1.0, initial_state=k0[..., None].contiguous(), backend="chunk")
    retained = torch.cat([torch.ones(len(starts), 1, H), read[..., 0]], dim=1)          # lag 0: k.k = 1
    gate_only = torch.cat([torch.zeros(len(starts), 1, H), g[idx].cumsum(1)], dim=1).exp()
    return {"lag": torch.arange(horizon + 1), "retained": retained, "gate_only": gate_only,
            "mean": retained.mean((0, 2)), "gate_only_mean": gate_only.mean((0, 2)), "starts": torch.tensor(starts)}


def lag_to_fraction(curve: torch.Tensor, fraction: float = 0.5) -> int | None:
    """The first lag at which a retention curve [N+1] falls below `fraction` (None if it never does)."""
    below = (curve < fraction).nonzero()
    return int(below[0, 0]) if len(below) else None


@torch.no_grad()
def repeat_traces(model, text_ids: torch.Tensor, control_ids: torch.Tensor, layer: int, length: int,
                  blocks: Mapping[str, HybridCortexBlock] | None = None) -> dict[str, dict[str, MemoryTrace]]:
    """Traces of a repeated text and of its control, for `repeat_surprise`.

    X = the first `length` tokens of `text_ids`, Y = the first `length` of `control_ids`
    ([1, T] each, different content). [X, X] and [Y, X] go through the base model up to
    `layer` (as one batch of two), and each block is traced on both from an empty memory.
    Returns {block name: {"repeat": trace of [X, X], "control": trace of [Y, X]}};
    blocks: name -> block (default: {"sidecar": the model's own at `layer`}).
    """
    for name, ids in (("text_ids", text_ids), ("control_ids", control_ids)):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"{name} must be a [1, T] tensor of token ids, got {getattr(ids, 'shape', ids)}")
    limit = min(text_ids.shape[1], control_ids.shape[1])
    if not isinstance(length, int) or isinstance(length, bool) or not 1 <= length <= limit:
        raise ValueError(f"length must be an int in [1, {limit}] (the shorter of the two texts), got {length!r}")
    blocks = dict(blocks) if blocks is not None else {"sidecar": _sidecar(model, layer)}
    X, Y = text_ids[:, :length], control_ids[:, :length]
    x, _, entropy = block_input(model, torch.cat([torch.cat([X, X], 1), torch.cat([Y, X], 1)], 0), layer)
    out = {}
    for name, block in blocks.items():
        both = trace_block(block, x, entropy=entropy, layer=layer)
        out[name] = {"repeat": both.select(0), "control": both.select(1)}
    return out


def repeat_rows(traces: Mapping[str, Mapping[str, MemoryTrace]]) -> list[dict]:
    """Summaries of `repeat_traces`: one row per block with "block", "length" L and the mean
    relative error ||e_t|| / ||v_t|| (over tokens and heads) on "first" (X read first,
    memory empty), "repeat" (X after X) and "control" (X after Y: a memory as full, but not
    of X), and "ratio" = repeat / control (< 1: the memory recognises the repeat)."""
    rows = []
    for name, pair in traces.items():
        rep, ctl = pair["repeat"].relative_error[0], pair["control"].relative_error[0]
        n = rep.shape[0] // 2
        first, repeat, control = rep[:n].mean().item(), rep[n:].mean().item(), ctl[n:].mean().item()
        rows.append({"block": name, "length": n, "first": first, "repeat": repeat, "control": control,
                     "ratio": repeat / control if control > 0 else math.nan})
    return rows


def repeat_surprise(model, text_ids: torch.Tensor, control_ids: torch.Tensor, layer: int,
                    lengths: Sequence[int], blocks: Mapping[str, HybridCortexBlock] | None = None) -> list[dict]:
    """Does the memory predict a repeated text better? `repeat_rows` of `repeat_traces` for
    each length L in `lengths` (X = the text's first L tokens, Y = the control's)."""
    return [row for n in lengths
            for row in repeat_rows(repeat_traces(model, text_ids, control_ids, layer, int(n), blocks))]


def smooth(x: torch.Tensor, window: int) -> torch.Tensor:
    """Trailing mean over the last `window` entries of a 1-D series (fewer at the start)."""
    check_int("window", window)
    x = x.double()
    c = torch.cat([x.new_zeros(1), x.cumsum(0)])
    idx = torch.arange(1, len(x) + 1)
    lo = (idx - window).clamp_min(0)
    return ((c[idx] - c[lo]) / (idx - lo)).float()


def key_cosine(trace: MemoryTrace, lags: Sequence[int], *, batch: int = 0) -> dict[int, float]:
    """Mean cosine of keys `lag` tokens apart, mean over t and heads of k_t . k_{t+lag} (the keys are unit),
    for each lag in `lags` (0 < lag < trace.tokens); sequence `batch` of the trace."""
    k = trace.keys[batch]                                                               # [T, H, D_k]
    bad = [lag for lag in lags if not (isinstance(lag, int) and 0 < lag < trace.tokens)]
    if bad or not lags:
        raise ValueError(f"lags must be ints in [1, {trace.tokens}) (a trace of {trace.tokens} tokens), got {lags!r}")
    return {lag: (k[lag:] * k[:-lag]).sum(-1).mean().item() for lag in lags}
