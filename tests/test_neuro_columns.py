"""Tests of cortexlab.neuro.columns: column attention + JS specialisation, lateral inhibition, hierarchical tiers."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon

from cortexlab.neuro.columns import (
    CorticalColumnAttention,
    HierarchicalColumnOrganizer,
    LateralInhibition,
    column_activity,
    mean_pairwise_js_divergence,
)


def qkv(batch=2, groups=3, per_group=2, tq=5, tk=5, dim=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, groups * per_group, tq, dim, generator=gen)
    return q, torch.randn(batch, groups, tk, dim, generator=gen), torch.randn(batch, groups, tk, dim, generator=gen)


def reference_gqa(q, k, v, causal):
    """Plain GQA: repeat each kv head over its query heads, scaled dot-product attention; returns [B, T, H, D]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        tq, tk = q.shape[2], k.shape[2]
        scores = scores.masked_fill(torch.ones(tq, tk, dtype=torch.bool).triu(tk - tq + 1), float("-inf"))
    probs = torch.softmax(scores, -1)
    return (probs @ v).transpose(1, 2), probs


def scipy_mean_js(column_probs):
    """Mean over batch, queries and pairs g < h of scipy's jensenshannon(base=e) ** 2 (JS divergence in nats)."""
    p = column_probs.double().numpy()
    batch, groups, tq, _ = p.shape
    values = [
        jensenshannon(p[b, g, i], p[b, h, i], base=np.e) ** 2
        for b in range(batch)
        for i in range(tq)
        for g in range(groups)
        for h in range(g + 1, groups)
    ]
    return float(np.mean(values))


# ---------------------------------------------------------------- CorticalColumnAttention


@pytest.mark.parametrize("causal,tq,tk", [(True, 5, 5), (False, 5, 5), (True, 2, 6)])
def test_output_equals_plain_gqa(causal, tq, tk):
    q, k, v = qkv(tq=tq, tk=tk)
    out, div = CorticalColumnAttention(num_groups=3, heads_per_group=2, head_dim=4)(q, k, v, causal=causal)
    expected, _ = reference_gqa(q, k, v, causal)
    assert out.shape == (2, tq, 6, 4) and div.shape == ()
    torch.testing.assert_close(out, expected)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=causal and tq == tk
    )
    if tq == tk:
        torch.testing.assert_close(out, sdpa.transpose(1, 2))


@pytest.mark.parametrize("causal", [True, False])
def test_specialization_equals_scipy_jensenshannon_squared(causal):
    q, k, v = qkv(groups=4, per_group=2, tq=6, tk=6, seed=3)
    _, div = CorticalColumnAttention(4, 2, 4)(q, k, v, causal=causal)
    _, probs = reference_gqa(q, k, v, causal)
    column_probs = probs.view(2, 4, 2, 6, 6).mean(2)  # each column: the mean of its heads' attention
    assert div.item() == pytest.approx(scipy_mean_js(column_probs), abs=1e-6)


def test_js_function_on_peaked_distributions_matches_scipy_and_is_bounded():
    gen = torch.Generator().manual_seed(5)
    column_probs = torch.softmax(10 * torch.randn(2, 3, 4, 7, generator=gen), -1)
    column_probs[0, 0, 0] = torch.tensor([1.0, 0, 0, 0, 0, 0, 0])
    column_probs[0, 1, 0] = torch.tensor([0, 1.0, 0, 0, 0, 0, 0])
    js = mean_pairwise_js_divergence(column_probs)
    assert js.item() == pytest.approx(scipy_mean_js(column_probs), abs=1e-6)
    assert 0 < js.item() <= np.log(2)


def test_identical_columns_give_zero():
    q, k, v = qkv(groups=3, per_group=2, seed=1)
    q = q[:, :2].repeat(1, 3, 1, 1)  # every column holds the same two query heads ...
    k = k[:, :1].repeat(1, 3, 1, 1)  # ... and the same keys
    out, div = CorticalColumnAttention(3, 2, 4)(q, k, v)
    assert abs(div.item()) < 1e-7
    _, div_one_column = CorticalColumnAttention(1, 2, 4)(q[:, :2], k[:, :1], v[:, :1])
    assert div_one_column.item() == 0.0


