"""`context_parallel_attention`: sparse attention over a sequence sharded across ranks.

Each rank holds its shard of q, k, v (`[B, H, N_r, D]`, positions given by a `Sharding`). The
plan (plan.py) says which keys each rank needs from each other rank; only those move. Schemes
differ in transport, and so in how a rank's compute is cut into kernel launches (`launches`):

* halo: all needed exchanges posted at once (bounded reach: windows, dilated, sinks, globals);
  once they have arrived, ONE backend call per rank over a buffer holding every key the rank
  touches (its own and the received ones, in global block order: `ContextPlan.rank_call`), so
  no launch pays the tails and partial tiles of a shard seam, and nothing is merged;
* alltoall: one uneven all-to-all (irregular sparsity: BigBird, block top-k); then one call, as halo;
* ring: P-1 rounds, round t exchanging with ranks r+t / r-t, each round's compute overlapping the
  next round's transfer; rounds with nothing to move are skipped (causal, near-dense layouts);
  one call per (rank, source) step, merged by log-sum-exp in fp32;
* ulysses (ulysses.py): all-to-all over heads, every rank then attends the whole sequence for
  H/P heads.

Backward: one `torch.autograd.Function` per call; per launch the backend's `backward_from_stats`
recomputes from the saved (merged) out and lse; dK/dV go back to their owners (the forward's
exchanges reversed: the same bytes) and are summed in rank order: deterministic.

Global rows (`global_rows`, plan.py): query rows attending most of the sequence are computed
where the keys are: their q rows go out to the ranks holding their keys, partial (out, lse) come
back and are merged by log-sum-exp in fp32 in source order; the backward sends dO, out, lse and
dlse of those rows out, sums the dQ partials in source order and adds dK/dV where the keys live.
This exchange is the same for every scheme (halo, ring, alltoall schedule the remaining rows).

Before the first exchange the ranks all-gather their shapes, dtype, pattern and sharding
digests: a bad input on any rank raises the same ValueError on every rank instead of hanging.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.distributed as dist

from ..backends.registry import _PREFERENCE, AttentionCall, get_backend, list_backends
from ..patterns import BlockLayout, Pattern
from ..patterns.grid import UNBOUNDED
from .comm import Comm, MeshComm, is_mesh2d
from .plan import ContextPlan, plan_context_parallel
from .sharding import Sharding, balanced, contiguous, zigzag
from .ulysses import ulysses_bytes, ulysses_refusal

__all__ = ["context_parallel_attention", "choose_scheme", "choose_sharding", "SCHEMES", "merge_step", "Launch",
           "launches", "gather_rows", "launch_buffers"]

SCHEMES = ("auto", "halo", "ring", "alltoall", "ulysses")
# schemes whose keys all arrive before compute: one kernel launch per rank
ONE_CALL_SCHEMES = ("halo", "alltoall")
_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _accumulation_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_step(acc_out, acc_lse, out, lse):
    """Online log-sum-exp merge of one step's (out, lse) into fp32 (fp64) accumulators, in place.
    Rows that see nothing in either keep out 0 and lse -inf."""
    lse = lse.to(acc_lse.dtype)
    new = torch.logaddexp(acc_lse, lse)  # -inf when both are -inf
    ref = torch.where(torch.isinf(new), torch.zeros_like(new), new)
    w_old = torch.exp(acc_lse - ref)[..., None]
    w_new = torch.exp(lse - ref)[..., None]
    acc_out.mul_(w_old).add_(w_new * out.to(acc_out.dtype))
    acc_lse.copy_(new)


def choose_sharding(pattern: Pattern, layout: BlockLayout, num_tokens: int, world_size: int, unit: int) -> Sharding:
    """Contiguous for patterns with bounded reach (bands and their unions), head-tail (zigzag) for
    causal, a greedy split on the layout's row costs otherwise."""
    if pattern.band_bounds() is not None and not _is_causal_full(pattern):
        return contiguous(num_tokens, world_size, unit)
    if _is_causal_full(pattern):
        return zigzag(num_tokens, world_size, unit)
    return balanced(layout, world_size, unit)


def _is_causal_full(pattern: Pattern) -> bool:
    b = pattern.band_bounds()  # causal: 0 <= i - j <= unbounded
    return b is not None and b[0] >= 0 and b[1] >= UNBOUNDED and b[2] == 1


