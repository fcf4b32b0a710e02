"""The sidecar's layers: decode = parallel, split calls = one call, v1 = v2, padding, ghost, errors."""
import json

import pytest
import torch
from conftest import trained_block as _trained_block

from cortexlab.cortex.config import CortexWrapConfig
from cortexlab.cortex.gdn import CortexBlock, forget_gate_log
from cortexlab.cortex.hybrid import HybridCortexBlock

D_MODEL = 32


def trained_block(cfg, seed=0):
    return _trained_block(cfg, D_MODEL, seed)


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("use_hybrid", [True, False])
def test_token_by_token_equals_parallel_across_the_window_boundary(use_hybrid):
    cfg = CortexWrapConfig(rank_fast=16, num_heads=2, window_size=8, use_hybrid=use_hybrid, chunk_size=16)
    block = trained_block(cfg)
    x = torch.randn(2, 37, D_MODEL)  # 37 tokens: several windows, several chunks, a ragged end
    y, state = block(x)
    steps, step_state = [], None
    for t in range(x.shape[1]):
        y_t, step_state = block(x[:, t:t + 1], step_state)
        steps.append(y_t)
    assert y.abs().max() > 1  # the sidecar is really contributing
    assert max_diff(torch.cat(steps, 1), y) <= 1e-4
    for key in state:
        assert max_diff(step_state[key].float(), state[key].float()) <= 1e-5, key


def test_two_calls_equal_one_call_over_the_concatenation():
    block = trained_block(CortexWrapConfig(rank_fast=16, num_heads=2, window_size=8))
    x = torch.randn(1, 50, D_MODEL)
    y, state = block(x)
    y1, s1 = block(x[:, :23])
    y2, s2 = block(x[:, 23:], s1)
    assert max_diff(torch.cat([y1, y2], 1), y) <= 1e-5
    assert max_diff(s2["S"], state["S"]) <= 1e-5
    assert s2["tokens"].tolist() == [50]


def test_v1_sequential_block_equals_v2_memory_path():
    cfg = CortexWrapConfig(rank_fast=16, num_heads=2)
    v2 = trained_block(cfg).gdn
    v1 = CortexBlock(D_MODEL, cfg)
    v1.load_state_dict(v2.state_dict())
    x = torch.randn(2, 70, D_MODEL)
    o1, s1, _ = v1(x)
    o2, s2, _ = v2(x)
    assert max_diff(o1, o2) <= 1e-4
    assert max_diff(s1["S"], s2["S"]) <= 1e-5


def test_left_padding_is_invisible_to_the_memory():
    block = trained_block(CortexWrapConfig(rank_fast=16, num_heads=2, window_size=8))
    x = torch.randn(2, 30, D_MODEL)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, :7] = False
    y, state = block(x, token_mask=mask)
    y_alone, state_alone = block(x[1:, 7:])
    assert max_diff(y[1, 7:], y_alone[0]) <= 1e-5
    assert y[1, :7].abs().max() == 0
    assert max_diff(state["S"][1], state_alone["S"][0]) <= 1e-6
    assert state["tokens"].tolist() == [30, 23]


@pytest.mark.parametrize("conv_init", ["random", "induction"])
def test_fresh_block_is_a_ghost_but_still_learns(conv_init):
    block = HybridCortexBlock(D_MODEL, CortexWrapConfig(rank_fast=16, num_heads=2, conv_init=conv_init))
    y, _ = block(torch.randn(2, 10, D_MODEL))
    assert y.abs().max() == 0
    # zero output, yet a real loss gives the output projection a gradient: training can start
    (y * torch.randn_like(y)).sum().backward()
    assert block.out_proj.weight.grad.abs().max() > 0


def test_induction_init_looks_up_what_followed_the_current_token():
    """q_t . k_s = 1 exactly where token s-1 is token t, at initialisation; the random init has no such lookup."""
    x = torch.randn(1, 12, D_MODEL, generator=torch.Generator().manual_seed(0))
    x[0, 9] = x[0, 3]                                   # token 9 repeats token 3, so the lookup from 9 finds 4
    sims = {}
    for conv_init in ("random", "induction"):
        torch.manual_seed(1)
        gdn = HybridCortexBlock(D_MODEL, CortexWrapConfig(rank_fast=16, num_heads=2, conv_init=conv_init)).gdn
        q, k, _, _ = gdn.features(x, None, None)
        q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
        sims[conv_init] = torch.einsum("hd,shd->hs", q[0, 9], k[0, :10])   # every key the query at 9 can see
    assert torch.allclose(sims["induction"][:, 4], torch.ones(2), atol=1e-5)
    assert (sims["induction"][:, torch.arange(10) != 4] < 0.99).all()
    assert (sims["random"][:, 4] < 0.9).all()


