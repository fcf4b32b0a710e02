"""cortexlab.eval.controller on a tiny wrapped model: event texts, traces, contrasts."""
import pytest
import torch

from cortexlab.cortex import CortexWrapConfig, attach_cortex
from cortexlab.eval import controller as ec
from cortexlab.models import tiny_model
from cortexlab.viz import controller as viz


class ByteTokenizer:
    """Enough of a tokenizer for the tiny models (vocab 256)."""

    def __call__(self, text):
        return type("Encoded", (), {"input_ids": list(text.encode("utf-8"))})()


def test_text_with_events_places_every_event_where_it_says():
    tok = ByteTokenizer()
    text = ec.text_with_events(tok, max_tokens=3000, every=2)
    ids = text.input_ids[0].tolist()
    assert len(ids) <= 3000 and len(text.spans) >= 2
    for n, (start, end) in enumerate(text.spans):
        assert bytes(ids[start:end]).decode() == ec.DEFAULT_EVENTS[n % len(ec.DEFAULT_EVENTS)]
    with pytest.raises(ValueError, match="every"):
        ec.text_with_events(tok, every=0)


def test_signal_trace_matches_the_forward_and_contrast_is_computed():
    model = attach_cortex(tiny_model("llama"), CortexWrapConfig(rank_fast=8, num_heads=2, layers=[1]))
    text = ec.text_with_events(ByteTokenizer(), max_tokens=400, every=1)
    trace = ec.signal_trace(model, text.input_ids, 1)
    T = text.input_ids.shape[1]
    assert all(v.shape == (T,) for v in trace.values())
    assert ((trace["decay"] > 0.99) & (trace["decay"] <= 1)).all()       # the documented start, a ~ 0.999
    assert ((trace["entropy"] >= 0) & (trace["entropy"] <= 1)).all()
    contrast = ec.event_contrast(trace["surprise"], text.spans)
    assert contrast["ratio"] == pytest.approx(contrast["events"] / contrast["rest"])
    with pytest.raises(ValueError, match="no sidecar"):
        ec.signal_trace(model, text.input_ids, 0)
    fig = viz.signals_figure(trace, text.spans)
    assert len(fig.data) == 4


def test_layer_sweep_leaves_the_base_untouched():
    base = tiny_model("qwen2")
    x = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        before = base(x).logits
    text = ec.text_with_events(ByteTokenizer(), max_tokens=300, every=1)
    rows = ec.layer_sweep(base, text, [0, 1], rank_fast=8, num_heads=2)
    assert [r["layer"] for r in rows] == [0, 1] and "entropy_ratio" in rows[0]
    with torch.no_grad():
        assert torch.equal(base(x).logits, before)
    assert len(viz.layer_sweep_figure(rows).data) == 2


def test_event_contrast_rejects_degenerate_spans():
    with pytest.raises(ValueError, match="spans"):
        ec.event_contrast(torch.ones(5), [])


def test_event_contrast_skip_leaves_the_first_tokens_out():
    values = torch.tensor([100.0, 50.0, 1.0, 2.0, 6.0, 8.0, 3.0])
    spans = [(4, 6)]
    assert ec.event_contrast(values, spans) == pytest.approx(
        {"events": 7.0, "rest": 156 / 5, "ratio": 7.0 / (156 / 5)})
    assert ec.event_contrast(values, spans, skip=2) == pytest.approx({"events": 7.0, "rest": 2.0, "ratio": 3.5})
    assert ec.event_contrast(values, spans, skip=0) == ec.event_contrast(values, spans)
    with pytest.raises(ValueError, match="spans"):
        ec.event_contrast(values, [(0, 2)], skip=2)             # the only event tokens are skipped
    with pytest.raises(ValueError, match="skip"):
        ec.event_contrast(values, spans, skip=-1)


def test_controller_at_init_is_no_controller_and_the_base_is_left_as_it_was():
    base = tiny_model("llama")
    x = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = base(x).logits
    check = ec.controller_equivalence(base, x, 1, rank_fast=8, num_heads=2)
    assert check["max_diff"] <= 1e-5
    assert check["sidecar_effect"] > 1e-4                       # the random readout makes the check mean something
    assert check["controller_only"] and all("controller" in n or "slow" in n or "probe" in n
                                            for n in check["controller_only"])
    assert ec.controller_equivalence(base, x, 1, rank_fast=8, num_heads=2) == check      # seeded
    with torch.no_grad():
        assert torch.equal(base(x).logits, before)
    attach_cortex(base, CortexWrapConfig(layers=[0], rank_fast=8, num_heads=2)).detach()  # no sidecar left on


def test_conflict_surprise_reads_the_digits_of_each_key():
    from transformers import AutoTokenizer

    from conftest import randomise_, tiny_cortex
    from cortexlab.data import RecallTask
    from cortexlab.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    task = RecallTask(tokenizer, "heldout", max_filler_chars=20_000)
    model = randomise_(tiny_cortex(tokenizer))
    got = ec.conflict_surprise(model, task, 1, episodes=3, seed=0)
    assert set(got) == {"first", "second"} and all(len(v) == 2 and min(v) > 0 for v in got.values())
    assert got["second"] != got["first"]
    # the same numbers read straight from a recorded call 1 at the first key's digits
    batch, memory = task.conflict_batch(3, 3, 0), None
    for call, (name, key) in enumerate((("first", batch.answer), ("second", batch.second))):
        with torch.no_grad(), model.recording() as traces:      # call 2 reads the memory call 1 left
            memory = model(batch.input_ids[:, call], memory=memory).memory
        ids, surprise = batch.input_ids[:, call].tolist(), traces[1][0]["surprise"]
        digits = [[t for t in range(len(row) - 4) if row[t:t + 5] == k][0] for row, k in zip(ids, key.tolist())]
        direct = torch.stack([surprise[b, d:d + 5] for b, d in enumerate(digits)]).mean((0, 1))
        assert got[name] == pytest.approx(direct.tolist(), abs=1e-4)
    with pytest.raises(ValueError, match="layer"):
        ec.conflict_surprise(model, task, 2)
    with pytest.raises(ValueError, match="controller"):
        ec.conflict_surprise(tiny_cortex(tokenizer, controller=False), task, 1)

