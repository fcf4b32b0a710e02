"""The Triton backend against the fp32 oracle: compiled on a CUDA GPU when there is one, and
in Triton's interpreter on CPU tensors (always, through a subprocess; see below).

How the interpreter is switched on without leaking into other test modules: Triton 3.9
decides between compiling and interpreting when `@triton.jit` decorates a function, reading
TRITON_INTERPRET through `triton.knobs` (triton/runtime/jit.py `jit`). That includes
Triton's own library functions (`tl.sum`, `tl.cumsum`, ... in triton/language/standard.py),
which are decorated when `triton` is first imported. So setting the variable later (a
monkeypatch in a fixture) is NOT enough once anything has imported triton: the interpreted
kernel then fails with "Cannot call @triton.jit'd outside of the scope of a kernel".

Therefore: when this process was started with TRITON_INTERPRET=1 the tests run here;
otherwise `test_interpreted_suite_in_subprocess` runs this same file in a child pytest with
TRITON_INTERPRET=1 in its environment (and the in-process copies are skipped), so the
variable never leaks into the other test modules. On a machine with a CUDA GPU the same
tests also run here, compiled, on CUDA tensors, with a few larger sizes the interpreter
would take too long for (`cuda_only`).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_inputs, rrmse

from cortexlab.ops import gated_delta_rule, gated_delta_step, recurrent_gated_delta_rule

pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRET
DEVICE = "cuda" if CUDA else "cpu"
interpreted = pytest.mark.skipif(not (INTERPRET or CUDA),
                                 reason="needs a CUDA GPU; on CPU it runs in the TRITON_INTERPRET=1 subprocess")
cuda_only = pytest.mark.skipif(not CUDA, reason="sizes for a compiled kernel on a CUDA GPU")

TOL = 1e-5
# bf16/fp16 inputs: products in tf32 on a GPU (~1e-3 relative); the interpreter computes them in full fp32
HALF_STATE_TOL = 5e-3 if CUDA else 1e-5


def _grads(o, state, inputs, seed=1, use_o=True, use_state=True):
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen).to(o.device)
    ds = torch.randn(state.shape, generator=gen).to(state.device)
    loss = 0
    if use_o:
        loss = loss + (o.float() * do).sum()
    if use_state:
        loss = loss + (state * ds).sum()
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)  # q is unused by the state alone
    return [torch.zeros_like(x) if dx is None else dx for x, dx in zip(inputs, grads)]


def _compare(T, chunk, decay, initial_state, *, B=2, H=2, Dk=16, Dv=8, use_o=True, use_state=True):
    q, k, v, g, beta, h0 = make_inputs(B=B, T=T, H=H, Dk=Dk, Dv=Dv, decay=decay,
                                       initial_state=initial_state, device=DEVICE)
    scale = Dk ** -0.5
    o, s = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                            chunk_size=chunk, backend="triton")
    ro, rs = recurrent_gated_delta_rule(q, k, v, g, beta, scale, h0)
    assert o.dtype == v.dtype and s.dtype == torch.float32
    assert o.shape == ro.shape and s.shape == rs.shape
    errors = {"o": rrmse(o, ro), "state": rrmse(s, rs)}
    names = ["q", "k", "v", "g", "beta"] + (["initial_state"] if h0 is not None else [])
    inputs = [x for x in (q, k, v, g, beta, h0) if x is not None]
    got = _grads(o, s, inputs, use_o=use_o, use_state=use_state)
    ref = _grads(ro, rs, inputs, use_o=use_o, use_state=use_state)
    for name, a, b in zip(names, got, ref):
        errors["d" + name] = rrmse(a, b)
    bad = {name: err for name, err in errors.items() if not err <= TOL}
    assert not bad, f"rrmse above {TOL}: {bad} (all: {errors})"


@interpreted
@pytest.mark.parametrize(
    "T, chunk, decay, initial_state",
    [
        (1, 16, 1.0, True),
        (63, 16, 0.01, False),
        (63, 32, 10.0, True),
        (64, 16, 0.0, True),
        (64, 32, 1.0, False),
        (65, 16, 10.0, False),
        (65, 32, 0.0, True),
        (65, 16, 0.01, True),
        (65, 64, 1.0, True),
    ],
)
def test_forward_and_gradients_match_recurrence(T, chunk, decay, initial_state):
    _compare(T, chunk, decay, initial_state)


@cuda_only
@pytest.mark.parametrize("T, chunk, decay, Dk, Dv", [
    (1000, 64, 1.0, 64, 64), (1000, 64, 0.01, 128, 128), (1000, 32, 10.0, 64, 128), (1000, 64, 0.0, 128, 64),
])
def test_long_sequences_and_model_head_dims_on_cuda(T, chunk, decay, Dk, Dv):
    _compare(T, chunk, decay, True, B=1, H=4, Dk=Dk, Dv=Dv)


@cuda_only
def test_bf16_at_benchmark_head_dim_on_cuda():
    # the GPU benchmark's dtype and head dim, on a shorter sequence: bf16 in, fp32 state
    q, k, v, g, beta, h0 = make_inputs(B=1, T=2048, H=4, Dk=128, Dv=128, dtype=torch.bfloat16,
                                       requires_grad=False, device=DEVICE)
    o, s = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend="triton")
    ro, rs = recurrent_gated_delta_rule(*(x.float() for x in (q, k, v, g, beta)), 128 ** -0.5, h0.float())
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rrmse(o, ro) < 1e-2 and rrmse(s, rs) < HALF_STATE_TOL


@interpreted
def test_padded_head_dims_and_split_value_blocks():
    # D_k = 20 pads to 32; D_v = 72 pads to 128 and is split over three 32-column programs
    _compare(33, 16, 1.0, True, B=1, H=1, Dk=20, Dv=72)


@interpreted
@pytest.mark.parametrize("use_o, use_state", [(True, False), (False, True)])
def test_gradient_from_one_output_only(use_o, use_state):
    # exercises the backward with no state gradient (dht None) and with no output gradient
    _compare(40, 16, 1.0, True, B=1, H=2, use_o=use_o, use_state=use_state)


@interpreted
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float16, 3e-3)])
def test_half_precision_inputs_accumulate_in_fp32(dtype, tol):
    q, k, v, g, beta, h0 = make_inputs(B=1, T=40, H=2, dtype=dtype, requires_grad=False, device=DEVICE)
    o, s = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                            chunk_size=16, backend="triton")
    ro, rs = recurrent_gated_delta_rule(*(x.float() for x in (q, k, v, g, beta)), 16 ** -0.5, h0.float())
    assert o.dtype == dtype and s.dtype == torch.float32
    assert rrmse(o, ro) < tol and rrmse(s, rs) < HALF_STATE_TOL


@interpreted
@pytest.mark.parametrize("Dk, Dv, inplace", [(16, 8, False), (20, 72, True)])
def test_decode_step_matches_gated_delta_step(Dk, Dv, inplace):
    from cortexlab.ops.triton_backend import triton_gated_delta_step

    q, k, v, g, beta, h0 = make_inputs(B=2, T=1, H=3, Dk=Dk, Dv=Dv, requires_grad=False, device=DEVICE)
    args = (q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0])
    ro, rs = gated_delta_step(*args, h0, Dk ** -0.5)
    state = h0.clone()
    o, s = triton_gated_delta_step(*args, state, Dk ** -0.5, inplace=inplace)
    assert (s.data_ptr() == state.data_ptr()) == inplace
    if not inplace:
        assert torch.equal(state, h0)  # the input state is untouched
    assert rrmse(o, ro) <= TOL and rrmse(s, rs) <= TOL


@interpreted
def test_decode_steps_continue_the_sequence():
    from cortexlab.ops.triton_backend import triton_gated_delta_step

    q, k, v, g, beta, h0 = make_inputs(B=1, T=20, H=2, requires_grad=False, device=DEVICE)
    ro, rs = recurrent_gated_delta_rule(q, k, v, g, beta, 0.25, h0)
    _, s = gated_delta_rule(q[:, :16], k[:, :16], v[:, :16], g[:, :16], beta[:, :16], scale=0.25,
                            initial_state=h0, output_final_state=True, chunk_size=16, backend="triton")
    outs = []
    for t in range(16, 20):
        o_t, s = triton_gated_delta_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], s, 0.25)
        outs.append(o_t)
    assert rrmse(torch.stack(outs, 1), ro[:, 16:]) <= TOL and rrmse(s, rs) <= TOL


@pytest.mark.parametrize("chunk_size", [8, 48, 1])
def test_bad_chunk_size_names_the_argument(chunk_size):
    q, k, v, g, beta, _ = make_inputs(B=1, T=8, H=1, requires_grad=False)
    with pytest.raises(ValueError, match="chunk_size"):
        gated_delta_rule(q, k, v, g, beta, chunk_size=chunk_size, backend="triton")


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, g, beta, _ = make_inputs(B=1, T=8, H=1, requires_grad=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        gated_delta_rule(q, k, v, g, beta, chunk_size=16, backend="triton")


@pytest.mark.skipif(INTERPRET, reason="already in interpreter mode")
def test_interpreted_suite_in_subprocess():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-rfEs",
         "-p", "no:cacheprovider"],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary, summary
    # in the child only this very test and the GPU-sized ones are skipped
    skips = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    allowed = ("already in interpreter mode", "sizes for a compiled kernel on a CUDA GPU")
    assert skips and all(line.endswith(allowed) for line in skips), skips


def test_chunk_length_caps_wide_keys_and_short_sequences():
    from cortexlab.ops.triton_backend import _chunk_length

    assert _chunk_length(64, 8192, 64) == 64
    assert _chunk_length(64, 8192, 128) == 32     # [C, 128] fp32 tiles: the cap
    assert _chunk_length(16, 8192, 128) == 16     # below the cap: as asked
    assert _chunk_length(64, 20, 16) == 32        # a short sequence: the padded length


def test_launch_falls_back_to_a_shallower_pipeline(monkeypatch):
    from triton.runtime.errors import OutOfResources

    from cortexlab.ops import triton_backend

    depths = []

    class KernelNeedingOneStage:
        __name__ = "kernel_needing_one_stage"

        def __getitem__(self, grid):
            def launch(*args, num_warps, num_stages, **constants):
                depths.append(num_stages)
                if num_stages > 1:
                    raise OutOfResources(278528, 232448, "shared memory")
            return launch

    monkeypatch.setattr(triton_backend, "_depth_that_fits", {})
    kernel = KernelNeedingOneStage()
    triton_backend._launch(kernel, (1,), 0, num_warps=4, C=16)
    assert depths == [3, 2, 1]
    triton_backend._launch(kernel, (1,), 0, num_warps=4, C=16)
    assert depths == [3, 2, 1, 1]          # the depth that fitted is remembered
    triton_backend._launch(kernel, (1,), 0, num_warps=4, C=32)
    assert depths == [3, 2, 1, 1, 3, 2, 1]  # other launch constants start from the deepest again


def test_launch_reports_a_kernel_that_never_fits(monkeypatch):
    from triton.runtime.errors import OutOfResources

    from cortexlab.ops import triton_backend

    class KernelTooLarge:
        __name__ = "kernel_too_large"

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise OutOfResources(10**6, 232448, "shared memory")
            return launch

    monkeypatch.setattr(triton_backend, "_depth_that_fits", {})
    with pytest.raises(OutOfResources):
        triton_backend._launch(KernelTooLarge(), (1,), num_warps=4)


def test_dot_precision_follows_the_input_dtype_and_torch_setting():
    from cortexlab.ops.triton_backend import _dot_precision

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert _dot_precision(torch.float32) == _dot_precision(torch.float64) == "ieee"
        assert _dot_precision(torch.bfloat16) == _dot_precision(torch.float16, torch.bfloat16) == "tf32"
        assert _dot_precision(torch.bfloat16, torch.float32) == "ieee"   # one fp32 input keeps full precision
        torch.set_float32_matmul_precision("high")      # the user allowed tf32 for fp32 products
        assert _dot_precision(torch.float32) == _dot_precision(torch.bfloat16, torch.float32) == "tf32"
        assert _dot_precision(torch.float64) == "ieee"
    finally:
        torch.set_float32_matmul_precision(before)
