"""The context-parallel plan: from a layout (CSR, per head) and a sharding over P ranks, which
keys each rank's queries need from each rank, and the local layout of every step.

For rank r and source rank s (a *step*), the plan lists

* `keys`: the global key positions held by s that some query of r may attend (any head: the
  kv heads of a GQA group, and all kv heads, travel together), ascending. Only these are sent:
  full blocks whole, partial blocks trimmed to the keys their element masks use. This is the
  analytic minimum at key granularity (for a band: exactly the keys within its reach);
* `kv_blocks`: the global kv blocks those keys lie in; the receiver places the keys in a buffer
  of these blocks (keys not sent stay 0, and no local query is allowed to see them);
* `layout`: a `BlockLayout` over (rank r's queries, that buffer), the global layout's blocks
  renumbered, whose pattern evaluates the global pattern at the global positions.

Empty steps cost neither bytes nor compute. Plans are cached on the layout per sharding.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..patterns import BlockGrid, BlockLayout, Pattern
from ..patterns.layout import _Csr
from .sharding import Sharding

__all__ = ["ContextPlan", "Step", "plan_context_parallel", "PositionsView"]


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
    keys: torch.Tensor  # [n] int64 global key positions, ascending
    kv_blocks: torch.Tensor  # [nb] int64 global kv blocks, ascending
    slots: torch.Tensor  # [n] int64 index of each key in the step's kv buffer
    source_index: torch.Tensor  # [n] int64 index of each key in the source's local sequence
    buffer_len: int
    layout: BlockLayout

    @property
    def num_keys(self) -> int:
        return int(self.keys.numel())


@dataclass
class ContextPlan:
    sharding: Sharding
    layout: BlockLayout
    steps: dict = field(default_factory=dict)  # (rank, source) -> Step, non-empty only
    fingerprint: int = 0

    @property
    def world_size(self) -> int:
        return self.sharding.world_size

    def steps_of(self, rank: int) -> list[Step]:
        """Rank r's steps, in source order (the fixed order of every sum)."""
        return [self.steps[(rank, s)] for s in range(self.world_size) if (rank, s) in self.steps]

    def sends_of(self, source: int) -> list[Step]:
        """The steps other ranks need from `source`, in rank order."""
        return [self.steps[(r, source)] for r in range(self.world_size) if (r, source) in self.steps]

    def keys_matrix(self) -> torch.Tensor:
        """[P, P] int64: keys rank r (row) receives from rank s (column); the diagonal is local."""
        out = torch.zeros(self.world_size, self.world_size, dtype=torch.int64)
        for (r, s), step in self.steps.items():
            out[r, s] = step.num_keys
        return out

    def bytes_per_key(self, batch: int, kv_heads: int, head_dim: int, v_head_dim: int, itemsize: int) -> int:
        return batch * kv_heads * (head_dim + v_head_dim) * itemsize

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


def plan_context_parallel(layout: BlockLayout, sharding: Sharding) -> ContextPlan:
    """The plan of `layout` (self-attention over the sharded sequence: q_len == kv_len == N,
    q_offset 0) over `sharding`; cached on the layout."""
    if layout.q_len != layout.kv_len or layout.q_offset != 0:
        raise ValueError(f"context parallelism needs self-attention layouts (q_len == kv_len, q_offset 0), got "
                         f"q_len={layout.q_len}, kv_len={layout.kv_len}, q_offset={layout.q_offset}")
    if sharding.num_tokens != layout.q_len:
        raise ValueError(f"sharding is for {sharding.num_tokens} tokens, the layout for {layout.q_len}")
    if sharding.unit % layout.block_q or sharding.unit % layout.block_kv:
        raise ValueError(f"sharding unit ({sharding.unit}) must be a multiple of the layout's blocks "
                         f"({layout.block_q}, {layout.block_kv}): every block must live on one rank")
    return layout.cached(("context_parallel",) + sharding.key(), lambda: _build(layout, sharding))


def _build(layout: BlockLayout, sharding: Sharding) -> ContextPlan:
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
    plan = ContextPlan(sharding, layout)
    pattern = layout._require_pattern() if layout.partial.indices.numel() else layout.pattern
    for r in range(sharding.world_size):
        q_pos = sharding.positions(r, dev)  # [N_r]
        if q_pos.numel() == 0:
            continue
        my_qbs = torch.unique_consecutive(torch.div(q_pos, g.block_q, rounding_mode="floor"))  # local order
        q_local_block = torch.full((nqb,), -1, dtype=torch.int64, device=dev)
        q_local_block[my_qbs] = torch.arange(my_qbs.numel(), device=dev)
        mine = ent_rank == r
        for s in range(sharding.world_size):
            sel = (mine & (ent_source == s)).nonzero().reshape(-1)
            if sel.numel() == 0:
                continue
            keys = torch.unique(key_pos[sel][used[sel]])  # ascending
            if keys.numel() == 0:
                continue
            kv_blocks = torch.unique(ent_kb[sel])
            kv_local_block = torch.full((nkb,), -1, dtype=torch.int64, device=dev)
            kv_local_block[kv_blocks] = torch.arange(kv_blocks.numel(), device=dev)
            slots = kv_local_block[torch.div(keys, g.block_kv, rounding_mode="floor")] * g.block_kv + keys % g.block_kv
            last = int(kv_blocks[-1])
            buffer_len = (kv_blocks.numel() - 1) * g.block_kv + min(g.block_kv, g.kv_len - last * g.block_kv)
            kv_positions = (kv_blocks[:, None] * g.block_kv + torch.arange(g.block_kv, device=dev)[None]).reshape(-1)
            kv_positions = kv_positions[:buffer_len].clamp(max=g.kv_len - 1)
            rows = ent_head[sel] * my_qbs.numel() + q_local_block[ent_qb[sel]]
            cols = kv_local_block[ent_kb[sel]]
            full = ent_full[sel]
            local_grid = BlockGrid(q_pos.numel(), buffer_len, 0, g.block_q, g.block_kv, dev)
            view = PositionsView(pattern, q_pos, kv_positions) if pattern is not None else None
            num_rows = heads * my_qbs.numel()
            step_layout = BlockLayout(view, local_grid, heads, _sorted_csr(rows[full], cols[full], num_rows),
                                      _sorted_csr(rows[~full], cols[~full], num_rows))
            plan.steps[(r, s)] = Step(r, s, keys, kv_blocks, slots, local_index[keys], buffer_len, step_layout)
    plan.fingerprint = _fingerprint(layout, sharding, plan)
    return plan


def _sorted_csr(rows: torch.Tensor, cols: torch.Tensor, num_rows: int) -> _Csr:
    order = torch.argsort(rows * (int(cols.max()) + 1 if cols.numel() else 1) + cols)
    return _Csr(rows[order], cols[order], num_rows)


def _fingerprint(layout: BlockLayout, sharding: Sharding, plan: ContextPlan) -> int:
    """63-bit digest every rank compares before the first exchange: the same plan on all ranks."""
    h = hashlib.sha256()
    h.update(repr((layout.q_len, layout.block_q, layout.block_kv, layout.num_heads, sharding.key(),
                   repr(layout.pattern))).encode())
    h.update(plan.keys_matrix().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1
