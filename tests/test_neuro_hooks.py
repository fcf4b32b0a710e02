"""InferenceHookPipeline: attach/detach on transformers decoders through AttentionInterface + a mask
function, neutrality (disabled hooks and neutral settings), causality, padding, generate with a KV
cache continuing every hook's state exactly, inspectable/resettable state, and the tensor-level API."""
import math

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from cortexlab.models import tiny_model
from cortexlab.neuro.hooks import InferenceHookConfig, InferenceHookPipeline

ALL_ON = dict(enable_hebbian=True, enable_habituation=True, enable_temperature=True, enable_voting=True)
# strong enough settings that each hook visibly changes a tiny random model's logits
STRONG = dict(hebbian_eta=20.0, hebbian_learning_rate=0.5, habituation_rate=2.0, attention_threshold=0.0,
              temperature_strength=3.0, voting_temperature=0.3)
NEUTRAL = dict(hebbian_eta=0.0, habituation_rate=0.0, temperature_strength=0.0, voting_temperature=math.inf)


def ids_for(model, B=2, T=24, seed=0):
    return torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_disabled_hooks_reproduce_the_model_and_detach_restores_it(arch):
    model = tiny_model(arch)
    ids = ids_for(model)
    with torch.no_grad():
        eager = model(ids).logits
        model.set_attn_implementation("sdpa")
        sdpa = model(ids).logits
        pipe = InferenceHookPipeline().attach(model)
        hooked = model(ids).logits
        assert model.config._attn_implementation.startswith("cortexlab_hooks_")
        pipe.detach()
        after = model(ids).logits
    assert (hooked - sdpa).abs().max() <= 1e-6 and (hooked - eager).abs().max() <= 1e-5
    assert model.config._attn_implementation == "sdpa" and torch.equal(after, sdpa)
    assert pipe._name not in AttentionInterface._global_mapping
    assert pipe._name not in AttentionMaskInterface._global_mapping


@pytest.mark.parametrize("hook", ["enable_hebbian", "enable_habituation", "enable_temperature", "enable_voting"])
def test_each_hook_is_neutral_at_its_neutral_setting_and_acts_otherwise(hook):
    model = tiny_model("llama")
    ids = ids_for(model)
    with torch.no_grad():
        ref = model(ids).logits
        with InferenceHookPipeline(InferenceHookConfig(**{hook: True}, **NEUTRAL)).attached(model):
            neutral = model(ids).logits
        with InferenceHookPipeline(InferenceHookConfig(**{hook: True}, **STRONG)).attached(model):
            acting = model(ids).logits
    torch.testing.assert_close(neutral, ref, rtol=0, atol=1e-6)
    assert (acting - ref).abs().max() > 1e-4                       # logits of this random model are ~0.1


def test_hooks_are_causal_and_respect_left_padding():
    model = tiny_model("qwen2")
    ids = ids_for(model, B=1, T=20)
    changed = ids.clone()
    changed[0, 12:] = (changed[0, 12:] + 7) % model.config.vocab_size
    pipe = InferenceHookPipeline(InferenceHookConfig(**ALL_ON, **STRONG))
    padded_ids = torch.cat([torch.zeros(1, 5, dtype=ids.dtype), ids[:, 5:]], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 15, dtype=torch.long)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad(), pipe.attached(model):
        a = model(ids).logits
        pipe.reset()
        b = model(changed).logits
        pipe.reset()
        short = model(ids[:, 5:]).logits
        short_map = pipe.habituation_map(1)
        pipe.reset()
        padded = model(padded_ids, attention_mask=mask, position_ids=positions).logits
        padded_map = pipe.habituation_map(1)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-4
    # left padding changes nothing: the sink shield moves to the first real key, padding queries are ignored
    torch.testing.assert_close(padded[:, 5:], short, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded_map[..., 5:], short_map, rtol=1e-5, atol=1e-6)


def test_sink_shield_acts_on_the_scores_and_follows_left_padding():
    T = 8
    scores = torch.full((1, 1, T, T), -1.0)
    scores[..., 2] = 5.0                                             # every query fixates on key 2
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    scores[..., :2] = -math.inf                                      # keys 0-1 are left padding
    for sinks, shielded in ((1, True), (0, False)):
        pipe = InferenceHookPipeline(InferenceHookConfig(enable_habituation=True, sink_tokens=sinks,
                                                         habituation_rate=1.0))
        out = pipe.apply_pre_attention(scores, 0)
        assert torch.equal(out[..., 2], scores[..., 2]) == shielded
        assert (float(pipe.habituation_map(0)[0, 0, 2]) == 0.0) == shielded


