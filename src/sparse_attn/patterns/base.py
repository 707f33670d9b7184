"""`Pattern`: an element predicate plus an analytic block enumerator, and its combinators.

A pattern answers two questions about query position i and key position j:

* `allowed(q_idx, kv_idx, head)` - elementwise, on broadcastable integer tensors. Used by the
  reference backend, inside partial blocks, and as FlexAttention's `mask_mod`.
* `_classify(grid, head, q_block, kv_block)` / `_blocks(grid)` - for whole blocks, without
  looking at elements where the pattern's form allows (analytic), so that building a layout
  costs O(non-empty blocks) and never O(N^2).

Patterns are immutable; layouts are cached on the pattern per (lengths, offset, blocks, device).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .._checks import check_int
from .._lru import LRU
from .grid import EMPTY, FULL, PARTIAL, BlockGrid, BlockSet

if TYPE_CHECKING:  # pragma: no cover
    from .layout import BlockLayout, PatternAt

# Elements evaluated at once when a block must be inspected element by element.
_EVAL_BUDGET = 1 << 22
_LAYOUT_CACHE_SIZE = 32  # layouts kept per pattern (least recently used dropped first), unless layout_cache() says
_cache_size = [_LAYOUT_CACHE_SIZE]


@contextlib.contextmanager
def layout_cache(size: int):
    """Keep up to `size` layouts per pattern inside this block (default 32), for work that meets
    many sequence lengths: training on ListOps' ~1,500 lengths rebuilt every step's layout (and
    the backend's plan cached on it) once the 32 most recent lengths were passed. Layouts are
    the same objects either way, so results do not change. Outside the block each cache shrinks
    back to the default at its next new layout. A layout costs O(non-empty blocks) memory plus
    what backends cache on it (the blocked backend's element masks of partial blocks: up to
    64 MiB each for long sequences, so keep `size` to the lengths really met)."""
    check_int("size", size, 1)
    previous = _cache_size[0]
    _cache_size[0] = size
    try:
        yield
    finally:
        _cache_size[0] = previous


class Pattern(ABC):
    """Base class. Subclasses implement `allowed` and, when they can, `_classify`/`_candidates`.

    `num_heads` is None for a pattern that is the same for every head, else the number of
    heads it was built for (it must then equal the query head count of the call).
    """

    num_heads: int | None = None

    def __init__(self) -> None:
        self._layouts = LRU()

    # ----------------------------------------------------------------- element level
    def is_causal(self) -> bool:
        """True when provably no query sees a key after it (j <= i for every allowed pair).
        False means "not known to be causal": a predicate may be causal without saying so."""
        return False

    def band_bounds(self) -> tuple[int, int, int] | None:
        """(lo, hi, dilation) when this is a `Band` (lo <= i - j <= hi, (i - j) % dilation == 0)."""
        return None

    def block_signature(self, q_pos: torch.Tensor, kv_pos: torch.Tensor) -> torch.Tensor | None:
        """int64 [n, K] such that blocks with equal rows have equal element masks under this
        pattern (exactly, not by hash), or None when the pattern cannot say. q_pos [n, BQ] and
        kv_pos [n, BK] are the absolute positions a block's rows and keys are evaluated at
        (`BlockLayout.element_masks`: each increasing by 1, then repeating the last real
        position). Bands give the offset q_pos[:, 0] - kv_pos[:, 0]; row and column sets the
        membership of each row / key; unions and intersections their parts' signatures side by
        side. The caller adds the counts of real rows and keys, which fix the rest."""
        return None

    def reads_batch(self, device=None) -> bool:
        """True when the predicate depends on the batch row (a user's mask_mod reading `b`).
        One layout serves every row, so such a pattern can only run on a batch of one row."""
        return False

    def check_batch(self, batch: int, device=None) -> None:
        """Raise if this pattern cannot serve a batch of `batch` rows (see `reads_batch`)."""
        if batch > 1 and self.reads_batch(device):
            raise ValueError(f"pattern {self!r} reads the batch index b of its mask_mod, but one layout serves every "
                             f"row of the batch, so a batch of {batch} rows cannot be honoured (b would always be "
                             "0): call once per row")

    def reachable(self, kv_idx: torch.Tensor, next_q: int) -> torch.Tensor:
        """Bool per key position: may some query at a position >= next_q still attend to it?

        What a decoding cache must keep. Never wrong in the unsafe direction: a pattern that
        cannot tell answers True (keep). Bands, column sets, row sets and their unions and
        intersections answer exactly or, for intersections, conservatively."""
        return torch.ones_like(kv_idx, dtype=torch.bool)

    @abstractmethod
    def allowed(self, q_idx: torch.Tensor, kv_idx: torch.Tensor, head: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean tensor: may the query at absolute position q_idx attend to key kv_idx?

        Arguments broadcast against each other. `head` is needed only by per-head patterns.
        """

    def mask_mod(self, q_offset: int = 0) -> Callable:
        """FlexAttention-style `mask_mod(b, h, q_idx, kv_idx)`; q_idx counts query rows."""

        def mask_mod(b, h, q_idx, kv_idx):
            return self.allowed(q_idx + q_offset, kv_idx, h)

        return mask_mod

    def to_dense(self, q_len: int, kv_len: int | None = None, *, q_offset: int | None = None,
                 num_heads: int | None = None, device=None) -> torch.Tensor:
        """The element mask, bool [H, q_len, kv_len]. O(q_len * kv_len): tests and pictures only."""
        grid = self._grid(q_len, kv_len, q_offset, 1, 1, device)
        heads = self._resolve_heads(num_heads)
        h = grid.arange(heads)[:, None, None]
        q = grid.arange(grid.q_len)[None, :, None] + grid.q_offset
        kv = grid.arange(grid.kv_len)[None, None, :]
        return self.allowed(q, kv, h).expand(heads, grid.q_len, grid.kv_len).clone()

    def show(self, n: int = 32, kv_len: int | None = None, *, head: int = 0) -> str:
        """ASCII picture of the element mask for an n-token sequence ('#' allowed, '.' not)."""
        dense = self.to_dense(n, kv_len, num_heads=max(head + 1, self.num_heads or 1))[head]
        return "\n".join("".join("#" if x else "." for x in row) for row in dense.tolist())

    # ------------------------------------------------------------------- block level
    def layout(self, q_len: int, kv_len: int | None = None, *, block_q: int = 128, block_kv: int | None = None,
               q_offset: int | None = None, device=None) -> "BlockLayout":
        """The block layout of this pattern for the given lengths (cached).

        Queries are the last `q_len` of `kv_len` positions unless `q_offset` says where the
        first one sits. Cost: O(non-empty blocks) for analytic patterns.
        """
        from .layout import BlockLayout

        block_kv = block_q if block_kv is None else block_kv
        grid = self._grid(q_len, kv_len, q_offset, block_q, block_kv, device)
        key = (grid.q_len, grid.kv_len, grid.q_offset, grid.block_q, grid.block_kv, str(grid.device))
        cached = self._layouts.recall(key)
        if cached is not None:
            return cached
        bound = self.bind(grid)
        bound._validate(grid)
        layout = BlockLayout.from_block_set(bound, grid, bound._blocks(grid))
        return self._layouts.keep(key, layout, _cache_size[0])

    def at(self, q_len: int, kv_len: int | None = None, *, q_offset: int | None = None, device=None) -> "PatternAt":
        """This pattern fixed at the given lengths, bound and validated as `layout()` does, with no
        blocks built: what backends that never read a layout get (`Capabilities.reads_layout`)."""
        from .layout import PatternAt

        grid = self._grid(q_len, kv_len, q_offset, 1, 1, device)
        bound = self.bind(grid)
        bound._validate(grid)
        return PatternAt(bound, grid, self.num_heads or 1)

    def _blocks(self, grid: BlockGrid) -> BlockSet:
        """All non-empty blocks. Default: classify the candidates."""
        head, qb, kb = self._candidates(grid)
        state = self._classify(grid, head, qb, kb)
        return BlockSet.from_unsorted(self.num_heads or 1, head, qb, kb, state, grid)

    def _candidates(self, grid: BlockGrid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A superset of the non-empty blocks as (head, q_block, kv_block). Default: all of them."""
        heads = self.num_heads or 1
        h, qb, kb = torch.meshgrid(grid.arange(heads), grid.arange(grid.num_q_blocks),
                                   grid.arange(grid.num_kv_blocks), indexing="ij")
        return h.reshape(-1), qb.reshape(-1), kb.reshape(-1)

    def _candidate_count(self, grid: BlockGrid) -> int:
        """Upper bound on the candidates; lets `a & b` enumerate the smaller side."""
        return (self.num_heads or 1) * grid.num_q_blocks * grid.num_kv_blocks

    def _classify(self, grid: BlockGrid, head, qb, kb) -> torch.Tensor:
        """EMPTY/PARTIAL/FULL per block. Default: count allowed elements (exact, O(block area))."""
        count, area = count_allowed(self, grid, head, qb, kb)
        return state_from_count(count, area)

    def _count(self, grid: BlockGrid, head, qb, kb) -> torch.Tensor:
        """Allowed elements in each block (int64 [n]). Default: element by element,
        O(block area); primitives with a closed form override it (O(1) per block), so that
        `BlockLayout.density()` costs O(non-empty blocks)."""
        return count_allowed(self, grid, head, qb, kb)[0]

    def _validate(self, grid: BlockGrid) -> None:
        """Raise ValueError if this pattern cannot describe the given lengths."""

    def prepare(self, device) -> None:
        """Put the pattern's lookup tables on `device` ahead of use (needed before its
        predicate runs inside a compiled FlexAttention kernel). Most patterns have none."""

    def natural_block(self) -> int | None:
        """The block granularity the pattern is defined at (BigBird's block, a block-sparse
        cell), if any: backends align their blocks with it."""
        return None

    def bind(self, grid: BlockGrid) -> "Pattern":
        """The pattern with everything that depends on the lengths fixed (BigBird's random
        blocks are drawn per length). Most patterns are length-free and return themselves."""
        return self

    # ------------------------------------------------------------------- helpers
    def _resolve_heads(self, num_heads: int | None) -> int:
        if self.num_heads is None:
            return 1 if num_heads is None else num_heads
        if num_heads is not None and num_heads != self.num_heads:
            raise ValueError(f"pattern is defined for {self.num_heads} heads, asked for {num_heads}")
        return self.num_heads

    def _grid(self, q_len, kv_len, q_offset, block_q, block_kv, device) -> BlockGrid:
        q_len = check_int("q_len", q_len, 0)
        kv_len = q_len if kv_len is None else check_int("kv_len", kv_len, 0)
        block_q = check_int("block_q", block_q, 1)
        block_kv = check_int("block_kv", block_kv, 1)
        if q_offset is None:
            if q_len > kv_len:
                raise ValueError(
                    f"q_len ({q_len}) > kv_len ({kv_len}): queries cannot be the last q_len key positions; "
                    "pass q_offset (the position of the first query) explicitly"
                )
            q_offset = kv_len - q_len
        q_offset = check_int("q_offset", q_offset, 0)
        device = torch.device("cpu") if device is None else device
        return BlockGrid(q_len, kv_len, q_offset, block_q, block_kv, device)

    # ------------------------------------------------------------------ combinators
    def __or__(self, other: "Pattern") -> "Pattern":
        _check_pattern("other", other)
        return Union([self, other])

    def __and__(self, other: "Pattern") -> "Pattern":
        _check_pattern("other", other)
        return Intersection([self, other])

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_pattern(name: str, value) -> None:
    if not isinstance(value, Pattern):
        raise TypeError(f"{name} must be a sparse_attn Pattern, got {type(value).__name__}")


def state_from_count(count: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    state = torch.full_like(count, PARTIAL, dtype=torch.int8)
    state[count == 0] = EMPTY
    state[count == area] = FULL
    return state


def count_allowed(pattern: Pattern, grid: BlockGrid, head, qb, kb) -> tuple[torch.Tensor, torch.Tensor]:
    """Allowed elements and area of each block, evaluated element by element in bounded memory."""
    n = qb.numel()
    count = torch.zeros(n, dtype=torch.int64, device=grid.device)
    p0, p1 = grid.q_block_bounds(qb)
    k0, k1 = grid.kv_block_bounds(kb)
    area = (p1 - p0) * (k1 - k0)
    rows = grid.arange(grid.block_q)
    cols = grid.arange(grid.block_kv)
    step = max(1, _EVAL_BUDGET // (grid.block_q * grid.block_kv))
    for s in range(0, n, step):
        sl = slice(s, s + step)
        q = p0[sl, None, None] + rows[None, :, None]  # [n, BQ, 1]
        kv = k0[sl, None, None] + cols[None, None, :]  # [n, 1, BK]
        inside = (q < p1[sl, None, None]) & (kv < k1[sl, None, None])
        # positions past the block's end are clamped into it (and masked): a user's predicate
        # may index tables of exactly the sequence's length, as FlexAttention allows
        q = torch.minimum(q, p1[sl, None, None] - 1)
        kv = torch.minimum(kv, k1[sl, None, None] - 1)
        ok = pattern.allowed(q, kv, head[sl, None, None]) & inside
        count[sl] = ok.sum(dim=(1, 2))
    return count, area


def _min_block(parts: Sequence[Pattern]) -> int | None:
    blocks = [b for b in (p.natural_block() for p in parts) if b is not None]
    return min(blocks) if blocks else None


def _common_heads(parts: Sequence[Pattern]) -> int | None:
    heads = {p.num_heads for p in parts if p.num_heads is not None}
    if len(heads) > 1:
        raise ValueError(f"cannot combine per-head patterns with different head counts {sorted(heads)}")
    return heads.pop() if heads else None


class _Combination(Pattern):
    symbol = "?"

    def __init__(self, parts: Sequence[Pattern]) -> None:
        super().__init__()
        flat: list[Pattern] = []
        for p in parts:
            _check_pattern("pattern", p)
            flat.extend(p.parts if type(p) is type(self) else [p])
        self.parts = tuple(flat)
        self.num_heads = _common_heads(self.parts)

    def _validate(self, grid):
        for p in self.parts:
            p._validate(grid)

    def reads_batch(self, device=None):
        return any(p.reads_batch(device) for p in self.parts)

    def bind(self, grid):
        bound = [p.bind(grid) for p in self.parts]
        return self if all(b is p for b, p in zip(bound, self.parts)) else type(self)(bound)

    def natural_block(self):
        return _min_block(self.parts)

    def prepare(self, device):
        for p in self.parts:
            p.prepare(device)

    def block_signature(self, q_pos, kv_pos):
        parts = [p.block_signature(q_pos, kv_pos) for p in self.parts]
        return None if any(s is None for s in parts) else torch.cat(parts, dim=1)

    def _part_states(self, grid, head, qb, kb) -> torch.Tensor:
        return torch.stack([p._classify(grid, head, qb, kb) for p in self.parts])  # [P, n]

    def __repr__(self) -> str:
        return "(" + f" {self.symbol} ".join(repr(p) for p in self.parts) + ")"


class Union(_Combination):
    """`a | b`: allowed where any part allows. A block partial in two parts may still be full
    (the parts can cover each other's holes), so such blocks are checked element by element."""

    symbol = "|"

    def is_causal(self):
        return all(p.is_causal() for p in self.parts)

    def reachable(self, kv_idx, next_q):
        out = self.parts[0].reachable(kv_idx, next_q)
        for p in self.parts[1:]:
            out = out | p.reachable(kv_idx, next_q)
        return out

    def allowed(self, q_idx, kv_idx, head=None):
        out = self.parts[0].allowed(q_idx, kv_idx, head)
        for p in self.parts[1:]:
            out = out | p.allowed(q_idx, kv_idx, head)
        return out

    def _combine(self, grid, head, qb, kb, n_full, n_partial) -> torch.Tensor:
        state = torch.where(n_full > 0, FULL, torch.where(n_partial > 0, PARTIAL, EMPTY)).to(torch.int8)
        ambiguous = (n_full == 0) & (n_partial >= 2)
        if ambiguous.any():
            idx = ambiguous.nonzero().squeeze(1)
            count, area = count_allowed(self, grid, head[idx], qb[idx], kb[idx])
            state[idx] = torch.where(count == area, FULL, PARTIAL).to(torch.int8)
        return state

    def _classify(self, grid, head, qb, kb):
        states = self._part_states(grid, head, qb, kb)
        return self._combine(grid, head, qb, kb, (states == FULL).sum(0), (states == PARTIAL).sum(0))

    def _candidate_count(self, grid):
        return sum(p._candidate_count(grid) for p in self.parts)

    def _count(self, grid, head, qb, kb):
        # a block that only one part touches counts as that part; where a part is full the
        # block is full; overlaps of two partial parts are counted element by element
        states = self._part_states(grid, head, qb, kb)  # [P, n]
        p0, p1 = grid.q_block_bounds(qb)
        k0, k1 = grid.kv_block_bounds(kb)
        count = torch.where((states == FULL).any(0), (p1 - p0) * (k1 - k0), 0)
        touching = (states != EMPTY).sum(0)
        for i, part in enumerate(self.parts):
            alone = ((states[i] == PARTIAL) & (touching == 1)).nonzero().squeeze(1)
            if alone.numel():
                count[alone] = part._count(grid, head[alone], qb[alone], kb[alone])
        mixed = ((touching >= 2) & ~(states == FULL).any(0)).nonzero().squeeze(1)
        if mixed.numel():
            count[mixed] = count_allowed(self, grid, head[mixed], qb[mixed], kb[mixed])[0]
        return count

    def _blocks(self, grid):
        heads = self.num_heads or 1
        sets = [p._blocks(grid).broadcast_heads(heads, grid) for p in self.parts]
        keys = torch.cat([s.key(grid) for s in sets])
        full = torch.cat([s.full for s in sets])
        uniq, inverse = torch.unique(keys, return_inverse=True)
        n_full = torch.zeros(uniq.numel(), dtype=torch.int64, device=grid.device).index_add_(0, inverse, full.long())
        n_partial = torch.zeros_like(n_full).index_add_(0, inverse, (~full).long())
        coords = BlockSet.from_key(uniq, torch.zeros_like(uniq, dtype=torch.bool), heads, grid)
        state = self._combine(grid, coords.head, coords.q_block, coords.kv_block, n_full, n_partial)
        coords.full = state == FULL
        return coords


class DisjointUnion(Union):
    """A union whose parts never allow the same pair. Attention over it equals the
    log-sum-exp merge of attention over each part, so `sparse_attention` may run the parts
    separately (each in its cheapest form, e.g. a dilated band by residue classes) and merge."""

    symbol = "+"

    def _count(self, grid, head, qb, kb):
        return sum(p._count(grid, head, qb, kb) for p in self.parts)  # disjoint: counts add up


class Intersection(_Combination):
    """`a & b`: allowed where every part allows. Enumerates the part with the fewest candidate
    blocks and classifies the others on those blocks only (so `window & causal` costs the
    window's blocks, not the causal triangle's)."""

    symbol = "&"

    def is_causal(self):
        return any(p.is_causal() for p in self.parts)

    def reachable(self, kv_idx, next_q):
        # each part must still reach the key (possibly through different queries): a superset
        # of the truth, so a cache that keeps these keys loses nothing
        out = self.parts[0].reachable(kv_idx, next_q)
        for p in self.parts[1:]:
            out = out & p.reachable(kv_idx, next_q)
        return out

    def allowed(self, q_idx, kv_idx, head=None):
        out = self.parts[0].allowed(q_idx, kv_idx, head)
        for p in self.parts[1:]:
            out = out & p.allowed(q_idx, kv_idx, head)
        return out

    def _combine(self, grid, head, qb, kb, states) -> torch.Tensor:
        n_partial = (states == PARTIAL).sum(0)
        touched = (states != EMPTY).all(0)
        state = torch.where(touched & (n_partial == 0), FULL, torch.where(touched, PARTIAL, EMPTY)).to(torch.int8)
        ambiguous = touched & (n_partial >= 2)
        if ambiguous.any():  # two partial parts may not overlap at all
            idx = ambiguous.nonzero().squeeze(1)
            count, _ = count_allowed(self, grid, head[idx], qb[idx], kb[idx])
            state[idx] = torch.where(count > 0, PARTIAL, EMPTY).to(torch.int8)
        return state

    def _classify(self, grid, head, qb, kb):
        return self._combine(grid, head, qb, kb, self._part_states(grid, head, qb, kb))

    def _candidate_count(self, grid):
        return min(p._candidate_count(grid) for p in self.parts)

    def _counting_parts(self) -> list[Pattern]:
        """The parts, with every band merged into one (bands intersect to a band: the tightest
        bounds, dilations' lcm), so `window & causal` counts in closed form on the diagonal."""
        bands = [p for p in self.parts if p.band_bounds() is not None]
        if len(bands) < 2:
            return list(self.parts)
        bounds = [p.band_bounds() for p in bands]
        merged = type(bands[0]).intersect(bounds)
        return [merged] + [p for p in self.parts if p.band_bounds() is None]

    def _count(self, grid, head, qb, kb):
        # where every part but one is full, the block counts as that part
        parts = self._counting_parts()
        states = torch.stack([p._classify(grid, head, qb, kb) for p in parts])  # [P, n]
        count = torch.zeros(qb.shape, dtype=torch.int64, device=grid.device)
        not_full = (states != FULL).sum(0)
        p0, p1 = grid.q_block_bounds(qb)
        k0, k1 = grid.kv_block_bounds(kb)
        count = torch.where(not_full == 0, (p1 - p0) * (k1 - k0), count)
        live = ~(states == EMPTY).any(0)
        for i, part in enumerate(parts):
            only = (live & (not_full == 1) & (states[i] != FULL)).nonzero().squeeze(1)
            if only.numel():
                count[only] = part._count(grid, head[only], qb[only], kb[only])
        mixed = (live & (not_full >= 2)).nonzero().squeeze(1)
        if mixed.numel():
            count[mixed] = count_allowed(self, grid, head[mixed], qb[mixed], kb[mixed])[0]
        return count

    def _blocks(self, grid):
        heads = self.num_heads or 1
        smallest = min(self.parts, key=lambda p: p._candidate_count(grid))
        base = smallest._blocks(grid).broadcast_heads(heads, grid)
        others = [p for p in self.parts if p is not smallest]
        states = torch.stack(
            [torch.where(base.full, FULL, PARTIAL).to(torch.int8)]
            + [p._classify(grid, base.head, base.q_block, base.kv_block) for p in others]
        )
        state = self._combine(grid, base.head, base.q_block, base.kv_block, states)
        keep = state != EMPTY
        return BlockSet(heads, base.head[keep], base.q_block[keep], base.kv_block[keep], state[keep] == FULL)


class PerHead(Pattern):
    """A different pattern for each head: head h follows `patterns[h]`."""

    def __init__(self, patterns: Sequence[Pattern]) -> None:
        super().__init__()
        if isinstance(patterns, Pattern) or not isinstance(patterns, Sequence) or len(patterns) == 0:
            raise TypeError("per_head expects a non-empty list of patterns, one per head")
        for i, p in enumerate(patterns):
            _check_pattern(f"patterns[{i}]", p)
            if p.num_heads is not None:
                raise ValueError(f"patterns[{i}] is itself per-head ({p.num_heads} heads); per_head needs "
                                 "head-independent patterns")
        self.parts = tuple(patterns)
        self.num_heads = len(self.parts)

    def is_causal(self):
        return all(p.is_causal() for p in self.parts)

    def reachable(self, kv_idx, next_q):
        # one key store serves every head: keep what any head can still reach
        out = self.parts[0].reachable(kv_idx, next_q)
        for p in self.parts[1:]:
            out = out | p.reachable(kv_idx, next_q)
        return out

    def allowed(self, q_idx, kv_idx, head=None):
        if head is None:
            raise ValueError(f"per_head pattern of {self.num_heads} heads needs the head index")
        head = torch.as_tensor(head, device=q_idx.device)
        out = torch.zeros(torch.broadcast_shapes(q_idx.shape, kv_idx.shape, head.shape), dtype=torch.bool,
                          device=q_idx.device)
        for h, p in enumerate(self.parts):
            out = torch.where(head == h, p.allowed(q_idx, kv_idx, None), out)
        return out

    def _validate(self, grid):
        for p in self.parts:
            p._validate(grid)

    def reads_batch(self, device=None):
        return any(p.reads_batch(device) for p in self.parts)

    def bind(self, grid):
        bound = [p.bind(grid) for p in self.parts]
        return self if all(b is p for b, p in zip(bound, self.parts)) else PerHead(bound)

    def natural_block(self):
        return _min_block(self.parts)

    def prepare(self, device):
        for p in self.parts:
            p.prepare(device)

    def _candidate_count(self, grid):
        return sum(p._candidate_count(grid) for p in self.parts)

    def _per_head(self, method: str, dtype, grid, head, qb, kb):
        out = torch.zeros(qb.shape, dtype=dtype, device=grid.device)
        for h, p in enumerate(self.parts):
            sel = (head == h).nonzero().squeeze(1)
            if sel.numel():
                out[sel] = getattr(p, method)(grid, head[sel], qb[sel], kb[sel])
        return out

    def _classify(self, grid, head, qb, kb):
        return self._per_head("_classify", torch.int8, grid, head, qb, kb)

    def _count(self, grid, head, qb, kb):
        return self._per_head("_count", torch.int64, grid, head, qb, kb)

    def _blocks(self, grid):
        sets = [p._blocks(grid) for p in self.parts]
        head = torch.cat([torch.full_like(s.q_block, h) for h, s in enumerate(sets)])
        return BlockSet(self.num_heads, head, torch.cat([s.q_block for s in sets]),
                        torch.cat([s.kv_block for s in sets]), torch.cat([s.full for s in sets]))

    def __repr__(self) -> str:
        return f"per_head([{', '.join(repr(p) for p in self.parts)}])"
