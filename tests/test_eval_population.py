"""cortexlab.eval.population: voted layer outputs and the LM loss with one layer voted, on a tiny Llama."""
import math

import pytest
import torch

from cortexlab.eval import population as ep
from cortexlab.eval.attention import record_attention
from cortexlab.models import tiny_model
from cortexlab.neuro import ConfidenceWeightedVoting, EntropyBasedVoting


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=2)


IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))


def test_uniform_weights_are_the_layer_output(model):
    rec = record_attention(model, IDS, [1])[1]
    o_proj = model.model.layers[1].self_attn.o_proj
    uniform = EntropyBasedVoting(4, math.inf).head_weights(rec.probs)
    plain = o_proj(rec.heads.flatten(-2))
    assert torch.allclose(ep.voted_output(rec, o_proj, uniform), plain, atol=1e-6)
    sharp = EntropyBasedVoting(4, 0.05).head_weights(rec.probs)
    assert not torch.allclose(ep.voted_output(rec, o_proj, sharp), plain, atol=1e-4)
    with pytest.raises(ValueError):
        ep.voted_output(rec, o_proj, uniform[:, :3])


def test_neutral_voters_reproduce_the_baseline_loss(model):
    base = ep.lm_loss_with_voting(model, IDS, 1)
    assert abs(ep.lm_loss_with_voting(model, IDS, 1, EntropyBasedVoting(4, math.inf)) - base) < 1e-5
    assert abs(ep.lm_loss_with_voting(model, IDS, 0, ConfidenceWeightedVoting(4, 16)) - base) < 1e-5
    sharp = ep.lm_loss_with_voting(model, IDS, 0, EntropyBasedVoting(4, 0.05))
    assert abs(sharp - base) > 1e-6                                    # a tiny random model: a small change
    assert ep.lm_loss_with_voting(model, IDS, 1) == base                # hooks removed
    with torch.no_grad():
        assert abs(model(input_ids=IDS, labels=IDS).loss.item() - base) < 1e-6


def test_bad_arguments(model):
    with pytest.raises(ValueError):
        ep.lm_loss_with_voting(model, IDS, 5)
    with pytest.raises(TypeError):
        ep.lm_loss_with_voting(model, IDS, 0, voter="entropy")


def test_voting_change_is_the_relative_change_of_the_output(model):
    rec = record_attention(model, IDS, [1])[1]
    o_proj = model.model.layers[1].self_attn.o_proj
    plain = ep.plain_output(rec, o_proj)
    with torch.no_grad():
        assert torch.equal(plain, o_proj(rec.heads.flatten(-2)))
    voter = EntropyBasedVoting(4, 0.5)
    voted = ep.voted_output(rec, o_proj, voter.head_weights(rec.probs))
    assert ep.voting_change(rec, o_proj, voter) == pytest.approx(((voted - plain).norm() / plain.norm()).item())
    assert ep.voting_change(rec, o_proj, EntropyBasedVoting(4, math.inf)) < 1e-6
    assert ep.voting_change(rec, o_proj, ConfidenceWeightedVoting(4, 16)) < 1e-6
    changes = [ep.voting_change(rec, o_proj, EntropyBasedVoting(4, t)) for t in (0.05, 1.0, 100.0)]
    assert changes[0] > changes[1] > changes[2] > 0          # a colder vote moves the output further
    with pytest.raises(TypeError):
        ep.voting_change(rec, o_proj, "entropy")


def test_head_wins_counts_argmax_per_token():
    w = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    assert ep.head_wins(w).tolist() == [2, 1, 1]
    assert ep.head_wins(torch.stack([w, w])).tolist() == [4, 2, 2]
    assert int(ep.head_wins(torch.rand(5, 7, 9)).sum()) == 35