def test_dropping_the_shared_direction_makes_unrelated_keys_unalike():
    """Inputs that share one large direction (a decoder's massive activations) give alike keys; with that
    direction projected out of W_q and W_k, unrelated keys are nearly orthogonal and the induction lookup stays."""
    gen = torch.Generator().manual_seed(0)
    shared = torch.nn.functional.normalize(torch.randn(D_MODEL, generator=gen), dim=0)
    x = torch.randn(1, 40, D_MODEL, generator=gen) + 8 * shared          # every token carries the shared part
    x[0, 30] = x[0, 10]
    torch.manual_seed(1)
    gdn = HybridCortexBlock(D_MODEL, CortexWrapConfig(rank_fast=16, num_heads=2, conv_init="induction")).gdn
    w_v = gdn.qkv_proj.weight[64:].clone()

    def key_cosines():
        q, k, _, _ = gdn.features(x, None, None)
        q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
        sims = torch.einsum("hd,shd->hs", q[0, 30], k[0, :31]).detach()
        return sims[:, 11], sims[:, torch.arange(31) != 11].abs().mean()

    matched, unrelated = key_cosines()
    assert unrelated > 0.5                                     # before: every key looks like every other
    gdn.drop_shared_directions_(x[0], 1)
    assert gdn.qkv_proj.weight[:32].mv(shared).abs().max() < 0.05 * gdn.qkv_proj.weight[:32].norm(dim=1).max()
    assert torch.equal(gdn.qkv_proj.weight[:32], gdn.qkv_proj.weight[32:64])   # W_k = W_q still
    assert torch.equal(gdn.qkv_proj.weight[64:], w_v)                           # values untouched
    matched, unrelated = key_cosines()
    assert torch.allclose(matched, torch.ones(2), atol=1e-5) and unrelated < 0.3
    for bad, match in (((x[0, :, :5], 1), "x must be"), ((x[0], 0), "rank"), ((x[0], D_MODEL), "rank")):
        with pytest.raises(ValueError, match=match):
            gdn.drop_shared_directions_(*bad)


def test_forget_gates_start_where_documented():
    log_cfg, sig_cfg = CortexWrapConfig(), CortexWrapConfig(forget_gate="sigmoid", alpha_max=0.99)
    a_log = forget_gate_log(torch.tensor([log_cfg.forget_bias]), log_cfg).exp().item()
    a_sig = forget_gate_log(torch.tensor([sig_cfg.forget_bias]), sig_cfg).exp().item()
    assert a_log == pytest.approx(0.99909, abs=1e-5)           # half-life ~760 tokens
    assert a_sig == pytest.approx(0.99 * 0.8808, abs=1e-4)      # the design's "bias hack"
    capped = CortexWrapConfig(alpha_max=0.999)
    assert forget_gate_log(torch.tensor([-50.0]), capped).exp().item() == pytest.approx(0.999)


