"""Early exit (System 1 / System 2): config, exit rule, real layer skipping, exit-head training, controller."""
import math

import pytest
import torch
from torch import nn

from cortexlab.neuro.early_exit import (
    AdaptiveComputationController,
    EarlyExitConfig,
    EarlyExitEngine,
    create_dual_process_pipeline,
    exit_confidence,
    run_with_early_exit,
)

HIDDEN, VOCAB = 16, 32


def confident_engine(exit_layers=(2, 4), weight=0.5, **cfg):
    """Exit heads whose logit 0 is weight * sum(RMSNorm(h)): h = ones -> p_0 = e^8 / (e^8 + 31) ~ 0.99 (< 1);
    h = zeros -> uniform logits (confidence 1 / VOCAB)."""
    config = EarlyExitConfig(exit_layers=list(exit_layers), min_layer=1, **cfg)
    engine, controller = create_dual_process_pipeline(config=config, hidden_dim=HIDDEN, output_dim=VOCAB)
    with torch.no_grad():
        for head in engine.heads.values():
            head.proj.weight.zero_()
            head.proj.weight[0] = weight
    return engine, controller


class CountingLayer(nn.Module):
    def __init__(self, shift):
        super().__init__()
        self.shift, self.calls = shift, 0

    def forward(self, hidden, scale=1.0):
        self.calls += 1
        return hidden * scale + self.shift


# ---------------------------------------------------------------- config

def test_config_defaults_match_the_design():
    cfg = EarlyExitConfig(exit_layers=[8, 16, 24], confidence_threshold=0.9, min_layer=4)
    assert cfg.exit_layers == (8, 16, 24) and cfg.confidence_measure == "max_prob"


@pytest.mark.parametrize("kwargs, field", [
    (dict(exit_layers=[16, 8]), "exit_layers"),
    (dict(exit_layers=[8, 8]), "exit_layers"),
    (dict(exit_layers=[]), "exit_layers"),
    (dict(exit_layers=[2, 8]), "min_layer"),
    (dict(exit_layers=[8, 32], num_layers=32), "num_layers"),
    (dict(confidence_threshold=0.0), "confidence_threshold"),
    (dict(confidence_threshold=1.5), "confidence_threshold"),
    (dict(confidence_measure="logit"), "confidence_measure"),
    (dict(min_layer=0), "min_layer"),
    (dict(min_threshold=0.95), "confidence_threshold"),
    (dict(distill_weight=2.0), "distill_weight"),
])
def test_config_rejects_bad_settings_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EarlyExitConfig(**kwargs)


def test_config_accepts_a_range_and_validates_the_dims():
    assert EarlyExitConfig(exit_layers=range(8, 25, 8)).exit_layers == (8, 16, 24)
    with pytest.raises(ValueError, match="output_dim"):
        create_dual_process_pipeline(EarlyExitConfig(), hidden_dim=HIDDEN, output_dim=1)


def test_config_rejects_non_numbers():
    with pytest.raises(TypeError, match="confidence_threshold"):
        EarlyExitConfig(confidence_threshold=True)


# ---------------------------------------------------------------- engine and exit rule

def test_pipeline_builds_one_head_per_exit_layer_and_shares_the_threshold():
    engine, controller = create_dual_process_pipeline(
        config=EarlyExitConfig(exit_layers=[8, 16, 24], confidence_threshold=0.9, min_layer=4),
        hidden_dim=HIDDEN, output_dim=VOCAB)
    assert isinstance(engine, EarlyExitEngine) and isinstance(controller, AdaptiveComputationController)
    assert sorted(int(k) for k in engine.heads) == [8, 16, 24]
    assert engine.threshold == controller.threshold == 0.9
    controller.update(correct=torch.zeros(10))          # all exits wrong -> threshold rises
    assert engine.threshold == controller.threshold > 0.9
    assert engine.process_layer_output(torch.randn(2, 3, HIDDEN), layer_idx=5) is None


