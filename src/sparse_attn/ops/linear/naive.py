"""Quadratic reference for linear attention: materialise A = phi(q) phi(k)^T (B, Hq, Nq, Nkv),
mask it (causal: key position <= query position, queries are the last Nq positions), and
normalise each row by its sum clamped to eps. O(N^2) time and memory; for tests only.
"""

from __future__ import annotations

import torch

from .chunk import accumulation_dtype, apply_feature_map, check_eps, check_qkv, resolve_feature_map

__all__ = ["linear_attention_naive"]


def linear_attention_naive(q, k, v, *, feature_map="elu", causal=False, eps=1e-6):
    """out = (A v) / max(A 1, eps) with A = phi(q) phi(k)^T, masked when causal.

    Same arguments and result as `linear_attention` (without chunking or states); k/v heads are
    repeated for GQA."""
    check_qkv(q, k, v, causal=causal)
    phi = resolve_feature_map(feature_map)
    eps = check_eps(eps)
    acc = accumulation_dtype(q.dtype)
    groups = q.shape[1] // k.shape[1]
    k_rep = k.to(acc).repeat_interleave(groups, dim=1)  # [B, Hq, Nkv, D]
    v_rep = v.to(acc).repeat_interleave(groups, dim=1)  # [B, Hq, Nkv, Dv]
    phi_q = apply_feature_map(phi, q.to(acc), "q")  # [B, Hq, Nq, F]
    phi_k = apply_feature_map(phi, k_rep, "k")  # [B, Hq, Nkv, F]
    weights = phi_q @ phi_k.transpose(-1, -2)  # [B, Hq, Nq, Nkv]
    if causal:
        q_len, kv_len = q.shape[2], k.shape[2]
        q_pos = torch.arange(q_len, device=q.device)[:, None] + (kv_len - q_len)
        visible = torch.arange(kv_len, device=q.device)[None, :] <= q_pos  # [Nq, Nkv]
        weights = weights * visible
    out = (weights @ v_rep) / weights.sum(-1, keepdim=True).clamp_min(eps)
    return out.to(q.dtype)
