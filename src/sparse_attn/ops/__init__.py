"""The functional surface: `sparse_attention()` for patterns, one folder per non-pattern
mechanism (each with a naive reference beside its fast path), and `attention()`, which reaches
all of them by name, spec string or `Mechanism` config."""

from .gathered import attention_at_positions
from .linear import linear_attention, linear_attention_step
from .lsh import lsh_attention
from .mechanisms import Mechanism, attention, mechanisms
from .performer import PerformerFeatures, performer_attention
from .registry import MechanismInfo, register_mechanism, unregister_mechanism
from .routing import RoutingCentroids, routing_attention
from .sparse import explain, merge_partial_attention, sparse_attention
from .topk import block_topk_attention, select_kv_blocks, topk_attention

__all__ = [
    "sparse_attention", "explain", "merge_partial_attention", "attention_at_positions", "attention", "Mechanism", "mechanisms",
    "MechanismInfo", "register_mechanism", "unregister_mechanism",
    "linear_attention", "linear_attention_step", "performer_attention", "PerformerFeatures",
    "topk_attention", "block_topk_attention", "select_kv_blocks", "lsh_attention", "routing_attention",
    "RoutingCentroids",
]