def test_exit_fires_on_confident_last_token_and_returns_logits_and_confidence():
    engine, _ = confident_engine()
    hidden = torch.ones(2, 5, HIDDEN)
    logits, confidence = engine.process_layer_output(hidden, layer_idx=2)
    assert logits.shape == (2, 5, VOCAB) and confidence.shape == (2, 5)
    expected = math.exp(8) / (math.exp(8) + VOCAB - 1)
    torch.testing.assert_close(confidence, torch.full((2, 5), expected))
    assert engine.process_layer_output(hidden, layer_idx=3) is None       # not an exit layer


def test_exit_decision_is_about_every_sequences_last_token():
    engine, _ = confident_engine()
    hidden = torch.zeros(2, 4, HIDDEN)                 # uniform -> confidence 1 / VOCAB
    hidden[:, -1] = 1.0                                # only the last tokens are confident
    assert engine.process_layer_output(hidden, 2) is not None
    hidden = torch.ones(2, 4, HIDDEN)
    hidden[:, -1] = 0.0                                # confident everywhere but the last token
    assert engine.process_layer_output(hidden, 2) is None
    hidden = torch.ones(2, 4, HIDDEN)
    hidden[1, -1] = 0.0                                # one sequence unsure -> the batch continues
    assert engine.process_layer_output(hidden, 2) is None
    logits, confidence = engine.process_layer_output(torch.ones(3, HIDDEN), 4)    # [B, hidden] input
    assert logits.shape == (3, VOCAB) and confidence.shape == (3,)


def test_threshold_one_never_exits_when_confidence_is_below_one():
    engine, _ = confident_engine()
    assert engine.process_layer_output(torch.ones(1, 2, HIDDEN), 2, threshold=1.0) is None


def test_confidence_measures_match_hand_computed_values():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log()
    torch.testing.assert_close(exit_confidence(logits, "max_prob"), torch.tensor(0.5))
    torch.testing.assert_close(exit_confidence(logits, "margin"), torch.tensor(0.2))
    entropy = -(probs * probs.log()).sum()
    torch.testing.assert_close(exit_confidence(logits, "entropy"), 1 - entropy / math.log(3))
    uniform = torch.zeros(4)
    assert exit_confidence(uniform, "margin").item() == 0.0
    assert abs(exit_confidence(uniform, "entropy").item()) < 1e-6


def test_bad_inputs_raise_naming_the_argument():
    engine, _ = confident_engine()
    with pytest.raises(ValueError, match="hidden_state"):
        engine.process_layer_output(torch.ones(2, 3, HIDDEN + 1), 2)
    with pytest.raises(ValueError, match="hidden_state"):
        engine.process_layer_output(torch.ones(HIDDEN), 2)
    with pytest.raises(TypeError, match="hidden_state"):
        engine.process_layer_output(torch.ones(2, 3, HIDDEN, dtype=torch.long), 2)
    with pytest.raises(TypeError, match="layer_idx"):
        engine.process_layer_output(torch.ones(2, 3, HIDDEN), 2.0)
    with pytest.raises(ValueError, match="threshold"):
        engine.process_layer_output(torch.ones(2, 3, HIDDEN), 2, threshold=0.0)
    with pytest.raises(ValueError, match="hidden_dim"):
        create_dual_process_pipeline(config=EarlyExitConfig(), hidden_dim=0, output_dim=VOCAB)


# ---------------------------------------------------------------- real skipping

def test_run_with_early_exit_stops_calling_later_layers():
    engine, _ = confident_engine(exit_layers=(2, 4))
    layers = [CountingLayer(1.0) for _ in range(6)]
    out = run_with_early_exit(layers, torch.zeros(1, 3, HIDDEN), engine)
    assert out["exit_layer"] == 2 and out["system_type"] == "system1"
    assert [layer.calls for layer in layers] == [1, 1, 0, 0, 0, 0]
    torch.testing.assert_close(out["hidden_states"], torch.full((1, 3, HIDDEN), 2.0))
    assert out["logits"].shape == (1, 3, VOCAB) and out["confidence"].shape == (1, 3)


