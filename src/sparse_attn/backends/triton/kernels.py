"""Block-sparse flash-attention forward kernel (Triton).

One program per (query block, batch * query head). The program walks its layout row's kv
blocks from CSR arrays: first the *full* blocks (no element mask), then the *partial* ones,
whose element masks arrive as packed bits (see backend.py for the format). Online softmax in
fp32 with exp2 on log2(e)-prescaled scores; rows that see nothing end with l = 0 and are
written as 0 with lse = -inf.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _attend_block(acc, m_i, l_i, q, kb, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                  mask_ptr, qk_scale, kv_len,
                  BQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                  D: tl.constexpr, DV: tl.constexpr, WORDS: tl.constexpr,
                  IS_PARTIAL: tl.constexpr, EVEN_KV: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    offs_n = kb * BK + tl.arange(0, BK)  # [BK] key positions
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    in_kv = offs_n < kv_len
    k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # [BD, BK]
    k = tl.load(k_ptrs, mask=in_kv[None, :] & (offs_d[:, None] < D), other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    if IEEE:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    s = s * qk_scale  # [BQ, BK], log2 units
    if IS_PARTIAL:
        # bit (col % 32) of word (col // 32) of row r: may query r see key col?
        cols = tl.arange(0, BK)
        rows = tl.arange(0, BQ)
        words = tl.load(mask_ptr + rows[:, None] * WORDS + (cols // 32)[None, :])  # [BQ, BK] int32
        bits = (words >> (cols % 32)[None, :]) & 1
        s = tl.where(bits != 0, s, float("-inf"))  # ragged keys already cleared in the bits
    elif not EVEN_KV:
        s = tl.where(in_kv[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet: exp2(-inf) = 0
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd  # [BK, BDV]
    v = tl.load(v_ptrs, mask=in_kv[:, None] & (offs_dv[None, :] < DV), other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def block_sparse_fwd_kernel(
    Q, K, V, Out, Lse,
    full_off, full_idx, part_off, part_idx, part_bits,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    qk_scale, q_len, kv_len, num_q_heads, group_size, num_q_blocks,
    PER_HEAD: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, WORDS: tl.constexpr, EVEN_KV: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_q_heads).to(tl.int64)
    h = bh % num_q_heads
    hk = h // group_size  # GQA: kv head read in place, never repeated
    row = qb
    if PER_HEAD:
        row = h * num_q_blocks + qb  # layout row of this (head, query block)

    offs_m = qb * BQ + tl.arange(0, BQ)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    in_q = offs_m < q_len
    q_ptrs = Q + b * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=in_q[:, None] & (offs_d[None, :] < D), other=0.0)  # [BQ, BD]
    if UPCAST:  # the CPU interpreter's bf16 dot is wrong (it multiplies raw bits): compute in fp32
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b * stride_vb + hk.to(tl.int64) * stride_vh

    m_i = tl.full([BQ], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BQ], dtype=tl.float32)
    acc = tl.zeros([BQ, BDV], dtype=tl.float32)

    f0 = tl.load(full_off + row)
    f1 = tl.load(full_off + row + 1)
    for j in range(f0, f1):
        kb = tl.load(full_idx + j)
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, kb, k_base, v_base, stride_kn, stride_kd, stride_vn,
                                      stride_vd, part_bits, qk_scale, kv_len, BQ, BK, BD, BDV, D, DV, WORDS,
                                      False, EVEN_KV, IEEE, UPCAST)
    p0 = tl.load(part_off + row)
    p1 = tl.load(part_off + row + 1)
    for j in range(p0, p1):
        kb = tl.load(part_idx + j)
        mask_ptr = part_bits + j * (BQ * WORDS)  # j is int64 (CSR offsets are int64)
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, kb, k_base, v_base, stride_kn, stride_kd, stride_vn,
                                      stride_vd, mask_ptr, qk_scale, kv_len, BQ, BK, BD, BDV, D, DV, WORDS,
                                      True, EVEN_KV, IEEE, UPCAST)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]  # empty rows: acc is 0, so 0
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = Out + b * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_on + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=in_q[:, None] & (offs_dv[None, :] < DV))
    l_ptrs = Lse + b * stride_lb + h.to(tl.int64) * stride_lh + offs_m * stride_ln
    tl.store(l_ptrs, lse, mask=in_q)
