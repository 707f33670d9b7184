"""`blocked`: pure-torch block-sparse attention. The CPU default; also runs on CUDA tensors.

For every query block it gathers only the kv blocks the layout names and computes a
max-subtracted softmax over them: full blocks with no mask work, partial blocks with the
pattern's element mask (precomputed once per layout and cached on it). Memory is
O(rows in flight x touched keys), never O(Nq x Nkv):

* rows with the same number of (partial, full) blocks form a group and are processed a
  chunk at a time, so the score tile stays within a fixed budget;
* GQA without repeating k/v: with a head-shared layout the query heads that share a kv head
  are stacked along the row axis of one matmul;
* the backward recomputes the scores chunk by chunk from the saved log-sum-exp (as
  FlashAttention does) instead of keeping probabilities, so training memory stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import FLOAT_DTYPES, Backend, Capabilities, register

# Score-tile elements per chunk (fp32: 4 bytes each). Large enough for efficient matmuls,
# small enough to stay in cache-friendly territory and bound the forward's peak memory.
_TILE_BUDGET = 1 << 21
# Precomputed partial-block masks are cached on the layout up to this many elements.
_MASK_CACHE_BUDGET = 1 << 28
# Distinct (partial, full) block-count signatures before rows are bucketed by padding.
_MAX_GROUPS = 12


@dataclass
class _Group:
    head: torch.Tensor  # [G] layout head of each row (0 for a shared layout)
    q_block: torch.Tensor  # [G]
    kv_block: torch.Tensor  # [G, P + F] partial slots first, then full
    num_partial: int  # P
    full_valid: torch.Tensor  # [G, F * BK] bool: padded slots and keys past kv_len are False
    partial_valid: torch.Tensor  # [G, P] bool: padded partial slots are False
    partial_mask: torch.Tensor | None = None  # [G, BQ, P * BK] bool; None: computed per chunk


class _Plan:
    """Everything about a layout the kernel needs, independent of q/k/v values."""

    def __init__(self, layout) -> None:
        self.layout = layout
        g = layout.grid
        self.shared = layout.num_heads == 1
        self.groups: list[_Group] = []
        cp, cf = layout.partial.counts, layout.full.counts  # [R]
        rows = torch.arange(cp.numel(), device=g.device)
        sig_p, sig_f = cp, cf
        sigs = torch.unique(torch.stack([sig_p, sig_f], 1), dim=0)
        if sigs.shape[0] > _MAX_GROUPS:  # bucket: pad counts up to a power of two
            sig_p, sig_f = _round_up_pow2(cp), _round_up_pow2(cf)
            sigs = torch.unique(torch.stack([sig_p, sig_f], 1), dim=0)
        mask_elems = 0
        for p_count, f_count in sigs.tolist():
            if p_count == 0 and f_count == 0:
                continue  # rows that see nothing: output stays 0, lse -inf
            sel = rows[(sig_p == p_count) & (sig_f == f_count)]
            kp, vp = _slots(layout.partial, sel, p_count)
            kf, vf = _slots(layout.full, sel, f_count)
            head = torch.div(sel, g.num_q_blocks, rounding_mode="floor")
            qb = sel % g.num_q_blocks
            kv_block = torch.cat([kp, kf], 1)
            key_ok = _key_in_range(kf, g)  # [G, F, BK]
            full_valid = (vf[:, :, None] & key_ok).reshape(sel.numel(), -1)
            group = _Group(head, qb, kv_block, p_count, full_valid, vp)
            mask_elems += sel.numel() * g.block_q * p_count * g.block_kv
            if p_count and mask_elems <= _MASK_CACHE_BUDGET:
                group.partial_mask = self.partial_mask(group, slice(None))
            self.groups.append(group)

    def partial_mask(self, group: _Group, rows: slice) -> torch.Tensor:
        """Element mask of the partial slots: [G, BQ, P * BK] bool."""
        if group.partial_mask is not None:
            return group.partial_mask[rows]
        g = self.layout.grid
        slot_valid = group.partial_valid[rows]
        qb, kb = group.q_block[rows], group.kv_block[rows, : group.num_partial]
        q_row = qb[:, None] * g.block_q + torch.arange(g.block_q, device=g.device)  # [G, BQ]
        kv = (kb[:, :, None] * g.block_kv + torch.arange(g.block_kv, device=g.device)).reshape(kb.shape[0], -1)
        ok = self.layout.pattern.allowed(q_row[:, :, None] + g.q_offset, kv[:, None, :], group.head[rows, None, None])
        ok = ok & (q_row < g.q_len)[:, :, None] & (kv < g.kv_len)[:, None, :]
        return ok & slot_valid.repeat_interleave(g.block_kv, 1)[:, None, :]


def _round_up_pow2(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, 2 ** torch.ceil(torch.log2(x.clamp(min=1).double())).long(), 0)


def _slots(csr, rows: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[G, width] kv block indices of `rows` (padded with block 0) and their validity."""
    slot = torch.arange(width, device=rows.device)
    valid = slot[None, :] < csr.counts[rows][:, None]
    pos = torch.clamp(csr.offsets[rows][:, None] + slot[None, :], max=max(csr.indices.numel() - 1, 0))
    idx = csr.indices[pos].long() if csr.indices.numel() else torch.zeros_like(pos)
    return torch.where(valid, idx, 0), valid