def test_specialization_is_differentiable_and_can_be_maximised():
    q, k, v = qkv(seed=2)
    q.requires_grad_(True)
    columns = CorticalColumnAttention(3, 2, 4)
    _, div = columns(q, k, v)
    div.backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    with torch.no_grad():
        _, div_after = columns(q + 0.5 * q.grad / q.grad.norm(), k, v)
    assert div_after > div


def test_column_attention_accepts_non_contiguous_inputs():
    q, k, v = qkv()
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, T, D] view of a [B, T, H, D] buffer, as after a proj
    assert not q_t.is_contiguous()
    out, div = CorticalColumnAttention(3, 2, 4)(q_t, k, v)
    expected_out, expected_div = CorticalColumnAttention(3, 2, 4)(q, k, v)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(div, expected_div)


def test_column_attention_skips_specialization_and_keeps_dtype():
    q, k, v = (x.to(torch.bfloat16) for x in qkv())
    out, div = CorticalColumnAttention(3, 2, 4)(q, k, v, compute_specialization=False)
    assert div is None and out.dtype == torch.bfloat16


def test_column_attention_bad_input():
    columns = CorticalColumnAttention(3, 2, 4)
    q, k, v = qkv()
    with pytest.raises(ValueError, match="Q"):
        columns(q[:, :5], k, v)
    with pytest.raises(ValueError, match="K"):
        columns(q, k[:, :2], v)
    with pytest.raises(ValueError, match="V"):
        columns(q, k, v[..., :3])
    with pytest.raises(TypeError, match="Q"):
        columns(q.long(), k, v)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        columns(*qkv(tq=6, tk=5))
    with pytest.raises(ValueError, match="heads_per_group"):
        CorticalColumnAttention(3, 0, 4)


# ---------------------------------------------------------------- LateralInhibition


def co_active_outputs(seq=64, seed=0):
    """Columns 0 and 1 fire on the same tokens, column 2 on the others. Returns [1, T, 3, 4]."""
    gen = torch.Generator().manual_seed(seed)
    on = torch.rand(seq, generator=gen) < 0.5
    mask = torch.stack([on, on, ~on], dim=-1).float()  # [T, 3]
    return (torch.randn(1, seq, 3, 4, generator=gen).abs() + 0.5) * mask[None, :, :, None]


def test_inhibition_neutral_at_zero():
    x = torch.randn(2, 5, 4, 3)
    assert torch.equal(LateralInhibition(4)(x), x)


def test_anti_hebbian_update_lowers_co_activation_of_co_active_columns_only():
    inhibition = LateralInhibition(3)
    x = co_active_outputs()
    before = column_activity(inhibition(x))
    for _ in range(20):
        inhibition.update_inhibition(x, lr=0.05)
    after = column_activity(inhibition(x))
    weights = inhibition.get_inhibition()
    assert (weights >= 0).all() and torch.equal(weights.diagonal(), torch.zeros(3))
    assert weights[0, 1] == weights[1, 0] == inhibition.max_inhibition  # co-active: mutual inhibition, clipped
    assert weights[0, 2] == weights[2, 0] == weights[1, 2] == weights[2, 1] == 0  # never co-active: none
    assert (after[..., 0] * after[..., 1]).mean() < 0.5 * (before[..., 0] * before[..., 1]).mean()
    assert torch.equal(inhibition(x)[:, :, 2], x[:, :, 2])


def test_inhibition_gain_and_gradient():
    inhibition = LateralInhibition(2)
    inhibition.inhibition.copy_(torch.tensor([[0.0, 0.5], [0.25, 0.0]]))
    x = torch.tensor([[[[1.0, -1.0], [2.0, 2.0]], [[0.0, 0.0], [1.0, 1.0]]]], requires_grad=True)  # [1, 2, 2, 2]
    y = inhibition(x)
    # token 0: a = (1, 2) -> a' = (max(0, 1 - 0.5 * 2), 2 - 0.25 * 1) = (0, 1.75); token 1: column 0 silent
    expected = torch.tensor([[[[0.0, 0.0], [1.75, 1.75]], [[0.0, 0.0], [1.0, 1.0]]]])
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_inhibition_is_causal():
    inhibition = LateralInhibition(3)
    inhibition.update_inhibition(co_active_outputs(), lr=0.3)
    x = torch.randn(1, 6, 3, 2)
    x2 = x.clone()
    x2[:, 3:] = torch.randn(1, 3, 3, 2)
    assert torch.equal(inhibition(x)[:, :3], inhibition(x2)[:, :3])


