"""Ulysses x sequence parallel on a 2-D mesh of U x C ranks, dimensions ("ulysses", "cp").

The sequence is split twice (`sharding.two_level(cp_sharding, U)`): `cp_sharding` gives cp rank c
its cp-level shard, and the U ranks of ulysses group c (the ranks at cp coordinate c) each hold a
contiguous piece of it: rank (c, u) holds piece u, shard index c * U + u. A call then

1. trades, inside each ulysses group, the pieces of all heads for the whole cp shard of H/U heads
   (all-to-all over heads, ulysses.py's `_SeqToHeads`): [B, H, n_cu, D] -> [B, H/U, L_c, D];
2. runs the planned scheme (halo / ring / alltoall, "auto" picks) over the "cp" group with
   `cp_sharding`, for this rank's head group: per-head patterns travel with their heads, and each
   cp group (one head group) plans its own keys;
3. trades the output back ([B, H/U, L_c, Dv] -> [B, H, n_cu, Dv]).

The backward runs through the same autograd Functions (each exchange reversed), deterministic.
Heads move inside a ulysses group only, keys between cp ranks only: put the ulysses dimension
on the fast links (`init_device_mesh(dev, (C, U), mesh_dim_names=("cp", "ulysses"))` makes each
ulysses group U consecutive ranks, one node for U <= GPUs per node).

Before any exchange the ranks agree in two rounds (ulysses group, then cp group, which together
reach every rank of the mesh), so a bad input on any rank raises the same ValueError on all.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..backends.registry import AttentionCall
from ..patterns import Pattern, PerHead, per_head
from .attention import (_DTYPES, _PlannedAttention, _digest, _local_problems, _lse_dtype, call_dims, check_backend,
                        choose_plan, choose_sharding, planned_setup)
from .comm import MeshComm
from .sharding import Sharding, TwoLevelSharding, two_level
from .ulysses import heads_to_seq, seq_to_heads, ulysses_refusal

__all__ = ["mesh2d_attention", "mesh2d_bytes", "MESH2D_SCHEMES", "head_group_pattern"]

# the schemes of the "cp" dimension (the "ulysses" dimension already splits the heads)
MESH2D_SCHEMES = ("auto", "halo", "ring", "alltoall")


def head_group_pattern(pattern: Pattern, q_heads: int, ulysses_size: int, ulysses_rank: int) -> Pattern:
    """The pattern of head group `ulysses_rank` (q heads [u * Hq/U, (u + 1) * Hq/U)): a per-head
    pattern's parts for those heads, any other pattern as it is."""
    if not isinstance(pattern, PerHead):
        return pattern
    h = q_heads // ulysses_size
    return per_head(list(pattern.parts[ulysses_rank * h:(ulysses_rank + 1) * h]))


def _mesh2d_problems(q, k, v, pattern, sharding, scheme, scale, global_rows, mesh: MeshComm) -> list[str]:
    why = _local_problems(q, k, v, pattern, sharding, scheme, scale, global_rows)
    if scheme not in MESH2D_SCHEMES:
        why.append(f"scheme must be one of {MESH2D_SCHEMES} on a Ulysses x cp mesh (it names the scheme over 'cp'; "
                   f"the 'ulysses' dimension already splits heads), got {scheme!r}")
    u, c = mesh.ulysses.world_size, mesh.cp.world_size
    if sharding is not None and (not isinstance(sharding, TwoLevelSharding) or sharding.ulysses_size != u or
                                 sharding.cp_size != c):
        got = (f"two_level(<{sharding.cp_size} cp ranks>, {sharding.ulysses_size})"
               if isinstance(sharding, TwoLevelSharding) else type(sharding).__name__)
        why.append(f"sharding must be None or sharding.two_level(cp_sharding, {u}) with cp_sharding over {c} ranks "
                   f"(the mesh is {u} ulysses x {c} cp), got {got}")
    if not why and (q.shape[1] % u or k.shape[1] % u):
        why.append(f"q has {q.shape[1]} heads and k, v {k.shape[1]}: both must be divisible by the size of the "
                   f"group's 'ulysses' dimension ({u}), which splits the heads")
    elif not why:
        refusal = ulysses_refusal(pattern, q.shape[1], k.shape[1], u)
        if refusal:
            why.append(f"pattern (heads split over the 'ulysses' dimension of {u} ranks): {refusal}")
    return why


