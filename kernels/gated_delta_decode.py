"""Fused single-token decode step of the gated delta rule (one Triton kernel).

Per batch and head, with a = exp(g) and the fp32 state S [D_k, D_v]:

    S' = a S + beta k (v - a S^T k)^T,        o = scale S'^T q

is O(D_k D_v) work with no reuse, so the kernel is memory bound: it reads S once, writes
S' once (in place when the caller passes the same buffer for both) and never materialises
the decayed state or the prediction error in global memory.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _decode_step_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr,     # q, k [BH, Dk]; v [BH, Dv]; g, beta [BH]
    state_ptr, new_state_ptr, o_ptr,          # state in / out [BH, Dk, Dv] fp32 (may alias); o [BH, Dv]
    scale, Dk, Dv,
    BK: tl.constexpr, BV: tl.constexpr,
):
    """One program per (batch*head, block of BV value columns); the key dim is held whole.

    Columns of the state are independent in this update (the error v - a S^T k is computed
    column by column), so splitting D_v across programs needs no communication.
    """
    # -- which (batch, head) and which value columns
    bh = tl.program_id(0).to(tl.int64)
    iv = tl.program_id(1)
    dk = tl.arange(0, BK)
    dv = iv * BV + tl.arange(0, BV)
    kmask = dk < Dk
    vmask = dv < Dv
    smask = kmask[:, None] & vmask[None, :]
    soffs = bh * Dk * Dv + dk[:, None] * Dv + dv[None, :]

    # -- load the token (fp32) and the state block
    q = tl.load(q_ptr + bh * Dk + dk, mask=kmask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + bh * Dk + dk, mask=kmask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + bh * Dv + dv, mask=vmask, other=0.0).to(tl.float32)
    a = tl.exp(tl.load(g_ptr + bh).to(tl.float32))
    beta = tl.load(beta_ptr + bh).to(tl.float32)
    S = tl.load(state_ptr + soffs, mask=smask, other=0.0)

    # -- decay, then the delta-rule correction: error = v - (a S)^T k
    S = a * S
    err = v - tl.sum(S * k[:, None], axis=0)
    S = S + beta * k[:, None] * err[None, :]

    # -- read out with the updated state and write both back
    o = scale * tl.sum(S * q[:, None], axis=0)
    tl.store(new_state_ptr + soffs, S, mask=smask)
    tl.store(o_ptr + bh * Dv + dv, o, mask=vmask)
