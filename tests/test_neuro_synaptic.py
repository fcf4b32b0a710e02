"""Tests of cortexlab.neuro.synaptic: per-head scaling, neuromodulation gates, the banded synaptic matrix."""

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from cortexlab.neuro.synaptic import NeuromodulatedAttention, SynapticModulationMatrix, SynapticScaling


def causal_scores(batch, heads, tq, tk, seed=0):
    scores = torch.randn(batch, heads, tq, tk, generator=torch.Generator().manual_seed(seed))
    future = torch.ones(tq, tk, dtype=torch.bool).triu(tk - tq + 1)
    return scores.masked_fill(future, float("-inf"))


# ---------------------------------------------------------------- SynapticScaling


def test_scaling_neutral_at_alpha_one():
    scores = causal_scores(2, 4, 5, 5)
    assert torch.equal(SynapticScaling(4)(scores), scores)


def test_scaling_is_per_head_temperature_and_keeps_mask():
    scaling = SynapticScaling(3)
    with torch.no_grad():
        scaling.alpha.copy_(torch.tensor([0.5, 1.0, 2.0]))
    scores = causal_scores(2, 3, 6, 6)
    out = scaling(scores)
    finite = torch.isfinite(scores)
    assert torch.equal(torch.isfinite(out), finite)
    assert torch.all(out[~finite] == float("-inf"))
    for h, alpha in enumerate((0.5, 1.0, 2.0)):
        expected = torch.softmax(alpha * scores[:, h], -1)
        torch.testing.assert_close(torch.softmax(out[:, h], -1), expected)
    # a higher alpha sharpens: lower attention entropy
    probs = torch.softmax(out, -1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean((0, 2))
    assert entropy[0] > entropy[1] > entropy[2]


def test_scaling_gradient_is_finite_with_masked_scores():
    scaling = SynapticScaling(2, init_alpha=1.5)
    scores = causal_scores(1, 2, 4, 4)
    torch.softmax(scaling(scores), -1)[..., 0].sum().backward()
    assert torch.isfinite(scaling.alpha.grad).all() and scaling.alpha.grad.abs().sum() > 0


def test_scaling_keeps_dtype():
    scores = causal_scores(1, 2, 3, 3).to(torch.bfloat16)
    out = SynapticScaling(2, init_alpha=2.0)(scores)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[torch.isfinite(scores)], (2 * scores[torch.isfinite(scores)]))


def test_update_alpha_clamps_and_validates():
    scaling = SynapticScaling(4)
    scaling.update_alpha(head_idx=1, delta=0.25)
    scaling.update_alpha(2, 100.0)
    scaling.update_alpha(3, -100.0)
    assert scaling.alpha.tolist() == pytest.approx([1.0, 1.25, 10.0, 0.1])
    before = scaling.alpha.detach().clone()
    for head_idx, delta in ((4, 0.1), (-1, 0.1), (1.0, 0.1), (True, 0.1), (0, float("nan")), (0, "x")):
        with pytest.raises(ValueError):
            scaling.update_alpha(head_idx, delta)
    assert torch.equal(scaling.alpha, before)


def test_scaling_bad_input():
    with pytest.raises(ValueError, match="num_heads"):
        SynapticScaling(0)
    with pytest.raises(ValueError, match="init_alpha"):
        SynapticScaling(2, init_alpha=-1.0)
    scaling = SynapticScaling(2)
    with pytest.raises(ValueError, match="scores"):
        scaling(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="scores"):
        scaling(torch.zeros(2, 2, 2))
    with pytest.raises(TypeError, match="scores"):
        scaling(torch.zeros(1, 2, 2, 2, dtype=torch.long))


# ---------------------------------------------------------------- NeuromodulatedAttention


def test_neuromod_neutral_at_init_per_token_and_per_sequence():
    neuromod = NeuromodulatedAttention(hidden_dim=16, num_heads=4, bottleneck=8)
    heads = torch.randn(2, 5, 4, 3)
    assert torch.equal(neuromod.compute_modulation(torch.randn(2, 16)), torch.ones(2, 4))
    assert torch.equal(neuromod(heads, torch.randn(2, 5, 16)), heads)
    assert torch.equal(neuromod(heads, torch.randn(2, 16)), heads)


def test_neuromod_gates_in_unit_interval_and_multiply_heads():
    torch.manual_seed(0)
    neuromod = NeuromodulatedAttention(hidden_dim=16, num_heads=4, bottleneck=8)
    torch.nn.init.normal_(neuromod.fc2.weight, std=3.0)
    context = torch.randn(2, 5, 16)
    gates = neuromod.compute_modulation(context)
    assert gates.shape == (2, 5, 4)
    assert gates.min() >= 0 and gates.max() <= 1 and gates.min() < 0.5
    heads = torch.randn(2, 5, 4, 3)
    torch.testing.assert_close(neuromod(heads, context), heads * gates[..., None])
    per_sequence = neuromod.compute_modulation(context[:, 0])
    assert per_sequence.shape == (2, 4)
    torch.testing.assert_close(neuromod(heads, context[:, 0]), heads * per_sequence[:, None, :, None])


def test_neuromod_gradient_flows_at_init():
    neuromod = NeuromodulatedAttention(hidden_dim=8, num_heads=2, bottleneck=4)
    heads = torch.randn(1, 3, 2, 4)
    (neuromod(heads, torch.randn(1, 3, 8)) ** 2).sum().backward()
    assert neuromod.fc2.weight.grad.abs().sum() > 0 and neuromod.fc2.bias.grad.abs().sum() > 0


