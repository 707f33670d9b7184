"""The named patterns users ask for, built from the primitives.

Position conventions: a query at absolute position i, a key at position j. With fewer queries
than keys the queries are the last ones (i = kv_len - q_len + row) unless a q_offset is given.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .._checks import check_bool, check_int
from .._lru import LRU
from .base import DisjointUnion, Pattern, PerHead
from .primitives import Band, BlockCells, Columns, IndexSet, Predicate, Rows, Segments


def full() -> Pattern:
    """Every query sees every key (dense attention)."""
    return Band(None, None, name="full()")


def causal() -> Pattern:
    """Query i sees keys j <= i."""
    return Band(0, None, name="causal()")


def sliding_window(window: int, causal: bool = True) -> Pattern:
    """Local attention, with HuggingFace's conventions.

    * causal (Mistral's `sliding_window`): query i sees the W keys i-W+1 .. i (itself and W-1 before).
    * non-causal (Longformer's `attention_window`): query i sees i-W//2 .. i+W//2, i.e. itself and
      W//2 keys on each side (W+1 keys for even W).
    """
    check_bool("causal", causal)
    window = check_int("window", window, 1)
    name = f"sliding_window({window}, causal={causal})"
    return Band(0, window - 1, name=name) if causal else Band(-(window // 2), window // 2, name=name)


def dilated(window: int, dilation: int, causal: bool = True) -> Pattern:
    """A sliding window over every `dilation`-th token (token-level dilation).

    * causal: query i sees the `window` keys i, i-r, i-2r, ..., i-(window-1)r (span (window-1)r+1).
    * non-causal: i + t*r for t in [-window//2, window//2].
    With dilation 1 this is `sliding_window`.
    """
    check_bool("causal", causal)
    window = check_int("window", window, 1)
    dilation = check_int("dilation", dilation, 1)
    name = f"dilated({window}, {dilation}, causal={causal})"
    if causal:
        return Band(0, (window - 1) * dilation, dilation, name=name)
    half = (window // 2) * dilation
    return Band(-half, half, dilation, name=name)


def strided(stride: int, causal: bool = True) -> Pattern:
    """Sparse Transformer's strided pattern (Child et al. 2019): query i sees the previous
    `stride` keys (i - j < stride) and every key j with (i - j) % stride == 0.
    Non-causal: |i - j| < stride or (i - j) % stride == 0."""
    check_bool("causal", causal)
    stride = check_int("stride", stride, 1)
    # Built from disjoint parts (local; multiples of the stride beyond it) so sparse_attention
    # can run the strided part by residue classes and merge: O(N*stride + N^2/stride) work.
    if causal:
        return DisjointUnion([Band(0, stride - 1, name=f"local({stride})"),
                              Band(stride, None, stride, name=f"stride({stride})")])
    return DisjointUnion([Band(-(stride - 1), stride - 1, name=f"local({stride}, causal=False)"),
                          Band(stride, None, stride, name=f"stride({stride}, past)"),
                          Band(None, -stride, stride, name=f"stride({stride}, future)")])


def fixed(block: int, summary: int = 1, causal: bool = True) -> Pattern:
    """Sparse Transformer's fixed pattern: query i sees keys in its own block of `block`
    positions, plus the last `summary` positions of every block (the "summary" cells)."""
    check_bool("causal", causal)
    block = check_int("block", block, 1)
    summary = check_int("summary", summary, 1)
    if summary > block:
        raise ValueError(f"summary must be <= block ({block}), got {summary}")
    pattern = Segments(size=block) | Columns(IndexSet(period=block, width=summary))
    return pattern & Band(0, None, name="causal()") if causal else pattern


def _global_index_set(global_tokens, causal: bool = False) -> IndexSet:
    if isinstance(global_tokens, bool):
        raise TypeError("global_tokens must be an int (the first n tokens) or a sequence of indices, got bool")
    if isinstance(global_tokens, int):
        check_int("global_tokens", global_tokens, 0)
        # encoder: like the list form, the positions must exist; causal: a sequence that is
        # still growing (a short prompt) has the first min(n, length) as globals, as sinks do
        return IndexSet(prefix=global_tokens, named=not causal)
    idx = torch.as_tensor(global_tokens)
    if idx.numel() == 0:
        return IndexSet(prefix=0)  # an empty list: no global tokens
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise TypeError(f"global_tokens must hold integer indices, got dtype {idx.dtype}")
    if idx.numel() and int(idx.min()) < 0:
        raise ValueError(f"global token index {int(idx.min())} is negative; indices must be >= 0")
    return IndexSet(indices=idx)


def longformer(window: int, global_tokens=0, causal: bool = False) -> Pattern:
    """Longformer: a sliding window (`window` as HF's `attention_window`, W//2 keys each side)
    plus global tokens, which attend to every key and are attended by every query.

    `global_tokens`: an int n (the first n positions, e.g. [CLS]) or a sequence of positions.
    Positions must exist in the sequence (a layout for fewer than n, or than the largest
    index, raises), except that with causal=True a count n means the first min(n, length)
    tokens, as attention sinks do, so a decoder can start from a short prompt.
    With causal=True the window is causal (W keys up to i) and everything is clipped to j <= i.
    """
    check_bool("causal", causal)
    globals_ = _global_index_set(global_tokens, causal)
    local = sliding_window(window, causal=causal)
    pattern = local | Rows(globals_) | Columns(globals_)
    return pattern & Band(0, None, name="causal()") if causal else pattern


def streaming(sinks: int, window: int) -> Pattern:
    """StreamingLLM: each query sees the first `sinks` tokens and the last `window` keys
    (itself included), causally.

    A sequence shorter than `sinks` is all sinks (as StreamingLLM's cache, which keeps the
    first min(sinks, seen) tokens): a short prompt must decode with the same pattern as a long
    one, so this is accepted, unlike Longformer's global count, which names positions."""
    sinks = check_int("sinks", sinks, 0)
    window = check_int("window", window, 1)
    return (Columns(IndexSet(prefix=sinks)) & Band(0, None, name="causal()")) | sliding_window(window, causal=True)


def document(doc_ids) -> Pattern:
    """Packed documents: query i sees key j only when doc_ids[i] == doc_ids[j].

    `doc_ids` is a non-decreasing integer tensor with one entry per position. Combine with
    `causal()` for causal packing: `document(ids) & causal()`.
    """
    return Segments(ids=doc_ids)


def block_sparse(layout, block_size: int | tuple[int, int]) -> Pattern:
    """Any block layout: bool/0-1 tensor `(H, NQB, NKB)` (or `(NQB, NKB)` for all heads), where
    cell (h, a, b) lets queries in block a see keys in block b. `block_size` is the cell size
    (an int, or (query, key) sizes). A 3-D layout is per head and must match the query heads."""
    if not isinstance(layout, torch.Tensor):
        raise TypeError(f"layout must be a torch.Tensor of shape (H, NQB, NKB) or (NQB, NKB), got {type(layout).__name__}")
    if layout.dim() not in (2, 3):
        raise ValueError(f"layout must have shape (H, NQB, NKB) or (NQB, NKB), got shape {tuple(layout.shape)}")
    cell_q, cell_kv = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    check_int("block_size", cell_q, 1)
    check_int("block_size", cell_kv, 1)
    per_head = layout.dim() == 3
    cells = layout if per_head else layout[None]
    h, r, c = cells.detach().cpu().ne(0).nonzero(as_tuple=True)
    return BlockCells(h, r, c, shape=tuple(cells.shape), cell_q=cell_q, cell_kv=cell_kv, per_head=per_head)


def bigbird(block: int, num_window_blocks: int = 3, num_global_blocks: int = 2, num_random_blocks: int = 3,
            seed: int = 0, num_heads: int | None = None, causal: bool = False) -> Pattern:
    """BigBird ITC (Zaheer et al. 2020), at the granularity of `block` tokens.

    * window: each query block sees `num_window_blocks` blocks centred on itself;
    * global: the first ceil(g/2) and last floor(g/2) blocks (g = num_global_blocks, as HF's
      first/last-block globals) see everything and are seen by everything;
    * random: every other query block sees `num_random_blocks` blocks drawn uniformly from those
      not already in its window or among the globals.
    Random blocks are drawn from `seed` (reproducible); with `num_heads` each head draws its own.
    The block map depends on the sequence length, so it is drawn per length and cached.

    causal=True (for decoders; the paper and HF define BigBird for encoders only): the window
    is the `num_window_blocks` blocks ending at the query's own block, globals are the first
    ceil(g/2) blocks (seen by every later query), random blocks are drawn among the earlier
    blocks before the window, and inside its own block a query sees keys <= itself.
    """
    return BigBird(block, num_window_blocks, num_global_blocks, num_random_blocks, seed, num_heads,
                   check_bool("causal", causal))


class BigBird(Pattern):
    # block maps kept per length, least recently used dropped first: a run over many lengths
    # (ListOps batches) would otherwise keep one per length forever; a dropped one is drawn
    # again identically (its random blocks come from `seed` and the length alone)
    MAX_CACHED_LENGTHS = 64

    def __init__(self, block, num_window_blocks, num_global_blocks, num_random_blocks, seed, num_heads,
                 causal=False):
        super().__init__()
        self.causal = causal
        self.block = check_int("block", block, 1)
        self.num_window_blocks = check_int("num_window_blocks", num_window_blocks, 1)
        self.num_global_blocks = check_int("num_global_blocks", num_global_blocks, 0)
        self.num_random_blocks = check_int("num_random_blocks", num_random_blocks, 0)
        self.seed = check_int("seed", seed)
        self.num_heads = None if num_heads is None else check_int("num_heads", num_heads, 1)
        self._cells = LRU()  # length -> Pattern

    def cells(self, length: int) -> Pattern:
        """The block map for a sequence of `length` tokens (drawn once per length): BlockCells,
        or with causal, the earlier cells | causal own blocks."""
        cells = self._cells.recall(length)
        if cells is None:
            cells = self._cells.keep(length, self._draw(length), self.MAX_CACHED_LENGTHS)
        return cells

    def _draw(self, length: int) -> Pattern:
        n = -(-length // self.block)
        heads = self.num_heads or 1
        g_first = -(-self.num_global_blocks // 2)
        g_last = 0 if self.causal else self.num_global_blocks // 2
        # causal: the window's blocks all precede or are the own block
        half = self.num_window_blocks - 1 if self.causal else self.num_window_blocks // 2
        blocks = torch.arange(n)
        is_global = (blocks < g_first) | (blocks >= n - g_last)
        parts_h, parts_r, parts_c = [], [], []

        def add(h, r, c):
            parts_h.append(h), parts_r.append(r), parts_c.append(c)

        for h in range(heads):
            # window
            r, off = torch.meshgrid(blocks, torch.arange(-half, self.num_window_blocks - half), indexing="ij")
            c = r + off
            ok = (c >= 0) & (c < n)
            add(torch.full_like(r[ok], h), r[ok], c[ok])
            # globals: their rows see everything, everyone sees their columns
            g = blocks[is_global]
            add(torch.full((g.numel() * n,), h), g.repeat_interleave(n), blocks.repeat(g.numel()))
            add(torch.full((g.numel() * n,), h), blocks.repeat(g.numel()), g.repeat_interleave(n))
        rows = blocks[~is_global]
        if self.num_random_blocks and rows.numel():
            gen = torch.Generator().manual_seed(self.seed)
            for h in range(heads):
                r, c = self._draw_random(rows, n, g_first, g_last, half, gen)
                add(torch.full_like(r, h), r, c)
        head, row, col = torch.cat(parts_h), torch.cat(parts_r), torch.cat(parts_c)
        if not self.causal:
            return BlockCells(head, row, col, shape=(heads, n, n), cell_q=self.block, cell_kv=self.block,
                              per_head=self.num_heads is not None, name="bigbird")
        # strictly earlier cells need no mask; the own block is causal inside (block top-k's form:
        # no per-head part is intersected with causal(), which would classify element by element)
        past = col < row
        cells = BlockCells(head[past], row[past], col[past], shape=(heads, n, n), cell_q=self.block,
                           cell_kv=self.block, per_head=self.num_heads is not None, name="bigbird")
        return cells | (Segments(size=self.block) & Band(0, None, name="causal()"))

    def _draw_random(self, rows, n, g_first, g_last, half, gen):
        """For each row, num_random_blocks distinct blocks outside its window and the globals.

        Candidate u in [0, free) is mapped onto the u-th allowed block, so every draw is valid;
        duplicates within a row are redrawn. O(rows * num_random_blocks) expected."""
        lo = torch.clamp(rows - half, min=g_first)  # window range, clipped to the non-global span
        # causal: nothing after the window is eligible (hi = n - g_last with g_last = 0 removes it)
        hi = torch.full_like(rows, n) if self.causal else torch.clamp(rows + (self.num_window_blocks - half),
                                                                         max=n - g_last)
        free = (n - g_first - g_last) - torch.clamp(hi - lo, min=0)  # [R]
        take = torch.clamp(free, max=self.num_random_blocks)
        picks = torch.full((rows.numel(), self.num_random_blocks), -1, dtype=torch.int64)
        pending = take > 0
        while pending.any():
            idx = pending.nonzero().squeeze(1)
            u = (torch.rand(idx.numel(), self.num_random_blocks, generator=gen) * free[idx, None]).long()
            u = torch.minimum(u, free[idx, None] - 1)
            c = u + g_first
            c = torch.where(c >= lo[idx, None], c + (hi - lo).clamp(min=0)[idx, None], c)
            # keep draws that are new for the row, up to `take`
            for j in range(self.num_random_blocks):
                cur = picks[idx]
                have = (cur >= 0).sum(1)
                new = ~(cur == c[:, j : j + 1]).any(1) & (have < take[idx])
                picks[idx[new], have[new]] = c[new, j]
            pending = (picks >= 0).sum(1) < take
        valid = picks >= 0
        return rows[:, None].expand_as(picks)[valid], picks[valid]

    def natural_block(self):
        return self.block

    def is_causal(self) -> bool:
        return self.causal

    def bind(self, grid) -> Pattern:
        if grid.q_end > grid.kv_end:
            raise ValueError(f"bigbird is self-attention over the keys: queries must lie within the {grid.kv_end} "
                             f"key positions, but q_offset + q_len = {grid.q_end}")
        return self.cells(grid.kv_end)

    def allowed(self, q_idx, kv_idx, head=None):
        if len(self._cells) != 1:
            raise ValueError("bigbird's random blocks depend on the sequence length: use "
                             "pattern.cells(length).allowed(...) or the layout's pattern")
        return next(iter(self._cells.values())).allowed(q_idx, kv_idx, head)

    def to_dense(self, q_len, kv_len=None, **kw):
        return self.cells(q_len if kv_len is None else kv_len).to_dense(q_len, kv_len, **kw)

    def mask_mod(self, q_offset: int = 0):
        raise ValueError("bigbird's mask depends on the sequence length: use layout.to_block_mask() or "
                         "pattern.cells(length).mask_mod(q_offset)")

    def __repr__(self):
        heads = "" if self.num_heads is None else f", num_heads={self.num_heads}"
        causal = ", causal=True" if self.causal else ""
        return (f"bigbird(block={self.block}, window={self.num_window_blocks}, global={self.num_global_blocks}, "
                f"random={self.num_random_blocks}, seed={self.seed}{heads}{causal})")


def per_head(patterns: Sequence[Pattern]) -> Pattern:
    """Head h follows patterns[h]; the call's query head count must equal len(patterns)."""
    return PerHead(patterns)


def predicate(fn: Callable, num_heads: int | None = None) -> Pattern:
    """Your own FlexAttention-style `mask_mod(b, h, q_idx, kv_idx) -> bool tensor`.

    Layouts are found by evaluating fn block by block: exact, bounded memory, but O(N^2) time
    (cached per length). Prefer a preset or a combination of presets where one fits.
    One layout serves every row of a batch, so fn may not read `b` (refused with a
    ValueError when the layout is built); pass `num_heads` if fn depends on `h` (reading
    `h` without it is refused too). fn is only evaluated at in-range positions, so lookup
    tables of the sequence's length work, as with FlexAttention.
    """
    return Predicate(fn, num_heads=num_heads)
