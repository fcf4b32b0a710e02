"""cortexlab.eval.memory_trace: the trace is the layer, its per-token quantities, retention, repetition."""
import math

import plotly.graph_objects as go
import pytest
import torch
from conftest import trained_block

from cortexlab.cortex import CortexWrapConfig, attach_cortex
from cortexlab.eval import memory_trace as mt
from cortexlab.models import tiny_model
from cortexlab.ops import gated_delta_step
from cortexlab.viz import cortex as viz

D_MODEL = 32


def random_block(cfg, seed=0):
    """A block with every weight non-zero (as after training) and the config's gate bias."""
    return trained_block(cfg, D_MODEL, seed)


@pytest.fixture
def wrapped():
    def make(layer=1, seed=0, **cfg):
        base = tiny_model("qwen2", seed=seed)
        torch.manual_seed(seed)
        settings = dict(layers=[layer], rank_fast=16, num_heads=2, window_size=8, chunk_size=16)
        return attach_cortex(base, CortexWrapConfig(**{**settings, **cfg}))
    return make


def reference(block, x, state=None, entropy=None):
    """The same quantities by a per-token loop of the library's decode step (the recurrence)."""
    state = state or {}
    _, _, used = block.gdn(x, state, None, entropy)
    v, g, beta = used["v"], used["g"], used["beta"]
    q, k = (torch.nn.functional.normalize(used[name], dim=-1, eps=1e-6) for name in ("q", "k"))
    B, T, H, D = k.shape
    S = state.get("S", torch.zeros(B, H, D, v.shape[-1]))
    errors, reads, states = [], [], [S]
    for t in range(T):
        predicted = g[:, t].exp()[..., None] * torch.einsum("bhkv,bhk->bhv", S, k[:, t])
        errors.append((v[:, t] - predicted).norm(dim=-1))
        o, S = gated_delta_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], S, D ** -0.5)
        reads.append(o.norm(dim=-1))
        states.append(S)
    return torch.stack(errors, 1), torch.stack(reads, 1), torch.stack(states, 1)


@torch.no_grad()
@pytest.mark.parametrize("forget_gate,controller", [("log", False), ("sigmoid", False), ("log", True)])
def test_trace_equals_the_step_by_step_recurrence(forget_gate, controller):
    # with a controller its weights are random too, so the gates it modulates differ from the raw ones
    block = random_block(CortexWrapConfig(rank_fast=16, num_heads=2, chunk_size=16, forget_gate=forget_gate,
                                          controller=controller))
    x, entropy = torch.randn(2, 45, D_MODEL), torch.rand(2, 45)   # ragged: 45 = 6 * 7 + 3 checkpoints apart
    _, start = block(torch.randn(2, 9, D_MODEL))      # continue from a non-empty state (S and conv tail)
    trace = mt.trace_block(block, x, start, entropy, every=7)
    errors, reads, states = reference(block, x, start, entropy)
    assert (trace.error - errors).abs().max().item() <= 1e-5
    assert (trace.read_norm - reads).abs().max().item() <= 1e-5
    assert trace.checkpoints.tolist() == [0, 7, 14, 21, 28, 35, 42, 45]
    assert (trace.states - states[:, trace.checkpoints]).abs().max().item() <= 1e-5
    assert (trace.final_state - block(x, start, entropy=entropy)[1]["S"]).abs().max().item() <= 1e-5


@torch.no_grad()
def test_trace_final_state_equals_the_wrapped_models_memory(wrapped):
    model = wrapped(layer=1)
    gen = torch.Generator().manual_seed(0)
    first, second = torch.randint(0, 256, (2, 30), generator=gen), torch.randint(0, 256, (2, 21), generator=gen)
    out = model(first)
    trace = mt.trace_memory(model, first, 1)
    assert trace.layer == 1
    assert (trace.final_state - out.memory[1]["S"]).abs().max().item() <= 1e-5
    # a fresh controller's surprise signal is the same relative prediction error, computed its own way
    x, _, entropy = mt.block_input(model, first, 1)
    surprise = model.sidecars["1"].gdn(x, None, None, entropy)[2]["surprise"]
    assert torch.allclose(trace.relative_error, surprise, rtol=1e-4, atol=1e-5)
    # continuing a memory: the trace starts from the state the block is handed
    out2 = model(second, memory=out.memory)
    trace2 = mt.trace_memory(model, second, 1, memory=out.memory)
    assert (trace2.states[:, 0] - out.memory[1]["S"]).abs().max().item() == 0
    assert (trace2.final_state - out2.memory[1]["S"]).abs().max().item() <= 1e-5


