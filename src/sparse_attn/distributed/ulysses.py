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


def _seq_to_heads(comm, sharding, xs, kind):
    """Tensors [B, H_i, N_r, D_i] (this rank's positions, all heads) -> [B, H_i/P, N, D_i] (all
    positions in global order, this rank's head group), all of them in one all-to-all."""
    p, rank = comm.world_size, comm.rank
    groups = [x.shape[1] // p for x in xs]

    def heads_of(x, h, j):
        return x[:, j * h:(j + 1) * h]

    sends = {j: torch.cat([heads_of(x, h, j).reshape(-1) for x, h in zip(xs, groups)])
             for j in range(p) if j != rank and xs[0].shape[2]}
    sizes = {s: [x.shape[0] * h * sharding.length(s) * x.shape[3] for x, h in zip(xs, groups)]
             for s in range(p) if s != rank and sharding.length(s)}
    got = comm.all_to_all(sends, {s: (sum(n),) for s, n in sizes.items()}, xs[0].dtype, xs[0].device, kind)
    out = []
    for i, (x, h) in enumerate(zip(xs, groups)):
        bsz, d = x.shape[0], x.shape[3]
        parts = [heads_of(x, h, rank) if s == rank else
                 got[s].split(sizes[s])[i].view(bsz, h, sharding.length(s), d) if s in got else
                 x.new_zeros(bsz, h, 0, d) for s in range(p)]
        out.append(sharding.unshard(parts, dim=2))
    return out


def _heads_to_seq(comm, sharding, ys, kind):
    """Tensors [B, H_i/P, N, D_i] (global order, this rank's heads) -> [B, H_i, N_r, D_i], all
    of them in one all-to-all."""
    p, rank = comm.world_size, comm.rank
    n_r = sharding.length(rank)
    pieces = [{s: sharding.shard(y, s, dim=2) for s in range(p)} for y in ys]  # per tensor, per rank
    sends = {s: torch.cat([part[s].reshape(-1) for part in pieces])
             for s in range(p) if s != rank and sharding.length(s)}
    sizes = [y.shape[0] * y.shape[1] * n_r * y.shape[3] for y in ys]  # what each rank sends back, per tensor
    recv = {j: (sum(sizes),) for j in range(p) if j != rank and n_r}
    got = comm.all_to_all(sends, recv, ys[0].dtype, ys[0].device, kind)
    out = []
    for i, y in enumerate(ys):
        bsz, h, d = y.shape[0], y.shape[1], y.shape[3]
        blocks = [pieces[i][rank] if j == rank else
                  got[j].split(sizes)[i].view(bsz, h, n_r, d) if j in got else
                  y.new_zeros(bsz, h, n_r, d) for j in range(p)]
        out.append(torch.cat(blocks, 1))
    return out


class _HeadExchange(torch.autograd.Function):
    """Ulysses' two all-to-alls as one differentiable op: `to_heads` moves tensors from
    sequence shards to head groups (`_seq_to_heads`), else back (`_heads_to_seq`); the
    backward moves the gradients the other way. Several tensors (q, k, v) travel in one
    all-to-all. Their dtypes must agree."""

    @staticmethod
    def forward(ctx, to_heads, comm, sharding, *xs):
        ctx.to_heads, ctx.comm, ctx.sharding = to_heads, comm, sharding
        move = _seq_to_heads if to_heads else _heads_to_seq
        return tuple(move(comm, sharding, list(xs), "a2a"))

    @staticmethod
    def backward(ctx, *grads):
        move = _heads_to_seq if ctx.to_heads else _seq_to_heads
        return (None, None, None, *move(ctx.comm, ctx.sharding, [g.contiguous() for g in grads], "a2a_grad"))


def seq_to_heads(comm, sharding, *xs):
    """Differentiable `_seq_to_heads`: a tuple of [B, H_i/P, N, D_i]."""
    return _HeadExchange.apply(True, comm, sharding, *xs)


def heads_to_seq(comm, sharding, *ys):
    """Differentiable `_heads_to_seq`: a tuple of [B, H_i, N_r, D_i]."""
    return _HeadExchange.apply(False, comm, sharding, *ys)


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
    qh, kh, vh = seq_to_heads(comm, sharding, q, k, v)  # [B, H/P, N, D], one all-to-all
    out, lse = sparse_attention(qh, kh, vh, pattern, scale=setup.scale, backend=setup.backend.name, return_lse=True)
    if not return_lse:
        return heads_to_seq(comm, sharding, out)[0], None
    if lse.dtype != out.dtype:  # lse is fp32: its own all-to-all
        return heads_to_seq(comm, sharding, out)[0], heads_to_seq(comm, sharding, lse[..., None])[0][..., 0]
    out, lse = heads_to_seq(comm, sharding, out, lse[..., None])
    return out, lse[..., 0]
