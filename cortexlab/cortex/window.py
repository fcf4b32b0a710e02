"""Sliding-window causal attention: the sidecar's exact short-range path.

Each token attends to itself and the W-1 tokens before it:

    o_i = sum_j softmax_j(q_i . k_j / sqrt(D)) v_j,      i - W < j <= i, j not padding

A cache of the last W-1 keys and values ("win_k", "win_v" [B, H, W-1, D], with
"win_valid" [B, W-1] marking real tokens) carries the window across calls, so its size
is constant however long the session runs.
"""
from __future__ import annotations

import torch

QUERY_BLOCK = 64  # queries per block: scores are [B, H, 64, 64 + W - 1], little wasted beyond the band


def empty_window(B: int, H: int, D: int, window: int, like: torch.Tensor) -> dict:
    """The cache of a fresh sequence: W-1 slots, none valid."""
    zeros = like.new_zeros(B, H, window - 1, D)
    return {"win_k": zeros, "win_v": zeros.clone(),
            "win_valid": torch.zeros(B, window - 1, dtype=torch.bool, device=like.device)}


def sliding_window_attention(q, k, v, cache: dict, token_mask, window: int):
    """q, k, v [B,T,H,D]; returns (o [B,T,H,D], new cache). token_mask [B,T] bool or None."""
    B, T, H, D = q.shape
    P = window - 1
    if token_mask is None:
        token_mask = torch.ones(B, T, dtype=torch.bool, device=q.device)
    keys = torch.cat([cache["win_k"], k.transpose(1, 2)], dim=2)      # [B, H, P+T, D]
    values = torch.cat([cache["win_v"], v.transpose(1, 2)], dim=2)
    valid = torch.cat([cache["win_valid"], token_mask], dim=1)        # [B, P+T]
    queries = q.transpose(1, 2) * D ** -0.5
    outputs = []
    for s in range(0, T, QUERY_BLOCK):
        e = min(s + QUERY_BLOCK, T)
        # query s+i sits at slot P+s+i of `keys` and sees slots s+i .. P+s+i
        scores = queries[:, :, s:e] @ keys[:, :, s:e + P].transpose(-1, -2)   # [B, H, b, b+P]
        i = torch.arange(e - s, device=q.device)[:, None]
        j = torch.arange(e - s + P, device=q.device)[None, :]
        allowed = (j >= i) & (j <= i + P) & valid[:, None, None, s:e + P]
        # a finite fill keeps rows with no valid key (padding queries) NaN-free; they are zeroed below
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        outputs.append(scores.softmax(-1) @ values[:, :, s:e + P])
    o = torch.cat(outputs, dim=2).transpose(1, 2) * token_mask[..., None, None]
    # clones, so the cache never keeps the whole sequence's keys alive through a view
    new_cache = {"win_k": keys[:, :, keys.shape[2] - P:].clone(), "win_v": values[:, :, values.shape[2] - P:].clone(),
                 "win_valid": valid[:, valid.shape[1] - P:].clone()}
    return o, new_cache
