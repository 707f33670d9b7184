"""Modules built on the ops: `SparseAttention` (a self-attention layer with any mechanism) and
`RotaryEmbedding`, and caches for decoding (`FullCache`, `WindowCache`, `SinkCache`,
`PatternCache`, `LinearStateCache`).
`SparseCausalLM` (per-layer mechanism schedule, tied head, `generate`) and the
`SparseTransformer` encoder; `chunked_forward` for documents longer than a model's length.

Padded batches: the layers and models take `padding_mask` (B, N) bool (True = real token), and
each row then computes what it computes alone, left or right padding (positions from the row's
first real token), with pattern mechanisms, linear, performer, topk, routing and lsh (lsh with
a seed); block_topk takes a mask too (pads never selected or attended) and gives each row what
it gives alone under right padding only (`SparseAttention` says more). Decoding caches hold one
sequence per row: `SparseCausalLM.generate(..., lengths=)` takes right-padded prompts."""

from .attention import SparseAttention
from .cache import FullCache, KVCache, LinearStateCache, PatternCache, SinkCache, WindowCache
from .long import chunked_forward
from .model import ModelConfig, SparseCausalLM, SparseTransformer
from .rotary import RotaryEmbedding

__all__ = ["SparseAttention", "RotaryEmbedding", "KVCache", "FullCache", "WindowCache", "SinkCache",
           "LinearStateCache", "PatternCache", "ModelConfig", "SparseCausalLM", "SparseTransformer", "chunked_forward"]
