"""Ulysses: all-to-all over heads. Each rank trades its shard of every head for the whole
sequence of H/P heads, attends it with the ordinary (single-process) sparse attention, and
trades the output back. Per-head patterns travel with their heads (rank j gets the patterns of
its head group). Needs Hq and Hkv divisible by P."""

from __future__ import annotations

import torch

from ..ops.sparse import sparse_attention
from ..patterns import Pattern, PerHead, per_head

__all__ = ["ulysses_attention", "ulysses_bytes", "ulysses_refusal"]


def ulysses_refusal(pattern: Pattern, q_heads: int, kv_heads: int, world_size: int) -> str | None:
    """Why Ulysses cannot serve this call (None: it can)."""
    if q_heads % world_size or kv_heads % world_size:
        return (f"ulysses splits heads over ranks: q heads ({q_heads}) and kv heads ({kv_heads}) must be divisible "
                f"by the world size ({world_size})")
    if pattern.num_heads is not None and not isinstance(pattern, PerHead):
        return (f"ulysses sends each rank a group of heads, and {pattern!r} is per-head but cannot be cut by head "
                "groups (use patterns.per_head([...]) or another scheme)")
    return None


def ulysses_bytes(sharding, batch, q_heads, kv_heads, head_dim, v_head_dim, itemsize) -> int:
    """Most bytes any rank sends in one forward: q, k, v of its shard for the other ranks' heads,
    and the outputs of its heads for the other ranks' positions."""
    p, n = sharding.world_size, sharding.num_tokens
    worst = 0
    for r in range(p):
        n_r = sharding.length(r)
        inputs = n_r * (q_heads * head_dim + kv_heads * (head_dim + v_head_dim)) * (p - 1) // p
        outputs = (n - n_r) * (q_heads // p) * v_head_dim
        worst = max(worst, batch * itemsize * (inputs + outputs))
    return worst


def _seq_to_heads(comm, sharding, x, kind):
    """[B, H, N_r, D] (this rank's positions, all heads) -> [B, H/P, N, D] (all positions in
    global order, this rank's head group)."""
    p, rank = comm.world_size, comm.rank
    bsz, heads, _, d = x.shape
    h = heads // p
    sends = {j: x[:, j * h:(j + 1) * h] for j in range(p) if j != rank}
    recv = {s: (bsz, h, sharding.length(s), d) for s in range(p) if s != rank and sharding.length(s)}
    sends = {j: t for j, t in sends.items() if t.shape[2]}
    got = comm.all_to_all(sends, recv, x.dtype, x.device, kind)
    got[rank] = x[:, rank * h:(rank + 1) * h]
    parts = [got[s] if s in got else x.new_zeros(bsz, h, 0, d) for s in range(p)]
    return sharding.unshard(parts, dim=2)


def _heads_to_seq(comm, sharding, y, kind):
    """[B, H/P, N, D] (global order, this rank's heads) -> [B, H, N_r, D]."""
    p, rank = comm.world_size, comm.rank
    bsz, h, _, d = y.shape
    parts = {s: sharding.shard(y, s, dim=2) for s in range(p)}
    n_r = sharding.length(rank)
    sends = {s: t for s, t in parts.items() if s != rank and t.shape[2]}
    recv = {j: (bsz, h, n_r, d) for j in range(p) if j != rank and n_r}
    got = comm.all_to_all(sends, recv, y.dtype, y.device, kind)
    got[rank] = parts[rank]
    return torch.cat([got[j] if j in got else y.new_zeros(bsz, h, n_r, d) for j in range(p)], 1)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, sharding):
        ctx.comm, ctx.sharding = comm, sharding
        return _seq_to_heads(comm, sharding, x, "a2a")

    @staticmethod
    def backward(ctx, g):
        return _heads_to_seq(ctx.comm, ctx.sharding, g.contiguous(), "a2a_grad"), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, comm, sharding):
        ctx.comm, ctx.sharding = comm, sharding
        return _heads_to_seq(comm, sharding, y, "a2a")

    @staticmethod
    def backward(ctx, g):
        return _seq_to_heads(ctx.comm, ctx.sharding, g.contiguous(), "a2a_grad"), None, None


def ulysses_attention(q, k, v, setup, return_lse: bool = False):
    """(out [B, Hq, N_r, Dv], lse [B, Hq, N_r] or None) through the head all-to-all."""
    comm, sharding, pattern = setup.comm, setup.plan.sharding, setup.pattern
    why = ulysses_refusal(pattern, q.shape[1], k.shape[1], comm.world_size)
    if why:
        raise ValueError(f"scheme='ulysses': {why}")
    p, rank = comm.world_size, comm.rank
    if isinstance(pattern, PerHead):  # the patterns of this rank's head group travel with it
        h = q.shape[1] // p
        pattern = per_head(list(pattern.parts[rank * h:(rank + 1) * h]))
    qh, kh, vh = (_SeqToHeads.apply(t, comm, sharding) for t in (q, k, v))  # [B, H/P, N, D]
    out, lse = sparse_attention(qh, kh, vh, pattern, scale=setup.scale, backend=setup.backend.name, return_lse=True)
    out = _HeadsToSeq.apply(out, comm, sharding)
    if not return_lse:
        return out, None
    return out, _HeadsToSeq.apply(lse[..., None], comm, sharding)[..., 0]
