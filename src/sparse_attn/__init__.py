"""sparse_attn: every sparse-attention mechanism in one call.

    import torch, sparse_attn
    from sparse_attn import patterns as P
    q = k = v = torch.randn(1, 8, 4096, 64)
    out = sparse_attn.sparse_attention(q, k, v, P.sliding_window(256))
    out = sparse_attn.attention(q, k, v, "performer", num_features=128)   # any mechanism by name
"""

from . import backends, nn, patterns
from .backends import BackendError
from .ops import (Mechanism, MechanismInfo, PerformerFeatures, RoutingCentroids, attention, block_topk_attention,
                  explain, linear_attention, linear_attention_step, lsh_attention, mechanisms, performer_attention,
                  register_mechanism, routing_attention, select_kv_blocks, sparse_attention, topk_attention,
                  unregister_mechanism)
from .patterns import BlockLayout, Pattern

__version__ = "0.1.0"

__all__ = [
    "sparse_attention", "attention", "Mechanism", "mechanisms", "MechanismInfo", "register_mechanism",
    "unregister_mechanism", "explain", "patterns", "backends", "nn", "Pattern",
    "BlockLayout", "BackendError", "linear_attention", "linear_attention_step", "performer_attention",
    "PerformerFeatures", "topk_attention", "block_topk_attention", "select_kv_blocks", "lsh_attention",
    "routing_attention", "RoutingCentroids",
]
