"""Modules built on the ops: `SparseAttention` (a self-attention layer with any mechanism) and
`RotaryEmbedding`, and caches for decoding (`FullCache`, `WindowCache`, `SinkCache`,
`LinearStateCache`).
`SparseCausalLM` (per-layer mechanism schedule, tied head, `generate`)."""

from .attention import SparseAttention
from .cache import FullCache, KVCache, LinearStateCache, SinkCache, WindowCache
from .model import ModelConfig, SparseCausalLM
from .rotary import RotaryEmbedding

__all__ = ["SparseAttention", "RotaryEmbedding", "KVCache", "FullCache", "WindowCache", "SinkCache",
           "LinearStateCache", "ModelConfig", "SparseCausalLM"]
