"""Dense reference for Performer attention: materialise the kernel matrix
K_ij = phi(q_i)·phi(k_j) (B, Hq, Nq, Nkv) and normalise each row.

Softmax kernel: K is built in log space, log K_ij = logsumexp_f(log phi_f(q_i) + log phi_f(k_j)),
and normalised with a (masked) softmax over j, so no stabiliser and no eps are involved: this is
the exact value of the FAVOR+ estimator for the given features. relu kernel: K = phi(q) phi(k)^T,
rows divided by their sum clamped to eps, as in the fast path. O(Nq·Nkv·m) memory; tests only.
"""

from __future__ import annotations

import math

import torch

from ..common import accumulation_dtype, check_scale
from ..linear.chunk import check_eps, check_qkv
from .features import PerformerFeatures

__all__ = ["performer_attention_naive"]


def performer_attention_naive(q, k, v, features: PerformerFeatures, *, causal=False, eps=1e-6, scale=None):
    """The FAVOR+ output for these `features`, computed densely. Same shapes as
    `performer_attention`; k/v heads are repeated for GQA."""
    check_qkv(q, k, v, causal=causal)
    if not isinstance(features, PerformerFeatures):
        raise TypeError(f"features must be PerformerFeatures, got {type(features).__name__}")
    if features.head_dim != q.shape[3]:
        raise ValueError(f"features were drawn for head_dim={features.head_dim} but q has head_dim={q.shape[3]}")
    scale = check_scale(scale, q.shape[3])
    eps = check_eps(eps)
    acc = accumulation_dtype(q.dtype)
    root = scale ** 0.5
    groups = q.shape[1] // k.shape[1]
    q_acc = q.to(acc) * root
    k_rep = k.to(acc).repeat_interleave(groups, dim=1) * root  # [B, Hq, Nkv, D]
    v_rep = v.to(acc).repeat_interleave(groups, dim=1)  # [B, Hq, Nkv, Dv]
    q_len, kv_len = q.shape[2], k.shape[2]
    q_pos = torch.arange(q_len, device=q.device)[:, None] + (kv_len - q_len)
    visible = torch.arange(kv_len, device=q.device)[None, :] <= q_pos if causal else None  # [Nq, Nkv]
    if features.kernel == "softmax":
        log_q = features.log_features(q_acc)  # [B, Hq, Nq, m]
        log_k = features.log_features(k_rep)  # [B, Hq, Nkv, m]
        log_kernel = torch.logsumexp(log_q[..., :, None, :] + log_k[..., None, :, :], dim=-1)  # [B, Hq, Nq, Nkv]
        if visible is not None:
            log_kernel = log_kernel.masked_fill(~visible, float("-inf"))
        out = torch.softmax(log_kernel, dim=-1) @ v_rep
    else:
        inv_sqrt_m = 1.0 / math.sqrt(features.num_features)
        phi_q = torch.relu(features.projected(q_acc)) * inv_sqrt_m
        phi_k = torch.relu(features.projected(k_rep)) * inv_sqrt_m
        kernel = phi_q @ phi_k.transpose(-1, -2)  # [B, Hq, Nq, Nkv]
        if visible is not None:
            kernel = kernel * visible
        out = (kernel @ v_rep) / kernel.sum(-1, keepdim=True).clamp_min(eps)
    return out.to(q.dtype)
