"""NeuroLlamaConfig: presets, validation that names the field, JSON round trip, overrides."""
import dataclasses
import json

import pytest

from cortexlab.neuro.config import MECHANISM_TOGGLES, PRESETS, NeuroLlamaConfig

ALL_ON = dict(
    enable_synaptic_modulation=True, synaptic_mode="context_dependent", enable_cortical_columns=True,
    enable_lateral_inhibition=True, enable_predictive_coding=True, enable_hebbian_attention=True,
    enable_habituation=True, enable_population_coding=True, voting_method="tuning_curve",
    enable_early_exit=True, exit_layers=[8, 16, 24], exit_confidence_threshold=0.9,
)


def test_defaults_are_llama31_8b_with_every_mechanism_off():
    cfg = NeuroLlamaConfig()
    assert (cfg.num_layers, cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim) == (
        32, 4096, 32, 8, 128, 14336)
    assert (cfg.vocab_size, cfg.rope_theta, cfg.tie_embeddings) == (128256, 500000.0, False)
    assert cfg.enabled_mechanisms == () and cfg.exit_layers == (8, 16, 24) and cfg.num_kv_groups == 4
    assert cfg == NeuroLlamaConfig.from_preset("8B", max_seq_len=8192)


@pytest.mark.parametrize("name, row", [
    ("8B", (32, 4096, 32, 8, 14336)),
    ("70B", (80, 8192, 64, 8, 28672)),
    ("405B", (126, 16384, 128, 16, 53248)),  # the design's row (Llama-3.1-405B has 8 KV heads)
])
def test_presets_match_the_design_table(name, row):
    cfg = NeuroLlamaConfig.from_preset(name)
    assert (cfg.num_layers, cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.ffn_dim) == row
    assert (cfg.vocab_size, cfg.head_dim, cfg.tie_embeddings, cfg.rope_theta) == (128256, 128, False, 500000.0)
    assert cfg.enabled_mechanisms == ()


def test_small_preset_and_overrides():
    cfg = NeuroLlamaConfig.from_preset("small", vocab_size=1000, enable_hebbian_attention=True)
    assert (cfg.num_layers, cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 256, 8, 2, 32)
    assert cfg.vocab_size == 1000 and cfg.enabled_mechanisms == ("enable_hebbian_attention",)
    assert cfg.exit_layers == (1, 2, 3)
    assert set(PRESETS) == {"8B", "70B", "405B", "small"}


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="8B, 70B, 405B, small"):
        NeuroLlamaConfig.from_preset("7B")
    with pytest.raises(ValueError, match="hidden_size"):
        NeuroLlamaConfig.from_preset("small", hidden_size=3)


def test_design_example_builds_and_overrides():
    cfg = NeuroLlamaConfig(num_layers=32, hidden_dim=4096, num_heads=32, num_kv_heads=8, **ALL_ON)
    assert cfg.enabled_mechanisms == MECHANISM_TOGGLES and cfg.exit_layers == (8, 16, 24)
    fast = cfg.with_overrides(enable_early_exit=False, hebbian_lr=0.001)
    assert fast.hebbian_lr == 0.001 and not fast.enable_early_exit
    assert cfg.hebbian_lr == 0.01 and cfg.enable_early_exit  # the original is unchanged
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hebbian_lr = 1.0


