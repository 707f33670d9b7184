"""`BlockLayout`: which kv blocks each query block touches, split into full and partial.

Stored compactly (CSR: one offsets array per (head, query block), one flat index array), so
memory is O(non-empty blocks). The padded arrays FlexAttention's `BlockMask` uses
(`kv_num_blocks`, `kv_indices`, `full_kv_num_blocks`, `full_kv_indices`) are derived on demand.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

import torch

from .grid import FULL, PARTIAL, BlockGrid, BlockSet

if TYPE_CHECKING:  # pragma: no cover
    from .base import Pattern


class _Csr:
    """Rows = (head, query block) flattened; values = kv block indices, ascending per row."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, num_rows: int) -> None:
        counts = torch.bincount(rows, minlength=num_rows)
        self.offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])  # [R + 1] int64
        self.counts = counts  # [R] int64
        self.indices = cols.to(torch.int32)  # [nnz]
        self.rows = rows  # [nnz] int64, row of each entry

    @classmethod
    def from_counts(cls, counts: torch.Tensor, nnz: int) -> "_Csr":
        """Rows of `counts` [R] entries each (their sum is `nnz`, known to the caller); the
        caller then fills `indices` [nnz] (int32, ascending per row), e.g. from `rows` and
        `slots()`. No bincount and no host read: what a layout built on the device (block
        top-k) uses."""
        self = cls.__new__(cls)
        self.counts = counts.to(torch.int64)
        self.offsets = torch.cat([self.counts.new_zeros(1), torch.cumsum(self.counts, 0)])
        # output_size: repeat_interleave would otherwise read the total back from the device
        self.rows = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), self.counts,
                                            output_size=nnz)
        self.indices = torch.zeros(nnz, dtype=torch.int32, device=counts.device)
        return self

    def slots(self) -> torch.Tensor:
        """[nnz] int64: each entry's position within its row."""
        return torch.arange(self.rows.numel(), device=self.rows.device) - self.offsets[self.rows]

    def padded(self, width: int | None = None) -> torch.Tensor:
        """[R, width] kv block indices, each row left-aligned and padded with 0."""
        max_count = int(self.counts.max()) if self.counts.numel() else 0
        width = max_count if width is None else width
        out = torch.zeros(self.counts.numel(), width, dtype=torch.int32, device=self.indices.device)
        slot = torch.arange(self.indices.numel(), device=self.indices.device) - self.offsets[self.rows]
        out[self.rows, slot] = self.indices
        return out


class PatternAt:
    """A pattern at given lengths, without blocks (`Pattern.at`): what a backend that never reads
    a layout (sdpa, reference: `Capabilities.reads_layout` False) receives instead of a
    `BlockLayout`, so none is built for it. It has the attributes such backends read from a
    layout: `pattern` (bound to the lengths and validated), `q_len`, `kv_len`, `q_offset`,
    `num_heads`, `device`."""

    def __init__(self, pattern: "Pattern", grid: BlockGrid, num_heads: int) -> None:
        self.pattern = pattern
        self.grid = grid
        self.num_heads = num_heads

    q_len = property(lambda self: self.grid.q_len)
    kv_len = property(lambda self: self.grid.kv_len)
    q_offset = property(lambda self: self.grid.q_offset)
    device = property(lambda self: self.grid.device)

    def __repr__(self) -> str:
        g = self.grid
        return f"PatternAt({self.pattern!r}, q_len={g.q_len}, kv_len={g.kv_len}, q_offset={g.q_offset})"


