"""cortexlab.eval.sessions / viz.sessions: conversations, long streams, restarts (tiny random models)."""
import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

from cortexlab.cortex import CortexWrapConfig, SessionStore, attach_cortex
from cortexlab.eval import sessions as ev
from cortexlab.models import tiny_model
from cortexlab.viz import sessions as viz

CFG = CortexWrapConfig(rank_fast=8, num_heads=2, window_size=8, chunk_size=16)
KV_PER_TOKEN = 2 * 2 * 2 * 16 * 4   # tiny qwen2: K and V * 2 layers * 2 KV heads * head_dim 16 * fp32


def wrapped(tmp_path=None, readout=True):
    store = SessionStore(directory=tmp_path / "sessions") if tmp_path is not None else None
    model = attach_cortex(tiny_model("qwen2"), CFG, store)
    return ev.random_readout_(model, std=0.05, seed=0) if readout else model


def text_ids(n):
    return ev.stdlib_token_ids(n)[0]   # UTF-8 bytes of real text: ids < 256 fit the tiny vocab


class ByteChatTokenizer:
    """The few tokenizer methods chat_session uses, on UTF-8 bytes (tiny models have no tokenizer)."""

    pad_token_id, eos_token_id = 0, None

    def apply_chat_template(self, messages, add_generation_prompt, return_tensors, return_dict):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + ("<assistant>" * add_generation_prompt)
        ids = torch.tensor([list(text.encode())])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids.tolist()).decode("utf-8", errors="replace")


# ------------------------------------------------------------------ bytes


def test_kv_cache_nbytes_from_the_config():
    assert ev.kv_cache_nbytes(tiny_model("qwen2").config, 10) == 10 * KV_PER_TOKEN
    smollm2 = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    assert ev.kv_cache_nbytes(smollm2, 1) == 2 * 30 * 3 * 64 * 4 == 46080   # head_dim = 576 / 9
    no_gqa = Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=None, hidden_size=64)
    assert ev.kv_cache_nbytes(no_gqa, 3, batch=2, bytes_per_element=2) == 2 * 2 * 4 * 16 * 3 * 2 * 2


