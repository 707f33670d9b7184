"""`blocked`: pure-torch block-sparse attention. The CPU default; also runs on CUDA tensors.

For every query block it touches only the kv blocks the layout names and computes a
max-subtracted softmax over them, with the pattern's element mask applied where blocks are
partial. Memory is O(rows in flight x touched keys), never O(Nq x Nkv).

How it stays fast on a CPU (where FlexAttention is a compiled C++ loop):

* rows (query blocks) with the same number of (partial, full) kv blocks form a *group*;
  a group is processed a chunk at a time with batched matmuls, into reused workspaces
  (fresh large allocations cost page faults on every call);
* within a group, runs of kv blocks that advance by a fixed step from one query block to the
  next (sliding windows, dilated bands, global columns, sinks, full rows) are read through
  strided views - no gather; only irregular runs (BigBird's random blocks) are gathered;
* the score scale is folded into the matmul (baddbmm's alpha); masks are per slot: padding
  slots masked whole, full blocks not at all, and element masks only for partial blocks,
  computed once per layout and cached on it (within a memory budget);
* GQA reads each kv head for its query heads without repeating k/v;
* the backward recomputes scores chunk by chunk from the saved log-sum-exp (as
  FlashAttention does), so training memory stays bounded too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import FLOAT_DTYPES, Backend, Capabilities, register

# Score-tile elements per chunk (4 bytes each in fp32).
_TILE_BUDGET = 1 << 20
# Element masks are cached on the layout up to this many bools (per layout).
_MASK_CACHE_BUDGET = 1 << 26
# Distinct (partial, full) block-count signatures before rows are bucketed by padding.
_MAX_GROUPS = 12


@dataclass
class _Segment:
    """Columns [c0, c1) of a group's slots. If `base` is set, row r reads kv blocks
    base + r * step + [0, c1 - c0): a strided view, no gather (step 0: the same blocks for
    every row, as global columns or sinks)."""

    c0: int
    c1: int
    base: int | None = None
    step: int = 0


@dataclass
class _Group:
    head: torch.Tensor  # [G] layout head of each row (0 for a shared layout)
    q_block: torch.Tensor  # [G]
    kv_block: torch.Tensor  # [G, T] ascending kv blocks of each row (padding included)
    padding: torch.Tensor | None  # [G, T] True on padding slots (masked whole), None if none
    masked_row: torch.Tensor  # [M] rows (ascending) of the slots that need an element mask:
    masked_slot: torch.Tensor  # [M]   partial blocks, and the ragged last kv block
    q_consecutive: bool  # rows are consecutive query blocks of a shared layout: q by view
    segments: list[_Segment]
    masks: torch.Tensor | None = None  # cached [M, BQ, BK] bool, allowed elements of those slots


class _Plan:
    """Everything about a layout the kernels need, independent of q/k/v values.

    Masking is per slot: padding slots are masked whole (one broadcast), full blocks not at
    all, and only the partial blocks get an element mask - so the mask work and memory are
    O(partial blocks x block area), not O(tile)."""

    def __init__(self, layout) -> None:
        self.layout = layout
        g = layout.grid
        self.shared = layout.num_heads == 1
        self.groups: list[_Group] = []
        cp, cf = layout.partial.counts, layout.full.counts  # [R] per (head, q block)
        rows = torch.arange(cp.numel(), device=g.device)
        exact = torch.unique(torch.stack([cp, cf], 1), dim=0).shape[0] <= _MAX_GROUPS
        # Few distinct (partial, full) counts: one group each, no padding. Otherwise rows are
        # bucketed by total count (at most 25% padding) and padded with neighbouring blocks.
        sig_p, sig_f = (cp, cf) if exact else (torch.zeros_like(cp), _bucket(cp + cf, g.num_kv_blocks))
        sigs = torch.unique(torch.stack([sig_p, sig_f], 1), dim=0)
        ragged_tail = g.kv_len % g.block_kv != 0
        cached = 0
        for p_count, f_count in sigs.tolist():
            width = p_count + f_count
            if width == 0:
                continue  # rows that see nothing: output stays 0, lse -inf
            sel = rows[(sig_p == p_count) & (sig_f == f_count)]
            kv_block, real, partial = _row_slots(layout, sel, width, g.num_kv_blocks)
            needs_elements = real & (partial | ((kv_block == g.num_kv_blocks - 1) & ragged_tail))
            masked_row, masked_slot = needs_elements.nonzero(as_tuple=True)
            qb = sel % g.num_q_blocks
            consecutive = self.shared and (qb.numel() == 1 or bool((qb[1:] - qb[:-1] == 1).all()))
            group = _Group(
                head=torch.div(sel, g.num_q_blocks, rounding_mode="floor"), q_block=qb, kv_block=kv_block,
                padding=None if bool(real.all()) else ~real, masked_row=masked_row, masked_slot=masked_slot,
                q_consecutive=consecutive, segments=_segments(kv_block) if self.shared else [_Segment(0, width)])
            size = masked_row.numel() * g.block_q * g.block_kv
            if size and cached + size <= _MASK_CACHE_BUDGET:
                group.masks = self._element_masks(group, 0, masked_row.numel())
                cached += size
            self.groups.append(group)

    def _element_masks(self, group: _Group, e0: int, e1: int) -> torch.Tensor:
        """[e1 - e0, BQ, BK] bool: allowed elements of masked slots e0..e1."""
        row, slot = group.masked_row[e0:e1], group.masked_slot[e0:e1]
        return self.layout.element_masks(group.head[row], group.q_block[row], group.kv_block[row, slot])

    def apply_masks(self, group: _Group, rows: slice, s: torch.Tensor) -> None:
        """Set disallowed scores of the chunk's tile s [G, BQ, T * BK] to -inf, in place."""
        g = self.layout.grid
        s4 = s.view(s.shape[0], g.block_q, -1, g.block_kv)  # [G, BQ, T, BK]
        if group.padding is not None:
            s4.masked_fill_(group.padding[rows][:, None, :, None], float("-inf"))
        if group.masked_row.numel():
            first = rows.start or 0
            e0, e1 = torch.searchsorted(group.masked_row, torch.tensor([first, rows.stop], device=s.device)).tolist()
            if e1 > e0:
                masks = group.masks[e0:e1] if group.masks is not None else self._element_masks(group, e0, e1)
                r, c = group.masked_row[e0:e1] - first, group.masked_slot[e0:e1]
                s4[r, :, c, :] = s4[r, :, c, :].masked_fill_(~masks, float("-inf"))


