"""Triton backend of `gated_delta_rule` (backend="triton") and of the decode step.

`triton_gated_delta_rule` wraps the kernels of `cortexlab.kernels.gated_delta_chunk` in a
`torch.autograd.Function`: the forward runs three kernels (per-chunk UT transform, the
sequential state pass, the output), the backward two (the reverse state pass, the
per-chunk gradient terms). The math is that of `cortexlab.ops.chunk`; every intermediate
and the state are fp32 whatever the input dtype, and matrix products run at full fp32
precision for fp32 inputs and in tf32 for bf16/fp16 inputs, or for fp32 inputs too once
torch.set_float32_matmul_precision allows tf32 (`_dot_precision`).

On a GPU each launch takes the deepest software pipeline that fits in shared memory
(`_launch`), and a key dim above 64 caps the chunk at 32 tokens (`_chunk_length`).

On CPU tensors the kernels run in Triton's interpreter, which must be switched on with the
environment variable TRITON_INTERPRET=1 *before triton is first imported* (Triton decides
between compiling and interpreting when `@triton.jit` runs, for its own `tl.sum`/`tl.cumsum`
too); setting it later is reported as a clear RuntimeError.
"""
from __future__ import annotations

import importlib
import os

import torch

from .gated_delta import HALF_DTYPES

_MAX_BV = 32             # value columns per program (H200, bf16 D=128: fwd+bwd 1.4x faster than 64)
_MAX_CHUNK_WIDE_KEYS = 32  # chunk cap once D_k pads past 64: the backward's [C, D_k] fp32 tiles then fit in registers
_PIPELINE_DEPTHS = (3, 2, 1)  # num_stages tried at launch, deepest first (see `_launch`)
_depth_that_fits: dict = {}   # (kernel, launch constants) -> the deepest num_stages that fitted on this GPU


def _next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def _block(d: int) -> int:
    """Padded head-dim block: a power of two, at least 16 (the smallest tl.dot operand)."""
    return max(16, _next_pow2(d))


def _dot_precision(*dtypes: torch.dtype) -> str:
    """Precision of every tl.dot for inputs of these dtypes: "tf32" when all are bf16/fp16, whose
    own rounding is already as coarse (tf32 keeps 10 mantissa bits; on an H200 at bf16 B=1
    T=8192 H=16 D=128 it made the forward about 7x and forward+backward 2.2x faster, the output's
    error vs an fp32 reference going from 1.7e-3 to 2.0e-3); also when fp32 inputs are among them
    and the user allowed tf32 for fp32 matrix products (torch.set_float32_matmul_precision("high")
    or "medium"). Otherwise (fp32 by default, fp64) "ieee", full fp32 products."""
    tf32_ok = HALF_DTYPES + ((torch.float32,) if torch.get_float32_matmul_precision() != "highest" else ())
    return "tf32" if all(d in tf32_ok for d in dtypes) else "ieee"


def _chunk_length(chunk_size: int, T: int, BK: int) -> int:
    """The chunk C the kernels use: `chunk_size`, but no longer than the padded sequence (a short
    sequence gets a smaller chunk) and at most `_MAX_CHUNK_WIDE_KEYS` when the padded key dim BK
    exceeds 64 (the backward holds six [C, BK] fp32 tiles per program, 48K numbers at C = 64,
    BK = 128: more than 256 threads' registers; on an H200 that variant did not finish compiling and
    running within a probe's window, so the likely cause, spilling, is not yet confirmed)."""
    C = min(chunk_size, _block(T))
    return min(C, _MAX_CHUNK_WIDE_KEYS) if BK > 64 else C


def _launch(kernel, grid, *args, num_warps: int, **constants) -> None:
    """kernel[grid](*args, ...) with the deepest software pipeline that fits in shared memory.

    Triton pipelines the loads of a loop `num_stages` deep (3 by default on recent GPUs); with
    large tiles the buffers need more shared memory than the GPU has, which Triton reports as
    `OutOfResources` at the first launch, before anything runs. The next shallower depth is then
    tried, and the depth that fitted is remembered per kernel and launch constants.
    """
    from triton.runtime.errors import OutOfResources

    key = (kernel.__name__, num_warps, tuple(sorted(constants.items())))
    if key in _depth_that_fits:
        kernel[grid](*args, num_warps=num_warps, num_stages=_depth_that_fits[key], **constants)
        return
    for depth in _PIPELINE_DEPTHS:
        try:
            kernel[grid](*args, num_warps=num_warps, num_stages=depth, **constants)
        except OutOfResources:
            if depth == _PIPELINE_DEPTHS[-1]:
                raise
            continue
        _depth_that_fits[key] = depth
        return


