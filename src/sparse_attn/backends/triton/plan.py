"""What the kernels need from a BlockLayout, built once per layout and cached on it.

How a pattern reaches the kernel: as data, never as code. The layout's CSR arrays name the
kv blocks of each (head, query block) row; full blocks need no mask; each partial block gets
a bitmask of its LBQ x LBK elements, computed once per layout from `pattern.allowed` (and
`kv_pos < kv_len`, so the ragged last kv block is handled by the same bits).

Why bitmasks and not an analytic form per pattern family (e.g. per-row [lo, hi) ranges for
windows): one kernel then serves every pattern, combinator and per-head layout, including
the ones whose partial blocks are not intervals per row (a window's edge block that also
holds Longformer globals, BigBird blocks finer than the kernel's blocks, documents, user
predicates), with no per-pattern kernel code to keep exact. The price is small where speed
matters: partial blocks are the edges of a pattern (2 of the ~33 blocks of a query row of a
4096-window at 128-blocks), and a mask is a cached 2 KiB per 128x128 block, stored once per
distinct content: every diagonal block of a band has the same mask, so a layout keeps a
handful of masks however long the sequence (16 heads of different windows at 32K in
128-blocks: 11478 partial blocks, 33 distinct masks, 66 KiB instead of 22.4 MiB). Building
them evaluates one block per known mask class: block top-k's layouts name their classes, and
patterns with an exact block signature (`Pattern.block_signature`: bands, row and column sets,
their unions and intersections) one per distinct signature, so a window's plan does not grow
with the length, nor Longformer's beyond the blocks that hold its global rows or columns.

Bitmask format: int32 words, [n_masks, LBQ, ceil(LBK / 32)], bit (col % 32) of word
(col // 32) set when query row r of the block may see key col; the n_masks distinct masks
of the layout's partial blocks. Packed bits rather than
uint8: dense-ish partial patterns (BigBird, dilated, block-sparse with odd cells, document
masks) can make nearly every touched block partial; packed, a block costs 8x less memory
and 8x less mask traffic, and unpacking is one shift and one AND per score. The mask of CSR
entry j lives at `bits[part_mask[j]]`; the backward's transposed walk carries the mask of
each of its partial blocks (`tpart_mask`).
"""

from __future__ import annotations

import torch

from ..._lru import LRU

# Elements of [chunk, LBQ, LBK] evaluated at once when building the bitmasks (bounded memory).
_MASK_CHUNK_ELEMENTS = 1 << 22
# Partial blocks whose block signatures are computed at once (positions [chunk, 128] int64: 32 MiB).
_SIGNATURE_CHUNK = 1 << 15
# Packed class masks of layouts that declare a `mask_class_key`, reused across layouts (block
# top-k builds a layout per call; evaluating its diagonal classes from the selection pattern was
# ~56 small device ops per call). Bounded LRU; the key holds the layout's key, blocks, words, device.
_CLASS_BITS_KEPT = 256
_class_bits = LRU()


def _transposed_attribute(name: str) -> property:
    """A TritonPlan attribute of the transposed walk, built on first access."""
    def get(self):
        self.backward_tensors()
        return self._backward[name]
    return property(get, doc=f"`{name}` of the transposed walk (built on first use).")