def test_a_call_that_cannot_continue_raises_before_any_state_moves():
    pipe = InferenceHookPipeline(InferenceHookConfig(**ALL_ON))
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 6, 4, generator=gen), torch.randn(1, 2, 6, 4, generator=gen)
    scores = (q @ k.transpose(-1, -2)).masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), -math.inf)
    pipe.apply_pre_attention(scores, 0, query=q, key=k)
    hebbian, temperature = pipe.hebbian_matrix(0), pipe._layers[0].temperature.entropy_sum.clone()
    q2, k2 = torch.randn(1, 2, 1, 4, generator=gen), torch.randn(1, 2, 9, 4, generator=gen)
    with pytest.raises(ValueError, match="reset"):                   # 9 keys do not continue 6
        pipe.apply_pre_attention(q2 @ k2.transpose(-1, -2), 0, query=q2, key=k2)
    assert torch.equal(pipe.hebbian_matrix(0), hebbian)
    assert torch.equal(pipe._layers[0].temperature.entropy_sum, temperature)


def test_padding_is_masked_exactly_with_hooks_disabled():
    model = tiny_model("llama")
    ids = ids_for(model, B=1, T=16)
    padded_ids = torch.cat([torch.zeros(1, 4, dtype=ids.dtype), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 16, dtype=torch.long)], dim=1)
    with torch.no_grad():
        ref = model(padded_ids, attention_mask=mask).logits
        with InferenceHookPipeline().attached(model):
            out = model(padded_ids, attention_mask=mask).logits
    torch.testing.assert_close(out[:, 4:], ref[:, 4:], rtol=0, atol=1e-6)


def test_generate_with_kv_cache_continues_every_hook_exactly():
    """Cached decoding (prefill + one token per call) gives the logits one fresh forward over the whole
    sequence gives: habituation, temperature set point and Hebbian state all continue across calls."""
    model = tiny_model("llama")
    prompt = ids_for(model, B=1, T=12)
    pipe = InferenceHookPipeline(InferenceHookConfig(**ALL_ON, **STRONG, hebbian_max_norm=1e6))
    with torch.no_grad(), pipe.attached(model):
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        steps = torch.stack(out.logits, dim=1)                       # [1, 6, V]
        pipe.reset()
        full = model(out.sequences).logits[:, prompt.shape[1] - 1:-1]
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        plain = model.generate(prompt, max_new_tokens=6, do_sample=False, output_logits=True,
                               return_dict_in_generate=True, pad_token_id=0)
    assert (torch.stack(plain.logits, 1) - steps).abs().max() > 1e-3


def test_state_is_inspectable_and_resettable():
    model = tiny_model("llama")
    ids = ids_for(model, B=1, T=16)
    pipe = InferenceHookPipeline(InferenceHookConfig(**ALL_ON, layers=[1], attention_threshold=0.0))
    with torch.no_grad(), pipe.attached(model):
        model(ids)
    H, D = model.config.num_attention_heads, model.config.head_dim
    hab = pipe.habituation_map(1)
    assert hab.shape == (1, H, 16) and float(hab.min()) >= 0 and float(hab.max()) <= 0.9
    assert torch.equal(hab[..., 0], torch.zeros(1, H))               # the attention sink is shielded
    assert float(hab[..., 1:].max()) > 0
    assert pipe.hebbian_matrix(1).shape == (H, D, D) and pipe.hebbian_matrix(1).norm() > 0
    assert pipe.temperatures(1).shape == (1, H, 16)
    weights = pipe.voting_weights(1)
    assert weights.shape == (1, 16, H)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 16))
    assert pipe.attention_entropy(1).shape == (1, H, 16)
    with pytest.raises(ValueError, match="layer_idx"):
        pipe.habituation_map(0)                                      # layer 0 is not hooked
    pipe.reset()
    assert pipe.habituation_map(1).numel() == 0 and pipe.hebbian_matrix(1).norm() == 0
    assert pipe.voting_weights(1).numel() == 0


def test_a_repeated_pattern_gets_habituated():
    """Keys that many later queries attended heavily end up suppressed; a fresh key is not."""
    pipe = InferenceHookPipeline(InferenceHookConfig(enable_habituation=True, sink_tokens=0, recovery_rate=0.0))
    T = 12
    scores = torch.full((1, 1, T, T), -2.0)
    scores[..., 3] = 4.0                                             # every query fixates on key 3
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    out = pipe.apply_pre_attention(scores, 0)
    h = pipe.habituation_map(0)[0, 0]
    assert h[3] > 0.5 and float(h[4:].max()) == 0.0                  # keys after it were never fixated
    plain, habituated = scores.softmax(-1)[0, 0, -1, 3], out.softmax(-1)[0, 0, -1, 3]
    assert habituated < plain