def test_without_exit_the_output_equals_the_full_stack():
    engine, _ = confident_engine(exit_layers=(2, 4))
    layers = [CountingLayer(0.1 * i) for i in range(6)]
    final_head = nn.Linear(HIDDEN, VOCAB)
    x = torch.randn(2, 3, HIDDEN)
    out = run_with_early_exit(layers, x, engine, final_head=final_head, threshold=1.0,
                              layer_kwargs={"scale": 1.5})
    expected = x
    for layer in layers:
        expected = expected * 1.5 + layer.shift
    assert out["exit_layer"] == 6 and out["system_type"] == "system2" and out["confidence"] is None
    assert [layer.calls for layer in layers] == [1] * 6
    torch.testing.assert_close(out["hidden_states"], expected, rtol=0, atol=0)
    torch.testing.assert_close(out["logits"], final_head(expected), rtol=0, atol=0)


def test_controller_threshold_decides_whether_the_run_exits():
    engine, controller = confident_engine(exit_layers=(2, 4), max_threshold=1.0)
    for _ in range(50):
        controller.update(correct=False)                # repeated errors push tau to its maximum, 1.0
    assert controller.threshold == 1.0
    out = run_with_early_exit([CountingLayer(1.0) for _ in range(6)], torch.zeros(1, 2, HIDDEN), engine)
    assert out["system_type"] == "system2"
    controller.reset()
    out = run_with_early_exit([CountingLayer(1.0) for _ in range(6)], torch.zeros(1, 2, HIDDEN), engine)
    assert out["system_type"] == "system1"


def test_run_with_early_exit_validates_layers_against_exit_layers():
    engine, _ = confident_engine(exit_layers=(2, 4))
    with pytest.raises(ValueError, match="layers"):
        run_with_early_exit([CountingLayer(1.0) for _ in range(4)], torch.zeros(1, 2, HIDDEN), engine)


# ---------------------------------------------------------------- training the exit heads

def test_exit_loss_is_the_mean_cross_entropy_of_the_heads_ignoring_padding():
    torch.manual_seed(0)
    engine, _ = create_dual_process_pipeline(EarlyExitConfig(exit_layers=[1, 2], min_layer=1), HIDDEN, VOCAB)
    hidden = [torch.randn(2, 4, HIDDEN) for _ in range(4)]          # HF-style: index 0 = embeddings
    labels = torch.randint(0, VOCAB, (2, 4))
    labels[0, :2] = -100
    valid = labels != -100
    expected = torch.stack([nn.functional.cross_entropy(engine.exit_logits(hidden[layer], layer)[valid],
                                                        labels[valid]) for layer in (1, 2)]).mean()
    torch.testing.assert_close(engine.exit_loss(hidden, labels), expected)
    torch.testing.assert_close(engine.exit_loss({1: hidden[1], 2: hidden[2]}, labels), expected)
    with pytest.raises(ValueError, match="hidden_states_per_layer"):
        engine.exit_loss(hidden[:2], labels)
    with pytest.raises(ValueError, match="labels"):
        engine.exit_loss(hidden, labels[:, :3])


def test_exit_loss_distillation_vanishes_when_the_head_matches_the_teacher():
    cfg = EarlyExitConfig(exit_layers=[1], min_layer=1, distill_weight=1.0, distill_temperature=2.0)
    engine, _ = create_dual_process_pipeline(cfg, HIDDEN, VOCAB)
    hidden = [torch.randn(2, 3, HIDDEN), torch.randn(2, 3, HIDDEN)]
    labels = torch.randint(0, VOCAB, (2, 3))
    teacher = engine.exit_logits(hidden[1], 1).detach()
    assert abs(engine.exit_loss(hidden, labels, final_logits=teacher).item()) < 1e-6
    assert engine.exit_loss(hidden, labels, final_logits=torch.randn(2, 3, VOCAB)).item() > 0.01