class TritonPlan:
    """Layout-derived kernel inputs, on the layout's device (all contiguous).

    Forward / dq (rows = (head, query block)): full_off/full_idx, part_off/part_idx, bits (the
    distinct packed masks) and part_mask (int32, the row of bits of each partial CSR entry).
    dk/dv (columns = (head, kv block)), built on first use (`tensors(backward=True)`), so a
    forward that records no gradient never pays for them: tfull_off/tfull_idx,
    tpart_off/tpart_idx (query block indices), tpart_mask (int32, the row of bits of each
    transposed partial block: what the kernel reads) and kv_block_order.

    Nothing here reads the device back to the host for a layout built on the device with its
    counts known (`BlockLayout.from_csr`: block top-k), so such a plan is queued behind the
    work that made the layout; other layouts decide the schedule flags from their counts.
    """

    def __init__(self, layout) -> None:
        g = layout.grid
        self.layout = layout
        self.words = -(-g.block_kv // 32)
        self.full_off = layout.full.offsets.contiguous()
        self.full_idx = layout.full.indices.contiguous()
        self.part_off = layout.partial.offsets.contiguous()
        self.part_idx = layout.partial.indices.contiguous()
        self.bits, self.part_mask = pack_partial_masks(layout, self.words)
        row_work = (self.full_off.diff() + self.part_off.diff()).reshape(layout.num_heads, g.num_q_blocks).amax(0)
        bounds = layout.work_bounds
        self.q_block_order, self.q_heads_fastest = _schedule(row_work, None if bounds is None else bounds[:2])
        self._backward = None

    def backward_tensors(self) -> list[torch.Tensor]:
        """[tfull_off, tfull_idx, tpart_off, tpart_idx, tpart_mask, kv_block_order]: the
        transposed walk for dk/dv, built once, on first use."""
        if self._backward is None:
            layout, g = self.layout, self.layout.grid
            tfull_off, tfull_idx, _ = _transpose(layout.full, layout)
            tpart_off, tpart_idx, tpart_entry = _transpose(layout.partial, layout)
            tpart_mask = self.part_mask[tpart_entry].contiguous()
            col_work = (tfull_off.diff() + tpart_off.diff()).reshape(layout.num_heads, g.num_kv_blocks).amax(0)
            bounds = layout.work_bounds
            kv_order, kv_heads_fastest = _schedule(col_work, None if bounds is None else bounds[2:])
            self._backward = dict(tfull_off=tfull_off, tfull_idx=tfull_idx, tpart_off=tpart_off, tpart_idx=tpart_idx,
                                  tpart_mask=tpart_mask, kv_block_order=kv_order, tpart_entry=tpart_entry,
                                  kv_heads_fastest=kv_heads_fastest)
        b = self._backward
        return [b["tfull_off"], b["tfull_idx"], b["tpart_off"], b["tpart_idx"], b["tpart_mask"], b["kv_block_order"]]

    tfull_off, tfull_idx, tpart_off, tpart_idx, tpart_mask, kv_block_order, tpart_entry, kv_heads_fastest = (
        _transposed_attribute(n) for n in ("tfull_off", "tfull_idx", "tpart_off", "tpart_idx", "tpart_mask",
                                           "kv_block_order", "tpart_entry", "kv_heads_fastest"))

    def tensors(self, backward: bool = True) -> list[torch.Tensor]:
        """The op's 13 plan arguments; without `backward` the dk/dv ones are empty placeholders
        (the forward kernel does not read them, and no backward will run)."""
        if backward:
            tfull_off, tfull_idx, tpart_off, tpart_idx, tpart_mask, kv_order = self.backward_tensors()
        else:
            none64 = self.full_off.new_empty(0)
            none32 = self.full_idx.new_empty(0)
            tfull_off, tfull_idx, tpart_off, tpart_idx, tpart_mask, kv_order = (none64, none32, none64, none32,
                                                                                 none32, none32)
        return [self.full_off, self.full_idx, self.part_off, self.part_idx, self.bits, self.part_mask,
                self.q_block_order, tfull_off, tfull_idx, tpart_off, tpart_idx, tpart_mask, kv_order]

    def flags(self, backward: bool = True) -> list[bool]:
        """(q_heads_fastest, kv_heads_fastest); the second is False without `backward`."""
        if backward:
            self.backward_tensors()
        return [self.q_heads_fastest, bool(backward and self._backward["kv_heads_fastest"])]


# A layout whose busiest row does more than this many times the mean row's work launches the
# busiest blocks of every head first (heads vary fastest in the grid); balanced layouts keep
# one head's neighbouring query blocks together (they share kv blocks in L2).
IMBALANCE = 4.0


def _schedule(work: torch.Tensor, known: tuple[float, float] | None = None) -> tuple[torch.Tensor, bool]:
    """Blocks in the order the kernel visits them (busiest first, else in order) and whether
    the work is imbalanced enough to put heads fastest: from `known` (max or a bound on it,
    mean), host numbers of a layout built on the device, else read from `work`."""
    order = torch.argsort(-work, stable=True).to(torch.int32).contiguous()
    if known is not None:
        busiest, mean = known
    else:
        mean = float(work.float().mean()) if work.numel() else 0.0
        busiest = float(work.max()) if work.numel() else 0.0
    return order, bool(work.numel() and busiest > IMBALANCE * max(mean, 1e-9))


def _transpose(csr, layout):
    """CSR over (head, kv block) columns: offsets [H * NKB + 1] int64, query block indices
    [nnz] int32, and the original CSR entry of each [nnz] int64. A stable sort by column keeps
    each column's query blocks ascending (the CSR is row-major), and the offsets come from
    searchsorted, not bincount, so nothing is read back to the host. O(nnz log nnz)."""
    g = layout.grid
    nqb, nkb = g.num_q_blocks, g.num_kv_blocks
    head = torch.div(csr.rows, nqb, rounding_mode="floor")
    qb = csr.rows % nqb
    col = head * nkb + csr.indices.long()
    sorted_col, order = torch.sort(col, stable=True)
    bounds = torch.arange(layout.num_heads * nkb + 1, device=col.device, dtype=sorted_col.dtype)
    offsets = torch.searchsorted(sorted_col, bounds)  # first entry of each column, and nnz at the end
    return offsets.contiguous(), qb[order].to(torch.int32).contiguous(), order.contiguous()


def pack_partial_masks(layout, words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bits, part_mask): int32 [max(n_masks, 1), LBQ, words], the distinct packed element masks
    of the partial blocks, and int32 [n_partial], the row of `bits` of each partial CSR entry.

    Masks are evaluated in chunks of blocks and deduplicated by content, chunk by chunk and
    then across chunks, so memory stays O(distinct masks + one chunk), not O(partial blocks).
    A layout's `partial_mask_class` (blocks known to share a mask) also saves evaluations."""
    g = layout.grid
    csr = layout.partial
    n = csr.indices.numel()
    dev = g.device
    bq, bk = g.block_q, g.block_kv
    if n == 0:
        return (torch.zeros(1, bq, words, dtype=torch.int32, device=dev),
                torch.zeros(0, dtype=torch.int32, device=dev))
    if layout.mask_class_blocks is not None:  # classes 0..n-1 with a block each: no deduplication
        return _class_bits_of(layout, words), layout.partial_mask_class.to(torch.int32).contiguous()
    pattern = layout._require_pattern()
    pattern.prepare(dev)
    entries, inverse = None, None  # the CSR entries whose masks are evaluated (None: all of them)
    known = layout.partial_mask_class
    if known is None and pattern.num_heads is None:
        known = _signature_classes(layout, pattern)
    if known is not None:  # one evaluation per class, then a gather
        classes, inverse = torch.unique(known, return_inverse=True)
        first = torch.full((classes.numel(),), n, dtype=torch.int64, device=dev)
        entries = first.scatter_reduce_(0, inverse, torch.arange(n, device=dev), "amin")
        n = classes.numel()
    chunk = max(1, _MASK_CHUNK_ELEMENTS // (bq * bk))
    uniques, local = [], []  # per chunk: its distinct masks, and each evaluated block's index among all of them
    seen = 0
    for e0 in range(0, n, chunk):
        e1 = min(n, e0 + chunk)
        pick = slice(e0, e1) if entries is None else entries[e0:e1]
        r = csr.rows[pick]
        ok = layout.element_masks(torch.div(r, g.num_q_blocks, rounding_mode="floor"), r % g.num_q_blocks,
                                  csr.indices[pick].long())  # [c, LBQ, LBK]
        packed = _pack(ok, words, weights_device=dev)  # [c, LBQ, words]
        u, inv = torch.unique(packed.reshape(e1 - e0, bq * words), dim=0, return_inverse=True)
        uniques.append(u)
        local.append(inv + seen)
        seen += u.shape[0]
    bits, across = torch.unique(torch.cat(uniques), dim=0, return_inverse=True)  # [n_masks, LBQ * words]
    mask = across[torch.cat(local)]  # [n] evaluated block -> row of bits
    if inverse is not None:
        mask = mask[inverse]
    return bits.reshape(-1, bq, words).contiguous(), mask.to(torch.int32).contiguous()


def _class_bits_of(layout, words: int) -> torch.Tensor:
    """The packed masks at `layout.mask_class_blocks`, from the cache when the layout declares a
    `mask_class_key` (its builder's promise that they depend on nothing else)."""
    g = layout.grid
    key = None
    if layout.mask_class_key is not None:
        key = (layout.mask_class_key, g.block_q, g.block_kv, words, str(g.device))
        bits = _class_bits.recall(key)
        if bits is not None:
            return bits
    layout._require_pattern().prepare(g.device)
    head, q_block, kv_block = layout.mask_class_blocks.unbind(1)
    bits = _pack(layout.element_masks(head, q_block, kv_block), words, weights_device=g.device)
    if key is not None:
        _class_bits.keep(key, bits, _CLASS_BITS_KEPT)
    return bits


def _signature_classes(layout, pattern) -> torch.Tensor | None:
    """int64 [n_partial]: a mask class per partial block, from the pattern's exact block
    signature (`Pattern.block_signature`: band offsets, global rows / columns met) and the
    block's real rows and keys (the ragged last blocks); None when the pattern has none.
    A window's partial blocks at any length fall into a handful of classes, Longformer's into
    a few more (the blocks holding global rows or columns)."""
    g = layout.grid
    csr = layout.partial
    signatures = []
    for e0 in range(0, csr.indices.numel(), _SIGNATURE_CHUNK):  # positions are [chunk, BQ | BK] int64
        r = csr.rows[e0:e0 + _SIGNATURE_CHUNK]
        q_start = (r % g.num_q_blocks) * g.block_q  # relative to the first query
        kv_start = csr.indices[e0:e0 + _SIGNATURE_CHUNK].long() * g.block_kv
        q_pos = torch.clamp(q_start[:, None] + torch.arange(g.block_q, device=g.device), max=g.q_len - 1) + g.q_offset
        kv_pos = torch.clamp(kv_start[:, None] + torch.arange(g.block_kv, device=g.device),
                             max=g.kv_len - 1) + g.kv_offset
        sig = pattern.block_signature(q_pos, kv_pos)
        if sig is None:
            return None
        real = torch.stack([torch.clamp(g.q_len - q_start, max=g.block_q),
                            torch.clamp(g.kv_len - kv_start, max=g.block_kv)], dim=1)  # [c, 2]
        signatures.append(torch.cat([real, sig], dim=1))
    if not signatures:
        return None
    return torch.unique(torch.cat(signatures), dim=0, return_inverse=True)[1]


def _pack(ok: torch.Tensor, words: int, *, weights_device) -> torch.Tensor:
    """bool [n, LBQ, LBK] element masks -> int32 [n, LBQ, words] packed bits (see the module
    docstring)."""
    n, bq, bk = ok.shape
    if bk < words * 32:
        ok = torch.nn.functional.pad(ok, (0, words * 32 - bk))
    # weights of the 32 bits of a word, as int64 so the sum does not overflow
    weights = torch.ones(1, dtype=torch.int64, device=weights_device) << torch.arange(32, device=weights_device)
    packed = (ok.reshape(n, bq, words, 32).long() * weights).sum(-1)  # [n, LBQ, words] in [0, 2^32)
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed)  # two's complement int32
    return packed.to(torch.int32).contiguous()


def get_plan(layout) -> TritonPlan:
    return layout.cached("triton", lambda: TritonPlan(layout))
