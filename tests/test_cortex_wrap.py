"""Sidecars on frozen HF decoders: ghost start, frozen base, decode = parallel, sessions, adapters."""
import subprocess
import sys
import threading

import pytest
import torch

from cortexlab.cortex import CortexWrapConfig, SessionCorruptError, SessionStore, attach_cortex
from cortexlab.models import tiny_model

CFG = CortexWrapConfig(rank_fast=8, num_heads=2, window_size=8, chunk_size=16)


def wrapped(arch="qwen2", cfg=CFG, trained=True, seed=0, **kwargs):
    model = attach_cortex(tiny_model(arch), cfg, **kwargs)
    if trained:  # every sidecar weight non-zero, as after training
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.sidecars.parameters():
                if p.dim() > 1:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def ids(B=2, T=40, seed=0):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3", "mistral"])
def test_fresh_sidecars_leave_the_base_model_unchanged(arch):
    x = ids()
    with torch.no_grad():
        reference = tiny_model(arch)(x).logits
        logits = wrapped(arch, trained=False)(x).logits
    assert (logits - reference).abs().max().item() <= 1e-5


def test_disabled_and_detached_models_are_the_base():
    model = wrapped()
    x = ids()
    with torch.no_grad():
        reference = tiny_model("qwen2")(x).logits
        assert (model(x).logits - reference).abs().max() > 0.1
        with model.disabled():
            assert torch.equal(model(x).logits, reference)
        base = model.detach()
        assert torch.equal(base(x).logits, reference)
        assert not any(p.requires_grad for p in base.parameters())


def test_only_sidecar_parameters_train():
    model = wrapped(trained=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("sidecars.") for n in trainable)
    frozen = {n: p.clone() for n, p in model.base.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids()
    for _ in range(3):
        out = model(x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.base.named_parameters())
    assert model.sidecars["0"].out_proj.weight.abs().max() > 0  # the ghost started to fade in


def test_generate_logits_equal_one_parallel_forward():
    model = wrapped()
    prompt = ids(T=5)
    with torch.no_grad():
        gen = model.generate(prompt, max_new_tokens=20, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, attention_mask=torch.ones_like(prompt))
        step_logits = torch.stack(gen.logits, dim=1)                # 20 decode steps, window 8
        parallel = model(gen.sequences).logits[:, 4:-1]
        with model.disabled():
            base_only = model(gen.sequences).logits[:, 4:-1]
    assert (step_logits - parallel).abs().max().item() <= 1e-4
    assert (parallel - base_only).abs().max().item() > 0.1         # the sidecar contributes while decoding


def test_left_padded_batch_generates_like_each_row_alone():
    model = wrapped()
    row = ids(B=1, T=6, seed=3)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], dim=1)
    batch = torch.cat([padded, ids(B=1, T=9, seed=4)])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    alone = model.generate(row, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(row))
    together = model.generate(batch, max_new_tokens=6, do_sample=False, attention_mask=mask)
    assert torch.equal(together[0, 3:], alone[0])


def test_two_session_calls_equal_one_call_over_the_concatenation():
    # the sidecar on layer 0 reads context-free inputs, so its memory must match exactly;
    # deeper layers read the base model's context, which (by design) restarts every call
    model = wrapped(cfg=CortexWrapConfig(rank_fast=8, num_heads=2, window_size=8, layers=[0]))
    x = ids(B=1, T=50)
    with torch.no_grad():
        whole = model(x).memory[0]
        model(x[:, :21], session_id="chat-1")
        model(x[:, 21:], session_id="chat-1")
    state = model.sessions.get("chat-1").state
    for name, t in whole.items():
        assert (state[f"layer0.{name}"].float() - t.float()).abs().max().item() <= 1e-5, name


