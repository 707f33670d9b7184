"""Modules built on the ops: `SparseAttention` (a self-attention layer with any mechanism) and
`RotaryEmbedding`, and caches for decoding (`FullCache`, `WindowCache`, `SinkCache`,
`PatternCache`, `LinearStateCache`).
`SparseCausalLM` (per-layer mechanism schedule, tied head, `generate`) and the
`SparseTransformer` encoder; `chunked_forward` for documents longer than a model's length."""

from .attention import SparseAttention
from .cache import FullCache, KVCache, LinearStateCache, PatternCache, SinkCache, WindowCache
from .long import chunked_forward
from .model import ModelConfig, SparseCausalLM, SparseTransformer
from .rotary import RotaryEmbedding

__all__ = ["SparseAttention", "RotaryEmbedding", "KVCache", "FullCache", "WindowCache", "SinkCache",
           "LinearStateCache", "PatternCache", "ModelConfig", "SparseCausalLM", "SparseTransformer", "chunked_forward"]