def choose_scheme(plan: ContextPlan, ulysses_ok: bool, ulysses_bytes: int, kv_bytes_per_key: int,
                  global_bytes=None) -> str:
    """The scheme for a plan: Ulysses when heads split evenly and it moves fewer bytes per rank
    than the plan; else halo when ranks exchange with few others (at most 2 per rank on average),
    ring when most pairs exchange, the uneven all-to-all in between. Halo, ring and all-to-all
    move the same (the plan's) bytes; they differ in how the transfers are scheduled.
    `global_bytes`: [P] forward bytes each rank receives in the plan's global-row exchange."""
    p = plan.world_size
    keys = plan.keys_matrix()
    keys.fill_diagonal_(0)
    received = keys.sum(1) * kv_bytes_per_key
    if global_bytes is not None:
        received = received + global_bytes
    plan_bytes = int(received.max()) if p > 1 else 0
    if ulysses_ok and p > 1 and ulysses_bytes < plan_bytes:
        return "ulysses"
    pairs = plan.busy_pairs()
    if pairs <= 2 * p:
        return "halo"
    if pairs >= p * (p - 1) // 2:
        return "ring"
    return "alltoall"


def _pick_backend(name: str, call: AttentionCall):
    """A backend that reads layouts (the steps run on layouts) and serves the call."""
    if name != "auto":
        b = get_backend(name)
        why = b.reasons_not_to_use(call)
        if not b.caps.reads_layout:
            why = why + ["reads no layout (context-parallel steps are layouts)"]
        return b, why
    names = [b.name for b in list_backends()]
    order = _PREFERENCE.get(call.device_type, []) + [n for n in names if n not in _PREFERENCE.get(call.device_type, [])]
    rejected = []
    for n in order:
        b = get_backend(n)
        if not b.caps.reads_layout or b.caps.dense:
            continue
        why = b.reasons_not_to_use(call)
        if not why:
            return b, []
        rejected.append(f"{n}: {'; '.join(why)}")
    return None, ["no layout backend serves the call: " + " | ".join(rejected)]


