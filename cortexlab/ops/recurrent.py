"""The gated delta rule as a plain sequential recurrence: the fp32 oracle.

Per batch, head and token, with the forget gate a_t = exp(g_t) and state S in [D_k, D_v]:

    S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T
    o_t = scale * S_t^T q_t

Every fast path in cortexlab is tested against `recurrent_gated_delta_rule`.
"""
from __future__ import annotations

import torch


def gated_delta_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence (the O(D_k D_v) decode step), in fp32 (fp64 stays fp64).

    q, k: [B, H, D_k]; v: [B, H, D_v]; g, beta: [B, H]; state: [B, H, D_k, D_v].
    Returns (o [B, H, D_v], new state [B, H, D_k, D_v]).
    """
    dt = torch.promote_types(state.dtype, torch.float32)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    decayed = g.to(dt).exp()[..., None, None] * state.to(dt)
    # error of the memory's prediction for this key: v_t - a_t S_{t-1}^T k_t
    delta = v - torch.einsum("bhkv,bhk->bhv", decayed, k)
    new_state = decayed + beta.to(dt)[..., None, None] * k[..., :, None] * delta[..., None, :]
    o = scale * torch.einsum("bhkv,bhk->bhv", new_state, q)
    return o, new_state


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `gated_delta_step` over T tokens. Layout [B, T, H, D]; returns (o, final state) in
    fp32 (fp64 when the inputs are fp64).

    Differentiable through ordinary autograd (it is the reference, not a fast path).
    """
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    dt = torch.promote_types(k.dtype, torch.float32)
    state = (
        torch.zeros(B, H, Dk, Dv, dtype=dt, device=k.device)
        if initial_state is None
        else initial_state.to(dt)
    )
    outputs = []
    for t in range(T):
        o_t, state = gated_delta_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state, scale)
        outputs.append(o_t)
    return torch.stack(outputs, dim=1), state
