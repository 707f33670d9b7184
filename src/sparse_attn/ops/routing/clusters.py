"""Balanced routing of queries and keys to k-means clusters (Roy et al. 2021, section 4), shared by
the gathered routing attention and its dense reference, plus their argument checks.

Queries and keys are L2-normalised and compared with the (normalised) centroids; cluster c takes
the `window` queries and the `window` keys most similar to its centroid (top-k along the
sequence, as the paper's balanced variant). Every cluster has exactly `window` query and key
members; a token may be in several clusters or in none. Routing is computed in float32 from the
inputs' values and is not differentiated (the centroids learn by EMA, see kmeans.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._checks import check_bool, check_int
from ..common import check_scale, check_self_attention_qkv
from .kmeans import RoutingCentroids, initial_centroids


def check_routing_args(q, k, v, *, num_clusters, window, causal, scale, centroids):
    """Validates a routing call; returns (scale, centroids as float32 [B or 1, Hq, C, D], window).

    num_clusters None: the centroids' count if given, else `routing_sizes(N)` (the paper's
    ~sqrt(N)/2); window None: ceil(N / num_clusters), so every token can be routed once."""
    check_self_attention_qkv(q, k, v)
    check_bool("causal", causal)
    n = q.shape[2]
    if num_clusters is None:
        given = centroids.centroids if isinstance(centroids, RoutingCentroids) else centroids
        given_count = given.shape[-2] if isinstance(given, torch.Tensor) and given.dim() >= 2 else None
        num_clusters = given_count if given_count is not None else routing_sizes(n)["num_clusters"]
    check_int("num_clusters", num_clusters, 1)
    window = -(-n // num_clusters) if window is None else window
    check_int("window", window, 1)
    if window > n:
        raise ValueError(f"window must be <= the sequence length {n}, got {window}")
    return check_scale(scale, q.shape[3]), resolve_centroids(centroids, q, k, num_clusters), window


def resolve_centroids(centroids, q, k, num_clusters):
    """Normalised float32 centroids [B or 1, Hq, C, D] from a RoutingCentroids, a tensor [C, D] /
    [H, C, D] (H = 1 or Hq), or None (evenly spaced normalised keys of each sequence)."""
    bsz, hq, _, dim = q.shape
    group = hq // k.shape[1]
    if centroids is None:
        return initial_centroids(k, num_clusters).repeat_interleave(group, dim=1)  # [B, Hq, C, D]
    if isinstance(centroids, RoutingCentroids):
        centroids = centroids.centroids
    if not isinstance(centroids, torch.Tensor):
        raise TypeError(f"centroids must be a RoutingCentroids, a tensor or None, got {type(centroids).__name__}")
    if not centroids.is_floating_point():
        raise TypeError(f"centroids must be a floating tensor, got {centroids.dtype}")
    if centroids.device != q.device:
        raise ValueError(f"centroids are on {centroids.device} but q is on {q.device}")
    given_shape = tuple(centroids.shape)
    if centroids.dim() == 2:
        centroids = centroids.unsqueeze(0)
    if (centroids.dim() != 3 or centroids.shape[0] not in (1, hq) or centroids.shape[1] != num_clusters
            or centroids.shape[2] != dim):
        raise ValueError(f"centroids must have shape ({num_clusters}, {dim}) or (1 or {hq}, {num_clusters}, {dim}) "
                         f"(num_clusters={num_clusters}, heads={hq}, head_dim={dim}), got {given_shape}")
    return F.normalize(centroids.detach().float(), dim=-1).expand(hq, -1, -1).unsqueeze(0)


def route_tokens(q, k, *, num_clusters=None, window=None, centroids=None):
    """The clusters `routing_attention` uses with the same arguments: (query members, key members),
    int64 [B, Hq, num_clusters, window], each row the sorted positions of one cluster's members."""
    _, centroids, window = check_routing_args(q, k, None, num_clusters=num_clusters, window=window, causal=False,
                                      scale=None, centroids=centroids)
    return cluster_members(q, k, centroids, window)


@torch.no_grad()
def cluster_members(q, k, centroids, window):
    """Cluster members, sorted by position: (query members, key members), int64 [B, Hq, C, window].

    q [B, Hq, N, D], k [B, Hkv, N, D], centroids normalised [B or 1, Hq, C, D]. Under GQA each query
    head routes its kv head's keys with its own centroids."""
    group = q.shape[1] // k.shape[1]

    def top_members(x):  # [B, Hq, N, D] -> [B, Hq, C, window]
        similarity = torch.matmul(centroids, F.normalize(x.float(), dim=-1).transpose(-1, -2))  # [B, Hq, C, N]
        return similarity.topk(window, dim=-1).indices.sort(dim=-1).values

    return top_members(q), top_members(k.repeat_interleave(group, dim=1))


def member_masks(members, seq_len):
    """[B, H, C, W] positions -> bool [B, H, C, N]: is token n a member of cluster c."""
    mask = torch.zeros(*members.shape[:-1], seq_len, dtype=torch.bool, device=members.device)
    return mask.scatter_(-1, members, True)


def routing_sizes(seq_len: int) -> dict:
    """Roy et al.'s sizing for a sequence of seq_len tokens: about sqrt(N) / 2 clusters of
    N / clusters tokens each: {"num_clusters", "window"} for routing_attention."""
    clusters = max(1, round(check_int("seq_len", seq_len, 1) ** 0.5 / 2))
    return {"num_clusters": clusters, "window": -(-seq_len // clusters)}
