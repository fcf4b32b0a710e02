"""Population coding: confidence voting, entropy voting, tuning-curve population vectors."""
import math

import pytest
import torch

from cortexlab.neuro.population import (
    ConfidenceWeightedVoting,
    EntropyBasedVoting,
    PopulationCodedAttention,
    PopulationConfig,
)

B, T, H, D, HIDDEN = 2, 5, 4, 3, 12


def heads(seed=0, requires_grad=False):
    return torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(seed)).requires_grad_(requires_grad)


def causal_probs(seed=0, Tk=T):
    scores = torch.randn(B, H, T, Tk, generator=torch.Generator().manual_seed(seed))
    return scores.masked_fill(torch.ones(T, Tk, dtype=torch.bool).triu(1 + Tk - T), -math.inf).softmax(-1)


def trained_voter(threshold=0.1):
    voter = ConfidenceWeightedVoting(H, D, threshold=threshold)
    with torch.no_grad():
        voter.weight.normal_(generator=torch.Generator().manual_seed(3))
        voter.bias.copy_(torch.tensor([0.5, -0.5, 1.0, 0.0]))
    return voter


# ---- ConfidenceWeightedVoting ---------------------------------------------------------------------------------

def test_confidence_voting_equals_hand_computed_weighted_sum():
    voter, o = trained_voter(threshold=0.0), heads()
    out = voter(o)
    expected = torch.zeros(B, T, D)
    for b in range(B):
        for t in range(T):
            c = [torch.sigmoid((o[b, t, h] * voter.weight[h]).sum() + voter.bias[h]) for h in range(H)]
            for h in range(H):
                expected[b, t] += c[h] / sum(c) * o[b, t, h]
    assert out.shape == (B, T, D)
    assert torch.allclose(out, expected, atol=1e-6)


def test_confidence_voting_silences_heads_below_threshold():
    voter, o = trained_voter(), heads()
    with torch.no_grad():
        voter.bias[1] = -20.0                                                   # head 1: confidence ~ 2e-9
        voter.weight[1] = 0.0
    weights = voter.head_weights(o)
    assert torch.all(weights[..., 1] == 0) and torch.allclose(weights.sum(-1), torch.ones(B, T))
    changed = o.clone()
    changed[:, :, 1] = 100.0
    assert torch.equal(voter(o), voter(changed))                                # a silenced head has no vote
    with torch.no_grad():
        voter.bias.fill_(-20.0)
        voter.weight.zero_()
    assert torch.equal(voter(o), torch.zeros(B, T, D))                          # all silenced: no output


