"""Modules built on the ops: `SparseAttention` (a self-attention layer with any mechanism) and
`RotaryEmbedding`, and caches for decoding (`FullCache`, `WindowCache`, `SinkCache`,
`LinearStateCache`).
Models and generation come next (issue #6)."""

from .attention import SparseAttention
from .cache import FullCache, KVCache, LinearStateCache, SinkCache, WindowCache
from .rotary import RotaryEmbedding

__all__ = ["SparseAttention", "RotaryEmbedding", "KVCache", "FullCache", "WindowCache", "SinkCache",
           "LinearStateCache"]
