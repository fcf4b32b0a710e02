"""NeuroLlamaModel with the mechanisms wired in: every toggle changes the model, neutral at init where it can be,
causal with everything on, trainable, real early exit, resettable state (see cortexlab/neuro/model.py)."""
import copy
import math

import pytest
import torch
from safetensors.torch import load_model, save_model

from cortexlab.neuro.backbone import NeuroLlamaModel, create_neurollama, load_llama_state_dict
from cortexlab.neuro.config import NeuroLlamaConfig
from cortexlab.neuro.objectives import TrainingObjectiveConfig

VOCAB = 97
ALL_ON = dict(enable_synaptic_modulation=True, enable_cortical_columns=True, enable_lateral_inhibition=True,
              enable_predictive_coding=True, enable_hebbian_attention=True, enable_habituation=True,
              enable_population_coding=True, enable_early_exit=True)
COMBOS = [("static", "confidence"), ("full_matrix", "entropy"), ("context_dependent", "tuning_curve")]


pytestmark = pytest.mark.usefixtures("one_thread")


def config(**overrides):
    return NeuroLlamaConfig(num_layers=4, hidden_dim=64, num_heads=4, num_kv_heads=2, ffn_dim=160, vocab_size=VOCAB,
                            max_seq_len=64, **overrides)


def build(seed=0, **overrides):
    torch.manual_seed(seed)
    return NeuroLlamaModel(config(**overrides))


def ids(b=2, t=12, seed=1):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a - b).abs().max().item()


def attention_mechanisms(model):
    return [layer.self_attn.mechanisms for layer in model.layers]


@torch.no_grad()
def logits(model, x, train=False):
    model.train(train)
    return model(x)["logits"]


# ------------------------------------------------------------------------------------------ 1. toggles
def _perturb_attention(attr, fn):
    def perturb(model):
        for mech in attention_mechanisms(model):
            fn(getattr(mech, attr))
    return perturb


def _inhibit(module):
    module.inhibition.fill_(0.4).fill_diagonal_(0.0)


def _perturb_predictive(model):
    for pc in model.mechanisms.predictive:
        pc.error_proj.weight.normal_(0.0, 0.5)


# (toggle overrides, how to perturb the mechanism's parameters or state) for the mechanisms that are neutral at init
NEUTRAL_AT_INIT = {
    "synaptic_static": (dict(enable_synaptic_modulation=True, synaptic_mode="static"),
                        _perturb_attention("synaptic_scaling", lambda m: m.alpha.fill_(3.0))),
    "synaptic_full_matrix": (dict(enable_synaptic_modulation=True, synaptic_mode="full_matrix"),
                             _perturb_attention("synaptic_matrix", lambda m: m.weight.normal_())),
    "synaptic_context_dependent": (dict(enable_synaptic_modulation=True, synaptic_mode="context_dependent"),
                                   _perturb_attention("neuromodulation", lambda m: m.fc2.bias.fill_(-2.0))),
    "lateral_inhibition": (dict(enable_lateral_inhibition=True), _perturb_attention("lateral_inhibition", _inhibit)),
    "predictive_coding": (dict(enable_predictive_coding=True), _perturb_predictive),
    "population_confidence": (dict(enable_population_coding=True, voting_method="confidence"),
                              _perturb_attention("voter", lambda m: m.weight.normal_())),
    # at its neutral settings: parameter-free mechanisms that act from the first token by design
    "hebbian_lr0": (dict(enable_hebbian_attention=True, hebbian_lr=0.0),
                    _perturb_attention("hebbian", lambda m: m.hebbian.normal_())),
    "habituation_rate0": (dict(enable_habituation=True, habituation_rate=0.0, cross_layer_decay=0.0), None),
    "population_entropy_flat": (dict(enable_population_coding=True, voting_method="entropy",
                                     voting_temperature=math.inf), None),
    "population_tuning_flat": (dict(enable_population_coding=True, voting_method="tuning_curve",
                                    tuning_width=math.inf), None),
    "early_exit_never": (dict(enable_early_exit=True, exit_confidence_threshold=1.0), None),
    "cortical_columns": (dict(enable_cortical_columns=True), None),   # an observer + aux loss: logits never change
}

# not neutral at init by design (parameter-free, or random preferred directions): logits change at once
ACTIVE_AT_INIT = {
    "hebbian": dict(enable_hebbian_attention=True, hebbian_lr=1.0),   # the default 0.01: see the next test
    "habituation": dict(enable_habituation=True),
    "habituation_no_cross_layer_decay": dict(enable_habituation=True, cross_layer_decay=0.0),
    "population_entropy": dict(enable_population_coding=True, voting_method="entropy"),
    "population_tuning_curve": dict(enable_population_coding=True, voting_method="tuning_curve"),
}