def test_confidence_voting_is_neutral_at_init_and_gradients_flow():
    o = heads(requires_grad=True)
    voter = ConfidenceWeightedVoting(H, D)
    reweighted = voter(o, aggregate=False)
    assert reweighted.shape == (B, T, H, D)
    assert torch.allclose(reweighted.reshape(B, T, H * D), o.reshape(B, T, H * D), atol=1e-6)  # plain concat
    assert torch.allclose(voter(o), o.mean(2), atol=1e-6)
    (voter(o) * torch.randn(B, T, D)).sum().backward()
    for grad in (voter.weight.grad, voter.bias.grad, o.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_confidence_voting_bad_input():
    with pytest.raises(ValueError, match="threshold"):
        ConfidenceWeightedVoting(H, D, threshold=1.5)
    with pytest.raises(ValueError, match="head_outputs"):
        ConfidenceWeightedVoting(H, D)(torch.zeros(B, T, H + 1, D))
    with pytest.raises(ValueError, match="head_dim"):
        ConfidenceWeightedVoting(H, D)(torch.zeros(B, T, H, D + 1))
    with pytest.raises(TypeError, match="head_outputs"):
        ConfidenceWeightedVoting(H, D)(torch.zeros(B, T, H, D, dtype=torch.long))


# ---- EntropyBasedVoting ---------------------------------------------------------------------------------------

def test_entropy_voting_one_hot_head_dominates_uniform_head():
    Tk = 8
    probs = torch.zeros(1, 2, 1, Tk)
    probs[0, 0, 0, 3] = 1.0                                                     # head 0: zero entropy
    probs[0, 1, 0, :] = 1.0 / Tk                                                # head 1: entropy log(Tk)
    o = torch.randn(1, 1, 2, D)
    voter = EntropyBasedVoting(2, temperature=1.0)
    weights = voter.head_weights(probs)[0, 0]
    assert torch.allclose(weights, torch.tensor([Tk / (Tk + 1), 1 / (Tk + 1)]), atol=1e-6)   # softmax(0, -log Tk)
    assert torch.allclose(voter(o, probs)[0, 0], weights[0] * o[0, 0, 0] + weights[1] * o[0, 0, 1], atol=1e-6)


def test_entropy_voting_equals_hand_computation_with_masked_keys():
    probs, o = causal_probs(), heads()
    voter = EntropyBasedVoting(H, temperature=0.7)
    expected = torch.zeros(B, T, D)
    for b in range(B):
        for t in range(T):
            ent = torch.tensor([-sum(p * math.log(p) for p in probs[b, h, t].tolist() if p > 0) for h in range(H)])
            w = torch.softmax(-ent / 0.7, 0)
            expected[b, t] = sum(w[h] * o[b, t, h] for h in range(H))
    out = voter(o, probs)
    assert torch.isfinite(out).all() and torch.allclose(out, expected, atol=1e-5)


def test_entropy_voting_infinite_temperature_is_the_plain_average():
    probs, o = causal_probs(), heads()
    assert torch.allclose(EntropyBasedVoting(H, float("inf"))(o, probs), o.mean(2), atol=1e-7)
    assert torch.allclose(EntropyBasedVoting(H, 1e9)(o, probs), o.mean(2), atol=1e-6)
    concat = EntropyBasedVoting(H, float("inf"))(o, probs, aggregate=False)
    assert torch.allclose(concat, o, atol=1e-6)                                 # neutral: plain concatenation


def test_entropy_voting_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        EntropyBasedVoting(H, temperature=0.0)
    with pytest.raises(ValueError, match="attention_weights"):
        EntropyBasedVoting(H)(heads(), causal_probs()[:, :2])
    with pytest.raises(ValueError, match="attention_weights"):
        EntropyBasedVoting(H)(heads(), causal_probs(Tk=T + 2)[:, :, :3])        # 3 queries for 5 tokens


# ---- PopulationCodedAttention ---------------------------------------------------------------------------------

def make_pop(method="tuning_curve", **kw):
    torch.manual_seed(0)
    return PopulationCodedAttention(PopulationConfig(H, D, HIDDEN, voting_method=method, **kw))


def test_tuning_curve_weights_match_gaussian_and_prefer_the_aligned_head():
    pop = make_pop(tuning_width=0.5)
    ctx = torch.randn(B, T, HIDDEN)
    ctx[0, 0] = 2.0 * pop.preferred[2].detach()                                 # stimulus = head 2's preference
    weights = pop.tuning_weights(ctx)
    x = ctx / ctx.norm(dim=-1, keepdim=True)
    p = pop.preferred / pop.preferred.norm(dim=-1, keepdim=True)
    activation = torch.exp(-((x[:, :, None] - p) ** 2).sum(-1) / (2 * 0.5 ** 2))  # Gaussian of the distance
    assert torch.allclose(weights, activation / activation.sum(-1, keepdim=True), atol=1e-5)
    assert weights[0, 0].argmax() == 2


def test_population_vector_equals_weighted_average_of_head_votes():
    pop, o, ctx = make_pop(), heads(), torch.randn(B, T, HIDDEN)
    weights = pop.tuning_weights(ctx)
    votes = torch.stack([o[:, :, h] @ pop.out_proj.weight[:, h * D:(h + 1) * D].T for h in range(H)], 2)
    expected = H * (weights[..., None] * votes).sum(2)
    out = pop(o, ctx)
    assert out.shape == (B, T, HIDDEN) and torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("method,kw", [("tuning_curve", dict(tuning_width=float("inf"))), ("confidence", {}),
                                       ("entropy", dict(temperature=float("inf")))])
def test_neutral_setting_is_concat_then_projection(method, kw):
    pop, o = make_pop(method, **kw), heads()
    out = pop(o, head_contexts=torch.randn(B, T, HIDDEN), attention_weights=causal_probs())
    assert torch.allclose(out, pop.out_proj(o.reshape(B, T, H * D)), atol=1e-6)


def test_population_methods_use_their_voters_and_gradients_flow():
    o, probs = heads(requires_grad=True), causal_probs()
    entropy_pop = make_pop("entropy", temperature=0.5)
    assert torch.equal(entropy_pop.head_weights(o, attention_weights=probs),
                       EntropyBasedVoting(H, 0.5).head_weights(probs))
    pop = make_pop(tuning_width=0.3)
    pop(o, torch.randn(B, T, HIDDEN)).square().sum().backward()
    for grad in (pop.preferred.grad, pop.out_proj.weight.grad, o.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_population_bad_input():
    with pytest.raises(ValueError, match="voting_method"):
        PopulationConfig(H, D, HIDDEN, voting_method="majority")
    with pytest.raises(ValueError, match="tuning_width"):
        PopulationConfig(H, D, HIDDEN, tuning_width=-1.0)
    with pytest.raises(ValueError, match="hidden_dim"):
        PopulationConfig(H, D, 0)
    with pytest.raises(ValueError, match="head_contexts"):
        make_pop()(heads())
    with pytest.raises(ValueError, match="head_contexts"):
        make_pop()(heads(), torch.randn(B, T, HIDDEN + 1))
    with pytest.raises(ValueError, match="attention_weights"):
        make_pop("entropy")(heads())
    with pytest.raises(ValueError, match="batch/tokens"):
        make_pop()(heads(), torch.randn(B, T + 1, HIDDEN))
