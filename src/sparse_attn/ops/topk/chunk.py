"""Exact top-k attention, chunk by chunk over the queries.

Each query attends (softmax) only to the `top_k` keys with the highest scores q·k among the
keys it may see (all keys, or keys at positions <= its own with `causal=True`). The selection
needs every score of a row, so the work is O(Nq * Nkv * D) like dense attention; what top-k
saves is memory and the cost of the value mixing and of the backward, which touch only the
selected keys:

* forward, per chunk of queries: the chunk's scores [rows, Nkv] (in float32 for half inputs),
  `torch.topk` over the allowed keys, a gather of the selected values, a softmax over the k
  selected scores; the chunk's scores are freed before the next chunk.
* saved for the backward: the selected key indices [B, Hq, Nq, k] and the row log-sum-exp,
  never a score matrix. The backward recomputes the k selected scores per chunk from gathered
  keys (as FlashAttention recomputes from the log-sum-exp) and scatter-adds into dk / dv.

So peak memory is O(chunk * Nkv + Nq * k), not O(Nq * Nkv). The chunk size defaults to what
keeps a chunk's score block (and its gathered keys/values) near `SCORE_BLOCK_ELEMENTS`.

The selection is not differentiated (it is piecewise constant): gradients flow through the
selected scores and values only. Ties at the k-th score are broken by `torch.topk`, which
documents no order among equal values; the naive reference (naive.py) uses `torch.topk` on the
same row, but the two compute scores with different matmul shapes, so with exactly tied
scores they may keep different (equally scored) keys.

GQA: query heads are grouped per kv head (q viewed as [B, Hkv, Hq/Hkv, Nq, D]), so k and v
are never repeated.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ...backends.inputs import check_inputs
from ...patterns import causal as causal_pattern
from ...patterns import full as full_pattern
from ..._checks import check_bool, check_int
from ..common import accumulation_dtype, check_key_padding_mask

# Elements of one chunk's score block (and of its gathered keys + values): 64 MiB in fp32.
SCORE_BLOCK_ELEMENTS = 1 << 24








def default_chunk_size(batch: int, q_heads: int, kv_len: int, top_k: int, head_dim: int, v_head_dim: int,
                       budget: int | None = None) -> int:
    """Queries per chunk so that the chunk's scores [B, Hq, chunk, Nkv] and its gathered keys
    and values [B, Hq, chunk, k, D + Dv] each stay within `budget` elements (default
    `SCORE_BLOCK_ELEMENTS`), at least one query."""
    budget = SCORE_BLOCK_ELEMENTS if budget is None else budget
    per_query = batch * q_heads * max(kv_len, min(top_k, kv_len) * (head_dim + v_head_dim), 1)
    return max(1, budget // per_query)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, N, E], index [B, H, R, K] (int, values in [0, N)) -> [B, H, R, K, E]."""
    b, h, n, e = x.shape
    base = (torch.arange(b * h, device=x.device) * n).view(b, h, 1, 1)
    flat = (index.long() + base).reshape(-1)
    return x.reshape(b * h * n, e).index_select(0, flat).view(*index.shape, e)


