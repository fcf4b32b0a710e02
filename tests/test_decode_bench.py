"""cortexlab.eval.decode and benchmarks/bench_decode.py: behaviour only, never wall-clock thresholds."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cortexlab.cortex import CortexWrapConfig, attach_cortex
from cortexlab.eval import decode, speed
from cortexlab.models import tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def text_ids():
    ids, _ = decode.stdlib_token_ids(400)  # UTF-8 bytes: ids < 256, the tiny models' vocabulary
    return ids


@pytest.fixture
def wrapped():
    model = attach_cortex(tiny_model("llama", num_hidden_layers=3), CortexWrapConfig(window_size=16))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking sidecars, so that they change the base model's output
        for p in model.sidecars.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def test_stdlib_token_ids_are_deterministic_real_text():
    ids, files = decode.stdlib_token_ids(300)
    again, _ = decode.stdlib_token_ids(300)
    assert ids.shape == (1, 300) and ids.dtype == torch.int64
    assert torch.equal(ids, again)
    assert files[0] == decode.stdlib_files()[0].name
    assert bytes(ids[0].tolist()).decode("utf-8", errors="replace").strip()  # readable text
    with pytest.raises(ValueError, match="n must be a positive int"):
        decode.stdlib_token_ids(0)


def test_build_history_carries_memory_and_snapshots(wrapped, text_ids):
    hist = decode.build_history(wrapped, text_ids[:, :130], call_tokens=64, snapshots=[64, 100])
    assert hist["call_tokens"] == [64, 36, 30]  # a call ends at every snapshot
    assert sorted(hist["snapshots"]) == [64, 100]
    tokens = {n: int(m[0]["tokens"][0]) for n, m in hist["snapshots"].items()}
    assert tokens == {64: 64, 100: 100}
    assert int(hist["memory"][0]["tokens"][0]) == 130
    sizes = {decode.memory_nbytes(m) for m in (*hist["snapshots"].values(), hist["memory"])}
    assert len(sizes) == 1  # the state does not grow with the history
    layout = decode.memory_layout(hist["memory"])
    assert layout["layers"] == 3 and layout["per_layer"]["S"] == [[1, 4, 32, 32], "float32"]
    # the memory's content does change with the history
    assert not torch.equal(hist["snapshots"][64][0]["S"], hist["memory"][0]["S"])
    with pytest.raises(ValueError, match="snapshots"):
        decode.build_history(wrapped, text_ids[:, :50], snapshots=[60])


def test_greedy_decoder_matches_generate(wrapped, text_ids):
    memory = decode.build_history(wrapped, text_ids[:, :64], call_tokens=32)["memory"]
    prompt = text_ids[:, 64:80]
    dec = decode.GreedyDecoder(wrapped, prompt, memory)
    for _ in range(5):
        dec()
    steps = torch.cat(dec.tokens, dim=1)
    generated = wrapped.generate(prompt, memory=memory, max_new_tokens=5, do_sample=False,
                                 attention_mask=torch.ones_like(prompt))[:, prompt.shape[1]:]
    assert torch.equal(steps, generated)
    assert dec.context_tokens() == 16 + 5
    assert int(dec.memory[0]["tokens"][0]) == 64 + 16 + 5  # history + prompt + fed tokens
    assert decode.memory_nbytes(dec.memory) == decode.memory_nbytes(memory)

    bare = decode.GreedyDecoder(wrapped, prompt, disabled=True)
    for _ in range(5):
        bare()
    assert bare.memory is None
    with torch.no_grad(), wrapped.disabled():
        reference = wrapped.base.generate(prompt, max_new_tokens=5, do_sample=False,
                                          attention_mask=torch.ones_like(prompt))[:, prompt.shape[1]:]
    assert torch.equal(torch.cat(bare.tokens, dim=1), reference)


def test_kv_cache_bytes_computed_equals_measured(wrapped, text_ids):
    dec = decode.GreedyDecoder(wrapped, text_ids[:, :10], disabled=True)
    dec()
    measured = decode.cache_nbytes(dec.cache)
    cfg = wrapped.base.config  # 3 layers, 2 KV heads of 16, fp32
    assert measured == decode.kv_cache_nbytes(cfg, 11) == 2 * 3 * 2 * 16 * 11 * 4


def test_prefill_call_and_profile_block_report_every_part(wrapped, text_ids):
    calls = [decode.prefill_call(wrapped, text_ids[:, :40]), decode.prefill_call(wrapped, text_ids[:, :40],
                                                                                   disabled=True)]
    for call in calls:
        assert call() is None
    block = wrapped.sidecars["1"]
    prof = decode.profile_block(block, 40, warmup=0, repeats=1)
    assert set(prof["parts_s"]) == {"projections", "normalize", "rule", "rule_checks", "window", "output"}
    assert not prof["decode_path"] and prof["ops"] > 0 and prof["block_s"] > 0
    state = decode.build_history(wrapped, text_ids[:, :20])["memory"][1]
    step = decode.profile_block(block, 1, state=state, warmup=0, repeats=1)
    assert step["decode_path"] and "rule_checks" not in step["parts_s"]
    assert decode.count_ops(lambda: torch.ones(2) + 1) >= 1
    alone = decode.sidecars_call(wrapped, 1, memory=decode.build_history(wrapped, text_ids[:, :20])["memory"])
    assert alone() is None


def test_step_peak_memory_takes_warmup_steps_then_measures(wrapped, text_ids):
    dec = decode.GreedyDecoder(wrapped, text_ids[:, :12])
    if not speed.cpu_peak_memory_supported():
        pytest.skip("needs Linux /proc/self/clear_refs")
    peak = decode.step_peak_memory(dec, warmup=2)
    assert isinstance(peak, int) and peak >= 0
    assert dec.steps == 3


def test_quick_benchmark_writes_expected_json(tmp_path):
    out = tmp_path / "decode.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_decode.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "target <=" in proc.stdout and "GPU numbers were not run" in proc.stdout
    result = json.loads(out.read_text())
    for key in ("command", "git", "environment", "plan", "targets", "history", "decode", "decode_step_memory",
                "prefill", "profile", "summary", "gpu", "phase_seconds"):
        assert key in result
    env = result["environment"]
    assert env["torch"] == torch.__version__ and env["transformers"] and env["threads"] == 1
    summary = result["summary"]
    assert summary["histories"] == [64, 256]
    state = result["history"]["state"]
    assert state["64"]["memory_nbytes"] == state["256"]["memory_nbytes"] == state["256"]["session_state_nbytes"]
    assert summary["state_bytes_equal"] is True
    assert state["256"]["bare_kv_cache_nbytes_computed"] == 4 * state["64"]["bare_kv_cache_nbytes_computed"]
    for key in ("bare", "wrapped_h64", "wrapped_h256", "single_h0", "sidecars_only"):
        row = result["decode"][key]
        assert len(row["times_s"]) == result["plan"]["decode_repeats"] and row["median_s"] > 0
    assert set(result["prefill"]) == {"bare", "wrapped_all", "wrapped_single", "sidecars_only"}
    assert set(summary["attribution"]) == {"prefill", "decode"}
    for ratio in ("decode_history_ratio", "prefill_overhead_all_layers", "prefill_overhead_single_layer"):
        assert summary[ratio] > 0
    assert set(summary["targets_met"]) == {"decode_history_ratio", "state_bytes_equal", "prefill_overhead"}
