"""The metacognitive controller: neutral at start, causal, decodes like the parallel pass, learns."""
import math

import pytest
import torch

from cortexlab.cortex import CortexWrapConfig, HybridCortexBlock
from cortexlab.cortex.controller import TokenEntropyCache, predictive_entropy, recall_error
from cortexlab.cortex.gdn import CortexBlock

D_MODEL = 32


def block_pair(seed=0, **cfg_kwargs):
    """Blocks with and without a controller sharing every other weight (all non-zero)."""
    torch.manual_seed(seed)
    with_ctrl = HybridCortexBlock(D_MODEL, CortexWrapConfig(rank_fast=16, num_heads=2, window_size=8, **cfg_kwargs))
    without = HybridCortexBlock(D_MODEL, CortexWrapConfig(rank_fast=16, num_heads=2, window_size=8,
                                                          controller=False, **cfg_kwargs))
    with torch.no_grad():
        for name, p in with_ctrl.named_parameters():
            if p.dim() > 1 and "controller" not in name:
                p.normal_(std=0.3)
    without.load_state_dict(with_ctrl.state_dict(), strict=False)
    return with_ctrl, without


def excite(controller, seed=1):
    """Give every controller weight a non-zero value, as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in controller.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)


def test_a_fresh_controller_changes_nothing():
    with_ctrl, without = block_pair()
    x, entropy = torch.randn(2, 40, D_MODEL), torch.rand(2, 40)
    y1, s1 = with_ctrl(x, entropy=entropy)
    y2, s2 = without(x)
    assert torch.allclose(y1, y2, atol=1e-6)
    assert torch.allclose(s1["S"], s2["S"], atol=1e-6)
    assert {"S_probe", "S_slow"} <= set(s1) and not {"S_probe", "S_slow"} & set(s2)


def test_recall_error_is_the_error_of_the_memory_before_each_write():
    block = CortexBlock(D_MODEL, CortexWrapConfig(rank_fast=8, num_heads=2, controller=False))
    B, T, H, D = 2, 19, 2, 8
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D), dim=-1)
    v, g, beta = torch.randn(B, T, H, D), -torch.rand(B, T, H) * 0.3, torch.rand(B, T, H)
    S0 = torch.randn(B, H, D, D) * 0.1
    e, S_final = recall_error(k, v, g, beta, S0, block.memory)
    S, expected = S0, []
    for t in range(T):  # the plain recurrence, reading before writing
        a = g[:, t].exp()[..., None, None]
        err = v[:, t] - torch.einsum("bhkv,bhk->bhv", a * S, k[:, t])
        expected.append(err.norm(dim=-1) / (v[:, t].norm(dim=-1) + 1e-6))
        S = a * S + beta[:, t][..., None, None] * k[:, t][..., :, None] * err[..., None, :]
    assert torch.allclose(e, torch.stack(expected, 1), atol=1e-5)
    assert torch.allclose(S_final, S, atol=1e-5)


def test_surprise_falls_when_the_same_associations_come_back():
    # orthonormal keys, no decay, beta = 0.5: the first pass finds an empty memory (surprise 1),
    # the second recalls half of each value (surprise 1 - beta = 0.5)
    memory = CortexBlock(D_MODEL, CortexWrapConfig(rank_fast=8, num_heads=1, controller=False)).memory
    n, D = 6, 8
    keys = torch.eye(D)[:n].reshape(1, n, 1, D)
    values = torch.randn(1, n, 1, D)
    k, v = keys.repeat(1, 2, 1, 1), values.repeat(1, 2, 1, 1)
    g, beta = torch.zeros(1, 2 * n, 1), torch.full((1, 2 * n, 1), 0.5)
    e, _ = recall_error(k, v, g, beta, None, memory)
    assert torch.allclose(e[0, :n, 0], torch.ones(n), atol=1e-5)
    assert torch.allclose(e[0, n:, 0], torch.full((n,), 0.5), atol=1e-5)


def test_excited_controller_decodes_like_the_parallel_pass_and_matters():
    with_ctrl, without = block_pair(seed=5)
    excite(with_ctrl.gdn.controller)
    x, entropy = torch.randn(2, 29, D_MODEL), torch.rand(2, 29)
    y, state = with_ctrl(x, entropy=entropy)
    steps, s = [], None
    for t in range(x.shape[1]):
        y_t, s = with_ctrl(x[:, t:t + 1], s, entropy=entropy[:, t:t + 1])
        steps.append(y_t)
    assert (torch.cat(steps, 1) - y).abs().max() <= 1e-4
    for key in ("S", "S_probe", "S_slow"):
        assert (s[key] - state[key]).abs().max() <= 1e-5, key
    assert (y - without(x)[0]).abs().max() > 0.1  # the controller changes what the memory does


def test_gradients_reach_every_controller_weight():
    block, _ = block_pair()
    excite(block.gdn.controller)
    y, _ = block(torch.randn(2, 20, D_MODEL), entropy=torch.rand(2, 20))
    (y * torch.randn_like(y)).sum().backward()
    for name, p in block.gdn.controller.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_padding_does_not_move_the_controller_states():
    block, _ = block_pair()
    excite(block.gdn.controller)
    x = torch.randn(2, 25, D_MODEL)
    mask = torch.ones(2, 25, dtype=torch.bool)
    mask[1, :6] = False
    entropy = torch.rand(2, 25)
    _, state = block(x, token_mask=mask, entropy=entropy)
    _, alone = block(x[1:, 6:], entropy=entropy[1:, 6:])
    for key in ("S", "S_probe", "S_slow"):
        assert (state[key][1] - alone[key][0]).abs().max() <= 1e-5, key


def test_predictive_entropy_is_normalised():
    V, d = 50, 8
    head = torch.nn.Linear(d, V, bias=False)
    with torch.no_grad():
        head.weight.zero_()
    flat = predictive_entropy(torch.randn(1, 3, d), torch.nn.Identity(), head, block_tokens=2)
    assert torch.allclose(flat, torch.ones(1, 3))  # uniform over the vocabulary: 1
    with torch.no_grad():
        head.weight.zero_()
        head.weight[7, 0] = 100.0
    x = torch.zeros(1, 2, d)
    x[..., 0] = 1.0
    assert predictive_entropy(x, torch.nn.Identity(), head).max() < 1e-3  # one sure token: ~0
    assert math.isclose(float(predictive_entropy(torch.randn(1, 1, d), torch.nn.Identity(),
                                                 torch.nn.Linear(d, V)).clamp(0, 1)), 0.5, abs_tol=0.5)


def test_predictive_entropy_of_repeated_rows_equals_the_direct_read_out():
    """Rows are deduplicated before the output head; the result is the row-by-row entropy, in place."""
    V, d = 40, 6
    torch.manual_seed(0)
    head, norm = torch.nn.Linear(d, V), torch.nn.LayerNorm(d)
    vocab = torch.randn(5, d)                              # like embeddings: few distinct rows, repeated
    x = vocab[torch.randint(0, 5, (2, 9))]
    with torch.no_grad():
        logp = head(norm(x)).log_softmax(-1)
        direct = -(logp.exp() * logp).sum(-1) / math.log(V)
    assert torch.allclose(predictive_entropy(x, norm, head, block_tokens=2), direct, atol=1e-6)


def test_token_entropy_cache_equals_the_direct_read_out_and_looks_up_seen_tokens(monkeypatch):
    """Looked-up entropies equal the computed ones; a seen token costs no output-head pass; a row that is
    not its token's embedding is computed; the table is dropped when the head changes."""
    from cortexlab.cortex import controller

    V, d = 30, 6
    torch.manual_seed(0)
    head, norm, embed = torch.nn.Linear(d, V), torch.nn.LayerNorm(d), torch.nn.Embedding(V, d)
    cache = TokenEntropyCache(embed, norm, head)
    computed = []

    def counting(residual, *args, **kwargs):
        computed.append(residual.shape[1])
        return predictive_entropy(residual, *args, **kwargs)

    monkeypatch.setattr(controller, "predictive_entropy", counting)
    with torch.no_grad():
        ids = torch.randint(0, V, (2, 17))
        first = cache(ids, embed(ids))
        assert torch.allclose(first, predictive_entropy(embed(ids), norm, head), atol=1e-6)
        assert computed == [34] and int((~torch.isnan(cache.entropy)).sum()) == len(ids.unique())
        again = ids[:, 3:9].flip(-1)                                 # seen tokens only: looked up, nothing computed
        assert torch.allclose(cache(again, embed(again)), predictive_entropy(embed(again), norm, head), atol=1e-6)
        assert computed == [34]
        shifted = embed(ids) + torch.arange(1.0, 18.0)[None, :, None]  # not the plain embedding: computed
        assert torch.allclose(cache(ids, shifted), predictive_entropy(shifted, norm, head), atol=1e-6)
        assert computed == [34, 34]
        head.weight.mul_(3.0)                                        # the output head changed: table dropped
        assert torch.allclose(cache(ids, embed(ids)), predictive_entropy(embed(ids), norm, head), atol=1e-6)
        assert not torch.allclose(cache(ids, embed(ids)), first, atol=1e-3)
        head.weight.data.mul_(2.0)                                   # invisible to the version check: clear()
        cache.clear()
        assert torch.allclose(cache(ids, embed(ids)), predictive_entropy(embed(ids), norm, head), atol=1e-6)


def test_controller_flag_is_validated():
    with pytest.raises(ValueError, match="controller"):
        CortexWrapConfig(controller="yes")
