"""NeuroLlama training objectives: each loss's defining property and the composite's bookkeeping."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import jensenshannon

from cortexlab.neuro.objectives import (
    PHASE_SCHEDULE,
    CalibrationLoss,
    CoherenceLoss,
    EfficiencyLoss,
    NeuroCompositeLoss,
    SpecializationLoss,
    SurpriseLoss,
    TrainingObjectiveConfig,
    expected_calibration_error,
    js_divergence,
    layer_usage_from_exit_probs,
)

B, T, V, D, C, L = 2, 5, 11, 8, 3, 6


def causal_probs(batch=B, columns=C, t=T, seed=0):
    """Per-column causal attention probabilities [B, C, T, T] (exact zeros above the diagonal)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, columns, t, t, generator=gen)
    mask = torch.ones(t, t, dtype=torch.bool).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1)


def full_inputs(requires_grad=False):
    torch.manual_seed(0)
    scores = torch.randn(B, C, T, T).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    leaves = {
        "predictions": torch.randn(B, T, V),
        "scores": scores,
        "confidence_logits": torch.randn(B, T),
        "layer_logits": torch.randn(B, L),
        "hidden_states": torch.randn(B, T, D),
        "goal_embedding": torch.randn(B, D),
        "surprise_raw": torch.rand(4, B, T),
    }
    for value in leaves.values():
        value.requires_grad_(requires_grad)
    inputs = {
        "predictions": leaves["predictions"],
        "targets": torch.randint(0, V, (B, T)),
        "attention_distributions": leaves["scores"].softmax(-1),
        "confidences": leaves["confidence_logits"].sigmoid(),
        "correctness": torch.rand(B, T) > 0.5,
        "layer_usage": leaves["layer_logits"].sigmoid(),
        "hidden_states": leaves["hidden_states"],
        "goal_embedding": leaves["goal_embedding"],
        "surprises": list(leaves["surprise_raw"].unbind(0)),
    }
    return inputs, leaves


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("field", ["prediction_error_weight", "specialization_weight", "calibration_weight",
                                   "efficiency_weight", "coherence_weight"])
def test_config_rejects_negative_and_non_finite_weights(field):
    with pytest.raises(ValueError, match=field):
        TrainingObjectiveConfig(**{field: -0.1})
    with pytest.raises(TypeError, match=field):
        TrainingObjectiveConfig(**{field: math.inf})


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="calibration_bins"):
        TrainingObjectiveConfig(calibration_bins=0)
    with pytest.raises(ValueError, match="coherence_pooling"):
        TrainingObjectiveConfig(coherence_pooling="max")


# ---------------------------------------------------------------- surprise

def test_surprise_is_the_mean_of_per_layer_mean_errors():
    layers = [torch.tensor([1.0, 3.0]), torch.tensor([[4.0]]), torch.tensor(6.0)]
    assert SurpriseLoss()(layers).item() == pytest.approx((2.0 + 4.0 + 6.0) / 3)
    stacked = torch.rand(4, B, T)
    torch.testing.assert_close(SurpriseLoss()(stacked), stacked.mean())
    with pytest.raises(ValueError, match="surprises"):
        SurpriseLoss()([])
    with pytest.raises(ValueError, match=r"surprises\[1\]"):
        SurpriseLoss()([torch.ones(2), torch.tensor([float("nan")])])


# ---------------------------------------------------------------- specialisation (Jensen-Shannon)

def test_js_divergence_matches_scipy_squared_natural_log():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(7), size=5)
    q = rng.dirichlet(np.ones(7), size=5)
    p[0, :3] = 0.0                       # masked keys
    p[0] /= p[0].sum()
    ours = js_divergence(torch.tensor(p), torch.tensor(q)).double().numpy()
    reference = np.array([jensenshannon(a, b, base=math.e) ** 2 for a, b in zip(p, q)])
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-7)


def test_specialization_is_minus_the_mean_pairwise_js_matching_scipy():
    probs = causal_probs()
    loss = SpecializationLoss()(probs)
    per_pair = []
    for i in range(C):
        for j in range(i + 1, C):
            values = [jensenshannon(probs[b, i, t].numpy(), probs[b, j, t].numpy(), base=math.e) ** 2
                      for b in range(B) for t in range(T)]
            per_pair.append(np.mean(values))
    assert loss.item() == pytest.approx(-np.mean(per_pair), rel=1e-4, abs=1e-6)
    same = probs[:, :1].expand(B, C, T, T)
    assert abs(SpecializationLoss()(same).item()) < 1e-7          # identical columns: no specialisation
    assert SpecializationLoss()(torch.eye(2)).item() == pytest.approx(-math.log(2))   # disjoint: -ln 2


