"""Ulysses x cp on a 2 x 2 ("ulysses", "cp") gloo mesh (4 forked ranks, reused): outputs and q/k/v
gradients equal the single-process float64 reference for every inner scheme (halo, ring,
alltoall, auto) x window, causal, Longformer, BigBird and per-head patterns, with GQA (Hq=4,
Hkv=2: one kv head per rank after the head all-to-all); bytes sent equal `mesh2d_bytes`; a bad
input on one rank raises on all four."""

from __future__ import annotations

import pytest
import torch

from gloo_pool import RankError, pool
from lm_cases import parallel_lm_error
from sparse_attn import patterns as P
from sparse_attn import sparse_attention
from sparse_attn.distributed import (MeshComm, Sharding, TwoLevelSharding, context_parallel_attention, contiguous,
                                     mesh2d_bytes, two_level, zigzag)
from sparse_attn.distributed.attention import choose_sharding

N, B, HQ, HKV, D = 200, 2, 4, 2, 8
UNIT = 32  # the blocked backend's CPU blocks
U = C = 2
INNER = ("halo", "ring", "alltoall", "auto")

PATTERNS = {
    "window": lambda: P.sliding_window(40),
    "causal": lambda: P.causal(),
    "longformer": lambda: P.longformer(16, [2, 100]),
    "bigbird": lambda: P.bigbird(16, seed=0),
    # head groups {0, 1} and {2, 3} (one per ulysses rank) plan different keys
    "per_head": lambda: P.per_head([P.sliding_window(20), P.causal(), P.sliding_window(50, causal=False),
                                    P.streaming(2, 10)]),
}
CP_SHARDINGS = {
    "auto": lambda: None,
    "contiguous": lambda: contiguous(N, C, UNIT),
    "zigzag": lambda: zigzag(N, C, UNIT),
    # ulysses group 0 holds nothing / one unit (its second rank nothing)
    "empty_group": lambda: Sharding(N, UNIT, ((), ((0, N),))),
    "one_unit": lambda: Sharding(N, UNIT, (((0, UNIT),), ((UNIT, N),))),
}
_MESHES: dict = {}  # per worker process: new_group is slow, and every rank must create it alike


def _mesh(order):
    if order not in _MESHES:
        from torch.distributed.device_mesh import init_device_mesh

        shape = (U, C) if order[0] == "ulysses" else (C, U)
        _MESHES[order] = init_device_mesh("cpu", shape, mesh_dim_names=order)
    return _MESHES[order]


def _inputs(kv_heads=HKV):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, HQ, N, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, kv_heads, N, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, kv_heads, N, D, generator=g, dtype=torch.float64)
    dout = torch.randn(B, HQ, N, D, generator=g, dtype=torch.float64)
    return q, k, v, dout


def _reference(pattern, q, k, v, dout):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = sparse_attention(q, k, v, pattern, backend="reference", return_lse=True)
    return (out.detach(), lse.detach(), *torch.autograd.grad(out, (q, k, v), dout))


def run_mesh2d(rank, world_size, pattern_name, cp_name, schemes, order=("cp", "ulysses"), plain_mesh=False,
               kv_heads=HKV):
    """Every inner scheme for one pattern and cp sharding; returns this rank's failures."""
    mesh = MeshComm(_mesh(order))
    if (mesh.cp.rank, mesh.ulysses.rank) != (mesh.mesh.get_local_rank("cp"), mesh.mesh.get_local_rank("ulysses")):
        return ["the Comms' ranks are not the mesh coordinates"]
    pattern = PATTERNS[pattern_name]()
    q, k, v, dout = _inputs(kv_heads)
    ref = _reference(pattern, q, k, v, dout)
    cp = CP_SHARDINGS[cp_name]()
    if cp is None:  # what "auto" chooses, to slice the inputs with
        cp = choose_sharding(pattern, pattern.layout(N, block_q=UNIT, block_kv=UNIT), N, C, UNIT)
    sharding = two_level(cp, U)
    i = mesh.shard_index
    failures = []
    for scheme in schemes:
        where = f"{pattern_name} {scheme} cp={cp_name} mesh={order} Hkv={kv_heads}"
        mesh.reset()
        local = [sharding.shard(t, i).clone().requires_grad_() for t in (q, k, v)]
        out, lse = context_parallel_attention(*local, pattern, group=mesh.mesh if plain_mesh else mesh,
                                              sharding=None if cp_name == "auto" else sharding, scheme=scheme,
                                              backend="blocked", return_lse=True)
        grads = torch.autograd.grad(out, local, sharding.shard(dout, i))
        for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), ref):
            want = sharding.shard(want, i, dim=2)
            err = (got - want).nan_to_num(posinf=0.0, neginf=0.0).abs().max().item() if got.numel() else 0.0
            if not err <= 1e-10 or not torch.equal(got.isinf(), want.isinf()):
                failures.append(f"{where}: {name} differs by {err:.2e}")
        if plain_mesh:
            continue
        planned = mesh2d_bytes(pattern, sharding, batch=B, q_heads=HQ, kv_heads=kv_heads, head_dim=D, v_head_dim=D,
                               itemsize=8)
        # return_lse adds the lse's trip back: [B, Hq / U, n] float64 of the other pieces
        lse_back = B * (HQ // U) * (cp.length(i // U) - sharding.length(i)) * 8
        sent = {kind: mesh.total(kind) for kind in set(mesh.ulysses.stats.bytes_sent) | set(mesh.cp.stats.bytes_sent)}
        sent.pop("agree")
        want = {kind: int(t[i]) + (lse_back if kind == "a2a" else 0) for kind, t in planned.items()}
        want = {kind: n for kind, n in want.items() if n or sent.get(kind)}
        sent = {kind: n for kind, n in sent.items() if n or want.get(kind)}
        if sent != want:
            failures.append(f"{where}: sent {sent}, planned {want}")
    return failures


DEFAULT = {  # pattern -> cp sharding of the default run (the slow matrix runs them all)
    "window": "contiguous", "causal": "zigzag", "longformer": "auto", "bigbird": "contiguous", "per_head": "zigzag",
}


@pytest.mark.parametrize("pattern_name", list(PATTERNS))
def test_mesh2d_equals_single_process(pattern_name):
    failures = pool(U * C).run(run_mesh2d, pattern_name, DEFAULT[pattern_name], INNER)
    assert failures == [[]] * (U * C), failures


def test_mesh2d_plain_device_mesh_ulysses_major():
    """The DeviceMesh itself as `group`, dimensions in the other order (ulysses groups strided)."""
    failures = pool(U * C).run(run_mesh2d, "per_head", "contiguous", ("halo",), ("ulysses", "cp"), True)
    assert failures == [[]] * (U * C), failures


@pytest.mark.parametrize("cp_name", ["empty_group", "one_unit"])
def test_mesh2d_ranks_holding_nothing(cp_name):
    failures = pool(U * C).run(run_mesh2d, "causal", cp_name, ("ring", "alltoall"))
    assert failures == [[]] * (U * C), failures


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [HKV, HQ], ids=["gqa", "mha"])
@pytest.mark.parametrize("order", [("cp", "ulysses"), ("ulysses", "cp")])
@pytest.mark.parametrize("cp_name", list(CP_SHARDINGS))
@pytest.mark.parametrize("pattern_name", list(PATTERNS))
def test_mesh2d_full_matrix(pattern_name, cp_name, order, kv_heads):
    failures = pool(U * C).run(run_mesh2d, pattern_name, cp_name, INNER, order, False, kv_heads)
    assert failures == [[]] * (U * C), failures


