"""Modules whose sequence is sharded over ranks: `ContextParallelAttention` wraps a
`nn.SparseAttention` (same weights), `parallelize_context(model, group, sharding)` swaps it in
for every attention layer of a model (`SparseCausalLM`, `SparseTransformer`, or any module
holding `SparseAttention`s).

    sharding = zigzag(N, P)                                 # the same object shards the data
    parallelize_context(model, mesh["cp"], sharding)
    tokens_r = sharding.shard(tokens, rank, dim=1)          # [B, N_r]
    logits_r = model(tokens_r)                              # [B, N_r, vocab]; loss on targets_r

Everything but attention works per token, so only attention communicates; rotary angles use the
global positions of the shard (`sharding.positions(rank)`). Gradients of the replicated weights
are per-rank partial sums: sum them over the context group (`dist.all_reduce`, as
`train.ContextParallel` does, or FSDP2 with `model.set_gradient_divide_factor(1.0)`; FSDP's
and DDP's default is the mean over ranks, which scales them by 1/P)."""

from __future__ import annotations

import torch
from torch import nn

from ..nn.attention import SparseAttention
from ..ops.mechanisms import PATTERN, Mechanism
from ..patterns import Pattern
from .attention import context_parallel_attention
from .comm import Comm, MeshComm, is_mesh2d
from .sharding import Sharding

__all__ = ["ContextParallelAttention", "parallelize_context"]


def _comm_of(group):
    """A `Comm` (one process group) or a `MeshComm` (a 2-D ("ulysses", "cp") mesh)."""
    if isinstance(group, (Comm, MeshComm)):
        return group
    return MeshComm(group) if is_mesh2d(group) else Comm(group)


def _ranks(comm) -> tuple[int, int]:
    """(the number of shards, this rank's shard index) under `comm`."""
    if isinstance(comm, MeshComm):
        return comm.ulysses.world_size * comm.cp.world_size, comm.shard_index
    return comm.world_size, comm.rank


def _pattern_of(mechanism) -> Pattern:
    if isinstance(mechanism, Pattern):
        return mechanism
    if isinstance(mechanism, Mechanism) and mechanism.kind == PATTERN:
        return mechanism.pattern()
    raise ValueError(f"context parallelism runs pattern mechanisms (windows, causal, Longformer, BigBird, ...); "
                     f"mechanism {mechanism} is not one (kernelized and dynamic mechanisms are not split yet)")


class ContextParallelAttention(nn.Module):
    """`inner`'s projections, rotary embedding and dropout, with its attention computed over the
    sequence sharded across `group` by `sharding` (x holds this rank's tokens, in local order).
    `group`: as `context_parallel_attention`'s (a 2-D ("ulysses", "cp") mesh or `MeshComm` with a
    `sharding.two_level` sharding: this rank holds shard `MeshComm.shard_index`)."""

    def __init__(self, inner: SparseAttention, group, sharding: Sharding, *, scheme: str = "auto") -> None:
        super().__init__()
        if not isinstance(inner, SparseAttention):
            raise TypeError(f"inner must be a SparseAttention, got {type(inner).__name__}")
        if not isinstance(sharding, Sharding):
            raise TypeError(f"sharding must be a Sharding, got {type(sharding).__name__}")
        self.inner = inner
        self.pattern = _pattern_of(inner.mechanism)
        self.comm = _comm_of(group)
        shards, self.shard_index = _ranks(self.comm)
        if sharding.world_size != shards:
            raise ValueError(f"sharding is for {sharding.world_size} ranks, the group has {shards}")
        self.sharding = sharding
        self.scheme = scheme

    def set_warmup(self, dense, sparse_weight: float) -> None:
        """The model's dense-to-sparse schedule reaches the wrapped layer (forward refuses a blend)."""
        self.inner.set_warmup(dense, sparse_weight)

    def forward(self, x: torch.Tensor, positions=None, cache=None, padding_mask=None) -> torch.Tensor:
        a = self.inner
        for name, value in (("cache", cache), ("padding_mask", padding_mask), ("positions", positions)):
            if value is not None:
                raise ValueError(f"{name} is not supported with context parallelism (positions come from the "
                                 "sharding; pad to the sharded length or pack documents with patterns.document)")
        if a.sparse_weight < 1.0:
            raise ValueError("the dense-to-sparse warm-up (sparse_weight < 1) is not supported with context "
                             "parallelism: its dense branch would need every key")
        bsz, n, _ = x.shape
        q = a.q_proj(x).view(bsz, n, a.num_heads, a.head_dim).transpose(1, 2)  # [B, Hq, N_r, Dh]
        k = a.k_proj(x).view(bsz, n, a.num_kv_heads, a.head_dim).transpose(1, 2)  # [B, Hkv, N_r, Dh]
        v = a.v_proj(x).view(bsz, n, a.num_kv_heads, a.head_dim).transpose(1, 2)
        if a.rotary is not None:
            pos = self.sharding.positions(self.shard_index, x.device)
            q, k = a.rotary(q, pos), a.rotary(k, pos)
        out = context_parallel_attention(q, k, v, self.pattern, group=self.comm, sharding=self.sharding,
                                         scheme=self.scheme, backend=a.backend)
        out = nn.functional.dropout(out, a.dropout, self.training)
        return a.out_proj(out.transpose(1, 2).reshape(bsz, n, a.num_heads * a.head_dim))


def parallelize_context(model: nn.Module, group, sharding: Sharding, *, scheme: str = "auto") -> nn.Module:
    """Replace every `SparseAttention` inside `model` by a `ContextParallelAttention` around it
    (in place; weights shared). One `Comm` (byte counters: `model.context_comm.stats`; on a 2-D
    mesh a `MeshComm`: `model.context_comm.total()`) serves all layers. Returns the model."""
    comm = _comm_of(group)
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, SparseAttention)]
    if not targets:
        raise ValueError("model holds no SparseAttention layer to parallelize")
    for parent, name, child in targets:
        setattr(parent, name, ContextParallelAttention(child, comm, sharding, scheme=scheme))
    model.context_comm = comm
    return model
