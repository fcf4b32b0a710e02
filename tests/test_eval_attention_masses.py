"""cortexlab.eval.attention: where the attention goes -- the share on the recent keys and on the sink (token 0)."""
import pytest
import torch

from cortexlab.eval.attention import recent_mass, sink_mass


def uniform_causal(T: int) -> torch.Tensor:
    mask = torch.ones(T, T).tril()
    return mask / mask.sum(-1, keepdim=True)


def test_recent_mass_hand_built():
    T, w = 6, 2
    probs = uniform_causal(T)                      # query i spreads 1 / (i + 1) over keys 0..i
    expected = sum(w / (i + 1) for i in range(w, T)) / (T - w)
    assert recent_mass(probs[None, None], w) == pytest.approx(expected)
    assert recent_mass(torch.eye(T).expand(2, 3, T, T), w) == 1.0      # every query on itself
    sink = torch.zeros(T, T)
    sink[:, 0] = 1.0
    assert recent_mass(sink, w) == 0.0             # queries i >= w never see token 0 inside their window
    with pytest.raises(ValueError):
        recent_mass(probs, T)
    with pytest.raises(ValueError):
        recent_mass(probs[:, :4], 2)


def test_recent_mass_equals_a_per_query_loop():
    torch.manual_seed(0)
    T, w = 9, 3
    probs = torch.randn(2, 4, T, T).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    per_query = [probs[..., i, i - w + 1:i + 1].sum(-1) for i in range(w, T)]
    assert recent_mass(probs, w) == pytest.approx(torch.stack(per_query).mean().item(), rel=1e-6)


def test_sink_mass_hand_built():
    T = 5
    assert sink_mass(uniform_causal(T)[None, None]) == pytest.approx(sum(1 / (i + 1) for i in range(T)) / T)
    sink = torch.zeros(3, T, T)
    sink[..., 0] = 1.0
    assert sink_mass(sink) == 1.0 and sink_mass(torch.eye(T)) == pytest.approx(1 / T)
    with pytest.raises(ValueError):
        sink_mass(torch.ones(4))
