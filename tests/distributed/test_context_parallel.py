"""Context parallelism over gloo (2, 3 and 4 forked ranks, reused): every scheme x pattern x
sharding equals the single-process float64 result, outputs and q/k/v gradients; bytes sent equal
the plan's count and the analytic minimum (per kv head: a GQA group receives only the keys its
own query heads attend); a bad input on one rank raises on all."""

from __future__ import annotations

import pytest
import torch

from gloo_pool import RankError, pool
from lm_cases import parallel_lm_error
from sparse_attn import patterns as P
from sparse_attn import sparse_attention
from sparse_attn.distributed import Comm, Sharding, context_parallel_attention, contiguous, zigzag
from sparse_attn.distributed.plan import plan_context_parallel

N, B, HQ, HKV, D = 200, 2, 4, 2, 8
UNIT = 32  # the blocked backend's CPU blocks
SCHEMES = ("halo", "ring", "alltoall", "ulysses")


def _doc_ids():
    return torch.tensor([0] * 45 + [1] * 70 + [2] * 5 + [3] * 80)


PATTERNS = {  # name -> factory
    "window": lambda: P.sliding_window(40),
    "dilated": lambda: P.dilated(12, 3),
    "longformer": lambda: P.longformer(16, [2, 100]),
    "bigbird": lambda: P.bigbird(16, seed=0),
    "causal": lambda: P.causal(),
    "streaming": lambda: P.streaming(4, 30),
    "document": lambda: P.document(_doc_ids()) & P.causal(),
    # GQA groups {0, 1} and {2, 3} need different keys: each receives only its own
    "per_head": lambda: P.per_head([P.sliding_window(20), P.causal(), P.sliding_window(50, causal=False),
                                    P.streaming(2, 10)]),
}


def uneven(n: int, world_size: int, unit: int = UNIT) -> Sharding:
    """Rank 0 holds nothing, rank 1 one unit, the rest split the remaining units."""
    units = -(-n // unit)
    bounds = [0, 0, 1] + [1 + (units - 1) * i // max(world_size - 2, 1) for i in range(1, world_size - 1)]
    bounds = bounds[:world_size + 1]
    bounds[-1] = units
    runs = tuple(((a * unit, min(b * unit, n)),) if b > a else () for a, b in zip(bounds, bounds[1:]))
    return Sharding(n, unit, runs)


SHARDINGS = {
    "auto": lambda n, p: None,
    "contiguous": lambda n, p: contiguous(n, p, UNIT),
    "zigzag": lambda n, p: zigzag(n, p, UNIT),
    "uneven": uneven,
}


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, HQ, N, D, generator=g, dtype=dtype)
    k = torch.randn(B, HKV, N, D, generator=g, dtype=dtype)
    v = torch.randn(B, HKV, N, D, generator=g, dtype=dtype)
    dout = torch.randn(B, HQ, N, D, generator=g, dtype=dtype)
    return q, k, v, dout


def _reference(pattern, q, k, v, dout):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = sparse_attention(q, k, v, pattern, backend="reference")
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))


