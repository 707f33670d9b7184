"""Modules built on the ops: `SparseAttention` (a self-attention layer with any mechanism) and
`RotaryEmbedding`, and caches for decoding (`FullCache`, `WindowCache`, `SinkCache`,
`PatternCache`, `LinearStateCache`).
`SparseCausalLM` (per-layer mechanism schedule, tied head, `generate`) and the
`SparseTransformer` encoder; `chunked_forward` for documents longer than a model's length.

Each batch row is one whole sequence at positions 0..N-1: there are no key padding masks or
per-row offsets yet, so non-causal layers attend a padded row's pads and left padding shifts
positions (see `SparseCausalLM` and `SparseCausalLM.generate(..., lengths=)` for right padding)."""

from .attention import SparseAttention
from .cache import FullCache, KVCache, LinearStateCache, PatternCache, SinkCache, WindowCache
from .long import chunked_forward
from .model import ModelConfig, SparseCausalLM, SparseTransformer
from .rotary import RotaryEmbedding

__all__ = ["SparseAttention", "RotaryEmbedding", "KVCache", "FullCache", "WindowCache", "SinkCache",
           "LinearStateCache", "PatternCache", "ModelConfig", "SparseCausalLM", "SparseTransformer", "chunked_forward"]
