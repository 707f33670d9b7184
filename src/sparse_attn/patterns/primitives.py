"""The few primitive pattern shapes every preset is built from, each with an exact analytic
block classifier:

* `Band`      - allowed iff lo <= i - j <= hi and (i - j) % dilation == 0
                (full, causal, sliding windows, dilated windows, strides).
* `Columns`   - allowed iff j is in a set (global keys, attention sinks, summary columns).
* `Rows`      - allowed iff i is in a set (global queries).
* `Segments`  - allowed iff i and j lie in the same segment of a tiling of positions
                (packed documents, Sparse Transformer's fixed blocks).
* `BlockCells`- allowed iff the cell (i // cq, j // ck) is set (block-sparse, BigBird).
* `Predicate` - any user function; blocks found by evaluating it (O(N^2) time, bounded memory).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Callable

import torch

from .base import Pattern, state_from_count
from .grid import EMPTY, FULL, PARTIAL, UNBOUNDED, BlockGrid, BlockSet, expand_ranges


class _PerDevice:
    """A lookup table with one copy per device, made ahead of use by `prepare(device)`: inside
    a compiled FlexAttention mask_mod a device copy could not be created."""

    def __init__(self, table: torch.Tensor) -> None:
        self.copies = {str(table.device): table}
        self.source = table

    def prepare(self, device) -> None:
        key = str(torch.device(device))
        if key not in self.copies:
            self.copies[key] = self.source.to(device)

    def on(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self.copies:
            self.prepare(device)
        return self.copies[key]


def _floor_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="floor")


def _states(nonempty: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    return torch.where(full, FULL, torch.where(nonempty, PARTIAL, EMPTY)).to(torch.int8)


def _shared(grid: BlockGrid, qb: torch.Tensor) -> torch.Tensor:
    """Head index 0 for every block of a head-independent pattern."""
    return torch.zeros_like(qb)


class _KvRangePattern(Pattern):
    """A pattern whose query block touches one contiguous range of kv blocks, given by
    `_kv_range(grid, q_blocks) -> (first, last)`: candidates are exactly those ranges."""

    @abstractmethod
    def _kv_range(self, grid, qb):
        """(first, last) kv block touched by each query block in `qb` (last < first: none)."""

    def _candidates(self, grid):
        qb, kb = expand_ranges(*self._kv_range(grid, grid.arange(grid.num_q_blocks)))
        return _shared(grid, qb), qb, kb

    def _candidate_count(self, grid):
        first, last = self._kv_range(grid, grid.arange(grid.num_q_blocks))
        return int(torch.clamp(last - first + 1, min=0).sum())


class Band(_KvRangePattern):
    """Allowed iff lo <= i - j <= hi and (i - j) is a multiple of `dilation`.

    `lo`/`hi` of None mean unbounded. Causal is Band(0, None); a causal window W is Band(0, W-1).
    """

    def __init__(self, lo: int | None, hi: int | None, dilation: int = 1, name: str | None = None) -> None:
        super().__init__()
        self.lo = -UNBOUNDED if lo is None else int(lo)
        self.hi = UNBOUNDED if hi is None else int(hi)
        self.dilation = int(dilation)
        self.name = name

    def is_causal(self):
        return self.lo >= 0

    def band_bounds(self):
        return self.lo, self.hi, self.dilation

    def block_signature(self, q_pos, kv_pos):
        # i - j over the block is (q0 - k0) + r - c wherever neither side is clamped (the clamped
        # tails are fixed by the real counts, which the caller adds), so the offset q0 - k0
        # decides; a block the band misses entirely, or covers entirely, has one mask whatever
        # its offset (up to the offset modulo the dilation): those share a signature
        offset = (q_pos[:, 0] - kv_pos[:, 0]).long()
        d_min, d_max = q_pos[:, 0] - kv_pos[:, -1], q_pos[:, -1] - kv_pos[:, 0]
        outside = torch.zeros_like(offset, dtype=torch.bool)
        inside = torch.ones_like(offset, dtype=torch.bool)
        if self.lo != -UNBOUNDED:
            outside |= d_max < self.lo
            inside &= d_min >= self.lo
        if self.hi != UNBOUNDED:
            outside |= d_min > self.hi
            inside &= d_max <= self.hi
        sig = torch.where(inside, _WHOLE_BAND + torch.remainder(offset, self.dilation), offset)
        return torch.where(outside, _NO_BAND, sig)[:, None]

    @staticmethod
    def intersect(bounds) -> "Band":
        """The band allowed by every one of `bounds` [(lo, hi, dilation), ...]."""
        lo = max(b[0] for b in bounds)
        hi = min(b[1] for b in bounds)
        dilation = math.lcm(*(b[2] for b in bounds))
        return Band(None if lo == -UNBOUNDED else lo, None if hi == UNBOUNDED else hi, dilation)

    def reachable(self, kv_idx, next_q):
        # query i >= next_q reaches j when lo <= i - j <= hi: some such i exists iff j >= next_q - hi
        # (with dilation r, i = j + hi' for the largest multiple hi' of r in [max(lo, next_q - j), hi])
        if self.hi == UNBOUNDED:
            return torch.ones_like(kv_idx, dtype=torch.bool)
        if self.dilation == 1:
            return kv_idx >= next_q - self.hi
        first = torch.clamp(next_q - kv_idx, min=self.lo)  # smallest useful distance i - j
        return -(-first // self.dilation) * self.dilation <= self.hi

    def allowed(self, q_idx, kv_idx, head=None):
        d = q_idx - kv_idx
        # Unbounded sides are left out, not compared with a huge constant: FlexAttention's GPU
        # kernels index in int32, where such a constant would wrap around.
        ok = d == d
        if self.lo != -UNBOUNDED:
            ok = ok & (d >= self.lo)
        if self.hi != UNBOUNDED:
            ok = ok & (d <= self.hi)
        if self.dilation > 1:
            ok = ok & (torch.remainder(d, self.dilation) == 0)
        return ok

    def residue_split(self) -> tuple[int, "Band"] | None:
        """(r, inner) when dilation r > 1: queries and keys of one residue class mod r form a
        plain band `inner` over their own indices (i = c + r*a, j = c + r*b). Running r such
        bands does only the allowed work, where blocks of the dilated band are half empty."""
        r = self.dilation
        if r == 1:
            return None
        if getattr(self, "_split", None) is not None:  # one inner pattern: its layouts stay cached
            return self._split
        lo = -UNBOUNDED if self.lo == -UNBOUNDED else -((-self.lo) // r)  # ceil(lo / r)
        hi = UNBOUNDED if self.hi == UNBOUNDED else self.hi // r  # floor(hi / r)
        self._split = (r, Band(None if lo == -UNBOUNDED else lo, None if hi == UNBOUNDED else hi))
        return self._split

    def _kv_range(self, grid, qb):
        p0, p1 = grid.q_block_bounds(qb)
        return grid.kv_blocks_of_positions(p0 - self.hi, p1 - self.lo)

    def _classify(self, grid, head, qb, kb):
        p0, p1 = grid.q_block_bounds(qb)
        k0, k1 = grid.kv_block_bounds(kb)
        dmin, dmax = p0 - (k1 - 1), (p1 - 1) - k0  # every difference in between occurs in the block
        a = torch.clamp(dmin, min=self.lo)
        b = torch.clamp(dmax, max=self.hi)
        r = self.dilation
        nonempty = (a <= b) & (_floor_div(b, r) * r >= a)
        full = (dmin >= self.lo) & (dmax <= self.hi)
        if r > 1:
            full = full & (dmin == dmax) & (torch.remainder(dmin, r) == 0)
        return _states(nonempty, full)

    def _count(self, grid, head, qb, kb):
        # For a difference u = i - j the pairs in the block number
        # L(u) = max(0, min(A, D, B - u, C + u)): a trapezoid in u (A, D the block's sides).
        # Sum it over the allowed u (multiples of r in [lo, hi]) piece by piece in closed form.
        a, b = grid.q_block_bounds(qb)
        c, e = grid.kv_block_bounds(kb)
        big_b, big_c, m = b - c, e - a, torch.minimum(b - a, e - c)
        lo = torch.clamp(1 - big_c, min=self.lo)  # L > 0 needs C + u >= 1 and B - u >= 1
        hi = torch.clamp(big_b - 1, max=self.hi)
        rise_end, fall_start = m - big_c, big_b - m  # rise_end <= fall_start
        r = self.dilation
        rise = _progression_sum(lo, torch.minimum(hi, rise_end), r, big_c, 1)
        flat = _progression_sum(torch.maximum(lo, rise_end + 1), torch.minimum(hi, fall_start - 1), r, m, 0)
        fall = _progression_sum(torch.maximum(lo, torch.maximum(fall_start, rise_end + 1)), hi, r, big_b, -1)
        return rise + flat + fall

    def __repr__(self):
        if self.name:
            return self.name
        lo = None if self.lo == -UNBOUNDED else self.lo
        hi = None if self.hi == UNBOUNDED else self.hi
        return f"Band(lo={lo}, hi={hi}, dilation={self.dilation})"


def _progression_sum(x: torch.Tensor, y: torch.Tensor, r: int, alpha, beta: int) -> torch.Tensor:
    """Sum of alpha + beta * u over the multiples u of r in [x, y] (0 where there are none)."""
    u0 = -_floor_div(-x, r) * r  # first multiple >= x
    u1 = _floor_div(y, r) * r  # last multiple <= y
    n = torch.clamp(_floor_div(u1 - u0, r) + 1, min=0)
    return n * alpha + beta * _floor_div(n * (u0 + u1), 2)  # n * (u0 + u1) is even


class IndexSet:
    """A set of non-negative positions with O(1) membership and range counts.

    Either explicit sorted indices, a range [start, prefix) (start 0 by default: a prefix), or a
    periodic set {p : p mod period >= period - width}. Explicit indices, and a prefix made with
    `named=True` (Longformer's "the first n tokens"), name positions that must exist: a layout
    for a shorter sequence is refused. A plain prefix (StreamingLLM's sinks) is "up to n".
    """

    def __init__(self, *, indices: torch.Tensor | None = None, prefix: int | None = None,
                 period: int | None = None, width: int | None = None, named: bool = False, start: int = 0) -> None:
        self.indices = None
        self.prefix = prefix
        self.start = start  # with prefix: the range [start, prefix)
        self.named = named
        self.period, self.width = period, width
        if indices is not None:
            idx = torch.unique(torch.as_tensor(indices, dtype=torch.int64).reshape(-1).cpu())
            self.indices = idx
            size = int(idx[-1]) + 1 if idx.numel() else 0
            member = torch.zeros(size + 1, dtype=torch.bool)  # the extra slot answers "out of range"
            member[idx] = True
            self._member = _PerDevice(member)
            self._cumulative = _PerDevice(torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(member.long(), 0)]))

    def prepare(self, device) -> None:
        if self.indices is not None:
            self._member.prepare(device)
            self._cumulative.prepare(device)

    def max_index(self) -> int | None:
        """The largest position that must exist in the sequence (None: no such requirement)."""
        if self.indices is not None:
            return int(self.indices[-1]) if self.indices.numel() else None
        if self.named and self.prefix:
            return self.prefix - 1
        return None

    def contains(self, x: torch.Tensor) -> torch.Tensor:
        if self.prefix is not None:
            return (x >= self.start) & (x < self.prefix)
        if self.period is not None:
            return torch.remainder(x, self.period) >= self.period - self.width
        member = self._member.on(x.device)
        return member[torch.clamp(x, 0, member.numel() - 1)] & (x >= 0)

    def count_below(self, x: torch.Tensor) -> torch.Tensor:
        """Members in [0, x)."""
        x = torch.clamp(x, min=0)
        if self.prefix is not None:
            return torch.clamp(x, min=self.start, max=max(self.prefix, self.start)) - self.start
        if self.period is not None:
            return _floor_div(x, self.period) * self.width + torch.clamp(
                torch.remainder(x, self.period) - (self.period - self.width), min=0)
        cum = self._cumulative.on(x.device)
        return cum[torch.clamp(x, max=cum.numel() - 1)]

    def count(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        return self.count_below(hi) - self.count_below(lo)

    def __repr__(self):
        if self.prefix is not None:
            return f"range({self.prefix})" if self.start == 0 else f"range({self.start}, {self.prefix})"
        if self.period is not None:
            return f"{{p : p % {self.period} >= {self.period - self.width}}}"
        return f"{self.indices.tolist()}" if self.indices.numel() <= 8 else f"<{self.indices.numel()} positions>"


# Band signatures of blocks the band misses / covers: far outside any offset a sequence can have
_NO_BAND, _WHOLE_BAND = -(1 << 62), 1 << 62


def _membership_words(member: torch.Tensor) -> torch.Tensor:
    """bool [n, L] -> int64 [n, ceil(L / 62)]: the bits packed exactly (62 per word, no sign)."""
    n, length = member.shape
    words = -(-length // 62)
    padded = torch.nn.functional.pad(member, (0, words * 62 - length)).reshape(n, words, 62).long()
    weights = torch.ones(1, dtype=torch.int64, device=member.device) << torch.arange(62, device=member.device)
    return (padded * weights).sum(-1)


class Columns(Pattern):
    """Allowed iff the key position is in `keys` (every query sees them)."""

    def __init__(self, keys: IndexSet) -> None:
        super().__init__()
        self.keys = keys

    def reachable(self, kv_idx, next_q):
        return self.keys.contains(kv_idx)  # every future query sees a global key

    def allowed(self, q_idx, kv_idx, head=None):
        return self.keys.contains(kv_idx) & (q_idx == q_idx)  # broadcast against q_idx

    def block_signature(self, q_pos, kv_pos):
        return _membership_words(self.keys.contains(kv_pos))

    def prepare(self, device):
        self.keys.prepare(device)

    def _touched_kv_blocks(self, grid):
        kb = grid.arange(grid.num_kv_blocks)
        k0, k1 = grid.kv_block_bounds(kb)
        state = state_from_count(self.keys.count(k0, k1), k1 - k0)
        keep = state != EMPTY
        return kb[keep], state[keep]

    def _candidates(self, grid):
        kb, _ = self._touched_kv_blocks(grid)
        qb = grid.arange(grid.num_q_blocks).repeat_interleave(kb.numel())
        kb = kb.repeat(grid.num_q_blocks)
        return _shared(grid, qb), qb, kb

    def _candidate_count(self, grid):
        return grid.num_q_blocks * self._touched_kv_blocks(grid)[0].numel()

    def _classify(self, grid, head, qb, kb):
        k0, k1 = grid.kv_block_bounds(kb)
        return state_from_count(self.keys.count(k0, k1), k1 - k0)

    def _count(self, grid, head, qb, kb):
        p0, p1 = grid.q_block_bounds(qb)
        k0, k1 = grid.kv_block_bounds(kb)
        return self.keys.count(k0, k1) * (p1 - p0)

    def _validate(self, grid):
        m = self.keys.max_index()
        if m is not None and m >= grid.kv_end:
            raise ValueError(f"global token index {m} is out of range for a sequence of {grid.kv_end} keys "
                             f"(global tokens {self.keys!r})")

    def __repr__(self):
        return f"Columns({self.keys!r})"


class Rows(Pattern):
    """Allowed iff the query position is in `queries` (those queries see every key)."""

    def __init__(self, queries: IndexSet) -> None:
        super().__init__()
        self.queries = queries

    def reachable(self, kv_idx, next_q):
        q = self.queries
        future_row = (q.prefix is not None and q.prefix > next_q) or q.period is not None or \
            (q.indices is not None and q.indices.numel() > 0 and int(q.indices[-1]) >= next_q)
        return torch.full_like(kv_idx, future_row, dtype=torch.bool)  # a future global row sees all

    def allowed(self, q_idx, kv_idx, head=None):
        return self.queries.contains(q_idx) & (kv_idx == kv_idx)

    def block_signature(self, q_pos, kv_pos):
        return _membership_words(self.queries.contains(q_pos))

    def prepare(self, device):
        self.queries.prepare(device)

    def _touched_q_blocks(self, grid):
        qb = grid.arange(grid.num_q_blocks)
        p0, p1 = grid.q_block_bounds(qb)
        return qb[self.queries.count(p0, p1) > 0]

    def _candidates(self, grid):
        rows = self._touched_q_blocks(grid)
        qb = rows.repeat_interleave(grid.num_kv_blocks)
        kb = grid.arange(grid.num_kv_blocks).repeat(rows.numel())
        return _shared(grid, qb), qb, kb

    def _candidate_count(self, grid):
        return self._touched_q_blocks(grid).numel() * grid.num_kv_blocks

    def _classify(self, grid, head, qb, kb):
        p0, p1 = grid.q_block_bounds(qb)
        k0, k1 = grid.kv_block_bounds(kb)
        count = self.queries.count(p0, p1)
        return _states((count > 0) & (k1 > k0), (count == p1 - p0) & (k1 > k0))

    def _count(self, grid, head, qb, kb):
        p0, p1 = grid.q_block_bounds(qb)
        k0, k1 = grid.kv_block_bounds(kb)
        return self.queries.count(p0, p1) * (k1 - k0)

    def _validate(self, grid):
        m = self.queries.max_index()
        if m is not None and m >= max(grid.kv_end, grid.q_end):
            raise ValueError(f"global token index {m} is out of range for a sequence of "
                             f"{max(grid.kv_end, grid.q_end)} positions (global tokens {self.queries!r})")

    def __repr__(self):
        return f"Rows({self.queries!r})"


class Segments(_KvRangePattern):
    """Allowed iff i and j are in the same segment; segments tile the positions in order.

    Either regular segments of `size` (Sparse Transformer's fixed blocks), or the runs of a
    non-decreasing `ids` tensor (packed documents; positions must be < len(ids)).
    """

    def __init__(self, *, size: int | None = None, ids: torch.Tensor | None = None) -> None:
        super().__init__()
        self.size = size
        self.length = None
        if ids is not None:
            ids = torch.as_tensor(ids).reshape(-1).cpu()
            if ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise TypeError(f"doc_ids must be an integer tensor, got {ids.dtype}")
            ids = ids.long()
            if ids.numel() == 0:
                raise ValueError("doc_ids must not be empty")
            if (ids[1:] < ids[:-1]).any():
                raise ValueError("doc_ids must be non-decreasing (packed documents are contiguous runs); "
                                 "for arbitrary ids use patterns.predicate")
            self.length = ids.numel()
            change = torch.cat([torch.ones(1, dtype=torch.bool), ids[1:] != ids[:-1]])
            self._segment = _PerDevice(torch.cumsum(change.long(), 0) - 1)  # [N] run index of each position
            starts = change.nonzero().squeeze(1)
            self._start = starts
            self._end = torch.cat([starts[1:], torch.tensor([self.length])])

    def prepare(self, device) -> None:
        if self.length is not None:
            self._segment.prepare(device)

    def segment_of(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is not None:
            return _floor_div(x, self.size)
        seg = self._segment.on(x.device)
        return seg[torch.clamp(x, 0, self.length - 1)]

    def allowed(self, q_idx, kv_idx, head=None):
        return self.segment_of(q_idx) == self.segment_of(kv_idx)

    def _kv_range(self, grid, qb):
        p0, p1 = grid.q_block_bounds(qb)
        s0, s1 = self.segment_of(p0), self.segment_of(p1 - 1)
        if self.size is not None:
            lo, hi = s0 * self.size, (s1 + 1) * self.size
        else:
            lo, hi = self._start.to(grid.device)[s0], self._end.to(grid.device)[s1]
        return grid.kv_blocks_of_positions(lo, hi)

    def _classify(self, grid, head, qb, kb):
        p0, p1 = grid.q_block_bounds(qb)
        k0, k1 = grid.kv_block_bounds(kb)
        q_first, q_last = self.segment_of(p0), self.segment_of(p1 - 1)
        k_first, k_last = self.segment_of(k0), self.segment_of(k1 - 1)
        nonempty = (q_first <= k_last) & (k_first <= q_last)
        full = (q_first == q_last) & (k_first == k_last) & (q_first == k_first)
        return _states(nonempty, full)

    def _count(self, grid, head, qb, kb):
        # per query row: the overlap of its segment with the kv block, O(block_q) per block
        p0, p1 = grid.q_block_bounds(qb)
        k0, k1 = grid.kv_block_bounds(kb)
        q = p0[:, None] + grid.arange(grid.block_q)[None, :]  # [n, BQ]
        inside = q < p1[:, None]
        q = torch.minimum(q, p1[:, None] - 1)
        seg = self.segment_of(q)
        if self.size is not None:
            lo, hi = seg * self.size, (seg + 1) * self.size
        else:
            lo, hi = self._start.to(grid.device)[seg], self._end.to(grid.device)[seg]
        overlap = torch.minimum(hi, k1[:, None]) - torch.maximum(lo, k0[:, None])
        return (torch.clamp(overlap, min=0) * inside).sum(1)

    def _validate(self, grid):
        if self.length is not None and (grid.kv_end > self.length or grid.q_end > self.length):
            raise ValueError(f"document pattern was built for {self.length} positions (len(doc_ids)) but is "
                             f"used with keys up to position {grid.kv_end - 1} and queries up to position {grid.q_end - 1}")

    def __repr__(self):
        return f"Segments(size={self.size})" if self.size is not None else f"document(<{self.length} ids>)"


class BlockCells(Pattern):
    """Allowed iff cell (i // cell_q, j // cell_kv) of a per-head cell map is set.

    Cells are given as coordinates (head, row, col) so that a sparse map costs memory in its
    set cells; a dense bool table is built lazily only for element lookups.
    """

    def __init__(self, head: torch.Tensor, row: torch.Tensor, col: torch.Tensor, *, shape: tuple[int, int, int],
                 cell_q: int, cell_kv: int, per_head: bool, name: str = "block_sparse") -> None:
        super().__init__()
        self.shape = shape  # (H, rows, cols)
        self.cell_q, self.cell_kv = cell_q, cell_kv
        key = (head * shape[1] + row) * shape[2] + col
        self._set_coords(torch.unique(key))
        self.num_heads = shape[0] if per_head else None
        self.name = name
        self._table = None

    @classmethod
    def from_table(cls, table: torch.Tensor, *, cell_q: int, cell_kv: int, per_head: bool,
                   name: str = "block_sparse") -> "BlockCells":
        """Cells given as a dense bool table [H, rows, cols], kept on its device. Nothing is read
        back to the host: the coordinates are derived only when something asks for them (block
        classification, `is_causal`, `repr`), so a caller that brings its own layout (block
        top-k's device path) builds this pattern without a device -> host synchronisation."""
        self = cls.__new__(cls)
        Pattern.__init__(self)
        self.shape = tuple(table.shape)
        self.cell_q, self.cell_kv = cell_q, cell_kv
        self._key = None
        self.num_heads = self.shape[0] if per_head else None
        self.name = name
        self._table = _PerDevice(table.to(torch.bool))
        return self

    def _set_coords(self, key: torch.Tensor) -> None:
        self._key = key  # [nnz] sorted (head, row, col) keys of the set cells

    def _coords(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(head, row, col) int64 [nnz] of the set cells, sorted."""
        if self._key is None:  # from_table: the one place this pattern reads its table back
            self._key = self._table.source.reshape(-1).nonzero().squeeze(1)
        key = self._key
        col = key % self.shape[2]
        rest = _floor_div(key, self.shape[2])
        return _floor_div(rest, self.shape[1]), rest % self.shape[1], col

    def table(self, device) -> torch.Tensor:
        if self._table is None:  # built where the coordinates live
            head, row, col = self._coords()
            t = torch.zeros(self.shape, dtype=torch.bool, device=col.device)
            t[head, row, col] = True
            self._table = _PerDevice(t)
        return self._table.on(device)

    def prepare(self, device) -> None:
        self.table(device)

    def allowed(self, q_idx, kv_idx, head=None):
        t = self.table(q_idx.device)
        if head is None or self.num_heads is None:
            t = t[0]
        r, c = _floor_div(q_idx, self.cell_q), _floor_div(kv_idx, self.cell_kv)
        inside = (r >= 0) & (r < self.shape[1]) & (c >= 0) & (c < self.shape[2])
        r, c = torch.clamp(r, 0, self.shape[1] - 1), torch.clamp(c, 0, self.shape[2] - 1)
        return (t[r, c] if t.dim() == 2 else t[head, r, c]) & inside

    def is_causal(self):
        # every pair of every set cell: the cell's last key precedes (or is) its first query
        _, row, col = self._coords()
        return bool(((col + 1) * self.cell_kv - 1 <= row * self.cell_q).all())

    def natural_block(self):
        return min(self.cell_q, self.cell_kv)

    def _candidate_count(self, grid):
        return self._coords()[2].numel() * (1 + -(-self.cell_q // grid.block_q)) * (1 + -(-self.cell_kv // grid.block_kv))

    def _blocks(self, grid):
        dev = grid.device
        head, row, col = (t.to(dev) for t in self._coords())
        r0, c0 = row * self.cell_q, col * self.cell_kv
        r1, c1 = r0 + self.cell_q, c0 + self.cell_kv
        # each set cell -> the query blocks it overlaps -> the kv blocks it overlaps
        cell, qb = expand_ranges(*grid.q_blocks_of_positions(r0, r1))
        k_first, k_last = grid.kv_blocks_of_positions(c0[cell], c1[cell])
        pair, kb = expand_ranges(k_first, k_last)
        cell, qb = cell[pair], qb[pair]
        p0, p1 = grid.q_block_bounds(qb)
        k0, k1 = grid.kv_block_bounds(kb)
        overlap = (torch.minimum(p1, r1[cell]) - torch.maximum(p0, r0[cell])) * (
            torch.minimum(k1, c1[cell]) - torch.maximum(k0, c0[cell]))
        heads = self.num_heads or 1
        key = (head[cell] * grid.num_q_blocks + qb) * grid.num_kv_blocks + kb
        uniq, inverse = torch.unique(key, return_inverse=True)
        covered = torch.zeros(uniq.numel(), dtype=torch.int64, device=dev).index_add_(0, inverse, overlap)
        out = BlockSet.from_key(uniq, torch.zeros_like(uniq, dtype=torch.bool), heads, grid)
        p0, p1 = grid.q_block_bounds(out.q_block)
        k0, k1 = grid.kv_block_bounds(out.kv_block)
        out.full = covered == (p1 - p0) * (k1 - k0)
        return out

    def _validate(self, grid):
        # rows cover the positions of the whole sequence (queries may be only its last ones)
        rows = -(-max(grid.q_end, grid.kv_end) // self.cell_q)
        cols = -(-grid.kv_end // self.cell_kv)
        if self.shape[1] != rows or self.shape[2] != cols:
            raise ValueError(
                f"{self.name} layout has shape (H, {self.shape[1]}, {self.shape[2]}) of {self.cell_q}x{self.cell_kv} "
                f"blocks, but {grid.kv_end} key positions and queries up to position {grid.q_end - 1} need "
                f"(H, {rows}, {cols})")

    def __repr__(self):
        if self._key is None:  # from_table: counting the set cells would read the table back
            return f"{self.name}({self.shape[1]}x{self.shape[2]} blocks of {self.cell_q})"
        return f"{self.name}({self.shape[1]}x{self.shape[2]} blocks of {self.cell_q}, {self._key.numel()} set)"


class _IndexRead(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class _UnusedIndex(torch.Tensor):
    """A 0-dim index tensor that raises `_IndexRead` when anything reads it (indexing, compares,
    arithmetic, int()): how `Predicate` finds out whether a mask_mod depends on b or h."""

    @staticmethod
    def make(name: str, device) -> "_UnusedIndex":
        t = torch.zeros((), dtype=torch.int64, device=device).as_subclass(_UnusedIndex)
        t._index_name = name
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        for a in list(args) + list((kwargs or {}).values()):
            if isinstance(a, _UnusedIndex):
                raise _IndexRead(a._index_name)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def _reads_index(fn, b, h, q, kv) -> bool:
    try:
        fn(b, h, q, kv)
    except _IndexRead:
        return True
    return False


class Predicate(Pattern):
    """A user's FlexAttention-style `mask_mod(b, h, q_idx, kv_idx) -> bool`.

    Its block layout is found by evaluating the function on every element, a few query blocks
    at a time: O(q_len * kv_len) time but bounded memory. Layouts are cached on the pattern.
    The function must be head-independent unless `num_heads` is given; it is called with
    b = 0 and one layout serves the whole batch, so a function that reads `b` is refused for
    batches of more than one row (both checked when a layout is built / the call is made).
    """

    def __init__(self, fn: Callable, num_heads: int | None = None, name: str | None = None) -> None:
        super().__init__()
        if not callable(fn):
            raise TypeError(f"predicate expects a callable mask_mod(b, h, q_idx, kv_idx), got {type(fn).__name__}")
        self.fn = fn
        self.num_heads = num_heads
        self.name = name or getattr(fn, "__name__", "predicate")
        self._reads_batch: bool | None = None  # found by the probe in _validate

    def allowed(self, q_idx, kv_idx, head=None):
        h = torch.zeros((), dtype=torch.int64, device=q_idx.device) if head is None else torch.as_tensor(head)
        out = self.fn(torch.zeros((), dtype=torch.int64, device=q_idx.device), h, q_idx, kv_idx)
        if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
            raise TypeError(f"predicate {self.name} must return a bool tensor, got "
                            f"{out.dtype if isinstance(out, torch.Tensor) else type(out).__name__}")
        return out.expand(torch.broadcast_shapes(q_idx.shape, kv_idx.shape, h.shape))

    def _validate(self, grid):
        """Probe the function on the first positions with tracer indices. Without num_heads a
        layout is shared by every head, so a mask that reads `h` would be applied from head 0
        to all of them: refused. Reading `b` is recorded (`reads_batch`): one layout serves the
        whole batch, so such a predicate is refused for batches of more than one row."""
        if grid.q_len == 0 or grid.kv_len == 0:
            return
        q = grid.arange(min(grid.q_len, 16))[:, None] + grid.q_offset
        kv = grid.arange(min(grid.kv_len, 16))[None, :] + grid.kv_offset
        zero = torch.zeros((), dtype=torch.int64, device=grid.device)
        h = grid.arange(self.num_heads)[:, None, None] if self.num_heads else zero
        if self.num_heads is None and _reads_index(self.fn, zero, _UnusedIndex.make("h", grid.device), q, kv):
            raise ValueError(f"predicate {self.name} reads its head index h: pass num_heads=<query heads> so "
                             "each head gets its own layout (without it h would always be 0)")
        if self._reads_batch is None:
            self._reads_batch = _reads_index(self.fn, _UnusedIndex.make("b", grid.device), h, q, kv)

    def reads_batch(self, device=None) -> bool:
        if self._reads_batch is None:  # no layout built yet: probe at position 0
            zero = torch.zeros((1, 1), dtype=torch.int64, device=device)
            h = zero[0, 0] if self.num_heads is None else torch.arange(self.num_heads, device=device)[:, None, None]
            self._reads_batch = _reads_index(self.fn, _UnusedIndex.make("b", device), h, zero, zero)
        return self._reads_batch

    def _blocks(self, grid):
        heads = self.num_heads or 1
        nkb = grid.num_kv_blocks
        per_q_block = heads * grid.block_q * nkb * grid.block_kv
        step = max(1, (1 << 24) // max(per_q_block, 1))
        kv = grid.arange(nkb * grid.block_kv)
        states = []
        for s in range(0, grid.num_q_blocks, step):
            qbs = grid.arange(min(step, grid.num_q_blocks - s)) + s
            rows = qbs[:, None] * grid.block_q + grid.arange(grid.block_q)[None, :]  # [n, BQ]
            h = grid.arange(heads)[:, None, None]
            rows = rows.reshape(-1)
            # the last blocks' padding is evaluated at the last real position and masked, so
            # a mask_mod indexing tables of the sequence's length works (as in FlexAttention)
            q_pos = torch.clamp(rows, max=grid.q_len - 1) + grid.q_offset
            kv_pos = torch.clamp(kv, max=grid.kv_len - 1) + grid.kv_offset
            ok = self.allowed(q_pos[None, :, None], kv_pos[None, None, :], h)
            ok = ok & (rows < grid.q_len)[None, :, None] & (kv < grid.kv_len)[None, None, :]
            count = ok.reshape(heads, qbs.numel(), grid.block_q, nkb, grid.block_kv).sum(dim=(2, 4))
            states.append(count)  # [H, n, NKB]
        count = torch.cat(states, dim=1) if states else torch.zeros(heads, 0, nkb, dtype=torch.int64)
        h, qb, kb = (t.reshape(-1) for t in torch.meshgrid(grid.arange(heads), grid.arange(grid.num_q_blocks),
                                                            grid.arange(nkb), indexing="ij"))
        p0, p1 = grid.q_block_bounds(qb)
        k0, k1 = grid.kv_block_bounds(kb)
        state = state_from_count(count.reshape(-1), (p1 - p0) * (k1 - k0))
        return BlockSet.from_unsorted(heads, h, qb, kb, state, grid)

    def __repr__(self):
        return f"predicate({self.name})"
