"""sparse_attn: every sparse-attention mechanism in one call.

    import torch, sparse_attn
    from sparse_attn import patterns as P
    q = k = v = torch.randn(1, 8, 4096, 64)
    out = sparse_attn.sparse_attention(q, k, v, P.sliding_window(256))
"""

from . import backends, patterns
from .backends import BackendError, explain
from .ops import sparse_attention
from .patterns import BlockLayout, Pattern

__version__ = "0.1.0"

__all__ = ["sparse_attention", "explain", "patterns", "backends", "Pattern", "BlockLayout", "BackendError"]