def test_heads_train_on_a_frozen_backbone():
    torch.manual_seed(0)
    backbone = nn.Linear(HIDDEN, HIDDEN).requires_grad_(False)
    engine, _ = create_dual_process_pipeline(EarlyExitConfig(exit_layers=[1], min_layer=1), HIDDEN, VOCAB)
    x = torch.randn(4, 6, HIDDEN)
    labels = torch.randint(0, VOCAB, (4, 6))
    before = backbone.weight.clone()
    losses = []
    for _ in range(20):                                  # plain gradient descent on the heads only
        engine.zero_grad()
        loss = engine.exit_loss([x, backbone(x)], labels, detach_hidden=True)
        loss.backward()
        with torch.no_grad():
            for param in engine.parameters():
                param -= 2.0 * param.grad
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert torch.equal(backbone.weight, before) and backbone.weight.grad is None


def test_shared_head_starts_as_the_models_own_head_and_is_not_registered():
    torch.manual_seed(0)
    norm, lm_head = nn.RMSNorm(HIDDEN), nn.Linear(HIDDEN, VOCAB, bias=False)
    engine, _ = create_dual_process_pipeline(EarlyExitConfig(exit_layers=[1, 2], min_layer=1), HIDDEN, VOCAB,
                                             shared_head=lambda h: lm_head(norm(h)))
    h = torch.randn(2, 3, HIDDEN)
    torch.testing.assert_close(engine.exit_logits(h, 2), lm_head(norm(h)), rtol=0, atol=0)
    names = [name for name, _ in engine.named_parameters()]
    assert names and all("adapter" in name for name in names)
    engine.exit_loss([h, h, h], torch.randint(0, VOCAB, (2, 3))).backward()
    assert engine.heads["1"].adapter.weight.grad.abs().sum() > 0


def test_gradients_flow_through_exit_logits():
    engine, _ = confident_engine()
    h = torch.ones(1, 2, HIDDEN, requires_grad=True)
    logits, _ = engine.process_layer_output(h, 2)
    logits.logsumexp(-1).sum().backward()
    assert h.grad is not None and engine.heads["2"].proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- adaptive controller

def make_controller(**kwargs):
    base = dict(confidence_threshold=0.8, min_threshold=0.6, max_threshold=0.95, adaptation_rate=0.05,
                target_error_rate=0.1)
    return AdaptiveComputationController(EarlyExitConfig(**{**base, **kwargs}))


def test_errors_raise_and_accurate_exits_lower_the_threshold_within_bounds():
    ctrl = make_controller()
    up = ctrl.update(correct=torch.tensor([True, False, False, True]))      # error 0.5 > 0.1
    assert up == pytest.approx(0.8 + 0.05 * (0.5 - 0.1))
    down = ctrl.update(correct=torch.ones(8))                                 # error 0 < 0.1
    assert down == pytest.approx(up - 0.05 * 0.1)
    for _ in range(200):
        ctrl.update(correct=False)
    assert ctrl.threshold == 0.95
    for _ in range(2000):
        ctrl.update(correct=True)
    assert ctrl.threshold == 0.6
    assert len(ctrl.history) == 2202


def test_complexity_raises_and_time_pressure_lowers_the_threshold():
    ctrl = make_controller(complexity_gain=0.1, time_pressure_gain=0.2, latency_budget_ms=100.0)
    assert ctrl.update(complexity=1.0) == pytest.approx(0.9)
    assert ctrl.update(complexity=0.0, latency_ms=150.0) == pytest.approx(0.8 - 0.2 * 0.5)
    assert ctrl.update(latency_ms=50.0) == pytest.approx(0.8)                # within budget: no pressure
    ctrl.update(correct=False, complexity=1.0)
    ctrl.reset()
    assert ctrl.threshold == 0.8 and ctrl.history == [] and ctrl.complexity == 0.0


def test_no_exits_leave_the_threshold_and_bad_feedback_leaves_state_untouched():
    ctrl = make_controller()
    assert ctrl.update(correct=torch.zeros(0)) == 0.8
    for bad, err in ((torch.tensor([0.5]), ValueError), ([1, 0], TypeError)):
        with pytest.raises(err, match="correct"):
            ctrl.update(correct=bad)
    with pytest.raises(ValueError, match="complexity"):
        ctrl.update(correct=False, complexity=2.0)
    assert ctrl.threshold == 0.8 and len(ctrl.history) == 1
