"""Block top-k attention (MoBA / Quest style): each query block picks the kv blocks whose
mean-pooled key scores highest against its mean-pooled query, then attends to those blocks
(plus an optional fixed pattern) exactly, on the same block-sparse kernels as static patterns.

Selection (`select_kv_blocks`), per batch element and query head:

* blocks tile absolute positions: query block a holds the queries at positions p with
  p // block_size == a, kv block c the keys at [c * block_size, (c + 1) * block_size), so
  with causal masking a query block's "own" kv block (c == a) is the diagonal one;
* block score = mean(queries of the block) · mean(keys of the kv block) (MoBA's gate; Quest's
  min/max bound is not used), means over the real positions of ragged blocks; GQA: each query
  head scores against its kv head;
* non-causal: the top_k_blocks highest-scoring kv blocks;
* causal: only kv blocks c <= a are eligible (they hold some key a query of the block may see),
  and the own block c == a is always selected and counts within top_k_blocks (MoBA's rule:
  top_k_blocks = 1 means local attention only). Rows with fewer eligible blocks keep them all.
  Causal masks the keys, not the choice: the block's mean query includes queries after a
  given row, so which past blocks a row sees depends on later positions (as in MoBA). A
  causal LM trained with it can read the future through the selection, and step-by-step
  decoding cannot equal the full forward (`SparseCausalLM` refuses it unless listed in
  `ModelConfig.leaky_mechanisms`).
Ties go to the lower kv block index (as the naive reference's stable sort does), the same on
every device. The selection is not differentiated. With a key_padding_mask the means are over
real tokens, kv blocks with no real key score -inf (never selected) and query blocks of pads
select nothing (see `block_topk_attention` for what a padded row then equals).

Attention (`block_topk_attention`): the selection differs per batch element and head, so the
batch is folded into the heads (q -> [1, B * Hq, Nq, D], k/v -> [1, B * Hkv, Nkv, D], which
keeps the GQA grouping since B * Hq / (B * Hkv) = Hq / Hkv) and the selection becomes a
per-head pattern of B * Hq heads, run by `sparse_attention` (the `blocked` backend on CPU,
`triton` on CUDA). With causal masking it is built as

    past selected blocks (c < a: every key precedes every query, no mask)
    | own block & causal()                  (the same for every head)
    | always & causal()

so that no per-head part is intersected with `causal()` (that intersection would classify the
causal triangle's blocks element by element, O(N^2)).
"""

from __future__ import annotations

import torch

from ...backends import AttentionCall, select
from ...backends.inputs import check_inputs
from ...patterns import BlockCells, BlockLayout, Pattern, Segments
from ...patterns.base import state_from_count
from ...patterns.grid import BlockGrid
from ...patterns.layout import _Csr  # the layout's CSR type, built here on the device
from ...patterns import causal as causal_pattern
from ...patterns import full as full_pattern
from ..._checks import check_bool, check_int
from ..common import accumulation_dtype, check_key_padding_mask
from ..sparse import sparse_attention


def _query_blocks(q_offset: int, q_len: int, block_size: int) -> tuple[int, int]:
    """(index of the first query block, number of query blocks) for queries at positions
    q_offset .. q_offset + q_len - 1."""
    if q_len == 0:
        return q_offset // block_size, 0
    first = q_offset // block_size
    return first, (q_offset + q_len - 1) // block_size - first + 1


