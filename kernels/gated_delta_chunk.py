"""Triton kernels for the chunked gated delta rule (forward and backward).

The math is the one of `cortexlab.ops.chunk` (read its docstring first). Per (batch, head)
the sequence is cut into chunks of C tokens; with gamma = cumsum(g) inside a chunk,
Gamma = exp(gamma), the chunk-start state h and the UT transform T = (I + A)^-1,

    A_ij = beta_i exp(gamma_i - gamma_j) k_i.k_j        (j < i, strictly lower)
    U = T diag(beta) V,   Wk = T diag(beta Gamma) K,   W = U - Wk h
    O = scale (diag(Gamma) Q h + (Q K^T * M) W),       M_ij = exp(gamma_i - gamma_j) (j <= i)
    h_next = Gamma_C h + (K * exp(gamma_C - gamma))^T W

The work is split into five kernels; only two of them loop over chunks:

    forward   1. `_fwd_prep_kernel`   grid (N, B*H)        gamma, T, U, Wk per chunk   (parallel)
              2. `_fwd_state_kernel`  grid (B*H, Dv/BV)    chunk loop: hs, W, final h  (sequential)
              3. `_fwd_output_kernel` grid (N, B*H, Dv/BV) O from hs and W             (parallel)
    backward  4. `_bwd_state_kernel`  grid (B*H, Dv/BV)    reverse chunk loop: dW, dh  (sequential)
              5. `_bwd_chunk_kernel`  grid (N, B*H)        dq, dk, dv, dg, dbeta       (parallel;
                                                           walks D_v in BV blocks)

Conventions shared by all kernels:
- q, k, v, do and the gradients dq, dk, dv live in the caller's [B, T, H, D] layout
  (contiguous); g, beta, dg, dbeta in [B, T, H]. Tokens t >= T are masked on load with
  zeros, which is the exact zero padding of `chunk._to_chunks` (g = 0, beta = 0, q = k = v = 0).
- Head dims are padded to powers of two (BK >= D_k, BV >= D_v, at least 16 for tl.dot)
  by masking; padded rows/columns are zero and never stored.
- Intermediates (gamma, T, U, Wk, W, hs, dW, dh) are fp32 buffers indexed by bh = b*H + h
  over the padded length Tp = N*C: gamma [BH, Tp], T [BH, N, C, C], U/W/dW [BH, Tp, D_v],
  Wk [BH, Tp, D_k], hs/dhs [BH, N, D_k, D_v].
- Everything is computed in fp32 and every tl.dot uses `PREC`: "ieee" (full fp32 products)
  or "tf32", chosen from the input dtypes by `triton_backend._dot_precision`.
- Exponentials only ever see gamma_i - gamma_j with j <= i (masked to 0 *before* exp)
  or gamma_C - gamma_j, both <= 0 because g <= 0, so nothing overflows.
"""
from __future__ import annotations

import triton
import triton.language as tl


# --------------------------------------------------------------------------- helpers


@triton.jit
def _load_tokens(ptr, b, h, t, T, H, D, d, BLOCK_D_MASK):
    """Load a [C, BD] tile of a [B, T, H, D] tensor as fp32; zero outside t < T and d < D."""
    offs = ((b * T + t[:, None]) * H + h) * D + d[None, :]
    mask = (t[:, None] < T) & BLOCK_D_MASK[None, :]
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_gate(ptr, b, h, t, T, H):
    """Load a [C] slice of a [B, T, H] tensor (g or beta) as fp32; zero for t >= T."""
    return tl.load(ptr + (b * T + t) * H + h, mask=t < T, other=0.0).to(tl.float32)


@triton.jit
def _decay_matrix(gamma, rows, cols, STRICT: tl.constexpr):
    """M_ij = exp(gamma_i - gamma_j) on (j <= i) or (j < i, STRICT), 0 above; masked before exp."""
    if STRICT:
        keep = rows[:, None] > cols[None, :]
    else:
        keep = rows[:, None] >= cols[None, :]
    diff = tl.where(keep, gamma[:, None] - gamma[None, :], 0.0)
    return tl.where(keep, tl.exp(diff), 0.0)


