"""Early-exit greedy decoding with a KV cache: full-depth path == HF greedy, exits really skip, CALM propagation."""
import pytest
import torch
from transformers import GenerationConfig
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from cortexlab.models import tiny_model
from cortexlab.neuro import from_hf_llama
from cortexlab.neuro.exit_classifier import ExitClassifier, consistency_examples
from cortexlab.neuro.exit_decoding import (
    generate_with_exits,
    hf_exit_heads,
    load_exit_classifier,
    load_exit_heads,
    save_exit_heads,
)

PROMPT = 7


def fake_trained(model, exit_layers=(2,), seed=1):
    """Exit heads with non-zero adapters (as after training): each head differs from the logit lens."""
    heads = hf_exit_heads(model, exit_layers)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in heads.heads.values():
            head.adapter.weight.copy_(0.3 * torch.randn(head.adapter.weight.shape, generator=gen))
    return heads


def random_classifier(exit_layers, hidden_dim=64, seed=5, scale=1.0):
    """A probe with random weights: c_l(h) spreads over (0, 1), so exits depend on the threshold."""
    classifier = ExitClassifier(exit_layers, hidden_dim)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        classifier.weight.copy_(scale * torch.randn(classifier.weight.shape, generator=gen))
    return classifier


def prompt(seed=0, length=PROMPT):
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed))


def hf_greedy(model, ids, n):
    config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return model.generate(ids, generation_config=config)[:, ids.shape[1]:]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_without_exits_equals_hf_greedy_generate(arch):
    model = tiny_model(arch, num_hidden_layers=4)
    heads = fake_trained(model, (1, 2, 3))
    for seed in range(2):
        ids = prompt(seed)
        expected = hf_greedy(model, ids, 20)
        for threshold in (None, 1.0, 5.0):          # tau >= 1: no exit, the heads are never asked
            out = generate_with_exits(model, heads, ids, 20, threshold)
            assert torch.equal(out["tokens"], expected)
            assert out["exit_layers"] == [4] * 20 and out["confidence"] == [None] * 20
        assert torch.equal(generate_with_exits(model, None, ids, 20)["tokens"], expected)


def test_exit_skips_later_layers_and_propagates_their_kv():
    model = tiny_model("llama", num_hidden_layers=4)
    heads = fake_trained(model, (2,))
    calls = [0] * 4
    hooks = [layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(model.model.layers)]
    ids, n = prompt(), 5
    try:
        out = generate_with_exits(model, heads, ids, n, threshold=1e-6, return_logits=True)   # every token exits
    finally:
        for hook in hooks:
            hook.remove()
    assert out["exit_layers"] == [4] + [2] * (n - 1)        # the first token comes from the full-depth prefill
    assert 0 < out["prefill_cpu_seconds"] <= out["cpu_seconds"] and 0 < out["prefill_seconds"] <= out["seconds"]
    assert calls == [n, n, 1, 1]                            # layers 3 and 4 ran only in the prefill
    cache = out["cache"]
    assert all(layer.keys.shape[2] == PROMPT + n - 1 for layer in cache.layers)

    # the second token: decided by the head at layer 2 from the (exact, full-depth) prompt cache
    seq = torch.cat([ids, out["tokens"][:, :1]], dim=1)
    with torch.no_grad():
        full = model(seq, output_hidden_states=True, use_cache=True)
        h2 = full.hidden_states[2][:, -1:]
        head_logits = heads.exit_logits(h2, 2)[0, -1]
    assert torch.allclose(out["logits"][1], head_logits, atol=1e-5)
    assert out["tokens"][0, 1] == head_logits.argmax()
    assert out["confidence"][1] == pytest.approx(head_logits.softmax(-1).max().item(), abs=1e-6)
    assert not torch.allclose(head_logits, full.logits[0, -1], atol=1e-3)       # not the final layer's logits

    # layers 1-2 cached their own K/V at that position; layers 3-4 hold K/V propagated from h_2 (CALM)
    pos = PROMPT
    for j in (0, 1):
        assert torch.allclose(cache.layers[j].keys[:, :, pos], full.cache.layers[j].keys[:, :, pos], atol=1e-5)
    cos, sin = model.model.rotary_emb(h2, position_ids=torch.tensor([[pos]]))
    with torch.no_grad():
        for j in (2, 3):
            layer = model.model.layers[j]
            x = layer.input_layernorm(h2)
            k = layer.self_attn.k_proj(x).view(1, 1, -1, 16).transpose(1, 2)
            v = layer.self_attn.v_proj(x).view(1, 1, -1, 16).transpose(1, 2)
            k, _ = apply_rotary_pos_emb(k, k, cos, sin)
            assert torch.allclose(cache.layers[j].keys[:, :, pos:pos + 1], k, atol=1e-5)
            assert torch.allclose(cache.layers[j].values[:, :, pos:pos + 1], v, atol=1e-5)
            # layer 3's input is h_2 itself (propagation is exact there); layer 4 would have seen h_3
            assert torch.allclose(k, full.cache.layers[j].keys[:, :, pos:pos + 1], atol=1e-5) == (j == 2)