def test_inhibition_state_inspectable_resettable_and_safe_on_bad_input():
    inhibition = LateralInhibition(3)
    inhibition.update_inhibition(co_active_outputs(), lr=0.1)
    state = inhibition.get_inhibition()
    state.fill_(9.0)  # a copy: the module's state is untouched
    before = inhibition.get_inhibition()
    assert before.max() <= inhibition.max_inhibition and before[0, 1] > 0
    nan_input = co_active_outputs()
    nan_input[0, 0, 0, 0] = float("nan")
    for args, error in (
        ((nan_input, 0.1), ValueError),
        ((torch.zeros(1, 4, 2, 3), 0.1), ValueError),
        ((co_active_outputs(), 0.0), ValueError),
        ((co_active_outputs(), float("inf")), ValueError),
        ((co_active_outputs().long(), 0.1), TypeError),
    ):
        with pytest.raises(error):
            inhibition.update_inhibition(*args)
    assert torch.equal(inhibition.get_inhibition(), before)
    inhibition.reset_state()
    assert torch.equal(inhibition.get_inhibition(), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="group_outputs"):
        inhibition(torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="max_inhibition"):
        LateralInhibition(3, max_inhibition=1.5)


# ---------------------------------------------------------------- HierarchicalColumnOrganizer


def test_design_table_for_32_layers():
    organizer = HierarchicalColumnOrganizer(num_layers=32, num_groups=8)
    assert [organizer.get_tier(layer) for layer in range(32)] == ["syntactic"] * 10 + ["semantic"] * 10 + [
        "abstract"
    ] * 12
    assert organizer.get_column_role(layer_idx=25, group_idx=3) == "abstract"
    assert organizer.layer_range("semantic") == range(10, 20)


@pytest.mark.parametrize(
    "num_layers,ranges",
    [
        (16, (range(0, 5), range(5, 10), range(10, 16))),
        (80, (range(0, 25), range(25, 50), range(50, 80))),
        (3, (range(0, 1), range(1, 2), range(2, 3))),
        (126, (range(0, 39), range(39, 79), range(79, 126))),
    ],
)
def test_tiers_scale_with_depth(num_layers, ranges):
    organizer = HierarchicalColumnOrganizer(num_layers, num_groups=2)
    assert tuple(organizer.layer_range(tier) for tier in ("syntactic", "semantic", "abstract")) == ranges


def test_specialization_targets():
    organizer = HierarchicalColumnOrganizer(32, 8)
    targets = organizer.get_specialization_targets(layer_idx=15)
    assert targets["tier"] == "semantic" and targets["tiers"] == ("syntactic", "semantic", "abstract")
    assert isinstance(targets["target_distribution"], torch.Tensor)
    torch.testing.assert_close(targets["target_distribution"], torch.tensor([0.1, 0.7, 0.2]))
    for layer in (0, 15, 31):
        dist = organizer.get_specialization_targets(layer)["target_distribution"]
        assert abs(dist.sum().item() - 1.0) < 1e-6 and dist.argmax().item() == targets["tiers"].index(
            organizer.get_tier(layer)
        )


def test_organizer_validates_indices():
    organizer = HierarchicalColumnOrganizer(32, 8)
    for layer_idx, group_idx in ((32, 0), (-1, 0), (0, 8), (0, -1), (1.0, 0), (True, 0)):
        with pytest.raises(ValueError):
            organizer.get_column_role(layer_idx, group_idx)
    with pytest.raises(ValueError, match="layer_idx"):
        organizer.get_specialization_targets(40)
    with pytest.raises(ValueError, match="tier"):
        organizer.layer_range("motor")
    with pytest.raises(ValueError, match="num_layers"):
        HierarchicalColumnOrganizer(0, 8)
