"""Context parallelism on torch.distributed: a sequence sharded over ranks, only the keys the
pattern needs move between them.

    from sparse_attn.distributed import context_parallel_attention, sharding
    out = context_parallel_attention(q, k, v, pattern, group=mesh)   # q, k, v: this rank's shard

See plan.py (which keys move), attention.py (halo / ring / all-to-all), ulysses.py (heads),
module.py (nn integration), simulate.py (P ranks in one process)."""

from . import sharding
from .attention import SCHEMES, choose_scheme, choose_sharding, context_parallel_attention
from .comm import Comm, CommStats
from .module import ContextParallelAttention, parallelize_context
from .plan import ContextPlan, plan_context_parallel
from .sharding import Sharding, balanced, contiguous, from_order, zigzag
from .simulate import Simulation, simulate_context_parallel

__all__ = ["context_parallel_attention", "SCHEMES", "choose_scheme", "choose_sharding", "Comm", "CommStats",
           "ContextPlan", "plan_context_parallel", "Sharding", "sharding", "contiguous", "zigzag", "balanced",
           "from_order", "ContextParallelAttention", "parallelize_context", "simulate_context_parallel", "Simulation"]
