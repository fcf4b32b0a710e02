"""Associative-recall capacity of linear attention vs the (gated) delta rule, and forget-gate math.

The thresholds were calibrated by running the experiments (d_k = d_v = 64, 64 random unit
codebook values, 8 seeds); the notebook shows the full curves.
"""
import math

import pytest
import torch

from cortexlab.eval import capacity as cap
from cortexlab.ops import gated_delta_rule


def by(rows, rule, n):
    (row,) = [r for r in rows if r["rule"] == rule and r["n"] == n]
    return row


def test_delta_write_matches_explicit_recurrence():
    # the library write equals the textbook delta rule S <- S + beta k (v - S^T k)^T
    data = cap.make_recall_data(10, d_k=8, d_v=5, codebook_size=5, n_seeds=2, seed=3)
    k, v = data["keys"], data["values"]
    S = torch.zeros(2, 8, 5)
    for t in range(10):
        kt, vt = k[:, t], v[:, t]
        S = S + kt[:, :, None] * (vt - torch.einsum("bkv,bk->bv", S, kt))[:, None, :]
    lib = cap.write_gated_delta(k[:, :, None], v[:, :, None], a=1.0, beta=1.0)[:, 0]
    assert torch.allclose(lib, S, atol=1e-5)
    # linear attention is the same state without the erase term
    hebb = cap.write_linear_attention(k[:, :, None], v[:, :, None])[:, 0]
    assert torch.allclose(hebb, torch.einsum("btk,btv->bkv", k, v), atol=1e-6)


def test_library_output_reads_while_writing():
    # o_t = S_t^T k_t after a beta = 1 write of a unit key is exactly v_t: reading at the time
    # of writing is trivially perfect, which is why capacity reads the final state instead
    data = cap.make_recall_data(40, d_k=16, d_v=16, codebook_size=16, n_seeds=2)
    k, v = data["keys"][:, :, None], data["values"][:, :, None]
    g, beta = torch.zeros(2, 40, 1), torch.ones(2, 40, 1)
    o, _ = gated_delta_rule(k, k, v, g, beta, scale=1.0, backend="recurrent")
    assert torch.allclose(o, v, atol=1e-4)
    assert cap.recall_accuracy("delta", data).mean() < 1.0  # but 40 > d_k pairs do not all fit


def test_capacity_random_keys():
    rows = cap.capacity_curve((32, 192), n_seeds=8)
    # chance baseline present for every n
    for n in (32, 192):
        assert by(rows, "chance", n)["accuracy"] == pytest.approx(1 / 64)
    # the delta rule recalls every pair at n = d_k / 2
    assert by(rows, "delta", 32)["accuracy"] >= 0.95
    # its readout is closer to the stored value than linear attention's at every n
    for n in (32, 192):
        assert by(rows, "delta", n)["readout_error"] < by(rows, "linear_attention", n)["readout_error"]
    # at 3 d_k linear attention's readout is worse than reading zero (error > 1) ...
    assert by(rows, "linear_attention", 192)["readout_error"] > 1.0
    # ... yet with independent keys its nearest-codebook decoding still beats the delta rule,
    # which has overwritten its old pairs (see test_delta_rule_forgets_oldest_first)
    assert by(rows, "linear_attention", 192)["accuracy"] > by(rows, "delta", 192)["accuracy"]
    for r in rows:
        if r["rule"] != "chance":
            assert r["accuracy"] > 1 / 64


def test_capacity_overlapping_keys_linear_attention_collapses():
    rows = cap.capacity_curve((8, 64, 192), n_seeds=8, key_overlap=0.3)
    for n in (64, 192):
        lin, delta = by(rows, "linear_attention", n)["accuracy"], by(rows, "delta", n)["accuracy"]
        assert lin < delta - 0.15, (n, lin, delta)
    assert by(rows, "linear_attention", 8)["accuracy"] > 0.9
    assert by(rows, "linear_attention", 192)["accuracy"] < 0.2


def test_orthogonal_keys_delta_rule_is_exact_up_to_d_k():
    rows = cap.capacity_curve((64,), n_seeds=4, keys="orthogonal")
    assert by(rows, "delta", 64)["readout_error"] < 1e-4
    assert by(rows, "delta", 64)["accuracy"] == 1.0


def test_delta_rule_forgets_oldest_first():
    rows = cap.recall_by_position(192, n_seeds=8, rules=("linear_attention", "delta"))
    def mean_acc(rule, ages):
        accs = [r["accuracy"] for r in rows if r["rule"] == rule and r["age"] in ages]
        return sum(accs) / len(accs)
    recent, old = range(0, 32), range(160, 192)
    assert mean_acc("delta", recent) > 0.95
    assert mean_acc("delta", old) < 0.2
    assert abs(mean_acc("linear_attention", recent) - mean_acc("linear_attention", old)) < 0.15


def test_same_data_for_every_rule_and_seeded():
    a = cap.make_recall_data(20, n_seeds=3, seed=7)
    b = cap.make_recall_data(20, n_seeds=3, seed=7)
    for name in a:
        assert torch.equal(a[name], b[name])
    assert torch.allclose(a["keys"].norm(dim=-1), torch.ones(3, 20))
    assert torch.allclose(a["values"], a["codebook"].gather(1, a["labels"][..., None].expand(3, 20, 64)))
    r1 = cap.capacity_curve((16, 48), n_seeds=2, seed=1)
    r2 = cap.capacity_curve((16, 48), n_seeds=2, seed=1)
    assert r1 == r2