# --------------------------------------------------------------------------- forward


@triton.jit
def _fwd_prep_kernel(
    k_ptr, v_ptr, g_ptr, beta_ptr,            # inputs [B,T,H,*], [B,T,H]
    gamma_ptr, tmat_ptr, u_ptr, wk_ptr,       # outputs [BH,Tp], [BH,N,C,C], [BH,Tp,Dv], [BH,Tp,Dk]
    T, H, Dk, Dv, Tp, N,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Per chunk (one program each): gamma, the UT transform T = (I+A)^-1, U and Wk."""
    # -- which chunk / (batch, head) this program owns; int64 offsets for large tensors
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = tl.arange(0, C)
    cols = tl.arange(0, C)
    t = n * C + rows
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)

    # -- load the chunk: keys, values, log gates and betas (zero past T)
    k = _load_tokens(k_ptr, b, h, t, T, H, Dk, dk, dk < Dk)
    v = _load_tokens(v_ptr, b, h, t, T, H, Dv, dv, dv < Dv)
    g = _load_gate(g_ptr, b, h, t, T, H)
    beta = _load_gate(beta_ptr, b, h, t, T, H)

    # -- cumulative log decay inside the chunk
    gamma = tl.cumsum(g, axis=0)

    # -- A = diag(beta) ((K K^T) * M) strictly below the diagonal
    kk = tl.dot(k, tl.trans(k), input_precision=PREC)
    A = beta[:, None] * kk * _decay_matrix(gamma, rows, cols, True)

    # -- T = (I + A)^-1 by forward substitution, one row at a time:
    #    T_i = e_i - sum_{j<i} A_ij T_j  (rows j < i are final when row i is formed)
    tm = tl.where(rows[:, None] == cols[None, :], 1.0, 0.0)
    for i in range(1, C):
        a_i = tl.sum(tl.where(rows[:, None] == i, A, 0.0), axis=0)      # row i of A, over j
        r = tl.sum(a_i[:, None] * tm, axis=0)                           # sum_j A_ij T_j
        tm = tl.where(rows[:, None] == i, tm - r[None, :], tm)          # T_i = e_i - r

    # -- WY form: U = T diag(beta) V and Wk = T diag(beta Gamma) K
    u = tl.dot(tm, beta[:, None] * v, input_precision=PREC)
    wk = tl.dot(tm, (beta * tl.exp(gamma))[:, None] * k, input_precision=PREC)

    # -- store the per-chunk intermediates (padded tokens included: they are exact zeros / identity)
    tl.store(gamma_ptr + bh * Tp + t, gamma)
    tl.store(tmat_ptr + ((bh * N + n) * C + rows[:, None]) * C + cols[None, :], tm)
    tl.store(u_ptr + (bh * Tp + t[:, None]) * Dv + dv[None, :], u, mask=(dv < Dv)[None, :])
    tl.store(wk_ptr + (bh * Tp + t[:, None]) * Dk + dk[None, :], wk, mask=(dk < Dk)[None, :])


@triton.jit
def _fwd_state_kernel(
    k_ptr, gamma_ptr, u_ptr, wk_ptr,          # inputs
    w_ptr, hs_ptr, h0_ptr, ht_ptr,            # outputs W [BH,Tp,Dv], hs [BH,N,Dk,Dv]; h0/ht [BH,Dk,Dv]
    T, H, Dk, Dv, Tp, N,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, PREC: tl.constexpr,
):
    """Sequential state passing for one (batch, head) and one block of BV value columns.

    The columns of the state evolve independently (W = U - Wk h acts column-wise), so the
    value dimension is split across programs; the key dimension is held whole.
    """
    bh = tl.program_id(0).to(tl.int64)
    iv = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.arange(0, C)
    dk = tl.arange(0, BK)
    dv = iv * BV + tl.arange(0, BV)
    kmask = dk < Dk
    vmask = dv < Dv
    state_offs = dk[:, None] * Dv + dv[None, :]
    state_mask = kmask[:, None] & vmask[None, :]

    # -- the state h [BK, BV] lives in registers for the whole sequence
    if HAS_H0:
        state = tl.load(h0_ptr + bh * Dk * Dv + state_offs, mask=state_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)

    for n in range(0, N):
        t = n * C + rows
        # -- remember the chunk-start state for the output kernel and the backward
        tl.store(hs_ptr + (bh * N + n) * Dk * Dv + state_offs, state, mask=state_mask)

        # -- pseudo-values of the chunk: W = U - Wk h
        u = tl.load(u_ptr + (bh * Tp + t[:, None]) * Dv + dv[None, :], mask=vmask[None, :], other=0.0)
        wk = tl.load(wk_ptr + (bh * Tp + t[:, None]) * Dk + dk[None, :], mask=kmask[None, :], other=0.0)
        w = u - tl.dot(wk, state, input_precision=PREC)
        tl.store(w_ptr + (bh * Tp + t[:, None]) * Dv + dv[None, :], w, mask=vmask[None, :])

        # -- advance: h = Gamma_C h + (K * exp(gamma_C - gamma))^T W
        gamma = tl.load(gamma_ptr + bh * Tp + t)
        gamma_last = tl.load(gamma_ptr + bh * Tp + n * C + C - 1)
        k = _load_tokens(k_ptr, b, h, t, T, H, Dk, dk, kmask)
        k_to_end = k * tl.exp(gamma_last - gamma)[:, None]
        state = tl.exp(gamma_last) * state + tl.dot(tl.trans(k_to_end), w, input_precision=PREC)

    # -- final state (always stored: it is returned as fp32)
    tl.store(ht_ptr + bh * Dk * Dv + state_offs, state, mask=state_mask)


@triton.jit
def _fwd_output_kernel(
    q_ptr, k_ptr, gamma_ptr, w_ptr, hs_ptr,   # inputs
    o_ptr,                                    # output [B,T,H,Dv] in the caller's dtype
    scale, T, H, Dk, Dv, Tp, N,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """O = scale (diag(Gamma) Q h + (Q K^T * M) W) for one chunk and BV value columns."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    iv = tl.program_id(2)
    b = bh // H
    h = bh % H
    rows = tl.arange(0, C)
    t = n * C + rows
    dk = tl.arange(0, BK)
    dv = iv * BV + tl.arange(0, BV)
    kmask = dk < Dk
    vmask = dv < Dv

    # -- load the chunk's queries, keys, decays, pseudo-values and start state
    q = _load_tokens(q_ptr, b, h, t, T, H, Dk, dk, kmask)
    k = _load_tokens(k_ptr, b, h, t, T, H, Dk, dk, kmask)
    gamma = tl.load(gamma_ptr + bh * Tp + t)
    w = tl.load(w_ptr + (bh * Tp + t[:, None]) * Dv + dv[None, :], mask=vmask[None, :], other=0.0)
    state = tl.load(hs_ptr + (bh * N + n) * Dk * Dv + dk[:, None] * Dv + dv[None, :],
                    mask=kmask[:, None] & vmask[None, :], other=0.0)

    # -- intra-chunk attention P = scale (Q K^T) * M (causal, decayed)
    P = scale * tl.dot(q, tl.trans(k), input_precision=PREC) * _decay_matrix(gamma, rows, rows, False)

    # -- inter-chunk part from the start state plus intra-chunk part
    o = scale * tl.exp(gamma)[:, None] * tl.dot(q, state, input_precision=PREC)
    o += tl.dot(P, w, input_precision=PREC)

    offs = ((b * T + t[:, None]) * H + h) * Dv + dv[None, :]
    tl.store(o_ptr + offs, o.to(o_ptr.dtype.element_ty), mask=(t[:, None] < T) & vmask[None, :])


# --------------------------------------------------------------------------- backward


@triton.jit
def _bwd_state_kernel(
    q_ptr, k_ptr, do_ptr, gamma_ptr, wk_ptr,  # inputs
    dht_ptr,                                  # gradient of the final state [BH,Dk,Dv] (if HAS_DHT)
    dw_ptr, dhs_ptr, dh0_ptr,                 # outputs dW [BH,Tp,Dv], dhs [BH,N,Dk,Dv], dh0 [BH,Dk,Dv]
    scale, T, H, Dk, Dv, Tp, N,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DHT: tl.constexpr, PREC: tl.constexpr,
):
    """Reverse pass over chunks carrying dh (the gradient of the chunk-start state).

    Reverses   W_n = U_n - Wk_n h_n,   h_{n+1} = Gamma_C h_n + Kd_n^T W_n,
               O_n = scale Gamma Q_n h_n + P_n W_n:
        dW_n = P_n^T dO_n + Kd_n dh_{n+1}
        dh_n = Gamma_C dh_{n+1} - Wk_n^T dW_n + (scale Gamma Q_n)^T dO_n
    and stores dW_n and dh_{n+1} (the gradient of the state at the end of chunk n).
    """
    bh = tl.program_id(0).to(tl.int64)
    iv = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.arange(0, C)
    dk = tl.arange(0, BK)
    dv = iv * BV + tl.arange(0, BV)
    kmask = dk < Dk
    vmask = dv < Dv
    state_offs = dk[:, None] * Dv + dv[None, :]
    state_mask = kmask[:, None] & vmask[None, :]

    # -- dh starts as the gradient of the final state (or zero)
    if HAS_DHT:
        dstate = tl.load(dht_ptr + bh * Dk * Dv + state_offs, mask=state_mask, other=0.0).to(tl.float32)
    else:
        dstate = tl.zeros([BK, BV], dtype=tl.float32)

    for i in range(0, N):
        n = N - 1 - i
        t = n * C + rows
        tl.store(dhs_ptr + (bh * N + n) * Dk * Dv + state_offs, dstate, mask=state_mask)

        # -- reload the chunk and rebuild P and the decays
        q = _load_tokens(q_ptr, b, h, t, T, H, Dk, dk, kmask)
        k = _load_tokens(k_ptr, b, h, t, T, H, Dk, dk, kmask)
        do = _load_tokens(do_ptr, b, h, t, T, H, Dv, dv, vmask)
        gamma = tl.load(gamma_ptr + bh * Tp + t)
        gamma_last = tl.load(gamma_ptr + bh * Tp + n * C + C - 1)
        P = scale * tl.dot(q, tl.trans(k), input_precision=PREC) * _decay_matrix(gamma, rows, rows, False)
        k_to_end = k * tl.exp(gamma_last - gamma)[:, None]

        # -- dW = P^T dO + Kd dh_next
        dw = tl.dot(tl.trans(P), do, input_precision=PREC)
        dw += tl.dot(k_to_end, dstate, input_precision=PREC)
        tl.store(dw_ptr + (bh * Tp + t[:, None]) * Dv + dv[None, :], dw, mask=vmask[None, :])

        # -- dh = Gamma_C dh - Wk^T dW + (scale Gamma Q)^T dO
        wk = tl.load(wk_ptr + (bh * Tp + t[:, None]) * Dk + dk[None, :], mask=kmask[None, :], other=0.0)
        q_dec = scale * tl.exp(gamma)[:, None] * q
        dstate = (tl.exp(gamma_last) * dstate
                  - tl.dot(tl.trans(wk), dw, input_precision=PREC)
                  + tl.dot(tl.trans(q_dec), do, input_precision=PREC))

    tl.store(dh0_ptr + bh * Dk * Dv + state_offs, dstate, mask=state_mask)


@triton.jit
def _bwd_chunk_kernel(
    q_ptr, k_ptr, v_ptr, beta_ptr, do_ptr,            # inputs [B,T,H,*]
    gamma_ptr, tmat_ptr, u_ptr, wk_ptr, w_ptr,        # saved forward intermediates
    hs_ptr, dw_ptr, dhs_ptr,                          # states and the reverse-pass results
    dq_ptr, dk_ptr, dv_ptr, dg_ptr, dbeta_ptr,        # fp32 outputs [B,T,H,*] / [B,T,H]
    scale, T, H, Dk, Dv, Tp, N,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """All per-chunk gradient terms, one program per chunk (same steps as chunk_backward).

    The key dim is held whole ([C, BK] tiles); the value dim is walked in blocks of BV
    columns, and every product that contracts over it is accumulated across the blocks,
    which bounds the number of live tiles (registers / shared memory on a GPU).
    """
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = tl.arange(0, C)
    cols = tl.arange(0, C)
    t = n * C + rows
    tmask = t < T
    dk = tl.arange(0, BK)
    kmask = dk < Dk
    buf_k = (bh * Tp + t[:, None]) * Dk + dk[None, :]

    # -- load what spans the key dim: q, k, beta, decays, the UT transform T and Wk
    q = _load_tokens(q_ptr, b, h, t, T, H, Dk, dk, kmask)
    k = _load_tokens(k_ptr, b, h, t, T, H, Dk, dk, kmask)
    beta = _load_gate(beta_ptr, b, h, t, T, H)
    gamma = tl.load(gamma_ptr + bh * Tp + t)
    gamma_last = tl.load(gamma_ptr + bh * Tp + n * C + C - 1)
    tm = tl.load(tmat_ptr + ((bh * N + n) * C + rows[:, None]) * C + cols[None, :])
    wk = tl.load(wk_ptr + buf_k, mask=kmask[None, :], other=0.0)
    Gamma = tl.exp(gamma)
    M = _decay_matrix(gamma, rows, cols, False)

    # -- accumulators of the contractions over the value dim
    do_hsT = tl.zeros([C, BK], dtype=tl.float32)      # dO h^T
    dP = tl.zeros([C, C], dtype=tl.float32)           # dO W^T
    dk_to_end = tl.zeros([C, BK], dtype=tl.float32)   # W dh_next^T
    dwk = tl.zeros([C, BK], dtype=tl.float32)         # dWk = -dW h^T
    dA = tl.zeros([C, C], dtype=tl.float32)           # -(d rhs) [U, Wk]^T, value half
    dbeta = tl.zeros([C], dtype=tl.float32)           # v . (d rhs_v)
    hs_dhs = tl.zeros([BK], dtype=tl.float32)         # <h, dh_next>, reduced over keys at the end

    for v0 in range(0, Dv, BV):
        # -- one block of value columns: inputs, intermediates, states
        dv = v0 + tl.arange(0, BV)
        vmask = dv < Dv
        buf_v = (bh * Tp + t[:, None]) * Dv + dv[None, :]
        state_offs = (bh * N + n) * Dk * Dv + dk[:, None] * Dv + dv[None, :]
        state_mask = kmask[:, None] & vmask[None, :]
        v = _load_tokens(v_ptr, b, h, t, T, H, Dv, dv, vmask)
        do = _load_tokens(do_ptr, b, h, t, T, H, Dv, dv, vmask)
        u = tl.load(u_ptr + buf_v, mask=vmask[None, :], other=0.0)
        w = tl.load(w_ptr + buf_v, mask=vmask[None, :], other=0.0)
        dw = tl.load(dw_ptr + buf_v, mask=vmask[None, :], other=0.0)
        hs = tl.load(hs_ptr + state_offs, mask=state_mask, other=0.0)
        dhs = tl.load(dhs_ptr + state_offs, mask=state_mask, other=0.0)   # gradient of the end state

        # -- output terms (O = scale Gamma Q h + P W) and state passing (h_next = ... + Kd^T W)
        do_hsT += tl.dot(do, tl.trans(hs), input_precision=PREC)
        dP += tl.dot(do, tl.trans(w), input_precision=PREC)
        dk_to_end += tl.dot(w, tl.trans(dhs), input_precision=PREC)
        hs_dhs += tl.sum(hs * dhs, axis=1)

        # -- value half of the UT transform: U = T (beta V)  =>  d(beta V) = T^T dW
        dwk -= tl.dot(dw, tl.trans(hs), input_precision=PREC)
        drhs_v = tl.dot(tl.trans(tm), dw, input_precision=PREC)
        dA -= tl.dot(drhs_v, tl.trans(u), input_precision=PREC)
        dbeta += tl.sum(v * drhs_v, axis=1)
        tl.store(dv_ptr + ((b * T + t[:, None]) * H + h) * Dv + dv[None, :], beta[:, None] * drhs_v,
                 mask=tmask[:, None] & vmask[None, :])

    # -- output terms: dq, dk and dgamma from O = scale Gamma Q h + P W, P = scale (Q K^T) * M
    P = scale * tl.dot(q, tl.trans(k), input_precision=PREC) * M
    dq_inter = scale * Gamma[:, None] * do_hsT
    dqk = dP * M * scale
    dq = dq_inter + tl.dot(dqk, k, input_precision=PREC)
    dkey = tl.dot(tl.trans(dqk), q, input_precision=PREC)
    dPP = dP * P
    dgamma = tl.sum(q * dq_inter, axis=1) + tl.sum(dPP, axis=1) - tl.sum(dPP, axis=0)

    # -- state passing: h_next = Gamma_C h + (K * exp(gamma_C - gamma))^T W
    k_decay = tl.exp(gamma_last - gamma)
    dKK = dk_to_end * (k * k_decay[:, None])
    dkey += dk_to_end * k_decay[:, None]
    dgamma -= tl.sum(dKK, axis=1)
    dgamma_last = tl.sum(tl.sum(dKK, axis=1), axis=0) + tl.exp(gamma_last) * tl.sum(hs_dhs, axis=0)

    # -- key half of the UT transform: Wk = T (beta Gamma K)  =>  d(beta Gamma K) = T^T dWk
    drhs_k = tl.dot(tl.trans(tm), dwk, input_precision=PREC)
    dA -= tl.dot(drhs_k, tl.trans(wk), input_precision=PREC)
    dA = tl.where(rows[:, None] > cols[None, :], dA, 0.0)   # A is strictly lower

    # -- rhs = [beta V, beta Gamma K]
    d_beta_gamma = tl.sum(k * drhs_k, axis=1)
    dkey += (beta * Gamma)[:, None] * drhs_k
    dbeta += d_beta_gamma * Gamma
    dgamma += d_beta_gamma * beta * Gamma

    # -- A_ij = beta_i (k_i . k_j) M_ij, strictly lower
    kkM = tl.dot(k, tl.trans(k), input_precision=PREC) * M
    dA_kkM = dA * kkM
    dbeta += tl.sum(dA_kkM, axis=1)
    dAA = dA_kkM * beta[:, None]
    dgamma += tl.sum(dAA, axis=1) - tl.sum(dAA, axis=0)
    dkk = dA * beta[:, None] * M
    dkey += tl.dot(dkk, k, input_precision=PREC) + tl.dot(tl.trans(dkk), k, input_precision=PREC)

    # -- gamma = cumsum(g): dg_i = sum_{j >= i} dgamma_j (gamma_C also gets the state terms)
    dgamma += tl.where(rows == C - 1, dgamma_last, 0.0)
    dg = tl.cumsum(dgamma, axis=0, reverse=True)

    # -- store real tokens only
    tok_k = ((b * T + t[:, None]) * H + h) * Dk + dk[None, :]
    tl.store(dq_ptr + tok_k, dq, mask=tmask[:, None] & kmask[None, :])
    tl.store(dk_ptr + tok_k, dkey, mask=tmask[:, None] & kmask[None, :])
    tl.store(dg_ptr + (b * T + t) * H + h, dg, mask=tmask)
    tl.store(dbeta_ptr + (b * T + t) * H + h, dbeta, mask=tmask)
