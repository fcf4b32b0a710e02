"""cortexlab.eval.habituation: the notebook-11 measurements on recorded attention of a tiny Llama."""
import pytest
import torch

from cortexlab.eval import habituation as eh
from cortexlab.eval.attention import record_attention
from cortexlab.models import tiny_model
from cortexlab.neuro.habituation import HabituationConfig


@pytest.fixture(scope="module")
def records():
    model = tiny_model("llama", seed=1)
    ids = torch.arange(8).repeat(4)[None]            # one 8-token pattern, four times
    return record_attention(model, ids, [0, 1])


def test_habituate_neutral_and_active(records):
    rec = records[1]
    off = eh.habituate(rec, HabituationConfig(habituation_rate=0.0))
    assert torch.allclose(off.probs, rec.probs, atol=1e-6) and off.map.abs().max() == 0
    on = eh.habituate(rec, HabituationConfig(habituation_rate=1.0, attention_threshold=0.0))
    assert on.map.shape == (1, 4, 32) and on.map.max() > 0
    assert not torch.allclose(on.probs, rec.probs, atol=1e-4)


def test_snapshots_end_at_the_one_call_map(records):
    cfg = HabituationConfig(habituation_rate=1.0, attention_threshold=0.0)
    ends, maps = eh.habituation_snapshots(records[1], cfg, every=5)
    assert ends[-1] == 32 and maps.shape == (len(ends), 4, 32)
    assert torch.allclose(maps[-1], eh.habituate(records[1], cfg).map[0], atol=1e-5)
    assert (maps[0][:, 5:] == 0).all()


def test_repeat_attention(records):
    spans = [(0, 8), (8, 16), (16, 24), (24, 32)]
    mass = eh.repeat_attention(records[1].probs, spans)
    assert mass.shape == (3,) and ((mass >= 0) & (mass <= 1 + 1e-6)).all()
    with pytest.raises(ValueError):
        eh.repeat_attention(records[1].probs, spans[:1])


def test_novelty_repeats_are_familiar(records):
    boost = eh.novelty(records[0])[0]                # layer 0 input: the same token gives the same x
    assert boost[0] == 1.0 and torch.allclose(boost[8:], torch.zeros(24), atol=1e-5)


def test_decay_across_layers(records):
    off = eh.decay_across_layers(records, 0.0)
    assert all(abs(r["sink_plain"] - r["sink_decayed"]) < 1e-6 for r in off)
    on = eh.decay_across_layers(records, 0.5)
    assert on[0]["sink_plain"] == on[0]["sink_decayed"] and on[1]["entropy_decayed"] != on[1]["entropy_plain"]


def test_state_memory_is_linear_in_length():
    row = eh.state_memory(9, 256)
    assert row["state_shape"] == (1, 9, 256) and row["state_bytes"] == 9 * 256 * 4
    assert row["design_bytes"] == 9 * 256 * 256 * 4
