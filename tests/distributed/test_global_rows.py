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
from sparse_attn import sparse_attention
from sparse_attn.distributed import Comm, context_parallel_attention, contiguous, zigzag
from sparse_attn.distributed.plan import plan_context_parallel
from test_context_parallel import (B, D, HKV, HQ, N, PATTERNS, SHARDINGS, UNIT, _inputs, _reference,
                                   analytic_minimum_rows)

GLOBAL_KINDS = ("gq", "gout", "gdo", "gdq")


def run_global(rank, world_size, pattern_name, schemes, sharding_names):
    pattern = PATTERNS[pattern_name]()
    q, k, v, dout = _inputs()
    ref = _reference(pattern, q, k, v, dout)
    failures = []
    for sharding_name in sharding_names:
        shard = SHARDINGS[sharding_name](N, world_size)
        plan = plan_context_parallel(pattern.layout(N, block_q=UNIT, block_kv=UNIT), shard, HKV, global_rows=True)
        if not plan.has_global_rows and sum(1 for n in shard.lengths() if n) > 1:
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


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("pattern_name", ["longformer", "bigbird"])
@pytest.mark.parametrize("sharding_name", ["contiguous", "zigzag", "uneven"])
@pytest.mark.parametrize("scheme", ["halo", "ring", "alltoall", "auto"])
def test_global_rows_full_matrix(world_size, pattern_name, sharding_name, scheme):
    failures = pool(world_size).run(run_global, pattern_name, (scheme,), (sharding_name,))
    assert failures == [[]] * world_size, failures


def moderate_longformer(rank, world_size, n):
    """Longformer (window 64, 32 global tokens) over n tokens with scheme and global_rows 'auto':
    exact, every message as the planner counts, and the plan it took (returned with the stats)."""
    from sparse_attn.distributed.attention import _agree

    pattern = P.longformer(64, 32)
    g = torch.Generator().manual_seed(1)
    q, k, v, dout = (torch.randn(1, HQ if i in (0, 3) else HKV, n, D, generator=g, dtype=torch.float64)
                     for i in range(4))
    ref = _reference(pattern, q, k, v, dout)
    shard = contiguous(n, world_size, UNIT)
    local = [shard.shard(t, rank).clone().requires_grad_() for t in (q, k, v)]
    comm = Comm(None)
    out = context_parallel_attention(*local, pattern, group=comm, sharding=shard, backend="blocked")
    grads = torch.autograd.grad(out, local, shard.shard(dout, rank))
    err = max((got - shard.shard(want, rank)).abs().max().item() for got, want in zip((out, *grads), ref))
    setup = _agree(Comm(None), *local, pattern, shard, "auto", "blocked", None)
    plan = setup.plan
    dims = dict(batch=1, kv_heads=HKV, head_dim=D, v_head_dim=D, itemsize=8)
    gb = plan.global_bytes(1, HQ, D, D, 8, 8)
    want_sent = {"kv": int(plan.bytes_sent(**dims)[rank]), "dkv": int(plan.bytes_received(**dims)[rank]),
                 **{kind: int(gb[kind][0][rank]) for kind in GLOBAL_KINDS}}
    got_sent = {kind: comm.stats.total(kind) for kind in want_sent}
    received = plan.forward_bytes_received(q_heads=HQ, lse_itemsize=8, **dims)
    ring = max(n - shard.length(r) for r in range(world_size)) * HKV * 2 * D * 8
    return err, got_sent, want_sent, plan.has_global_rows, setup.scheme, int(received.max()), ring


def test_longformer_worst_rank_receives_far_less_than_a_ring():
    n = 2048
    results = pool(4).run(moderate_longformer, n)
    for err, got_sent, want_sent, has_global, scheme, worst, ring in results:
        assert err <= 1e-10
        assert got_sent == want_sent
        assert has_global and scheme != "ulysses"
    _, _, _, _, _, worst, ring = results[0]
    # the global rows' rank used to receive every key (worst == ring); now a halo, the 32 global
    # keys and the global rows' exchange
    assert worst * 4 < ring, (worst, ring)