def _digest(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def _local_problems(q, k, v, pattern, sharding, scheme, scale, global_rows="auto") -> list[str]:
    why = []
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            return [f"{name} must be a 4-D tensor [B, H, N_local, D], got "
                    f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"]
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        why.append(f"q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        why.append(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        why.append(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: batch and local length must "
                   "agree, and k, v share their heads")
    if q.shape[3] != k.shape[3]:
        why.append(f"q and k head dims differ: {q.shape[3]} vs {k.shape[3]}")
    if k.shape[1] == 0 or q.shape[1] % max(k.shape[1], 1):
        why.append(f"kv heads ({k.shape[1]}) must divide q heads ({q.shape[1]})")
    if not isinstance(pattern, Pattern):
        why.append(f"pattern must be a Pattern (sparse_attn.patterns), got {type(pattern).__name__}")
    elif pattern.num_heads is not None and pattern.num_heads != q.shape[1]:
        why.append(f"pattern is per-head for {pattern.num_heads} heads, q has {q.shape[1]}")
    if sharding is not None and not isinstance(sharding, Sharding):
        why.append(f"sharding must be a Sharding (sparse_attn.distributed.sharding), got {type(sharding).__name__}")
    if scheme not in SCHEMES:
        why.append(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        why.append(f"scale must be a positive float or None, got {scale!r}")
    if global_rows not in ("auto", True, False) or isinstance(global_rows, int) and not isinstance(global_rows, bool):
        why.append(f"global_rows must be 'auto', True or False, got {global_rows!r}")
    elif global_rows is True and scheme == "ulysses":
        why.append("global_rows=True needs a planned scheme (halo, ring, alltoall), not ulysses")
    return why


class _Setup:
    """Everything the ranks agreed on: plan, backend, scale, scheme."""

    def __init__(self, comm, plan, backend, scale, scheme, pattern, layout):
        self.comm, self.plan, self.backend, self.scale, self.scheme = comm, plan, backend, scale, scheme
        self.pattern, self.layout = pattern, layout


def check_backend(backend: str, call: AttentionCall, pattern: Pattern, device, why: list) -> tuple:
    """(the backend serving `call`, its (block_q, block_kv)); what stops it appended to `why`
    (then block is (0, 0)): the backend's refusals, a batch the pattern cannot serve."""
    chosen, reasons = _pick_backend(backend, call)
    if reasons:
        why.append(f"backend={backend!r}: " + "; ".join(reasons))
        return chosen, (0, 0)
    try:
        pattern.check_batch(call.batch, device)
    except ValueError as e:
        why.append(str(e))
    return chosen, chosen.block_sizes(call)


def _agree(comm: Comm, q, k, v, pattern, sharding, scheme, backend, scale, global_rows="auto") -> _Setup:
    """All ranks check their inputs, all-gather them and either all go on or all raise."""
    why = _local_problems(q, k, v, pattern, sharding, scheme, scale, global_rows)
    chosen, block = (None, (0, 0)) if why else check_backend(backend, AttentionCall.of(q, k, v, pattern, 0, True),
                                                             pattern, q.device, why)
    ok = not why
    shape = list(q.shape) + [k.shape[1], v.shape[3]] if ok else [0] * 6
    dtype_code = _DTYPES.index(q.dtype) if ok else -1
    pattern_digest = _digest(repr(pattern)) if ok else 0
    sharding_digest = _digest(sharding.key()) if isinstance(sharding, Sharding) else 0
    backend_digest = _digest(chosen.name if chosen else None, scheme, scale, repr(global_rows))
    mine = [int(not ok), *shape, dtype_code, *block, pattern_digest, sharding_digest, backend_digest,
            int(q.device.type == "cuda") if ok else -1]
    table = comm.all_gather_ints(mine)  # [P, fields]
    bad = [r for r in range(comm.world_size) if table[r, 0]]
    if bad:
        messages = [None] * comm.world_size
        dist.all_gather_object(messages, "; ".join(why), group=comm.group)
        raise ValueError("context_parallel_attention refused on rank(s) " + ", ".join(
            f"{r}: {messages[r]}" for r in bad))
    names = ["B", "Hq", "N_local", "D", "Hkv", "Dv", "dtype", "block_q", "block_kv", "pattern", "sharding",
             "backend/scheme/scale", "device type"]
    fields = dict(zip(names, table[:, 1:].T))
    for name, column in fields.items():
        if name == "N_local":
            continue
        if not bool((column == column[0]).all()):
            raise ValueError(f"context_parallel_attention: ranks disagree on {name}: "
                             f"{dict(enumerate(column.tolist()))} (every rank must pass the same pattern, "
                             "sharding, backend, scheme, scale, dtype and shapes except the local length)")
    lengths = fields["N_local"].tolist()
    num_tokens = sum(lengths)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    unit = math.lcm(*block)
    layout = pattern.layout(num_tokens, block_q=block[0], block_kv=block[1], device=q.device)
    if sharding is None:
        sharding = choose_sharding(pattern, layout, num_tokens, comm.world_size, unit)
    if sharding.world_size != comm.world_size:
        raise ValueError(f"sharding is for {sharding.world_size} ranks, the group has {comm.world_size}")
    if sharding.lengths() != lengths:
        raise ValueError(f"local lengths {dict(enumerate(lengths))} do not match the sharding's "
                         f"{dict(enumerate(sharding.lengths()))} ({sharding.describe()})")
    dims = call_dims(q, k, v)
    ulysses_ok = global_rows is not True and ulysses_refusal(pattern, q.shape[1], k.shape[1], comm.world_size) is None
    return planned_setup(comm, pattern, layout, sharding, scheme, chosen, scale, global_rows, dims, ulysses_ok)


def call_dims(q, k, v) -> dict:
    """The sizes the byte counts of a call need."""
    return dict(batch=q.shape[0], q_heads=q.shape[1], kv_heads=k.shape[1], head_dim=q.shape[3],
                v_head_dim=v.shape[3], itemsize=q.element_size(), lse_itemsize=_lse_dtype(q.dtype).itemsize)


def choose_plan(layout, sharding: Sharding, dims: dict, global_rows) -> ContextPlan:
    """The plan of a planned scheme: with global rows when forced (True), or ("auto") when they
    lower the most bytes any rank receives in the forward."""
    plan = plan_context_parallel(layout, sharding, dims["kv_heads"], global_rows=global_rows in (True, "auto"))
    if global_rows == "auto" and plan.has_global_rows:
        keys_only = plan_context_parallel(layout, sharding, dims["kv_heads"])
        if sharding.world_size == 1 or \
                int(plan.forward_bytes_received(**dims).max()) >= int(keys_only.forward_bytes_received(**dims).max()):
            plan = keys_only
    return plan


def planned_setup(comm, pattern, layout, sharding, scheme, backend, scale, global_rows, dims, ulysses_ok) -> _Setup:
    """The setup every rank derives alike from agreed inputs (no communication): the plan and,
    for scheme "auto", the scheme (Ulysses only where `ulysses_ok`)."""
    plan = choose_plan(layout, sharding, dims, global_rows if scheme != "ulysses" else False)
    if scheme == "auto":
        kv_per_key = plan.bytes_per_key(dims["batch"], dims["kv_heads"], dims["head_dim"], dims["v_head_dim"],
                                        dims["itemsize"])
        u_bytes = ulysses_bytes(sharding, dims["batch"], dims["q_heads"], dims["kv_heads"], dims["head_dim"],
                                dims["v_head_dim"], dims["itemsize"]) if ulysses_ok else 0
        global_bytes = None
        if plan.has_global_rows:
            g = plan.global_bytes(dims["batch"], dims["q_heads"], dims["head_dim"], dims["v_head_dim"],
                                  dims["itemsize"], dims["lse_itemsize"])
            global_bytes = g["gq"][1] + g["gout"][1]
        scheme = choose_scheme(plan, ulysses_ok, u_bytes, kv_per_key, global_bytes)
    return _Setup(comm, plan, backend, scale, scheme, pattern, layout)


def context_parallel_attention(q, k, v, pattern: Pattern, *, group=None, sharding: Sharding | None = None,
                               scheme: str = "auto", backend: str = "auto", scale: float | None = None,
                               return_lse: bool = False, global_rows="auto"):
    """Attention of this rank's queries over the whole sharded sequence.

    q [B, Hq, N_r, D], k, v [B, Hkv, N_r, D/Dv]: this rank's shard (positions
    `sharding.positions(rank)`). pattern: a `Pattern` over global positions 0..N-1 (self
    attention, N = sum of the shards). group: a `Comm`, a `DeviceMesh` (1-D, or with a "cp"
    dimension), a process group, or None (the default group); a 2-D Ulysses x cp mesh below.
    sharding: None picks one (`choose_sharding`). scheme: "auto" (`choose_scheme`), "halo",
    "ring", "alltoall", "ulysses". backend: the block backend of each step ("auto": the device's
    preferred one that reads layouts). global_rows: True computes rows that attend most of the
    sequence where their keys are (plan.py), False never, "auto" when that lowers the most bytes
    any rank receives in the forward (planned schemes only). Returns out [B, Hq, N_r, Dv] (and
    lse [B, Hq, N_r] float32 with return_lse); differentiable in q, k, v (and through lse).

    Ulysses x cp (mesh2d.py): `group` a 2-D DeviceMesh with dimension names ("ulysses", "cp")
    (either order; or `MeshComm(mesh)`, whose Comms count the bytes sent) splits the heads over
    the U "ulysses" ranks and the sequence over the C "cp" ranks. `sharding` is then None or
    `sharding.two_level(cp_sharding, U)`: the rank at (cp c, ulysses u) holds piece u of cp shard
    c (its local sequence cut in U contiguous pieces of whole units), i.e.
    `sharding.positions(c * U + u)` (`MeshComm(mesh).shard_index` is c * U + u). `scheme` is the
    scheme over "cp" ("auto", "halo", "ring", "alltoall"), run on this rank's H/U heads; Hq and
    Hkv must divide by U."""
    if is_mesh2d(group):
        from .mesh2d import mesh2d_attention

        mesh = group if isinstance(group, MeshComm) else MeshComm(group)
        out, lse = mesh2d_attention(q, k, v, pattern, mesh, sharding=sharding, scheme=scheme, backend=backend,
                                    scale=scale, return_lse=return_lse, global_rows=global_rows)
        return (out, lse) if return_lse else out
    comm = group if isinstance(group, Comm) else Comm(group)
    setup = _agree(comm, q, k, v, pattern, sharding, scheme, backend, scale, global_rows)
    if setup.scheme == "ulysses":
        from .ulysses import ulysses_attention

        out, lse = ulysses_attention(q, k, v, setup, return_lse)
    else:
        out, lse = _PlannedAttention.apply(q, k, v, setup)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------- rows of a group
def gather_rows(x, key_group, index, groups: int):
    """x [B, Hkv, N, D] -> [B, Hkv / groups, n, D]: row index[i] of the kv heads of group
    key_group[i] (with one group: `x.index_select(2, index)`)."""
    if groups == 1:
        return x.index_select(2, index)
    # advanced indices around a slice put the indexed dim first: [n, B, Hkv / G, D]
    return x.unflatten(1, (groups, x.shape[1] // groups))[:, key_group, :, index].permute(1, 2, 0, 3)


def _put_rows(x, key_group, index, rows, groups: int, add: bool) -> None:
    """x[b, heads of key_group[i], index[i]] (+)= rows[b, :, i], in place; (group, index) pairs
    are unique, so the sum is deterministic."""
    if groups == 1:
        (x.index_add_ if add else x.index_copy_)(2, index, rows)
        return
    view = x.unflatten(1, (groups, x.shape[1] // groups))  # [B, G, Hkv / G, N, D]
    rows = rows.permute(2, 0, 1, 3)
    view[:, key_group, :, index] = view[:, key_group, :, index] + rows if add else rows


def _pack(k, v, step, index, groups: int):
    """[B, Hkv / G, n, D + Dv]: the step's keys and values (at `index` of k, v), in one message."""
    kg = step.key_group.to(k.device)
    return torch.cat([gather_rows(k, kg, index, groups), gather_rows(v, kg, index, groups)], -1)


# ---------------------------------------------------------------------------- launches
class Launch:
    """One backend call of a rank: a layout over a kv buffer of `buffer_len` rows filled from the
    messages of `parts` ((step, slots of its keys in this buffer), source order)."""

    def __init__(self, layout, buffer_len: int, parts: list) -> None:
        self.layout, self.buffer_len, self.parts = layout, buffer_len, parts

    @property
    def sources(self) -> list[int]:
        return [step.source for step, _ in self.parts]


def launches(plan: ContextPlan, rank: int, scheme: str) -> list[Launch]:
    """The kernel launches of `rank` under `scheme`: one over all its keys where they all arrive
    before compute (`ONE_CALL_SCHEMES`), else one per step, in source order."""
    steps = plan.steps_of(rank)
    if not steps:
        return []
    if scheme in ONE_CALL_SCHEMES:
        call = plan.rank_call(rank)
        return [Launch(call.layout, call.buffer_len, [(st, call.slots[st.source]) for st in steps])]
    return [Launch(st.layout, st.buffer_len, [(st, st.slots)]) for st in steps]


def launch_buffers(launch: Launch, messages: dict, kv_heads: int, k_dim: int, groups: int):
    """The launch's kv buffers k [B, Hkv, buffer_len, D], v [.., Dv] (contiguous, as an unsplit
    call's) from messages {source: [B, Hkv / G, n, D + Dv]}: keys at their slots, zeros elsewhere
    (no local query of that group may see those)."""
    first = messages[launch.parts[0][0].source]
    b, _, _, width = first.shape
    kb = first.new_zeros(b, kv_heads, launch.buffer_len, k_dim)
    vb = first.new_zeros(b, kv_heads, launch.buffer_len, width - k_dim)
    for step, slots in launch.parts:
        message, kg, slots = messages[step.source], step.key_group.to(first.device), slots.to(first.device)
        _put_rows(kb, kg, slots, message[..., :k_dim], groups, add=False)
        _put_rows(vb, kg, slots, message[..., k_dim:], groups, add=False)
    return kb, vb


def launch_grads(launch: Launch, dk, dv, groups: int) -> dict:
    """{source: [B, Hkv / G, n, D + Dv]}: a launch's dK, dV (over its buffer) split back into the
    messages' rows, for their owners."""
    out = {}
    for step, slots in launch.parts:
        kg, slots = step.key_group.to(dk.device), slots.to(dk.device)
        out[step.source] = torch.cat([gather_rows(dk, kg, slots, groups), gather_rows(dv, kg, slots, groups)], -1)
    return out


def run_launches(backend, q, todo: list[Launch], messages: dict, kv_heads: int, k_dim: int, groups: int,
                 scale: float, on_launch=None):
    """Runs the launches whose messages have all arrived (removing them from `todo`); returns
    [(launch, (kb, vb), out, lse)]. `on_launch(fn)` wraps each backend call (the simulation
    times it)."""
    done = []
    for launch in [x for x in todo if all(s in messages for s in x.sources)]:
        todo.remove(launch)
        kb, vb = launch_buffers(launch, messages, kv_heads, k_dim, groups)
        call = lambda: backend.forward(q, kb, vb, launch.layout, scale, True)  # noqa: E731
        out, lse = on_launch(call) if on_launch else call()
        done.append((launch, (kb, vb), out, lse))
    return done


class _Transfers:
    """Moves one message per busy (receiver, source) pair; `rounds()` yields the sources whose
    messages are ready, in the order the scheme makes them ready."""

    def __init__(self, setup: _Setup, sends: dict, recv_shapes: dict, dtype, device, kind: str):
        self.setup, self.sends, self.recv_shapes = setup, sends, recv_shapes
        self.dtype, self.device, self.kind = dtype, device, kind

    def run(self):
        """Generator of (source, message) pairs; `None` source first: the caller's chance to do
        local work while the first transfer is in flight."""
        comm, scheme = self.setup.comm, self.setup.scheme
        p = comm.world_size
        if scheme == "ring":
            pending = self._post(1)
            yield None, None
            for t in range(1, p):
                got = self._wait(pending)
                pending = self._post(t + 1) if t + 1 < p else None
                for src, msg in got.items():
                    yield src, msg
            return
        if scheme == "alltoall":
            handle = self._post_all_to_all()
        else:  # halo: every pair at once
            handle = self._post_p2p(self.sends, self.recv_shapes)
        yield None, None
        got = self._wait(handle)
        for src in sorted(got):
            yield src, got[src]

    def _post(self, t: int):
        p, rank = self.setup.comm.world_size, self.setup.comm.rank
        dst, src = (rank + t) % p, (rank - t) % p
        sends = {dst: self.sends[dst]} if dst in self.sends else {}
        recvs = {src: self.recv_shapes[src]} if src in self.recv_shapes else {}
        return self._post_p2p(sends, recvs)

    def _post_p2p(self, sends, recv_shapes):
        return self.setup.comm.post(sends, recv_shapes, self.dtype, self.device, self.kind)

    def _post_all_to_all(self):
        return self.setup.comm.post_all_to_all(self.sends, self.recv_shapes, self.dtype, self.device, self.kind)

    def _wait(self, handle):
        return {} if handle is None else self.setup.comm.wait(handle)


# ---------------------------------------------------------------------------- the scheme
def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Accumulator:
    """The rank's (out, lse): a single launch's result as it is, several merged by log-sum-exp in
    fp32 (fp64), in the order they are added; rows seeing nothing keep 0 / -inf."""

    def __init__(self, q, dv: int, num_launches: int) -> None:
        self.q, self.dv, self.single = q, dv, num_launches == 1
        bsz, hq, n = q.shape[:3]
        acc = _accumulation_dtype(q.dtype)
        self.out = torch.zeros(bsz, hq, n, dv, dtype=acc if not self.single else q.dtype, device=q.device)
        self.lse = torch.full((bsz, hq, n), float("-inf"), dtype=acc, device=q.device)

    def add(self, out, lse) -> None:
        if self.single:
            self.out, self.lse = out, lse
        else:
            merge_step(self.out, self.lse, out, lse)

    def result(self):
        return self.out.to(self.q.dtype), self.lse.to(_lse_dtype(self.q.dtype))


class _PlannedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, setup: _Setup):
        comm, plan, backend = setup.comm, setup.plan, setup.backend
        rank, d, groups = comm.rank, q.shape[3], plan.groups
        bsz, hkv = q.shape[0], k.shape[1]
        steps = {s.source: s for s in plan.steps_of(rank)}
        sends = {st.rank: _pack(k, v, st, st.source_index.to(q.device), groups)
                 for st in plan.sends_of(rank) if st.rank != rank}
        recv_shapes = {s: (bsz, hkv // groups, st.num_keys, d + v.shape[3]) for s, st in steps.items() if s != rank}
        todo = launches(plan, rank, setup.scheme)
        acc = _Accumulator(q, v.shape[3], len(todo))
        messages, done = {}, []
        for source, message in _Transfers(setup, sends, recv_shapes, k.dtype, k.device, "kv").run():
            if source is None:  # local keys: a per-step launch overlaps the first transfer
                if rank in steps:
                    messages[rank] = _pack(k, v, steps[rank], steps[rank].source_index.to(q.device), groups)
            else:
                messages[source] = message
            for launch, buffers, o, lse in run_launches(backend, q, todo, messages, hkv, d, groups, setup.scale):
                acc.add(o, lse)
                done.append((launch, buffers))
        out, lse = acc.result()
        ctx.global_done = None
        if plan.has_global_rows:
            out, lse, ctx.global_done = _global_forward(setup, q, k, v, out, lse)
        ctx.setup, ctx.done = setup, done
        ctx.save_for_backward(q, out, lse)
        ctx.kv_shapes = (k.shape, v.shape)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        setup = ctx.setup
        comm, plan, backend = setup.comm, setup.plan, setup.backend
        q, out, lse = ctx.saved_tensors
        rank, groups = comm.rank, plan.groups
        k_shape, v_shape = ctx.kv_shapes
        d = k_shape[3]
        acc = _accumulation_dtype(q.dtype)
        if dout is None:
            dout = torch.zeros_like(out)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        back = {}  # source -> [B, Hkv / G, n, D + Dv]: dK, dV of its keys, in its key order
        for launch, (kb, vb) in ctx.done:  # the forward's launch order: a fixed sum
            dq_s, dk_s, dv_s = backend.backward_from_stats(q, kb, vb, launch.layout, setup.scale, out, lse, dout, dlse)
            dq += dq_s.to(acc)
            back.update(launch_grads(launch, dk_s, dv_s, groups))
        sends = {s: m for s, m in back.items() if s != rank}
        recv_shapes = {st.rank: (k_shape[0], k_shape[1] // groups, st.num_keys, d + v_shape[3])
                       for st in plan.sends_of(rank) if st.rank != rank}
        got = {}
        for source, message in _Transfers(setup, sends, recv_shapes, q.dtype, q.device, "dkv").run():
            if source is not None:
                got[source] = message
        if rank in back:
            got[rank] = back[rank]
        dkv = torch.zeros(k_shape[0], k_shape[1], k_shape[2], d + v_shape[3], dtype=acc, device=q.device)
        for st in plan.sends_of(rank):  # receivers in rank order: deterministic
            _put_rows(dkv, st.key_group.to(q.device), st.source_index.to(q.device), got[st.rank].to(acc), groups,
                      add=True)
        if ctx.global_done is not None:
            _global_backward(setup, q, out, lse, dout, dlse, ctx.global_done, dq, dkv)
        ctx.done = ctx.global_done = None
        return dq.to(q.dtype), dkv[..., :d].to(q.dtype), dkv[..., d:].to(q.dtype), None


# ---------------------------------------------------------------------------- global rows
def _global_forward(setup: _Setup, q, k, v, out, lse):
    """The global rows' exchange (forward): q rows out, each rank's partial (out, lse) over its own
    keys back, merged by log-sum-exp in fp32 (fp64) in source order into `out` / `lse`. Returns
    (out, lse, what the backward needs)."""
    comm, plan, backend = setup.comm, setup.plan, setup.backend
    rank = comm.rank
    bsz, hq, _, d = q.shape
    dv = v.shape[3]
    lse_dtype = _lse_dtype(q.dtype)
    rows = plan.global_rows.get(rank)
    mine = plan.global_steps_of_owner(rank)  # who computes my global rows, source order
    theirs = plan.global_steps_of_source(rank)  # whose global rows I compute, owner order
    q_rows = q.index_select(2, rows.to(q.device)) if rows is not None else None
    got_q = comm.exchange({st.source: q_rows for st in mine if st.source != rank},
                          {st.owner: (bsz, hq, st.num_rows, d) for st in theirs if st.owner != rank},
                          q.dtype, q.device, "gq")
    done, part_out, part_lse = [], {}, {}
    for st in theirs:
        qs = q_rows if st.owner == rank else got_q[st.owner]
        index = st.kv_index.to(q.device)
        kb, vb = k.index_select(2, index), v.index_select(2, index)
        o, l = backend.forward(qs, kb, vb, st.layout, setup.scale, True)
        part_out[st.owner], part_lse[st.owner] = o.to(q.dtype), l.to(lse_dtype)
        done.append((st, qs, kb, vb))
    sends_out = {o: t for o, t in part_out.items() if o != rank}
    sends_lse = {o: t for o, t in part_lse.items() if o != rank}
    got_out = comm.exchange(sends_out, {st.source: (bsz, hq, st.num_rows, dv) for st in mine if st.source != rank},
                            q.dtype, q.device, "gout")
    got_lse = comm.exchange(sends_lse, {st.source: (bsz, hq, st.num_rows) for st in mine if st.source != rank},
                            lse_dtype, q.device, "gout")
    if rank in part_out:
        got_out[rank], got_lse[rank] = part_out[rank], part_lse[rank]
    if rows is not None:
        acc = _accumulation_dtype(q.dtype)
        acc_out = torch.zeros(bsz, hq, rows.numel(), dv, dtype=acc, device=q.device)
        acc_lse = torch.full((bsz, hq, rows.numel()), float("-inf"), dtype=acc, device=q.device)
        for st in mine:  # source order: a fixed merge
            merge_step(acc_out, acc_lse, got_out[st.source], got_lse[st.source])
        index = rows.to(q.device)
        out, lse = out.clone(), lse.clone()
        out.index_copy_(2, index, acc_out.to(out.dtype))
        lse.index_copy_(2, index, acc_lse.to(lse.dtype))
    return out, lse, done


def _global_backward(setup: _Setup, q, out, lse, dout, dlse, done, dq, dkv) -> None:
    """The global rows' exchange (backward), adding into dq and dkv ([B, Hkv, N_r, D + Dv]) in
    place: dO, out, lse, dlse of the rows out, dQ partials back (summed in source order); each
    rank's dK/dV of its own keys added in owner order."""
    comm, plan, backend = setup.comm, setup.plan, setup.backend
    rank = comm.rank
    bsz, hq, _, d = q.shape
    dv = out.shape[3]
    lse_dtype = lse.dtype
    rows = plan.global_rows.get(rank)
    mine = plan.global_steps_of_owner(rank)
    theirs = plan.global_steps_of_source(rank)
    local = None
    if rows is not None:
        index = rows.to(q.device)
        dl = dlse.index_select(2, index).to(lse_dtype) if dlse is not None else \
            torch.zeros(bsz, hq, rows.numel(), dtype=lse_dtype, device=q.device)
        local = (torch.cat([dout.index_select(2, index), out.index_select(2, index)], -1),
                 torch.stack([lse.index_select(2, index), dl], -1))
    got_a = comm.exchange({st.source: local[0] for st in mine if st.source != rank},
                          {st.owner: (bsz, hq, st.num_rows, 2 * dv) for st in theirs if st.owner != rank},
                          q.dtype, q.device, "gdo")
    got_b = comm.exchange({st.source: local[1] for st in mine if st.source != rank},
                          {st.owner: (bsz, hq, st.num_rows, 2) for st in theirs if st.owner != rank},
                          lse_dtype, q.device, "gdo")
    if local is not None:
        got_a[rank], got_b[rank] = local
    acc = dq.dtype
    dq_parts = {}
    for st, qs, kb, vb in done:  # owner order: a fixed sum into dK/dV
        a, b = got_a[st.owner], got_b[st.owner]
        dq_s, dk_s, dv_s = backend.backward_from_stats(qs, kb, vb, st.layout, setup.scale, a[..., dv:], b[..., 0],
                                                       a[..., :dv], b[..., 1])
        dq_parts[st.owner] = dq_s.to(q.dtype)
        index = st.kv_index.to(q.device)
        dkv[..., :d].index_add_(2, index, dk_s.to(acc))
        dkv[..., d:].index_add_(2, index, dv_s.to(acc))
    got_dq = comm.exchange({o: t for o, t in dq_parts.items() if o != rank},
                           {st.source: (bsz, hq, st.num_rows, d) for st in mine if st.source != rank},
                           q.dtype, q.device, "gdq")
    if rank in dq_parts:
        got_dq[rank] = dq_parts[rank]
    if rows is not None:
        total = torch.zeros(bsz, hq, rows.numel(), d, dtype=acc, device=q.device)
        for st in mine:  # source order: deterministic
            total += got_dq[st.source].to(acc)
        dq.index_add_(2, rows.to(q.device), total)