def analytic_minimum_rows(pattern, sharding: Sharding, rank: int, global_local_rows=None) -> int:
    """(kv head, key) pairs held elsewhere that some query of `rank` in that kv head's GQA group
    may attend, from the dense mask; `global_local_rows` (local indices): queries left out, those
    computed where their keys live (test_global_rows)."""
    mask = pattern.to_dense(N, num_heads=HQ)  # [HQ, N, N]
    mine = sharding.positions(rank)
    keep = torch.ones(mine.numel(), dtype=torch.bool)
    if global_local_rows is not None:
        keep[global_local_rows] = False
    rows = mine[keep]
    if rows.numel() == 0:
        return 0
    needed = mask[:, rows].reshape(HKV, HQ // HKV, rows.numel(), N).any(1).any(1)  # [HKV, N]
    needed[:, mine] = False
    return int(needed.sum())


def run_matrix(rank, world_size, pattern_name, schemes, sharding_names):
    """Every (scheme, sharding) for one pattern; returns the failures seen on this rank."""
    pattern = PATTERNS[pattern_name]()
    q, k, v, dout = _inputs()
    ref = _reference(pattern, q, k, v, dout)
    failures = []
    for sharding_name in sharding_names:
        sharding = SHARDINGS[sharding_name](N, world_size)
        for scheme in schemes:
            comm = Comm(None)
            shard = sharding
            if shard is None:  # what "auto" chooses, to slice the inputs with
                from sparse_attn.distributed.attention import choose_sharding

                layout = pattern.layout(N, block_q=UNIT, block_kv=UNIT)
                shard = choose_sharding(pattern, layout, N, world_size, UNIT)
            local = [shard.shard(t, rank).clone().requires_grad_() for t in (q, k, v)]
            where = f"{pattern_name} {scheme} {sharding_name} P={world_size}"
            try:
                # the key plan (global rows computed where their keys live: test_global_rows.py)
                out = context_parallel_attention(*local, pattern, group=comm, sharding=shard, scheme=scheme,
                                                 backend="blocked", global_rows=False)
            except ValueError as e:
                if scheme == "ulysses" and (HKV % world_size):
                    if "divisible" not in str(e):
                        failures.append(f"{where}: wrong refusal {e}")
                    continue
                raise
            grads = torch.autograd.grad(out, local, shard.shard(dout, rank))
            for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), ref):
                err = (got - shard.shard(want, rank)).abs().max().item() if got.numel() else 0.0
                if not err <= 1e-10:
                    failures.append(f"{where}: {name} differs by {err:.2e}")
            if scheme != "ulysses":
                plan = plan_context_parallel(pattern.layout(N, block_q=UNIT, block_kv=UNIT), shard, HKV)
                dims = dict(batch=B, kv_heads=HKV, head_dim=D, v_head_dim=D, itemsize=8)
                sent = int(plan.bytes_sent(**dims)[rank])
                received = int(plan.bytes_received(**dims)[rank])
                if comm.stats.total("kv") != sent or comm.stats.total("dkv") != received:
                    failures.append(f"{where}: sent kv {comm.stats.total('kv')} / dkv {comm.stats.total('dkv')}, "
                                    f"plan says {sent} / {received}")
                minimum = analytic_minimum_rows(pattern, shard, rank) * B * 2 * D * 8  # k and v rows, float64
                if received != minimum:
                    failures.append(f"{where}: receives {received} bytes, analytic minimum {minimum}")
    return failures


# default run: every pattern and scheme on each world size, two shardings each (the slow
# matrix below runs all four everywhere)
DEFAULT_SHARDINGS = {2: ("contiguous", "zigzag"), 3: ("auto", "uneven"), 4: ("uneven", "zigzag")}


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("pattern_name", list(PATTERNS))
def test_schemes_equal_single_process(world_size, pattern_name):
    failures = pool(world_size).run(run_matrix, pattern_name, SCHEMES, DEFAULT_SHARDINGS[world_size])
    assert failures == [[]] * world_size, failures


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("pattern_name", list(PATTERNS))
@pytest.mark.parametrize("sharding_name", list(SHARDINGS))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_full_matrix(world_size, pattern_name, sharding_name, scheme):
    failures = pool(world_size).run(run_matrix, pattern_name, (scheme,), (sharding_name,))
    assert failures == [[]] * world_size, failures


def bad_input(rank, world_size, what):
    q, k, v, _ = _inputs()
    sharding = contiguous(N, world_size, UNIT)
    local = [sharding.shard(t, rank) for t in (q, k, v)]
    if rank == world_size - 1:
        if what == "head_dim":
            local[0] = local[0][..., :-1]
        elif what == "length":
            local = [t[:, :, :-1] for t in local]
        elif what == "pattern":
            pass
    pattern = P.sliding_window(40 if (what != "pattern" or rank == 0) else 41)
    context_parallel_attention(*local, pattern, sharding=sharding, backend="blocked")


@pytest.mark.parametrize("what", ["head_dim", "length", "pattern"])
def test_bad_input_on_one_rank_raises_on_every_rank(what):
    with pytest.raises(RankError) as info:
        pool(3).run(bad_input, what)
    errors = info.value.errors
    assert sorted(errors) == [0, 1, 2], errors  # no rank hangs or goes on
    assert all("ValueError" in m for m in errors.values()), errors


def per_head_ulysses_refused(rank, world_size):
    pattern = P.predicate(lambda b, h, q, kv: (q - kv).abs() <= h + 1, num_heads=HQ)
    q, k, v, _ = _inputs()
    sharding = contiguous(N, world_size, UNIT)
    local = [sharding.shard(t, rank) for t in (q, k, v)]
    context_parallel_attention(*local, pattern, sharding=sharding, scheme="ulysses", backend="blocked")


