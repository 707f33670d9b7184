"""Modules built on the ops: `SparseAttention` (a self-attention layer with any mechanism) and
`RotaryEmbedding`. Models, KV caches and generation come next (issue #6)."""

from .attention import SparseAttention
from .rotary import RotaryEmbedding

__all__ = ["SparseAttention", "RotaryEmbedding"]