@pytest.mark.parametrize("kwargs, match", [
    ({"rank_fast": 0}, "rank_fast"), ({"num_heads": 2.5}, "num_heads"), ({"window_size": -1}, "window_size"),
    ({"alpha_max": 1.5}, "alpha_max"), ({"forget_gate": "tanh"}, "forget_gate"), ({"layers": []}, "layers"),
    ({"layers": [1, 1]}, "duplicates"), ({"backend": "cuda"}, "backend"),
    ({"forget_bias": float("nan")}, "forget_bias"), ({"conv_init": "identity"}, "conv_init"),
    ({"conv_init": "induction", "conv_size": 1}, "conv_size"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CortexWrapConfig(**kwargs)


def test_config_json_round_trip_and_layer_range():
    cfg = CortexWrapConfig(layers=[3, 1], forget_gate="sigmoid")
    assert CortexWrapConfig.from_json(cfg.to_json()) == cfg
    assert cfg.layers == [1, 3]
    with pytest.raises(ValueError, match="out of range"):
        cfg.layer_indices(2)


def test_a_config_saved_before_window_norm_loads_without_it():
    """Adapters saved before the hybrid's window norm existed were trained without one: they load that way, and the
    block has no window-norm weights to miss."""
    saved = json.loads(CortexWrapConfig().to_json())
    del saved["window_norm"]
    old = CortexWrapConfig.from_json(json.dumps(saved))
    assert old.window_norm is False and CortexWrapConfig().window_norm is True
    assert HybridCortexBlock(64, old).window_norm is None
    assert HybridCortexBlock(64, CortexWrapConfig()).window_norm is not None


def test_bad_block_inputs_name_the_problem():
    block = trained_block(CortexWrapConfig(rank_fast=16, num_heads=2))
    with pytest.raises(ValueError, match="B, T, d_model"):
        block(torch.randn(5, D_MODEL))
    with pytest.raises(ValueError, match="token_mask"):
        block(torch.randn(1, 5, D_MODEL), token_mask=torch.ones(1, 4, dtype=torch.bool))
    _, state = block(torch.randn(2, 5, D_MODEL))
    with pytest.raises(ValueError, match="batch size"):
        block(torch.randn(3, 5, D_MODEL), state)


def test_sliding_window_equals_dense_masked_attention_over_several_query_blocks():
    """Blocked, fused window attention = one dense softmax with the band mask, for outputs and gradients,
    with a cache from an earlier call and left padding (padding queries give zeros, never NaN)."""
    from cortexlab.cortex.window import QUERY_BLOCK, empty_window, sliding_window_attention

    B, H, D, W, T = 2, 2, 8, 16, 2 * QUERY_BLOCK + 21
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=gen, requires_grad=True) for _ in range(3))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :5] = False                                                   # left padding in the second row
    old_k, old_v = torch.randn(2, B, H, W - 1, D, generator=gen)
    cache = {"win_k": old_k, "win_v": old_v, "win_valid": torch.ones(B, W - 1, dtype=torch.bool)}
    cache["win_valid"][0, :3] = False
    o, new_cache = sliding_window_attention(q, k, v, cache, mask, W)

    keys = torch.cat([old_k, k.transpose(1, 2)], 2)
    values = torch.cat([old_v, v.transpose(1, 2)], 2)
    valid = torch.cat([cache["win_valid"], mask], 1)
    scores = q.transpose(1, 2) @ keys.mT * D ** -0.5                      # [B, H, T, W-1+T]
    pos_q, pos_k = torch.arange(T)[:, None] + W - 1, torch.arange(T + W - 1)[None, :]
    allowed = (pos_k <= pos_q) & (pos_k > pos_q - W) & valid[:, None, None, :]
    reference = (scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num() @ values).transpose(1, 2)
    reference = reference * mask[..., None, None]
    assert torch.isfinite(o).all() and (o[1, :5] == 0).all()
    assert torch.allclose(o, reference, atol=1e-5)
    grads = torch.autograd.grad(o.square().sum(), (q, k, v))
    expected = torch.autograd.grad(reference.square().sum(), (q, k, v))
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(new_cache["win_k"], keys[:, :, -(W - 1):])
    assert torch.equal(new_cache["win_valid"], valid[:, -(W - 1):])
    assert empty_window(B, H, D, W, q)["win_valid"].sum() == 0


def test_short_conv_is_a_causal_depthwise_convolution():
    """ShortConv = silu(conv1d) with K-1 zeros (or the carried tail) before the sequence, outputs and gradients."""
    import torch.nn.functional as F

    from cortexlab.cortex.gdn import ShortConv

    torch.manual_seed(0)
    conv = ShortConv(6, 4)
    x = torch.randn(2, 11, 6, requires_grad=True)
    y, tail = conv(x, None)
    reference = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.weight, groups=6).transpose(1, 2))
    assert torch.allclose(y, reference, atol=1e-6) and torch.equal(tail, x[:, -3:].detach())
    got = torch.autograd.grad(y.sum(), (x, conv.weight))
    want = torch.autograd.grad(reference.sum(), (x, conv.weight))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want))
    y2, _ = conv(x[:, 5:], x[:, 2:5])                               # continuing from a carried tail
    assert torch.allclose(y2, y[:, 5:], atol=1e-6)
