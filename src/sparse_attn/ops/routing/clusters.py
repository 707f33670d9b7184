"""Balanced routing of queries and keys to k-means clusters (Roy et al. 2021, section 4), shared by
the gathered routing attention and its dense reference, plus their argument checks.

Queries and keys are L2-normalised and compared with the (normalised) centroids; cluster c takes
the `window` queries and the `window` keys most similar to its centroid (top-k along the
sequence, as the paper's balanced variant). Every cluster has exactly `window` query and key
members; a token may be in several clusters or in none. Routing is computed in float32 from the
inputs' values and is not differentiated (the centroids learn by EMA, see kmeans.py).

A padded batch (key padding mask) is routed row by row as each row alone: row b with n_b real
tokens gets num_clusters and window as a call of length n_b would (the defaults from n_b; a
given window capped at n_b), default centroids from its own real keys, and its clusters take
the top-`window` of its real tokens only: pad tokens join no cluster. The member tensors are
then [B, Hq, max C_b, max W_b]; the slots a row does not use hold N, the empty slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..._checks import check_bool, check_int
from ..common import check_key_padding_mask, check_scale, check_self_attention_qkv
from .kmeans import RoutingCentroids, initial_centroids


@dataclass
class PaddedRows:
    """Per-row routing sizes of a padded batch.

    key_real: bool [B, N], True = a real token.
    lengths / clusters: each row's real length n_b and cluster count C_b (host ints).
    slot_used: bool [B, C, W]: does row b use member slot w of cluster c (c < C_b and w < W_b).
    """

    key_real: torch.Tensor
    lengths: list
    clusters: list
    slot_used: torch.Tensor


def check_routing_args(q, k, v, *, num_clusters, window, causal, scale, centroids, key_padding_mask=None):
    """Validates a routing call; returns (scale, centroids as float32 [B or 1, Hq, C, D], window,
    rows: `PaddedRows`, or None without a key_padding_mask).

    num_clusters None: the centroids' count if given, else `routing_sizes(N)` (the paper's
    ~sqrt(N)/2); window None: ceil(N / num_clusters), so every token can be routed once.
    With a key_padding_mask, N is each row's real length (`padded_rows`); C and window are
    then the largest over the rows."""
    check_self_attention_qkv(q, k, v)
    check_bool("causal", causal)
    n = q.shape[2]
    clusters_given = num_clusters
    if num_clusters is None:
        given = centroids.centroids if isinstance(centroids, RoutingCentroids) else centroids
        given_count = given.shape[-2] if isinstance(given, torch.Tensor) and given.dim() >= 2 else None
        clusters_given = given_count
        num_clusters = given_count if given_count is not None else routing_sizes(n)["num_clusters"]
    check_int("num_clusters", num_clusters, 1)
    window_given = window
    window = -(-n // num_clusters) if window is None else window
    check_int("window", window, 1)
    if window > n:
        raise ValueError(f"window must be <= the sequence length {n}, got {window}")
    scale = check_scale(scale, q.shape[3])
    if key_padding_mask is None:
        return scale, resolve_centroids(centroids, q, k, num_clusters), window, None
    rows = padded_rows(check_key_padding_mask(key_padding_mask, k), clusters_given, window_given)
    if centroids is None:
        centroids = initial_centroids_per_row(k, rows).repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    else:
        centroids = resolve_centroids(centroids, q, k, num_clusters)
    return scale, centroids, rows.slot_used.shape[2], rows


def padded_rows(key_real, num_clusters, window):
    """Each row's sizes, as a call on its n_b real tokens alone would choose them: num_clusters
    as given (or the centroids' count), else `routing_sizes(n_b)`; window as given but at most
    n_b, else ceil(n_b / C_b). A row of pads has no member. Reads the rows' lengths back to the
    host (one synchronisation)."""
    lengths = key_real.sum(1).tolist()
    clusters = [num_clusters if num_clusters is not None else routing_sizes(max(1, n_b))["num_clusters"]
                for n_b in lengths]
    windows = [min(window, n_b) if window is not None else -(-n_b // c_b) for n_b, c_b in zip(lengths, clusters)]
    device = key_real.device
    cluster_used = torch.arange(max(clusters), device=device) < torch.tensor(clusters, device=device)[:, None]
    member_used = torch.arange(max(1, *windows), device=device) < torch.tensor(windows, device=device)[:, None]
    return PaddedRows(key_real, lengths, clusters, cluster_used[:, :, None] & member_used[:, None, :])


def initial_centroids_per_row(keys, rows):
    """`initial_centroids` of each row's real keys, as the row alone takes them: float32
    [B, Hkv, max C_b, D]; clusters a row does not use are zeros (they have no members)."""
    real_first = torch.sort((~rows.key_real).to(torch.uint8), dim=1, stable=True).indices  # [B, N]: real ones first
    centroids = torch.zeros(keys.shape[0], keys.shape[1], rows.slot_used.shape[1], keys.shape[3],
                            dtype=torch.float32, device=keys.device)
    for b, (n_b, c_b) in enumerate(zip(rows.lengths, rows.clusters)):
        if n_b:  # a row of pads has no member: its centroids do not matter
            centroids[b, :, :c_b] = initial_centroids(keys[b:b + 1, :, real_first[b, :n_b]], c_b)[0]
    return centroids


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


def route_tokens(q, k, *, num_clusters=None, window=None, centroids=None, key_padding_mask=None):
    """The clusters `routing_attention` uses with the same arguments: (query members, key members),
    int64 [B, Hq, num_clusters, window], each row the sorted positions of one cluster's members.
    With a key_padding_mask: [B, Hq, max C_b, max W_b], the slots a row does not use hold N
    (after its members)."""
    _, centroids, window, rows = check_routing_args(q, k, None, num_clusters=num_clusters, window=window,
                                                    causal=False, scale=None, centroids=centroids,
                                                    key_padding_mask=key_padding_mask)
    return cluster_members(q, k, centroids, window, rows)


@torch.no_grad()
def cluster_members(q, k, centroids, window, rows=None):
    """Cluster members, sorted by position: (query members, key members), int64 [B, Hq, C, window].

    q [B, Hq, N, D], k [B, Hkv, N, D], centroids normalised [B or 1, Hq, C, D]. Under GQA each query
    head routes its kv head's keys with its own centroids. rows (`PaddedRows`): clusters pick
    among real tokens only, and the slots a row does not use hold N (the empty slot)."""
    group = q.shape[1] // k.shape[1]
    n = q.shape[2]

    def top_members(x):  # [B, Hq, N, D] -> [B, Hq, C, window]
        similarity = torch.matmul(centroids, F.normalize(x.float(), dim=-1).transpose(-1, -2))  # [B, Hq, C, N]
        if rows is None:
            return similarity.topk(window, dim=-1).indices.sort(dim=-1).values
        similarity = similarity.masked_fill(~rows.key_real[:, None, None, :], float("-inf"))
        picked = similarity.topk(window, dim=-1).indices  # most similar first: a row's W_b are its first
        return picked.masked_fill(~rows.slot_used[:, None], n).sort(dim=-1).values

    return top_members(q), top_members(k.repeat_interleave(group, dim=1))


def member_masks(members, seq_len):
    """[B, H, C, W] positions -> bool [B, H, C, seq_len]: is token n a member of cluster c. An
    empty slot (position >= seq_len, i.e. N in a padded batch) marks nothing."""
    mask = torch.zeros(*members.shape[:-1], seq_len + 1, dtype=torch.bool, device=members.device)
    return mask.scatter_(-1, members.clamp(max=seq_len), True)[..., :seq_len]


def routing_sizes(seq_len: int) -> dict:
    """Roy et al.'s sizing for a sequence of seq_len tokens: about sqrt(N) / 2 clusters of
    N / clusters tokens each: {"num_clusters", "window"} for routing_attention."""
    clusters = max(1, round(check_int("seq_len", seq_len, 1) ** 0.5 / 2))
    return {"num_clusters": clusters, "window": -(-seq_len // clusters)}
