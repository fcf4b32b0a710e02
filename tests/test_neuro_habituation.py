"""Habituation: suppression of over-attended keys, recovery, causality, cross-layer decay, novelty."""
import math

import pytest
import torch

from cortexlab.neuro.habituation import (
    AttentionDecay,
    HabituatingAttention,
    HabituationConfig,
    NoveltyDetector,
)


def causal_scores(B=2, H=3, T=10, seed=0, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    scores = scale * torch.randn(B, H, T, T, generator=gen)
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    return scores.masked_fill(mask, -math.inf)


def dominant_key_scores(T=12, key=0, H=1):
    """Every query strongly prefers key `key` (the repeated stimulus); other visible keys score 0."""
    scores = torch.zeros(1, H, T, T)
    scores[..., key] = 5.0
    return scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)


def naive_habituation(scores, cfg, novelty=None):
    """Oracle: the docstring's equations with explicit loops over queries i and earlier queries i'."""
    A = torch.nan_to_num(scores.double().softmax(-1), nan=0.0)
    fresh = (A - cfg.attention_threshold).clamp_min(0)
    out = scores.double().clone()
    Tq = scores.shape[2]
    for i in range(Tq):
        weights = torch.tensor([(1 - cfg.recovery_rate) ** (i - 1 - p) for p in range(i)], dtype=torch.float64)
        E = (weights[:, None] * fresh[:, :, :i]).sum(2)                       # sum over earlier queries p < i
        h = (cfg.habituation_rate * E).clamp_max(cfg.max_habituation)
        if novelty is not None:
            h = h * (1 - novelty.double()[:, None, :])
        out[:, :, i] = out[:, :, i] + torch.log1p(-h)
    return out


CFG = HabituationConfig(habituation_rate=0.3, recovery_rate=0.2, attention_threshold=0.05, max_habituation=0.8)


@pytest.mark.parametrize("field,value", [("habituation_rate", -0.1), ("recovery_rate", 1.5),
                                         ("attention_threshold", 1.0), ("max_habituation", 1.0),
                                         ("max_habituation", float("nan")), ("habituation_rate", True)])
def test_config_rejects_out_of_range(field, value):
    with pytest.raises(ValueError, match=field):
        HabituationConfig(**{field: value})


def test_matches_naive_oracle_with_recovery_and_novelty():
    scores = causal_scores(T=9)
    novelty = torch.rand(2, 9, generator=torch.Generator().manual_seed(1))
    hab = HabituatingAttention(3, 16, CFG)
    out = hab(scores, seq_len=9, novelty=novelty)
    expected = naive_habituation(scores, CFG, novelty)
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(out), finite)
    assert torch.allclose(out[finite].double(), expected[finite], atol=1e-5)


def test_long_sequence_spanning_chunks_matches_oracle_and_passes_gradients():
    scores = causal_scores(B=1, H=2, T=100, seed=4).requires_grad_(True)   # 2 chunks of 64 queries
    out = HabituatingAttention(2, 256, CFG)(scores)
    expected = naive_habituation(scores.detach(), CFG)
    finite = torch.isfinite(expected)
    assert torch.allclose(out[finite].double(), expected[finite], atol=1e-5)
    upstream = torch.randn(out.shape).masked_fill(~finite, 0.0)
    out.backward(upstream)
    assert torch.equal(scores.grad, upstream)                               # the bias is a stop-gradient state


def test_repeated_key_is_suppressed_and_fresh_key_gains():
    scores = dominant_key_scores(T=12)
    cfg = HabituationConfig(habituation_rate=0.2, recovery_rate=0.0, attention_threshold=0.1, max_habituation=0.9)
    plain = scores.softmax(-1)[0, 0]
    out = HabituatingAttention(1, 64, cfg)(scores)
    habituated = out.softmax(-1)[0, 0]
    rows = range(1, 12)
    assert all(habituated[i, 0] < plain[i, 0] - 1e-3 for i in rows)           # the repeated stimulus falls
    assert all(habituated[i, i] > plain[i, i] for i in rows)                  # the newest key (never attended) gains
    ratio = habituated[1:, 0] / plain[1:, 0]
    assert torch.all(ratio[1:] < ratio[:-1] + 1e-6)                          # falls with every repeat ...
    assert math.isclose(out[0, 0, -1, 0] - scores[0, 0, -1, 0], math.log(1 - 0.9), rel_tol=1e-5)  # capped at h_max


def test_suppression_recovers_when_the_key_is_no_longer_attended():
    T = 14
    scores = dominant_key_scores(T=T)
    scores[0, 0, 6:, 0] = -5.0                                                # from query 6 on, key 0 is ignored
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    recovering = HabituatingAttention(1, 64, HabituationConfig(recovery_rate=0.3))
    bias = (recovering(scores) - scores)[0, 0, :, 0]
    assert torch.all(bias[8:] > bias[7:-1])                                    # suppression of key 0 decays back
    frozen = HabituatingAttention(1, 64, HabituationConfig(recovery_rate=0.0))
    bias0 = (frozen(scores) - scores)[0, 0, :, 0]
    assert torch.allclose(bias0[8:], bias0[7:-1])                             # no recovery without recovery_rate


