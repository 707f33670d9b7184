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

from collections import OrderedDict
from dataclasses import dataclass

import torch

from .base import DisjointUnion, Pattern
from .grid import BlockGrid
from .primitives import Columns, IndexSet, Rows

_VIEW_CACHE_SIZE = 64


@dataclass(frozen=True)
class RowGeometry:
    """One row's geometry, in the index space of the call (key index j, query row r).

    shift: position = index + shift; the query row r has index `q_index0 + r`.
    alone: (q_len, kv_len, q_offset, kv_offset) of the row run alone, in positions: the real
        queries and keys only (what per-length patterns such as BigBird are drawn for).
    key_runs / query_runs: the valid key indices / query indices as sorted runs
        ((start, stop), ...): one run for left or right padding; None when all are real.
    """

    shift: int
    alone: tuple[int, int, int, int]
    key_runs: tuple[tuple[int, int], ...] | None
    query_runs: tuple[tuple[int, int], ...] | None


def _index_set(runs) -> IndexSet:
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


def row_view(pattern: Pattern, geometry: RowGeometry) -> Pattern:
    """The pattern one row runs, over that row's indices (cached per pattern and geometry)."""
    views = pattern.__dict__.setdefault("_row_views", OrderedDict())
    view = views.get(geometry)
    if view is not None:
        views.move_to_end(geometry)
        return view
    if isinstance(pattern, DisjointUnion):  # stays disjoint: sparse_attention still merges its parts
        view = DisjointUnion([row_view(p, geometry) for p in pattern.parts])
    else:
        view = Shift(pattern, geometry.shift, geometry.alone)
        if geometry.key_runs is not None:
            view = view & Columns(_index_set(geometry.key_runs))
        if geometry.query_runs is not None:
            view = view & Rows(_index_set(geometry.query_runs))
    views[geometry] = view
    if len(views) > _VIEW_CACHE_SIZE:
        views.popitem(last=False)
    return view


