"""The context-parallel plan: from a layout (CSR, per head) and a sharding over P ranks, which
keys each rank's queries need from each rank, and the local layouts the ranks compute on.

Keys travel per *group*: a group is one GQA group (the q heads sharing one kv head) when the
layout is per head and the caller names its kv heads, else all heads together (a layout shared
by every head needs the same keys for all). For rank r and source rank s (a *step*), the plan
lists

* `keys` / `key_group`: the (group, global key position) pairs held by s that some query of r in
  that group may attend, group-major, keys ascending. Only these are sent: full blocks whole,
  partial blocks trimmed to the keys their element masks use. This is the analytic minimum at
  key granularity (for a band: exactly the keys within its reach);
* `kv_blocks`: the global kv blocks those keys lie in; the receiver places the keys in a buffer
  of these blocks (keys not sent stay 0, and no local query of that group may see them);
* `layout`: a `BlockLayout` over (rank r's queries, that buffer), the global layout's blocks
  renumbered, whose pattern evaluates the global pattern at the global positions.

`rank_call(r)` is the same for all of rank r's steps at once (`RankCall`): one buffer holding
every kv block rank r touches, in global block order, and one layout over it, so a scheme whose
keys all arrive before compute (halo, all-to-all) runs one kernel launch per rank: the unsplit
call's rows of r, block for block, with no log-sum-exp merge.

Empty steps cost neither bytes nor compute. Plans are cached on the layout per sharding.

*Global rows* (`global_rows=True`): a query block that needs more than half of the keys held by
other ranks (Longformer's global tokens, BigBird's global blocks) is computed where its keys are,
instead of receiving them: its owner sends those q rows to every rank holding keys they attend
(`GlobalStep`), each computes the rows' partial (out, lse) over its OWN keys and sends it back,
and the owner merges the partials by log-sum-exp in fp32 (the backward sends dO, out, lse and
dlse of the rows out and takes dQ partials back; dK/dV stay where the keys are). Those rows then
leave the key plan, so the remaining rows keep their halo: Longformer becomes a halo plus a
global-row exchange. `global_bytes` counts every message of that exchange.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..patterns import BlockGrid, BlockLayout, Pattern
from ..patterns.layout import _Csr
from .sharding import Sharding

__all__ = ["ContextPlan", "Step", "RankCall", "GlobalStep", "plan_context_parallel", "PositionsView"]


class PositionsView(Pattern):
    """A pattern seen through index -> position tables: `allowed(i, j, h)` is
    `base.allowed(q_positions[i], kv_positions[j], h)`. Used only for the partial blocks of a
    step's layout (full and empty blocks come from the global layout), so it is never
    classified."""

    def __init__(self, base: Pattern, q_positions: torch.Tensor, kv_positions: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.num_heads = base.num_heads
        self.q_positions = q_positions
        self.kv_positions = kv_positions

    def allowed(self, q_idx, kv_idx, head=None):
        qp = self.q_positions.to(q_idx.device)[q_idx]
        kp = self.kv_positions.to(kv_idx.device)[kv_idx]
        return self.base.allowed(qp, kp, head)

    def is_causal(self):
        return False  # local indices are not positions

    def prepare(self, device) -> None:
        self.base.prepare(device)
        self.q_positions = self.q_positions.to(device)
        self.kv_positions = self.kv_positions.to(device)

    def __repr__(self) -> str:
        return f"PositionsView({self.base!r})"


@dataclass
class Step:
    """What rank `rank` needs from rank `source`."""

    rank: int
    source: int
    keys: torch.Tensor  # [n] int64 global key positions, group-major, ascending within a group
    key_group: torch.Tensor  # [n] int64 the group of each key (all 0 with one group)
    kv_blocks: torch.Tensor  # [nb] int64 global kv blocks, ascending
    slots: torch.Tensor  # [n] int64 index of each key in the step's kv buffer (its group's heads)
    source_index: torch.Tensor  # [n] int64 index of each key in the source's local sequence
    buffer_len: int
    layout: BlockLayout

    @property
    def num_keys(self) -> int:
        """(group, key) pairs: the rows of the message (each carrying the group's kv heads)."""
        return int(self.keys.numel())


@dataclass
class RankCall:
    """All of rank `rank`'s steps as one call: one kv buffer of every kv block the rank touches
    (global block order, so for contiguous shards the buffer is one contiguous run of the
    sequence and its layout the unsplit layout's rows of the rank), and one layout over it."""

    rank: int
    kv_blocks: torch.Tensor  # [nb] int64 global kv blocks, ascending
    slots: dict  # source -> [n] int64 index in the buffer of each key of steps[(rank, source)]
    buffer_len: int
    layout: BlockLayout


@dataclass
class GlobalStep:
    """Rank `source` computes the global rows of rank `owner` over its own keys: a layout over
    (the owner's global rows, in its `global_rows` order, a buffer of the source's kv blocks they
    touch, ascending)."""

    owner: int
    source: int
    num_rows: int  # q rows travelling (the owner's global rows)
    kv_index: torch.Tensor  # [buffer_len] int64 index of each buffer key in the source's local sequence
    buffer_len: int
    layout: BlockLayout


@dataclass
class ContextPlan:
    sharding: Sharding
    layout: BlockLayout
    groups: int = 1  # key groups: 1, or the kv heads of a per-head layout (one per GQA group)
    steps: dict = field(default_factory=dict)  # (rank, source) -> Step, non-empty only
    fingerprint: int = 0
    _entries: tuple = ()  # what rank_call needs to build a rank's layout
    _calls: dict = field(default_factory=dict)
    # global rows (empty without global_rows): rank -> [g] int64 local indices of its global
    # rows (whole q blocks, ascending positions); (owner, source) -> GlobalStep, non-empty only
    global_rows: dict = field(default_factory=dict)
    global_steps: dict = field(default_factory=dict)

    @property
    def has_global_rows(self) -> bool:
        return bool(self.global_steps)

    def global_steps_of_owner(self, owner: int) -> list[GlobalStep]:
        """The ranks computing `owner`'s global rows, in source order (the fixed merge order)."""
        return [self.global_steps[(owner, s)] for s in range(self.world_size) if (owner, s) in self.global_steps]

    def global_steps_of_source(self, source: int) -> list[GlobalStep]:
        """The owners whose global rows `source` computes, in owner order."""
        return [self.global_steps[(o, source)] for o in range(self.world_size) if (o, source) in self.global_steps]

    def global_matrix(self) -> torch.Tensor:
        """[P, P] int64: global rows owner (row) sends to source (column), off the diagonal."""
        out = torch.zeros(self.world_size, self.world_size, dtype=torch.int64)
        for (o, s), st in self.global_steps.items():
            if o != s:
                out[o, s] = st.num_rows
        return out

    def global_bytes(self, batch: int, q_heads: int, head_dim: int, v_head_dim: int, itemsize: int,
                     lse_itemsize: int) -> dict:
        """{kind: ([P] bytes sent, [P] bytes received)} of the global-row exchange, per rank:
        "gq" q rows to the sources, "gout" partial out (`itemsize`) and lse (`lse_itemsize`) back;
        backward "gdo" dO and out, lse and dlse of the rows out, "gdq" dQ partials back."""
        m = self.global_matrix()
        owner_side, source_side = m.sum(1), m.sum(0)  # rows sent as owner, received as source
        row = batch * q_heads
        per = {"gq": row * head_dim * itemsize, "gout": row * (v_head_dim * itemsize + lse_itemsize),
               "gdo": row * 2 * (v_head_dim * itemsize + lse_itemsize), "gdq": row * head_dim * itemsize}
        return {"gq": (owner_side * per["gq"], source_side * per["gq"]),
                "gout": (source_side * per["gout"], owner_side * per["gout"]),
                "gdo": (owner_side * per["gdo"], source_side * per["gdo"]),
                "gdq": (source_side * per["gdq"], owner_side * per["gdq"])}

    def forward_bytes_received(self, batch: int, q_heads: int, kv_heads: int, head_dim: int, v_head_dim: int,
                               itemsize: int, lse_itemsize: int) -> torch.Tensor:
        """[P] bytes each rank receives in the forward: keys and values, plus the global rows'
        q rows (as a source) and partial (out, lse) (as an owner)."""
        total = self.bytes_received(batch=batch, kv_heads=kv_heads, head_dim=head_dim, v_head_dim=v_head_dim,
                                    itemsize=itemsize)
        if self.has_global_rows:
            g = self.global_bytes(batch, q_heads, head_dim, v_head_dim, itemsize, lse_itemsize)
            total = total + g["gq"][1] + g["gout"][1]
        return total

    @property
    def world_size(self) -> int:
        return self.sharding.world_size

    def steps_of(self, rank: int) -> list[Step]:
        """Rank r's steps, in source order (the fixed order of every sum)."""
        return [self.steps[(rank, s)] for s in range(self.world_size) if (rank, s) in self.steps]

    def sends_of(self, source: int) -> list[Step]:
        """The steps other ranks need from `source`, in rank order."""
        return [self.steps[(r, source)] for r in range(self.world_size) if (r, source) in self.steps]

    def rank_call(self, rank: int) -> RankCall | None:
        """Rank r's steps as one call (None when r has none); built on first use, cached."""
        if rank not in self._calls:
            self._calls[rank] = _rank_call(self, rank) if self.steps_of(rank) else None
        return self._calls[rank]

    def keys_matrix(self) -> torch.Tensor:
        """[P, P] int64: (group, key) rows rank r (row) receives from rank s (column); the
        diagonal is local. With one group, simply keys."""
        out = torch.zeros(self.world_size, self.world_size, dtype=torch.int64)
        for (r, s), step in self.steps.items():
            out[r, s] = step.num_keys
        return out

    def bytes_per_key(self, batch: int, kv_heads: int, head_dim: int, v_head_dim: int, itemsize: int) -> int:
        """Bytes of one (group, key) row: k and v of the group's kv heads."""
        if kv_heads % self.groups:
            raise ValueError(f"kv_heads ({kv_heads}) must be a multiple of the plan's key groups ({self.groups})")
        return batch * (kv_heads // self.groups) * (head_dim + v_head_dim) * itemsize

    def bytes_received(self, **dims) -> torch.Tensor:
        """[P] bytes of k and v each rank receives in the forward (the backward returns as many
        bytes of dK and dV). `dims`: batch, kv_heads, head_dim, v_head_dim, itemsize."""
        m = self.keys_matrix()
        m.fill_diagonal_(0)
        return m.sum(1) * self.bytes_per_key(**dims)

    def bytes_sent(self, **dims) -> torch.Tensor:
        """[P] bytes of k and v each rank sends in the forward."""
        m = self.keys_matrix()
        m.fill_diagonal_(0)
        return m.sum(0) * self.bytes_per_key(**dims)

    def busy_pairs(self) -> int:
        """Ordered (rank, source) pairs with keys to move, rank != source."""
        return sum(1 for (r, s) in self.steps if r != s)

    def max_hop(self) -> int:
        """The largest ring distance (in either direction) of any exchange: 1 for a halo within
        neighbouring shards."""
        p = self.world_size
        return max((min((r - s) % p, (s - r) % p) for (r, s) in self.steps if r != s), default=0)


def key_groups(layout: BlockLayout, kv_heads: int | None) -> int:
    """How many key groups a plan of `layout` has: one per kv head when the layout is per head
    and `kv_heads` is given (a GQA group's q heads share their kv head's keys), else one."""
    if kv_heads is None or layout.num_heads == 1:
        return 1
    if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1 or layout.num_heads % kv_heads:
        raise ValueError(f"kv_heads must be a positive divisor of the layout's {layout.num_heads} heads, "
                         f"got {kv_heads!r}")
    return kv_heads


def plan_context_parallel(layout: BlockLayout, sharding: Sharding, kv_heads: int | None = None,
                          global_rows: bool = False) -> ContextPlan:
    """The plan of `layout` (self-attention over the sharded sequence: q_len == kv_len == N,
    q_offset 0) over `sharding`; cached on the layout. `kv_heads`: the kv heads of the call, so a
    per-head layout sends each GQA group only its own keys (None: keys are unioned over all
    heads). `global_rows`: query blocks needing more than half of the keys other ranks hold are
    computed where their keys are (module docstring); the plan may still have none."""
    if not isinstance(global_rows, bool):
        raise ValueError(f"global_rows must be a bool, got {global_rows!r}")
    if layout.q_len != layout.kv_len or layout.q_offset != 0:
        raise ValueError(f"context parallelism needs self-attention layouts (q_len == kv_len, q_offset 0), got "
                         f"q_len={layout.q_len}, kv_len={layout.kv_len}, q_offset={layout.q_offset}")
    if sharding.num_tokens != layout.q_len:
        raise ValueError(f"sharding is for {sharding.num_tokens} tokens, the layout for {layout.q_len}")
    if sharding.unit % layout.block_q or sharding.unit % layout.block_kv:
        raise ValueError(f"sharding unit ({sharding.unit}) must be a multiple of the layout's blocks "
                         f"({layout.block_q}, {layout.block_kv}): every block must live on one rank")
    groups = key_groups(layout, kv_heads)
    plan = layout.cached(("context_parallel", groups, global_rows) + sharding.key(),
                         lambda: _build(layout, sharding, groups, global_rows))
    if global_rows and not plan.has_global_rows:  # the same plan as without: built once
        layout.cache.setdefault(("context_parallel", groups, False) + sharding.key(), plan)
    return plan


def _build(layout: BlockLayout, sharding: Sharding, groups: int, global_rows: bool = False) -> ContextPlan:
    g = layout.grid
    dev = g.device
    heads, nqb, nkb = layout.num_heads, g.num_q_blocks, g.num_kv_blocks
    owner = sharding.owner().to(dev)
    local_index = sharding.local_index().to(dev)
    q_block_owner = owner[torch.arange(nqb, device=dev) * g.block_q]  # [NQB]
    kv_block_owner = owner[torch.arange(nkb, device=dev) * g.block_kv]  # [NKB]
    # entries of the layout as (head, qb, kb, is_full)
    ent_rows = torch.cat([layout.full.rows, layout.partial.rows])
    ent_kb = torch.cat([layout.full.indices.long(), layout.partial.indices.long()])
    ent_full = torch.cat([torch.ones_like(layout.full.rows, dtype=torch.bool),
                          torch.zeros_like(layout.partial.rows, dtype=torch.bool)])
    ent_head = torch.div(ent_rows, nqb, rounding_mode="floor")
    ent_qb = ent_rows % nqb
    ent_group = torch.div(ent_head, heads // groups, rounding_mode="floor")  # [E] the q head's GQA group
    # keys each partial entry uses: any query row of the block may attend them
    used = torch.ones(ent_kb.numel(), g.block_kv, dtype=torch.bool, device=dev)  # [E, BK]
    part = (~ent_full).nonzero().reshape(-1)
    chunk = max(1, (1 << 22) // (g.block_q * g.block_kv))
    for c0 in range(0, part.numel(), chunk):
        e = part[c0:c0 + chunk]
        used[e] = layout.element_masks(ent_head[e], ent_qb[e], ent_kb[e]).any(1)
    key_pos = ent_kb[:, None] * g.block_kv + torch.arange(g.block_kv, device=dev)[None]  # [E, BK]
    used &= key_pos < g.kv_len
    ent_rank = q_block_owner[ent_qb]
    ent_source = kv_block_owner[ent_kb]
    plan = ContextPlan(sharding, layout, groups)
    if global_rows:
        is_global = _global_q_blocks(layout, sharding, ent_head, ent_qb, ent_rank, ent_source, used, q_block_owner)
        glob = is_global[ent_qb]
        plan._entries = tuple(t[glob] for t in (ent_rank, ent_head, ent_qb, ent_kb, ent_full))
        _build_global(layout, plan, is_global, q_block_owner, ent_source[glob], local_index)
        keep = ~glob
        ent_rank, ent_head, ent_qb, ent_kb, ent_full, ent_group, ent_source, used, key_pos = (
            t[keep] for t in (ent_rank, ent_head, ent_qb, ent_kb, ent_full, ent_group, ent_source, used, key_pos))
    plan._entries = (ent_rank, ent_head, ent_qb, ent_kb, ent_full)
    for r in range(sharding.world_size):
        if sharding.length(r) == 0:
            continue
        mine = ent_rank == r
        for s in range(sharding.world_size):
            sel = (mine & (ent_source == s)).nonzero().reshape(-1)
            if sel.numel() == 0:
                continue
            # (group, key) pairs, group-major and keys ascending: one sort of group * N + key
            code = torch.unique((ent_group[sel][:, None] * g.kv_len + key_pos[sel])[used[sel]])
            if code.numel() == 0:
                continue
            keys, key_group = code % g.kv_len, torch.div(code, g.kv_len, rounding_mode="floor")
            local = _local_layout(layout, plan, r, sel)
            slots = local.kv_local_block[torch.div(keys, g.block_kv, rounding_mode="floor")] * g.block_kv + \
                keys % g.block_kv
            plan.steps[(r, s)] = Step(r, s, keys, key_group, local.kv_blocks, slots, local_index[keys],
                                      local.buffer_len, local.layout)
    plan.fingerprint = _fingerprint(layout, sharding, plan)
    return plan


def _global_q_blocks(layout, sharding, ent_head, ent_qb, ent_rank, ent_source, used, q_block_owner) -> torch.Tensor:
    """[NQB] bool: query blocks that, for some head, attend more than half of the keys held by
    ranks other than their owner (and at least one key elsewhere)."""
    g = layout.grid
    nqb = g.num_q_blocks
    far = ent_source != ent_rank
    per_row = torch.zeros(layout.num_heads * nqb, dtype=torch.int64, device=g.device)
    per_row.index_add_(0, (ent_head * nqb + ent_qb)[far], used[far].sum(1))
    need = per_row.view(layout.num_heads, nqb).amax(0)  # [NQB] keys elsewhere, the most over heads
    lengths = torch.tensor(sharding.lengths(), dtype=torch.int64, device=g.device)
    elsewhere = sharding.num_tokens - lengths[q_block_owner]  # [NQB]
    return (need > 0) & (2 * need > elsewhere)


def _build_global(layout, plan, is_global, q_block_owner, ent_source, local_index) -> None:
    """plan.global_rows and plan.global_steps from the global entries (plan._entries)."""
    g = layout.grid
    dev = g.device
    ent_rank = plan._entries[0]
    for o in range(plan.world_size):
        q_blocks = (is_global & (q_block_owner == o)).nonzero().reshape(-1)
        if q_blocks.numel() == 0:
            continue
        q_pos = (q_blocks[:, None] * g.block_q + torch.arange(g.block_q, device=dev)[None]).reshape(-1)
        q_pos = q_pos[q_pos < g.q_len]
        plan.global_rows[o] = local_index[q_pos]
        for s in range(plan.world_size):
            sel = ((ent_rank == o) & (ent_source == s)).nonzero().reshape(-1)
            if sel.numel() == 0:
                continue
            local = _layout_over(layout, plan, q_blocks, sel)
            kv_pos = (local.kv_blocks[:, None] * g.block_kv + torch.arange(g.block_kv, device=dev)[None]).reshape(-1)
            kv_pos = kv_pos[:local.buffer_len]
            plan.global_steps[(o, s)] = GlobalStep(o, s, q_pos.numel(), local_index[kv_pos], local.buffer_len,
                                                   local.layout)


@dataclass
class _Local:
    kv_blocks: torch.Tensor  # [nb] global kv blocks of the buffer, ascending
    kv_local_block: torch.Tensor  # [NKB] each global kv block's index in the buffer (-1: absent)
    buffer_len: int
    layout: BlockLayout


def _local_layout(layout: BlockLayout, plan: ContextPlan, rank: int, sel: torch.Tensor) -> _Local:
    """The layout over (rank's queries, a buffer of the kv blocks of entries `sel`)."""
    q_pos = plan.sharding.positions(rank, layout.grid.device)  # [N_r]
    my_qbs = torch.unique_consecutive(torch.div(q_pos, layout.grid.block_q, rounding_mode="floor"))  # local order
    return _layout_over(layout, plan, my_qbs, sel)


def _layout_over(layout: BlockLayout, plan: ContextPlan, my_qbs: torch.Tensor, sel: torch.Tensor) -> _Local:
    """The layout over (the rows of global q blocks `my_qbs`, in that order, a buffer of the kv
    blocks of entries `sel`, ascending). Only the sequence's last block may be short; it must come
    last in `my_qbs`."""
    g = layout.grid
    dev = g.device
    ent_rank, ent_head, ent_qb, ent_kb, ent_full = plan._entries
    q_pos = (my_qbs[:, None] * g.block_q + torch.arange(g.block_q, device=dev)[None]).reshape(-1)
    q_pos = q_pos[q_pos < g.q_len]
    q_local_block = torch.full((g.num_q_blocks,), -1, dtype=torch.int64, device=dev)
    q_local_block[my_qbs] = torch.arange(my_qbs.numel(), device=dev)
    kv_blocks = torch.unique(ent_kb[sel])
    kv_local_block = torch.full((g.num_kv_blocks,), -1, dtype=torch.int64, device=dev)
    kv_local_block[kv_blocks] = torch.arange(kv_blocks.numel(), device=dev)
    # only the block ending at kv_len may be short, and in global order it comes last
    last = int(kv_blocks[-1])
    buffer_len = (kv_blocks.numel() - 1) * g.block_kv + min(g.block_kv, g.kv_len - last * g.block_kv)
    kv_positions = (kv_blocks[:, None] * g.block_kv + torch.arange(g.block_kv, device=dev)[None]).reshape(-1)
    kv_positions = kv_positions[:buffer_len].clamp(max=g.kv_len - 1)
    rows = ent_head[sel] * my_qbs.numel() + q_local_block[ent_qb[sel]]
    cols = kv_local_block[ent_kb[sel]]
    full = ent_full[sel]
    local_grid = BlockGrid(q_pos.numel(), buffer_len, 0, g.block_q, g.block_kv, dev)
    pattern = layout._require_pattern() if layout.partial.indices.numel() else layout.pattern
    view = PositionsView(pattern, q_pos, kv_positions) if pattern is not None else None
    num_rows = layout.num_heads * my_qbs.numel()
    local = BlockLayout(view, local_grid, layout.num_heads, _sorted_csr(rows[full], cols[full], num_rows),
                        _sorted_csr(rows[~full], cols[~full], num_rows))
    return _Local(kv_blocks, kv_local_block, buffer_len, local)


def _rank_call(plan: ContextPlan, rank: int) -> RankCall:
    ent_rank = plan._entries[0]
    sel = (ent_rank == rank).nonzero().reshape(-1)
    local = _local_layout(plan.layout, plan, rank, sel)
    bk = plan.layout.block_kv
    slots = {st.source: local.kv_local_block[torch.div(st.keys, bk, rounding_mode="floor")] * bk + st.keys % bk
             for st in plan.steps_of(rank)}
    return RankCall(rank, local.kv_blocks, slots, local.buffer_len, local.layout)


def _sorted_csr(rows: torch.Tensor, cols: torch.Tensor, num_rows: int) -> _Csr:
    order = torch.argsort(rows * (int(cols.max()) + 1 if cols.numel() else 1) + cols)
    return _Csr(rows[order], cols[order], num_rows)


def _fingerprint(layout: BlockLayout, sharding: Sharding, plan: ContextPlan) -> int:
    """63-bit digest every rank compares before the first exchange: the same plan on all ranks."""
    h = hashlib.sha256()
    h.update(repr((layout.q_len, layout.block_q, layout.block_kv, layout.num_heads, plan.groups, sharding.key(),
                   repr(layout.pattern))).encode())
    h.update(plan.keys_matrix().numpy().tobytes())
    h.update(plan.global_matrix().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1