def test_specialization_gradients_are_finite_through_causal_masks():
    scores = torch.randn(B, C, T, T).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    scores.requires_grad_(True)
    SpecializationLoss()(scores.softmax(-1)).backward()
    assert torch.isfinite(scores.grad).all() and scores.grad.abs().sum() > 0


def test_specialization_rejects_bad_shapes():
    with pytest.raises(ValueError, match="attention_distributions"):
        SpecializationLoss()(torch.rand(5))
    with pytest.raises(ValueError, match="attention_distributions"):
        SpecializationLoss()(torch.rand(B, 1, T, T))


# ---------------------------------------------------------------- calibration

def test_ece_matches_a_hand_computed_example():
    conf = torch.tensor([0.2, 0.4, 0.5, 0.7, 0.9])
    correct = torch.tensor([0, 1, 0, 1, 1])
    # 2 bins (0, 0.5], (0.5, 1]: bin 1 holds 0.2, 0.4, 0.5 (acc 1/3, conf 1.1/3); bin 2 holds 0.7, 0.9 (acc 1, conf 0.8)
    expected = 3 / 5 * abs(1 / 3 - 1.1 / 3) + 2 / 5 * abs(1.0 - 0.8)
    assert expected_calibration_error(conf, correct, num_bins=2).item() == pytest.approx(expected, abs=1e-6)
    assert CalibrationLoss(num_bins=2).ece(conf, correct).item() == pytest.approx(expected, abs=1e-6)
    perfect = torch.tensor([1.0, 1.0, 0.0])
    assert expected_calibration_error(perfect, torch.tensor([1, 1, 0])).item() == 0.0


def test_soft_calibration_approaches_ece_and_is_differentiable():
    conf = torch.tensor([0.2, 0.4, 0.3, 0.7, 0.9], requires_grad=True)    # away from the bin edge 0.5
    correct = torch.tensor([0, 1, 0, 1, 1], dtype=torch.bool)
    soft = CalibrationLoss(num_bins=2, temperature=1e-3)(conf, correct)
    assert soft.item() == pytest.approx(expected_calibration_error(conf, correct, 2).item(), abs=1e-6)
    soft.backward()
    assert torch.isfinite(conf.grad).all() and conf.grad.abs().sum() > 0
    centres = (torch.arange(15) + 0.5) / 15                    # default 15 bins, temperature 0.1
    hits = torch.arange(15) % 3 == 0
    default = CalibrationLoss()(centres, hits).item()
    assert default == pytest.approx(expected_calibration_error(centres, hits).item(), abs=1e-3)


def test_calibration_rejects_bad_inputs():
    loss = CalibrationLoss()
    with pytest.raises(ValueError, match="confidences"):
        loss(torch.tensor([1.5]), torch.tensor([1]))
    with pytest.raises(ValueError, match="correctness"):
        loss(torch.tensor([0.5, 0.5]), torch.tensor([1]))
    with pytest.raises(ValueError, match="correctness"):
        loss(torch.tensor([0.5]), torch.tensor([2]))


# ---------------------------------------------------------------- efficiency

def test_efficiency_is_the_expected_fraction_of_layers_used():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert EfficiencyLoss()(mask).item() == pytest.approx(6 / 8)
    halting = torch.tensor([0.5, 0.5], requires_grad=True)
    usage = layer_usage_from_exit_probs(halting, exit_layers=[2, 4], num_layers=6)
    torch.testing.assert_close(usage, torch.tensor([1.0, 1.0, 0.5, 0.5, 0.25, 0.25]))
    loss = EfficiencyLoss()(usage)
    assert loss.item() == pytest.approx(3.5 / 6)
    loss.backward()
    assert (halting.grad < 0).all()                    # exiting more often lowers the cost
    with pytest.raises(ValueError, match="layer_usage"):
        EfficiencyLoss()(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="exit_probs"):
        layer_usage_from_exit_probs(torch.rand(3), exit_layers=[2, 4], num_layers=6)


# ---------------------------------------------------------------- coherence