def scatter_add_rows(target: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """target [B, H, N, E] (contiguous) += values [B, H, R, K, E] at rows index [B, H, R, K]."""
    b, h, n, e = target.shape
    base = (torch.arange(b * h, device=target.device) * n).view(b, h, 1, 1)
    flat = (index.long() + base).reshape(-1)
    target.view(b * h * n, e).index_add_(0, flat, values.reshape(-1, e))


class _Geometry:
    """Shapes of one call and the views that group query heads per kv head."""

    def __init__(self, q, k, v, top_k, causal, q_offset, chunk_size, key_pad=None):
        self.batch, self.q_heads, self.q_len, self.head_dim = q.shape
        self.kv_heads, self.kv_len = k.shape[1], k.shape[2]
        self.v_head_dim = v.shape[3]
        self.group = self.q_heads // self.kv_heads  # query heads per kv head
        self.k_eff = min(top_k, self.kv_len)
        self.causal = causal
        self.q_offset = q_offset
        self.key_pad = key_pad  # bool [B, Nkv], True = a pad key (never picked), or None
        self.chunk = chunk_size or default_chunk_size(self.batch, self.q_heads, self.kv_len, top_k, self.head_dim,
                                                      self.v_head_dim)

    def chunks(self):
        for start in range(0, self.q_len, self.chunk):
            yield start, min(start + self.chunk, self.q_len)

    def rows(self, x: torch.Tensor, start: int, stop: int, dtype) -> torch.Tensor:
        """Rows start..stop of every query head of x [B, Hq, Nq, E], as [B, Hkv, G * C, E] in
        `dtype` (row g * C + c is query head kv_head * G + g, row start + c)."""
        grouped = x.unflatten(1, (self.kv_heads, self.group))[:, :, :, start:stop]  # [B, Hkv, G, C, E]
        return grouped.to(dtype).reshape(self.batch, self.kv_heads, self.group * (stop - start), x.shape[3])

    def put_rows(self, target: torch.Tensor, start: int, stop: int, values: torch.Tensor) -> None:
        """Inverse of `rows`: write values [B, Hkv, G * C, E] into target [B, Hq, Nq, E]."""
        grouped = target.view(self.batch, self.kv_heads, self.group, target.shape[2], target.shape[3])
        grouped[:, :, :, start:stop] = values.reshape(self.batch, self.kv_heads, self.group, stop - start, -1)

    def hidden_keys(self, start: int, stop: int, device) -> torch.Tensor | None:
        """bool, broadcastable to the scores [B, Hkv, G * C, Nkv]: keys a row may not pick (after
        its query position when causal; pad keys), or None."""
        hidden = None
        if self.causal:
            pos = torch.arange(start, stop, device=device) + self.q_offset  # [C]
            kv = torch.arange(self.kv_len, device=device)
            hidden = (kv[None, :] > pos[:, None]).repeat(self.group, 1)  # [R, Nkv]
        if self.key_pad is not None:
            pad = self.key_pad[:, None, None, :]  # [B, 1, 1, Nkv]
            hidden = pad if hidden is None else hidden | pad
        return hidden


class _TopkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, geo: _Geometry, scale: float):
        cdt = accumulation_dtype(q.dtype)
        out = torch.zeros(q.shape[:3] + (geo.v_head_dim,), dtype=q.dtype, device=q.device)
        lse = torch.full(q.shape[:3] + (1,), float("-inf"), dtype=cdt, device=q.device)
        index_dtype = torch.int32 if geo.kv_len < 2**31 else torch.int64
        index = torch.empty(q.shape[:3] + (geo.k_eff,), dtype=index_dtype, device=q.device)
        k_c, v_c = k.to(cdt).contiguous(), v.to(cdt).contiguous()
        for start, stop in geo.chunks() if geo.k_eff else ():  # no keys: rows stay 0
            q_rows = geo.rows(q, start, stop, cdt)  # [B, Hkv, R, D], R = G * C
            scores = torch.matmul(q_rows, k_c.transpose(-1, -2))  # [B, Hkv, R, Nkv], unscaled
            hidden = geo.hidden_keys(start, stop, q.device)
            if hidden is not None:
                scores.masked_fill_(hidden, float("-inf"))
            top, pick = scores.topk(geo.k_eff, dim=-1, sorted=False)  # [B, Hkv, R, K]
            del scores
            # a row with fewer allowed keys than k also picks masked ones: mark those -1
            pick = torch.where(torch.isneginf(top), -1, pick)
            s = top.mul_(scale)
            m = s.amax(-1, keepdim=True)  # -inf only for a row with no allowed key (all pads)
            m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
            p = s.sub_(m).exp_()  # 0 on padding picks
            l = p.sum(-1, keepdim=True)  # [B, Hkv, R, 1]; >= 1 unless the row sees nothing
            v_sel = gather_rows(v_c, pick.clamp(min=0))  # [B, Hkv, R, K, Dv]
            o = torch.einsum("bhrk,bhrke->bhre", p, v_sel).div_(l.clamp(min=1.0))  # empty rows: 0
            geo.put_rows(out, start, stop, o.to(q.dtype))
            geo.put_rows(lse, start, stop, torch.where(l > 0, m + l.log(), torch.full_like(m, float("-inf"))))
            geo.put_rows(index, start, stop, pick.to(index_dtype))
        ctx.save_for_backward(q, k, v, out, lse, index)
        ctx.geo, ctx.scale = geo, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse, index = ctx.saved_tensors
        geo, scale = ctx.geo, ctx.scale
        dout = dout.contiguous()  # often an expanded (stride 0) tensor: slicing it per chunk is slow
        cdt = accumulation_dtype(q.dtype)
        k_c, v_c = k.to(cdt).contiguous(), v.to(cdt).contiguous()
        dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
        dk = torch.zeros(k.shape, dtype=cdt, device=k.device)
        dv = torch.zeros(v.shape, dtype=cdt, device=v.device)
        for start, stop in geo.chunks():
            q_rows = geo.rows(q, start, stop, cdt)  # [B, Hkv, R, D]
            do_rows = geo.rows(dout, start, stop, cdt)  # [B, Hkv, R, Dv]
            pick = geo.rows(index, start, stop, torch.int64)  # [B, Hkv, R, K]
            safe = pick.clamp(min=0)
            k_sel, v_sel = gather_rows(k_c, safe), gather_rows(v_c, safe)  # [B, Hkv, R, K, D or Dv]
            s = torch.einsum("bhrd,bhrkd->bhrk", q_rows, k_sel).mul_(scale).masked_fill_(pick < 0, float("-inf"))
            row_lse = geo.rows(lse, start, stop, cdt)
            row_lse = torch.where(torch.isneginf(row_lse), torch.zeros_like(row_lse), row_lse)  # empty rows: p = 0
            p = s.sub_(row_lse).exp_()  # [B, Hkv, R, K], recomputed probabilities
            delta = (do_rows * geo.rows(out, start, stop, cdt)).sum(-1, keepdim=True)  # [B, Hkv, R, 1]
            dp = torch.einsum("bhre,bhrke->bhrk", do_rows, v_sel)
            ds = p * dp.sub_(delta)  # d loss / d (scaled score)
            geo.put_rows(dq, start, stop, torch.einsum("bhrk,bhrkd->bhrd", ds, k_sel).mul_(scale))
            scatter_add_rows(dv, safe, p[..., None] * do_rows[:, :, :, None, :])
            scatter_add_rows(dk, safe, (ds * scale)[..., None] * q_rows[:, :, :, None, :])
        need = ctx.needs_input_grad
        return (dq.to(q.dtype) if need[0] else None, dk.to(k.dtype) if need[1] else None,
                dv.to(v.dtype) if need[2] else None, None, None)


def topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, top_k: int = 64, *, causal: bool = False,
                   scale: float | None = None, q_offset: int | None = None, chunk_size: int | None = None,
                   key_padding_mask: torch.Tensor | None = None):
    """Exact top-k attention: each query attends only to its `top_k` highest-scoring keys.

    Args:
        q: (B, Hq, Nq, D); k: (B, Hkv, Nkv, D); v: (B, Hkv, Nkv, Dv); Hq % Hkv == 0 (GQA).
        top_k: keys kept per query (>= 1; default 64). A row with fewer allowed keys keeps all of
            them, so top_k >= Nkv gives dense (causal) attention.
        causal: a query at position i sees only keys at positions <= i.
        scale: score scale, default 1/sqrt(D).
        q_offset: absolute position of the first query; default Nkv - Nq (queries are the last
            positions), as in `sparse_attention`.
        chunk_size: queries processed at once; by default as many as keep a chunk's score block
            near `SCORE_BLOCK_ELEMENTS` elements (memory O(chunk * Nkv + Nq * top_k)).
        key_padding_mask: bool (B, Nkv), True = a real key: pad keys are never picked and query
            rows on pad indices return 0. Selection and causality are by index, which padding
            shifts alike for queries and keys, so each row gets what it gets alone.

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype; rows with no key to attend to (Nkv = 0) are 0.

    Scores and softmax run in float32 for half inputs (float64 for float64). Ties at the k-th
    score are broken by `torch.topk` (unspecified order). Gradients flow to q, k, v through the
    selected scores and values; the selection itself is not differentiated. Once
    differentiable (no double backward).
    """
    pattern = causal_pattern() if check_bool("causal", causal) else full_pattern()
    _, q_offset, scale = check_inputs(q, k, v, pattern, scale, q_offset, "auto")
    check_int("top_k", top_k, 1)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)
    if key_padding_mask is None:
        return _TopkAttention.apply(q, k, v, _Geometry(q, k, v, top_k, causal, q_offset, chunk_size), scale)
    key_real = check_key_padding_mask(key_padding_mask, k)
    if q_offset is None or q_offset + q.shape[2] > k.shape[2]:
        raise ValueError("key_padding_mask needs the queries on key indices (q_offset + q_len <= kv_len)")
    geo = _Geometry(q, k, v, top_k, causal, q_offset, chunk_size, key_pad=~key_real)
    q_real = key_real[:, q_offset:q_offset + q.shape[2]]
    return _TopkAttention.apply(q, k, v, geo, scale) * q_real[:, None, :, None].to(q.dtype)
