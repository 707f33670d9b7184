"""Modules built on the ops: `SparseAttention` (a self-attention layer with any mechanism) and
`RotaryEmbedding`, and KV caches for decoding (`FullCache`, `WindowCache`, `SinkCache`).
Models and generation come next (issue #6)."""

from .attention import SparseAttention
from .cache import FullCache, KVCache, SinkCache, WindowCache
from .rotary import RotaryEmbedding

__all__ = ["SparseAttention", "RotaryEmbedding", "KVCache", "FullCache", "WindowCache", "SinkCache"]