def test_planner_longformer_global_rows_at_16k():
    """At 16K on 8 contiguous ranks (blocks of 128, Hq=16, Hkv=8, D=128, bf16) the worst rank's
    forward bytes fall from a ring's to a halo's plus the global rows' exchange."""
    pattern, n, p = P.longformer(1024, 64), 16384, 8
    layout = pattern.layout(n, block_q=128)
    sharding = contiguous(n, p, 128)
    dims = dict(batch=1, q_heads=16, kv_heads=8, head_dim=128, v_head_dim=128, itemsize=2, lse_itemsize=4)
    keys_only = plan_context_parallel(layout, sharding, 8)
    with_global = plan_context_parallel(layout, sharding, 8, global_rows=True)
    assert {r: int(x.numel()) for r, x in with_global.global_rows.items()} == {0: 128}  # the global block
    key = 8 * 2 * 128 * 2
    assert int(keys_only.forward_bytes_received(**dims).max()) == (n - n // p) * key  # a ring's
    got = with_global.forward_bytes_received(**dims).tolist()
    q_row, partial_row = 16 * 128 * 2, 16 * (128 * 2 + 4)
    # rank 0: its right halo (512 keys) and 7 partial (out, lse) of its 128 global rows; ranks
    # 1-6: two halos and the 64 global keys, and the 128 global q rows; rank 7: one halo
    assert got[0] == 512 * key + 7 * 128 * partial_row
    assert got[1:7] == [(2 * 512 + 64) * key + 128 * q_row] * 6
    assert got[7] == (512 + 64) * key + 128 * q_row
    assert max(got) * 10 < (n - n // p) * key


def bad_global_rows(rank, world_size, value, scheme):
    q, k, v, _ = _inputs()
    sharding = contiguous(N, world_size, UNIT)
    local = [sharding.shard(t, rank) for t in (q, k, v)]
    context_parallel_attention(*local, PATTERNS["longformer"](), sharding=sharding, backend="blocked",
                               scheme=scheme, global_rows=value if rank == 0 else True)


@pytest.mark.parametrize("value,scheme,message", [("yes", "halo", "global_rows must be"),
                                                  (1, "halo", "global_rows must be"),
                                                  (True, "ulysses", "needs a planned scheme")])
def test_bad_global_rows_raises_on_every_rank(value, scheme, message):
    with pytest.raises(RankError) as info:
        pool(2).run(bad_global_rows, value, scheme)
    errors = info.value.errors
    assert sorted(errors) == [0, 1], errors
    assert all(message in m for m in errors.values()), errors


def lse_and_dtypes(rank, world_size, dtype):
    """return_lse with a gradient through lse (the global rows' dlse travels too), in float64
    (exact) and float32 (close to the float64 result)."""
    pattern = PATTERNS["longformer"]()
    q, k, v, dout = _inputs()
    dlse = torch.randn(B, HQ, N, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = sparse_attention(*full, pattern, backend="reference", return_lse=True)
    ref = (out.detach(), lse.detach(), *torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), full))
    shard = zigzag(N, world_size, UNIT)
    local = [shard.shard(t, rank).to(dtype).clone().requires_grad_() for t in (q, k, v)]
    out, lse = context_parallel_attention(*local, pattern, sharding=shard, scheme="halo", backend="blocked",
                                          global_rows=True, return_lse=True)
    loss = (out * shard.shard(dout, rank).to(dtype)).sum() + (lse * shard.shard(dlse, rank, dim=-1).to(lse.dtype)).sum()
    grads = torch.autograd.grad(loss, local)
    return [(got.double() - shard.shard(want, rank, dim=-1 if want.dim() == 3 else -2)).abs().max().item()
            for got, want in zip((out, lse, *grads), ref)]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_global_rows_lse_gradient_and_float32(dtype, tol):
    errs = pool(3).run(lse_and_dtypes, dtype)
    assert max(max(e) for e in errs) <= tol, errs


def test_a_plan_without_global_rows_is_the_key_plan():
    """A band has no global rows: asking for them builds the key plan once and returns it."""
    layout = P.sliding_window(40).layout(N, block_q=UNIT, block_kv=UNIT)
    sharding = contiguous(N, 4, UNIT)
    with_global = plan_context_parallel(layout, sharding, HKV, global_rows=True)
    assert not with_global.has_global_rows and with_global.global_matrix().sum() == 0
    assert plan_context_parallel(layout, sharding, HKV) is with_global
    with pytest.raises(ValueError, match="global_rows must be a bool"):
        plan_context_parallel(layout, sharding, HKV, global_rows="auto")


def auto_choice(rank, world_size, pattern_name):
    from sparse_attn.distributed.attention import _agree

    q, k, v, _ = _inputs()
    shard = contiguous(N, world_size, UNIT)
    local = [shard.shard(t, rank) for t in (q, k, v)]
    return _agree(Comm(None), *local, PATTERNS[pattern_name](), shard, "halo", "blocked", None).plan.has_global_rows


def test_auto_takes_global_rows_only_when_they_lower_the_worst_rank():
    # at 200 tokens BigBird's random blocks make many rows "global" and the exchange costs more
    # than the keys (see the plans' bytes); Longformer's two global tokens cost less
    assert pool(2).run(auto_choice, "longformer") == [True, True]
    assert pool(2).run(auto_choice, "bigbird") == [False, False]