def test_exits_depend_on_the_threshold_and_match_the_engine_rule():
    model = tiny_model("llama", num_hidden_layers=4)
    heads = fake_trained(model, (1, 3))
    ids = prompt(2)
    out = generate_with_exits(model, heads, ids, 12, threshold=0.02)
    for depth, confidence in zip(out["exit_layers"][1:], out["confidence"][1:]):
        assert (depth == 4 and confidence is None) or (depth in (1, 3) and confidence >= 0.02)
    low = generate_with_exits(model, heads, ids, 12, threshold=1e-6)["exit_layers"]
    assert low[1:] == [1] * 11 and sum(low) <= sum(out["exit_layers"])
    stop = int(out["tokens"][0, 3])
    early = generate_with_exits(model, heads, ids, 12, threshold=0.02, eos_token_id=stop)
    assert early["tokens"].shape[1] <= 4 and early["tokens"][0, -1] == stop


def test_heads_match_the_neurollama_copy_and_save_load(tmp_path):
    model = tiny_model("llama", num_hidden_layers=4)
    neuro = from_hf_llama(model, enable_early_exit=True, exit_layers=(1, 3), min_exit_layer=1)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in neuro.mechanisms.early_exit.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    heads = hf_exit_heads(model, (1, 3))
    heads.load_state_dict(neuro.mechanisms.early_exit.state_dict(), strict=True)
    ids = prompt(4, 9)
    with torch.no_grad():
        ours = neuro(ids, labels=ids, output_hidden_states=True)["hidden_states"]
        theirs = model(ids, output_hidden_states=True).hidden_states
        for layer in (1, 3):
            expected = neuro.mechanisms.early_exit.exit_logits(ours[layer], layer)
            assert torch.allclose(heads.exit_logits(theirs[layer], layer), expected, atol=1e-4)

    save_exit_heads(heads, tmp_path / "exits", card={"steps": 7})
    loaded, card = load_exit_heads(model, tmp_path / "exits")
    assert card["steps"] == 7 and card["exit_layers"] == [1, 3] and card["num_layers"] == 4
    for name, tensor in heads.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    with pytest.raises(ValueError, match="model"):
        load_exit_heads(tiny_model("llama", num_hidden_layers=2), tmp_path / "exits")
    with pytest.raises(ValueError, match="path"):
        load_exit_heads(model, tmp_path / "missing")