class BlockLayout:
    """The blocks of one pattern at given lengths and block sizes.

    Attributes: `pattern`, `q_len`, `kv_len`, `q_offset`, `block_q`, `block_kv`, `num_heads`
    (1 when every head shares the layout), `num_q_blocks`, `num_kv_blocks`, `device`.
    """

    def __init__(self, pattern: "Pattern | None", grid: BlockGrid, num_heads: int, full: _Csr, partial: _Csr,
                 partial_mask_class: torch.Tensor | None = None, mask_class_blocks: torch.Tensor | None = None,
                 work_bounds: tuple[float, float, float, float] | None = None, mask_class_key=None) -> None:
        self.pattern = pattern
        self.grid = grid
        self.num_heads = num_heads
        self.full = full
        self.partial = partial
        # Optional [n_partial] int64: partial blocks with equal class have equal element masks,
        # so kernels may evaluate the pattern once per class (None: every block its own).
        self.partial_mask_class = partial_mask_class
        # Optional int64 [n_classes, 3]: one (head, q block, kv block) per class, the classes
        # then being 0..n_classes-1: masks are evaluated there with no deduplication (which
        # would read the class ids back to the host).
        self.mask_class_blocks = mask_class_blocks
        # Optional hashable, with mask_class_blocks: the builder's promise that the element masks
        # at those blocks (in class order) are a function of this key and the grid's block sizes
        # alone, so backends may reuse what they derived from them for another layout with the
        # same key (block top-k's causal diagonal blocks: (rows, keys) really there per class).
        self.mask_class_key = mask_class_key
        # Optional host numbers (max, mean) blocks per (head, query block) row and (bound on max,
        # mean) per (head, kv block) column, for layouts whose counts are known without reading
        # the device (kernels schedule by them).
        self.work_bounds = work_bounds
        self.cache: dict = {}  # per-backend plans derived from this layout (e.g. gathered masks)

    @classmethod
    def from_block_set(cls, pattern, grid: BlockGrid, blocks: BlockSet) -> "BlockLayout":
        rows = blocks.head * grid.num_q_blocks + blocks.q_block
        num_rows = blocks.num_heads * grid.num_q_blocks
        f = blocks.full
        return cls(pattern, grid, blocks.num_heads,
                   _Csr(rows[f], blocks.kv_block[f], num_rows), _Csr(rows[~f], blocks.kv_block[~f], num_rows))

    @classmethod
    def from_block_tables(cls, pattern: "Pattern", grid: BlockGrid, full: torch.Tensor, partial: torch.Tensor,
                          partial_mask_class: torch.Tensor | None = None) -> "BlockLayout":
        """A layout from dense block tables, bool [H, NQB, NKB] each (disjoint), for callers that
        already know the blocks (block top-k's selection): no pattern classification.

        `pattern` must allow exactly the pairs the tables imply (every element of a full block;
        in partial blocks, its predicate decides). `partial_mask_class`, if given, is an int
        table [H, NQB, NKB] read at the partial blocks: blocks of equal class have equal
        element masks (see `partial_mask_class` on the instance).
        """
        heads, nqb, nkb = full.shape
        if partial.shape != full.shape or (nqb, nkb) != (grid.num_q_blocks, grid.num_kv_blocks):
            raise ValueError(f"block tables must both be [H, {grid.num_q_blocks}, {grid.num_kv_blocks}], "
                             f"got {tuple(full.shape)} and {tuple(partial.shape)}")

        def csr(table):  # nonzero is row-major: rows ascending, kv blocks ascending in a row
            row, col = table.reshape(heads * nqb, nkb).nonzero(as_tuple=True)
            return _Csr(row, col, heads * nqb)

        part = csr(partial)
        cls_of = None
        if partial_mask_class is not None:
            cls_of = partial_mask_class.reshape(heads * nqb, nkb)[part.rows, part.indices.long()].long()
        return cls(pattern, grid, heads, csr(full), part, cls_of)

    @classmethod
    def from_csr(cls, pattern: "Pattern", grid: BlockGrid, num_heads: int, full: _Csr, partial: _Csr, *,
                 partial_mask_class: torch.Tensor, mask_class_blocks: torch.Tensor,
                 work_bounds: tuple[float, float, float, float], mask_class_key=None) -> "BlockLayout":
        """A layout from CSR arrays built on the device by a caller that knows its blocks (block
        top-k's selection: `_Csr.from_counts`), kv blocks ascending within each row, full and
        partial disjoint. The attributes are documented in `__init__`; `pattern` must allow
        exactly the pairs the blocks imply, as for `from_block_tables`."""
        return cls(pattern, grid, num_heads, full, partial, partial_mask_class, mask_class_blocks, work_bounds,
                   mask_class_key)

    def cached(self, key: str, build):
        """`self.cache[key]`, built by `build()` on first use (backends' per-layout plans)."""
        value = self.cache.get(key)
        if value is None:
            value = self.cache[key] = build()
        return value

    # --------------------------------------------------------------- plain facts
    q_len = property(lambda self: self.grid.q_len)
    kv_len = property(lambda self: self.grid.kv_len)
    q_offset = property(lambda self: self.grid.q_offset)
    block_q = property(lambda self: self.grid.block_q)
    block_kv = property(lambda self: self.grid.block_kv)
    num_q_blocks = property(lambda self: self.grid.num_q_blocks)
    num_kv_blocks = property(lambda self: self.grid.num_kv_blocks)
    device = property(lambda self: self.grid.device)

    def _shape(self) -> tuple[int, int]:
        return self.num_heads, self.num_q_blocks

    # ----------------------------------------------------- FlexAttention's arrays
    @property
    def kv_num_blocks(self) -> torch.Tensor:
        """[H, NQB] int32: partial (masked) kv blocks per query block."""
        return self.partial.counts.to(torch.int32).reshape(self._shape())

    @property
    def kv_indices(self) -> torch.Tensor:
        """[H, NQB, max partial per row] int32, padded with 0 (pass `width` to `padded` for more)."""
        return self.partial.padded().reshape(*self._shape(), -1)

    @property
    def full_kv_num_blocks(self) -> torch.Tensor:
        """[H, NQB] int32: full (mask-free) kv blocks per query block."""
        return self.full.counts.to(torch.int32).reshape(self._shape())

    @property
    def full_kv_indices(self) -> torch.Tensor:
        """[H, NQB, max full per row] int32, padded with 0."""
        return self.full.padded().reshape(*self._shape(), -1)

    # ------------------------------------------------------------------ summaries
    def nnz_blocks(self) -> int:
        """Non-empty (full + partial) blocks, summed over the layout's heads."""
        return int(self.full.indices.numel() + self.partial.indices.numel())

    def block_density(self) -> float:
        """Fraction of blocks touched."""
        total = self.num_heads * self.num_q_blocks * self.num_kv_blocks
        return self.nnz_blocks() / total if total else 0.0

    @cached_property
    def _allowed_pairs(self) -> torch.Tensor:
        g = self.grid
        per_head = torch.zeros(self.num_heads, dtype=torch.int64, device=g.device)
        for csr, is_full in ((self.full, True), (self.partial, False)):
            head = torch.div(csr.rows, g.num_q_blocks, rounding_mode="floor")
            qb = csr.rows % g.num_q_blocks
            kb = csr.indices.long()
            if is_full:
                p0, p1 = g.q_block_bounds(qb)
                k0, k1 = g.kv_block_bounds(kb)
                count = (p1 - p0) * (k1 - k0)
            else:
                count = self._require_pattern()._count(g, head, qb, kb)
            per_head.index_add_(0, head, count)
        return per_head

    def allowed_pairs(self) -> torch.Tensor:
        """[H] number of allowed (query, key) pairs per head (H = 1 for a shared layout).

        Exact. Partial blocks are counted in closed form where the pattern's parts allow it
        (bands, column/row sets, segments: O(1) or O(block_q) per block), else element by
        element (user predicates, overlaps of two partial parts: O(block area) per block).
        """
        return self._allowed_pairs.clone()

    def density(self) -> float:
        """Fraction of (query, key) pairs allowed, averaged over heads."""
        total = self.q_len * self.kv_len
        return float(self._allowed_pairs.double().mean()) / total if total else 0.0

    # ---------------------------------------------------------------- dense views
    def block_states(self) -> torch.Tensor:
        """int8 [H, NQB, NKB]: 0 empty, 1 partial, 2 full. O(NQB * NKB): pictures and tests."""
        out = torch.zeros(self.num_heads * self.num_q_blocks, self.num_kv_blocks, dtype=torch.int8, device=self.device)
        out[self.partial.rows, self.partial.indices.long()] = PARTIAL
        out[self.full.rows, self.full.indices.long()] = FULL
        return out.reshape(self.num_heads, self.num_q_blocks, self.num_kv_blocks)

    def to_dense(self) -> torch.Tensor:
        """bool [H, q_len, kv_len] element mask implied by the layout (full blocks, and the
        pattern's predicate inside partial blocks). O(q_len * kv_len): tests and pictures."""
        g = self.grid
        states = self.block_states()
        expanded = states.repeat_interleave(g.block_q, 1).repeat_interleave(g.block_kv, 2)[:, : g.q_len, : g.kv_len]
        out = expanded == FULL
        if self.partial.indices.numel():
            h = torch.arange(self.num_heads, device=g.device)[:, None, None]
            q = torch.arange(g.q_len, device=g.device)[None, :, None] + g.q_offset
            kv = torch.arange(g.kv_len, device=g.device)[None, None, :] + g.kv_offset
            out = out | ((expanded == PARTIAL) & self._require_pattern().allowed(q, kv, h))
        return out

    def element_masks(self, head: torch.Tensor, q_block: torch.Tensor, kv_block: torch.Tensor) -> torch.Tensor:
        """bool [n, BQ, BK]: which elements of blocks (head[i], q_block[i], kv_block[i]) are
        allowed (the pattern's predicate, and keys inside kv_len). Used by kernels for the
        partial blocks; O(n * BQ * BK)."""
        g = self.grid
        q = q_block[:, None, None] * g.block_q + torch.arange(g.block_q, device=g.device)[None, :, None]
        kv = kv_block[:, None, None] * g.block_kv + torch.arange(g.block_kv, device=g.device)[None, None, :]
        # padding past the ends is evaluated at the last real position (a user's mask_mod may
        # index tables of the sequence's length); padded keys are masked, padded rows unused
        q = torch.clamp(q, max=g.q_len - 1) + g.q_offset
        ok = self._require_pattern().allowed(q, torch.clamp(kv, max=g.kv_len - 1) + g.kv_offset, head[:, None, None])
        ok = ok & (kv < g.kv_len)
        return ok.expand(q_block.numel(), g.block_q, g.block_kv)

    def __str__(self) -> str:
        return self.ascii()

    def ascii(self, max_width: int = 64, heads: int = 2) -> str:
        """Block map: '█' full, '░' partial, '·' empty; large maps are shown downsampled."""
        g = self.grid
        lines = [f"BlockLayout(q_len={g.q_len}, kv_len={g.kv_len}, q_offset={g.q_offset}, "
                 f"blocks={g.block_q}x{g.block_kv}, heads={self.num_heads}, nnz_blocks={self.nnz_blocks()}, "
                 f"block_density={self.block_density():.4f})"]
        if self.num_q_blocks * self.num_kv_blocks == 0:
            return lines[0]
        states = self.block_states()
        step_q = -(-self.num_q_blocks // max_width)
        step_k = -(-self.num_kv_blocks // max_width)
        for h in range(min(heads, self.num_heads)):
            if self.num_heads > 1:
                lines.append(f"head {h}:")
            s = states[h]
            nq, nk = -(-s.shape[0] // step_q), -(-s.shape[1] // step_k)
            padded = torch.zeros(nq * step_q, nk * step_k, dtype=torch.int8, device=s.device)
            padded[: s.shape[0], : s.shape[1]] = s
            valid = torch.zeros_like(padded, dtype=torch.bool)
            valid[: s.shape[0], : s.shape[1]] = True
            cells = padded.reshape(nq, step_q, nk, step_k)
            any_touched = (cells > 0).any(3).any(1)
            all_full = ((cells == FULL) | ~valid.reshape(nq, step_q, nk, step_k)).all(3).all(1)
            for r in range(nq):
                lines.append("".join("█" if all_full[r, c] else "░" if any_touched[r, c] else "·" for c in range(nk)))
        if self.num_heads > heads:
            lines.append(f"... {self.num_heads - heads} more heads")
        return "\n".join(lines)

    def __repr__(self) -> str:
        g = self.grid
        return (f"BlockLayout(pattern={self.pattern!r}, q_len={g.q_len}, kv_len={g.kv_len}, q_offset={g.q_offset}, "
                f"block_q={g.block_q}, block_kv={g.block_kv}, heads={self.num_heads}, nnz_blocks={self.nnz_blocks()})")

    def _require_pattern(self) -> "Pattern":
        if self.pattern is None:
            raise ValueError("this layout has no pattern, so partial blocks cannot be resolved to elements")
        return self.pattern

    # ----------------------------------------------------------- FlexAttention
    def to_block_mask(self):
        """A FlexAttention `BlockMask` with the same blocks and the pattern as `mask_mod`.

        FlexAttention stores kv indices padded to the number of kv blocks, so the result
        costs O(H * NQB * NKB) int32 memory; our layout itself does not.
        """
        from torch.nn.attention.flex_attention import BlockMask

        shape = (1, self.num_heads, self.num_q_blocks)
        width = self.num_kv_blocks
        self._require_pattern().prepare(self.device)  # lookup tables on the kernel's device
        return BlockMask.from_kv_blocks(
            self.partial.counts.to(torch.int32).reshape(shape),
            self.partial.padded(width).reshape(*shape, width),
            self.full.counts.to(torch.int32).reshape(shape),
            self.full.padded(width).reshape(*shape, width),
            BLOCK_SIZE=(self.block_q, self.block_kv),
            mask_mod=self._require_pattern().mask_mod(self.q_offset),
            seq_lengths=(self.q_len, self.kv_len),
        )

    @classmethod
    def from_block_mask(cls, block_mask, pattern: "Pattern | None" = None, *, q_offset: int = 0) -> "BlockLayout":
        """Our layout from a FlexAttention `BlockMask` (batch entry 0).

        `pattern` gives the element predicate for partial blocks; by default the block mask's
        own `mask_mod` wrapped as a predicate pattern.
        """
        from .primitives import Predicate

        kv_num, kv_idx = block_mask.kv_num_blocks, block_mask.kv_indices
        if kv_num.dim() != 3:
            raise ValueError(f"block_mask.kv_num_blocks must be [B, H, NQB], got shape {tuple(kv_num.shape)}")
        if kv_num.shape[0] > 1 and not all(torch.equal(kv_num[0], kv_num[b]) for b in range(kv_num.shape[0])):
            raise ValueError("block masks that differ across the batch are not supported: layouts are per head only")
        q_len, kv_len = block_mask.seq_lengths
        block_q, block_kv = block_mask.BLOCK_SIZE
        heads = kv_num.shape[1]
        grid = BlockGrid(int(q_len), int(kv_len), q_offset, int(block_q), int(block_kv), kv_num.device)
        if pattern is None:  # the block mask's mask_mod counts query rows; patterns see positions
            mask_mod = block_mask.mask_mod

            def positions_mask_mod(b, h, q_idx, kv_idx):
                return mask_mod(b, h, q_idx - q_offset, kv_idx)

            pattern = Predicate(positions_mask_mod, num_heads=heads if heads > 1 else None, name="block_mask.mask_mod")

        def csr(num, idx):
            num = num[0].reshape(-1).long()[:, None]  # [R, 1]
            idx = idx[0].reshape(num.shape[0], -1)[:, : grid.num_kv_blocks]
            slot = torch.arange(idx.shape[1], device=idx.device)[None, :]
            valid = slot < num
            rows = torch.arange(num.shape[0], device=idx.device)[:, None].expand_as(idx)[valid]
            cols = idx[valid].long()
            order = torch.argsort(rows * grid.num_kv_blocks + cols)
            return _Csr(rows[order], cols[order], num.shape[0])

        full = (csr(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
                if block_mask.full_kv_num_blocks is not None
                else _Csr(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), heads * grid.num_q_blocks))
        return cls(pattern, grid, heads, full, csr(kv_num, kv_idx))