@pytest.mark.parametrize("name", list(NEUTRAL_AT_INIT))
def test_toggle_is_neutral_at_init_and_not_inert(name):
    overrides, perturb = NEUTRAL_AT_INIT[name]
    x = ids()
    base = build()
    model = build(**overrides)
    assert model.config.enabled_mechanisms   # the toggle did attach something
    for train in (False, True):
        assert max_diff(logits(model, x, train), logits(base, x, train)) < 1e-5, (name, train)
    if perturb is not None:
        with torch.no_grad():
            perturb(model)
        assert max_diff(logits(model, x), logits(base, x)) > 1e-3, name


@pytest.mark.parametrize("name", list(ACTIVE_AT_INIT))
def test_parameter_free_mechanisms_change_logits_from_the_start(name):
    x = ids()
    assert max_diff(logits(build(**ACTIVE_AT_INIT[name]), x), logits(build(), x)) > 1e-4, name


def test_hebbian_at_the_default_rate_is_weak_at_init_but_not_inert():
    """eta lr s^2 (q_i.q_t)(kbar_t.k_j) with lr = 0.01 and init-sized q, k: logits move by ~1e-5 at init."""
    x = ids()
    diff = max_diff(logits(build(enable_hebbian_attention=True), x), logits(build(), x))
    assert 1e-7 < diff < 1e-3


def test_toggles_build_only_what_they_switch_on():
    base = build()
    assert all(m is None for m in attention_mechanisms(base)) and base.mechanisms is None
    assert set(base.state_dict()) == set(build(enable_early_exit=True).state_dict()) - {
        f"mechanisms.early_exit.heads.{layer}.adapter.weight" for layer in (1, 2, 3)}
    mech = attention_mechanisms(build(enable_synaptic_modulation=True, synaptic_mode="full_matrix"))[0]
    assert mech.synaptic_matrix is not None and mech.synaptic_scaling is None and mech.hebbian is None
    tuning = build(enable_population_coding=True, voting_method="tuning_curve")
    for layer in tuning.layers:   # the population's out_proj is the layer's o_proj (pretrained weights load into it)
        assert layer.self_attn.mechanisms.voter.out_proj is layer.self_attn.o_proj


def test_cortical_columns_report_specialisation_and_train_it():
    model = build(enable_cortical_columns=True).train()
    out = model(ids())
    js = torch.stack(out["column_specialization"])
    assert js.shape == (4,) and bool(((js >= 0) & (js <= math.log(2))).all())
    assert out["aux_losses"]["specialization"].item() == pytest.approx(-js.mean().item(), abs=1e-7)
    assert out["aux_loss"].item() == pytest.approx(0.01 * out["aux_losses"]["specialization"].item(), rel=1e-5)
    out["aux_loss"].backward()
    assert model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_predictive_coding_surprises_by_hand_at_init():
    model = build(enable_predictive_coding=True).eval()
    with torch.no_grad():
        out = model(ids(), output_hidden_states=True)
    hs = out["hidden_states"]
    assert len(out["surprises"]) == 4
    for i, surprise in enumerate(out["surprises"]):   # P = I, E = 0: s_i = mean_d (x_i - x_{i+1})^2
        assert surprise.shape == (2, 12)
        assert torch.allclose(surprise, (hs[i] - hs[i + 1]).square().mean(-1), atol=1e-7)
    assert out["aux_losses"]["surprise"].item() == pytest.approx(torch.stack(out["surprises"]).mean().item())


def test_lateral_inhibition_learns_in_training_only():
    model = build(enable_lateral_inhibition=True, lateral_inhibition_lr=0.05)
    inhibition = attention_mechanisms(model)[0].lateral_inhibition
    logits(model, ids(), train=False)
    assert inhibition.get_inhibition().abs().sum() == 0
    model.train()
    model(ids())["logits"].sum().backward()   # the update after use does not break backward
    weights = inhibition.get_inhibition()
    assert weights.abs().sum() > 0 and weights.diagonal().abs().sum() == 0


# ------------------------------------------------------------------------------------------ 2. causality
@pytest.mark.parametrize("mode, voting", COMBOS)
@pytest.mark.parametrize("train, threshold", [(True, 0.9), (False, 1.0), (False, 1e-3)])
def test_causal_with_every_mechanism_on(mode, voting, train, threshold):
    model = build(**ALL_ON, synaptic_mode=mode, voting_method=voting, exit_confidence_threshold=threshold)
    x = ids(b=1, t=16)
    y = x.clone()
    y[:, 9:] = (y[:, 9:] + 5) % VOCAB
    model.train(train)
    with torch.no_grad():   # both sequences in one batch: one call, so the same weights and state
        out = model(torch.cat([x, y]))
    a, b = out["logits"]
    assert max_diff(a[:9], b[:9]) < 1e-6 and max_diff(a[9:], b[9:]) > 0
    assert out["exit_layer"] == (1 if threshold < 0.5 else 4)


