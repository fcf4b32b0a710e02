"""Sliding-window causal attention: the sidecar's exact short-range path.

Each token attends to itself and the W-1 tokens before it:

    o_i = sum_j softmax_j(q_i . k_j / sqrt(D)) v_j,      i - W < j <= i, j not padding

A cache of the last W-1 keys and values ("win_k", "win_v" [B, H, W-1, D], with
"win_valid" [B, W-1] marking real tokens) carries the window across calls, so its size
is constant however long the session runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

QUERY_BLOCK = 64  # queries per block: scores are [B, H, 64, 64 + W - 1], little wasted beyond the band


def empty_window(B: int, H: int, D: int, window: int, like: torch.Tensor) -> dict:
    """The cache of a fresh sequence: W-1 slots, none valid."""
    zeros = like.new_zeros(B, H, window - 1, D)
    return {"win_k": zeros, "win_v": zeros.clone(),
            "win_valid": torch.zeros(B, window - 1, dtype=torch.bool, device=like.device)}


def sliding_window_attention(q, k, v, cache: dict, token_mask, window: int):
    """q, k, v [B,T,H,D]; returns (o [B,T,H,D], new cache). token_mask [B,T] bool or None.

    One fused `scaled_dot_product_attention` per block of QUERY_BLOCK queries over the keys
    of its band (about 2-3x faster on a CPU than scores, mask, softmax and product as four ops).
    """
    B, T, H, D = q.shape
    P = window - 1
    if token_mask is None:
        token_mask = torch.ones(B, T, dtype=torch.bool, device=q.device)
    keys = torch.cat([cache["win_k"], k.transpose(1, 2)], dim=2)      # [B, H, P+T, D]
    values = torch.cat([cache["win_v"], v.transpose(1, 2)], dim=2)
    valid = torch.cat([cache["win_valid"], token_mask], dim=1)        # [B, P+T]
    queries = q.transpose(1, 2)
    # query s+i sits at slot P+s+i of `keys` and sees slots s+i .. P+s+i: a band, the same for every block
    i = torch.arange(QUERY_BLOCK, device=q.device)[:, None]
    j = torch.arange(QUERY_BLOCK + P, device=q.device)[None, :]
    band = (j >= i) & (j <= i + P)
    outputs = []
    for s in range(0, T, QUERY_BLOCK):
        e = min(s + QUERY_BLOCK, T)
        # a padding query keeps its whole band (a row with no key would be NaN); it is zeroed below
        seen = valid[:, None, None, s:e + P] | ~token_mask[:, None, s:e, None]
        allowed = band[:e - s, :e - s + P] & seen                      # [B, 1, b, b+P]
        outputs.append(F.scaled_dot_product_attention(queries[:, :, s:e], keys[:, :, s:e + P],
                                                      values[:, :, s:e + P], attn_mask=allowed))
    o = torch.cat(outputs, dim=2).transpose(1, 2) * token_mask[..., None, None]
    # clones, so the cache never keeps the whole sequence's keys alive through a view
    new_cache = {"win_k": keys[:, :, keys.shape[2] - P:].clone(), "win_v": values[:, :, values.shape[2] - P:].clone(),
                 "win_valid": valid[:, valid.shape[1] - P:].clone()}
    return o, new_cache