def test_tensor_api_and_validation():
    pipe = InferenceHookPipeline(InferenceHookConfig(enable_hebbian=True, layers=[2]))
    scores = torch.randn(1, 2, 4, 4)
    assert pipe.apply_pre_attention(scores, 0) is scores             # layer 0 is not hooked
    with pytest.raises(ValueError, match="query and key"):
        pipe.apply_pre_attention(scores, 2)
    with pytest.raises(ValueError, match="attention_logits"):
        pipe.apply_pre_attention(torch.randn(2, 4, 4), 2)
    with pytest.raises(ValueError, match="more queries"):
        pipe.apply_pre_attention(torch.randn(1, 2, 5, 4), 2)
    heads = torch.randn(1, 4, 2, 8)
    assert pipe.apply_output_aggregation(heads, scores.softmax(-1), 2) is heads   # voting disabled
    with pytest.raises(ValueError, match="layers"):
        InferenceHookConfig(layers=[])
    with pytest.raises(ValueError, match="sink_tokens"):
        InferenceHookConfig(sink_tokens=-1)
    with pytest.raises(ValueError, match="voting_temperature"):
        InferenceHookConfig(voting_temperature=0)
    with pytest.raises(ValueError, match="enable_voting"):
        InferenceHookConfig(enable_voting=1)
    with pytest.raises(ValueError, match="habituation_rate"):
        InferenceHookConfig(habituation_rate=-1.0)
    with pytest.raises(TypeError, match="config"):
        InferenceHookPipeline({"enable_hebbian": True})


def test_voting_reuses_the_recorded_entropy():
    """apply_post_attention returns the heads' entropy; handing it to apply_output_aggregation gives the weights
    it would compute from the probabilities itself (the attention function computes the entropy once)."""
    pipe = InferenceHookPipeline(InferenceHookConfig(enable_voting=True, voting_temperature=0.5, layers=[1]))
    probs = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0)).softmax(-1)
    heads = torch.randn(2, 5, 3, 4)
    entropy = pipe.apply_post_attention(probs, layer_idx=1)
    from_probs = pipe.apply_output_aggregation(heads, probs, 1)
    torch.testing.assert_close(pipe.apply_output_aggregation(heads, probs, 1, entropy=entropy), from_probs)
    assert not torch.allclose(from_probs, heads)                       # the voting does re-weight the heads
    with pytest.raises(ValueError, match="entropy"):
        pipe.apply_output_aggregation(heads, probs, 1, entropy=entropy[:, :2])


def test_attach_errors_leave_the_model_untouched():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="layers"):
        InferenceHookPipeline(InferenceHookConfig(enable_voting=True, layers=[5])).attach(model)
    assert model.config._attn_implementation == "eager"
    with pytest.raises(TypeError, match="model"):
        InferenceHookPipeline().attach(torch.nn.Linear(2, 2))
    pipe = InferenceHookPipeline().attach(model)
    with pytest.raises(RuntimeError, match="already attached"):
        pipe.attach(model)
    pipe.detach()
    with pytest.raises(RuntimeError, match="not attached"):
        pipe.detach()
    assert model.config._attn_implementation == "eager"


def test_smollm2_neutral_in_float64_and_habituates_a_repeated_sentence(smollm2):
    """Every hook enabled at its neutral setting runs the pipeline's eager path on all 30 layers."""
    model, tok = smollm2
    ids = tok("The cat sat on the mat. " * 6, return_tensors="pt").input_ids
    model = model.double()
    try:
        with torch.no_grad():
            ref = model(ids).logits
            with InferenceHookPipeline(InferenceHookConfig(**ALL_ON, **NEUTRAL)).attached(model):
                hooked = model(ids).logits
    finally:
        model.float()
    assert (hooked - ref).abs().max() <= 1e-5
    pipe = InferenceHookPipeline(InferenceHookConfig(enable_habituation=True))
    with torch.no_grad(), pipe.attached(model):
        model(ids)
    hab = torch.stack([pipe.habituation_map(layer)[0] for layer in range(model.config.num_hidden_layers)])
    assert float(hab[..., 0].abs().max()) == 0.0                       # the sink key is shielded
    assert float(hab[..., 1:].max()) > 0.1                              # repeated keys are suppressed


@pytest.fixture(scope="module")
def smollm2():
    from cortexlab.models import load_base_model

    return load_base_model()


def test_hebbian_hook_uses_unit_queries_and_keys_unless_told_otherwise():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 6, 8, generator=gen), torch.randn(1, 1, 6, 8, generator=gen)
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 8 ** 0.5).masked_fill(
        torch.ones(6, 6, dtype=torch.bool).triu(1), -math.inf)

    def biased(normalize, scale):
        pipe = InferenceHookPipeline(InferenceHookConfig(enable_hebbian=True, hebbian_learning_rate=0.5,
                                                         hebbian_normalize=normalize))
        return (pipe.apply_pre_attention(scores, 0, query=q * scale, key=k * scale) - scores).nan_to_num(0.0)

    torch.testing.assert_close(biased(True, 1.0), biased(True, 10.0))          # only directions count
    assert biased(False, 10.0).abs().max() > 100 * biased(False, 1.0).abs().max()
    assert biased(True, 1.0).abs().max() > 0
