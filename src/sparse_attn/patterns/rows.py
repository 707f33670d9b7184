"""Per-row views of a pattern: padding, per-row offsets and evicted cache heads, with no
(B, N, N) mask.

A batch row has its own geometry: left padding moves its first real token to some index `pad`
(the pattern must see it at position 0: Longformer's global, StreamingLLM's sink), an evicted
cache head makes key index 0 a later position (`kv_offset`), and pads must be neither seen as
keys nor answered as queries. `row_view` turns a shared pattern and one row's geometry into a
pattern over that row's *indices*:

    Shift(pattern, shift)            index x is position x + shift (queries and keys alike)
    & Columns(valid key indices)     only when some keys are pads
    & Rows(valid query indices)      only when some query rows are pads (they return 0)

Everything stays analytic: `Shift` classifies blocks by asking the pattern about the same
blocks at shifted positions (`BlockGrid.shifted`), so a layout costs what the pattern's costs.
Rows of equal geometry share one view (and its cached layouts), so a batch runs one layout per
distinct geometry; see `ops.sparse_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._lru import LRU
from .base import DisjointUnion, Pattern
from .grid import BlockGrid, BlockSet
from .primitives import Columns, IndexSet, Rows, _KvRangePattern, _states

_VIEW_CACHE_SIZE = 64


@dataclass(frozen=True)
class RowGeometry:
    """One row's geometry, in the index space of the call (key index j, query row r).

    shift: position = index + shift; the query row r has index `q_index0 + r`.
    alone: (q_len, kv_len, q_offset, kv_offset) of the row run alone, in positions: the real
        queries and keys only (what per-length patterns such as BigBird are drawn for).
    key_runs / query_runs: the valid key indices / query indices as sorted runs
        ((start, stop), ...): one run for left or right padding; None when all are real.
    documents: packed documents as index runs, with each one's `alone` geometry; None for a
        row holding one sequence. With documents, shift/alone/runs are unused: every document
        starts at position 0 and indices outside the documents are pads.
    """

    shift: int
    alone: tuple[int, int, int, int]
    key_runs: tuple[tuple[int, int], ...] | None
    query_runs: tuple[tuple[int, int], ...] | None
    documents: tuple[tuple[tuple[int, int], tuple[int, int, int, int]], ...] | None = None


def _index_set(runs) -> IndexSet:
    if len(runs) == 1:  # left or right padding: a range, O(1) memory
        return IndexSet(start=runs[0][0], prefix=runs[0][1])
    return IndexSet(indices=torch.cat([torch.arange(a, b, dtype=torch.int64) for a, b in runs])
                    if runs else torch.zeros(0, dtype=torch.int64))


class Shift(Pattern):
    """`base` seen through shifted positions: allowed(i, j) = base.allowed(i + shift, j + shift).

    `alone` = (q_len, kv_len, q_offset, kv_offset) in positions: the geometry the base is bound
    and validated for (the row run by itself), whatever the padded call's lengths are."""

    def __init__(self, base: Pattern, shift: int, alone: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.base, self.shift, self.alone = base, int(shift), tuple(int(x) for x in alone)
        self.num_heads = base.num_heads

    def _alone_grid(self, grid: BlockGrid) -> BlockGrid:
        q_len, kv_len, q_offset, kv_offset = self.alone
        return BlockGrid(q_len, kv_len, q_offset, grid.block_q, grid.block_kv, grid.device, kv_offset)

    def bind(self, grid):
        bound = self.base.bind(self._alone_grid(grid))
        return self if bound is self.base else Shift(bound, self.shift, self.alone)

    def _validate(self, grid):
        self.base._validate(self._alone_grid(grid))

    def allowed(self, q_idx, kv_idx, head=None):
        return self.base.allowed(q_idx + self.shift, kv_idx + self.shift, head)

    def reachable(self, kv_idx, next_q):
        return self.base.reachable(kv_idx + self.shift, next_q + self.shift)

    def is_causal(self):
        return self.base.is_causal()  # i - j is unchanged by the shift

    def band_bounds(self):
        return self.base.band_bounds()

    def reads_batch(self, device=None):
        return self.base.reads_batch(device)

    def prepare(self, device):
        self.base.prepare(device)

    def natural_block(self):
        return self.base.natural_block()

    def _candidates(self, grid):
        return self.base._candidates(grid.shifted(self.shift))

    def _candidate_count(self, grid):
        return self.base._candidate_count(grid.shifted(self.shift))

    def _classify(self, grid, head, qb, kb):
        return self.base._classify(grid.shifted(self.shift), head, qb, kb)

    def _count(self, grid, head, qb, kb):
        return self.base._count(grid.shifted(self.shift), head, qb, kb)

    def _blocks(self, grid):
        return self.base._blocks(grid.shifted(self.shift))

    def __repr__(self):
        return f"shift({self.base!r}, {self.shift:+d})"


class Square(_KvRangePattern):
    """Allowed iff query and key indices both lie in [start, stop): one packed document's block."""

    def __init__(self, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = int(start), int(stop)

    def allowed(self, q_idx, kv_idx, head=None):
        return (q_idx >= self.start) & (q_idx < self.stop) & (kv_idx >= self.start) & (kv_idx < self.stop)

    def _kv_range(self, grid, qb):
        p0, p1 = grid.q_block_bounds(qb)
        first, last = grid.kv_blocks_of_positions(torch.full_like(qb, self.start), torch.full_like(qb, self.stop))
        rows_inside = (p1 > self.start) & (p0 < self.stop)
        return first, torch.where(rows_inside, last, first - 1)

    def _overlaps(self, grid, qb, kb):
        p0, p1 = grid.q_block_bounds(qb)
        k0, k1 = grid.kv_block_bounds(kb)
        q_in = torch.clamp(torch.clamp(p1, max=self.stop) - torch.clamp(p0, min=self.start), min=0)
        k_in = torch.clamp(torch.clamp(k1, max=self.stop) - torch.clamp(k0, min=self.start), min=0)
        return q_in, k_in, (p1 - p0), (k1 - k0)

    def _classify(self, grid, head, qb, kb):
        q_in, k_in, q_all, k_all = self._overlaps(grid, qb, kb)
        return _states((q_in > 0) & (k_in > 0), (q_in == q_all) & (k_in == k_all) & (q_all > 0) & (k_all > 0))

    def _count(self, grid, head, qb, kb):
        q_in, k_in, _, _ = self._overlaps(grid, qb, kb)
        return q_in * k_in

    def __repr__(self):
        return f"square({self.start}, {self.stop})"


class Packed(Pattern):
    """Documents packed in one row: document d holds indices [start_d, stop_d), and inside it the
    pattern sees positions index - start_d (each document starts at position 0, as if alone);
    pairs across documents, and indices in no document (pads), are never allowed.

    Blocks are the union of each document's `Shift(pattern) & Square(document)` blocks (a block on
    a boundary between documents is partial); elements find their document by a binary search,
    so evaluating a mask costs O(log documents) per element, not O(documents)."""

    def __init__(self, base: Pattern, docs, alones, parts=None) -> None:
        super().__init__()
        self.docs = tuple((int(a), int(b)) for a, b in docs)
        self.alones = tuple(alones)
        self.parts = tuple(parts) if parts is not None else tuple(
            Shift(base, -a, alone) for (a, _), alone in zip(self.docs, self.alones))
        self.num_heads = base.num_heads if parts is None else self.parts[0].num_heads
        self._starts = torch.tensor([a for a, _ in self.docs], dtype=torch.int64)
        self._stops = torch.tensor([b for _, b in self.docs], dtype=torch.int64)

    def bind(self, grid):
        bound = [p.bind(grid) for p in self.parts]
        if all(b is p for b, p in zip(bound, self.parts)):
            return self
        return Packed(bound[0].base, self.docs, self.alones, parts=bound)

    def _validate(self, grid):
        for p in self.parts:
            p._validate(grid)

    def is_causal(self):
        return self.parts[0].base.is_causal() if len({id(p.base) for p in self.parts}) == 1 else \
            all(p.base.is_causal() for p in self.parts)

    def reads_batch(self, device=None):
        return any(p.reads_batch(device) for p in self.parts)

    def prepare(self, device):
        for p in self.parts:
            p.prepare(device)

    def natural_block(self):
        return self.parts[0].natural_block()

    def _doc_of(self, x: torch.Tensor):
        starts, stops = self._starts.to(x.device), self._stops.to(x.device)
        d = torch.clamp(torch.searchsorted(starts, x.contiguous(), right=True) - 1, min=0)
        return d, (x >= starts[d]) & (x < stops[d])

    def allowed(self, q_idx, kv_idx, head=None):
        dq, q_in = self._doc_of(q_idx)
        dk, k_in = self._doc_of(kv_idx)
        starts = self._starts.to(q_idx.device)
        same = q_in & k_in & (dq == dk)
        out = torch.zeros_like(same)
        # documents whose bound pattern is one object (every document, unless the pattern is drawn
        # per length, as BigBird's random blocks) are evaluated together
        groups: dict[int, list[int]] = {}
        for d, p in enumerate(self.parts):
            groups.setdefault(id(p.base), []).append(d)
        for docs in groups.values():
            base = self.parts[docs[0]].base
            mine = same if len(groups) == 1 else same & torch.isin(dq, torch.tensor(docs, device=dq.device))
            out = out | (mine & base.allowed(q_idx - starts[dq], kv_idx - starts[dk], head))
        return out

    def _blocks(self, grid):
        heads = self.num_heads or 1
        sets = [(p & Square(a, b))._blocks(grid).broadcast_heads(heads, grid) for p, (a, b) in zip(self.parts, self.docs)]
        keys = torch.cat([s.key(grid) for s in sets])
        full = torch.cat([s.full for s in sets])
        uniq, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
        single_full = torch.zeros(uniq.numel(), dtype=torch.int64, device=grid.device).index_add_(
            0, inverse, full.long()) > 0
        # a block touched by two documents has cross-document pairs: partial
        return BlockSet.from_key(uniq, single_full & (counts == 1), heads, grid)

    def __repr__(self):
        return f"packed({self.parts[0].base!r}, {len(self.docs)} documents)"


def row_view(pattern: Pattern, geometry: RowGeometry) -> Pattern:
    """The pattern one row runs, over that row's indices (cached per pattern and geometry)."""
    views = pattern.__dict__.setdefault("_row_views", LRU())
    view = views.recall(geometry)
    if view is not None:
        return view
    if geometry.documents is not None:
        view = Packed(pattern, [d for d, _ in geometry.documents], [a for _, a in geometry.documents])
    elif isinstance(pattern, DisjointUnion):  # stays disjoint: sparse_attention still merges its parts
        view = DisjointUnion([row_view(p, geometry) for p in pattern.parts])
    else:
        view = Shift(pattern, geometry.shift, geometry.alone)
        if geometry.key_runs is not None:
            view = view & Columns(_index_set(geometry.key_runs))
        if geometry.query_runs is not None:
            view = view & Rows(_index_set(geometry.query_runs))
    return views.keep(geometry, view, _VIEW_CACHE_SIZE)