def _block_means(x: torch.Tensor, lead: int, block_size: int, num_blocks: int,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """Means over blocks of rows of x [B, H, N, E], where row i sits at slot lead + i of a
    sequence cut into num_blocks blocks of block_size slots: [B, H, num_blocks, E], each mean
    over the rows actually present (ragged first / last blocks divide by their real count).
    Summed in `dtype` (default x's) without a converted copy of x."""
    n = x.shape[2]
    tail = num_blocks * block_size - lead - n
    padded = torch.nn.functional.pad(x, (0, 0, lead, tail)) if lead or tail else x  # [B, H, NB * block_size, E]
    sums = padded.unflatten(2, (num_blocks, block_size)).sum(3, dtype=dtype or x.dtype)
    start = torch.arange(num_blocks, device=x.device) * block_size
    count = (torch.clamp(start + block_size, max=lead + n) - torch.clamp(start, min=lead)).clamp(min=1)
    return sums / count[:, None].to(sums.dtype)


def _real_block_means(x: torch.Tensor, real: torch.Tensor, lead: int, block_size: int, num_blocks: int,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`_block_means` over the real rows only: (means [B, H, num_blocks, E], has_real bool
    [B, num_blocks]) for x [B, H, N, E] and real bool [B, N]. A block with no real row has mean 0
    and has_real False; pad rows' values never enter (zeroed by a select, not a multiply, so
    an inf or NaN in a pad row cannot leak)."""
    n = x.shape[2]
    tail = num_blocks * block_size - lead - n
    kept = torch.where(real[:, None, :, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    padded = torch.nn.functional.pad(kept, (0, 0, lead, tail))  # [B, H, NB * block_size, E]
    sums = padded.unflatten(2, (num_blocks, block_size)).sum(3, dtype=dtype)
    count = torch.nn.functional.pad(real, (lead, tail)).unflatten(1, (num_blocks, block_size)).sum(2)  # [B, NB]
    return sums / count.clamp(min=1)[:, None, :, None].to(sums.dtype), count > 0


def _top_k_lowest_index_ties(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool like scores [..., M]: exactly k per row (k <= M), the k highest scores, ties at the
    k-th value going to the lowest indices (the naive reference's stable sort), whatever
    `torch.topk` does with ties on a device. O(M) per row, no host read."""
    kth = scores.topk(k, dim=-1).values[..., -1:]  # [..., 1] the k-th highest value
    above = scores > kth
    tied = scores == kth
    room = k - above.sum(-1, keepdim=True, dtype=torch.int32)  # tied entries still to take
    return above | (tied & (tied.cumsum(-1, dtype=torch.int32) <= room))


def _ascending_indices(chosen: torch.Tensor, k: int) -> torch.Tensor:
    """int64 [..., k]: the indices of a bool [..., M] with exactly k set per row, ascending."""
    slot = chosen.cumsum(-1, dtype=torch.int32) - 1  # [..., M] rank among the row's chosen
    slot = torch.where(chosen, slot, k).long()  # the unchosen all land in a spare last slot
    index = torch.arange(chosen.shape[-1], device=chosen.device).expand(chosen.shape)
    out = torch.zeros(*chosen.shape[:-1], k + 1, dtype=torch.int64, device=chosen.device)
    return out.scatter_(-1, slot, index)[..., :k]


# Whether `_select` runs the one-kernel selection (select_kernel.py) on its fp32 scores:
# None = on CUDA when triton imports; True = also under TRITON_INTERPRET=1 on CPU (tests); False = never.
SELECTION_KERNEL: bool | None = None


def _use_selection_kernel(scores: torch.Tensor) -> bool:
    if SELECTION_KERNEL is False or scores.dtype != torch.float32 or (SELECTION_KERNEL is None and not scores.is_cuda):
        return False
    try:
        from .select_kernel import MAX_BLOCKS
    except ImportError:  # no triton
        return False
    return scores.shape[-1] <= MAX_BLOCKS


def _select(q: torch.Tensor, k: torch.Tensor, top_k_blocks: int, block_size: int, causal: bool,
            q_offset: int, key_real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(selection bool [B, Hq, NQB, NKB], picks int64 [B, Hq, NQB, min(top_k_blocks, NKB)]): the
    selection of `select_kv_blocks` (arguments already checked) and, per row, the kv blocks
    the top-k picked, ascending. With causal, a row with fewer eligible blocks than that picks
    them all and then ineligible ones (after them, being later blocks): its first
    min(k, first + row + 1) picks are the selection. Everything stays on the device.

    key_real: bool [B, Nkv] (True = real key; queries on key indices, q_offset + Nq <= Nkv):
    means over real tokens only, kv blocks with no real key score -inf (below every real block)
    and are never selected, query blocks with no real query select nothing. The picks then
    may hold blocks the selection drops (the -inf ones); only the unmasked device layout reads
    them."""
    bsz, hq, nq, d = q.shape
    hkv, nkv = k.shape[1], k.shape[2]
    group = hq // hkv
    num_kv_blocks = -(-nkv // block_size)
    first, num_q_blocks = _query_blocks(q_offset, nq, block_size)
    with torch.no_grad():
        cdt = accumulation_dtype(q.dtype)
        lead = q_offset - first * block_size
        if key_real is None:
            key_means = _block_means(k.detach(), 0, block_size, num_kv_blocks, cdt)  # [B, Hkv, NKB, D]
            query_means = _block_means(q.detach(), lead, block_size, num_q_blocks, cdt)  # [B, Hq, NQB, D]
        else:
            key_means, kv_block_real = _real_block_means(k.detach(), key_real, 0, block_size, num_kv_blocks, cdt)
            query_means, q_block_real = _real_block_means(q.detach(), key_real[:, q_offset:q_offset + nq], lead,
                                                          block_size, num_q_blocks, cdt)
        grouped = query_means.reshape(bsz, hkv, group * num_q_blocks, d)
        scores = torch.matmul(grouped, key_means.transpose(-1, -2)).reshape(bsz, hq, num_q_blocks, num_kv_blocks)
        if key_real is not None:  # before the causal fills, as the selection kernel receives them
            scores = scores.masked_fill(~kv_block_real[:, None, None, :], float("-inf"))
        kept = min(top_k_blocks, num_kv_blocks)
        if kept and _use_selection_kernel(scores):  # masks, top-k, selection and picks in one launch
            from .select_kernel import select_from_scores

            chosen, picks = select_from_scores(scores, kept, first, causal)
        else:
            q_block = torch.arange(num_q_blocks, device=q.device)[:, None] + first  # [NQB, 1] absolute index
            kv_block = torch.arange(num_kv_blocks, device=q.device)[None, :]  # [1, NKB]
            if causal:
                scores = scores.masked_fill(kv_block > q_block, float("-inf")).masked_fill(kv_block == q_block,
                                                                                          float("inf"))
            chosen = _top_k_lowest_index_ties(scores, kept)  # [B, Hq, NQB, NKB]
            picks = _ascending_indices(chosen, kept)
            if causal:  # rows with fewer eligible blocks than k also picked -inf ones
                chosen = chosen & (kv_block <= q_block)
        if key_real is not None:  # rows with fewer real blocks than k also picked empty ones
            chosen = chosen & kv_block_real[:, None, None, :] & q_block_real[:, None, :, None]
        return chosen, picks


def _check_key_real(key_padding_mask, k: torch.Tensor, q_len: int, q_offset: int) -> torch.Tensor | None:
    """The checked key_padding_mask (None stays None); it needs the queries on key indices."""
    if key_padding_mask is None:
        return None
    key_real = check_key_padding_mask(key_padding_mask, k)
    if q_offset + q_len > k.shape[2]:
        raise ValueError(f"key_padding_mask needs the queries on key indices (q_offset + q_len <= kv_len), got "
                         f"q_offset={q_offset}, q_len={q_len}, kv_len={k.shape[2]}")
    return key_real


def select_kv_blocks(q: torch.Tensor, k: torch.Tensor, top_k_blocks: int, block_size: int, *, causal: bool = False,
                     q_offset: int | None = None, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The kv blocks each query block attends to: bool [B, Hq, NQB, NKB].

    Row a of the result is query block first + a, where first = q_offset // block_size and
    blocks tile absolute positions (so NQB = 1 when decoding one token); NKB = ceil(Nkv /
    block_size). Scores are mean-pooled query · mean-pooled key; with `causal`, only kv blocks
    at or before the query block are eligible and the query block's own kv block is always
    selected, counted within top_k_blocks. See the module docstring.

    key_padding_mask: bool (B, Nkv), True = a real key (queries on key indices): the means are
    over real tokens only, a kv block with no real key is never selected (a row with fewer real
    eligible blocks than top_k_blocks selects fewer), a query block with no real query selects
    nothing.
    """
    _, q_offset, _ = check_inputs(q, k, k, causal_pattern() if check_bool("causal", causal) else full_pattern(),
                                  None, q_offset, "auto")
    check_int("top_k_blocks", top_k_blocks, 1)
    check_int("block_size", block_size, 1)
    key_real = _check_key_real(key_padding_mask, k, q.shape[2], q_offset)
    return _select(q, k, top_k_blocks, block_size, causal, q_offset, key_real)[0]


def selection_pattern(selection: torch.Tensor, block_size: int, q_len: int, kv_len: int, q_offset: int, *,
                      causal: bool = False, always: Pattern | None = None) -> Pattern:
    """The per-head pattern (heads = B * Hq, head b * Hq + h) of a selection [B, Hq, NQB, NKB]
    from `select_kv_blocks`, OR'd with `always` and, with `causal`, restricted to keys <= the
    query's position. Its cells stay a dense table on the selection's device (built with no
    host read; coordinates are derived only if a layout is classified from the pattern)."""
    bsz, hq, num_q_blocks, num_kv_blocks = selection.shape
    first, _ = _query_blocks(q_offset, q_len, block_size)
    rows = -(-max(q_offset + q_len, kv_len) // block_size)  # BlockCells' rows cover every position
    cells = selection.reshape(bsz * hq, num_q_blocks, num_kv_blocks)
    if causal:  # own blocks come from the shared causal part; the past ones need no mask
        q_block = torch.arange(num_q_blocks, device=cells.device)[:, None] + first
        cells = cells & (torch.arange(num_kv_blocks, device=cells.device)[None, :] < q_block)
    table = torch.zeros(bsz * hq, rows, num_kv_blocks, dtype=torch.bool, device=cells.device)
    table[:, first:first + num_q_blocks] = cells
    pattern: Pattern = BlockCells.from_table(table, cell_q=block_size, cell_kv=block_size, per_head=True,
                                             name="block_topk")
    if causal:
        pattern = pattern | (Segments(size=block_size) & causal_pattern())
    if always is not None:
        pattern = pattern | (always & causal_pattern() if causal else always)
    return pattern


def selection_layout(selection: torch.Tensor, pattern: Pattern, block_size: int, grid: BlockGrid, *,
                     causal: bool) -> BlockLayout:
    """The BlockLayout of `selection_pattern(selection, ...)` (passed as `pattern`) on `grid`,
    built from the selection table on its device with no pattern classification.

    Needs layout blocks B = grid.block_q = grid.block_kv dividing block_size and
    grid.q_offset % B == 0, so every layout block lies in one selection cell. Then a block is
    full when its cell is a selected past cell (causal) or selected (not causal), or lies
    wholly below the diagonal of its query's own cell (causal); the diagonal blocks of own
    cells are partial. Partial blocks get the mask class (query start - key start, ragged
    last kv block or not): the pattern is causal there, so equal classes have equal masks
    and the kernel plan evaluates one block per class.
    """
    b = grid.block_q
    heads = selection.shape[0] * selection.shape[1]
    first, _ = _query_blocks(grid.q_offset, grid.q_len, block_size)
    p0, p1 = grid.q_block_bounds(grid.arange(grid.num_q_blocks))  # absolute query positions [NQB]
    k0, k1 = grid.kv_block_bounds(grid.arange(grid.num_kv_blocks))  # [NKB]
    cell_row = torch.div(p0, block_size, rounding_mode="floor")  # absolute selection row
    cell_col = torch.div(k0, block_size, rounding_mode="floor")
    picked = selection.reshape(heads, -1, selection.shape[3])[:, cell_row - first][:, :, cell_col]  # [H', NQB, NKB]
    ragged = (k1 - k0 < grid.block_kv)[None, :]  # [1, NKB]: only the last kv block can be
    if causal:
        own = cell_col[None, :] == cell_row[:, None]
        below = (k1 - 1)[None, :] <= p0[:, None]  # every key of the block precedes every query
        crosses = ~below & (k0[None, :] < p1[:, None])  # some but not all pairs causal
        allowed_whole = picked & ((cell_col[None, :] < cell_row[:, None]) | (own & below))
        touched = allowed_whole | (picked & own & crosses)
    else:
        allowed_whole = touched = picked
    full = allowed_whole  # a ragged last kv block can be full: kernels mask keys >= kv_len themselves
    partial = touched & ~full
    mask_class = (p0[:, None] - k0[None, :]) * 2 + ragged.long()  # [NQB, NKB]
    return BlockLayout.from_block_tables(pattern, grid, full, partial, mask_class.expand(heads, -1, -1))


def _row_counts(kernel_q_block, kernel_per_cell: int, kept: int, causal: bool):
    """(full, partial) blocks of the device layout's rows at absolute kernel query blocks
    `kernel_q_block` (a numpy array on the host or a tensor on the device: one formula for
    both, so the host's total always matches the device's rows). See device_selection_layout."""
    if not causal:
        return kernel_q_block * 0 + kept * kernel_per_cell, kernel_q_block * 0
    cell = kernel_q_block // kernel_per_cell
    past_cells = (cell + 1).clip(max=kept) - 1
    return past_cells * kernel_per_cell + (kernel_q_block - cell * kernel_per_cell), kernel_q_block * 0 + 1


def device_selection_layout(selection: torch.Tensor, picks: torch.Tensor, pattern: Pattern, block_size: int,
                            grid: BlockGrid, *, causal: bool) -> BlockLayout | None:
    """The BlockLayout of a selection on `grid`, built on the selection's device with no host
    read (no nonzero, no unique, no bincount), or None where its block counts depend on the
    selection (then `selection_layout` builds it, reading counts back).

    `picks` [B, Hq, NQB, k] are `_select`'s ascending kv blocks per selection row; `pattern`
    is `selection_pattern(selection, ...)` without `always`. Layout
    blocks b = grid.block_q = grid.block_kv must divide block_size (m = block_size / b kernel
    blocks per cell) and grid.q_offset. Kernel query block P (absolute) lies in cell row
    a = P // m; its blocks:
    * causal (needs every query before kv_len, so each row's own cell exists): full, the
      m kernel blocks of each of its min(k, a + 1) - 1 selected past cells (its first picks),
      then its own cell's kernel blocks before P; partial, the diagonal block P (one mask:
      causal, or causal and the ragged last kv block);
    * not causal (needs every cell to hold m kernel blocks, so kv blocks are
      ceil(kv_len / b) = m * cells): full, the m kernel blocks of each of its k picks.
    Each row's count is then a formula of P alone, so the CSR offsets and the total are known
    on the host, and every entry is computed from its (row, slot) by arithmetic and a gather.
    """
    import numpy as np  # host arithmetic on counts, deliberately not torch (no tensor is read back)

    b = grid.block_q
    if grid.block_kv != b or block_size % b or grid.q_offset % b:
        raise ValueError(f"grid: device_selection_layout needs square blocks dividing block_size={block_size} and "
                         f"q_offset={grid.q_offset}, got {grid.block_q} x {grid.block_kv}")
    m = block_size // b
    heads = selection.shape[0] * selection.shape[1]
    kept = picks.shape[-1]
    first, _ = _query_blocks(grid.q_offset, grid.q_len, block_size)
    nqb, nkb = grid.num_q_blocks, grid.num_kv_blocks
    p_first = grid.q_offset // b
    if causal and grid.q_end > grid.kv_len:
        return None
    if not causal and nkb != m * selection.shape[3]:
        return None
    host_full, host_part = _row_counts(np.arange(nqb, dtype=np.int64) + p_first, m, kept, causal)
    dev = picks.device
    kernel_q_block = torch.arange(nqb, device=dev) + p_first  # [NQB'] absolute
    full_counts, part_counts = _row_counts(kernel_q_block, m, kept, causal)
    full = _Csr.from_counts(full_counts.repeat(heads), heads * int(host_full.sum()))  # rows = (head, q block)
    part = _Csr.from_counts(part_counts.repeat(heads), heads * int(host_part.sum()))

    picks = picks.reshape(heads, -1, kept)  # [H', NQB, k]
    head = torch.div(full.rows, nqb, rounding_mode="floor")
    big_p = full.rows % nqb + p_first  # absolute kernel query block of each entry
    cell = torch.div(big_p, m, rounding_mode="floor")
    slot = full.slots()
    pick = picks[head, cell - first, torch.clamp(torch.div(slot, m, rounding_mode="floor"), max=kept - 1)]
    kv = pick * m + slot % m  # the slot-th kernel block of the picked cells
    if causal:
        past = ((cell + 1).clamp(max=kept) - 1) * m
        kv = torch.where(slot < past, kv, cell * m + (slot - past))  # then the own cell's blocks before P
    full.indices = kv.to(torch.int32)
    classes, blocks, class_key = None, None, None
    if causal:
        diagonal = part.rows % nqb + p_first
        part.indices = diagonal.to(torch.int32)
        # two mask classes at most: the diagonal block (causal), and the diagonal block that is
        # also the ragged last kv block (causal, keys >= kv_len off); one block stands for each
        ragged_last = nkb - 1 if grid.kv_len % b else -1
        last_row_ragged = p_first + nqb - 1 == ragged_last
        representatives = ([0] if nqb > 1 or not last_row_ragged else []) + ([nqb - 1] if last_row_ragged else [])
        classes = torch.where(diagonal == ragged_last, len(representatives) - 1, 0)
        # (head 0, q block, kv block) of each; built by arange arithmetic: assigning Python ints
        # into a CUDA tensor copies each from the host, and every such copy synchronises
        step = representatives[-1] - representatives[0]
        rows = representatives[0] + step * torch.arange(len(representatives), dtype=torch.int64, device=dev)
        blocks = torch.stack([torch.zeros_like(rows), rows, rows + p_first], dim=1)
        # A diagonal block lies in one selection cell (b divides block_size and q_offset), where
        # the pattern is the causal part alone: its mask is the triangle, cut to the rows and keys
        # really there (rows past q_len repeat the last real row; on the rows kernels store it is
        # the triangle alone). So (rows, keys) per class decide the class masks, and the kernels'
        # plan may reuse them from an earlier call instead of evaluating the selection's pattern.
        class_key = ("block_topk causal diagonal",) + tuple(
            (min(b, grid.q_len - r * b), min(b, grid.kv_len - (r + p_first) * b)) for r in representatives)
    row_work = host_full + host_part
    work = (float(row_work.max()), float(row_work.mean()), float(nqb), float(row_work.sum()) / nkb)
    if classes is None:
        classes = torch.zeros(0, dtype=torch.int64, device=dev)
        blocks = torch.zeros(0, 3, dtype=torch.int64, device=dev)
    return BlockLayout.from_csr(pattern, grid, heads, full, part, partial_mask_class=classes,
                                mask_class_blocks=blocks, work_bounds=work, mask_class_key=class_key)


class _RealPairs(Pattern):
    """Per-head pattern of the folded batch (head b * Hq + h reads batch row b): a pair is
    allowed iff its query's and its key's positions are both real tokens of that row (queries
    sit on key indices). Intersected with the selection's pattern, it keeps pad keys out of
    every selected block and of `always`, and leaves pad query rows with nothing (0)."""

    def __init__(self, real: torch.Tensor) -> None:
        super().__init__()
        self.real = real  # bool [H', N]
        self.num_heads = real.shape[0]
        zero = torch.zeros(real.shape[0], 1, dtype=torch.int64, device=real.device)
        self._before = torch.cat([zero, real.long().cumsum(1)], 1)  # [H', N + 1] real positions before each

    def _real_at(self, pos, head):
        n = self.real.shape[1]
        real = self.real.to(pos.device)
        return real[head, pos.clamp(0, n - 1)] & (pos >= 0) & (pos < n)

    def allowed(self, q_idx, kv_idx, head=None):
        if head is None:
            raise ValueError(f"{self!r} is per head and needs the head index")
        head = torch.as_tensor(head, device=q_idx.device)
        return self._real_at(q_idx, head) & self._real_at(kv_idx, head)

    def _real_in(self, head, lo, hi):  # real positions in [lo, hi)
        n = self.real.shape[1]
        before = self._before.to(head.device)
        return before[head, hi.clamp(0, n)] - before[head, lo.clamp(0, n)]

    def _count(self, grid, head, qb, kb):
        p0, p1 = grid.q_block_bounds(qb)
        k0, k1 = grid.kv_block_bounds(kb)
        return self._real_in(head, p0, p1) * self._real_in(head, k0, k1)

    def _classify(self, grid, head, qb, kb):
        p0, p1 = grid.q_block_bounds(qb)
        k0, k1 = grid.kv_block_bounds(kb)
        return state_from_count(self._count(grid, head, qb, kb), (p1 - p0) * (k1 - k0))

    def _validate(self, grid):
        if grid.kv_offset != 0 or max(grid.q_end, grid.kv_end) > self.real.shape[1]:
            raise ValueError(f"{self!r} covers positions 0..{self.real.shape[1] - 1}, asked for queries up to "
                             f"{grid.q_end - 1} and keys up to {grid.kv_end - 1}")

    def __repr__(self):
        return f"real_pairs({self.real.shape[0]} heads x {self.real.shape[1]} positions)"


def _attend_folded(q, k, v, selection, picks, key_real, block_size, causal, always, scale, backend, q_offset,
                   deterministic):
    """Batch folded into heads: one sparse_attention call with a (B * Hq)-head pattern."""
    bsz, hq, nq, d = q.shape
    hkv, nkv = k.shape[1], k.shape[2]
    q, k, v = (q.reshape(1, bsz * hq, nq, d), k.reshape(1, bsz * hkv, nkv, d),
               v.reshape(1, bsz * hkv, nkv, v.shape[3]))
    if nq == 0 or nkv == 0:  # nothing to select from: full() gives the empty / zero rows
        target = full_pattern()
    elif key_real is not None:
        # pad keys out of the selected blocks and of `always`, pad query rows empty. The layouts
        # built straight from the selection know no pads: this one is classified from the
        # pattern (it reads the selection back to the host, on every backend)
        target = selection_pattern(selection, block_size, nq, nkv, q_offset, causal=causal, always=always)
        target = target & _RealPairs(key_real.repeat_interleave(hq, dim=0))  # heads b * Hq + h
    else:
        target = selection_pattern(selection, block_size, nq, nkv, q_offset, causal=causal, always=always)
        call = AttentionCall.of(q, k, v, target, q_offset, False, deterministic)
        block_q, block_kv = select(call, backend).block_sizes(call)
        if always is None and block_q == block_kv and block_size % block_q == 0 and q_offset % block_q == 0:
            # the layout straight from the selection: on the device with no host read where the
            # block counts allow it, else from the selection table (reads counts back)
            grid = BlockGrid(nq, nkv, q_offset, block_q, block_kv, q.device)
            layout = device_selection_layout(selection, picks, target, block_size, grid, causal=causal)
            target = layout if layout is not None else selection_layout(selection, target, block_size, grid,
                                                                        causal=causal)
    out = sparse_attention(q, k, v, target, scale=scale, backend=backend, q_offset=q_offset,
                           deterministic=deterministic)
    return out.reshape(bsz, hq, nq, v.shape[3])


def block_topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, top_k_blocks: int = 8, block_size: int = 64,
                         *, causal: bool = False, always: Pattern | None = None, scale: float | None = None,
                         backend: str = "auto", q_offset: int | None = None, return_selection: bool = False,
                         deterministic: bool | None = None, key_padding_mask: torch.Tensor | None = None):
    """Block top-k attention: each query block attends to its top_k_blocks kv blocks (chosen by
    `select_kv_blocks`) and to whatever the fixed pattern `always` allows.

    Args:
        q: (B, Hq, Nq, D); k: (B, Hkv, Nkv, D); v: (B, Hkv, Nkv, Dv); Hq % Hkv == 0 (GQA).
        top_k_blocks: kv blocks per query block (>= 1; default 8); with causal the query block's
            own block is one of them. Covering every block gives dense (causal) attention.
        block_size: tokens per selection block (any int >= 1; the backend picks its own kernel
            blocks, which need not match).
        causal: a query at position i sees only keys at positions <= i (inside the selected
            blocks too, and in `always`).
        always: a fixed `Pattern` added to the selection, e.g. `patterns.streaming(4, 256)`
            or `patterns.sliding_window(256)`; a per-head one must have Hq heads.
        scale: score scale, default 1/sqrt(D).
        backend: as in `sparse_attention` ("auto": `blocked` on CPU, `triton` on CUDA).
        q_offset: absolute position of the first query; default Nkv - Nq.
        return_selection: also return the selection, bool (B, Hq, NQB, NKB).
        deterministic: as in `sparse_attention` (which backward the block backend runs).
        key_padding_mask: bool (B, Nkv), True = a real key; needs the queries on key indices
            (q_offset + Nq <= Nkv). Pad tokens take no part: block means are over real tokens
            only, a kv block with no real key is never selected (nor counted against
            top_k_blocks), pad keys are never attended (in selected blocks and in `always`, e.g.
            streaming sinks, alike) and query rows on pad indices return 0 with zero gradients.
            Blocks stay cut at absolute indices, so a padded row is in general NOT the row
            alone (left padding, or holes, cut its tokens into other blocks). What holds: the
            result is the naive reference's for the same mask (`naive.select_kv_blocks_naive`
            / `block_topk_attention_naive` with `key_padding_mask=`); pad positions' q, k, v
            can hold any finite values without changing the real rows' outputs, their
            gradients or the selection (exactly); an all-True mask gives the unmasked result;
            and right padding (real tokens at indices 0..n-1, any n, Nq = Nkv) gives the row
            alone at its real rows: its blocks sit where they sit alone and its last real
            block is averaged over its real tokens, as the ragged last block alone. The last
            two up to float rounding. With a mask the attention's layout is classified from the
            pattern (the selection is read back to the host), on CPU and on CUDA alike (the
            selection kernel takes the masked scores; the no-host-read device layout is for
            unmasked calls only).

    Returns:
        out (B, Hq, Nq, Dv), or (out, selection). Gradients flow to q, k, v through the
        attention; the selection is not differentiated.
    """
    check_bool("causal", causal)
    check_bool("return_selection", return_selection)
    if always is not None and not isinstance(always, Pattern):
        raise TypeError(f"always must be a sparse_attn Pattern or None, got {type(always).__name__}")
    _, q_offset, scale = check_inputs(q, k, v, causal_pattern() if causal else full_pattern(), scale, q_offset,
                                      backend)
    if always is not None and always.num_heads is not None and always.num_heads != q.shape[1]:
        raise ValueError(f"always is defined for {always.num_heads} heads but q has {q.shape[1]} heads")
    if always is not None:  # the batch is folded into heads below, where b would always be 0
        always.check_batch(q.shape[0], q.device)
    check_int("top_k_blocks", top_k_blocks, 1)
    check_int("block_size", block_size, 1)
    key_real = _check_key_real(key_padding_mask, k, q.shape[2], q_offset)
    selection, picks = _select(q, k, top_k_blocks, block_size, causal, q_offset, key_real)
    args = (block_size, causal, always, scale, backend, q_offset, deterministic)
    if always is not None and always.num_heads is not None and q.shape[0] > 1:
        # a per-head `always` has Hq heads, not B * Hq: one call per batch element
        out = torch.cat([_attend_folded(q[b:b + 1], k[b:b + 1], v[b:b + 1], selection[b:b + 1], picks[b:b + 1],
                                        None if key_real is None else key_real[b:b + 1], *args)
                         for b in range(q.shape[0])])
    else:
        out = _attend_folded(q, k, v, selection, picks, key_real, *args)
    return (out, selection) if return_selection else out
