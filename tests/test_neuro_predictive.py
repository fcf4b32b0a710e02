"""PredictiveCodingLayer and ContrastivePredictiveCoding: equations by hand, neutrality, causality, learned
effects on real text (bytes of the standard library's argparse.py), running state and input validation."""
import argparse
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cortexlab.neuro.predictive import ContrastivePredictiveCoding, PredictiveCodingConfig, PredictiveCodingLayer

SOURCE = Path(argparse.__file__).read_bytes()


def text_tokens(B, T, offset):
    """B consecutive windows of T bytes of real Python source, starting at `offset`."""
    data = torch.tensor(list(SOURCE[offset:offset + B * T]), dtype=torch.long)
    return data.view(B, T)


def random_layer(dim=8, seed=0, **cfg):
    torch.manual_seed(seed)
    layer = PredictiveCodingLayer(dim, PredictiveCodingConfig(**cfg))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.3)
    return layer


def test_neutral_at_init_without_prediction_and_with_zero_weight():
    x, p = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    out, _, surprise = PredictiveCodingLayer(8)(x, p)
    assert torch.equal(out, x) and surprise.shape == (2, 5)
    out, below, surprise = random_layer()(x)
    assert torch.equal(out, x) and surprise is None and below.shape == x.shape
    out, _, _ = random_layer(prediction_weight=0.0)(x, p)
    assert torch.equal(out, x)


def test_equations_by_hand():
    layer = random_layer(prediction_weight=0.3)
    x, p = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    out, below, surprise = layer(x, p)
    torch.testing.assert_close(out, x + 0.3 * (x - p) @ layer.error_proj.weight.T)
    torch.testing.assert_close(below, x @ layer.top_down.weight.T + layer.top_down.bias)
    torch.testing.assert_close(surprise, ((x - p) ** 2).mean(-1))
    assert torch.equal(PredictiveCodingLayer(8).predict_below(x), x)     # identity prior at init


def test_causal_per_token():
    layer = random_layer()
    x, p = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    x2, p2 = x.clone(), p.clone()
    x2[:, 3:], p2[:, 3:] = 7.0, -7.0
    for a, b in zip(layer(x, p), layer(x2, p2)):
        assert torch.equal(a[:, :3], b[:, :3])


def test_training_the_top_down_predictor_lowers_surprise_on_real_text():
    torch.manual_seed(0)
    dim = 16
    table = torch.randn(256, dim)
    mix_now, mix_prev = torch.randn(dim, dim) / dim ** 0.5, torch.randn(dim, dim) / dim ** 0.5

    def layers(tokens):                       # a lower representation and a causal upper one built from it
        lower = table[tokens]
        prev = F.pad(lower[:, :-1], (0, 0, 1, 0))
        return lower, torch.tanh(lower @ mix_now + 0.5 * prev @ mix_prev)

    upper_pc, lower_pc = PredictiveCodingLayer(dim), PredictiveCodingLayer(dim)

    def held_out_surprise():
        lower, upper = layers(text_tokens(4, 64, offset=40_000))
        with torch.no_grad():
            return lower_pc(lower, upper_pc.predict_below(upper), update_state=False)[2].mean().item()

    before = held_out_surprise()
    opt = torch.optim.Adam(upper_pc.parameters(), lr=0.05)
    for step in range(30):
        lower, upper = layers(text_tokens(4, 64, offset=step * 256 % 30_000))
        _, _, surprise = lower_pc(lower, upper_pc.predict_below(upper))
        opt.zero_grad()
        surprise.mean().backward()
        opt.step()
    after = held_out_surprise()
    lower, _ = layers(text_tokens(4, 64, offset=40_000))
    mean_predictor = (lower - lower.mean((0, 1))).square().mean().item()    # chance: predict the mean vector
    assert after < 0.3 * before and after < 0.5 * mean_predictor


def test_gradients_and_stop_gradient_on_the_target():
    layer = random_layer()
    x = torch.randn(2, 4, 8, requires_grad=True)
    upper = torch.randn(2, 4, 8)
    _, _, surprise = layer(x, layer.predict_below(upper))
    surprise.sum().backward()
    assert x.grad is None and layer.top_down.weight.grad.abs().sum() > 0
    out, _, _ = layer(x, layer.predict_below(upper))
    out.sum().backward()
    assert x.grad.abs().sum() > 0 and layer.error_proj.weight.grad.abs().sum() > 0


def test_running_surprise_and_reset():
    layer = PredictiveCodingLayer(8, PredictiveCodingConfig(error_signal_decay=0.75))
    x, p = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    s1 = layer(x, p)[2].mean().item()
    s2 = layer(x, 2 * p)[2].mean().item()
    assert layer.get_running_surprise() == pytest.approx(0.75 * s1 + 0.25 * s2, rel=1e-6)
    layer.reset_state()
    assert layer.get_running_surprise() == 0.0


def test_bad_inputs_raise_before_state_changes():
    layer = PredictiveCodingLayer(8)
    x = torch.randn(2, 4, 8)
    layer(x, torch.randn(2, 4, 8))
    before = layer.get_running_surprise()
    for args, error, name in [((x[0],), ValueError, "x"), ((x.long(),), TypeError, "x"),
                              ((x, torch.randn(2, 3, 8)), ValueError, "prediction_from_above"),
                              ((x, torch.randn(2, 4, 7)), ValueError, "prediction_from_above"),
                              ((x, torch.full((2, 4, 8), float("nan"))), ValueError, "finite")]:
        with pytest.raises(error, match=name):
            layer(*args)
        assert layer.get_running_surprise() == before
    for field, value in [("prediction_weight", -1.0), ("error_signal_decay", 1.5), ("prediction_weight", math.nan)]:
        with pytest.raises(ValueError, match=field):
            PredictiveCodingConfig(**{field: value})