@torch.no_grad()
def test_per_token_quantities_have_the_right_shapes_and_ranges(wrapped):
    model = wrapped(layer=0)
    ids = torch.randint(0, 256, (3, 37), generator=torch.Generator().manual_seed(1))
    trace = mt.trace_memory(model, ids, 0, every=10)
    B, T, H, D = 3, 37, 2, 16
    for name in ("beta", "log_forget", "forget", "error", "value_norm", "read_norm", "relative_error", "write_norm"):
        assert getattr(trace, name).shape == (B, T, H), name
    assert trace.keys.shape == (B, T, H, D)
    assert trace.checkpoints.tolist() == [0, 10, 20, 30, 37]
    assert trace.states.shape == (B, 5, H, D, D)
    assert trace.state_norm.shape == (B, 5, H)
    assert trace.singular_values.shape == (B, 5, H, D)
    assert trace.effective_rank.shape == (B, 5, H)
    assert trace.tokens == T
    assert ((trace.beta > 0) & (trace.beta < 1)).all()
    assert torch.allclose(trace.forget, torch.full_like(trace.forget, math.exp(-math.log1p(math.exp(-7.0)))))
    assert torch.allclose(trace.keys.norm(dim=-1), torch.ones(B, T, H), atol=1e-5)
    # a fresh memory predicts nothing for the first token: error = ||v||, and S starts at zero
    assert torch.allclose(trace.relative_error[:, 0], torch.ones(B, H))
    assert trace.state_norm[:, 0].abs().max() == 0 and (trace.effective_rank[:, 0] == 0).all()


def test_effective_rank():
    s = torch.tensor([[3.0, 0, 0, 0], [1.0, 1, 1, 1], [0.0, 0, 0, 0], [2.0, 2, 0, 0]])
    assert mt.effective_rank(s).tolist() == pytest.approx([1.0, 4.0, 0.0, 2.0], abs=1e-6)


@torch.no_grad()
def test_with_forget_gate_changes_only_the_gate():
    block = random_block(CortexWrapConfig(rank_fast=16, num_heads=2, controller=False))
    other = mt.with_forget_gate(block, "sigmoid")
    assert other.cfg.forget_gate == "sigmoid" and other.cfg.forget_bias == 2.0
    mine, theirs = block.state_dict(), other.state_dict()
    assert mine.keys() == theirs.keys()
    changed = [name for name in mine if not torch.equal(mine[name], theirs[name])]
    assert changed == ["gdn.gate_proj.bias"]
    x = torch.randn(1, 10, D_MODEL)
    block.gdn.gate_proj.weight.zero_()
    other.gdn.gate_proj.weight.zero_()
    assert mt.trace_block(other, x).forget.mean().item() == pytest.approx(1 / (1 + math.exp(-2)), rel=1e-5)
    assert mt.trace_block(block, x).forget.mean().item() == pytest.approx(math.exp(-math.log1p(math.exp(-7))),
                                                                           rel=1e-5)
    with pytest.raises(ValueError, match="forget_gate"):
        mt.with_forget_gate(block, "tanh")


@torch.no_grad()
def test_retention_is_exact_and_the_sigmoid_gate_forgets_faster(wrapped):
    model = wrapped(layer=0)
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    x = mt.block_input(model, ids, 0).x
    block = model.sidecars["0"]
    traces = {"log": mt.trace_block(block, x), "sigmoid": mt.trace_block(mt.with_forget_gate(block, "sigmoid"), x)}
    curves = {name: mt.retention(t, range(0, 40, 4), 16) for name, t in traces.items()}
    for name, r in curves.items():
        assert r["retained"].shape == (10, 17, 2) and r["lag"].tolist() == list(range(17))
        assert torch.equal(r["retained"][:, 0], torch.ones(10, 2))
        # one later write along k_j leaves a_j (1 - beta_j (k_j . k_t)^2) of write t
        t, tr = 8, traces[name]
        k, a, beta = tr.keys[0], tr.forget[0], tr.beta[0]
        lag1 = a[t + 1] * (1 - beta[t + 1] * (k[t + 1] * k[t]).sum(-1) ** 2)
        assert torch.allclose(r["retained"][2, 1], lag1, atol=1e-5)
        assert torch.allclose(r["gate_only"][2, 5], a[t + 1:t + 6].prod(0), atol=1e-6)
        assert (r["retained"] <= r["gate_only"] + 1e-5).all()   # later writes only erase more
    log, sig = curves["log"]["mean"], curves["sigmoid"]["mean"]
    assert (sig[1:] < log[1:]).all()
    assert sig[16] < 0.5 * log[16]
    half_sig, half_log = mt.lag_to_fraction(sig), mt.lag_to_fraction(log)
    assert half_sig is not None and (half_log is None or half_log > half_sig)
    with pytest.raises(ValueError, match="horizon"):
        mt.retention(traces["log"], [50], 16)