def _kernels():
    """Import the kernel modules; returns (chunk, decode).

    Triton picks compiled or interpreted kernels when `@triton.jit` runs, for its own
    library functions (tl.sum, tl.cumsum, ...) as well as ours. If TRITON_INTERPRET=1 was
    set after triton was imported, our kernels can be rebuilt (module reload) but Triton's
    library cannot, so that case is reported instead of failing inside the interpreter.
    """
    from cortexlab.kernels import gated_delta_chunk as chunk_mod
    from cortexlab.kernels import gated_delta_decode as decode_mod

    if os.environ.get("TRITON_INTERPRET") == "1":
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(tl.standard.sum, InterpretedFunction):
            raise RuntimeError(
                "TRITON_INTERPRET=1 was set after triton had been imported, so Triton's own "
                "functions were built for a GPU; set TRITON_INTERPRET=1 before importing "
                "triton (e.g. in the shell) or use backend='chunk'"
            )
        # our modules were imported before the variable was set: rebuild their kernels
        if not isinstance(chunk_mod._fwd_prep_kernel, InterpretedFunction):
            chunk_mod = importlib.reload(chunk_mod)
        if not isinstance(decode_mod._decode_step_kernel, InterpretedFunction):
            decode_mod = importlib.reload(decode_mod)
    return chunk_mod, decode_mod


def _check_device(device: torch.device) -> None:
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "backend='triton' got CPU tensors: Triton kernels run on CPU only in the "
                "interpreter. Set the environment variable TRITON_INTERPRET=1 (before importing "
                "triton) or use backend='chunk' (or 'auto')."
            )
    elif device.type != "cuda":
        raise RuntimeError(
            f"backend='triton' supports CUDA tensors (or CPU with TRITON_INTERPRET=1), got {device}; "
            "use backend='chunk'"
        )


def _check_chunk_size(chunk_size) -> None:
    if (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 16
            or chunk_size & (chunk_size - 1)):
        raise ValueError(
            f"chunk_size must be a power of two >= 16 for backend='triton' (tl.dot needs "
            f"16-row blocks), got {chunk_size!r}"
        )


