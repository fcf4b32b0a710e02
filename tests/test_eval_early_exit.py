"""cortexlab.eval.early_exit: the per-token trade-off is consistent with the exit heads, and exits really skip."""
import pytest
import torch

from cortexlab.eval.early_exit import exit_threshold, exit_tradeoff, exit_wall_clock
from cortexlab.neuro import create_neurollama

TINY = dict(num_layers=4, hidden_dim=64, num_heads=4, num_kv_heads=2, ffn_dim=128, vocab_size=97, max_seq_len=64,
            enable_early_exit=True, exit_layers=(1, 2, 3))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_neurollama("small", **TINY)


def test_tradeoff_limits_and_monotonicity(model):
    windows = torch.randint(0, 97, (6, 17), generator=torch.Generator().manual_seed(1))
    result = exit_tradeoff(model, windows, thresholds=(1e-6, 0.5, 1.0), batch_size=4)
    low, mid, high = result["by_threshold"]
    assert result["tokens"] == 6 * 16
    assert low["layers_fraction"] == pytest.approx(1 / 4) and low["exit_share"]["1"] == 1.0    # everyone leaves at 1
    assert high["layers_fraction"] == pytest.approx(1.0) and high["loss_increase"] == pytest.approx(0.0, abs=1e-6)
    assert high["agreement"] == 1.0
    assert low["layers_fraction"] <= mid["layers_fraction"] <= high["layers_fraction"]
    assert sum(mid["exit_share"].values()) == pytest.approx(1.0)
    # the loss at tau ~ 0 is the first exit head's own loss
    x = windows[:, :-1]
    out = model(x, labels=x, output_hidden_states=True)
    z = model.mechanisms.early_exit.exit_logits(out["hidden_states"][1], 1)
    ce = torch.nn.functional.cross_entropy(z.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert low["loss"] == pytest.approx(ce, abs=1e-4)


def test_wall_clock_runs_fewer_layers_and_restores_the_threshold(model):
    with torch.no_grad():
        model.lm_head.weight.mul_(200.0)        # peaked heads: the exits (sharing lm_head) become confident
    tau = model.mechanisms.exit_controller.threshold
    windows = torch.randint(0, 97, (3, 9))
    result = exit_wall_clock(model, windows, thresholds=(0.1,), repeats=1)
    assert result["mean_exit_layer"]["0.1"] == 1 and result["mean_exit_layer"]["full"] == 4
    assert model.mechanisms.exit_controller.threshold == tau
    with pytest.raises(ValueError, match="tau"):
        with exit_threshold(model, 2.0):
            pass
    with pytest.raises(ValueError, match="early exit"):
        exit_tradeoff(create_neurollama("small", **{**TINY, "enable_early_exit": False}), windows)


def test_exit_heads_train_with_the_backbone_frozen(model):
    from cortexlab.train.exits import train_exit_heads

    windows = torch.arange(97).repeat(4)[:4 * 33].view(4, 33) % 97       # a predictable sequence
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    heads = {n for n, _ in model.mechanisms.early_exit.named_parameters()}
    losses = train_exit_heads(model, windows, steps=40, batch_size=2, lr=3e-2, progress=False)
    assert losses[-1] < losses[0] - 0.2          # the heads learn (the shared random lm_head limits how far)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.split("early_exit.", 1)[-1] in heads for n in changed)    # only the heads moved
    assert all(p.requires_grad for p in model.parameters())                              # flags restored
    with pytest.raises(ValueError, match="windows"):
        train_exit_heads(model, torch.zeros(3, dtype=torch.long))


def test_adapt_threshold_raises_tau_after_wrong_exits(model):
    from cortexlab.eval.early_exit import adapt_threshold

    with torch.no_grad():
        model.lm_head.weight.mul_(200.0)            # confident heads
        for head in model.mechanisms.early_exit.heads.values():   # and early answers that disagree with the full model
            for p in head.parameters():
                if p.dim() == 2:
                    p.normal_(std=1.0)
    start = model.mechanisms.exit_controller.threshold
    result = adapt_threshold(model, torch.randint(0, 97, (12, 9), generator=torch.Generator().manual_seed(3)))
    assert len(result["threshold"]) == 12
    if result["error_rate"][-1] > result["target_error_rate"]:
        assert result["threshold"][-1] > start


def fake_trained_hf_heads(hf, exit_layers, seed=1):
    from cortexlab.neuro.exit_decoding import hf_exit_heads

    heads = hf_exit_heads(hf, exit_layers)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in heads.heads.values():
            head.adapter.weight.copy_(0.3 * torch.randn(head.adapter.weight.shape, generator=gen))
    return heads


def test_hf_tradeoff_matches_the_neurollama_copy_and_its_limits():
    from cortexlab.eval.early_exit import hf_exit_tradeoff
    from cortexlab.models import tiny_model
    from cortexlab.neuro import from_hf_llama

    hf = tiny_model("llama", num_hidden_layers=4)
    heads = fake_trained_hf_heads(hf, (1, 2, 3))
    windows = torch.randint(0, 256, (5, 13), generator=torch.Generator().manual_seed(2))
    result = hf_exit_tradeoff(hf, heads, windows, thresholds=(1e-6, 0.01, 1.0), batch_size=2)
    low, mid, high = result["by_threshold"]
    assert result["tokens"] == 5 * 12 and result["num_layers"] == 4
    assert low["layers_fraction"] == pytest.approx(1 / 4) and low["early_fraction"] == 1.0
    assert high["early_fraction"] == 0.0 and high["agreement"] == 1.0 and high["loss_increase"] == pytest.approx(0)
    x = windows[:, :-1]
    with torch.no_grad():
        z = heads.exit_logits(hf(x, output_hidden_states=True).hidden_states[1], 1)
    ce = torch.nn.functional.cross_entropy(z.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert low["loss"] == pytest.approx(ce, abs=1e-4)
    # the same heads on the NeuroLlama copy of the model give the same trade-off
    neuro = from_hf_llama(hf, enable_early_exit=True, exit_layers=(1, 2, 3), min_exit_layer=1)
    neuro.mechanisms.early_exit.load_state_dict(heads.state_dict())
    ref = exit_tradeoff(neuro, windows, thresholds=(1e-6, 0.01, 1.0), batch_size=2)
    for ours, theirs in zip(result["by_threshold"], ref["by_threshold"]):
        assert ours["layers_fraction"] == pytest.approx(theirs["layers_fraction"], abs=0.02)
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-3)
    with pytest.raises(ValueError, match="heads"):
        hf_exit_tradeoff(hf, None, windows)
    with pytest.raises(ValueError, match="windows"):
        hf_exit_tradeoff(hf, heads, windows[0])


def test_decode_wall_clock_reports_exits_speed_and_agreement():
    from cortexlab.eval.early_exit import decode_token_macs, exit_decode_wall_clock
    from cortexlab.models import tiny_model

    hf = tiny_model("llama", num_hidden_layers=4)
    heads = fake_trained_hf_heads(hf, (2,))
    prompts = [torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    result = exit_decode_wall_clock(hf, heads, prompts, thresholds=(1e-6, 1.0), max_new_tokens=5, repeats=1)
    v = result["variants"]
    assert result["prompts"] == 2 and result["new_tokens"] == 5 and result["torch_threads"] == torch.get_num_threads()
    assert v["hf_generate"]["token_agreement_with_full"] == 1.0       # the full-depth loop reproduces generate
    assert v["full"]["speedup"] == 1.0 and v["full"]["mean_exit_layer"] == 4 and v["full"]["token_agreement"] == 1.0
    assert v["1e-06"]["mean_exit_layer"] == 2 and v["1e-06"]["exit_share"] == {"2": 1.0}   # every decoded token exits
    assert v["1.0"]["mean_exit_layer"] == 4 and v["1.0"]["matching_prefix"] == 1.0
    assert 0.0 <= v["1e-06"]["token_agreement"] <= 1.0 and v["1e-06"]["decode_tokens_per_s"] > 0
    assert v["1e-06"]["speedup"] == pytest.approx(v["full"]["decode_seconds"] / v["1e-06"]["decode_seconds"], rel=1e-3)
    assert v["full"]["cpu_speedup"] == 1.0 and v["1e-06"]["cpu_speedup"] == pytest.approx(
        v["full"]["decode_cpu_seconds"] / v["1e-06"]["decode_cpu_seconds"], rel=1e-3)
    # weight MACs per token (tiny llama: 36864 per layer, lm_head 16384, adapter 4096, K+V 4096 per skipped layer)
    layer, lm_head, adapter, kv = 36864, 16384, 4096, 4096
    assert decode_token_macs(hf, heads, 4, exits=False) == 4 * layer + lm_head
    assert decode_token_macs(hf, heads, 4) == 4 * layer + adapter + 2 * lm_head
    assert decode_token_macs(hf, heads, 2) == 2 * layer + adapter + lm_head + 2 * kv
    assert v["1e-06"]["macs_ratio"] == pytest.approx((2 * layer + adapter + lm_head + 2 * kv) / (4 * layer + lm_head),
                                                     abs=1e-4)
    assert v["full"]["macs_ratio"] == 1.0 and v["1.0"]["macs_ratio"] == 1.0       # tau >= 1 never asks the heads
    with pytest.raises(ValueError, match="repeats"):
        exit_decode_wall_clock(hf, heads, prompts, repeats=0)


def test_hf_exit_heads_train_with_the_model_frozen():
    from cortexlab.models import tiny_model
    from cortexlab.neuro.exit_decoding import hf_exit_heads
    from cortexlab.train.smollm2_exits import train_hf_exit_heads

    hf = tiny_model("llama", num_hidden_layers=4)
    heads = hf_exit_heads(hf, (1, 3))
    windows = torch.arange(256).repeat(4)[:6 * 33].view(6, 33) % 256          # a predictable sequence
    before = {n: p.detach().clone() for n, p in hf.named_parameters()}
    flags = {n: p.requires_grad for n, p in hf.named_parameters()}
    losses = train_hf_exit_heads(hf, heads, windows, steps=30, batch_size=2, lr=3e-2, progress=False)
    assert len(losses) == 30 and losses[-1] < losses[0] - 0.2
    assert all(torch.equal(p, before[n]) for n, p in hf.named_parameters())     # the model did not move
    assert {n: p.requires_grad for n, p in hf.named_parameters()} == flags
    assert any(p.abs().sum() > 0 for p in heads.parameters())                    # the adapters did
    with pytest.raises(ValueError, match="batch_size"):
        train_hf_exit_heads(hf, heads, windows[:1], steps=1, batch_size=2, lr=1e-3)


def random_classifier(exit_layers, hidden_dim=64, seed=5, scale=0.4):
    from cortexlab.neuro.exit_classifier import ExitClassifier

    classifier = ExitClassifier(exit_layers, hidden_dim)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        classifier.weight.copy_(scale * torch.randn(classifier.weight.shape, generator=gen))
    return classifier


def test_hf_tradeoff_with_the_classifier_applies_its_rule_per_token():
    from cortexlab.eval.early_exit import hf_exit_tradeoff
    from cortexlab.models import tiny_model

    hf = tiny_model("llama", num_hidden_layers=4)
    heads = fake_trained_hf_heads(hf, (1, 3))
    classifier = random_classifier((1, 3))
    windows = torch.randint(0, 256, (4, 11), generator=torch.Generator().manual_seed(2))
    result = hf_exit_tradeoff(hf, heads, windows, thresholds=(0.4, 0.6), classifier=classifier, batch_size=3)
    assert result["confidence"] == "classifier"
    with torch.no_grad():
        out = hf(windows[:, :-1], output_hidden_states=True)
        final = out.logits.argmax(-1).flatten()
        probe = {layer: classifier(out.hidden_states[layer], layer).flatten() for layer in (1, 3)}
        token = {layer: heads.exit_logits(out.hidden_states[layer], layer).argmax(-1).flatten() for layer in (1, 3)}
    token[4] = final
    for tau, row in zip((0.4, 0.6), result["by_threshold"]):
        depth = torch.where(probe[1] >= tau, 1, torch.where(probe[3] >= tau, 3, 4))       # the reference rule
        assert 0 < row["early_fraction"] < 1
        assert row["early_fraction"] == pytest.approx((depth < 4).float().mean().item(), abs=1e-5)
        assert row["layers_fraction"] == pytest.approx(depth.float().mean().item() / 4, abs=1e-5)
        chosen = torch.stack([token[int(d)][i] for i, d in enumerate(depth)])
        assert row["agreement"] == pytest.approx((chosen == final).float().mean().item(), abs=1e-5)
    with pytest.raises(ValueError, match="classifier"):
        hf_exit_tradeoff(hf, heads, windows, classifier=random_classifier((1, 2)))


def test_exit_classifier_learns_the_consistency_labels():
    from cortexlab.eval.early_exit import exit_classifier_accuracy
    from cortexlab.models import tiny_model
    from cortexlab.neuro.exit_classifier import ExitClassifier, consistency_examples
    from cortexlab.neuro.exit_decoding import hf_exit_heads
    from cortexlab.train.smollm2_exits import train_exit_classifier

    hf = tiny_model("llama", num_hidden_layers=4)
    heads = hf_exit_heads(hf, (1, 2, 3))                           # the logit lens
    gen = torch.Generator().manual_seed(0)
    cycle = torch.randperm(256, generator=gen)[:8]                 # text from a cycle of 8 tokens: learnable labels
    windows = cycle[(torch.randint(0, 8, (24,), generator=gen)[:, None] + torch.arange(33)) % 8]
    train, held = consistency_examples(hf, heads, windows[:16]), consistency_examples(hf, heads, windows[16:])
    classifier = ExitClassifier((1, 2, 3), 64)
    before = exit_classifier_accuracy(classifier, held)
    losses = train_exit_classifier(classifier, train, steps=200, lr=0.05)
    after = exit_classifier_accuracy(classifier, held)
    assert losses[-1] < losses[0]
    for layer, row in after.items():
        assert row["tokens"] == 8 * 32 and row["accuracy"] > row["majority_rate"]        # held-out windows
        assert before[layer]["accuracy"] == before[layer]["positive_rate"]              # c = 1/2: all "exit"
        assert row["bce"] < before[layer]["bce"]
    shrunk = ExitClassifier((1, 2, 3), 64)
    train_exit_classifier(shrunk, train, steps=200, lr=0.05, l2=0.1)          # the penalty keeps w small
    assert shrunk.weight.norm() < 0.5 * classifier.weight.norm()
    with pytest.raises(ValueError, match="examples"):
        train_exit_classifier(classifier, {1: train[1]}, steps=1, lr=0.1)
    with pytest.raises(ValueError, match="l2"):
        train_exit_classifier(classifier, train, steps=1, lr=0.1, l2=-1.0)
    with pytest.raises(ValueError, match="steps"):
        train_exit_classifier(classifier, train, steps=0, lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        train_exit_classifier(classifier, train, steps=1, lr=2.0)
    with pytest.raises(ValueError, match="classifier"):
        train_exit_classifier(heads, train, steps=1, lr=0.1)
    with pytest.raises(ValueError, match="examples"):
        exit_classifier_accuracy(classifier, {1: (train[1][0], train[1][1].float())})


def test_decode_wall_clock_with_the_classifier_counts_one_head_per_token():
    from cortexlab.eval.early_exit import decode_token_macs, exit_decode_wall_clock
    from cortexlab.models import tiny_model

    hf = tiny_model("llama", num_hidden_layers=4)
    heads = fake_trained_hf_heads(hf, (1, 2))
    classifier = random_classifier((1, 2))
    prompts = [torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    result = exit_decode_wall_clock(hf, heads, prompts, thresholds=(1e-6, 0.5), classifier=classifier,
                                    max_new_tokens=5, repeats=1)
    v = result["variants"]
    assert {"full", "1e-06", "0.5", "classifier@1e-06", "classifier@0.5"} <= set(v)
    assert v["classifier@1e-06"]["exit_share"] == {"1": 1.0}                # c_1 > 0 always: every token leaves at 1
    layer, lm_head, adapter, kv, d = 36864, 16384, 4096, 4096, 64
    assert decode_token_macs(hf, heads, 1, classifier=classifier) == layer + d + adapter + lm_head + 3 * kv
    assert decode_token_macs(hf, heads, 2, classifier=classifier) == 2 * layer + 2 * d + adapter + lm_head + 2 * kv
    assert decode_token_macs(hf, heads, 4, classifier=classifier) == 4 * layer + 2 * d + lm_head
    assert decode_token_macs(hf, heads, 4) == 4 * layer + 2 * (adapter + lm_head) + lm_head    # max_prob: every head
    assert v["classifier@1e-06"]["macs_ratio"] == pytest.approx(
        (layer + d + adapter + lm_head + 3 * kv) / (4 * layer + lm_head), abs=1e-4)
    with pytest.raises(ValueError, match="classifier"):
        exit_decode_wall_clock(hf, heads, prompts, classifier=random_classifier((1, 3)))