def test_zero_rate_is_exact_noop():
    scores = causal_scores()
    out = HabituatingAttention(3, 16, HabituationConfig(habituation_rate=0.0))(scores)
    assert torch.equal(out, scores)


def test_causal_later_queries_do_not_change_earlier_rows():
    scores = causal_scores(T=10)
    t = 4
    changed = scores.clone()
    changed[:, :, t + 1:] = causal_scores(T=10, seed=5)[:, :, t + 1:]          # rows of later tokens
    hab = HabituatingAttention(3, 16, CFG)
    assert torch.equal(hab(scores)[:, :, :t + 1], hab(changed)[:, :, :t + 1])


def test_masked_entries_stay_masked_and_padding_rows_stay_finite_elsewhere():
    scores = causal_scores(T=8)
    scores[1, :, 3] = -math.inf                                               # a fully masked (padding) query row
    out = HabituatingAttention(3, 16, CFG)(scores)
    assert torch.equal(torch.isneginf(out), torch.isneginf(scores))
    assert not torch.isnan(out).any()


def test_novelty_shields_a_novel_key():
    scores = dominant_key_scores(T=8)
    novelty = torch.zeros(1, 8)
    novelty[0, 0] = 1.0
    hab = HabituatingAttention(1, 16, CFG)
    assert torch.equal(hab(scores, novelty=novelty), scores)                 # key 0 fully novel: no suppression
    assert torch.equal(hab(scores, novelty=torch.zeros(1, 8)), hab(scores))


def test_map_shape_persistence_and_reset():
    hab = HabituatingAttention(3, 16, CFG)
    assert hab.get_habituation_map().shape == (0, 3, 0)
    scores = causal_scores(T=9)
    hab(scores)
    hmap = hab.get_habituation_map()
    assert hmap.shape == (2, 3, 9) and hmap.min() >= 0 and hmap.max() <= CFG.max_habituation
    assert hmap.max() > 0
    # the map is what the next (10th) query would see: compare with the oracle on an extended sequence
    ext = torch.full((2, 3, 10, 10), -math.inf)
    ext[:, :, :9, :9] = scores
    ext[:, :, 9, :] = 0.0
    expected_bias = naive_habituation(ext, CFG)[:, :, 9, :9] - ext[:, :, 9, :9].double()
    assert torch.allclose(torch.log1p(-hmap.double()), expected_bias, atol=1e-5)
    assert torch.equal(hab.get_habituation_map(), hmap)                      # persists until the next call
    hab.reset_state()
    assert hab.get_habituation_map().shape == (0, 3, 0)


def test_state_at_4k_context_is_per_key_not_per_pair():
    T, Tq = 4096, 64                                                          # the last 64 queries of 4k tokens
    mask = torch.ones(Tq, T, dtype=torch.bool).triu(T - Tq + 1)
    scores = torch.zeros(1, 2, Tq, T).masked_fill(mask, -math.inf)
    hab = HabituatingAttention(2, T, HabituationConfig())
    hab(scores)
    assert [tuple(b.shape) for b in hab.buffers()] == [(1, 2, T)]              # B x H x Tk, never H x L x L
    assert torch.isfinite(hab.get_habituation_map()).all()


def test_decoding_with_cache_matches_full_sequence():
    scores = causal_scores(T=10)
    hab = HabituatingAttention(3, 16, CFG)
    full = hab(scores)
    hab.reset_state()
    prefix = hab(scores[:, :, :6, :6], use_cache=True)
    steps = [hab(scores[:, :, t:t + 1, :t + 1], use_cache=True) for t in range(6, 10)]
    assert torch.allclose(prefix, full[:, :, :6, :6], atol=1e-6)
    for t, step in zip(range(6, 10), steps):
        assert torch.allclose(step, full[:, :, t:t + 1, :t + 1], atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(scores=torch.zeros(2, 3, 4)), ValueError, "4-D"),
    (dict(scores=torch.zeros(2, 3, 4, 4, dtype=torch.long)), TypeError, "floating"),
    (dict(scores=torch.zeros(2, 2, 4, 4)), ValueError, "num_heads"),
    (dict(scores=torch.zeros(2, 3, 4, 20)), ValueError, "max_seq_len"),
    (dict(scores=torch.zeros(2, 3, 4, 4), seq_len=5), ValueError, "seq_len"),
    (dict(scores=torch.zeros(2, 3, 4, 4), novelty=torch.full((2, 4), 2.0)), ValueError, "novelty"),
    (dict(scores=torch.zeros(2, 3, 1, 4), use_cache=True), ValueError, "use_cache"),
])
def test_bad_input_raises_before_state_changes(kwargs, error, match):
    hab = HabituatingAttention(3, 16, CFG)
    hab(causal_scores(T=5))
    before = hab.exposure.clone()
    with pytest.raises(error, match=match):
        hab(**kwargs)
    assert torch.equal(hab.exposure, before)