def test_session_equals_explicit_memory_threading_and_reset():
    model = wrapped()
    a, b = ids(T=30, seed=1), ids(T=12, seed=2)
    with torch.no_grad():
        first = model(a)
        expected = model(b, memory=first.memory).logits
        model(a, session_id="s")
        got = model(b, session_id="s").logits
        fresh = model(b).logits
        reset = model(b, session_id="s", reset_session=True).logits
    assert (got - expected).abs().max().item() <= 1e-6
    assert (got - fresh).abs().max().item() > 1e-3       # the memory of `a` changes the answer
    assert torch.equal(reset, fresh)
    assert model.sessions.get("s").state["layer0.tokens"].tolist() == [12, 12]


def test_session_state_size_is_constant_in_tokens_processed():
    model = wrapped()
    sizes = []
    with torch.no_grad():
        for seed in range(4):
            model(ids(T=37, seed=seed), session_id="long")
            sizes.append(model.sessions.state_nbytes("long"))
    assert len(set(sizes)) == 1


def test_a_new_process_continues_a_persisted_session(tmp_path):
    model = wrapped(sessions=SessionStore(directory=tmp_path / "sessions"))
    model.save_cortex(tmp_path / "adapter")
    a, b = ids(T=30, seed=1), ids(T=12, seed=2)
    with torch.no_grad():
        model(a, session_id="user-7")
        expected = model(b, memory=model(a).memory).logits
    torch.save(b, tmp_path / "b.pt")
    script = f"""
import torch
from cortexlab.cortex import CortexWrapConfig, SessionStore, attach_cortex
from cortexlab.models import tiny_model
cfg = CortexWrapConfig(rank_fast=8, num_heads=2, window_size=8, chunk_size=16)
model = attach_cortex(tiny_model("qwen2"), cfg, SessionStore(directory={str(tmp_path / "sessions")!r}))
model.load_cortex({str(tmp_path / "adapter")!r})
with torch.no_grad():
    logits = model(torch.load({str(tmp_path / "b.pt")!r}), session_id="user-7").logits
torch.save(logits, {str(tmp_path / "logits.pt")!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    assert (torch.load(tmp_path / "logits.pt") - expected).abs().max().item() <= 1e-6


def test_adapter_round_trip_and_config_mismatch(tmp_path):
    model = wrapped()
    model.save_cortex(tmp_path)
    other = wrapped(trained=False).load_cortex(tmp_path)
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, other(x).logits)
    different = attach_cortex(tiny_model("qwen2"), CortexWrapConfig(rank_fast=4, num_heads=2))
    with pytest.raises(ValueError, match="different CortexWrapConfig"):
        different.load_cortex(tmp_path)
    with pytest.raises(FileNotFoundError, match="no Cortex adapter"):
        model.load_cortex(tmp_path / "missing")


def test_concurrent_sessions_match_sequential_runs():
    model = wrapped()
    prompts = {f"user-{i}": ids(B=1, T=10, seed=i) for i in range(4)}
    with torch.no_grad():
        sequential = {sid: model.generate(p, session_id=sid, max_new_tokens=8, do_sample=False)
                      for sid, p in prompts.items()}
    model.sessions = SessionStore()
    results, errors = {}, []

    def run(sid):
        try:
            results[sid] = model.generate(prompts[sid], session_id=sid, max_new_tokens=8, do_sample=False)
        except Exception as err:  # surfaced below
            errors.append(err)
    threads = [threading.Thread(target=run, args=(sid,)) for sid in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(results[sid], sequential[sid]) for sid in prompts)


def test_bad_inputs_are_refused_before_any_state_changes(tmp_path):
    store = SessionStore(directory=tmp_path)
    model = wrapped(sessions=store)
    x = ids(B=1, T=10)
    with torch.no_grad():
        model(x, session_id="good")
    before = store.get("good", copy=True).state
    for bad in ["", "a" * 129, "../etc", "a/b", "a\\b"]:
        with pytest.raises(ValueError, match="session_id"):
            model(x, session_id=bad)
    with pytest.raises(TypeError, match="input_ids"):
        model(x.float(), session_id="good")
    with pytest.raises(ValueError, match="input_ids"):
        model(x[0], session_id="good")
    with pytest.raises(ValueError, match="batch size"):
        model(ids(B=2, T=10), session_id="good")
    with pytest.raises(NotImplementedError, match="num_beams"):
        model.generate(x, session_id="good", num_beams=2)
    with pytest.raises(ValueError, match="use_cache"):
        model.generate(x, session_id="good", use_cache=False)
    after = store.get("good").state
    assert all(torch.equal(before[k], after[k]) for k in before)
    # a corrupt file: a clear error, the file kept as it is, other sessions untouched
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SessionCorruptError):
        model(x, session_id="broken")
    assert (tmp_path / "broken.safetensors").read_bytes() == b"not a safetensors file"
    with torch.no_grad():
        model(x, session_id="good")


def test_recording_collects_one_trace_per_layer_and_call():
    model = wrapped()
    x = ids(B=1, T=12)
    with torch.no_grad(), model.recording() as traces:
        model.generate(x, max_new_tokens=3, do_sample=False)
    assert sorted(traces) == [0, 1]
    calls = traces[0]
    assert [c["beta"].shape[1] for c in calls] == [12, 1, 1]          # the prompt, then one per decode step
    assert {"surprise", "entropy", "beta_slow", "g", "mix"} <= set(calls[0])
    assert ((calls[0]["entropy"] >= 0) & (calls[0]["entropy"] <= 1)).all()


def test_one_entropy_reading_is_shared_by_every_controller():
    model = wrapped(cfg=CortexWrapConfig(rank_fast=8, num_heads=2, window_size=8, entropy_layer=0))
    with torch.no_grad(), model.recording() as traces:
        model(ids(B=1, T=20))
    assert torch.equal(traces[0][0]["entropy"], traces[1][0]["entropy"])
    with pytest.raises(ValueError, match="entropy_layer"):
        attach_cortex(tiny_model("qwen2"), CortexWrapConfig(layers=[0], entropy_layer=1))
    with pytest.raises(ValueError, match="entropy_layer"):
        CortexWrapConfig(entropy_layer=-1)


def test_entropy_at_layer_zero_is_the_logit_lens_of_the_embeddings_also_when_looked_up():
    from cortexlab.cortex.controller import predictive_entropy

    model = wrapped(cfg=CortexWrapConfig(rank_fast=8, num_heads=2, window_size=8, entropy_layer=0))
    base = model.base
    embed, norm, head = base.get_input_embeddings(), base.get_decoder().norm, base.get_output_embeddings()
    for seed in (0, 0, 1):   # the repeated call finds every token in the table
        x = ids(B=2, T=30, seed=seed)
        with torch.no_grad(), model.recording() as traces:
            model(x)
            direct = predictive_entropy(embed(x), norm, head)
        assert torch.allclose(traces[0][0]["entropy"][..., 0], direct, atol=1e-6)   # [B, T, H]: one per head
        assert not torch.isnan(model.token_entropy.entropy[x.flatten()]).any()   # every token of the call is kept
    with torch.no_grad(), model.recording() as traces:    # a caller's own inputs_embeds: no ids, computed
        own = embed(x) + 0.1
        model.base(inputs_embeds=own)
        direct = predictive_entropy(own, norm, head)
    assert torch.allclose(traces[0][0]["entropy"][..., 0], direct, atol=1e-6)


def test_parameter_counts():
    model = wrapped(trained=False)
    counts = model.parameter_counts()
    assert counts["base"] == sum(p.numel() for p in tiny_model("qwen2").parameters())
    assert counts["sidecars"] == sum(p.numel() for n, p in model.named_parameters() if n.startswith("sidecars."))
    assert counts["trainable"] == counts["sidecars"] > 0 and counts["base_trainable"] == 0
    model.base.lm_head.weight.requires_grad_(True)
    assert model.parameter_counts()["base_trainable"] == model.base.lm_head.weight.numel()
