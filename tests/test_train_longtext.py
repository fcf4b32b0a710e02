"""E3 (cortexlab.train.longtext) on tiny models: the segmented losses are the model's own, a fresh sidecar is a
ghost, the memory crosses segment boundaries, and training lowers the held-out loss."""
import pytest
import torch

from cortexlab.cortex import CortexWrapConfig, attach_cortex
from cortexlab.models import tiny_model
from cortexlab.train.longtext import (
    LongTextConfig,
    carried_gain_by_offset,
    full_context_losses,
    random_windows,
    segment_losses,
    train_longtext,
)

V, S = 64, 16


def tiny(seed=0, **overrides):
    base = tiny_model("llama", vocab_size=V, num_hidden_layers=3, seed=seed)
    torch.manual_seed(seed)
    cfg = dict(layers=[1], rank_fast=16, num_heads=2, controller=True, use_hybrid=True, window_size=S)
    return attach_cortex(base, CortexWrapConfig(**{**cfg, **overrides}))


def randomise_(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.sidecars.values():
            block.out_proj.weight.copy_(torch.randn(block.out_proj.weight.shape, generator=gen) * 0.5)
    return model


def periodic_docs(n, length, seed):
    """Documents of random tokens that repeat with period S (test data for the windows and shapes)."""
    gen = torch.Generator().manual_seed(seed)
    return {f"doc{i}": torch.randint(0, V, (S,), generator=gen).repeat(length // S + 1)[:length] for i in range(n)}


def topic_docs(n, length, seed, topic=4):
    """Documents drawn uniformly from their own `topic` random tokens out of V: the frozen random base cannot
    tell (ln V per token); a memory of the tokens read so far can (down to ln topic), across boundaries too."""
    gen = torch.Generator().manual_seed(seed)
    return {f"doc{i}": torch.randperm(V, generator=gen)[:topic][torch.randint(0, topic, (length,), generator=gen)]
            for i in range(n)}


def test_segment_losses_are_the_models_own_and_a_fresh_sidecar_is_a_ghost():
    model = tiny()
    ids = torch.randint(0, V, (2, 3 * S + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = segment_losses(model, ids, S, disabled=True)
        ghost = segment_losses(model, ids, S)
        by_hand = []
        with model.disabled():
            for c in range(3):
                logits = model(ids[:, c * S:(c + 1) * S], use_cache=False).logits
                by_hand.append(torch.nn.functional.cross_entropy(
                    logits.transpose(1, 2), ids[:, c * S + 1:(c + 1) * S + 1], reduction="none"))
    assert base.shape == (2, 3 * S)
    torch.testing.assert_close(base, torch.cat(by_hand, 1))
    torch.testing.assert_close(ghost, base, rtol=0, atol=0)      # zero-init output: exactly the base
    full = full_context_losses(model, ids)
    torch.testing.assert_close(full[:, :S], base[:, :S])          # the first segment sees the same prefix
    assert not torch.allclose(full[:, S:], base[:, S:])           # later ones do not


def test_the_memory_crosses_segment_boundaries_and_carries_gradients():
    model = randomise_(tiny())
    ids = torch.randint(0, V, (2, 2 * S + 1), generator=torch.Generator().manual_seed(1))
    losses = segment_losses(model, ids, S)
    with torch.no_grad():
        alone = segment_losses(model, ids[:, S:], S)              # the second segment read from an empty memory
    torch.testing.assert_close(losses[:, :S].detach(), segment_losses(model, ids[:, :S + 1], S).detach())
    assert not torch.allclose(losses[:, S:].detach(), alone)
    with torch.no_grad():
        reset = segment_losses(model, ids, S, carry=False)
    torch.testing.assert_close(reset[:, :S], losses[:, :S].detach())   # the first segment: nothing to carry yet
    torch.testing.assert_close(reset[:, S:], alone)
    losses[:, S:].sum().backward()
    block = model.sidecars["1"]
    assert block.gdn.qkv_proj.weight.grad is not None and block.gdn.qkv_proj.weight.grad.abs().sum() > 0


def test_random_windows_and_bad_input():
    docs = list(periodic_docs(3, 5 * S, seed=0).values()) + [torch.arange(10)]
    a, b = random_windows(docs, 4, 2 * S + 1, seed=7), random_windows(docs, 4, 2 * S + 1, seed=7)
    assert torch.equal(a, b) and a.shape == (4, 2 * S + 1)
    assert not torch.equal(a, random_windows(docs, 4, 2 * S + 1, seed=8))
    with pytest.raises(ValueError, match="no document"):
        random_windows(docs, 1, 6 * S, seed=0)
    model = tiny()
    with pytest.raises(ValueError, match="segment_tokens"):
        segment_losses(model, torch.zeros(1, 2 * S, dtype=torch.int64), S)
    with pytest.raises(ValueError, match="ids"):
        segment_losses(model, torch.zeros(2 * S + 1, dtype=torch.int64), S)
    for name, value in (("steps", 0), ("segment_tokens", 0), ("min_lr_ratio", 2.0), ("lr", -1.0)):
        with pytest.raises(ValueError, match=name):
            LongTextConfig(**{name: value})


def test_training_lowers_the_held_out_loss_below_the_base():
    """Topic documents: the frozen random base sits near ln V everywhere; after training, the sidecar's
    held-out loss (new topics) is clearly lower in the later segments, and training loss fell."""
    cfg = LongTextConfig(segment_tokens=S, train_segments=3, eval_segments=4, eval_docs=8, steps=60, batch_size=8,
                         lr=1e-2, warmup_steps=5)
    result = train_longtext(cfg, model=tiny(), train_docs=topic_docs(64, 4 * S, seed=0),
                            heldout_docs=topic_docs(8, 4 * S + 1, seed=1), progress=False)
    ev = result["eval"]
    history = result["history"]
    assert len(history) == 60 and history[-1]["loss"] < history[0]["loss"] - 0.2
    later, first = ev["later_segments"], ev["first_segment"]
    assert later["sidecar_segments"] < later["base_segments"] - 0.1
    assert abs(later["base_segments"] - first["base_segments"]) < 0.1           # the base cannot use more text
    assert first["sidecar_reset"] == pytest.approx(first["sidecar_segments"], abs=1e-5)
    assert len(ev["per_position"]["sidecar_segments"]) == 4 * S and len(ev["per_segment"]["base_segments"]) == 4
    assert ev["segment_tokens"] == S and set(carried_gain_by_offset(ev, edges=(0, 4))) == {"0-3", f"4-{S - 1}"}


def test_carried_gain_by_offset_averages_reset_minus_carried_over_later_segments():
    S = 8
    reset = [5.0] * (3 * S)
    carried = [5.0] * S + [5.0 - (1.0 if j % S < 2 else 0.25) for j in range(S, 3 * S)]   # first segment: equal
    carried[S + 7] = 5.0 - 0.75                                  # one late token of segment 1 gains more
    evaluation = {"segment_tokens": S, "per_position": {"sidecar_segments": carried, "sidecar_reset": reset}}
    gain = carried_gain_by_offset(evaluation, edges=(0, 2, 4))
    assert gain == {"0-1": 1.0, "2-3": 0.25, "4-7": pytest.approx((7 * 0.25 + 0.75) / 8)}
    with pytest.raises(ValueError, match="edges"):
        carried_gain_by_offset(evaluation, edges=(2, 4))
    with pytest.raises(ValueError, match="positions"):
        one_segment = {"segment_tokens": S,
                       "per_position": {"sidecar_segments": carried[:S], "sidecar_reset": reset[:S]}}
        carried_gain_by_offset(one_segment, edges=(0, 2))
    with pytest.raises(ValueError, match="positions"):       # a segment length the evaluation did not use
        carried_gain_by_offset({**evaluation, "segment_tokens": 5}, edges=(0, 2))
    with pytest.raises(ValueError, match="segment_tokens"):  # not evaluate_longtext's result
        carried_gain_by_offset({"per_position": evaluation["per_position"]})
