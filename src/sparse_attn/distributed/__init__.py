"""Context parallelism on torch.distributed: a sequence sharded over ranks, only the keys the
pattern needs move between them.

    from sparse_attn.distributed import context_parallel_attention, sharding
    out = context_parallel_attention(q, k, v, pattern, group=mesh)   # q, k, v: this rank's shard

See plan.py (which keys move), attention.py (halo / ring / all-to-all), ulysses.py (heads),
mesh2d.py (Ulysses x cp on a 2-D ("ulysses", "cp") mesh), module.py (nn integration),
simulate.py (P ranks in one process)."""

from . import sharding
from .attention import SCHEMES, choose_scheme, choose_sharding, context_parallel_attention
from .comm import Comm, CommStats, MeshComm
from .mesh2d import mesh2d_bytes
from .module import ContextParallelAttention, parallelize_context
from .plan import ContextPlan, plan_context_parallel
from .sharding import Sharding, TwoLevelSharding, balanced, contiguous, from_order, two_level, zigzag
from .simulate import Simulation, simulate_context_parallel

__all__ = ["context_parallel_attention", "SCHEMES", "choose_scheme", "choose_sharding", "Comm", "CommStats", "MeshComm",
           "mesh2d_bytes", "TwoLevelSharding", "two_level",
           "ContextPlan", "plan_context_parallel", "Sharding", "sharding", "contiguous", "zigzag", "balanced",
           "from_order", "ContextParallelAttention", "parallelize_context", "simulate_context_parallel", "Simulation"]
