"""HebbianAttention / RewardModulatedHebbian: equations vs a token-by-token oracle, neutrality, causality,
the in-context effect of co-activation, decay, norm clipping, the reward gate and input validation."""
import math

import pytest
import torch
import torch.nn.functional as F

from cortexlab.neuro.hebbian import HebbianAttention, HebbianConfig, RewardModulatedHebbian


def qkv(B=2, H=2, T=9, D=8, seed=0, Hkv=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=gen)
    k = torch.randn(B, Hkv or H, T, D, generator=gen)
    v = torch.randn(B, Hkv or H, T, D, generator=gen)
    return q, k, v


def with_state(module, seed=1):
    gen = torch.Generator().manual_seed(seed)
    module.hebbian.copy_(torch.randn(module.hebbian.shape, generator=gen) * 0.3)
    return module


def oracle(q, k, v, H0, cfg, reward):
    """The defining equations token by token: H_i = c_i H_0 + r lr s E_i, E_{i+1} = lam E_i + q_i kbar_i^T,
    c_i = 1 - min(|r|, 1)(1 - lam^i)."""
    B, H, T, D = q.shape
    s, lam = D ** -0.5, cfg.decay_rate
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    kbar = torch.softmax((s * q @ k.transpose(-1, -2)).masked_fill(mask, -math.inf), -1) @ k
    outs, finals = torch.zeros(B, T, H, D), []
    for b in range(B):
        r = float(reward[b])
        E = torch.zeros(H, D, D)
        for i in range(T + 1):
            Hi = (1 - min(abs(r), 1) * (1 - lam ** i)) * H0 + r * cfg.learning_rate * s * E
            if i == T:
                finals.append(Hi)
                break
            logits = s * torch.einsum("hd,hjd->hj", q[b, :, i], k[b]) + cfg.eta * s * torch.einsum(
                "hd,hde,hje->hj", q[b, :, i], Hi, k[b])
            logits[:, i + 1:] = -math.inf
            outs[b, i] = (torch.softmax(logits, -1)[:, None, :] @ v[b]).squeeze(1)
            E = lam * E + torch.einsum("hd,he->hde", q[b, :, i], kbar[b, :, i])
    return outs, torch.stack(finals).mean(0)


@pytest.mark.parametrize("reward, decay", [(None, 0.9), ([0.7, -1.3], 0.9), (None, 0.0), ([0.4, 1.0], 1.0)])
def test_matches_token_by_token_oracle(reward, decay):
    cfg = HebbianConfig(learning_rate=0.2, decay_rate=decay, max_hebbian_norm=1e6, eta=0.8)
    q, k, v = qkv()
    module = RewardModulatedHebbian(8, 2, cfg) if reward else HebbianAttention(8, 2, cfg)
    H0 = with_state(module).hebbian.clone()
    kwargs = {"reward": torch.tensor(reward)} if reward else {}
    out = module(q, k, v, **kwargs)
    expected, final = oracle(q, k, v, H0, cfg, reward or [1.0, 1.0])
    assert out.shape == (2, 9, 2, 8)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(module.hebbian, final, atol=1e-5, rtol=1e-5)


def test_eta_zero_is_plain_attention_and_fresh_state_leaves_first_query_plain():
    q, k, v = qkv(Hkv=1)   # GQA: one KV head shared by two query heads
    plain = F.scaled_dot_product_attention(q, k.expand_as(q), v.expand_as(q), is_causal=True).transpose(1, 2)
    neutral = with_state(HebbianAttention(8, 2, HebbianConfig(eta=0.0, learning_rate=1.0)))
    assert (neutral(q, k, v) - plain).abs().max() < 1e-6
    fresh = HebbianAttention(8, 2, HebbianConfig(learning_rate=1.0))
    assert (fresh(q, k, v)[:, 0] - plain[:, 0]).abs().max() < 1e-6


def test_causal_outputs_up_to_t_ignore_later_inputs():
    cfg = HebbianConfig(learning_rate=0.5, eta=1.0)
    q, k, v = qkv(T=10)
    t = 5
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, t + 1:] = torch.randn_like(x[:, :, t + 1:]) * 5
    a = with_state(HebbianAttention(8, 2, cfg))(q, k, v)
    b = with_state(HebbianAttention(8, 2, cfg))(q2, k2, v2)
    assert (a[:, :t + 1] - b[:, :t + 1]).abs().max() < 1e-6
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().max() > 1e-3


