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