def test_key_overlap_controls_cosine():
    data = cap.make_recall_data(50, n_seeds=4, key_overlap=0.5)
    k = data["keys"]
    cos = torch.einsum("snk,smk->snm", k, k)
    off = cos[:, ~torch.eye(50, dtype=torch.bool)]
    assert 0.4 < off.mean().item() < 0.6


def test_mean_key_overlap_hand_built_and_batched():
    keys = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]])     # |dots|: 0.6, 0.0, 0.8 over 3 pairs
    assert cap.mean_key_overlap(keys) == pytest.approx((0.6 + 0.0 + 0.8) / 3)
    assert cap.mean_key_overlap(torch.eye(5)) == 0.0
    assert cap.mean_key_overlap(torch.ones(4, 3) / math.sqrt(3)) == pytest.approx(1.0)
    data = cap.make_recall_data(20, n_seeds=3)
    per_seed = [cap.mean_key_overlap(k) for k in data["keys"]]
    assert cap.mean_key_overlap(data["keys"]) == pytest.approx(sum(per_seed) / 3)
    assert 0.05 < per_seed[0] < 0.2                                   # random unit keys in 64-d: ~ 1 / sqrt(d_k)
    with pytest.raises(ValueError):
        cap.mean_key_overlap(torch.ones(1, 4))


def test_half_life_and_gates():
    assert cap.half_life(0.5) == pytest.approx(1.0)
    assert cap.half_life(1.0) == math.inf
    assert cap.half_life(0.88) == pytest.approx(math.log(0.5) / math.log(0.88))
    a_hack = cap.bias_hack_gate(2.0, alpha_max=1.0)
    assert a_hack == pytest.approx(0.8808, abs=1e-4)
    assert cap.bias_hack_gate(2.0) == pytest.approx(0.99 * 0.8808, abs=1e-4)
    assert 5.0 < cap.half_life(cap.bias_hack_gate(2.0)) < 5.6
    a_log = cap.log_space_gate(0.0)
    assert a_log == pytest.approx(0.99909, abs=1e-5)
    assert 700 < cap.half_life(a_log) < 800
    assert cap.retained_fraction(0.88, 48) == pytest.approx(0.0022, abs=1e-4)
    assert cap.retained_fraction(0.99, 800) == pytest.approx(3.2e-4, rel=0.02)
    table = {r["gate"]: r for r in cap.gate_table()}
    assert len(table) == 4
    for row in table.values():
        assert row["a"] == pytest.approx(math.exp(row["g"]))


def test_recall_after_filler_gate_comparison():
    kw = dict(beta=1.0, filler_beta=0.1, n_seeds=8)
    hack = cap.recall_after_filler(100, a=0.88, **kw)
    keep = cap.recall_after_filler(100, a=0.999, **kw)
    assert hack[0]["retained"] == pytest.approx(1.0, abs=1e-4)  # beta = 1 writes the fact exactly
    assert keep[48]["retained"] > 0.8 > 0.01 > abs(hack[48]["retained"])
    assert keep[48]["accuracy"] == 1.0 and hack[48]["accuracy"] < 0.3
    assert keep[100]["retained"] > hack[100]["retained"]
    assert hack[48]["gate_only"] == pytest.approx(0.88 ** 48)


def test_recall_after_filler_backends_agree():
    a = cap.recall_after_filler(70, a=0.95, beta=0.7, n_seeds=2, backend="recurrent")
    b = cap.recall_after_filler(70, a=0.95, beta=0.7, n_seeds=2, backend="chunk")
    for ra, rb in zip(a, b):
        assert ra["retained"] == pytest.approx(rb["retained"], abs=1e-4)


@pytest.mark.parametrize("kwargs", [dict(a=0.0), dict(a=1.5), dict(a=True)])
def test_bad_gate_raises(kwargs):
    with pytest.raises(ValueError, match="a"):
        cap.recall_after_filler(5, **kwargs)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="rule"):
        cap.recall_accuracy("hopfield", cap.make_recall_data(4, n_seeds=1))
    with pytest.raises(ValueError, match="codebook_size"):
        cap.make_recall_data(4, values="onehot", codebook_size=10)
    with pytest.raises(ValueError, match="key_overlap"):
        cap.make_recall_data(4, key_overlap=1.0)
    with pytest.raises(ValueError, match="keys"):
        cap.make_recall_data(4, keys="sparse")
    with pytest.raises(ValueError, match="n"):
        cap.capacity_curve((0, 4))


def test_figures_build():
    from cortexlab.viz import memory

    rows = cap.capacity_curve((8, 16), n_seeds=2, d_k=8, d_v=8, codebook_size=8)
    fig = memory.capacity_figure(rows)
    names = {t.name for t in fig.data}
    assert "chance" in names and "delta rule" in names
    memory.capacity_figure(rows + cap.capacity_curve((8,), n_seeds=1, d_k=8, d_v=8, codebook_size=8,
                                                     key_overlap=0.3), metric="readout_error")
    memory.position_figure(cap.recall_by_position(16, n_seeds=2, d_k=8, d_v=8, codebook_size=8))
    memory.gate_decay_figure({"hack": 0.88, "log": 0.999}, max_tokens=50)
    curve = cap.recall_after_filler(20, a=0.9, n_seeds=2)
    for metric in ("retained", "cosine", "accuracy"):
        memory.filler_figure({"a=0.9": curve}, metric=metric)
    with pytest.raises(ValueError):
        memory.capacity_figure([])
