"""E4 (cortexlab.eval.versions) on tiny models: the table's rows measure what they claim."""
import pytest
import torch

from cortexlab.cortex import CortexWrapConfig, HybridCortexBlock, attach_cortex
from cortexlab.eval.memory_trace import with_forget_gate
from cortexlab.eval.versions import (
    V1_CONFIG,
    V2_CONFIG,
    _v1_block,
    block_throughput,
    ghost_gap,
    recall_half_life,
    retention_half_lives,
    versions_table,
)
from cortexlab.models import tiny_model


def test_v1_block_is_the_sequential_reference_of_the_v2_memory():
    """Same weights, same gate: the v1 block (per-token loop) computes what the chunked block computes."""
    cfg = CortexWrapConfig(rank_fast=8, num_heads=2, use_hybrid=False, controller=False)
    torch.manual_seed(0)
    v2 = HybridCortexBlock(32, cfg)
    torch.nn.init.normal_(v2.out_proj.weight, std=0.1)
    v1 = _v1_block(32, cfg)
    v1.load_state_dict(v2.state_dict())
    x = torch.randn(2, 70, 32)
    torch.testing.assert_close(v1(x)[0], v2(x)[0], rtol=1e-4, atol=1e-5)


def test_block_throughput_rows():
    rows = block_throughput((8, 16), d_model=32, repeats=1,
                            v1=CortexWrapConfig(rank_fast=8, num_heads=2, forget_gate="sigmoid", use_hybrid=False,
                                                controller=False),
                            v2=CortexWrapConfig(rank_fast=8, num_heads=2, window_size=8, controller=False))
    assert [r["T"] for r in rows] == [8, 16]
    for r in rows:
        assert r["v1_seconds"] > 0 and r["v2_seconds"] > 0
        assert r["speedup"] == pytest.approx(r["v1_seconds"] / r["v2_seconds"], rel=0.02)
        assert r["v2_tokens_per_s"] == pytest.approx(r["T"] / r["v2_seconds"], rel=0.02)
    with pytest.raises(ValueError, match="lengths"):
        block_throughput(())


def test_retention_half_lives_v1_gate_forgets_in_a_few_tokens_v2_persists():
    base = tiny_model("llama", vocab_size=128, num_hidden_layers=2, seed=0)
    model = attach_cortex(base, CortexWrapConfig(layers=[1], rank_fast=8, num_heads=2, use_hybrid=False,
                                                 controller=False))
    v2 = model.sidecars["1"]
    blocks = {"v2": v2, "v1": with_forget_gate(v2, "sigmoid")}
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(0))
    out = retention_half_lives(model, ids, 1, blocks, horizon=120, stride=8)
    assert out["writes"] == len(range(0, 80, 8)) and out["horizon"] == 120
    v1_gate = out["blocks"]["v1"]["gate_only_half_life"]
    assert 4 <= v1_gate <= 8                                        # 0.88 per token: ln 2 / -ln 0.88 ~ 5.4
    assert out["blocks"]["v2"]["gate_only_half_life"] is None       # 0.999 per token: ~700, beyond the horizon
    assert out["blocks"]["v1"]["half_life"] <= v1_gate              # overwriting only shortens it
    assert out["blocks"]["v2"]["curve"][0] == pytest.approx(1.0)
    assert out["lags"] == [0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 120]
    assert len(out["blocks"]["v2"]["curve"]) == len(out["lags"])
    with pytest.raises(ValueError, match="horizon"):
        retention_half_lives(model, ids, 1, blocks, horizon=200)
    with pytest.raises(ValueError, match="input_ids"):
        retention_half_lives(model, ids[0], 1, blocks)


def test_recall_half_life():
    table = {"0": 0.8, "1": 0.9, "2": 0.9, "4": 0.5, "8": 0.44, "16": 0.1}
    out = recall_half_life(table, call_tokens=128)
    assert out["half_life_calls"] == 8 and out["half_life_tokens"] == 1024
    assert out["longest_calls"] == 16 and out["exact_match_at_longest"] == 0.1
    never = recall_half_life({"1": 0.96, "32": 0.95}, call_tokens=128)
    assert never["half_life_calls"] is None and never["longest_tokens"] == 4096
    with pytest.raises(ValueError, match="distance 1"):
        recall_half_life({"0": 1.0, "2": 0.5}, call_tokens=48)


def test_ghost_gap_is_zero_for_both_versions():
    base = tiny_model("llama", vocab_size=128, num_hidden_layers=2, seed=0)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    small = {"v1": CortexWrapConfig(**{**V1_CONFIG.__dict__, "rank_fast": 8}),
             "v2": CortexWrapConfig(**{**V2_CONFIG.__dict__, "rank_fast": 8, "window_size": 16})}
    reference = base(ids).logits
    assert ghost_gap(base, ids, small) == {"v1": 0.0, "v2": 0.0}
    torch.testing.assert_close(base(ids).logits, reference, rtol=0, atol=0)   # detached again, unchanged


def test_ghost_gap_sees_a_sidecar_that_writes():
    """The gap is measured, not assumed: a sidecar with a non-zero output shows up."""
    base = tiny_model("llama", vocab_size=128, num_hidden_layers=2, seed=0)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    cfg = CortexWrapConfig(rank_fast=8, num_heads=2, use_hybrid=False, controller=False)
    original = HybridCortexBlock.__init__

    def noisy_init(self, d_model, cfg):
        original(self, d_model, cfg)
        torch.nn.init.normal_(self.out_proj.weight, std=0.5)

    HybridCortexBlock.__init__ = noisy_init
    try:
        assert ghost_gap(base, ids, {"v1": cfg})["v1"] > 1e-3
    finally:
        HybridCortexBlock.__init__ = original


def test_versions_table_reads_the_measurements():
    blocks = {name: {"half_life": h, "gate_only_half_life": g, "curve": [1.0, 0.5, c128, c4]}
              for name, h, g, c128, c4 in (("v1 fresh", 2, 6, 0.0, 0.0), ("v2 fresh", 2, None, 0.1, 0.02),
                                           ("v1 gate on the trained sidecar", 1, 1, 0.0, 0.0),
                                           ("v2 trained (E2 sidecar)", 18, None, 0.08, 0.04))}
    result = {"throughput": {"rows": [{"T": 128, "v1_tokens_per_s": 900.0, "v2_tokens_per_s": 5000.0, "speedup": 5.5},
                                      {"T": 2048, "v1_tokens_per_s": 610.0, "v2_tokens_per_s": 5744.0,
                                       "speedup": 9.41}]},
              "persistence": {"blocks": blocks, "lags": [0, 1, 128, 1024], "horizon": 1024},
              "ghost_gap": {"v1": 0.0, "v2": 0.0},
              "recall": recall_half_life({"1": 0.66, "32": 0.41}, call_tokens=128)}
    rows = {r["metric"]: r for r in versions_table(result)}
    assert rows["training throughput at T=2048 (tokens/s, fwd+bwd, one block)"]["v2"] == "5744 (9.4x)"
    assert rows["forget-gate half-life, fresh block (tokens)"] == {
        "metric": "forget-gate half-life, fresh block (tokens)", "v1": "6", "v2": "> 1024"}
    assert rows["share of a write left after 128 / 1024 tokens, fresh block"]["v2"] == "0.10 / 0.02"
    assert "0.41 after 4096 tokens" in rows["recall of a pass key across calls (E2)"]["v2"]
