"""Reformer LSH attention (Kitaev et al. 2020): `lsh_attention` (sorted chunks, O(N * bucket_size
* n_hashes) memory), its dense reference `lsh_attention_naive`, the hashing `lsh_hash`, and
`lsh_attended_pairs` (the N x N mask of attended pairs, for evaluation at small N)."""

from .chunk import lsh_attention
from .common import lsh_hash, random_rotations
from .naive import lsh_attended_pairs, lsh_attention_naive

__all__ = ["lsh_attention", "lsh_attention_naive", "lsh_attended_pairs", "lsh_hash", "random_rotations"]