def _agree2d(mesh: MeshComm, q, k, v, pattern, sharding, scheme, backend, scale, global_rows):
    """(inner setup, pieces of this rank's cp shard) that every rank of the mesh agreed on.
    Round 1 all-gathers each rank's checks and shapes over its ulysses group, round 2 each
    group's verdict, shapes and piece lengths over the cp group: every rank then holds every
    group's data (ulysses groups x cp groups cover the mesh), and all go on or all raise."""
    uc, cc = mesh.ulysses, mesh.cp
    u_size, c_size = uc.world_size, cc.world_size
    why = _mesh2d_problems(q, k, v, pattern, sharding, scheme, scale, global_rows, mesh)
    chosen, block = None, (0, 0)
    group_pattern = None
    if not why:
        hq, hkv = q.shape[1] // u_size, k.shape[1] // u_size
        group_pattern = head_group_pattern(pattern, q.shape[1], u_size, uc.rank)
        # the call the inner scheme serves: this rank's head group over the cp shard
        call = AttentionCall.of(q[:, :hq], k[:, :hkv], v[:, :hkv], group_pattern, 0, True)
        chosen, block = check_backend(backend, call, pattern, q.device, why)
    ok = not why
    shape = [q.shape[0], q.shape[1], q.shape[3], k.shape[1], v.shape[3]] if ok else [0] * 5
    agreed = [*shape, _DTYPES.index(q.dtype) if ok else -1, *block, _digest(repr(pattern)) if ok else 0,
              _digest(sharding.key()) if isinstance(sharding, Sharding) else 0,
              _digest(chosen.name if chosen else None, scheme, scale, repr(global_rows)),
              int(q.device.type == "cuda") if ok else -1]
    names = ["B", "Hq", "D", "Hkv", "Dv", "dtype", "block_q", "block_kv", "pattern", "sharding",
             "backend/scheme/scale", "device type"]
    local_len = q.shape[2] if ok else 0

    # round 1: inside the ulysses group
    t1 = uc.all_gather_ints([int(not ok), local_len, *agreed])  # [U, 2 + fields]
    group_bad = bool(t1[:, 0].any()) or not bool((t1[:, 2:] == t1[0, 2:]).all())
    pieces = t1[:, 1].tolist()  # the group's piece lengths, ulysses order
    # round 2: across the cp group (one rank of every ulysses group)
    t2 = cc.all_gather_ints([int(group_bad), *pieces, *t1[0, 2:].tolist()])  # [C, 1 + U + fields]
    fields = t2[:, 1 + u_size:]
    if bool(t2[:, 0].any()) or not bool((fields == fields[0]).all()):
        raise ValueError(_refusal(mesh, why, t1, t2, names))
    lengths = t2[:, 1:1 + u_size].reshape(-1).tolist()  # shard index c * U + u
    num_tokens = sum(lengths)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    unit = math.lcm(*block)
    # the whole pattern's layout first: what it refuses (a length it was not built for) every rank
    # refuses alike, before the head groups' layouts could differ
    full_layout = pattern.layout(num_tokens, block_q=block[0], block_kv=block[1], device=q.device)
    if sharding is None:  # from the whole pattern, so every head group picks the same
        sharding = two_level(choose_sharding(pattern, full_layout, num_tokens, c_size, unit), u_size)
    if sharding.lengths() != lengths:
        raise ValueError(f"local lengths {dict(enumerate(lengths))} (by shard index cp * {u_size} + ulysses) do not "
                         f"match the sharding's {dict(enumerate(sharding.lengths()))} ({sharding.describe()})")
    dims = call_dims(q[:, :q.shape[1] // u_size], k[:, :k.shape[1] // u_size], v[:, :k.shape[1] // u_size])
    layout = group_pattern.layout(num_tokens, block_q=block[0], block_kv=block[1], device=q.device)
    setup = planned_setup(cc, group_pattern, layout, sharding.cp, scheme, chosen, scale, global_rows, dims,
                          ulysses_ok=False)
    return setup, sharding.pieces(cc.rank)


def _refusal(mesh: MeshComm, why, t1, t2, names) -> str:
    """The message every rank raises: each reason once with the ranks giving it (gathered in the
    same two rounds), else the fields the ranks disagree on."""
    uc, cc = mesh.ulysses, mesh.cp
    mine = {"; ".join(why): [f"(cp {cc.rank}, ulysses {uc.rank})"]} if why else {}
    columns = t1[:, 2:]
    if not bool(t1[:, 0].any()):  # a bad rank's fields are zeros: only disagreement among good ones counts
        for i, name in enumerate(names):
            if not bool((columns[:, i] == columns[0, i]).all()):
                mine[f"ranks disagree on {name}: {columns[:, i].tolist()} (by ulysses rank)"] = [f"ulysses group "
                                                                                                f"{cc.rank}"]
    notes: dict = {}
    for group in (uc, cc):  # round 1 merges the ulysses group's notes, round 2 the groups'
        gathered = [None] * group.world_size
        dist.all_gather_object(gathered, mine, group=group.group)
        notes = {}
        for part in gathered:
            for reason, where in part.items():
                notes.setdefault(reason, [])
                notes[reason] += [w for w in where if w not in notes[reason]]
        mine = notes
    if not notes:
        fields = t2[:, 1 + uc.world_size:]
        for i, name in enumerate(names):
            if not bool((fields[:, i] == fields[0, i]).all()):
                notes[f"ulysses groups disagree on {name}: {fields[:, i].tolist()} (by cp rank)"] = []
    text = " | ".join((f"rank(s) {', '.join(where)}: " if where else "") + reason for reason, where in notes.items())
    return (f"context_parallel_attention refused on the Ulysses x cp mesh: {text} (every rank must pass the same "
            "pattern, sharding, backend, scheme, scale, dtype and shapes except the local length)")


def mesh2d_attention(q, k, v, pattern: Pattern, mesh: MeshComm, *, sharding=None, scheme="auto", backend="auto",
                     scale=None, return_lse=False, global_rows="auto"):
    """`context_parallel_attention` on a Ulysses x cp mesh (the module docstring); the same
    arguments, `sharding` a `TwoLevelSharding` or None. Returns (out [B, Hq, n, Dv], lse or None)."""
    setup, pieces = _agree2d(mesh, q, k, v, pattern, sharding, scheme, backend, scale, global_rows)
    uc = mesh.ulysses
    qh, kh, vh = seq_to_heads(uc, pieces, q, k, v)  # [B, H/U, L_c, D]: the cp shard, one all-to-all
    out, lse = _PlannedAttention.apply(qh, kh, vh, setup)  # [B, Hq/U, L_c, Dv], [B, Hq/U, L_c]
    out = heads_to_seq(uc, pieces, out)[0]  # [B, Hq, n, Dv]
    if not return_lse:
        return out, None
    return out, heads_to_seq(uc, pieces, lse[..., None])[0][..., 0]


def mesh2d_bytes(pattern: Pattern, sharding: TwoLevelSharding, *, batch: int, q_heads: int, kv_heads: int,
                 head_dim: int, v_head_dim: int, itemsize: int, block: tuple | None = None,
                 global_rows="auto") -> dict:
    """{kind: [C * U] int64}: the bytes each rank (by shard index) sends in one forward and
    backward on a Ulysses x cp mesh (return_lse=False), by `Comm.stats` kind: "a2a" (q, k, v to
    heads, out back), "a2a_grad" (dout to heads, dq, dk, dv back), "kv" / "dkv" (the inner plan
    of the rank's head group over the cp sharding), and the global rows' "gq", "gout", "gdo",
    "gdq" where that plan has them. `block`: the backend's (block_q, block_kv) (default: the
    sharding's unit for both)."""
    if not isinstance(sharding, TwoLevelSharding):
        raise TypeError(f"sharding must be a TwoLevelSharding (sharding.two_level), got {type(sharding).__name__}")
    u_size, c_size = sharding.ulysses_size, sharding.cp_size
    if q_heads % u_size or kv_heads % u_size:
        raise ValueError(f"q_heads ({q_heads}) and kv_heads ({kv_heads}) must be divisible by the ulysses size "
                         f"({u_size})")
    block = (sharding.unit, sharding.unit) if block is None else tuple(block)
    hq, hkv = q_heads // u_size, kv_heads // u_size
    out = {kind: torch.zeros(c_size * u_size, dtype=torch.int64) for kind in ("a2a", "a2a_grad", "kv", "dkv")}
    n = sharding.num_tokens
    lse_itemsize = _lse_dtype(torch.float64 if itemsize == 8 else torch.float32).itemsize
    dims = dict(batch=batch, q_heads=hq, kv_heads=hkv, head_dim=head_dim, v_head_dim=v_head_dim, itemsize=itemsize,
                lse_itemsize=lse_itemsize)
    kv_dims = {k: dims[k] for k in ("batch", "kv_heads", "head_dim", "v_head_dim", "itemsize")}
    group_width = hq * head_dim + hkv * (head_dim + v_head_dim)  # q, k, v of one head group at one position
    for u in range(u_size):
        group_pattern = head_group_pattern(pattern, q_heads, u_size, u)
        plan = choose_plan(group_pattern.layout(n, block_q=block[0], block_kv=block[1]), sharding.cp, dims,
                           global_rows)
        sent, received = plan.bytes_sent(**kv_dims), plan.bytes_received(**kv_dims)
        g = plan.global_bytes(batch, hq, head_dim, v_head_dim, itemsize, lse_itemsize) if plan.has_global_rows \
            else {}
        for c in range(c_size):
            i, mine, whole = sharding.index(c, u), sharding.length(sharding.index(c, u)), sharding.cp.length(c)
            # forward: my piece of the other U - 1 head groups' q, k, v out; my heads' outputs of
            # the other pieces back. Backward: dout as q went, dq, dk, dv as out came back.
            out["a2a"][i] = batch * itemsize * (mine * group_width * (u_size - 1) + (whole - mine) * hq * v_head_dim)
            out["a2a_grad"][i] = batch * itemsize * (mine * hq * v_head_dim * (u_size - 1) +
                                                     (whole - mine) * group_width)
            out["kv"][i], out["dkv"][i] = sent[c], received[c]  # dK/dV go back as the keys came
            for kind, (kind_sent, _) in g.items():
                out.setdefault(kind, torch.zeros(c_size * u_size, dtype=torch.int64))[i] = kind_sent[c]
    return out