def test_bad_inputs_raise_naming_the_argument():
    model = tiny_model("llama", num_hidden_layers=4)
    heads = fake_trained(model, (2,))
    ids = prompt()
    bad = [
        (dict(input_ids=ids.float()), "input_ids"),
        (dict(input_ids=ids[0]), "input_ids"),
        (dict(input_ids=ids.repeat(2, 1)), "input_ids"),
        (dict(input_ids=ids[:, :0]), "input_ids"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=True), "max_new_tokens"),
        (dict(threshold=0.0), "threshold"),
        (dict(threshold=-0.5), "threshold"),
        (dict(threshold=float("nan")), "threshold"),
        (dict(threshold="0.5"), "threshold"),
        (dict(heads=None, threshold=0.5), "heads"),
        (dict(heads=torch.nn.Linear(2, 2)), "heads"),
        (dict(heads=hf_exit_heads(tiny_model("llama", num_hidden_layers=8), (6,))), "heads"),
        (dict(model=torch.nn.Linear(2, 2)), "model"),
        (dict(eos_token_id=1.5), "eos_token_id"),
    ]
    for change, name in bad:
        kwargs = dict(model=model, heads=heads, input_ids=ids, max_new_tokens=3, threshold=0.5, **{})
        kwargs.update(change)
        with pytest.raises(ValueError, match=name):
            generate_with_exits(**kwargs)
    with pytest.raises(ValueError, match="exit_layers"):
        hf_exit_heads(model, (4,))


def test_exit_classifier_is_a_logistic_probe_on_the_normalised_state():
    classifier = random_classifier((1, 3), hidden_dim=8)
    with torch.no_grad():
        classifier.bias.copy_(torch.tensor([0.3, -0.2]))
    h = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    for index, layer in enumerate((1, 3)):
        n = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
        expected = torch.sigmoid(n @ classifier.weight[index] + classifier.bias[index])
        assert torch.allclose(classifier(h, layer), expected, atol=1e-6)
        assert torch.allclose(classifier(7.0 * h, layer), expected, atol=1e-5)        # invariant to the scale of h
    assert torch.equal(ExitClassifier((2,), 8)(h, 2), torch.full((2, 5), 0.5))      # zero init: c = 1/2
    for args, name in [(((), 8), "exit_layers"), (((3, 1), 8), "exit_layers"), (((0,), 8), "exit_layers"),
                       (((1,), 0), "hidden_dim"), (((1,), 8, 0.0), "eps")]:
        with pytest.raises(ValueError, match=name):
            ExitClassifier(*args)
    with pytest.raises(ValueError, match="layer"):
        classifier(h, 2)
    with pytest.raises(ValueError, match="hidden"):
        classifier(h[..., :4], 1)


def test_consistency_examples_label_where_the_exit_head_agrees_with_the_model():
    model = tiny_model("llama", num_hidden_layers=4)
    heads = fake_trained(model, (1, 3))
    windows = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(1))
    examples = consistency_examples(model, heads, windows, batch_size=2)
    with torch.no_grad():
        out = model(windows[:, :-1], output_hidden_states=True)
        for layer in (1, 3):
            hidden, labels = examples[layer]
            h = out.hidden_states[layer]
            assert torch.allclose(hidden, h.flatten(0, 1), atol=1e-6) and labels.dtype == torch.bool
            assert torch.equal(labels, (heads.exit_logits(h, layer).argmax(-1) == out.logits.argmax(-1)).flatten())
    with pytest.raises(ValueError, match="windows"):
        consistency_examples(model, heads, windows[0])
    with pytest.raises(ValueError, match="heads"):
        consistency_examples(model, None, windows)
    with pytest.raises(ValueError, match="batch_size"):
        consistency_examples(model, heads, windows, batch_size=0)


def reference_depth(classifier, hidden_states, threshold, num_layers):
    """The exit rule on one position's hidden states: the first exit layer with c_l(h_l) >= tau, else L."""
    for layer in classifier.exit_layers:
        if classifier(hidden_states[layer][:, -1], layer).item() >= threshold:
            return layer
    return num_layers


