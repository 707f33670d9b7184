"""Block top-k selection in one Triton kernel: from the block scores (mean-pooled query ·
mean-pooled key, one fp32 matmul in `block._select`) to the selection and its ascending picks,
with the causal masking, the own block forced and ties to the lowest index, as
`block._top_k_lowest_index_ties` / `_ascending_indices` do with ~14 torch ops.

Per score row (one query block of one head), with k = min(top_k_blocks, NKB):
1. causal: blocks after the query block score -inf, its own block +inf;
2. scores become order-preserving int32 keys (IEEE bits, negative ones' magnitude bits
   flipped; -0.0 first made +0.0 so that it ties with +0.0 as in torch);
3. the k-th largest key by bisection over the int32 range (32 counting passes over the row,
   whatever k is), then chosen = key > kth, plus the first (lowest-index) ties at kth up to k;
4. picks[rank] = block for every chosen block, rank = its place among the chosen (ascending);
   causal: the selection drops the chosen blocks after the query block (rows with fewer
   eligible blocks than k took the lowest ones of them: the -inf ties), the picks keep them.

Same inputs, same selection and picks as the torch ops, bit for bit
(tests/ops/test_topk_select_kernel.py, under TRITON_INTERPRET=1 on CPU). Rows of more than MAX_BLOCKS blocks stay on the torch path
(one row lives in registers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCKS = 16384  # kv blocks per row held in registers (1M tokens at 64-token blocks)
ROW_ELEMENTS = 4096  # rows per program: as many as fill this many elements


@triton.jit
def _select_kernel(SCORES, SEL, PICKS, rows, NQB, NKB, FIRST, K,
                   CAUSAL: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0) * R + tl.arange(0, R)  # [R] score rows (head-major: head * NQB + query block)
    col = tl.arange(0, BLOCK_N)  # [BLOCK_N] kv blocks
    live_row = row < rows
    inside = live_row[:, None] & (col[None, :] < NKB)
    row64 = row.to(tl.int64)
    scores = tl.load(SCORES + row64[:, None] * NKB + col[None, :], mask=inside, other=0.0)
    scores = scores + 0.0  # -0.0 -> +0.0: torch ties them
    q_block = (row % NQB + FIRST)[:, None]  # [R, 1] absolute query block
    if CAUSAL:
        scores = tl.where(col[None, :] > q_block, float("-inf"), scores)
        scores = tl.where(col[None, :] == q_block, float("inf"), scores)
    bits = scores.to(tl.int32, bitcast=True)
    keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed order = float order
    keys = tl.where(inside, keys, -2147483648)  # padding below every real key (-inf is -2139095041)
    # the k-th largest key: the largest t with count(keys >= t) >= K, by bisection (int64 bounds)
    lo = tl.full([R], -2147483648, tl.int64)
    hi = tl.full([R], 2147483647, tl.int64)
    for _ in range(32):
        mid = lo + (hi - lo + 1) // 2
        count = tl.sum((keys.to(tl.int64) >= mid[:, None]).to(tl.int32), axis=1)
        enough = count >= K
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    kth = lo.to(tl.int32)[:, None]
    above = keys > kth
    tied = keys == kth
    room = K - tl.sum(above.to(tl.int32), axis=1)  # [R] tied blocks still to take, lowest first
    chosen = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=1) <= room[:, None]))
    chosen = chosen & inside
    rank = tl.cumsum(chosen.to(tl.int32), axis=1) - 1
    tl.store(PICKS + row64[:, None] * K + rank, col[None, :].to(tl.int64) + tl.zeros([R, BLOCK_N], tl.int64),
             mask=chosen)
    if CAUSAL:
        chosen = chosen & (col[None, :] <= q_block)
    tl.store(SEL + row64[:, None] * NKB + col[None, :], chosen.to(tl.uint8), mask=inside)


def select_from_scores(scores: torch.Tensor, top_k: int, first: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(selection bool [..., NQB, NKB], picks int64 [..., NQB, top_k]) of fp32 block scores
    [..., NQB, NKB] whose query block row a is absolute block first + a; 1 <= top_k <= NKB."""
    nqb, nkb = scores.shape[-2:]
    if scores.dtype != torch.float32:
        raise ValueError(f"scores must be float32, got {scores.dtype}")
    if not 1 <= top_k <= nkb:
        raise ValueError(f"top_k must be in [1, {nkb}] (the kv blocks), got {top_k}")
    if nkb > MAX_BLOCKS:
        raise ValueError(f"rows of {nkb} kv blocks exceed the kernel's {MAX_BLOCKS}")
    scores = scores.contiguous()
    rows = scores.numel() // nkb if nkb else 0
    selection = torch.empty(scores.shape, dtype=torch.uint8, device=scores.device)
    picks = torch.empty(*scores.shape[:-1], top_k, dtype=torch.int64, device=scores.device)
    if rows:
        block_n = triton.next_power_of_2(nkb)
        per_program = max(1, min(ROW_ELEMENTS // block_n, triton.next_power_of_2(rows)))
        _select_kernel[(triton.cdiv(rows, per_program),)](
            scores, selection, picks, rows, nqb, nkb, first, top_k, CAUSAL=causal, R=per_program, BLOCK_N=block_n,
            num_warps=8 if block_n * per_program >= 4096 else 4)
    return selection.view(torch.bool), picks