# ------------------------------------------------------------------------------------------ 3. training
@pytest.mark.parametrize("mode, voting", COMBOS)
def test_training_step_with_every_mechanism_on(mode, voting):
    model = build(**ALL_ON, synaptic_mode=mode, voting_method=voting).train()
    batch = ids(b=4, t=16, seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    out = model(batch, labels=batch)
    assert set(out["aux_losses"]) == {"surprise", "specialization", "early_exit"}
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["aux_loss"])
    (out["loss"] + out["aux_loss"]).backward()
    # NeuromodulatedAttention's fc2 starts at zero, so fc1 gets its first gradient after one step moves fc2
    late = {n for n, _ in model.named_parameters() if "neuromodulation.fc1" in n}
    for name, p in model.named_parameters():
        if name not in late:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    opt.step()
    opt.zero_grad()
    out = model(batch, labels=batch)
    (out["loss"] + out["aux_loss"]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_loss_falls_on_a_repeated_batch_with_every_mechanism_on():
    model = build(**ALL_ON, synaptic_mode="context_dependent", voting_method="confidence").train()
    batch = ids(b=4, t=16, seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(batch, labels=batch)
        opt.zero_grad()
        (out["loss"] + out["aux_loss"]).backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[0] == pytest.approx(math.log(VOCAB), abs=0.3)
    assert losses[-1] < 0.5 * losses[0]


def test_aux_loss_weights_and_the_trainer_contract():
    x = ids()
    assert build()(x)["aux_loss"] is None and build()(x)["aux_losses"] == {}
    model = build(enable_predictive_coding=True, prediction_weight=0.3)
    out = model(x)
    assert out["aux_loss"].item() == pytest.approx(0.3 * out["aux_losses"]["surprise"].item())
    off = TrainingObjectiveConfig(prediction_error_weight=0.0)
    assert model(x, objectives=off)["aux_loss"] is None and "surprise" in model(x, objectives=off)["aux_losses"]
    assert create_neurollama(config(enable_predictive_coding=True), objectives=off)(x)["aux_loss"] is None
    # early exit: its loss is a training term (next-token targets from input_ids when no labels are given)
    model = build(enable_early_exit=True)
    assert "early_exit" not in model.eval()(x)["aux_losses"]
    out = model.train()(x)
    assert out["aux_loss"].item() == pytest.approx(0.5 * out["aux_losses"]["early_exit"].item())
    with_labels = model(x, labels=x)
    assert with_labels["aux_losses"]["early_exit"].item() == pytest.approx(out["aux_losses"]["early_exit"].item())


# ------------------------------------------------------------------------------------------ 4. early exit
def _count_calls(model):
    calls = [0] * len(model.layers)
    for i, layer in enumerate(model.layers):
        layer.register_forward_pre_hook(lambda module, args, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@torch.no_grad()
def test_early_exit_really_skips_the_remaining_layers():
    model = build(**ALL_ON, exit_confidence_threshold=1e-3).eval()
    calls = _count_calls(model)
    out = model(ids(), output_hidden_states=True)
    assert out["exit_layer"] == 1 and out["system_type"] == "system1" and calls == [1, 0, 0, 0]
    assert len(out["hidden_states"]) == 2 and len(out["surprises"]) == 1
    # exit heads start as the logit lens: the model's own norm + lm_head on the exit layer's hidden state
    assert torch.allclose(out["logits"], model.final_logits(out["hidden_states"][1]), atol=1e-6)
    # no exit in training mode or with labels (the loss needs the full model)
    assert model.train()(ids())["exit_layer"] == 4 and calls == [2, 1, 1, 1]
    assert model.eval()(ids(), labels=ids())["system_type"] == "system2"


@torch.no_grad()
def test_early_exit_at_threshold_one_is_the_full_model():
    x = ids()
    model = build(enable_early_exit=True, exit_confidence_threshold=1.0).eval()
    calls = _count_calls(model)
    out = model(x)
    assert out["exit_layer"] == 4 and out["system_type"] == "system2" and calls == [1, 1, 1, 1]
    assert max_diff(out["logits"], logits(build(), x)) < 1e-6
    # the exits' threshold follows the adaptive controller
    model.mechanisms.exit_controller.update(correct=True, complexity=0.0)
    assert model.mechanisms.early_exit.threshold < 1.0


@torch.no_grad()
def test_copied_model_exits_through_its_own_head():
    model = build(enable_early_exit=True, exit_confidence_threshold=1e-3).eval()
    clone = copy.deepcopy(model)
    clone.lm_head.weight.mul_(2.0)
    x = ids()
    assert max_diff(clone(x)["logits"], 2.0 * model(x)["logits"]) < 1e-5


# ------------------------------------------------------------------------------------------ 5. state and inputs
@torch.no_grad()
def test_reset_state_restores_the_fresh_model_and_state_does_not_leak_by_default():
    model = build(**ALL_ON, exit_confidence_threshold=1.0).eval()
    x, other = ids(), ids(seed=5)
    fresh = model(x)["logits"]
    model(other)
    assert torch.equal(model(x)["logits"], fresh)   # default: no across-call memory is written
    model.train()
    model(other)                                     # lateral inhibition learns
    model.eval()
    model(other, update_state=True)                  # Hebbian H is written
    hebbian = attention_mechanisms(model)[0].hebbian
    assert hebbian.get_hebbian_strength() > 0
    assert attention_mechanisms(model)[0].habituation.get_habituation_map().numel() > 0
    assert model.mechanisms.predictive[0].get_running_surprise() > 0
    assert max_diff(model(x)["logits"], fresh) > 1e-5
    model.reset_state()
    assert hebbian.get_hebbian_strength() == 0
    assert attention_mechanisms(model)[0].lateral_inhibition.get_inhibition().abs().sum() == 0
    assert attention_mechanisms(model)[0].habituation.get_habituation_map().numel() == 0
    assert model.mechanisms.predictive[0].get_running_surprise() == 0
    assert torch.equal(model(x)["logits"], fresh)


def test_bad_inputs_raise_naming_the_argument_before_state_changes():
    model = build(**ALL_ON).eval()
    x = ids()
    cases = [
        (TypeError, "input_ids", dict(input_ids=x.float())),
        (ValueError, "vocab_size", dict(input_ids=x + VOCAB)),
        (ValueError, "labels", dict(input_ids=x, labels=x[:, 1:])),
        (TypeError, "update_state", dict(input_ids=x, update_state="yes")),
        (TypeError, "objectives", dict(input_ids=x, objectives={"prediction_error_weight": 1.0})),
    ]
    for error, word, kwargs in cases:
        with pytest.raises(error, match=word):
            model(**{**kwargs, "update_state": kwargs.get("update_state", True)})
    assert attention_mechanisms(model)[0].hebbian.get_hebbian_strength() == 0
    for field, value in (("novelty_boost", 2.0), ("cross_layer_decay", 1.0), ("max_habituation", 1.0)):
        with pytest.raises(ValueError, match=field):
            build(enable_habituation=True, **{field: value})
    with pytest.raises(TypeError, match="objectives"):
        NeuroLlamaModel(config(), objectives="strong")
    with pytest.raises(ValueError, match="exit_loss_weight"):
        NeuroLlamaModel(config(), exit_loss_weight=-1.0)


def test_every_mechanism_builds_on_meta_and_in_bfloat16():
    model = create_neurollama(config(**ALL_ON), device="meta")
    assert all(p.is_meta for p in model.parameters())
    model = create_neurollama(config(**ALL_ON, exit_confidence_threshold=1.0), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        out = model(ids(), update_state=True)
    assert out["logits"].dtype == torch.bfloat16 and torch.isfinite(out["logits"].float()).all()


@torch.no_grad()
def test_pretrained_llama_with_neutral_mechanisms_on_starts_from_its_logits(tmp_path):
    """Loading Llama weights (transformers' names) into a model with neutral mechanisms on gives the same logits."""
    pretrained = build(seed=3).eval()
    hf_state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v
                for k, v in pretrained.state_dict().items()}
    x = ids()
    reference = pretrained(x)["logits"]
    for synaptic in ("static", "full_matrix", "context_dependent"):
        model = build(seed=4, enable_synaptic_modulation=True, synaptic_mode=synaptic, enable_cortical_columns=True,
                      enable_lateral_inhibition=True, enable_predictive_coding=True, enable_population_coding=True,
                      voting_method="tuning_curve", tuning_width=math.inf, enable_early_exit=True,
                      exit_confidence_threshold=1.0).eval()
        load_llama_state_dict(model, hf_state)
        assert max_diff(model(x)["logits"], reference) < 1e-5, synaptic
    # the tied o_proj survives a safetensors round trip (the trainer's checkpoint format)
    save_model(model, str(tmp_path / "model.safetensors"))
    again = NeuroLlamaModel(model.config)
    load_model(again, str(tmp_path / "model.safetensors"))
    assert again.layers[0].self_attn.mechanisms.voter.out_proj is again.layers[0].self_attn.o_proj
    assert max_diff(again.eval()(x)["logits"], reference) < 1e-5
