"""Dense O(N^2) reference for routing attention (Roy et al. 2021).

From the same cluster memberships as `routing_attention` (same routing function, same
centroids), query i may attend to key j when some cluster holds i among its queries and j among
its keys (and j <= i under causal); one masked softmax over that N x N mask. Rows with nothing
allowed are 0 with lse -inf. With a key padding mask the memberships are those of each row
alone (pad tokens are in no cluster, so in no pair). For tests and small N only.
"""

from __future__ import annotations

import torch

from ..common import accumulation_dtype, softmax_with_lse
from .clusters import check_routing_args, cluster_members, member_masks


def routing_attention_naive(q, k, v, *, num_clusters=None, window=None, causal=False, scale=None, centroids=None,
                            return_lse=False, key_padding_mask=None):
    """Same arguments and result as `routing_attention`, computed with a dense mask."""
    scale, centroids, window, rows = check_routing_args(q, k, v, num_clusters=num_clusters, window=window,
                                                        causal=causal, scale=scale, centroids=centroids,
                                                        key_padding_mask=key_padding_mask)
    allowed = _pairs(q, k, centroids, window, causal, rows)  # [B, Hq, N, N]
    work = accumulation_dtype(q.dtype)
    group = q.shape[1] // k.shape[1]
    scores = torch.matmul(q.to(work), k.to(work).repeat_interleave(group, dim=1).transpose(-1, -2)) * scale
    probs, lse = softmax_with_lse(scores, allowed)
    out = torch.matmul(probs, v.to(work).repeat_interleave(group, dim=1)).to(q.dtype)
    return (out, lse) if return_lse else out


@torch.no_grad()
def routing_attended_pairs(q, k, *, num_clusters=None, window=None, causal=False, centroids=None,
                           key_padding_mask=None):
    """bool [B, Hq, N, N]: the pairs (query i, key j) `routing_attention` attends to with the same
    arguments (for evaluation at small N)."""
    _, centroids, window, rows = check_routing_args(q, k, None, num_clusters=num_clusters, window=window,
                                                    causal=causal, scale=None, centroids=centroids,
                                                    key_padding_mask=key_padding_mask)
    return _pairs(q, k, centroids, window, causal, rows)


def _pairs(q, k, centroids, window, causal, rows):
    n = q.shape[2]
    q_members, k_members = cluster_members(q, k, centroids, window, rows)  # empty slots (N) mark nothing
    in_q = member_masks(q_members, n).float()  # [B, Hq, C, N]
    in_k = member_masks(k_members, n).float()
    allowed = torch.matmul(in_q.transpose(-1, -2), in_k) > 0  # [B, Hq, N, N]: some cluster holds both
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return allowed
