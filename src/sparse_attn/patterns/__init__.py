"""Attention patterns: element predicates with analytic block enumerators, and their layouts.

    from sparse_attn import patterns as P
    p = P.sliding_window(256) | P.causal() & P.streaming(4, 256)
    layout = p.layout(65536, block_q=128)      # O(non-empty blocks), never N x N
    print(layout)                              # ASCII block map

No q/k/v tensors here: patterns only say which (query, key) pairs may interact.
"""

from .base import DisjointUnion, Intersection, Pattern, PerHead, Union, layout_cache
from .grid import BlockGrid
from .layout import BlockLayout
from .presets import (
    BigBird,
    bigbird,
    block_sparse,
    causal,
    dilated,
    document,
    fixed,
    full,
    longformer,
    per_head,
    predicate,
    sliding_window,
    streaming,
    strided,
)
from .primitives import Band, BlockCells, Columns, IndexSet, Predicate, Rows, Segments

__all__ = [
    "layout_cache",
    "Pattern", "BlockLayout", "BlockGrid", "Union", "DisjointUnion", "Intersection", "PerHead",
    "full", "causal", "sliding_window", "dilated", "strided", "fixed", "longformer", "bigbird", "BigBird",
    "block_sparse", "streaming", "document", "per_head", "predicate",
    "Band", "Columns", "Rows", "Segments", "BlockCells", "Predicate", "IndexSet",
]