def repeated_pattern(seed=0, D=16, T=12):
    """Key 1 is attended strongly by query 5; query 10 resembles query 5 (the pattern repeats)."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 1, T, D, generator=gen)
    q = torch.randn(1, 1, T, D, generator=gen) * 0.5
    q[0, 0, 5] = 2.0 * k[0, 0, 1]
    q[0, 0, 10] = 0.2 * q[0, 0, 5] + torch.randn(D, generator=gen) * 0.5
    return q, k, torch.randn(1, 1, T, D, generator=gen)


def test_in_context_co_activated_key_gains_attention():
    q, k, v = repeated_pattern()
    _, plain = HebbianAttention(16, 1, HebbianConfig(eta=0.0))(q, k, v, return_attention=True)
    _, hebb = HebbianAttention(16, 1, HebbianConfig(learning_rate=0.1))(q, k, v, return_attention=True)
    assert plain[0, 0, 5, 1] > 0.9                           # query 5 co-activates key 1
    gain = hebb[0, 0, 10, 1] / plain[0, 0, 10, 1]
    others = torch.cat([hebb[0, 0, 10, :1], hebb[0, 0, 10, 2:11]]).sum() / \
        torch.cat([plain[0, 0, 10, :1], plain[0, 0, 10, 2:11]]).sum()
    assert gain > 1.5 and others < 1.0
    # without the earlier co-activation (query 5 random) the same key gains much less
    q_ctrl = q.clone()
    q_ctrl[0, 0, 5] = torch.randn(16, generator=torch.Generator().manual_seed(9))
    _, ctrl0 = HebbianAttention(16, 1, HebbianConfig(eta=0.0))(q_ctrl, k, v, return_attention=True)
    _, ctrl = HebbianAttention(16, 1, HebbianConfig(learning_rate=0.1))(q_ctrl, k, v, return_attention=True)
    assert ctrl[0, 0, 10, 1] / ctrl0[0, 0, 10, 1] < gain - 0.5


def test_state_persists_across_calls_and_reset_clears_it():
    q, k, v = repeated_pattern()
    module = HebbianAttention(16, 1, HebbianConfig(learning_rate=0.1))
    module(q[:, :, :8], k[:, :, :8], v[:, :, :8])              # sees query 5 attend key 1
    assert module.get_hebbian_strength() > 0
    probe_q, probe_k = q[:, :, 10:11], k[:, :, [1, 2, 6, 7, 10]]     # a new call: the key reappears among others
    _, carried = module(probe_q, probe_k, probe_k, causal=False, return_attention=True, update_state=False)
    module.reset_state()
    assert module.get_hebbian_strength() == 0.0
    _, fresh = module(probe_q, probe_k, probe_k, causal=False, return_attention=True)
    assert carried[0, 0, 0, 0] > fresh[0, 0, 0, 0] * 1.3


def test_prefill_then_decode_equals_one_forward():
    cfg = HebbianConfig(learning_rate=0.3, decay_rate=0.95, max_hebbian_norm=1e6)
    q, k, v = qkv(B=1, T=8)
    full = HebbianAttention(8, 2, cfg)
    expected = full(q, k, v)
    step = HebbianAttention(8, 2, cfg)
    outs = [step(q[:, :, :5], k[:, :, :5], v[:, :, :5])]
    for t in range(5, 8):   # one query against the cached keys, as in decoding
        outs.append(step(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1]))
    torch.testing.assert_close(torch.cat(outs, dim=1), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step.hebbian, full.hebbian, atol=1e-5, rtol=1e-5)


def test_decay_without_learning_and_norm_clip():
    q, k, v = qkv(T=7)
    module = with_state(HebbianAttention(8, 2, HebbianConfig(learning_rate=0.0, decay_rate=0.9)))
    H0 = module.hebbian.clone()
    module(q, k, v)
    torch.testing.assert_close(module.hebbian, 0.9 ** 7 * H0)
    clipped = HebbianAttention(8, 2, HebbianConfig(learning_rate=50.0, max_hebbian_norm=2.0))
    unclipped = HebbianAttention(8, 2, HebbianConfig(learning_rate=50.0, max_hebbian_norm=1e9))
    clipped(q, k, v)
    unclipped(q, k, v)
    assert torch.allclose(clipped.get_hebbian_strength(per_head=True), torch.full((2,), 2.0))
    assert (unclipped.get_hebbian_strength(per_head=True) > 2.0).all()
    direction = F.cosine_similarity(clipped.hebbian.flatten(1), unclipped.hebbian.flatten(1))
    assert torch.allclose(direction, torch.ones(2))


def test_zero_reward_leaves_state_exactly_unchanged():
    q, k, v = qkv()
    module = with_state(RewardModulatedHebbian(8, 2, HebbianConfig(learning_rate=0.5)))
    H0 = module.hebbian.clone()
    out = module(q, k, v, reward=0.0)
    assert torch.equal(module.hebbian, H0)
    static = with_state(HebbianAttention(8, 2, HebbianConfig(learning_rate=0.0, decay_rate=1.0)))
    torch.testing.assert_close(out, static(q, k, v))           # attention read the stored H_0 only


def association(module, q, k):
    """q_5^T H k_1: how strongly the stored state links the co-activated query and key."""
    return (q[0, 0, 5] @ module.hebbian[0] @ k[0, 0, 1]).item()


def test_reward_sign_strengthens_or_weakens():
    q, k, v = repeated_pattern()
    strengths = []
    for r in (0.5, 1.0):
        module = RewardModulatedHebbian(16, 1, HebbianConfig(learning_rate=0.1))
        module(q, k, v, reward=r)
        strengths.append(association(module, q, k))
    assert 0 < strengths[0] < strengths[1]
    module = RewardModulatedHebbian(16, 1, HebbianConfig(learning_rate=0.1))
    module(q, k, v, reward=1.0)
    before = association(module, q, k)
    module(q, k, v, reward=-1.0)
    assert association(module, q, k) < before - 0.5 * abs(before)


def test_reward_per_batch_element_averages_updates():
    q, k, v = qkv(B=2)
    both = RewardModulatedHebbian(8, 2, HebbianConfig(learning_rate=0.3))
    both(q, k, v, reward=torch.tensor([1.0, 0.0]))
    first = RewardModulatedHebbian(8, 2, HebbianConfig(learning_rate=0.3))
    first(q[:1], k[:1], v[:1], reward=1.0)
    torch.testing.assert_close(both.hebbian, first.hebbian / 2)


@pytest.mark.parametrize("reward, error", [
    (float("nan"), ValueError), (torch.tensor([1.0, 2.0, 3.0]), ValueError),
    (torch.ones(2, 1), ValueError), ("high", TypeError), (True, TypeError)])
def test_bad_reward_raises_before_state_changes(reward, error):
    q, k, v = qkv()
    module = with_state(RewardModulatedHebbian(8, 2))
    H0 = module.hebbian.clone()
    with pytest.raises(error, match="reward"):
        module(q, k, v, reward=reward)
    assert torch.equal(module.hebbian, H0)


def test_bad_inputs_raise_before_state_changes():
    q, k, v = qkv()
    module = with_state(HebbianAttention(8, 2))
    H0 = module.hebbian.clone()
    bad_calls = [
        ((q[0], k, v), ValueError, "Q"),                   # 3-D
        ((q[:, :1], k, v), ValueError, "heads"),
        ((q, k[..., :4], v), ValueError, "K"),
        ((q.long(), k, v), TypeError, "Q"),
        ((q, k, v[:, :, :3]), ValueError, "V"),
        ((q, k[:, :, :4], v[:, :, :4]), ValueError, "positions"),
        ((q.clone().fill_(float("nan")), k, v), ValueError, "finite"),
    ]
    for args, error, name in bad_calls:
        with pytest.raises(error, match=name):
            module(*args)
        assert torch.equal(module.hebbian, H0)


@pytest.mark.parametrize("field, value", [
    ("learning_rate", -0.1), ("decay_rate", -0.1), ("decay_rate", 1.5), ("max_hebbian_norm", 0.0),
    ("eta", float("inf"))])
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        HebbianConfig(**{field: value})


def test_score_bias_keeps_mask_and_gradients_flow():
    q, k, v = qkv(Hkv=1)
    q.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    module = with_state(HebbianAttention(8, 2, HebbianConfig(learning_rate=0.2)))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), -math.inf)
    bias = module.score_bias(q, k, scores, update_state=False)
    assert bias.shape == (2, 2, 9, 9) and torch.isfinite(bias).all()
    assert torch.isinf(scores + bias).sum() == torch.isinf(scores).sum()
    module(q, k, v).square().sum().backward()
    for x in (q, k, v):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_half_precision_inputs_and_bad_scores():
    q, k, v = qkv()
    module = with_state(HebbianAttention(8, 2, HebbianConfig(learning_rate=0.2)))
    H0 = module.hebbian.clone()
    out = module(q.bfloat16(), k.bfloat16(), v.bfloat16(), update_state=False)
    reference = module(q, k, v, update_state=False)
    assert out.dtype == torch.bfloat16 and (out.float() - reference).abs().max() < 0.1
    with pytest.raises(ValueError, match="scores"):
        module.score_bias(q, k, torch.zeros(2, 2, 9, 8))
    assert torch.equal(module.hebbian, H0)
