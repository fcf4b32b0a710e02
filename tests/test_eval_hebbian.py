"""cortexlab.eval.hebbian: the notebook-10 measurements on recorded attention of a tiny Llama."""
import pytest
import torch

from cortexlab.eval import hebbian as eh
from cortexlab.eval.attention import record_attention
from cortexlab.models import tiny_model
from cortexlab.neuro import HebbianAttention
from cortexlab.neuro.hebbian import HebbianConfig


@pytest.fixture(scope="module")
def record():
    model = tiny_model("llama", seed=1)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    return record_attention(model, ids, [1])[1]


class _Tok:
    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": [ord(c) for c in text]})()


def test_token_spans_keep_pieces_apart():
    ids, spans = eh.token_spans(_Tok(), ["ab", "cde", "ab"])
    assert ids.tolist() == [[97, 98, 99, 100, 101, 97, 98]] and spans == [(0, 2), (2, 5), (5, 7)]
    with pytest.raises(ValueError):
        eh.token_spans(_Tok(), "ab")


def test_eta_zero_is_plain_attention(record):
    effect = eh.hebbian_effect(record, HebbianConfig(eta=0.0))
    assert torch.equal(effect.bias, torch.zeros_like(effect.bias))
    assert torch.allclose(effect.probs, record.probs, atol=1e-6)
    strong = eh.hebbian_effect(record, HebbianConfig(eta=100.0, learning_rate=1.0))
    assert strong.bias.abs().max() > 0 and (strong.bias.triu(1) == 0).all()
    assert not torch.allclose(strong.probs, record.probs, atol=1e-3)


def test_span_mass(record):
    mass = eh.span_mass(record.probs, (10, 24), (0, 10))
    assert mass.shape == (4,) and ((mass >= 0) & (mass <= 1)).all()
    assert torch.allclose(eh.span_mass(record.probs, (5, 24), (0, 24)), torch.ones(4))
    with pytest.raises(ValueError):
        eh.span_mass(record.probs, (0, 30), (0, 5))


def test_norm_trace_matches_one_forward_without_clipping(record):
    cfg = HebbianConfig(learning_rate=0.1, max_hebbian_norm=1e30)
    trace = eh.hebbian_norm_trace(record, cfg, step=1)
    module = HebbianAttention(16, 4, cfg)
    module.score_bias(record.q, record.k, record.scores)
    assert trace.shape == (24, 4)
    assert torch.allclose(trace[-1], module.get_hebbian_strength(per_head=True), rtol=1e-4)
    clipped = eh.hebbian_norm_trace(record, HebbianConfig(learning_rate=0.1, max_hebbian_norm=1e-3), step=4)
    assert clipped.shape == (6, 4) and (clipped <= 1e-3 * (1 + 1e-5)).all()


def test_zero_reward_leaves_h_unchanged(record):
    rows = eh.reward_effect(record, 12, [0.0, 1.0, -1.0], HebbianConfig(learning_rate=0.1))
    assert rows[0].changed == 0.0 and torch.equal(rows[0].norm_after, rows[0].norm_before)
    assert rows[1].changed > 0 and rows[2].changed > 0
    assert rows[0].probs.shape == (1, 4, 12, 24)
    with pytest.raises(ValueError):
        eh.reward_effect(record, 0, [1.0])


def test_eta_sweep_equals_the_effect_and_span_mass_per_eta(record):
    cfg = HebbianConfig(learning_rate=0.1)
    spans = {"late": (16, 24), "middle": (8, 16)}
    rows = eh.eta_sweep(record, [0.0, 0.5, 2.0], keys=(0, 8), queries=spans, config=cfg)
    finite = torch.isfinite(record.scores)
    for row in rows:
        effect = eh.hebbian_effect(record, HebbianConfig(learning_rate=0.1, eta=row["eta"]))
        assert row["bias_ratio"] == pytest.approx(effect.bias[finite].std().item() / record.scores[finite].std().item())
        for name, span in spans.items():
            assert row[name] == pytest.approx(eh.span_mass(effect.probs, span, (0, 8)).mean().item())
    assert [r["eta"] for r in rows] == [0.0, 0.5, 2.0]
    assert rows[0]["bias_ratio"] == 0                                   # eta = 0: plain attention
    assert rows[0]["late"] == pytest.approx(eh.span_mass(record.probs, (16, 24), (0, 8)).mean().item())
    assert rows[2]["bias_ratio"] == pytest.approx(4 * rows[1]["bias_ratio"], rel=1e-4)   # the bias is linear in eta
    with pytest.raises(ValueError):
        eh.eta_sweep(record, [], keys=(0, 8), queries=spans)