def _bucket(count: torch.Tensor, limit: int) -> torch.Tensor:
    """Round counts up to the next of 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, ... (steps of <= 25%)."""
    levels, x = [], 1
    while x < limit:
        levels.append(x)
        x = max(x + 1, int(x * 1.25))
    levels = torch.tensor(levels + [limit], device=count.device)
    return torch.where(count > 0, levels[torch.searchsorted(levels, count)], 0)


def _slots(csr, rows: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[G, width] kv block indices of `rows` in one CSR (padded with 0) and their validity."""
    slot = torch.arange(width, device=rows.device)
    valid = slot[None, :] < csr.counts[rows][:, None]
    if csr.indices.numel() == 0:
        return torch.zeros(rows.numel(), width, dtype=torch.int64, device=rows.device), valid
    pos = torch.clamp(csr.offsets[rows][:, None] + slot[None, :], max=csr.indices.numel() - 1)
    return torch.where(valid, csr.indices[pos].long(), 0), valid


def _row_slots(layout, rows: torch.Tensor, width: int, num_kv_blocks: int):
    """[G, width] ascending kv blocks of each row (full and partial), which are real, and
    which are partial.

    Rows with fewer blocks are padded with the blocks just after their last one (or, at the
    end of the sequence, just before their first), so that runs stay runs and can still be
    read as strided views; padding slots are masked out. Rows from several (partial, full)
    signatures share a group, so `width` may exceed any single CSR's row count."""
    parts = [_slots(csr, rows, int(csr.counts[rows].max()) if rows.numel() else 0)
             for csr in (layout.partial, layout.full)]
    idx = torch.cat([p[0] for p in parts], 1)
    valid = torch.cat([p[1] for p in parts], 1)
    is_partial = torch.cat([torch.ones_like(parts[0][1]), torch.zeros_like(parts[1][1])], 1)
    big = num_kv_blocks + width + 1  # sorts after every real block
    idx = torch.where(valid, idx, big)
    if idx.shape[1] < width:
        extra = width - idx.shape[1]
        idx = torch.nn.functional.pad(idx, (0, extra), value=big)
        is_partial = torch.nn.functional.pad(is_partial, (0, extra), value=False)
    idx, order = torch.sort(idx, dim=1)
    idx, n_real = idx[:, :width], valid.sum(1, keepdim=True)  # real blocks first, then padding
    is_partial = is_partial.gather(1, order)[:, :width]
    slot = torch.arange(width, device=rows.device)[None, :]
    last = idx.gather(1, (n_real - 1).clamp(min=0))
    first = idx[:, :1]
    after = torch.clamp(num_kv_blocks - 1 - last, min=0)  # room after the last real block
    k = slot - n_real  # 0, 1, ... on padding slots
    # rows with holes may run out of room at both ends: repeating a block is harmless, since
    # padding slots are masked (probability 0, no gradient)
    pad = torch.where(k < after, last + 1 + k, first - 1 - (k - after)).clamp(0, num_kv_blocks - 1)
    is_real = (slot < n_real).expand_as(idx)
    idx, order = torch.sort(torch.where(is_real, idx, pad), dim=1, stable=True)
    return idx, is_real.gather(1, order), (is_partial & is_real).gather(1, order)


def _segments(kv_block: torch.Tensor) -> list[_Segment]:
    """Split slot columns into runs readable as strided views (column c of row r is
    base + r * step + offset) and, between them, runs that must be gathered."""
    g, t = kv_block.shape
    base = kv_block[0]  # [T]
    step = kv_block[1] - kv_block[0] if g > 1 else torch.zeros_like(base)
    rows = torch.arange(g, device=kv_block.device)[:, None]
    # a view needs a non-negative stride: runs that move backwards are gathered
    affine = ((kv_block == base + rows * step).all(0) & (step >= 0)).tolist()
    base, step = base.tolist(), step.tolist()
    segments: list[_Segment] = []
    for c in range(t):
        last = segments[-1] if segments else None
        if affine[c]:
            if last and last.base is not None and step[c] == last.step and base[c] == last.base + (c - last.c0):
                last.c1 = c + 1
            else:
                segments.append(_Segment(c, c + 1, base[c], step[c]))
        elif last and last.base is None:
            last.c1 = c + 1
        else:
            segments.append(_Segment(c, c + 1))
    return segments


def get_plan(layout) -> _Plan:
    return layout.cached("blocked", lambda: _Plan(layout))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pad_rows(x: torch.Tensor, block: int, dtype) -> torch.Tensor:
    """[B, H, N, E] -> [B, H, ceil(N / block) * block, E] contiguous, zero-padded, compute dtype."""
    n = x.shape[2]
    x = x.to(dtype).contiguous()
    extra = -(-n // block) * block - n
    return torch.nn.functional.pad(x, (0, 0, 0, extra)) if extra else x


class _Workspace:
    """Reused buffers: one allocation per call instead of one per chunk."""

    def __init__(self, device, dtype) -> None:
        self.device, self.dtype = device, dtype
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, *shape: int) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < n:
            buf = self.buffers[name] = torch.empty(n, dtype=self.dtype, device=self.device)
        return buf[:n].view(*shape)


class _Tiles:
    """Reads one chunk of a group's rows for one (batch, head) slab.

    Slabs are flattened rows: q-side [Hs * NQB * BQ, E], kv-side [Hs * NKB * BK, E], where Hs
    is 1 for a shared layout (one slab per head) or all heads for a per-head layout.
    """

    def __init__(self, plan: _Plan, group: _Group, rows: slice, head: int | None, rep: int) -> None:
        g = plan.layout.grid
        self.bq, self.bk = g.block_q, g.block_kv
        self.group, self.rows = group, rows
        self.first_row = rows.start or 0
        self.num_rows = group.q_block[rows].numel()
        self.width = group.kv_block.shape[1] * self.bk  # C
        kb = group.kv_block[rows]
        if head is None:  # per-head layout: rows carry their own head
            h = group.head[rows]
            self.q_index = h * g.num_q_blocks + group.q_block[rows]
            kb = (torch.div(h, rep, rounding_mode="floor") * g.num_kv_blocks)[:, None] + kb
        else:
            self.q_index = group.q_block[rows]
        self.kv_index = [kb[:, s.c0 : s.c1].reshape(-1) for s in group.segments]
        self.q_start = int(group.q_block[self.first_row]) * self.bq

    def columns(self, seg: _Segment) -> slice:
        return slice(seg.c0 * self.bk, seg.c1 * self.bk)

    def q_side(self, x: torch.Tensor, ws, name: str) -> torch.Tensor:
        """[G, BQ, E] rows of the slab x (a view when the rows are consecutive)."""
        e = x.shape[-1]
        if self.group.q_consecutive:
            return x[self.q_start : self.q_start + self.num_rows * self.bq].view(self.num_rows, self.bq, e)
        out = ws.get(name, self.num_rows, self.bq, e)
        torch.index_select(x.view(-1, self.bq, e), 0, self.q_index, out=out)
        return out

    def put_q_side(self, x: torch.Tensor, value: torch.Tensor) -> None:
        """Write [G, BQ, E] into the slab (nothing to do when `value` is already its view)."""
        if not self.group.q_consecutive:
            x.view(-1, self.bq, x.shape[-1]).index_copy_(0, self.q_index, value)
            return
        view = self.q_side(x, None, "")
        if view.data_ptr() != value.data_ptr():
            view.copy_(value)

    def kv_side(self, x: torch.Tensor, ws, name: str) -> list[torch.Tensor]:
        """Per segment, [G, width * BK, E] keys/values of the chunk's rows."""
        e = x.shape[-1]
        out = []
        for i, seg in enumerate(self.group.segments):
            n = seg.c1 - seg.c0
            if seg.base is not None:
                first = seg.base + self.first_row * seg.step
                out.append(x.as_strided((self.num_rows, n * self.bk, e), (seg.step * self.bk * e, e, 1),
                                        x.storage_offset() + first * self.bk * e))
            else:
                buf = ws.get(f"{name}{i}", self.num_rows * n, self.bk, e)
                torch.index_select(x.view(-1, self.bk, e), 0, self.kv_index[i], out=buf)
                out.append(buf.view(self.num_rows, n * self.bk, e))
        return out

    def add_kv_side(self, x: torch.Tensor, seg_index: int, value: torch.Tensor) -> None:
        """Accumulate one segment's [G, width * BK, E] into the slab (rows overlap: index_add)."""
        e = x.shape[-1]
        x.view(-1, self.bk, e).index_add_(0, self.kv_index[seg_index], value.reshape(-1, self.bk, e))


def _chunks(plan: _Plan, group: _Group) -> list[slice]:
    g = plan.layout.grid
    per_row = g.block_q * group.kv_block.shape[1] * g.block_kv
    step = max(1, _TILE_BUDGET // per_row)
    n = group.q_block.numel()
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def _slabs(plan: _Plan, batch: int, heads_q: int, heads_kv: int):
    """(batch, q head or None, kv head or None) slabs: a shared layout loops over heads; a
    per-head layout handles all heads of a batch entry at once (rows carry their head)."""
    rep = heads_q // heads_kv
    for b in range(batch):
        if plan.shared:
            for h in range(heads_q):
                yield b, h, h // rep
        else:
            yield b, None, None


def _slab(x: torch.Tensor, b: int, h: int | None) -> torch.Tensor:
    """[B, H, N, E] -> the flattened rows of one slab: [N, E] or [H * N, E]."""
    return x[b, h] if h is not None else x[b].reshape(-1, x.shape[-1])


def _rows_times_cols(t: _Tiles, rows: torch.Tensor, cols: list[torch.Tensor], alpha: float, ws, name: str):
    """[G, BQ, C] = alpha * rows @ cols^T, one matmul per segment (a strided `out` slice would
    make torch fall back to a slow path, so extra segments go through a workspace)."""
    out = ws.get(name, t.num_rows, t.bq, t.width)
    if len(cols) == 1:
        return torch.baddbmm(out, rows, cols[0].transpose(1, 2), beta=0.0, alpha=alpha, out=out)
    for seg, c in zip(t.group.segments, cols):
        part = ws.get(name + "_part", t.num_rows, t.bq, c.shape[1])
        torch.baddbmm(part, rows, c.transpose(1, 2), beta=0.0, alpha=alpha, out=part)
        out[:, :, t.columns(seg)].copy_(part)
    return out


def _probs_times_cols(t: _Tiles, p: torch.Tensor, cols: list[torch.Tensor], out: torch.Tensor, alpha: float = 1.0):
    """out [G, BQ, E] = alpha * sum over segments of p[:, :, segment] @ cols[segment]."""
    for i, (seg, c) in enumerate(zip(t.group.segments, cols)):
        torch.baddbmm(out, p[:, :, t.columns(seg)], c, beta=0.0 if i == 0 else 1.0, alpha=alpha, out=out)
    return out


def _scores(t: _Tiles, plan, q_rows, k_cols, scale, ws) -> torch.Tensor:
    s = _rows_times_cols(t, q_rows, k_cols, scale, ws, "s")  # [G, BQ, C]
    plan.apply_masks(t.group, t.rows, s)
    return s


def blocked_forward(q, k, v, plan: _Plan, scale: float):
    """Returns out [B, Hq, Nq, Dv] (input dtype) and lse [B, Hq, Nq] (compute dtype)."""
    g = plan.layout.grid
    bsz, hq, nq, _ = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    cdt = _compute_dtype(q.dtype)
    qp = _pad_rows(q, g.block_q, cdt)
    kp, vp = _pad_rows(k, g.block_kv, cdt), _pad_rows(v, g.block_kv, cdt)
    out = torch.zeros(bsz, hq, qp.shape[2], dv, dtype=cdt, device=q.device)
    lse = torch.full((bsz, hq, qp.shape[2], 1), float("-inf"), dtype=cdt, device=q.device)
    ws = _Workspace(q.device, cdt)
    for group in plan.groups:
        for rows in _chunks(plan, group):
            for b, h, hk in _slabs(plan, bsz, hq, hkv):
                t = _Tiles(plan, group, rows, h, hq // hkv)
                out_s, lse_s = _slab(out, b, h), _slab(lse, b, h)
                s = _scores(t, plan, t.q_side(_slab(qp, b, h), ws, "q"), t.kv_side(_slab(kp, b, hk), ws, "k"), scale, ws)
                m = s.amax(-1, keepdim=True)  # [G, BQ, 1]
                m.masked_fill_(torch.isinf(m), 0.0)  # rows with nothing allowed
                p = s.sub_(m).exp_()
                l = p.sum(-1, keepdim=True)
                o = _probs_times_cols(t, p, t.kv_side(_slab(vp, b, hk), ws, "v"), t.q_side(out_s, ws, "o"))
                o.div_(l.clamp(min=torch.finfo(cdt).tiny))
                t.put_q_side(out_s, o)
                t.put_q_side(lse_s, m.add_(l.log_()))
    return out[:, :, :nq].to(q.dtype), lse[:, :, :nq, 0]


def blocked_backward(q, k, v, out, lse, dout, dlse, plan: _Plan, scale: float):
    g = plan.layout.grid
    bsz, hq, nq, _ = q.shape
    hkv = k.shape[1]
    cdt = _compute_dtype(q.dtype)
    qp = _pad_rows(q, g.block_q, cdt)
    kp, vp = _pad_rows(k, g.block_kv, cdt), _pad_rows(v, g.block_kv, cdt)
    dop = _pad_rows(dout, g.block_q, cdt)
    delta = (dout.to(cdt) * out.to(cdt)).sum(-1, keepdim=True)  # [B, Hq, Nq, 1]
    if dlse is not None:
        delta = delta - dlse.to(cdt)[..., None]  # d lse / d s = p: folds into the same term
    delta = _pad_rows(delta, g.block_q, cdt)
    # rows that saw nothing have lse -inf; +inf turns their probabilities into exp(-inf) = 0
    lse = _pad_rows(torch.where(torch.isinf(lse), float("inf"), lse)[..., None], g.block_q, cdt)
    dq, dk, dv = torch.zeros_like(qp), torch.zeros_like(kp), torch.zeros_like(vp)
    ws = _Workspace(q.device, cdt)
    for group in plan.groups:
        for rows in _chunks(plan, group):
            for b, h, hk in _slabs(plan, bsz, hq, hkv):
                t = _Tiles(plan, group, rows, h, hq // hkv)
                q_r, do_r = t.q_side(_slab(qp, b, h), ws, "q"), t.q_side(_slab(dop, b, h), ws, "do")
                k_c, v_c = t.kv_side(_slab(kp, b, hk), ws, "k"), t.kv_side(_slab(vp, b, hk), ws, "v")
                p = _scores(t, plan, q_r, k_c, scale, ws)
                p.sub_(t.q_side(_slab(lse, b, h), ws, "lse")).exp_()  # [G, BQ, C]
                dv_s, dk_s = _slab(dv, b, hk), _slab(dk, b, hk)
                for i, seg in enumerate(group.segments):
                    t.add_kv_side(dv_s, i, torch.bmm(p[:, :, t.columns(seg)].transpose(1, 2), do_r))
                dp = _rows_times_cols(t, do_r, v_c, 1.0, ws, "dp")
                ds = p.mul_(dp.sub_(t.q_side(_slab(delta, b, h), ws, "delta")))
                dq_s = _slab(dq, b, h)
                t.put_q_side(dq_s, _probs_times_cols(t, ds, k_c, t.q_side(dq_s, ws, "dq"), alpha=scale))
                for i, seg in enumerate(group.segments):
                    t.add_kv_side(dk_s, i, torch.bmm(ds[:, :, t.columns(seg)].transpose(1, 2), q_r).mul_(scale))
    return (dq[:, :, :nq].to(q.dtype), dk[:, :, : k.shape[2]].to(k.dtype), dv[:, :, : v.shape[2]].to(v.dtype))


class _BlockedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        out, lse = blocked_forward(q, k, v, plan, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = blocked_backward(q, k, v, out, lse, dout, dlse, ctx.plan, ctx.scale)
        need = ctx.needs_input_grad
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None, None)


class BlockedBackend(Backend):
    name = "blocked"
    caps = Capabilities(
        devices=frozenset({"cpu", "cuda"}),
        dtypes=FLOAT_DTYPES,
        grads=True,
        gqa=True,
        deterministic=True,
        notes="pure torch; touches only the layout's blocks (strided views for regular runs); recomputing "
              "backward (deterministic on CPU; CUDA index_add_ uses atomics)",
    )

    def block_sizes(self, call):
        if call.device_type != "cpu":
            return 128, 128
        # On a CPU, 32 wastes least at band edges and still feeds the matmuls well (measured:
        # window 256 at 16K, 32 beats 64 by ~15%); block-defined patterns (BigBird, block-sparse
        # cells of >= 64) run best on 64-blocks aligned with their cells.
        natural = call.pattern.natural_block()
        block = 64 if natural is not None and natural % 64 == 0 else 32
        return block, block

    def extra_reasons(self, call):
        if call.deterministic and call.requires_grad and call.device_type == "cuda" and \
                not torch.are_deterministic_algorithms_enabled():
            return ["backward on CUDA sums with index_add_ (atomics): deterministic only under "
                    "torch.use_deterministic_algorithms(True)"]
        return []

    def forward(self, q, k, v, layout, scale, return_lse, *, deterministic=None):
        plan = get_plan(layout)
        out, lse = _BlockedAttention.apply(q, k, v, plan, scale)
        return out, (lse if return_lse else None)


    def backward_from_stats(self, q, k, v, layout, scale, out, lse, dout, dlse=None):
        # blocked_backward reads only the saved (out, lse): given the whole attention's, it is
        # exactly this part's share of the gradients
        return blocked_backward(q, k, v, out, lse, dout, dlse, get_plan(layout), scale)


register(BlockedBackend())