def bad_mesh2d_input(rank, world_size, what):
    mesh = MeshComm(_mesh(("cp", "ulysses")))
    kv_heads = 1 if what == "kv_heads" else HKV
    q, k, v, _ = _inputs(kv_heads)
    sharding = two_level(contiguous(N, C, UNIT), U)
    local = [sharding.shard(t, mesh.shard_index) for t in (q, k, v)]
    group, scheme = mesh, "auto"
    if rank == world_size - 1:
        if what == "head_dim":
            local[0] = local[0][..., :-1]
        elif what == "length":
            local = [t[:, :, :-1] for t in local]
    if what == "mesh_names":
        from torch.distributed.device_mesh import init_device_mesh

        group = init_device_mesh("cpu", (U, C), mesh_dim_names=("ulysses", "dp"))
    if what == "scheme":
        scheme = "ulysses"
    # one rank's pattern differs (caught inside its ulysses group), or a whole ulysses group's
    # (caught across the groups)
    odd = what == "pattern" and rank == world_size - 1 or what == "group_pattern" and mesh.cp.rank == 1
    context_parallel_attention(*local, P.sliding_window(41 if odd else 40), group=group, sharding=sharding,
                               scheme=scheme, backend="blocked")


@pytest.mark.parametrize("what, message", [("head_dim", "head dims differ"), ("length", "local lengths"),
                                           ("kv_heads", "k, v 1: both must be divisible"),
                                           ("mesh_names", "group: a Ulysses x cp mesh must be a 2-D DeviceMesh"),
                                           ("scheme", "scheme must be one of"),
                                           ("pattern", "ranks disagree on pattern"),
                                           ("group_pattern", "ulysses groups disagree on pattern")])
def test_mesh2d_bad_input_raises_on_every_rank(what, message):
    with pytest.raises(RankError) as info:
        pool(U * C).run(bad_mesh2d_input, what)
    errors = info.value.errors
    assert sorted(errors) == list(range(U * C)), errors  # no rank hangs or goes on
    assert all("ValueError" in m and message in m for m in errors.values()), errors


def test_two_level_sharding():
    s = two_level(zigzag(N, C, UNIT), U)
    assert isinstance(s, TwoLevelSharding) and s.world_size == U * C
    for c in range(C):  # the U pieces of cp shard c, in order, are the cp shard
        assert torch.equal(torch.cat([s.positions(s.index(c, u)) for u in range(U)]), s.cp.positions(c))
    x = torch.randn(1, 1, N, 3)
    assert torch.equal(s.unshard([s.shard(x, i) for i in range(U * C)]), x)
    assert s.lengths() == [32, 40, 64, 64]  # cp shard 0 = [0, 32) + [160, 200): 2 + 1 units
    with pytest.raises(ValueError, match="two_level"):
        TwoLevelSharding(s.num_tokens, s.unit, s.runs[::-1], s.cp, U)


def model_on_mesh(rank, world_size):
    """A SparseCausalLM with parallelize_context over the 2 x 2 mesh against the same model whole."""
    mesh = MeshComm(_mesh(("cp", "ulysses")))
    sharding = two_level(zigzag(128, C, UNIT), U)  # every rank one unit of 32 tokens
    err, model = parallel_lm_error(mesh, sharding, mesh.shard_index, 128)
    return err, model.context_comm.total("a2a", "kv") > 0


def test_parallelized_causal_lm_on_mesh_equals_one_process():
    for err, moved in pool(U * C).run(model_on_mesh):
        assert err < 1e-10 and moved
