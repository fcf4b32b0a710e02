"""Every torch backend of `gated_delta_rule` against the sequential oracle, plus input validation."""
import math

import pytest
import torch
import torch.nn.functional as F

from cortexlab.ops import gated_delta_rule, gated_delta_step, recurrent_gated_delta_rule
from conftest import make_inputs, rrmse

NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def run(backend, q, k, v, g, beta, h0, chunk_size=64, weight_seed=1):
    """Forward + backward of a fixed random linear loss on (o, final state)."""
    o, s = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                            backend=backend, chunk_size=chunk_size)
    gen = torch.Generator().manual_seed(weight_seed)
    loss = (o.float() * torch.randn(o.shape, generator=gen)).sum() + \
        (s * torch.randn(s.shape, generator=gen)).sum()
    leaves = [x for x in (q, k, v, g, beta, h0) if x is not None]
    grads = torch.autograd.grad(loss, leaves)
    return o, s, grads


@pytest.mark.parametrize("T", [1, 63, 64, 65, 1000])
@pytest.mark.parametrize("decay", [0.0, 0.01, 1.0, 10.0])
@pytest.mark.parametrize("initial_state", [False, True])
def test_chunk_matches_recurrence_fp32(T, decay, initial_state):
    H = 2 if T == 1000 else 3
    xs = make_inputs(B=2, T=T, H=H, Dk=16, Dv=24, decay=decay, initial_state=initial_state, seed=T)
    o_ref, s_ref, g_ref = run("recurrent", *xs)
    o, s, grads = run("chunk", *xs)
    assert rrmse(o, o_ref) <= 1e-5
    assert rrmse(s, s_ref) <= 1e-5
    names = [n for n, x in zip(NAMES, xs) if x is not None]
    for name, a, b in zip(names, grads, g_ref):
        assert rrmse(a, b) <= 1e-5, f"gradient of {name}: rrmse {rrmse(a, b):.2e}"


@pytest.mark.parametrize("H,Dk,Dv,chunk", [(1, 8, 8, 16), (4, 32, 16, 32), (8, 64, 64, 64)])
def test_chunk_head_and_chunk_shapes(H, Dk, Dv, chunk):
    xs = make_inputs(B=1, T=100, H=H, Dk=Dk, Dv=Dv, seed=H)
    o_ref, s_ref, g_ref = run("recurrent", *xs)
    o, s, grads = run("chunk", *xs, chunk_size=chunk)
    assert rrmse(o, o_ref) <= 1e-5 and rrmse(s, s_ref) <= 1e-5
    assert all(rrmse(a, b) <= 1e-5 for a, b in zip(grads, g_ref))


def test_chunk_gradcheck_float64():
    xs = make_inputs(B=1, T=11, H=2, Dk=4, Dv=3, dtype=torch.float64, seed=3)

    def f(q, k, v, g, beta, h0):
        return gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                backend="chunk", chunk_size=4)

    assert torch.autograd.gradcheck(f, tuple(xs), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_half_precision_inputs(dtype, tol):
    xs = make_inputs(B=2, T=130, H=2, Dk=32, Dv=32, dtype=dtype, seed=5)
    ref = [x.detach().float().requires_grad_() for x in xs]
    o_ref, s_ref, g_ref = run("recurrent", *ref)
    o, s, grads = run("chunk", *xs)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert rrmse(o, o_ref) <= tol and rrmse(s, s_ref) <= tol
    for a, b in zip(grads, g_ref):
        assert a.dtype == dtype and rrmse(a, b) <= 4 * tol


def test_state_carries_across_calls():
    """Two calls chained through the final state equal one call over the whole sequence."""
    q, k, v, g, beta, h0 = make_inputs(T=90, requires_grad=False)
    o_full, s_full = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o1, s1 = gated_delta_rule(q[:, :40], k[:, :40], v[:, :40], g[:, :40], beta[:, :40],
                              initial_state=h0, output_final_state=True)
    o2, s2 = gated_delta_rule(q[:, 40:], k[:, 40:], v[:, 40:], g[:, 40:], beta[:, 40:],
                              initial_state=s1, output_final_state=True)
    assert rrmse(torch.cat([o1, o2], 1), o_full) <= 1e-5 and rrmse(s2, s_full) <= 1e-5


def test_decode_step_matches_sequence():
    q, k, v, g, beta, h0 = make_inputs(T=7, requires_grad=False)
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, 0.25, h0)
    state = h0
    for t in range(7):
        o_t, state = gated_delta_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state, 0.25)
        assert torch.allclose(o_t, o_ref[:, t], atol=1e-6)
    assert torch.allclose(state, s_ref, atol=1e-6)


