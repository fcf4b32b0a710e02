"""Chunkwise-parallel gated delta rule in torch, with a hand-written backward.

Split the sequence into chunks of C tokens. Inside a chunk, with the cumulative log gate
gamma_i = sum_{j<=i} g_j, Gamma_i = exp(gamma_i) and the chunk-start state h, unrolling
S_t = a_t S_{t-1} + k_t w_t^T gives the pseudo-values w_t = beta_t (v_t - a_t S_{t-1}^T k_t):

    (I + A) W = diag(beta) V - diag(beta Gamma) K h,   A_ij = beta_i exp(gamma_i - gamma_j) k_i.k_j  (j < i)

so with the UT transform T = (I + A)^-1 (one triangular solve per chunk, all chunks at once)

    U = T diag(beta) V,  Wk = T diag(beta Gamma) K,  W = U - Wk h                 (WY form)
    O = scale (diag(Gamma) Q h + (Q K^T * M) W),      M_ij = exp(gamma_i - gamma_j)  (j <= i)
    h_next = Gamma_C h + (K * exp(gamma_C - gamma))^T W

Only the last two lines of state passing run sequentially over chunks; everything else is
batched over (batch, head, chunk). The backward runs the same recurrence in reverse for
dh and is otherwise batched too; no autograd graph is built through the chunk loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _to_chunks(x: torch.Tensor, chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, ...] -> [B, H, N, C, ...] in `dtype`, zero-padded to a multiple of C, contiguous
    (one copy here instead of one inside every matrix product that reads it).

    Zero padding is exact: a padded token has g = 0 (a = 1), beta = 0 and k = v = q = 0,
    so it neither changes the state nor produces output that is kept.
    """
    x = x.to(dtype).movedim(1, 2)  # [B, H, T, ...]
    T = x.shape[2]
    pad = (-T) % chunk_size
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.reshape(*x.shape[:2], -1, chunk_size, *x.shape[3:]).contiguous()


