"""Global rows computed where their keys live (issue #19): Longformer's global tokens and
BigBird's global blocks send their q rows out and merge partial (out, lse) back instead of
receiving every key. Over gloo (2, 3 and 4 forked ranks): outputs and q/k/v gradients equal the
single-process float64 result for every planned scheme and sharding, every message's bytes equal
the planner's count, the remaining rows receive exactly their analytic minimum, and the worst
rank receives far fewer bytes than a ring."""

from __future__ import annotations

import pytest
import torch

from gloo_pool import RankError, pool
from sparse_attn import patterns as P
from sparse_attn.distributed import Comm, context_parallel_attention, contiguous, zigzag
from sparse_attn.distributed.plan import plan_context_parallel
from test_context_parallel import B, D, HKV, HQ, N, PATTERNS, SHARDINGS, UNIT, _inputs, _reference

GLOBAL_KINDS = ("gq", "gout", "gdo", "gdq")


def analytic_minimum_rows(pattern, sharding, rank, global_local_rows) -> int:
    """(kv head, key) pairs held elsewhere that some non-global query of `rank` in that kv head's
    GQA group may attend, from the dense mask."""
    mask = pattern.to_dense(N, num_heads=HQ)
    mine = sharding.positions(rank)
    keep = torch.ones(mine.numel(), dtype=torch.bool)
    if global_local_rows is not None:
        keep[global_local_rows] = False
    rows = mine[keep]
    if rows.numel() == 0:
        return 0
    needed = mask[:, rows].reshape(HKV, HQ // HKV, rows.numel(), N).any(1).any(1)
    needed[:, mine] = False
    return int(needed.sum())


def run_global(rank, world_size, pattern_name, schemes, sharding_names):
    pattern = PATTERNS[pattern_name]()
    q, k, v, dout = _inputs()
    ref = _reference(pattern, q, k, v, dout)
    failures = []
    for sharding_name in sharding_names:
        shard = SHARDINGS[sharding_name](N, world_size)
        plan = plan_context_parallel(pattern.layout(N, block_q=UNIT, block_kv=UNIT), shard, HKV, global_rows=True)
        if not plan.has_global_rows:
            failures.append(f"{pattern_name} {sharding_name} P={world_size}: the plan has no global rows")
        for scheme in schemes:
            comm = Comm(None)
            local = [shard.shard(t, rank).clone().requires_grad_() for t in (q, k, v)]
            where = f"{pattern_name} {scheme} {sharding_name} P={world_size}"
            out = context_parallel_attention(*local, pattern, group=comm, sharding=shard, scheme=scheme,
                                             backend="blocked", global_rows=True)
            grads = torch.autograd.grad(out, local, shard.shard(dout, rank))
            for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), ref):
                err = (got - shard.shard(want, rank)).abs().max().item() if got.numel() else 0.0
                if not err <= 1e-10:
                    failures.append(f"{where}: {name} differs by {err:.2e}")
            dims = dict(batch=B, kv_heads=HKV, head_dim=D, v_head_dim=D, itemsize=8)
            sent, received = int(plan.bytes_sent(**dims)[rank]), int(plan.bytes_received(**dims)[rank])
            if comm.stats.total("kv") != sent or comm.stats.total("dkv") != received:
                failures.append(f"{where}: sent kv {comm.stats.total('kv')} / dkv {comm.stats.total('dkv')}, "
                                f"plan says {sent} / {received}")
            g = plan.global_bytes(B, HQ, D, D, 8, 8)
            for kind in GLOBAL_KINDS:
                if comm.stats.total(kind) != int(g[kind][0][rank]):
                    failures.append(f"{where}: sent {kind} {comm.stats.total(kind)}, plan says {int(g[kind][0][rank])}")
            minimum = analytic_minimum_rows(pattern, shard, rank, plan.global_rows.get(rank)) * B * 2 * D * 8
            if received != minimum:
                failures.append(f"{where}: receives {received} key bytes, analytic minimum {minimum}")
    return failures


SHARDS = {2: ("contiguous", "zigzag"), 3: ("contiguous", "uneven"), 4: ("uneven", "zigzag")}


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("pattern_name", ["longformer", "bigbird"])
def test_global_rows_equal_single_process(world_size, pattern_name):
    failures = pool(world_size).run(run_global, pattern_name, ("halo", "ring", "alltoall"), SHARDS[world_size])
    assert failures == [[]] * world_size, failures