def _key_in_range(kv_block: torch.Tensor, g) -> torch.Tensor:
    kv = kv_block[:, :, None] * g.block_kv + torch.arange(g.block_kv, device=kv_block.device)
    return kv < g.kv_len


def get_plan(layout) -> _Plan:
    plan = layout.cache.get("blocked")
    if plan is None:
        plan = layout.cache["blocked"] = _Plan(layout)
    return plan


def _blocks(x: torch.Tensor, block: int, dtype) -> torch.Tensor:
    """[B, H, N, D] -> [B, H, ceil(N / block), block, D], zero-padded, in the compute dtype."""
    b, h, n, d = x.shape
    nb = -(-n // block)
    x = x.to(dtype)
    if nb * block != n:
        x = torch.nn.functional.pad(x, (0, 0, 0, nb * block - n))
    return x.reshape(b, h, nb, block, d)


class _Tiles:
    """Gathers the q rows / kv columns of a chunk of one group, in a common shape:
    scores are [B, H', G, X * BQ, C] where, for a shared layout, H' = kv heads and the X = q
    heads per kv head are stacked on the row axis; for a per-head layout H' = X = 1."""

    def __init__(self, plan: _Plan, group: _Group, rows: slice, heads_q: int, heads_kv: int) -> None:
        self.plan, self.group, self.rows = plan, group, rows
        self.qb = group.q_block[rows]
        self.kb = group.kv_block[rows]  # [G, T]
        self.head = group.head[rows]
        self.rep = heads_q // heads_kv
        self.shared = plan.shared
        self.heads_kv = heads_kv

    def rows_of(self, x_blk: torch.Tensor) -> torch.Tensor:
        """q-side tensor [B, Hq, NQB, BQ, E] -> [B, H', G, X * BQ, E]."""
        b, _, _, bq, e = x_blk.shape
        if self.shared:
            t = x_blk[:, :, self.qb]  # [B, Hq, G, BQ, E]
            t = t.reshape(b, self.heads_kv, self.rep, -1, bq, e).transpose(2, 3)
            return t.reshape(b, self.heads_kv, -1, self.rep * bq, e)
        return x_blk[:, self.head, self.qb].unsqueeze(1)  # [B, 1, G, BQ, E]

    def put_rows(self, dst_blk: torch.Tensor, value: torch.Tensor) -> None:
        """Inverse of rows_of: write [B, H', G, X * BQ, E] into dst [B, Hq, NQB, BQ, E]."""
        b, _, _, bq, e = dst_blk.shape
        if self.shared:
            t = value.reshape(b, self.heads_kv, -1, self.rep, bq, e).transpose(2, 3)
            dst_blk[:, :, self.qb] = t.reshape(b, self.heads_kv * self.rep, -1, bq, e)
        else:
            dst_blk[:, self.head, self.qb] = value[:, 0]

    def cols_of(self, x_blk: torch.Tensor) -> torch.Tensor:
        """kv-side tensor [B, Hkv, NKB, BK, E] -> [B, H', G, T * BK, E]."""
        b, _, _, bk, e = x_blk.shape
        if self.shared:
            t = x_blk[:, :, self.kb]  # [B, Hkv, G, T, BK, E]
            return t.reshape(b, self.heads_kv, self.kb.shape[0], -1, e)
        t = x_blk[:, torch.div(self.head, self.rep, rounding_mode="floor")[:, None], self.kb]  # [B, G, T, BK, E]
        return t.reshape(b, 1, self.kb.shape[0], -1, e)

    def add_cols(self, dst_blk: torch.Tensor, value: torch.Tensor) -> None:
        """Scatter-add [B, H', G, T * BK, E] into dst [B, Hkv, NKB, BK, E]."""
        b, hkv, nkb, bk, e = dst_blk.shape
        if self.shared:
            dst_blk.index_add_(2, self.kb.reshape(-1), value.reshape(b, hkv, -1, bk, e))
        else:
            kv_head = torch.div(self.head, self.rep, rounding_mode="floor")
            index = (kv_head[:, None] * nkb + self.kb).reshape(-1)
            dst_blk.view(b, hkv * nkb, bk, e).index_add_(1, index, value.reshape(b, -1, bk, e))

    def masked_scores(self, q_rows: torch.Tensor, k_cols: torch.Tensor, scale: float) -> torch.Tensor:
        s = torch.matmul(q_rows, k_cols.transpose(-1, -2)) * scale  # [B, H', G, X*BQ, C]
        b, hh, g, xr, c = s.shape
        bq = xr // (self.rep if self.shared else 1)
        s6 = s.view(b, hh, g, -1, bq, c)
        ncols_p = self.group.num_partial * (c // self.kb.shape[1])
        if ncols_p:
            mask = self.plan.partial_mask(self.group, self.rows)  # [G, BQ, P*BK]
            s6[..., :ncols_p].masked_fill_(~mask[:, None], float("-inf"))
        if ncols_p < c:
            valid = self.group.full_valid[self.rows]  # [G, F*BK]
            s6[..., ncols_p:].masked_fill_(~valid[:, None, None, :], float("-inf"))
        return s


def _chunks(plan: _Plan, group: _Group, batch: int, heads_q: int) -> list[slice]:
    g = plan.layout.grid
    cols = group.kv_block.shape[1] * g.block_kv
    per_row = batch * heads_q * g.block_q * cols
    step = max(1, _TILE_BUDGET // max(per_row, 1))
    n = group.q_block.numel()
    return [slice(s, s + step) for s in range(0, n, step)]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def blocked_forward(q, k, v, plan: _Plan, scale: float):
    """Returns out [B, Hq, Nq, Dv] (input dtype) and lse [B, Hq, Nq] (compute dtype)."""
    g = plan.layout.grid
    b, hq, nq, _ = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    cdt = _compute_dtype(q.dtype)
    q_blk = _blocks(q, g.block_q, cdt)
    k_blk, v_blk = _blocks(k, g.block_kv, cdt), _blocks(v, g.block_kv, cdt)
    nqb = q_blk.shape[2]
    out_blk = torch.zeros(b, hq, nqb, g.block_q, dv, dtype=cdt, device=q.device)
    lse_blk = torch.full((b, hq, nqb, g.block_q, 1), float("-inf"), dtype=cdt, device=q.device)
    for group in plan.groups:
        for rows in _chunks(plan, group, b, hq):
            t = _Tiles(plan, group, rows, hq, hkv)
            s = t.masked_scores(t.rows_of(q_blk), t.cols_of(k_blk), scale)
            m = s.amax(-1, keepdim=True)
            m = torch.where(torch.isinf(m), 0.0, m)  # rows with nothing allowed
            p = torch.exp_(s.sub_(m))
            l = p.sum(-1, keepdim=True)
            o = torch.matmul(p, t.cols_of(v_blk))
            o = torch.where(l > 0, o / l, 0.0)
            t.put_rows(out_blk, o)
            t.put_rows(lse_blk, m + torch.log(l))
    out = out_blk.reshape(b, hq, -1, dv)[:, :, :nq].to(q.dtype)
    return out, lse_blk.reshape(b, hq, -1)[:, :, :nq]


def blocked_backward(q, k, v, out, lse, dout, dlse, plan: _Plan, scale: float):
    g = plan.layout.grid
    b, hq, nq, _ = q.shape
    hkv = k.shape[1]
    cdt = _compute_dtype(q.dtype)
    q_blk = _blocks(q, g.block_q, cdt)
    k_blk, v_blk = _blocks(k, g.block_kv, cdt), _blocks(v, g.block_kv, cdt)
    do_blk = _blocks(dout, g.block_q, cdt)
    delta = (dout.to(cdt) * out.to(cdt)).sum(-1, keepdim=True)  # [B, Hq, Nq, 1]
    if dlse is not None:
        delta = delta - dlse.to(cdt)[..., None]  # d lse / d s = p, folded into the same term
    delta_blk = _blocks(delta, g.block_q, cdt)
    # rows that saw nothing have lse -inf; +inf makes their probabilities exp(-inf) = 0
    lse_blk = _blocks(torch.where(torch.isinf(lse), float("inf"), lse)[..., None].to(cdt), g.block_q, cdt)
    dq_blk = torch.zeros_like(q_blk)
    dk_blk = torch.zeros_like(k_blk)
    dv_blk = torch.zeros_like(v_blk)
    for group in plan.groups:
        for rows in _chunks(plan, group, b, hq):
            t = _Tiles(plan, group, rows, hq, hkv)
            q_r, do_r = t.rows_of(q_blk), t.rows_of(do_blk)
            k_c, v_c = t.cols_of(k_blk), t.cols_of(v_blk)
            s = t.masked_scores(q_r, k_c, scale)
            p = torch.exp_(s.sub_(t.rows_of(lse_blk)))  # [B, H', G, X*BQ, C]
            t.add_cols(dv_blk, torch.matmul(p.transpose(-1, -2), do_r))
            ds = p.mul_(torch.matmul(do_r, v_c.transpose(-1, -2)).sub_(t.rows_of(delta_blk)))
            t.put_rows(dq_blk, torch.matmul(ds, k_c).mul_(scale))
            t.add_cols(dk_blk, torch.matmul(ds.transpose(-1, -2), q_r).mul_(scale))

    def unblock(x_blk, n, like):
        return x_blk.reshape(x_blk.shape[0], x_blk.shape[1], -1, x_blk.shape[-1])[:, :, :n].to(like.dtype)

    return unblock(dq_blk, nq, q), unblock(dk_blk, k.shape[2], k), unblock(dv_blk, v.shape[2], v)


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
        notes="pure torch; gathers only the layout's blocks; recomputing backward "
              "(deterministic on CPU; CUDA index_add_ uses atomics)",
    )

    def block_sizes(self, call):
        # Smaller blocks waste less on band edges; 64 keeps the CPU matmuls efficient.
        return (64, 64) if call.device_type == "cpu" else (128, 128)

    def forward(self, q, k, v, layout, scale, return_lse):
        plan = get_plan(layout)
        out, lse = _BlockedAttention.apply(q, k, v, plan, scale)
        return out, (lse if return_lse else None)


register(BlockedBackend())