def test_half_precision_keeps_dtype():
    scores = causal_scores(T=6).bfloat16()
    out = HabituatingAttention(3, 16, CFG)(scores)
    assert out.dtype == torch.bfloat16 and torch.equal(torch.isneginf(out), torch.isneginf(scores))


# ---- AttentionDecay -------------------------------------------------------------------------------------------

def run_layers(decay, scores, num_layers=4):
    state, probs_per_layer = None, []
    for layer in range(num_layers):
        probs = decay(scores, state, layer).softmax(-1)
        probs_per_layer.append(probs)
        state = decay.update(probs, state)
    return probs_per_layer, state


def test_attention_decay_lowers_keys_every_layer_fixated_on():
    scores = dominant_key_scores(T=6, H=2)
    probs, _ = run_layers(AttentionDecay(4, decay=0.5), scores)
    fixated = torch.stack([p[0, :, 1:, 0] for p in probs])                    # [layers, H, queries 1..5]
    assert torch.equal(probs[0], scores.softmax(-1))                          # first layer: nothing accumulated
    assert torch.all(fixated[1:] < fixated[:-1])                              # falls layer after layer
    newest = torch.stack([p[0, :, 5, 5] for p in probs])
    assert torch.all(newest[1:] > newest[:-1])                               # the other keys gain


def test_attention_decay_equals_formula_and_zero_is_noop():
    scores = causal_scores(T=7)
    probs = [causal_scores(T=7, seed=s).softmax(-1) for s in (1, 2)]
    decay = AttentionDecay(3, decay=[0.0, 0.3, 0.6])
    state = decay.update(probs[1], decay.update(probs[0]))
    expected = scores + (probs[0].mean(1) + probs[1].mean(1))[:, None] * math.log(1 - 0.6)
    out = decay(scores, state, 2)
    assert torch.allclose(out, expected, atol=1e-6) and torch.equal(torch.isneginf(out), torch.isneginf(scores))
    assert torch.equal(decay(scores, state, 0), scores)                       # decay 0 at layer 0: exact no-op
    assert torch.equal(AttentionDecay(3, decay=0.0)(scores, state, 2), scores)


def test_attention_decay_is_causal():
    scores = causal_scores(T=8)
    probs = scores.softmax(-1)
    later = probs.clone()
    later[:, :, 5:] = causal_scores(T=8, seed=7)[:, :, 5:].softmax(-1)
    decay = AttentionDecay(2, decay=0.4)
    a = decay(scores, decay.update(probs), 1)
    b = decay(scores, decay.update(later), 1)
    assert torch.equal(a[:, :, :5], b[:, :, :5])


def test_attention_decay_bad_input():
    with pytest.raises(ValueError, match="decay"):
        AttentionDecay(3, decay=[0.1, 0.2])
    with pytest.raises(ValueError, match="decay"):
        AttentionDecay(3, decay=1.0)
    decay = AttentionDecay(3)
    with pytest.raises(ValueError, match="layer_idx"):
        decay(causal_scores(), None, 3)
    with pytest.raises(ValueError, match="state"):
        decay(causal_scores(T=5), torch.zeros(2, 4, 4), 1)


# ---- NoveltyDetector ------------------------------------------------------------------------------------------

def test_novelty_repeat_is_familiar_new_token_is_novel():
    eye = torch.eye(6)
    x = torch.stack([eye[0], eye[1], 3 * eye[0], eye[2], eye[1] + 0.01 * eye[3]])[None]   # [1, 5, 6]
    novelty = NoveltyDetector(6)(x)[0]
    assert novelty[0] == 1.0                                                  # nothing earlier: novel
    assert novelty[1] == 1.0 and novelty[3] == 1.0                            # orthogonal to all earlier tokens
    assert novelty[2] < 1e-6 and novelty[4] < 1e-3                            # repeats of earlier tokens
    assert torch.equal(NoveltyDetector(6, strength=0.0)(x), torch.zeros(1, 5))


def test_novelty_is_causal_and_drives_dishabituation():
    x = torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(3))
    changed = x.clone()
    changed[:, 5:] = torch.randn(2, 4, 8)
    detector = NoveltyDetector(8)
    assert torch.equal(detector(x)[:, :5], detector(changed)[:, :5])
    scores = dominant_key_scores(T=9).expand(2, 1, 9, 9)
    boost = detector(x)
    hab = HabituatingAttention(1, 16, CFG)
    with_boost = hab(scores, novelty=boost) - scores
    without = hab(scores) - scores
    finite = torch.isfinite(scores)
    assert torch.all(with_boost[finite] >= without[finite])                   # novelty only lowers suppression


def test_novelty_bad_input():
    with pytest.raises(ValueError, match="strength"):
        NoveltyDetector(4, strength=2.0)
    with pytest.raises(ValueError, match="x"):
        NoveltyDetector(4)(torch.zeros(1, 3, 5))
    with pytest.raises(TypeError, match="x"):
        NoveltyDetector(4)(torch.zeros(1, 3, 4, dtype=torch.long))
