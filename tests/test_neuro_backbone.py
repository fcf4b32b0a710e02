"""NeuroLlama backbone: equals transformers' LlamaForCausalLM with the same weights, presets on meta, training."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from cortexlab.neuro.backbone import (
    NeuroLlamaModel,
    apply_rope,
    config_from_hf_llama,
    create_neurollama,
    from_hf_llama,
    load_llama_state_dict,
    rope_cos_sin,
)
from cortexlab.neuro.config import NeuroLlamaConfig

VOCAB = 97


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_hf(seed=0, tie=False, **overrides):
    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=160, vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                      tie_word_embeddings=tie, attn_implementation="eager", **overrides)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def tiny_neuro(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = NeuroLlamaConfig(num_layers=2, hidden_dim=64, num_heads=4, num_kv_heads=2, ffn_dim=160, vocab_size=VOCAB,
                           max_seq_len=64, **overrides)
    return NeuroLlamaModel(cfg)


def ids(b=3, t=12, seed=1):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a - b).abs().max().item()


@torch.no_grad()
def test_logits_and_loss_equal_transformers_llama():
    hf = tiny_hf()
    model = from_hf_llama(hf).eval()
    x = ids()
    labels = x.clone()
    labels[0, :4] = -100
    ref, out = hf(input_ids=x, labels=labels), model(x, labels=labels)
    assert out["logits"].shape == (3, 12, VOCAB)
    assert max_diff(out["logits"], ref.logits) <= 1e-5
    assert abs(out["loss"].item() - ref.loss.item()) <= 1e-6
    assert (out["exit_layer"], out["system_type"], out["surprises"]) == (2, "system2", [])


@torch.no_grad()
def test_padding_mask_equals_transformers_on_real_tokens():
    hf = tiny_hf(seed=3)
    model = from_hf_llama(hf).eval()
    x = ids(b=4, t=10)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    mask[3, 1:9:2] = 0  # holes
    out, ref = model(x, attention_mask=mask)["logits"], hf(input_ids=x, attention_mask=mask).logits
    real = mask.bool()
    assert max_diff(out[real], ref[real]) <= 1e-5
    assert torch.isfinite(out).all()  # padded queries see themselves: no NaN rows
    # left padding with positions counted from the first real token, as generate() does
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(x, attention_mask=mask, position_ids=pos)["logits"]
    ref = hf(input_ids=x, attention_mask=mask, position_ids=pos).logits
    assert max_diff(out[real], ref[real]) <= 1e-5
    # padding keys are invisible: changing a padded token leaves the real positions unchanged
    y = x.clone()
    y[1, 8] = (y[1, 8] + 1) % VOCAB
    y[2, 0] = (y[2, 0] + 1) % VOCAB
    a, b = model(x, attention_mask=mask)["logits"], model(y, attention_mask=mask)["logits"]
    assert max_diff(a[real], b[real]) == 0.0


@torch.no_grad()
def test_tied_embeddings_load_and_match():
    hf = tiny_hf(seed=5, tie=True)
    model = from_hf_llama(hf).eval()
    assert model.config.tie_embeddings and model.lm_head.weight is model.embed_tokens.weight
    x = ids(seed=2)
    assert max_diff(model(x)["logits"], hf(input_ids=x).logits) <= 1e-5
    assert model.num_parameters() == sum(p.numel() for p in hf.parameters())


@pytest.mark.slow
@pytest.mark.skipif(not __import__("cortexlab.models", fromlist=["cache_dir"]).cache_dir()
                    .joinpath("smollm2-135m-instruct", "model.safetensors").is_file(),
                    reason="converted SmolLM2 not in the cortexlab cache")
@torch.no_grad()
def test_real_smollm2_weights_give_the_same_logits():
    from cortexlab.models import cache_dir

    hf = AutoModelForCausalLM.from_pretrained(cache_dir() / "smollm2-135m-instruct", dtype=torch.float32,
                                              attn_implementation="eager").eval()
    model = from_hf_llama(hf).eval()
    x = torch.tensor([[1, 504, 3458, 282, 4649, 314, 7042, 30, 2]])
    assert max_diff(model(x)["logits"], hf(input_ids=x).logits) <= 1e-5


def test_load_llama_state_dict_refuses_bad_dicts_before_copying():
    hf_sd = tiny_hf().state_dict()
    model = tiny_neuro(seed=9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    missing = {k: v for k, v in hf_sd.items() if "layers.1.mlp.up_proj" not in k}
    extra = {**hf_sd, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}
    wrong = {**hf_sd, "model.norm.weight": torch.ones(65)}
    for bad, word in ((missing, "missing.*layers.1.mlp.up_proj"), (extra, "unexpected.*q_norm"),
                      (wrong, "wrong shape.*norm.weight")):
        with pytest.raises(ValueError, match=word):
            load_llama_state_dict(model, bad)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unsupported_hf_configs_are_refused():
    hf_cfg = tiny_hf().config
    hf_cfg.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}
    with pytest.raises(ValueError, match="rope_type"):
        config_from_hf_llama(hf_cfg)
    hf_cfg = tiny_hf(attention_bias=True).config
    with pytest.raises(ValueError, match="attention_bias"):
        config_from_hf_llama(hf_cfg)
    hf_cfg.attention_bias, hf_cfg.model_type = False, "mistral"
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf_llama(hf_cfg)


@pytest.mark.parametrize("preset, kv_heads, expected", [
    ("8B", 8, 8_030_261_248),  # Llama-3.1-8B
    ("70B", 8, 70_553_706_496),  # Llama-3.1-70B
    ("405B", 16, None),  # the design's row; its count is checked against transformers with 16 KV heads
])
def test_presets_build_on_meta_with_llama_parameter_counts(preset, kv_heads, expected):
    model = create_neurollama(preset, device="meta")
    assert all(p.is_meta for p in model.parameters())
    c = model.config
    hf_cfg = LlamaConfig(num_hidden_layers=c.num_layers, hidden_size=c.hidden_dim, num_attention_heads=c.num_heads,
                         num_key_value_heads=kv_heads, intermediate_size=c.ffn_dim, vocab_size=c.vocab_size,
                         tie_word_embeddings=False)
    with torch.device("meta"):
        hf_count = sum(p.numel() for p in LlamaForCausalLM(hf_cfg).parameters())
    assert model.num_parameters() == hf_count
    if expected is not None:
        assert hf_count == expected
    assert model.num_parameters(exclude_embeddings=True) == hf_count - 2 * c.vocab_size * c.hidden_dim


def test_create_neurollama_arguments():
    model = create_neurollama("small", dtype=torch.bfloat16, vocab_size=300)
    assert model.config.vocab_size == 300 and model.lm_head.weight.dtype == torch.bfloat16
    assert model.num_parameters() == 3_033_344 - 2 * 256 * (512 - 300)
    out = model(ids(b=1, t=5) % 300)
    assert out["logits"].shape == (1, 5, 300)
    model = create_neurollama(NeuroLlamaConfig.from_preset("small"), hebbian_lr=0.5)
    assert model.config.hebbian_lr == 0.5
    with pytest.raises(TypeError, match="config"):
        create_neurollama(8)
    with pytest.raises(ValueError, match="valid presets"):
        create_neurollama("huge")


@torch.no_grad()
def test_causal_future_tokens_do_not_change_the_past():
    model = tiny_neuro().eval()
    x = ids(b=2, t=16)
    y = x.clone()
    y[:, 9:] = (y[:, 9:] + 5) % VOCAB
    a, b = model(x)["logits"], model(y)["logits"]
    assert max_diff(a[:, :9], b[:, :9]) == 0.0 and max_diff(a[:, 9:], b[:, 9:]) > 0


@torch.no_grad()
def test_hidden_states_and_rope_relative_positions():
    model = tiny_neuro().eval()
    out = model(ids(), output_hidden_states=True)
    hs = out["hidden_states"]
    assert len(hs) == 3 and all(h.shape == (3, 12, 64) for h in hs)
    assert torch.equal(model.lm_head(model.norm(hs[-1])), out["logits"])
    # RoPE: <R_m q, R_n k> depends only on m - n
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def dot(m, n):
        cm, sm = rope_cos_sin(torch.tensor([[m]]), 32, 500000.0, torch.float32)
        cn, sn = rope_cos_sin(torch.tensor([[n]]), 32, 500000.0, torch.float32)
        return (apply_rope(q, cm, sm) * apply_rope(k, cn, sn)).sum().item()

    assert dot(7, 3) == pytest.approx(dot(104, 100), abs=1e-5)
    assert dot(7, 3) != pytest.approx(dot(7, 6), abs=1e-3)


def test_tiny_model_trains_and_every_parameter_gets_a_gradient():
    model = tiny_neuro(seed=4)
    batch = ids(b=4, t=16, seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        loss = model(batch, labels=batch)["loss"]
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(float(VOCAB))).item(), abs=0.3)
    assert losses[-1] < 0.5 * losses[0]


def test_bad_inputs_raise_errors_naming_the_argument():
    model = tiny_neuro()
    x = ids(b=2, t=8)
    cases = [
        (TypeError, "input_ids", dict(input_ids=x.float())),
        (TypeError, "input_ids", dict(input_ids=x.tolist())),
        (ValueError, "input_ids", dict(input_ids=x[0])),
        (ValueError, "input_ids", dict(input_ids=x[:, :0])),
        (ValueError, "vocab_size", dict(input_ids=x + VOCAB)),
        (ValueError, "input_ids", dict(input_ids=x - 100)),
        (ValueError, "max_seq_len", dict(input_ids=torch.zeros(1, 65, dtype=torch.long))),
        (ValueError, "attention_mask", dict(input_ids=x, attention_mask=torch.ones(2, 7, dtype=torch.long))),
        (TypeError, "attention_mask", dict(input_ids=x, attention_mask=torch.ones(2, 8))),
        (ValueError, "labels", dict(input_ids=x, labels=x[:, 1:])),
        (ValueError, "position_ids", dict(input_ids=x, position_ids=torch.arange(8))),
    ]
    for error, word, kwargs in cases:
        with pytest.raises(error, match=word):
            model(**kwargs)
    with pytest.raises(TypeError, match="config"):
        NeuroLlamaModel({"num_layers": 2})
