"""O(N^2) references for top-k and block top-k attention: the tests' ground truth.

They build the full score matrix (and dense masks) and run a plain masked softmax, in float64
for float64 inputs and float32 otherwise, with autograd through ordinary torch ops. Never use
them for long sequences.
"""

from __future__ import annotations

import math

import torch

from ...patterns import Pattern


def _positions(q_len: int, kv_len: int, q_offset: int | None, device):
    """Absolute query positions [Nq] and key positions [Nkv]."""
    q_offset = kv_len - q_len if q_offset is None else q_offset
    return torch.arange(q_len, device=device) + q_offset, torch.arange(kv_len, device=device)


def _masked_attention(q, k, v, mask, scale):
    """Softmax attention on [B, Hq, Nq, D] under a bool mask [B, Hq, Nq, Nkv] (GQA by repeating
    k/v); rows with nothing allowed give 0."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    rep = q.shape[1] // k.shape[1]
    k, v = k.to(cdt).repeat_interleave(rep, dim=1), v.to(cdt).repeat_interleave(rep, dim=1)
    scores = torch.matmul(q.to(cdt), k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    empty = ~mask.any(-1, keepdim=True)  # rows with nothing allowed: 0, and a zero (not NaN) gradient
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return torch.matmul(probs, v).to(q.dtype)


def topk_attention_naive(q, k, v, top_k: int, *, causal: bool = False, scale: float | None = None,
                         q_offset: int | None = None) -> torch.Tensor:
    """Top-k attention from the full score matrix: every score outside a row's top_k allowed
    keys is set to -inf before the softmax. Ties: `torch.topk` on the whole row."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q_pos, kv_pos = _positions(q.shape[2], k.shape[2], q_offset, q.device)
    allowed = (kv_pos[None, :] <= q_pos[:, None]) if causal else torch.ones(q.shape[2], k.shape[2], dtype=torch.bool,
                                                                           device=q.device)
    rep = q.shape[1] // k.shape[1]
    with torch.no_grad():
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        scores = torch.matmul(q.to(cdt), k.to(cdt).repeat_interleave(rep, dim=1).transpose(-1, -2))
        scores = scores.masked_fill(~allowed, float("-inf"))  # [B, Hq, Nq, Nkv]
        kept = min(top_k, k.shape[2])
        top, pick = scores.topk(kept, dim=-1)
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, pick, torch.isfinite(top))
    return _masked_attention(q, k, v, keep & allowed, scale)


def select_kv_blocks_naive(q, k, top_k_blocks: int, block_size: int, *, causal: bool = False,
                           q_offset: int | None = None, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`select_kv_blocks` with loops: bool [B, Hq, NQB, NKB].

    Query block a (of the returned rows) holds the queries whose absolute positions p satisfy
    p // block_size == q_offset // block_size + a. Block scores are (mean of the block's
    queries) · (mean of the kv block's keys); causal: only kv blocks c <= the query block's index
    are eligible and the query block's own kv block is always kept, counted within top_k_blocks.
    key_padding_mask (B, Nkv), True = real (queries on key indices): means over real tokens,
    kv blocks without a real key are not candidates, query blocks without a real query select
    nothing.
    """
    q_pos, _ = _positions(q.shape[2], k.shape[2], q_offset, q.device)
    bsz, hq, nq, _ = q.shape
    hkv, nkv = k.shape[1], k.shape[2]
    rep = hq // hkv
    nkb = -(-nkv // block_size)
    first = int(q_pos[0]) // block_size if nq else 0
    nqb = (int(q_pos[-1]) // block_size - first + 1) if nq else 0
    selection = torch.zeros(bsz, hq, nqb, nkb, dtype=torch.bool, device=q.device)
    q64, k64 = q.detach().double(), k.detach().double()
    for b in range(bsz):
        if key_padding_mask is None:
            key_real = torch.ones(nkv, dtype=torch.bool, device=q.device)
            query_real = torch.ones(nq, dtype=torch.bool, device=q.device)
        else:  # queries on key indices
            key_real = key_padding_mask[b]
            query_real = key_real[q_pos]
        block_keys = [torch.arange(c * block_size, min((c + 1) * block_size, nkv), device=q.device) for c in range(nkb)]
        block_keys = [idx[key_real[idx]] for idx in block_keys]  # the real keys of each kv block
        for h in range(hq):
            key_means = [k64[b, h // rep, idx].mean(0) for idx in block_keys]
            for a in range(nqb):
                block = first + a
                in_block = ((q_pos // block_size) == block) & query_real
                if not in_block.any():
                    continue
                query_mean = q64[b, h, in_block].mean(0)
                candidates = [c for c in range(nkb) if (not causal or c <= block) and block_keys[c].numel()]
                forced = [block] if causal and block in candidates else []
                ranked = sorted((c for c in candidates if c not in forced),
                                key=lambda c: -float(query_mean @ key_means[c]))
                for c in (forced + ranked)[:top_k_blocks]:
                    selection[b, h, a, c] = True
    return selection


def block_topk_mask(selection: torch.Tensor, block_size: int, q_len: int, kv_len: int, *, causal: bool = False,
                    always: Pattern | None = None, q_offset: int | None = None,
                    key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The element mask bool [B, Hq, Nq, Nkv] of a block selection [B, Hq, NQB, NKB] (rows as in
    `select_kv_blocks`), OR'd with the dense mask of `always`, AND'd with causal and, given a
    key_padding_mask (B, Nkv), with "query and key both real" (queries on key indices)."""
    q_pos, kv_pos = _positions(q_len, kv_len, q_offset, selection.device)
    bsz, hq = selection.shape[:2]
    first = int(q_pos[0]) // block_size if q_len else 0
    row_block = q_pos // block_size - first  # [Nq] index into the selection's rows
    mask = selection[:, :, row_block][:, :, :, kv_pos // block_size]  # [B, Hq, Nq, Nkv]
    if always is not None:
        offset = int(q_pos[0]) if q_len else 0
        dense = always.to_dense(q_len, kv_len, q_offset=offset, num_heads=always.num_heads, device=selection.device)
        mask = mask | dense[None]  # [1, H or 1, Nq, Nkv]
    if causal:
        mask = mask & (kv_pos[None, :] <= q_pos[:, None])
    mask = mask.expand(bsz, hq, q_len, kv_len)
    if key_padding_mask is not None:
        real = key_padding_mask.to(mask.device)
        mask = mask & real[:, None, q_pos, None] & real[:, None, None, :]
    return mask


def block_topk_attention_naive(q, k, v, selection: torch.Tensor, block_size: int, *, causal: bool = False,
                               always: Pattern | None = None, scale: float | None = None,
                               q_offset: int | None = None, key_padding_mask: torch.Tensor | None = None
                               ) -> torch.Tensor:
    """Attention under the dense mask `block_topk_mask(selection, ...)`, for a given selection
    (e.g. the one `block_topk_attention(..., return_selection=True)` used); pad query rows
    (with a key_padding_mask) give 0."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = block_topk_mask(selection, block_size, q.shape[2], k.shape[2], causal=causal, always=always,
                           q_offset=q_offset, key_padding_mask=key_padding_mask)
    return _masked_attention(q, k, v, mask, scale)