def _from_chunks(x: torch.Tensor, T: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, N, C, ...] -> [B, T, H, ...] in `dtype` (drops the padding)."""
    x = x.reshape(*x.shape[:2], -1, *x.shape[4:])[:, :, :T]
    return x.movedim(2, 1).to(dtype)


def intra_chunk(k: torch.Tensor, g: torch.Tensor, beta: torch.Tensor):
    """Per-chunk quantities of the UT transform, on k [..., C, D_k], g and beta [..., C].

    Returns gamma = cumsum(g) [..., C], the inclusive decay matrix M_ij = exp(gamma_i - gamma_j)
    [..., C, C] (zero above the diagonal), kkM = (K K^T * M) strictly below the diagonal (so A = diag(beta) kkM) and
    the UT transform T = (I + A)^-1, formed once by a unit-triangular solve so that both
    passes apply it (and its transpose) as plain matrix products.
    """
    C = g.shape[-1]
    gamma = g.cumsum(-1)
    inclusive = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
    diff = gamma[..., :, None] - gamma[..., None, :]
    M = diff.masked_fill(~inclusive, float("-inf")).exp()
    kkM = (k @ k.mT).mul_(M).tril_(-1)
    eye = torch.eye(C, dtype=k.dtype, device=k.device).expand_as(kkM)
    T = torch.linalg.solve_triangular(beta[..., :, None] * kkM, eye, upper=False, unitriangular=True)
    return gamma, M, kkM, T


def chunk_forward(q, k, v, g, beta, scale, h0):
    """Chunked forward on [B,H,N,C,*] tensors. Returns o, final state and what backward needs."""
    B, H, N, _, Dk = k.shape
    Dv = v.shape[-1]
    gamma, M, kkM, T = intra_chunk(k, g, beta)
    Gamma = gamma.exp()
    UW = T @ torch.cat([beta[..., None] * v, (beta * Gamma)[..., None] * k], dim=-1)
    U, Wk = UW.split([Dv, Dk], dim=-1)
    chunk_decay = Gamma[..., -1]                                   # [B,H,N]
    k_to_end = k * (gamma[..., -1:] - gamma).exp()[..., None]      # K * exp(gamma_C - gamma)

    hs = k.new_empty(B, H, N, Dk, Dv)  # state at the start of each chunk
    W = torch.empty_like(U)
    h = h0
    for n in range(N):
        hs[:, :, n] = h
        w = U[:, :, n] - Wk[:, :, n] @ h
        W[:, :, n] = w
        h = chunk_decay[:, :, n, None, None] * h + k_to_end[:, :, n].transpose(-1, -2) @ w

    P = (q @ k.mT).mul_(M).mul_(scale)
    o = (q @ hs).mul_(scale * Gamma[..., None]).add_(P @ W)
    return o, h, (gamma, M, kkM, T, UW, W, hs)


def chunk_backward(q, k, v, beta, scale, saved, do, dh_final):
    """Gradients of chunk_forward: (dq, dk, dv, dg, dbeta, dh0), same [B,H,N,C,*] layout.

    Temporaries are freed (or overwritten in place) after their last use: the [.., C, C]
    and [.., D_k, D_v] intermediates dominate peak memory on long sequences.
    """
    gamma, M, kkM, T, UW, W, hs = saved
    Dk, Dv = k.shape[-1], v.shape[-1]
    Wk = UW[..., Dv:]
    Gamma = gamma.exp()
    chunk_decay = Gamma[..., -1]
    decay_to_end = (gamma[..., -1:] - gamma).exp()[..., None]     # exp(gamma_C - gamma)
    k_to_end = k * decay_to_end
    scaled_Gamma = scale * Gamma[..., None]

    # o = scale Gamma q h + P W  with  P = scale (q k^T) * M
    P = (q @ k.mT).mul_(M).mul_(scale)
    dW = P.mT @ do                         # the output's share of dW; the loop adds the rest
    dP = do @ W.mT
    dPP = P.mul_(dP)                       # dP * P, in P's storage
    del P
    dgamma = dPP.sum(-1) - dPP.sum(-2) + (do * (q @ hs)).mul_(scaled_Gamma).sum(-1)
    del dPP
    dqk = dP.mul_(M).mul_(scale)           # dP * M * scale, in dP's storage
    del dP
    dq = (do @ hs.mT).mul_(scaled_Gamma).add_(dqk @ k)
    dk = dqk.mT @ q
    del dqk
    dh_carry = (q * scaled_Gamma).mT @ do  # d o / d h per chunk; becomes dh_next in the loop

    # reverse pass over chunks: W_n = U_n - Wk_n h_n,  h_{n+1} = Gamma_C h_n + Kd_n^T W_n.
    # Slot n of dh_carry is read for the update, then overwritten with the gradient of the
    # state at the end of chunk n (dh_next), which the terms below need.
    dh = dh_final
    for n in reversed(range(k.shape[2])):
        dw = dW[:, :, n].add_(k_to_end[:, :, n] @ dh)
        dh_prev = chunk_decay[:, :, n, None, None] * dh - Wk[:, :, n].mT @ dw + dh_carry[:, :, n]
        dh_carry[:, :, n] = dh
        dh = dh_prev
    dh0, dh_next = dh, dh_carry

    # state passing terms
    dk_to_end = W @ dh_next.mT
    dKK = (dk_to_end * k_to_end).sum(-1)
    dgamma -= dKK
    dgamma_last = dKK.sum(-1) + chunk_decay * (hs * dh_next).sum((-1, -2))
    dk += dk_to_end.mul_(decay_to_end)
    del dk_to_end, dh_next, dh_carry

    # UW = T rhs with T = (I + A)^-1: d rhs = T^T dUW,  dA = -(d rhs) UW^T
    dUW = torch.cat([dW, (dW @ hs.mT).neg_()], dim=-1)
    del dW
    drhs = T.mT @ dUW
    del dUW
    dA = (drhs @ UW.mT).tril_(-1).neg_()
    drhs_v, drhs_k = drhs.split([Dv, Dk], dim=-1)
    dv = beta[..., None] * drhs_v
    d_beta_gamma = (k * drhs_k).sum(-1)                 # gradient of beta_t Gamma_t
    dk += (beta * Gamma)[..., None] * drhs_k
    dbeta = (v * drhs_v).sum(-1) + d_beta_gamma * Gamma
    dgamma += d_beta_gamma * beta * Gamma
    del drhs, drhs_v, drhs_k

    # A_ij = beta_i (k_i . k_j) M_ij = beta_i kkM_ij, strictly lower
    beta_i = beta[..., :, None]
    dA_kkM = dA * kkM
    dbeta += dA_kkM.sum(-1)
    dAA = dA_kkM.mul_(beta_i)
    dgamma += dAA.sum(-1) - dAA.sum(-2)
    del dA_kkM, dAA
    dkk = dA.mul_(beta_i).mul_(M)                        # d (k_i . k_j) below the diagonal
    dk += dkk @ k
    dk += dkk.mT @ k

    dgamma[..., -1] += dgamma_last
    dg = dgamma.flip(-1).cumsum(-1).flip(-1)   # gamma = cumsum(g) within the chunk
    return dq, dk, dv, dg, dbeta, dh0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for half precision; float64 stays float64 (used by gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class ChunkGatedDeltaRule(torch.autograd.Function):
    """Autograd wrapper: inputs [B,T,H,*], state [B,H,D_k,D_v]; returns (o, final state)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, scale, chunk_size):
        T = q.shape[1]
        chunk_size = min(chunk_size, T)  # a sequence shorter than a chunk is one chunk
        dtype = compute_dtype(q.dtype)
        qc, kc, vc = (_to_chunks(x, chunk_size, dtype) for x in (q, k, v))
        gc, bc = (_to_chunks(x, chunk_size, dtype) for x in (g, beta))
        B, H, _, _, Dk = kc.shape
        h0 = (
            initial_state.to(dtype)
            if initial_state is not None
            else kc.new_zeros(B, H, Dk, vc.shape[-1])
        )
        o, h_final, saved = chunk_forward(qc, kc, vc, gc, bc, scale, h0)
        ctx.save_for_backward(qc, kc, vc, bc, *saved)
        ctx.meta = (T, scale, q.dtype, k.dtype, v.dtype, g.dtype, beta.dtype,
                    None if initial_state is None else initial_state.dtype)
        return _from_chunks(o, T, v.dtype), h_final

    @staticmethod
    def backward(ctx, do, dh_final):
        qc, kc, vc, bc, *saved = ctx.saved_tensors
        T, scale, q_dt, k_dt, v_dt, g_dt, b_dt, h0_dt = ctx.meta
        chunk_size = qc.shape[3]
        doc = _to_chunks(do, chunk_size, qc.dtype)
        if dh_final is None:
            dh_final = torch.zeros_like(saved[-1][:, :, 0])
        dq, dk, dv, dg, db, dh0 = chunk_backward(
            qc, kc, vc, bc, scale, saved, doc, dh_final.to(qc.dtype)
        )
        return (
            _from_chunks(dq, T, q_dt),
            _from_chunks(dk, T, k_dt),
            _from_chunks(dv, T, v_dt),
            _from_chunks(dg, T, g_dt),
            _from_chunks(db, T, b_dt),
            None if h0_dt is None else dh0.to(h0_dt),
            None,
            None,
        )