def test_coherence_is_one_minus_cosine_to_the_goal():
    goal = torch.tensor([1.0, 0.0])
    hidden = torch.tensor([[[2.0, 0.0], [4.0, 0.0]], [[0.0, 1.0], [0.0, 3.0]], [[-1.0, 0.0], [-1.0, 0.0]]])
    expected = (0.0 + 1.0 + 2.0) / 3                   # aligned, orthogonal, opposite
    assert CoherenceLoss()(hidden, goal).item() == pytest.approx(expected, abs=1e-6)
    last = CoherenceLoss("last")(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([[0.0, 1.0]]))
    assert abs(last.item()) < 1e-6
    with pytest.raises(ValueError, match="goal_embedding"):
        CoherenceLoss()(hidden, torch.ones(3))


# ---------------------------------------------------------------- composite

def test_total_is_ce_plus_weighted_components_exactly():
    inputs, _ = full_inputs()
    loss_fn = NeuroCompositeLoss(TrainingObjectiveConfig(prediction_error_weight=0.1, specialization_weight=0.01,
                                                         calibration_weight=0.01, efficiency_weight=0.05,
                                                         coherence_weight=0.05))
    total, components = loss_fn.compute(**inputs)
    assert list(components) == ["lm", "surprise", "specialization", "calibration", "efficiency", "coherence"]
    torch.testing.assert_close(components["lm"], F.cross_entropy(inputs["predictions"].reshape(-1, V),
                                                                 inputs["targets"].reshape(-1)))
    expected = components["lm"]
    for term in ("surprise", "specialization", "calibration", "efficiency", "coherence"):
        expected = expected + loss_fn.weights[term] * components[term]
    assert torch.equal(total, expected)
    assert loss_fn.weights == {"surprise": 0.1, "specialization": 0.01, "calibration": 0.01,
                               "efficiency": 0.05, "coherence": 0.05}


def test_zero_weights_and_missing_inputs_leave_the_cross_entropy():
    inputs, _ = full_inputs()
    zero = TrainingObjectiveConfig(prediction_error_weight=0, specialization_weight=0, calibration_weight=0,
                                   efficiency_weight=0, coherence_weight=0)
    total, components = NeuroCompositeLoss(zero).compute(**inputs)
    assert torch.equal(total, components["lm"]) and len(components) == 6
    total, components = NeuroCompositeLoss().compute(inputs["predictions"], inputs["targets"])
    assert list(components) == ["lm"] and torch.equal(total, components["lm"])


def test_ignore_index_is_left_out_of_the_cross_entropy():
    inputs, _ = full_inputs()
    targets = inputs["targets"].clone()
    targets[0] = -100
    total, _ = NeuroCompositeLoss().compute(inputs["predictions"], targets)
    torch.testing.assert_close(total, F.cross_entropy(inputs["predictions"][1], targets[1]))


def test_gradients_flow_to_every_input():
    inputs, leaves = full_inputs(requires_grad=True)
    total, _ = NeuroCompositeLoss().compute(**inputs)
    total.backward()
    for name, leaf in leaves.items():
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), name
        assert leaf.grad.abs().sum() > 0, name


def test_adjust_weights_follows_the_documented_schedule():
    loss_fn = NeuroCompositeLoss()
    base = dict(loss_fn.weights)
    for phase in (1, 2, 3):
        weights = loss_fn.adjust_weights(phase)
        assert loss_fn.phase == phase
        assert weights == {k: base[k] * PHASE_SCHEDULE[phase][k] for k in base}
    assert loss_fn.adjust_weights(1)["calibration"] == 0.0 and loss_fn.weights["surprise"] == 0.1
    assert loss_fn.adjust_weights(3)["calibration"] == pytest.approx(0.02)
    for bad in (0, 4, "2", True):
        with pytest.raises(ValueError, match="phase"):
            loss_fn.adjust_weights(bad)
    assert loss_fn.phase == 3


@pytest.mark.parametrize("change, name", [
    (dict(targets=torch.zeros(B, T + 1, dtype=torch.long)), "targets"),
    (dict(targets=torch.zeros(B, T)), "targets"),
    (dict(predictions=torch.randn(B * T * V)), "predictions"),
    (dict(confidences=torch.full((B, T), 1.5)), "confidences"),
    (dict(correctness=None), "correctness"),
    (dict(hidden_states=None), "hidden_states"),
    (dict(goal_embedding=torch.randn(B, D + 1)), "goal_embedding"),
    (dict(attention_distributions=torch.rand(4)), "attention_distributions"),
    (dict(layer_usage=torch.full((B, L), -1.0)), "layer_usage"),
])
def test_bad_inputs_raise_naming_the_argument(change, name):
    inputs, _ = full_inputs()
    inputs.update(change)
    with pytest.raises((ValueError, TypeError), match=name):
        NeuroCompositeLoss().compute(**inputs)
