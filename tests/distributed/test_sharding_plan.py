"""Single-process parts of context parallelism: shardings, the plan, the one-process simulation
(blocked and interpreted triton step kernels) and `Backend.backward_from_stats`."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # as tests/backends/test_triton.py: before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

from sparse_attn import patterns as P
from sparse_attn import sparse_attention
from sparse_attn.backends import get_backend
from sparse_attn.backends.registry import Backend
from sparse_attn.distributed import (Sharding, balanced, contiguous, from_order, plan_context_parallel,
                                     simulate_context_parallel, zigzag)


def test_shard_unshard_round_trip_and_positions():
    for s in (contiguous(203, 3, 16), zigzag(203, 3, 16), contiguous(40, 4, 16)):
        x = torch.arange(2 * s.num_tokens).reshape(2, s.num_tokens, 1)
        parts = [s.shard(x, r, dim=1) for r in range(s.world_size)]
        assert torch.equal(s.unshard(parts, dim=1), x)
        for r, part in enumerate(parts):
            assert torch.equal(part[0, :, 0], s.positions(r))
    assert contiguous(40, 4, 16).lengths() == [0, 16, 16, 8]  # a rank with no work
    z = zigzag(256, 2, 32)
    assert z.runs == (((0, 64), (192, 256)), ((64, 192),))


def test_from_order_accepts_torch_load_balancer_order():
    assert from_order(zigzag(256, 4, 32).order(), 4, 32) == zigzag(256, 4, 32)
    lb = pytest.importorskip("torch.distributed.tensor.experimental._context_parallel._load_balancer")
    order = lb._HeadTailLoadBalancer(256, 4, "cpu")._generate_indices()
    assert from_order(order, 4, 32) == zigzag(256, 4, 32)


def test_bad_shardings_raise():
    with pytest.raises(ValueError, match="multiples of unit"):
        Sharding(64, 16, (((0, 10),), ((10, 64),)))
    with pytest.raises(ValueError, match="exactly once"):
        Sharding(64, 16, (((0, 32),), ((0, 64),)))
    with pytest.raises(ValueError, match="not divisible"):
        from_order(torch.arange(10), 3)
    with pytest.raises(ValueError, match="multiple of the layout"):
        plan_context_parallel(P.causal().layout(64, block_q=32), contiguous(64, 2, 16))


def test_balanced_sharding_evens_causal_cost():
    layout = P.causal().layout(2048, block_q=32)
    rows = (layout.full.counts + layout.partial.counts).double()

    def spread(s):
        costs = [float(rows[s.positions(r)[::32] // 32].sum()) for r in range(4)]
        return max(costs) / min(costs)

    s = balanced(layout, 4)
    assert spread(s) < 1.2 < 6 < spread(contiguous(2048, 4, 32))
    assert s.lengths()[0] > s.lengths()[3]  # early rows are cheap under causal


def test_plan_halo_keys_and_steps():
    layout = P.sliding_window(100).layout(1024, block_q=32)
    plan = plan_context_parallel(layout, contiguous(1024, 4, 32))
    m = plan.keys_matrix()
    assert m.diagonal().tolist() == [256] * 4
    assert [int(m[r, r - 1]) for r in range(1, 4)] == [99] * 3  # window 100: 99 keys back, trimmed in the block
    assert plan.busy_pairs() == 3 and plan.max_hop() == 1
    assert plan_context_parallel(layout, contiguous(1024, 4, 32)) is plan  # cached per (layout, sharding)
    # reach beyond one shard: multi-hop
    far = plan_context_parallel(P.sliding_window(300).layout(512, block_q=32), contiguous(512, 4, 32))
    assert far.max_hop() == 2


def _blocks(layout, row_map, col_map):
    """{(head, global q block, global kv block, full)} of a layout whose local blocks map to global
    ones by row_map (local q block -> global) and col_map (local kv block -> global)."""
    out = set()
    for csr, full in ((layout.full, True), (layout.partial, False)):
        head = torch.div(csr.rows, layout.num_q_blocks, rounding_mode="floor")
        qb = csr.rows % layout.num_q_blocks
        for h, i, j in zip(head.tolist(), qb.tolist(), csr.indices.long().tolist()):
            out.add((h, int(row_map[i]), int(col_map[j]), full))
    return out


@pytest.mark.parametrize("pattern", [P.sliding_window(100), P.sliding_window(70, causal=False), P.causal()])
def test_rank_call_is_the_unsplit_layout_rows(pattern):
    """One launch per rank does exactly the unsplit call's block work on the rank's rows: the same
    (head, q block, kv block) entries, full and partial alike, over one buffer of every kv block
    the rank touches in global order (contiguous for contiguous shards)."""
    n, bs = 1000, 32
    layout = pattern.layout(n, block_q=bs)
    sharding = contiguous(n, 3, bs) if pattern.band_bounds()[1] < n else zigzag(n, 3, bs)
    plan = plan_context_parallel(layout, sharding)
    every = _blocks(layout, torch.arange(layout.num_q_blocks), torch.arange(layout.num_kv_blocks))
    union = set()
    for r in range(3):
        call = plan.rank_call(r)
        my_qbs = torch.unique_consecutive(sharding.positions(r) // bs)
        mine = _blocks(call.layout, my_qbs, call.kv_blocks)
        assert mine == {e for e in every if e[1] in set(my_qbs.tolist())}
        assert torch.equal(call.kv_blocks, torch.sort(call.kv_blocks).values)
        assert call.buffer_len == min(int(call.kv_blocks[-1] + 1) * bs, n) - int(call.kv_blocks[0]) * bs or \
            len(sharding.runs[r]) > 1  # a contiguous shard's buffer is one run of the sequence
        union |= mine
        for st in plan.steps_of(r):  # every step's keys have a slot in the rank's buffer, in their block
            assert torch.equal(call.kv_blocks[call.slots[st.source] // bs], st.keys // bs)
    assert union == every


def test_keys_travel_per_gqa_group():
    """A per-head pattern whose GQA groups reach differently: with kv_heads, each group receives
    only its own keys (fewer bytes); a pattern shared by all heads is unchanged (one group)."""
    n, bs = 512, 32
    pattern = P.per_head([P.sliding_window(20), P.sliding_window(30), P.sliding_window(200), P.causal()])
    layout = pattern.layout(n, block_q=bs)
    sharding = contiguous(n, 4, bs)
    union, grouped = plan_context_parallel(layout, sharding), plan_context_parallel(layout, sharding, 2)
    assert union.groups == 1 and grouped.groups == 2
    dims = dict(batch=1, kv_heads=2, head_dim=8, v_head_dim=8, itemsize=2)
    # rank 1 from rank 0: group 0 (windows 20, 30) needs 29 keys, group 1 (200, causal) all 128
    assert int(grouped.keys_matrix()[1, 0]) == 29 + 128 and int(union.keys_matrix()[1, 0]) == 128
    assert int(grouped.bytes_received(**dims).sum()) < int(union.bytes_received(**dims).sum())
    step = grouped.steps[(1, 0)]
    assert step.key_group.tolist() == [0] * 29 + [1] * 128 and step.keys[:29].tolist() == list(range(99, 128))
    shared = P.sliding_window(100).layout(n, block_q=bs)
    assert plan_context_parallel(shared, sharding, 2).groups == 1
    with pytest.raises(ValueError, match="kv_heads"):
        plan_context_parallel(layout, sharding, 3)


@pytest.mark.parametrize("name", ["window", "bigbird", "causal", "per_head"])
def test_simulation_equals_reference(name):
    pattern = {"window": P.sliding_window(50), "bigbird": P.bigbird(16, seed=1), "causal": P.causal(),
               "per_head": P.per_head([P.sliding_window(20), P.causal()])}[name]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 250, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 250, 16, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 250, 16, generator=g, dtype=torch.float64, requires_grad=True)
    ref = sparse_attention(q, k, v, pattern, backend="reference", return_lse=True)
    dout = torch.randn_like(ref[0])
    grads = torch.autograd.grad(ref[0], (q, k, v), dout)
    for scheme in ("halo", "ring"):
        sim = simulate_context_parallel(q, k, v, pattern, 3, scheme=scheme, backend="blocked", dout=dout)
        torch.testing.assert_close(sim.out, ref[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(sim.lse, ref[1], rtol=0, atol=1e-12)
        for got, want in zip(sim.grads, grads):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        assert len(sim.forward_seconds) == 3 and len(sim.backward_seconds) == 3
        # halo: one backend call per rank with work; ring: one per (rank, source) step
        assert sim.launches == ([min(s, 1) for s in sim.steps] if scheme == "halo" else sim.steps)


@pytest.mark.parametrize("name", ["longformer", "bigbird"])
def test_simulation_with_global_rows_equals_reference(name):
    """global_rows=True: the global query rows computed where their keys live (partials merged at
    the owner, dQ back, dK/dV at the keys), as the distributed schemes do; float64-exact, and the
    time of each global step counted on its source rank."""
    n = 512
    pattern = {"longformer": P.longformer(64, [0, 300]), "bigbird": P.bigbird(16, seed=1)}[name]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, n, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, n, 16, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, n, 16, generator=g, dtype=torch.float64, requires_grad=True)
    ref = sparse_attention(q, k, v, pattern, backend="reference", return_lse=True)
    dout = torch.randn_like(ref[0])
    grads = torch.autograd.grad(ref[0], (q, k, v), dout)
    sim = simulate_context_parallel(q, k, v, pattern, 4, scheme="halo", backend="blocked", dout=dout,
                                    global_rows=True)
    assert sim.global_steps > 0
    torch.testing.assert_close(sim.out, ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(sim.lse, ref[1], rtol=0, atol=1e-12)
    for got, want in zip(sim.grads, grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="global_rows"):
        simulate_context_parallel(q, k, v, pattern, 4, global_rows="auto")


def test_default_backward_from_stats_matches_blocked():
    """The base class's autograd route (for backends without a saved-stats backward) against the
    blocked backend's direct one, on one step of a split: keys 64.. of a causal attention."""
    blocked = get_backend("blocked")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 8, generator=g, dtype=torch.float64) for _ in range(3))
    dout, dlse = torch.randn(1, 2, 128, 8, generator=g, dtype=torch.float64), torch.randn(1, 2, 128, dtype=torch.float64)
    out, lse = sparse_attention(q, k, v, P.causal(), backend="reference", return_lse=True)
    sharding = contiguous(128, 2, 32)
    plan = plan_context_parallel(P.causal().layout(128, block_q=32), sharding)
    step = plan.steps[(1, 1)]
    kb, vb = k[:, :, 64:], v[:, :, 64:]
    q1, o1, l1, d1, dl1 = q[:, :, 64:], out[:, :, 64:], lse[:, :, 64:], dout[:, :, 64:], dlse[:, :, 64:]
    want = blocked.backward_from_stats(q1, kb, vb, step.layout, 8 ** -0.5, o1, l1, d1, dl1)
    got = Backend.backward_from_stats(blocked, q1, kb, vb, step.layout, 8 ** -0.5, o1, l1, d1, dl1)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_simulation_with_triton_step_kernels():
    """The triton forward and its three-launch backward from saved (out, lse), interpreted."""
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # interpreted on a CPU, compiled on a GPU
    # three ranks of several blocks each: the interpreter's 16-token blocks, the GPU's 128 (at 96
    # tokens on the GPU, one block, the balanced sharding gave everything to one rank: nothing moved)
    n, window = (96, 40) if dev == "cpu" else (1152, 300)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 16, generator=g).to(dev).requires_grad_() for _ in range(3))
    pattern = P.sliding_window(window)
    ref = sparse_attention(q.double(), k.double(), v.double(), pattern, backend="reference")
    dout = torch.randn(1, 1, n, 16, generator=g).to(dev)
    grads = torch.autograd.grad(ref, (q, k, v), dout.double())
    sim = simulate_context_parallel(q, k, v, pattern, 3, backend="triton", dout=dout)
    assert sim.backend == "triton" and sum(sim.keys_received) > 0 and sim.scheme == "halo"
    assert sim.launches == [1, 1, 1]
    torch.testing.assert_close(sim.out.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(sim.grads, grads):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-5)
