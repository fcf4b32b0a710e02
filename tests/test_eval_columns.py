import pytest
import torch

from cortexlab.eval import columns as ec
from cortexlab.eval.attention import record_attention
from cortexlab.models import tiny_model
from cortexlab.neuro.columns import mean_pairwise_js_divergence


@pytest.fixture(scope="module")
def records():
    model = tiny_model("llama", seed=0, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    return record_attention(model, ids, [0, 1])


def test_layer_specialization_rows(records):
    rows = ec.layer_specialization(records, 3)
    assert [r["layer"] for r in rows] == [0, 1]
    for r in rows:
        assert r["max_out_err"] < 1e-5
        assert 0 < r["js_columns"] <= torch.log(torch.tensor(2.0)).item()
        assert 0 <= r["js_within"] and 0 < r["js_between"]
        assert r["js_columns"] == pytest.approx(ec.js_scipy(records[r["layer"]].probs, 3), rel=1e-4)


def test_pairwise_js_matches_library(records):
    probs = records[1].probs
    pair = ec.pairwise_js(probs)
    assert torch.allclose(pair, pair.T) and (pair.diagonal() == 0).all()
    for a, b in ((0, 1), (2, 5)):
        assert pair[a, b].item() == pytest.approx(mean_pairwise_js_divergence(probs[:, [a, b]]).item(), rel=1e-5)


def test_attention_distance():
    T = 6
    diag = torch.eye(T)[None, None]
    assert ec.attention_distance(diag) == 0.0
    first = torch.zeros(1, 1, T, T)
    first[..., 0] = 1.0
    assert ec.attention_distance(first, skip=0) == pytest.approx(sum(range(T)) / T)


def test_inhibition_run_no_op_before_and_learns(records):
    heads = records[1].heads
    out = ec.inhibition_run(heads, heads, 3, steps=5, lr=0.05)
    assert out["W_history"].shape == (6, 3, 3) and (out["W_history"][0] == 0).all()
    assert (out["W"].diagonal() == 0).all() and (out["W"] > 0).sum() == 6 and (out["W"] <= 0.5).all()
    assert (out["mean_after"] <= out["mean_before"] + 1e-7).all() and (out["mean_after"] < out["mean_before"]).any()
    assert torch.allclose(out["corr_before"], out["corr_before"].T) and out["corr_before"][0, 0] == pytest.approx(1)
    same = ec.inhibition_run(heads, heads, 3, steps=0)
    assert torch.equal(same["activity_before"], same["activity_after"])


def test_tier_summary_averages_each_tier():
    from cortexlab.eval.columns import tier_summary
    from cortexlab.neuro import HierarchicalColumnOrganizer

    organizer = HierarchicalColumnOrganizer(6, 3)
    rows = [{"layer": layer, "js_columns": float(layer), "js_between": 2.0 * (layer + 1), "js_within": layer + 1.0}
            for layer in range(6)]
    distance = [10.0 * layer for layer in range(6)]
    summary = tier_summary(rows, distance, organizer)
    assert [s["tier"] for s in summary] == ["syntactic", "semantic", "abstract"]
    for s in summary:
        layers = list(organizer.layer_range(s["tier"]))
        assert (s["first_layer"], s["last_layer"]) == (layers[0], layers[-1])
        assert s["js_columns"] == pytest.approx(sum(layers) / len(layers))
        assert s["distance"] == pytest.approx(10 * sum(layers) / len(layers))
        assert s["across_within"] == pytest.approx(2.0)
    assert [s["tier"] for s in tier_summary(rows[:1], distance, organizer)] == ["syntactic"]