class _DeviceGuard:
    """Make the tensors' CUDA device current while launching (no-op on CPU)."""

    def __init__(self, device: torch.device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


class TritonGatedDeltaRule(torch.autograd.Function):
    """Inputs [B,T,H,*] / [B,T,H], state [B,H,D_k,D_v]; returns (o in v's dtype, fp32 state)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, scale, chunk_size):
        chunk_mod, _ = _kernels()
        q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
        B, T, H, Dk = k.shape
        Dv = v.shape[-1]
        BK, BVF = _block(Dk), _block(Dv)
        C = _chunk_length(chunk_size, T, BK)
        N = -(-T // C)
        Tp = N * C
        BV = min(BVF, _MAX_BV)
        prec = _dot_precision(q.dtype, k.dtype, v.dtype)
        NV = -(-Dv // BV)
        BH = B * H
        f32 = dict(dtype=torch.float32, device=q.device)

        gamma = torch.empty(BH, Tp, **f32)
        tmat = torch.empty(BH, N, C, C, **f32)
        U = torch.empty(BH, Tp, Dv, **f32)
        Wk = torch.empty(BH, Tp, Dk, **f32)
        W = torch.empty(BH, Tp, Dv, **f32)
        hs = torch.empty(BH, N, Dk, Dv, **f32)
        ht = torch.empty(B, H, Dk, Dv, **f32)
        o = torch.empty_like(v)
        h0 = initial_state.to(torch.float32).contiguous() if initial_state is not None else None

        dims = (T, H, Dk, Dv, Tp, N)
        with _DeviceGuard(q.device):
            _launch(chunk_mod._fwd_prep_kernel, (N, BH),
                    k, v, g, beta, gamma, tmat, U, Wk, *dims,
                    C=C, BK=BK, BV=BVF, PREC=prec, num_warps=4)
            _launch(chunk_mod._fwd_state_kernel, (BH, NV),
                    k, gamma, U, Wk, W, hs, h0 if h0 is not None else ht, ht, *dims,
                    C=C, BK=BK, BV=BV, HAS_H0=h0 is not None, PREC=prec, num_warps=4)
            _launch(chunk_mod._fwd_output_kernel, (N, BH, NV),
                    q, k, gamma, W, hs, o, scale, *dims,
                    C=C, BK=BK, BV=BV, PREC=prec, num_warps=4)

        ctx.save_for_backward(q, k, v, beta, gamma, tmat, U, Wk, W, hs)
        ctx.meta = (scale, C, BK, BV, BVF, prec, g.dtype,
                    None if initial_state is None else initial_state.dtype)
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        chunk_mod, _ = _kernels()
        q, k, v, beta, gamma, tmat, U, Wk, W, hs = ctx.saved_tensors
        scale, C, BK, BV, BVF, prec, g_dtype, h0_dtype = ctx.meta
        B, T, H, Dk = k.shape
        Dv = v.shape[-1]
        BH, N = hs.shape[0], hs.shape[1]
        Tp = N * C
        NV = -(-Dv // BV)
        f32 = dict(dtype=torch.float32, device=q.device)

        do = torch.zeros_like(v) if do is None else do.contiguous()
        dht = None if dht is None else dht.to(torch.float32).contiguous()
        dW = torch.empty(BH, Tp, Dv, **f32)
        dhs = torch.empty(BH, N, Dk, Dv, **f32)
        dh0 = torch.empty(B, H, Dk, Dv, **f32)
        dq = torch.empty(B, T, H, Dk, **f32)
        dk = torch.empty(B, T, H, Dk, **f32)
        dv = torch.empty(B, T, H, Dv, **f32)
        dg = torch.empty(B, T, H, **f32)
        dbeta = torch.empty(B, T, H, **f32)

        dims = (scale, T, H, Dk, Dv, Tp, N)
        with _DeviceGuard(q.device):
            _launch(chunk_mod._bwd_state_kernel, (BH, NV),
                    q, k, do, gamma, Wk, dht if dht is not None else dh0, dW, dhs, dh0, *dims,
                    C=C, BK=BK, BV=BV, HAS_DHT=dht is not None, PREC=prec, num_warps=4)
            _launch(chunk_mod._bwd_chunk_kernel, (N, BH),
                    q, k, v, beta, do, gamma, tmat, U, Wk, W, hs, dW, dhs,
                    dq, dk, dv, dg, dbeta, *dims,
                    C=C, BK=BK, BV=BV, PREC=prec, num_warps=8)

        return (
            dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g_dtype), dbeta.to(beta.dtype),
            None if h0_dtype is None else dh0.to(h0_dtype),
            None, None,
        )


def triton_gated_delta_rule(q, k, v, g, beta, initial_state, scale, chunk_size):
    """Chunked gated delta rule on Triton kernels; inputs are validated by `gated_delta_rule`.

    Any T (the last chunk is masked, which equals exact zero padding), D_k != D_v and any
    head dims (padded inside to powers of two). `chunk_size` is an upper bound: see
    `_chunk_length` for when a smaller chunk is used. Returns (o [B,T,H,D_v] in v's dtype,
    final state [B,H,D_k,D_v] fp32); differentiable in q, k, v, g, beta and initial_state.
    """
    _check_chunk_size(chunk_size)
    _check_device(q.device)
    return TritonGatedDeltaRule.apply(q, k, v, g, beta, initial_state, float(scale), chunk_size)


def triton_gated_delta_step(q, k, v, g, beta, state, scale, *, inplace: bool = False):
    """One decode token on a fused kernel; shapes as `recurrent.gated_delta_step`.

    q, k: [B, H, D_k]; v: [B, H, D_v]; g, beta: [B, H]; state: [B, H, D_k, D_v].
    Returns (o [B, H, D_v] fp32, new state fp32). With inplace=True and a contiguous fp32
    `state`, the state is updated in place and returned. Not differentiable (inference).
    """
    if q.dim() != 3 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, H, D_k], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, H, Dk = k.shape
    if v.dim() != 3 or v.shape[:2] != (B, H):
        raise ValueError(f"v must be [B={B}, H={H}, D_v], got {tuple(v.shape)}")
    Dv = v.shape[-1]
    for name, x in (("g", g), ("beta", beta)):
        if tuple(x.shape) != (B, H):
            raise ValueError(f"{name} must be [B={B}, H={H}], got {tuple(x.shape)}")
    if tuple(state.shape) != (B, H, Dk, Dv):
        raise ValueError(f"state must be [B, H, D_k, D_v] = {(B, H, Dk, Dv)}, got {tuple(state.shape)}")
    _check_device(q.device)
    _, decode_mod = _kernels()

    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    in_place = inplace and state.dtype == torch.float32 and state.is_contiguous()
    src = state if state.dtype == torch.float32 and state.is_contiguous() else state.float().contiguous()
    dst = src if in_place else torch.empty_like(src)
    o = torch.empty(B, H, Dv, dtype=torch.float32, device=q.device)
    BK = _next_pow2(Dk)
    BV = min(_next_pow2(Dv), _MAX_BV)
    with _DeviceGuard(q.device):
        decode_mod._decode_step_kernel[(B * H, -(-Dv // BV))](
            q, k, v, g, beta, src, dst, o, float(scale), Dk, Dv, BK=BK, BV=BV, num_warps=4)
    return o, dst
