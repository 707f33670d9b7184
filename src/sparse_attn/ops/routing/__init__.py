"""Routing Transformer attention (Roy et al. 2021): `routing_attention` (attention within balanced
k-means clusters, O(num_clusters * window^2) memory), its dense reference
`routing_attention_naive`, the online k-means `RoutingCentroids`, the routing itself
(`route_tokens`) and `routing_attended_pairs` (the N x N mask of attended pairs, small N)."""

from .chunk import routing_attention
from .clusters import route_tokens, routing_sizes
from .kmeans import RoutingCentroids
from .naive import routing_attended_pairs, routing_attention_naive

__all__ = ["routing_attention", "routing_attention_naive", "routing_attended_pairs", "RoutingCentroids",
           "route_tokens", "routing_sizes"]