@pytest.mark.parametrize("kwargs, field", [
    (dict(synaptic_mode="dynamic"), "synaptic_mode"),
    (dict(voting_method="majority"), "voting_method"),
    (dict(hidden_dim=100, num_heads=32), "num_heads"),
    (dict(num_kv_heads=5), "num_kv_heads"),
    (dict(num_layers=0), "num_layers"),
    (dict(head_dim=7), "head_dim"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    (dict(exit_layers=[8, 32]), "exit_layers"),
    (dict(exit_layers=[0, 8]), "exit_layers"),
    (dict(exit_layers=[16, 8]), "exit_layers"),
    (dict(exit_layers=[8, 8, 16]), "exit_layers"),
    (dict(exit_layers=[2, 8], min_exit_layer=4), "exit_layers"),
    (dict(exit_layers=[], enable_early_exit=True), "exit_layers"),
    (dict(min_exit_layer=0), "min_exit_layer"),
    (dict(min_exit_layer=32), "min_exit_layer"),
    (dict(exit_confidence_threshold=0.0), "exit_confidence_threshold"),
    (dict(exit_confidence_threshold=1.5), "exit_confidence_threshold"),
    (dict(voting_threshold=1.0), "voting_threshold"),
    (dict(hebbian_lr=-0.1), "hebbian_lr"),
    (dict(hebbian_decay=1.1), "hebbian_decay"),
    (dict(max_hebbian_norm=0.0), "max_hebbian_norm"),
    (dict(habituation_rate=-0.1), "habituation_rate"),
    (dict(recovery_rate=2.0), "recovery_rate"),
    (dict(max_habituation=1.5), "max_habituation"),
    (dict(prediction_weight=-1.0), "prediction_weight"),
    (dict(lateral_inhibition_lr=-1e-3), "lateral_inhibition_lr"),
    (dict(novelty_boost=-1.0), "novelty_boost"),
    (dict(synaptic_window=0), "synaptic_window"),
    (dict(cpc_num_negatives=0), "cpc_num_negatives"),
    (dict(voting_temperature=0.0), "voting_temperature"),
])
def test_bad_values_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        NeuroLlamaConfig(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_layers="4"), "num_layers"),
    (dict(num_layers=4.0), "num_layers"),
    (dict(enable_habituation=1), "enable_habituation"),
    (dict(hebbian_lr="0.1"), "hebbian_lr"),
    (dict(exit_layers=[8.0]), "exit_layers"),
    (dict(synaptic_mode=None), "synaptic_mode"),
])
def test_wrong_types_raise_type_error_naming_the_field(kwargs, field):
    with pytest.raises(TypeError, match=field):
        NeuroLlamaConfig(**kwargs)


@pytest.mark.parametrize("cfg", [
    NeuroLlamaConfig(),
    NeuroLlamaConfig(**ALL_ON, rms_norm_eps=1e-6, hebbian_lr=1 / 3, rope_theta=10000),
    NeuroLlamaConfig.from_preset("small", vocab_size=777, tie_embeddings=True, exit_layers=(2,)),
])
def test_json_round_trip_is_exact(cfg):
    text = cfg.to_json()
    back = NeuroLlamaConfig.from_json(text)
    assert back == cfg and back.to_json() == text
    assert isinstance(back.exit_layers, tuple) and isinstance(back.rope_theta, float)
    assert set(json.loads(text)) == {f.name for f in dataclasses.fields(NeuroLlamaConfig)}


def test_from_json_refuses_bad_text():
    with pytest.raises(ValueError, match="JSON"):
        NeuroLlamaConfig.from_json("{not json")
    with pytest.raises(ValueError, match="object"):
        NeuroLlamaConfig.from_json("[1, 2]")
    with pytest.raises(ValueError, match="hebbian_rate"):
        NeuroLlamaConfig.from_json('{"hebbian_rate": 0.1}')
    with pytest.raises(ValueError, match="synaptic_mode"):
        NeuroLlamaConfig.from_json('{"synaptic_mode": "nope"}')
    with pytest.raises(TypeError, match="text"):
        NeuroLlamaConfig.from_json({"num_layers": 4})


def test_with_overrides_validates_and_rejects_unknown_fields():
    cfg = NeuroLlamaConfig.from_preset("small")
    with pytest.raises(ValueError, match="enable_hebian_attention"):
        cfg.with_overrides(enable_hebian_attention=True)
    with pytest.raises(ValueError, match="num_kv_heads"):
        cfg.with_overrides(num_kv_heads=3)
    assert cfg.with_overrides() == cfg


def test_with_overrides_rederives_head_dim_and_exit_layers():
    cfg = NeuroLlamaConfig.from_preset("8B")
    wide = cfg.with_overrides(num_heads=16)
    assert wide.head_dim == 256  # followed hidden_dim / num_heads
    short = cfg.with_overrides(num_layers=8)
    assert short.exit_layers == (2, 4, 6)
    custom = cfg.with_overrides(head_dim=64, exit_layers=[4, 12])
    assert custom.with_overrides(num_layers=16).exit_layers == (4, 12)  # explicit values are kept
    assert custom.with_overrides(num_heads=16).head_dim == 64
