"""The functional surface: `sparse_attention()` for patterns (later: linear, performer,
top-k, LSH, routing, each in its own folder with a naive reference beside the fast path)."""

from .sparse import sparse_attention

__all__ = ["sparse_attention"]
