import math

import pytest
import torch

from cortexlab.eval import synaptic as es
from cortexlab.eval.attention import record_attention
from cortexlab.models import tiny_model
from cortexlab.neuro import NeuromodulatedAttention, SynapticModulationMatrix


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", seed=0)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    return model, ids, record_attention(model, ids, [0, 1])


def test_head_entropy_bounds_and_uniform():
    T = 10
    uniform = torch.ones(T, T).tril()
    uniform = (uniform / uniform.sum(-1, keepdim=True))[None, None]
    assert es.head_entropy(uniform).item() == pytest.approx(es.uniform_entropy(T), rel=1e-6)
    assert es.uniform_entropy(T, skip=0) == pytest.approx(sum(math.log(i + 1) for i in range(T)) / T)
    with pytest.raises(ValueError):
        es.head_entropy(uniform[0])


def test_entropy_vs_alpha_monotone_and_alpha_one_is_the_model(setup):
    _, _, rec = setup
    r = rec[0]
    ent = es.entropy_vs_alpha(r.scores, [0.5, 1.0, 2.0, 20.0])
    assert torch.allclose(ent[1], es.head_entropy(r.probs), atol=1e-5)
    assert (ent[0] >= ent[1] - 1e-6).all() and (ent[1] >= ent[2] - 1e-6).all() and (ent[2] >= ent[3] - 1e-6).all()
    assert (ent <= es.uniform_entropy(r.scores.shape[-1]) + 1e-5).all()


def test_scaled_probs_is_softmax_of_scaled_logits(setup):
    _, _, rec = setup
    scores = rec[0].scores
    for alpha in (0.25, 1.0, 3.0, 20.0):
        assert torch.allclose(es.scaled_probs(scores, alpha), (alpha * scores).softmax(-1), atol=1e-6)
        assert torch.allclose(es.scaled_probs(scores, alpha, head=2), (alpha * scores[:, 2]).softmax(-1), atol=1e-6)
    assert torch.equal(es.scaled_probs(scores, 1.0), rec[0].probs)
    with pytest.raises(ValueError):
        es.scaled_probs(scores, 2.0, head=4)


def test_constant_gates_and_neutral_loss(setup):
    model, ids, rec = setup
    module = NeuromodulatedAttention(64, 4)
    base = es.gated_lm_loss(model, ids, 1, None)
    assert es.gated_lm_loss(model, ids, 1, module) == base           # gates exactly 1 at init
    es.set_constant_gates(module, [1.0, 0.5, 0.0, 0.25])
    gates = module.compute_modulation(torch.randn(3, 64))
    assert torch.allclose(gates, torch.tensor([1.0, 0.5, 0.0, 0.25]).expand(3, 4), atol=1e-6)
    suffix = es.LayerSuffix(model, ids, 0)
    assert suffix.baseline == base and suffix.loss(None) == pytest.approx(base, abs=1e-6)
    assert suffix.loss(module) == pytest.approx(es.gated_lm_loss(model, ids, 0, module), abs=1e-6)
    losses = es.head_ablation_losses(model, ids, 1, module)
    assert losses.shape == (4,) and torch.isfinite(losses).all() and (losses != base).any()
    assert (module.compute_modulation(torch.randn(2, 64)) == 1).all()      # restored
    with pytest.raises(ValueError):
        es.set_constant_gates(module, [1.5, 0, 0, 0])
    with pytest.raises(ValueError):
        es.gated_lm_loss(model, ids, 5, module)


def test_head_gate_loss_equals_full_forward_with_those_gates(setup):
    model, ids, _ = setup
    module = NeuromodulatedAttention(64, 4)
    suffix = es.LayerSuffix(model, ids, 1)
    assert es.head_gate_loss(suffix, module, 2, 1.0) == pytest.approx(suffix.baseline, abs=1e-6)
    half = es.head_gate_loss(suffix, module, 2, 0.5)
    assert (module.compute_modulation(torch.randn(2, 64)) == 1).all()      # restored
    es.set_constant_gates(module, [1.0, 1.0, 0.5, 1.0])
    assert half == pytest.approx(es.gated_lm_loss(model, ids, 1, module), abs=1e-5) and half != suffix.baseline
    ablation = es.head_ablation_losses(model, ids, 1, module, suffix=suffix)
    assert ablation[2].item() == pytest.approx(es.head_gate_loss(suffix, module, 2, 0.0), abs=1e-6)
    with pytest.raises(ValueError):
        es.head_gate_loss(suffix, module, 4, 0.5)


def test_closing_all_gates_equals_removing_attention_output(setup):
    model, ids, rec = setup
    layer = model.model.layers[1]
    share = es.head_output_share(rec[1].heads, layer.self_attn.o_proj)
    assert share.shape == (4,) and (share > 0).all()
    module = NeuromodulatedAttention(64, 4)
    es.set_constant_gates(module, torch.zeros(4))
    handle = layer.self_attn.o_proj.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    try:
        removed = es.gated_lm_loss(model, ids, 1, None)
    finally:
        handle.remove()
    assert es.gated_lm_loss(model, ids, 1, module) == pytest.approx(removed, abs=1e-5)


def test_dense_reference_matches_module_and_peak_bytes(setup):
    _, _, rec = setup
    r = rec[1]
    torch.manual_seed(0)
    module = SynapticModulationMatrix(16, window_size=5)
    with torch.no_grad():
        module.weight.normal_()
    dense = es.dense_synaptic_reference(module.weight, r.q, r.k, 5)
    out = module(r.scores, r.q, r.k)
    finite = torch.isfinite(r.scores)
    assert torch.allclose(out[finite], (r.scores + dense)[finite], atol=1e-5)
    assert (dense[..., 0, 1:] == 0).all() and (dense[..., 10, :6] == 0).all()
    with torch.no_grad():
        small = es.peak_cpu_bytes(lambda: torch.zeros(1000, 100) + 1)
        big = es.peak_cpu_bytes(lambda: torch.zeros(1000, 1000) + 1)
    assert 400_000 <= small <= 1_000_000 and 4_000_000 <= big <= 10_000_000


def test_synaptic_memory_vs_length_band_linear_dense_quadratic(setup):
    _, _, rec = setup
    r = rec[1]                                     # q [2, 4, 24, 16], k [2, 2, 24, 16]
    module = SynapticModulationMatrix(16, window_size=4)
    rows = es.synaptic_memory_vs_length(module, r.q, r.k, (24, 96, 200))
    assert [row["T"] for row in rows] == [24, 96, 200]
    for row in rows:                               # at least the float32 output each form returns
        assert row["dense_bytes"] >= 2 * 4 * row["T"] ** 2 * 4 and row["band_bytes"] >= 2 * 4 * row["T"] * 4 * 4
    assert rows[2]["dense_bytes"] / rows[2]["band_bytes"] > 4 * rows[0]["dense_bytes"] / rows[0]["band_bytes"]
    with pytest.raises(ValueError):
        es.synaptic_memory_vs_length(module, r.q, r.k, (0,))