def test_ulysses_refuses_a_per_head_pattern_it_cannot_cut():
    with pytest.raises(RankError) as info:
        pool(2).run(per_head_ulysses_refused)
    assert all("cannot be cut" in m for m in info.value.errors.values())


def ulysses_bytes_case(rank, world_size):
    from sparse_attn.distributed.ulysses import ulysses_bytes

    q, k, v, _ = _inputs()
    sharding = contiguous(N, world_size, UNIT)
    comm = Comm(None)
    local = [sharding.shard(t, rank) for t in (q, k, v)]
    context_parallel_attention(*local, P.sliding_window(40), group=comm, sharding=sharding, scheme="ulysses",
                               backend="blocked")
    return comm.stats.total("a2a"), ulysses_bytes(sharding, B, HQ, HKV, D, D, 8)


def test_ulysses_bytes_match_the_formula():
    got = pool(2).run(ulysses_bytes_case)
    assert max(sent for sent, _ in got) == got[0][1]


def ulysses_calls_case(rank, world_size):
    """All-to-all calls of one Ulysses forward + backward, by kind."""
    calls = {}

    class Counting(Comm):
        def post_all_to_all(self, sends, recv_shapes, dtype, device, kind):
            calls[kind] = calls.get(kind, 0) + 1
            return super().post_all_to_all(sends, recv_shapes, dtype, device, kind)

    q, k, v, _ = _inputs()
    sharding = contiguous(N, world_size, UNIT)
    local = [sharding.shard(t, rank).requires_grad_() for t in (q, k, v)]
    out, _ = context_parallel_attention(*local, P.sliding_window(40), group=Counting(None), sharding=sharding,
                                        scheme="ulysses", backend="blocked", return_lse=True)
    out.sum().backward()
    return calls


def test_ulysses_moves_q_k_v_in_one_all_to_all():
    """q, k and v travel together (and their gradients back together); out and lse (one dtype
    here, float64) too: two all-to-alls forward, two backward, on every rank."""
    assert pool(2).run(ulysses_calls_case) == [{"a2a": 2, "a2a_grad": 2}] * 2


def model_case(rank, world_size):
    return parallel_lm_error(None, zigzag(96, world_size, UNIT), rank, 96)[0]


def test_parallelized_causal_lm_equals_one_process():
    assert max(pool(3).run(model_case)) < 1e-10


class _CountingComm(Comm):
    """Adds up the bytes that pass through `post` / `post_all_to_all`, apart from the stats."""

    def __init__(self, group) -> None:
        super().__init__(group)
        self.posted = 0

    def _count(self, sends):
        self.posted += sum(t.numel() * t.element_size() for t in sends.values())

    def post(self, sends, recv_shapes, dtype, device, kind):
        self._count(sends)
        return super().post(sends, recv_shapes, dtype, device, kind)

    def post_all_to_all(self, sends, recv_shapes, dtype, device, kind):
        self._count(sends)
        return super().post_all_to_all(sends, recv_shapes, dtype, device, kind)


def transport_case(rank, world_size):
    q, k, v, dout = _inputs()
    sharding = contiguous(N, world_size, UNIT)
    local = [sharding.shard(t, rank).clone().requires_grad_() for t in (q, k, v)]
    seen = []
    for scheme, pattern in (("halo", P.longformer(16, [2, 100])), ("ring", P.causal()), ("alltoall", P.bigbird(16)),
                            ("ulysses", P.sliding_window(40))):
        comm = _CountingComm(None)
        out = context_parallel_attention(*local, pattern, group=comm, sharding=sharding, scheme=scheme,
                                         backend="blocked", global_rows=scheme != "ulysses")
        torch.autograd.grad(out, local, sharding.shard(dout, rank))
        seen.append((scheme, comm.posted, comm.stats.total() - comm.stats.total("agree")))
    return seen


def test_every_transfer_goes_through_comm_post():
    """The schemes (keys, dK/dV, global rows, Ulysses) move every byte through Comm.post /
    post_all_to_all, so a subclass sees the whole transport (benchmarks/cp_scaling.py)."""
    for seen in pool(2).run(transport_case):
        for scheme, posted, counted in seen:
            assert posted == counted and counted > 0, (scheme, posted, counted)