def test_neuromod_is_causal_with_per_token_context():
    torch.manual_seed(1)
    neuromod = NeuromodulatedAttention(hidden_dim=8, num_heads=2, bottleneck=4)
    torch.nn.init.normal_(neuromod.fc2.weight)
    heads, context = torch.randn(1, 6, 2, 3), torch.randn(1, 6, 8)
    heads2, context2 = heads.clone(), context.clone()
    heads2[:, 4:] += 1.0
    context2[:, 4:] = torch.randn(1, 2, 8)
    torch.testing.assert_close(neuromod(heads, context)[:, :4], neuromod(heads2, context2)[:, :4], rtol=0, atol=0)


def test_neuromod_bad_input():
    neuromod = NeuromodulatedAttention(hidden_dim=8, num_heads=2)
    assert neuromod.bottleneck == 2
    with pytest.raises(ValueError, match="context"):
        neuromod.compute_modulation(torch.zeros(1, 7))
    with pytest.raises(ValueError, match="context"):
        neuromod(torch.zeros(1, 3, 2, 4), torch.zeros(1, 4, 8))
    with pytest.raises(ValueError, match="head_outputs"):
        neuromod(torch.zeros(1, 3, 3, 4), torch.zeros(1, 8))
    with pytest.raises(TypeError, match="context"):
        neuromod.compute_modulation(torch.zeros(1, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="bottleneck"):
        NeuromodulatedAttention(8, 2, bottleneck=0)


# ---------------------------------------------------------------- SynapticModulationMatrix


def dense_reference(q, k, weight, window, tk=None):
    """s_ij = q_i^T W k_j / sqrt(D) for 0 <= i - j < window, queries aligned to the end of the keys."""
    heads, heads_kv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(heads // heads_kv, dim=1)
    s = q @ weight @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    tq, tk = q.shape[2], k.shape[2]
    lag = torch.arange(tq)[:, None] + (tk - tq) - torch.arange(tk)[None, :]
    return s.masked_fill((lag < 0) | (lag >= window), 0.0)


@pytest.mark.parametrize(
    "tq,tk,window,heads_kv", [(7, 7, 3, 4), (10, 10, 4, 2), (5, 5, 8, 1), (3, 9, 4, 2), (1, 6, 3, 4)]
)
def test_band_equals_dense_reference(tq, tk, window, heads_kv):
    gen = torch.Generator().manual_seed(tq * 100 + window)
    q = torch.randn(2, 4, tq, 6, generator=gen)
    k = torch.randn(2, heads_kv, tk, 6, generator=gen)
    synapse = SynapticModulationMatrix(head_dim=6, window_size=window)
    with torch.no_grad():
        synapse.weight.copy_(torch.randn(6, 6, generator=gen))
    dense = dense_reference(q, k, synapse.weight, window)
    band = synapse.compute_synaptic_strength(q, k)
    assert band.shape == (2, 4, tq, window)
    for w in range(window):
        for i in range(tq):
            j = i + tk - tq - w
            expected = dense[:, :, i, j] if j >= 0 else torch.zeros(2, 4)
            torch.testing.assert_close(band[:, :, i, w], expected)
    scores = causal_scores(2, 4, tq, tk)
    torch.testing.assert_close(synapse(scores, q, k), scores + dense)


def test_band_never_builds_a_t_by_t_tensor():
    seq, window = 1024, 8

    class LargestTensor(TorchFunctionMode):
        largest = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                LargestTensor.largest = max(LargestTensor.largest, out.numel())
            return out

    synapse = SynapticModulationMatrix(head_dim=4, window_size=window)
    q, k = torch.randn(1, 2, seq, 4), torch.randn(1, 1, seq, 4)
    with LargestTensor():
        band = synapse.compute_synaptic_strength(q, k)
    assert band.shape == (1, 2, seq, window)
    # the mode saw the band itself; nothing it saw is bigger than a few bands (a T x T matrix: 1024 x 1024 per head)
    assert band.numel() <= LargestTensor.largest <= 2 * band.numel()


def test_matrix_neutral_at_zero_weight_and_keeps_mask():
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    scores = causal_scores(1, 2, 6, 6)
    synapse = SynapticModulationMatrix(head_dim=4, window_size=3)
    assert torch.equal(synapse(scores, q, k), scores)
    with torch.no_grad():
        synapse.weight.normal_()
    out = synapse(scores, q, k)
    assert torch.equal(torch.isinf(out), torch.isinf(scores))


def test_matrix_gradient_reaches_zero_weight():
    q = torch.randn(1, 2, 5, 4, requires_grad=True)
    k = torch.randn(1, 2, 5, 4)
    synapse = SynapticModulationMatrix(head_dim=4, window_size=2)
    (torch.softmax(synapse(causal_scores(1, 2, 5, 5), q, k), -1)[..., 0] ** 2).sum().backward()
    assert synapse.weight.grad.abs().sum() > 0 and torch.isfinite(q.grad).all()


def test_matrix_bad_input():
    synapse = SynapticModulationMatrix(head_dim=4, window_size=2)
    q, k = torch.randn(1, 4, 5, 4), torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="head_dim"):
        synapse.compute_synaptic_strength(torch.randn(1, 4, 5, 3), k)
    with pytest.raises(ValueError, match="H_kv"):
        synapse.compute_synaptic_strength(q, torch.randn(1, 3, 5, 4))
    with pytest.raises(ValueError, match="scores"):
        synapse(torch.zeros(1, 4, 5, 4), q, k)
    with pytest.raises(ValueError, match="window_size"):
        SynapticModulationMatrix(4, 0)
