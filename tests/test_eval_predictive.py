import math

import pytest
import torch

from cortexlab.eval import predictive as ep
from cortexlab.models import tiny_model
from cortexlab.neuro import ContrastivePredictiveCoding


@pytest.fixture(scope="module")
def states():
    model = tiny_model("llama", seed=0)
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    return model, ids, ep.layer_states(model, ids)


def test_layer_states_and_surprisal(states):
    model, ids, hs = states
    assert len(hs) == 3 and hs[0].shape == (3, 24, 64)
    s = ep.token_surprisal(model, ids)
    hs2, s2 = ep.states_and_surprisal(model, ids)
    assert torch.allclose(s2, s, equal_nan=True) and all(torch.equal(a, b) for a, b in zip(hs, hs2))
    assert s.shape == (3, 24) and torch.isnan(s[:, 0]).all() and (s[:, 1:] > 0).all()
    logits = model(ids).logits
    mean = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert s[:, 1:].mean().item() == pytest.approx(mean.item(), rel=1e-5)


def test_normed_states(states):
    model, _, hs = states
    x = ep.normed_states(model, hs, 1)
    assert torch.allclose(x, model.model.layers[1].input_layernorm(hs[1]))


def test_surprise_of_is_mse():
    x, p = torch.randn(2, 5, 8), torch.randn(8)
    assert torch.allclose(ep.surprise_of(x, p), (x - p).square().mean(-1))


def test_fit_top_down_reduces_surprise(states):
    _, _, hs = states
    lower, upper = hs[0], hs[1]
    pc, losses, held = ep.fit_top_down(lower[:2], upper[:2], steps=30, lr=1e-2, heldout=(lower[2:], upper[2:]))
    lower, upper = lower[:2], upper[:2]
    assert len(held) == 31 and held[0] == pytest.approx(ep.surprise_of(hs[0][2:], hs[1][2:]).mean().item(), rel=1e-5)
    assert losses[0] == pytest.approx(ep.surprise_of(lower, upper).mean().item(), rel=1e-5)   # identity start
    assert losses[-1] < 0.5 * losses[0]
    assert losses[-1] == pytest.approx(ep.surprise_of(lower, pc.predict_below(upper)).mean().item(), rel=1e-5)
    with pytest.raises(ValueError):
        ep.fit_top_down(hs[0], hs[1][:, :5])


def test_cpc_fit_beats_chance_on_learnable_targets():
    torch.manual_seed(0)
    targets = torch.randn(2, 40, 8)
    context = torch.cat([targets[:, 1:], torch.zeros(2, 1, 8)], dim=1) @ torch.randn(8, 8)   # c_t = A z_{t+1}
    cpc, losses, held = ep.fit_cpc(context, targets, num_negatives=7, steps=60, lr=3e-2,
                                   heldout=(context[:1], targets[:1]))
    assert len(held) == 61 and held[-1] == ep.cpc_loss(cpc, context[:1], targets[:1]) and held[-1] < held[0]
    assert ep.cpc_chance(7) == pytest.approx(math.log(8))
    assert ep.cpc_loss(cpc, context, targets) < 0.3 * ep.cpc_chance(7) and losses[-1] < losses[0]
    fresh = ContrastivePredictiveCoding(8, num_negatives=7)
    assert ep.cpc_loss(fresh, context, targets, seed=1) == ep.cpc_loss(fresh, context, targets, seed=1)
