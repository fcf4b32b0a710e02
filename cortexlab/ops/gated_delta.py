"""Public entry point: `gated_delta_rule`, input validation and backend dispatch."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cortexlab.checks import check_int, check_number

from .chunk import ChunkGatedDeltaRule
from .recurrent import recurrent_gated_delta_rule

BACKENDS = ("auto", "recurrent", "chunk", "triton")
HALF_DTYPES = (torch.float16, torch.bfloat16)
_FLOAT_DTYPES = (*HALF_DTYPES, torch.float32, torch.float64)


def _check_tensor(name: str, x, rank: int, dims: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {dims}, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have rank {rank} with layout {dims}, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16, bf16, fp32 or fp64), got {x.dtype}")
    if x.numel() and not all(map(math.isfinite, torch.aminmax(x.detach()))):
        # min and max are finite exactly when every element is (NaN propagates through both)
        raise ValueError(f"{name} contains NaN or infinite values")


def validate_inputs(q, k, v, g, beta, initial_state, *, scale, chunk_size, backend,
                    allow_neg_eigval) -> None:
    """Raise ValueError/TypeError naming the offending argument; touches no state."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check_tensor("q", q, 4, "[B, T, H, D_k]")
    _check_tensor("k", k, 4, "[B, T, H, D_k]")
    _check_tensor("v", v, 4, "[B, T, H, D_v]")
    _check_tensor("g", g, 3, "[B, T, H]")
    _check_tensor("beta", beta, 3, "[B, T, H]")
    B, T, H, Dk = k.shape
    if T == 0:
        raise ValueError("k has T = 0 tokens; the sequence must hold at least one token")
    if Dk == 0 or v.shape[-1] == 0:
        raise ValueError(f"head dimensions must be positive, got D_k={Dk}, D_v={v.shape[-1]}")
    if q.shape != k.shape:
        raise ValueError(f"q must have the same shape as k {tuple(k.shape)}, got {tuple(q.shape)}")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B={B}, T={T}, H={H}, D_v], got {tuple(v.shape)}")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, H):
            raise ValueError(f"{name} must be [B={B}, T={T}, H={H}], got {tuple(x.shape)}")
    if (g > 0).any():
        raise ValueError(f"g is the log of the forget gate and must be <= 0; max is {g.max().item():.4g}")
    beta_max = 2.0 if allow_neg_eigval else 1.0
    if (beta < 0).any() or (beta > beta_max).any():
        hint = "" if allow_neg_eigval else " (pass allow_neg_eigval=True to allow up to 2)"
        raise ValueError(
            f"beta must lie in [0, {beta_max:g}]{hint}; got range "
            f"[{beta.min().item():.4g}, {beta.max().item():.4g}]"
        )
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, 4, "[B, H, D_k, D_v]")
        expected = (B, H, Dk, v.shape[-1])
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"initial_state must have shape {expected}, got {tuple(initial_state.shape)}")
    check_number("scale", scale, 0, low_open=True, allow_none=True)
    check_int("chunk_size", chunk_size)
    devices = {x.device for x in (q, k, v, g, beta) + ((initial_state,) if initial_state is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


TRITON_MAX_FP32_HEAD_DIM = 64   # fp32 inputs above it: the torch chunked path's backward was faster on an H200


def resolve_backend(backend: str, device: torch.device, head_dim: int = 0, dtype: torch.dtype = torch.float32) -> str:
    """"auto" means the Triton kernels on CUDA and the torch chunked path otherwise, except that inputs wider than
    bf16/fp16 (`dtype`: the promoted dtype of q, k, v) with a head dim above TRITON_MAX_FP32_HEAD_DIM also go to
    the chunked path. Measured on an H200 at T=8192 H=16 D=128, with bf16 inputs and full fp32 products (what fp32
    inputs get): Triton forward 14.0 ms vs 20.9 ms, forward+backward 50.4 ms vs 33.8 ms; with the tf32 products of
    bf16/fp16 inputs Triton is faster in both, 1.4 ms and 20.9 ms. Head dims up to 64 were not timed against the
    torch path; they stay on Triton as before."""
    if backend == "auto":
        on_triton = device.type == "cuda" and (dtype in HALF_DTYPES or head_dim <= TRITON_MAX_FP32_HEAD_DIM)
        return "triton" if on_triton else "chunk"
    return backend


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
    use_qk_l2norm: bool = False,
    allow_neg_eigval: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule over a sequence; per head and token, with a_t = exp(g_t):

        S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T,     o_t = scale S_t^T q_t

    Args:
        q, k: [B, T, H, D_k]; v: [B, T, H, D_v]; g (log forget gate, <= 0) and beta: [B, T, H].
        scale: defaults to D_k ** -0.5.
        initial_state: [B, H, D_k, D_v] state before the first token (zeros if None).
        output_final_state: also return the fp32 state after the last token.
        chunk_size: tokens per chunk for the chunked backends (any T is accepted).
        backend: "recurrent" (sequential oracle), "chunk" (torch), "triton" (kernels; CPU
            tensors need TRITON_INTERPRET=1) or "auto" (triton on CUDA, except fp32 inputs with head dims above 64;
            chunk otherwise).
        use_qk_l2norm: L2-normalise q and k over D_k first (as transformers and fla do).
        allow_neg_eigval: accept beta in [0, 2] instead of [0, 1].

    Returns:
        (o [B, T, H, D_v] in v's dtype, final state [B, H, D_k, D_v] fp32 or None).
    """
    validate_inputs(q, k, v, g, beta, initial_state, scale=scale, chunk_size=chunk_size,
                    backend=backend, allow_neg_eigval=allow_neg_eigval)
    if scale is None:
        scale = k.shape[-1] ** -0.5
    if use_qk_l2norm:
        q = F.normalize(q.float(), dim=-1, eps=1e-6).to(q.dtype)
        k = F.normalize(k.float(), dim=-1, eps=1e-6).to(k.dtype)
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    backend = resolve_backend(backend, q.device, max(k.shape[-1], v.shape[-1]), dtype)
    if backend == "recurrent":
        o, state = recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state)
        o = o.to(v.dtype)
    elif backend == "chunk":
        o, state = ChunkGatedDeltaRule.apply(q, k, v, g, beta, initial_state, float(scale), chunk_size)
    else:
        from .triton_backend import triton_gated_delta_rule

        o, state = triton_gated_delta_rule(q, k, v, g, beta, initial_state, float(scale), chunk_size)
    return o, (state if output_final_state else None)