@torch.no_grad()
def test_the_delta_rule_predicts_a_repeated_sequence_better(wrapped):
    # layer 0 reads the normalised embeddings, so the second copy brings back the same keys and values
    gains = []
    for seed in range(3):
        model = wrapped(layer=0, seed=seed)
        ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(seed))
        block = model.sidecars["0"]
        rows = mt.repeat_surprise(model, ids[:, :16], ids[:, 16:], 0, [8],
                                  {"log": block, "sigmoid": mt.with_forget_gate(block, "sigmoid")})
        by = {r["block"]: r for r in rows}
        assert by["log"]["repeat"] < 0.9 * by["log"]["control"]
        assert by["log"]["repeat"] < by["log"]["first"]
        gains.append(by["sigmoid"]["ratio"] - by["log"]["ratio"])
    assert min(gains) > 0   # the near-1 gate keeps more of the first copy than the 0.88 gate


@torch.no_grad()
def test_block_input_stops_at_the_sidecar_and_errors_are_clear(wrapped):
    model = wrapped(layer=0)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    x, state, entropy = mt.block_input(model, ids, 0)
    assert x.shape == (1, 12, D_MODEL * 2) and state is None and entropy.shape == (1, 12)
    assert mt.block_input(wrapped(layer=0, controller=False), ids, 0).entropy is None
    with pytest.raises(ValueError, match="layer 1 has no sidecar"):
        mt.block_input(model, ids, 1)
    with pytest.raises(TypeError, match="CortexModel"):
        mt.block_input(model.base, ids, 0)
    with model.disabled(), pytest.raises(RuntimeError, match="not called"):
        mt.block_input(model, ids, 0)
    with pytest.raises(ValueError, match="every"):
        mt.trace_block(model.sidecars["0"], x, every=0)
    with pytest.raises(ValueError, match="length"):
        mt.repeat_surprise(model, ids, ids[:, :5], 0, [6])
    assert mt.smooth(torch.tensor([1.0, 3.0, 5.0, 7.0]), 2).tolist() == [1.0, 2.0, 4.0, 6.0]


@torch.no_grad()
def test_figures(wrapped):
    model = wrapped(layer=0)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    x = mt.block_input(model, ids, 0).x
    block = model.sidecars["0"]
    traces = {"log": mt.trace_block(block, x, every=8),
              "sigmoid": mt.trace_block(mt.with_forget_gate(block, "sigmoid"), x)}
    tokens = [str(i) for i in ids[0].tolist()]
    figs = [viz.trace_figure(traces["log"], tokens), viz.spectrum_figure(traces, head=1),
            viz.retention_figure({n: mt.retention(t, [0, 4], 20) for n, t in traces.items()}),
            viz.surprise_figure(traces, boundary=20, window=4),
            viz.repeat_figure(mt.repeat_surprise(model, ids[:, :20], ids[:, 20:], 0, [4, 8]))]
    assert all(isinstance(f, go.Figure) and f.data for f in figs)
    assert len(figs[0].data) == 2 * 4                       # 2 heads x 4 panels
    assert len(figs[1].data) == 2 * (16 + 2)                # per gate: 16 singular values + 2 heads
    with pytest.raises(ValueError, match="tokens"):
        viz.trace_figure(traces["log"], tokens[:3])
    with pytest.raises(ValueError, match="empty"):
        viz.spectrum_figure({})


@torch.no_grad()
def test_select_and_repeat_rows(wrapped):
    model = wrapped(layer=0)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    pairs = mt.repeat_traces(model, ids[:, :12], ids[:, 12:], 0, 6)
    rep, ctl = pairs["sidecar"]["repeat"], pairs["sidecar"]["control"]
    assert tuple(rep.beta.shape[:2]) == (1, 12) and tuple(rep.states.shape[:2]) == (1, 2)
    # the batch of two is the same as two separate runs
    alone = mt.trace_memory(model, torch.cat([ids[:, 12:18], ids[:, :6]], 1), 0)
    assert (alone.error - ctl.error).abs().max().item() <= 1e-5
    row, = mt.repeat_rows(pairs)
    assert row["length"] == 6 and row["block"] == "sidecar"
    assert row["repeat"] == pytest.approx(rep.relative_error[0, 6:].mean().item())
    assert row["ratio"] == pytest.approx(row["repeat"] / row["control"])
    with pytest.raises(ValueError, match="batch"):
        rep.select(1)


@torch.no_grad()
def test_key_cosine_is_the_mean_cosine_of_keys_lag_apart(wrapped):
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(3))
    trace = mt.trace_memory(wrapped(layer=0), ids, 0)
    cos = mt.key_cosine(trace, [1, 5, 29], batch=1)
    k = trace.keys[1]
    for lag, value in cos.items():
        assert value == pytest.approx(torch.nn.functional.cosine_similarity(k[lag:], k[:-lag], dim=-1).mean().item(),
                                      abs=1e-5)
    assert list(cos) == [1, 5, 29] and all(-1 <= v <= 1 for v in cos.values())
    with pytest.raises(ValueError, match="lags"):
        mt.key_cosine(trace, [0])
    with pytest.raises(ValueError, match="lags"):
        mt.key_cosine(trace, [30])
