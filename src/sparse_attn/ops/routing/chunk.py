"""Routing Transformer attention, gathered per cluster (Roy, Saffar, Vaswani, Grangier 2021,
"Efficient Content-Based Sparse Attention with Routing Transformers").

Queries and keys are routed to k-means clusters by cosine similarity to shared centroids
(clusters.py; balanced: each cluster takes its top-`window` queries and top-`window` keys). The
queries of cluster c attend to the keys of cluster c: scores [B, H, C, window, window], so memory
is O(num_clusters * window^2), never N x N.

Choices (naive.py follows the same ones):
* causal: a query at position i sees the cluster's keys at positions <= i (original positions).
  Membership itself is decided from all positions (as in the paper), only the attention is causal:
  each cluster takes the top-`window` tokens of the whole sequence (and centroids=None takes the
  centroids from keys across it), so a later token changes which earlier keys a query shares a
  cluster with, and earlier outputs. A causal LM trained with it can read the future through
  membership, and token-by-token decoding cannot equal the full forward (`nn.SparseCausalLM`
  refuses it unless `ModelConfig(leaky_mechanisms=["routing"])`; no KV cache decodes it).
* A token that is a query of several clusters attends to the union of those clusters' keys, each
  key counted once: a pair seen by m clusters has its score lowered by log(m) in each, so the
  log-sum-exp merge of the clusters is exactly softmax over the union (`routing_attended_pairs`).
* A token that is the query of no cluster (or sees no key there under causal) gets output 0 and
  lse -inf. The paper mixes routing heads with local-attention heads, which cover such tokens.
* No self mask: q and k are separate (a token attends to its own key if both are in a cluster).
* centroids=None: the normalised keys at evenly spaced positions of each sequence (deterministic,
  per sequence and kv head); pass a `RoutingCentroids` (updated by its `update`) for learned ones.

Padded batches (`key_padding_mask`, True = a real token): pad tokens join no cluster, as queries
or as keys, so they are never attended to and their query rows return 0 (lse -inf, no
gradient); the default centroids come from each row's real keys only (pass `mask=` to
`RoutingCentroids.update` so pads do not move learned ones either). Each row is routed as it
is alone: num_clusters and window default to the sizes of its real length n_b (not of the
padded N), and a given window (at most N, as always) is capped at n_b. So each row's real positions get what
`routing_attention` gives on the row alone (its real tokens, in order) with
window=min(window, n_b): the same clusters, and outputs, lse and gradients equal up to float
rounding (the float32 routing similarities are computed in other shapes, so a similarity tied
to the last bit could in principle fall the other way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common import accumulation_dtype, softmax_with_lse
from .clusters import check_routing_args, cluster_members, member_masks


def routing_attention(q, k, v, *, num_clusters=None, window=None, causal=False, scale=None, centroids=None,
                      return_lse=False, key_padding_mask=None):
    """Attention within balanced k-means clusters.

    Args:
        q: [B, Hq, N, D]; k: [B, Hkv, N, D]; v: [B, Hkv, N, Dv]; Hq % Hkv == 0 (GQA).
        num_clusters: C; default: the centroids' count if given, else about sqrt(N) / 2
            (Roy et al.'s sizing, `routing_sizes(N)`).
        window: members (queries and keys) per cluster, 1 <= window <= N; default ceil(N / C).
        causal: queries see keys at their position or before; cluster membership is still
            decided from all positions (see the module docstring: not autoregressive).
        scale: score scale, default 1 / sqrt(D).
        centroids: a `RoutingCentroids`, a tensor [C, D] or [1 or Hq, C, D] (normalised here), or
            None (evenly spaced normalised keys, see the module doc).
        return_lse: also return the log-sum-exp over each row's attended keys, [B, Hq, N]
            (float32 for half inputs), -inf for rows that attend to nothing.
        key_padding_mask: bool [B, N], True = a real token: pad tokens join no cluster, their
            query rows return 0, and each row is routed with the sizes of its real length
            (module docstring). Reads the rows' lengths back to the host once.

    Returns:
        out [B, Hq, N, Dv] in q's dtype, or (out, lse).
    """
    scale, centroids, window, rows = check_routing_args(q, k, v, num_clusters=num_clusters, window=window,
                                                        causal=causal, scale=scale, centroids=centroids,
                                                        key_padding_mask=key_padding_mask)
    q_members, k_members = cluster_members(q, k, centroids, window, rows)  # [B, Hq, C, W]
    work = accumulation_dtype(q.dtype)
    group = q.shape[1] // k.shape[1]
    n = q.shape[2]
    # padded batch: members may be N, the empty slot, a zero token that nothing attends
    slots = n if rows is None else n + 1

    def tokens(x):  # [B, H, N, E] -> [B, H, slots, E] in the work dtype
        x = x.to(work)
        return x if rows is None else F.pad(x, (0, 0, 0, 1))

    q_c = gather_members(tokens(q), q_members)  # [B, Hq, C, W, D]
    k_c = gather_members(tokens(k).repeat_interleave(group, dim=1), k_members)
    v_c = gather_members(tokens(v).repeat_interleave(group, dim=1), k_members)  # [B, Hq, C, W, Dv]

    scores = torch.matmul(q_c, k_c.transpose(-1, -2)) * scale  # [B, Hq, C, W, W]
    scores = scores - torch.log(pair_counts(q_members, k_members, slots, work))
    if causal:
        allowed = k_members.unsqueeze(-2) <= q_members.unsqueeze(-1)
    else:
        allowed = torch.ones_like(scores, dtype=torch.bool)
    if rows is not None:
        allowed = allowed & (q_members < n).unsqueeze(-1) & (k_members < n).unsqueeze(-2)
    probs, lse_c = softmax_with_lse(scores, allowed)  # lse [B, Hq, C, W]
    out, lse = merge_members(torch.matmul(probs, v_c), lse_c, q_members, slots)
    if rows is not None:
        out, lse = out[:, :, :n], lse[:, :, :n]
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def gather_members(x, members):
    """x [B, H, N, E], members [B, H, C, W] -> [B, H, C, W, E]."""
    flat = members.flatten(2).unsqueeze(-1).expand(-1, -1, -1, x.shape[-1])
    return x.gather(2, flat).unflatten(2, members.shape[2:])


@torch.no_grad()
def pair_counts(q_members, k_members, seq_len, dtype):
    """[B, H, C, W, W]: for each (query, key) pair of each cluster, in how many clusters both
    are members (>= 1). seq_len counts the empty slot N of a padded batch as a token."""
    in_q = member_masks(q_members, seq_len).transpose(-1, -2).to(dtype)  # [B, H, N, C]
    in_k = member_masks(k_members, seq_len).transpose(-1, -2).to(dtype)
    # clusters of each member: [B, H, C, W, C'], then count the shared ones
    return torch.matmul(gather_members(in_q, q_members), gather_members(in_k, k_members).transpose(-1, -2))


def merge_members(out_c, lse_c, q_members, seq_len):
    """Scatter the per-cluster rows back to tokens, merging a token's clusters by log-sum-exp.

    out_c [B, H, C, W, Dv], lse_c [B, H, C, W] -> out [B, H, N, Dv], lse [B, H, N]."""
    index = q_members.flatten(2)  # [B, H, C * W]
    lse_flat = lse_c.flatten(2)
    shift = torch.full((*index.shape[:2], seq_len), float("-inf"), dtype=lse_c.dtype, device=lse_c.device)
    shift = shift.scatter_reduce(-1, index, lse_flat.detach(), reduce="amax")
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))  # [B, H, N]
    weights = torch.exp(lse_flat - shift.gather(-1, index))  # 0 for rows that saw nothing
    total = torch.zeros_like(shift).scatter_add(-1, index, weights)
    weighted = weights.unsqueeze(-1) * out_c.flatten(2, 3)  # [B, H, C * W, Dv]
    summed = torch.zeros(*shift.shape, out_c.shape[-1], dtype=out_c.dtype, device=out_c.device)
    summed = summed.scatter_add(2, index.unsqueeze(-1).expand_as(weighted), weighted)
    seen = total > 0
    safe_total = torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, shift + torch.log(safe_total), torch.full_like(total, float("-inf")))
    return summed / safe_total.unsqueeze(-1), lse