@pytest.mark.parametrize("horizon", [1, 3])
def test_cpc_loss_equals_cross_entropy_of_positive_vs_negatives(horizon):
    torch.manual_seed(0)
    B, T, D, N = 2, 7, 6, 5
    cpc = ContrastivePredictiveCoding(D, num_negatives=N, prediction_horizon=horizon, temperature=0.7)
    c, z = torch.randn(B, T, D), torch.randn(B, T, D)
    neg = cpc.sample_negatives(B, T, torch.Generator().manual_seed(3))
    loss = cpc.compute_loss(c, z, negative_indices=neg)
    logits, flat = [], z.reshape(B * T, D)
    W = cpc.predictor.weight
    for b in range(B):
        for t in range(T - horizon):
            pred = W @ c[b, t]
            row = [z[b, t + horizon] @ pred] + [flat[i] @ pred for i in neg[b, t].tolist()]
            logits.append(torch.stack(row) / 0.7)
    expected = F.cross_entropy(torch.stack(logits), torch.zeros(len(logits), dtype=torch.long))
    torch.testing.assert_close(loss, expected)
    assert torch.equal(loss, cpc.compute_loss(c, z, generator=torch.Generator().manual_seed(3)))


def test_cpc_negatives_exclude_the_positive_and_uniform_scores_give_log_n_plus_1():
    cpc = ContrastivePredictiveCoding(4, num_negatives=16, prediction_horizon=2)
    neg = cpc.sample_negatives(3, 5, torch.Generator().manual_seed(0))
    positive = torch.arange(3)[:, None, None] * 5 + torch.arange(3)[None, :, None] + 2
    assert neg.shape == (3, 3, 16) and (neg != positive).all() and neg.min() >= 0 and neg.max() < 15
    assert len(neg.unique()) > 10                                    # draws cover the pool
    with torch.no_grad():
        cpc.predictor.weight.zero_()
    loss = cpc.compute_loss(torch.randn(3, 5, 4), torch.randn(3, 5, 4))
    assert loss.item() == pytest.approx(math.log(17), rel=1e-6)


def test_cpc_loss_falls_when_the_target_is_predictable():
    torch.manual_seed(0)
    D = 16
    table = F.normalize(torch.randn(256, D), dim=-1) * 3
    mix = torch.linalg.qr(torch.randn(D, D))[0]

    def batch(offset):       # targets: embeddings of real bytes; context at t encodes byte t+1 (plus noise)
        z = table[text_tokens(4, 32, offset)]
        c = F.pad(z[:, 1:], (0, 0, 0, 1)) @ mix + 0.3 * torch.randn(4, 32, D)
        return c, z

    cpc = ContrastivePredictiveCoding(D, num_negatives=16, prediction_horizon=1)
    gen = torch.Generator().manual_seed(0)
    held_out = batch(40_000)
    before = cpc.compute_loss(*held_out, generator=torch.Generator().manual_seed(1)).item()
    opt = torch.optim.Adam(cpc.parameters(), lr=0.1)
    for step in range(20):
        loss = cpc.compute_loss(*batch(step * 128 % 30_000), generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = cpc.compute_loss(*held_out, generator=torch.Generator().manual_seed(1)).item()
    assert after < 0.3 * before and after < 0.3 * math.log(17)


def test_cpc_gradients_flow_to_predictor_context_and_targets():
    cpc = ContrastivePredictiveCoding(6, num_negatives=4)
    c, z = torch.randn(2, 5, 6, requires_grad=True), torch.randn(2, 5, 6, requires_grad=True)
    cpc.compute_loss(c, z, generator=torch.Generator().manual_seed(0)).backward()
    for g in (c.grad, z.grad, cpc.predictor.weight.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_cpc_bad_inputs():
    cpc = ContrastivePredictiveCoding(6, num_negatives=4, prediction_horizon=2)
    c = torch.randn(2, 5, 6)
    good = cpc.sample_negatives(2, 5)
    for kwargs, error, name in [
        (dict(hidden_states=c[:, :2], target_embeddings=c[:, :2]), ValueError, "prediction_horizon"),
        (dict(hidden_states=c, target_embeddings=c[:, :4]), ValueError, "target_embeddings"),
        (dict(hidden_states=c.long(), target_embeddings=c), TypeError, "hidden_states"),
        (dict(hidden_states=c, target_embeddings=c, negative_indices=good + 10), ValueError, "negative_indices"),
        (dict(hidden_states=c, target_embeddings=c, negative_indices=good[..., :2]), ValueError, "negative_indices"),
    ]:
        with pytest.raises(error, match=name):
            cpc.compute_loss(**kwargs)
    for kwargs, name in [(dict(num_negatives=0), "num_negatives"), (dict(prediction_horizon=0), "prediction_horizon"),
                         (dict(temperature=0.0), "temperature")]:
        with pytest.raises(ValueError, match=name):
            ContrastivePredictiveCoding(6, **kwargs)