def test_classifier_exits_follow_the_rule_on_full_forward_states():
    model = tiny_model("llama", num_hidden_layers=4)
    heads = fake_trained(model, (1, 3))
    classifier = random_classifier((1, 3), scale=0.4)
    seen = {"stay": 0, "exit": 0}
    for seed in range(4):
        ids = prompt(seed)
        for threshold in (0.3, 0.5, 0.7):
            out = generate_with_exits(model, heads, ids, 10, threshold, classifier=classifier, return_logits=True)
            # every step up to the first early exit ran on exact (full-depth) caches: a full forward of the same
            # tokens gives the states the loop saw, so the reference rule must give the same decision
            for step in range(1, len(out["exit_layers"])):
                seq = torch.cat([ids, out["tokens"][:, :step]], dim=1)
                with torch.no_grad():
                    states = model(seq, output_hidden_states=True).hidden_states
                depth = out["exit_layers"][step]
                assert depth == reference_depth(classifier, states, threshold, 4)
                if depth == 4:
                    seen["stay"] += 1
                    assert out["confidence"][step] is None
                    continue
                seen["exit"] += 1
                h = states[depth][:, -1:]
                assert out["confidence"][step] == pytest.approx(classifier(h, depth).item(), abs=1e-6)
                assert torch.allclose(out["logits"][step], heads.exit_logits(h, depth)[0, -1], atol=1e-5)
                assert out["tokens"][0, step] == out["logits"][step].argmax()
                break
    assert seen["stay"] > 0 and seen["exit"] > 0                 # both decisions were checked


def test_classifier_runs_the_output_head_once_per_token():
    model = tiny_model("llama", num_hidden_layers=4)
    heads = fake_trained(model, (1, 2, 3))
    classifier = random_classifier((1, 2, 3), scale=0.4)
    calls = [0]
    hook = model.lm_head.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    ids, n = prompt(3), 12
    try:
        probe = generate_with_exits(model, heads, ids, n, 0.5, classifier=classifier)
        probe_calls, calls[0] = calls[0], 0
        own = generate_with_exits(model, heads, ids, n, 0.5)                # the heads' max-prob rule
        own_calls, calls[0] = calls[0], 0
        off = generate_with_exits(model, heads, ids, n, 1.0, classifier=classifier)     # tau >= 1: no exit
        assert calls[0] == n and off["exit_layers"] == [4] * n
        assert torch.equal(off["tokens"], generate_with_exits(model, None, ids, n)["tokens"])
    finally:
        hook.remove()
    assert probe_calls == n                                                  # one output head per token
    assert set(probe["exit_layers"][1:]) - {4} and 4 in probe["exit_layers"][1:]      # some exit, some do not
    checks = sum(sum(1 for layer in (1, 2, 3) if layer <= depth) for depth in own["exit_layers"][1:])
    assert own_calls == 1 + checks + sum(depth == 4 for depth in own["exit_layers"][1:]) > n   # a head per check


def test_classifier_saves_and_loads_with_the_heads(tmp_path):
    model = tiny_model("llama", num_hidden_layers=4)
    heads = fake_trained(model, (1, 3))
    classifier = random_classifier((1, 3))
    save_exit_heads(heads, tmp_path / "exits", card={"steps": 2}, classifier=classifier)
    loaded = load_exit_classifier(tmp_path / "exits")
    _, card = load_exit_heads(model, tmp_path / "exits")
    assert card["classifier"]["exit_layers"] == [1, 3] and card["steps"] == 2
    assert loaded.exit_layers == (1, 3) and all(torch.equal(loaded.state_dict()[k], v)
                                                for k, v in classifier.state_dict().items())
    save_exit_heads(heads, tmp_path / "heads_only")
    with pytest.raises(ValueError, match="path"):
        load_exit_classifier(tmp_path / "heads_only")
    with pytest.raises(ValueError, match="classifier"):
        save_exit_heads(heads, tmp_path / "bad", classifier=random_classifier((1, 2)))


def test_classifier_bad_inputs_raise_naming_the_argument():
    model = tiny_model("llama", num_hidden_layers=4)
    heads = fake_trained(model, (2,))
    for classifier, heads_arg in [(random_classifier((1,)), heads), (random_classifier((2,), hidden_dim=32), heads),
                                  (torch.nn.Linear(2, 2), heads), (random_classifier((2,)), None)]:
        with pytest.raises(ValueError, match="classifier"):
            generate_with_exits(model, heads_arg, prompt(), 3, 0.5 if heads_arg is not None else None,
                                classifier=classifier)