def test_measured_cache_matches_the_computed_number():
    base = tiny_model("qwen2")
    with torch.no_grad():
        out = base(text_ids(37), use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    assert ev.cache_nbytes(cache) == ev.kv_cache_nbytes(base.config, 37)


def test_stdlib_token_ids_are_real_text_and_deterministic():
    ids, files = ev.stdlib_token_ids(5000)
    assert ids.shape == (1, 5000) and ids.dtype == torch.int64 and int(ids.max()) < 256
    assert torch.equal(ids, ev.stdlib_token_ids(5000)[0]) and files[0].endswith(".py")
    assert b"def " in bytes(ids[0].tolist()) or b"import " in bytes(ids[0].tolist())
    small = ev.stdlib_files()[:1]
    with pytest.raises(ValueError, match="fewer than"):
        ev.stdlib_token_ids(10 ** 9, files=small)


def test_state_breakdown_and_max_state_diff(tmp_path):
    model = wrapped(tmp_path)
    with torch.no_grad():
        model(text_ids(20), session_id="a")
        model(text_ids(30), session_id="b")
    a, b = model.sessions.get("a").state, model.sessions.get("b").state
    parts = ev.state_breakdown(a)
    assert {"S", "conv", "win_k", "win_v", "win_valid", "tokens"} <= set(parts)   # (+ the controller's memories)
    assert sum(p["bytes"] for p in parts.values()) == model.sessions.state_nbytes("a")
    assert parts["S"]["shape"] == [1, 2, 8, 8] and parts["S"]["layers"] == 2 and parts["S"]["dtype"] == "float32"
    assert ev.max_state_diff(a, a) == 0.0 and ev.max_state_diff(a, b) > 0
    with pytest.raises(ValueError, match="different tensors"):
        ev.max_state_diff(a, {k: v for k, v in b.items() if not k.endswith(".S")})


# ------------------------------------------------------------------ streaming


def test_stream_state_is_constant_while_tokens_and_kv_cache_grow(tmp_path):
    model = wrapped(tmp_path)
    rows = ev.stream_session(model, text_ids(300), call_tokens=64, baseline=True)
    tokens = [r["tokens"] for r in rows]
    assert tokens == [64, 128, 192, 256, 300]                                 # the last call is ragged
    assert [r["memory_tokens"] for r in rows] == tokens                       # what the state says it read
    assert [r["call_tokens"] for r in rows] == [64, 64, 64, 64, 44]
    assert len({r["state_bytes"] for r in rows}) == 1 and rows[0]["state_bytes"] > 0
    assert len({r["file_bytes"] for r in rows}) == 1 and rows[0]["file_bytes"] > rows[0]["state_bytes"]
    kv = [r["kv_cache_bytes"] for r in rows]
    assert kv == [KV_PER_TOKEN * t for t in tokens]                            # linear in tokens
    assert [r["kv_cache_bytes_measured"] for r in rows] == kv                 # the real DynamicCache agrees
    assert all(r["wall_s"] > 0 and r["baseline_wall_s"] > 0 for r in rows)


def test_stream_continues_or_resets_the_session_and_equals_explicit_memory(tmp_path):
    model = wrapped(tmp_path)
    ids = text_ids(100)
    ev.stream_session(model, ids, call_tokens=40)
    assert ev.stream_session(model, ids, call_tokens=40, reset=False)[-1]["memory_tokens"] == 200
    assert ev.stream_session(model, ids[0], call_tokens=40)[-1]["memory_tokens"] == 100       # [T] works too
    with torch.no_grad():       # the same calls with the memory threaded by hand
        memory = None
        for pos in range(0, 100, 40):
            memory = model(ids[:, pos:pos + 40], memory=memory).memory
    assert ev.max_state_diff(model.sessions.get("stream").state, {
        f"layer{i}.{name}": t for i, state in memory.items() for name, t in state.items()}) == 0.0


def test_stream_runs_past_the_base_models_position_limit():
    model = wrapped(readout=False)        # tiny: max_position_embeddings = 512; positions restart each call
    rows = ev.stream_session(model, text_ids(600), call_tokens=200, session_id="long")
    assert rows[-1]["memory_tokens"] == 600 and rows[-1]["file_bytes"] is None
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ev.stream_session(model, text_ids(600), call_tokens=200, baseline=True)


def test_stream_refuses_bad_arguments_before_touching_a_session(tmp_path):
    model = wrapped(tmp_path)
    ids = text_ids(50)
    for kwargs, error in [(dict(call_tokens=0), ValueError), (dict(session_id="../escape"), ValueError),
                          (dict(session_id=""), ValueError)]:
        with pytest.raises(error):
            ev.stream_session(model, ids, **kwargs)
    with pytest.raises(TypeError, match="int64"):
        ev.stream_session(model, ids.float())
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        ev.stream_session(model, ids[:, :0])
    with pytest.raises(TypeError, match="CortexModel"):
        ev.stream_session(tiny_model("qwen2"), ids)
    assert model.sessions.list_sessions() == []


# ------------------------------------------------------------------ conversation


def test_chat_session_counts_tokens_and_a_ghost_replies_like_the_base():
    model = wrapped(readout=False)        # untrained: zero output projection
    tok = ByteChatTokenizer()
    turns = ["hello", "my name is Ada", "what is my name?"]
    rows = ev.chat_session(model, tok, turns, session_id="ada", max_new_tokens=5, compare_base=True,
                           system="be brief")
    assert [r["call"] for r in rows] == [1, 2, 3] and [r["user"] for r in rows] == turns
    read = 0
    for r in rows:
        assert r["new_tokens"] == 5                           # no EOS in the tiny model
        read += r["prompt_tokens"] + r["new_tokens"] - 1      # the last sampled token is never fed back
        assert r["memory_tokens"] == read
        assert r["same_as_base"] and r["reply"] == r["base_reply"]
    assert len({r["state_bytes"] for r in rows}) == 1
    again = ev.chat_session(model, tok, turns[:1], session_id="ada", max_new_tokens=5, system="be brief")  # reset
    assert again[0]["memory_tokens"] == rows[0]["memory_tokens"] and "base_reply" not in again[0]
    with pytest.raises(ValueError, match="turns"):
        ev.chat_session(model, tok, "hello")


def test_random_readout_is_seeded_and_touches_only_the_output_projections():
    a, b = wrapped(readout=False), wrapped(readout=False)
    before = {n: p.clone() for n, p in a.named_parameters()}
    ev.random_readout_(a, std=1e-3, seed=3)
    ev.random_readout_(b, std=1e-3, seed=3)
    for name, p in a.named_parameters():          # (the other sidecar weights are drawn at attach time)
        assert torch.equal(p, before[name]) == ("out_proj" not in name), name
        if "out_proj" in name:
            assert torch.equal(p, dict(b.named_parameters())[name])
    assert 5e-4 < a.sidecars["0"].out_proj.weight.std().item() < 2e-3
    with pytest.raises(ValueError, match="std"):
        ev.random_readout_(a, std=0)


# ------------------------------------------------------------------ restart


def test_a_fresh_process_continues_the_session_exactly(tmp_path):
    model = wrapped(tmp_path)
    model.save_cortex(tmp_path / "adapter")
    first, second = text_ids(60)[:, :40], text_ids(60)[:, 40:]
    with torch.no_grad():
        model(first, session_id="user-1")
        fresh = ev.continue_in_fresh_process(second, session_id="user-1", session_dir=tmp_path / "sessions",
                                             adapter_dir=tmp_path / "adapter", tiny_arch="qwen2")
        on_disk = SessionStore(directory=tmp_path / "sessions").get("user-1").state   # written by the child
        here = model(second, session_id="user-1").logits                              # from this process's cache
        in_process = model.sessions.get("user-1").state
        reset = model(second, session_id="user-1", reset_session=True).logits
    assert fresh.shape == here.shape and (fresh - here).abs().max().item() == 0.0
    assert (reset - here).abs().max().item() > 1e-3
    assert ev.max_state_diff(on_disk, in_process) == 0.0          # both processes wrote the same state
    with pytest.raises(RuntimeError, match="nothing to continue"):
        ev.continue_in_fresh_process(second, session_id="nobody", session_dir=tmp_path / "sessions",
                                     adapter_dir=tmp_path / "adapter", tiny_arch="qwen2")
    with pytest.raises(ValueError, match="not both"):
        ev.continue_in_fresh_process(second, session_id="user-1", session_dir=tmp_path, adapter_dir=tmp_path,
                                     base="x", tiny_arch="qwen2")


# ------------------------------------------------------------------ figures


def test_figures_draw_the_rows():
    model = wrapped()
    rows = ev.stream_session(model, text_ids(90), call_tokens=30, baseline=True)
    fig = viz.memory_vs_tokens_figure(rows, title="t")
    names = [t.name for t in fig.data]
    assert any("computed" in n for n in names) and any("measured, DynamicCache" in n for n in names)
    state = next(t for t in fig.data if t.name == "Cortex session state (measured)")
    assert len(set(state.y)) == 1 and list(state.x) == [30, 60, 90]
    assert viz.memory_vs_tokens_figure([{k: v for k, v in r.items() if "baseline" not in k and "measured" not in k}
                                        for r in rows]).data
    with pytest.raises(ValueError, match="empty"):
        viz.memory_vs_tokens_figure([])
    chat = ev.chat_session(wrapped(readout=False), ByteChatTokenizer(), ["a", "b"], max_new_tokens=2)
    assert [list(t.y) for t in viz.conversation_figure(chat).data][0] == [r["memory_tokens"] for r in chat]
