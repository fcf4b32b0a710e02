"""AdaptiveHeadTemperature: exact no-op at strength 0, homeostasis towards the set point, causality,
the running set point carried across calls, masked entries kept masked, input validation."""
import math

import pytest
import torch

from cortexlab.neuro.temperature import AdaptiveHeadTemperature


def masked_scores(B=2, H=3, T=12, seed=0, spread=None):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, H, T, T, generator=gen)
    if spread is not None:                      # per head: a different sharpness
        scores = scores * spread.view(1, H, 1, 1)
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    return scores.masked_fill(causal, -math.inf)


def test_strength_zero_is_exact_noop():
    scores = masked_scores()
    out = AdaptiveHeadTemperature(3, strength=0.0)(scores)
    assert torch.equal(out, scores)


def test_rows_move_towards_a_fixed_target():
    scores = masked_scores(spread=torch.tensor([0.2, 1.0, 6.0]))
    target = 0.5
    before = AdaptiveHeadTemperature.normalised_entropy(scores)
    after = AdaptiveHeadTemperature.normalised_entropy(AdaptiveHeadTemperature(3, 3.0, target)(scores))
    rows = slice(2, None)                       # rows with at least 3 visible keys
    gap_before, gap_after = (before[..., rows] - target).abs(), (after[..., rows] - target).abs()
    assert bool((gap_after <= gap_before + 1e-6).all())
    assert gap_after.mean() < 0.8 * gap_before.mean()
    # negative strength exaggerates the deviation instead
    away = AdaptiveHeadTemperature.normalised_entropy(AdaptiveHeadTemperature(3, -3.0, target)(scores))
    assert (away[..., rows] - target).abs().mean() > gap_before.mean()


def test_running_set_point_is_causal_and_carried_across_calls():
    scores = masked_scores(T=10)
    whole = AdaptiveHeadTemperature(3, 2.0)
    full = whole(scores)
    # causal: changing the last query's scores leaves earlier rows alone
    changed = scores.clone()
    changed[:, :, -1, :5] += 3.0
    assert torch.equal(AdaptiveHeadTemperature(3, 2.0)(changed)[:, :, :-1], full[:, :, :-1])
    # prefill 6 queries, then one query at a time with the KV cache: the same temperatures
    parts = AdaptiveHeadTemperature(3, 2.0)
    pieces = [parts(scores[:, :, :6, :6])]
    for i in range(6, 10):
        pieces.append(parts(scores[:, :, i:i + 1, :i + 1], use_cache=True))
    for i, piece in enumerate([pieces[0]] + pieces[1:]):
        if i == 0:
            torch.testing.assert_close(piece, full[:, :, :6, :6], rtol=1e-6, atol=1e-6)
        else:
            torch.testing.assert_close(piece, full[:, :, 5 + i:6 + i, :6 + i], rtol=1e-6, atol=1e-6)
    assert parts.temperature.shape == (2, 3, 1)


def test_masked_entries_stay_masked_and_single_key_rows_get_the_fixed_target_gain():
    scores = masked_scores()
    out = AdaptiveHeadTemperature(3, 3.0, target=0.2)(scores)
    assert bool(torch.isneginf(out[torch.isneginf(scores)]).all())
    assert torch.equal(out[:, :, 0, 0], scores[:, :, 0, 0] * math.exp(3.0 * (0 - 0.2)))


def test_padding_queries_do_not_move_the_set_point():
    scores = masked_scores(B=1, T=10)
    padded = torch.cat([torch.full((1, 3, 3, 13), -math.inf),                       # 3 padding queries
                        torch.cat([torch.full((1, 3, 10, 3), -math.inf), scores], -1)], dim=2)
    out = AdaptiveHeadTemperature(3, 2.0)(padded)
    torch.testing.assert_close(out[:, :, 3:, 3:], AdaptiveHeadTemperature(3, 2.0)(scores))


def test_reset_and_validation():
    module = AdaptiveHeadTemperature(3)
    module(masked_scores())
    module.reset_state()
    assert module.entropy_sum.numel() == 0 and module.temperature.numel() == 0
    with pytest.raises(ValueError, match="num_heads"):
        AdaptiveHeadTemperature(0)
    with pytest.raises(ValueError, match="strength"):
        AdaptiveHeadTemperature(3, strength=float("nan"))
    with pytest.raises(ValueError, match="target"):
        AdaptiveHeadTemperature(3, target=1.5)
    with pytest.raises(ValueError, match="scores"):
        module(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="heads"):
        module(masked_scores(H=2))
    module(masked_scores(B=2))
    with pytest.raises(ValueError, match="batch"):
        module(masked_scores(B=1)[:, :, -1:], use_cache=True)
