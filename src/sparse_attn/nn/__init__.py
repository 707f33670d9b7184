"""Modules built on the ops: `SparseAttention` (a self-attention layer with any mechanism) and
`RotaryEmbedding`, and caches for decoding (`FullCache`, `WindowCache`, `SinkCache`,
`LinearStateCache`).
`SparseCausalLM` (per-layer mechanism schedule, tied head, `generate`) and the
`SparseTransformer` encoder."""

from .attention import SparseAttention
from .cache import FullCache, KVCache, LinearStateCache, SinkCache, WindowCache
from .model import ModelConfig, SparseCausalLM, SparseTransformer
from .rotary import RotaryEmbedding

__all__ = ["SparseAttention", "RotaryEmbedding", "KVCache", "FullCache", "WindowCache", "SinkCache",
           "LinearStateCache", "ModelConfig", "SparseCausalLM", "SparseTransformer"]