def test_delta_rule_stores_and_recalls_a_key():
    """With beta = 1 and no decay, writing v under a unit key k makes S^T k return v exactly."""
    k = F.normalize(torch.randn(1, 1, 1, 8), dim=-1)
    v = torch.randn(1, 1, 1, 5)
    old = torch.randn(1, 1, 8, 5)
    _, s = gated_delta_rule(k, k, v, torch.zeros(1, 1, 1), torch.ones(1, 1, 1),
                            initial_state=old, output_final_state=True)
    assert torch.allclose(torch.einsum("bhkv,k->v", s, k[0, 0, 0]), v[0, 0, 0], atol=1e-5)


def test_defaults_scale_l2norm_and_auto():
    q, k, v, g, beta, _ = make_inputs(T=20, Dk=16, requires_grad=False, initial_state=False)
    o_default, _ = gated_delta_rule(q * 3, k * 2, v, g, beta, use_qk_l2norm=True)
    o_manual, _ = gated_delta_rule(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, g, beta,
                                   scale=16 ** -0.5, backend="recurrent")
    assert rrmse(o_default, o_manual) <= 1e-5
    o_half_scale, state = gated_delta_rule(q, k, v, g, beta, scale=0.125, backend="chunk")
    o_ref, _ = gated_delta_rule(q, k, v, g, beta, scale=0.25, backend="chunk")
    assert state is None and rrmse(2 * o_half_scale, o_ref) <= 1e-6


def test_allow_neg_eigval():
    q, k, v, g, beta, _ = make_inputs(T=33, requires_grad=False, initial_state=False)
    beta = beta * 2
    with pytest.raises(ValueError, match="beta"):
        gated_delta_rule(q, k, v, g, beta)
    o, _ = gated_delta_rule(q, k, v, g, beta, allow_neg_eigval=True, chunk_size=16)
    o_ref, _ = gated_delta_rule(q, k, v, g, beta, allow_neg_eigval=True, backend="recurrent")
    assert rrmse(o, o_ref) <= 1e-5


def _bad(**change):
    q, k, v, g, beta, h0 = make_inputs(B=2, T=5, H=3, Dk=4, Dv=6, requires_grad=False)
    args = dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=h0)
    args.update(change)
    return args


@pytest.mark.parametrize("change,name", [
    (dict(q=torch.randn(2, 5, 3)), "q"),
    (dict(k=torch.randn(2, 5, 3, 5)), "q"),             # q and k disagree
    (dict(v=torch.randn(2, 4, 3, 6)), "v"),
    (dict(g=torch.zeros(2, 5, 2)), "g"),
    (dict(g=torch.full((2, 5, 3), 0.1)), "g"),          # g > 0
    (dict(beta=torch.full((2, 5, 3), 1.5)), "beta"),
    (dict(beta=torch.full((2, 5, 3), -0.1)), "beta"),
    (dict(v=torch.full((2, 5, 3, 6), float("nan"))), "v"),
    (dict(q=torch.full((2, 5, 3, 4), float("inf"))), "q"),
    (dict(initial_state=torch.zeros(2, 3, 6, 4)), "initial_state"),
    (dict(q=torch.zeros(2, 0, 3, 4), k=torch.zeros(2, 0, 3, 4), v=torch.zeros(2, 0, 3, 6),
          g=torch.zeros(2, 0, 3), beta=torch.zeros(2, 0, 3)), "T = 0"),
])
def test_bad_input_names_the_argument(change, name):
    args = _bad(**change)
    with pytest.raises(ValueError, match=name):
        gated_delta_rule(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("g"), args.pop("beta"),
                         **args)


@pytest.mark.parametrize("kwargs,name", [
    (dict(backend="cuda"), "backend"), (dict(chunk_size=0), "chunk_size"),
    (dict(scale=-1.0), "scale"), (dict(scale=math.nan), "scale"),
])
def test_bad_options_name_the_argument(kwargs, name):
    q, k, v, g, beta, _ = make_inputs(T=5, requires_grad=False)
    with pytest.raises(ValueError, match=name):
        gated_delta_rule(q, k, v, g, beta, **kwargs)


def test_integer_input_is_a_type_error():
    q, k, v, g, beta, _ = make_inputs(T=5, requires_grad=False)
    with pytest.raises(TypeError, match="v"):
        gated_delta_rule(q, k, v.long(), g, beta)


def test_auto_backend_picks_the_faster_path_measured_on_a_gpu():
    """Triton on CUDA, except fp32 inputs with head dims above 64 (the torch chunked backward was faster there)."""
    from cortexlab.ops.gated_delta import TRITON_MAX_FP32_HEAD_DIM, resolve_backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_backend("auto", cuda, TRITON_MAX_FP32_HEAD_DIM) == "triton"
    assert resolve_backend("auto", cuda, 128) == "chunk"
    assert resolve_backend("auto", cuda, 128, torch.bfloat16) == "triton"
    assert resolve_backend("auto", cuda, 128, torch.float64) == "chunk"
    assert resolve_backend("auto", cpu, 32, torch.bfloat16) == "chunk"
    assert resolve_backend("triton", cuda, 128) == "triton"      # an explicit choice is kept
