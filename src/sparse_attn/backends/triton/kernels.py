"""Block-sparse flash-attention kernels (Triton): the forward, and two backwards.

Layout blocks (LBQ x LBK, the BlockLayout's block sizes) and kernel tiles (BM x BN) are
separate: a tile divides a layout block, so one layout (e.g. 128 x 128, as FlexAttention's)
serves a forward that wants 128 x 64 tiles and a backward that wants 64 x 128 ones.

* forward: one program per (query tile, batch * query head). It walks its layout row's kv
  blocks from CSR arrays, first the *full* blocks (no element mask), then the *partial* ones,
  whose element masks arrive as packed bits (format in plan.py). Each loop is one flat loop
  over kv tiles (block index = tile // tiles-per-block) so Triton's software pipeliner sees a
  single loop with a `tl.dot` in it. Online softmax in fp32 with exp2 on log2(e)-prescaled
  scores; rows that see nothing end with l = 0 and are written as 0 with lse = -inf.

Both backwards start with the same preprocess (one program per (query tile, batch * query
head)): delta = rowsum(dO * O) - dlse and lse2 = lse in log2 units.

* backward, deterministic (the default; `deterministic=True`): three launches, 7 GEMMs per (query tile,
  kv tile) pair. The dq kernel has one program per (query tile, batch * query head), walking
  the same CSR row as the forward (S, dP, dQ += dS K: 3 GEMMs). The dk/dv kernel has one
  program per (kv tile, batch * kv head), walking the *transposed* layout (for each kv block,
  the query blocks that touch it) for every query head of its GQA group (S, dV += P^T dO, dP,
  dK += dS^T Q: 4 GEMMs), so dk/dv of a kv head are summed inside one program. Every output
  element is written by exactly one program and summed in a fixed order: no atomics, bitwise
  reproducible by construction.
* backward, fused (`deterministic=False`): one program per (kv tile, batch * kv
  head) as the dk/dv kernel, which also computes each pair's share of dQ, dS K * scale, and
  adds it with `tl.atomic_add` into a zero-filled fp32 buffer [B, Hq, Nq, D]; a conversion to
  q's dtype follows (none for fp32). 5 GEMMs per pair (S and dP are no longer recomputed by a
  second kernel) and one launch instead of two. Not bitwise reproducible: the kv tiles that
  touch a query row add into its dQ in whatever order the GPU runs their programs, and fp32
  addition is not associative, so two runs can differ in the last bits of dQ (dK and dV,
  summed inside one program, are reproducible). The price is the fp32 dQ buffer (4 bytes per
  element of q) and atomic traffic into it: one [BM, D] tile per (query tile, kv tile) pair.

The backwards recompute P = exp2(S * scale * log2e - lse2) from the saved lse (lse2 is lse in
log2 units, +inf for empty and padding rows so P is 0 there: their gradients are 0), and use
dS = P * (dP - delta) with delta = rowsum(dO * O) - dlse, which also carries the gradient
flowing into the returned log-sum-exp.

Warp specialisation (WS, off; issue #16), found by compiling for sm90 with Triton 3.6 and 3.9
(no GPU needed): `tl.range(..., warp_specialize=True)` runs the Hopper pass
NVGPUWarpSpecialization, which forms a TMA producer warp group plus two consumer groups (12
warps) for a single flash-attention loop with TMA loads, two dots and num_warps=4 (scalar index
loads inside are fine), and nothing at num_warps=8. It crashes the compiler (an assertion,
raised as "PassManager::run failed") when a second loop follows the specialised one, or when the
loop also loads tensors through pointers (bitmask words, lse/delta): the forward and dq kernels
have two loops (full, partial blocks) and the dk/dv kernel pointer loads of lse2/delta. So WS
here marks only the full-block loop, compiles as a no-op at the tuned 8 warps, and does not
compile at 4. A warp-specialised kernel would need the full blocks alone in one launch with
all loads through TMA (partials in a second pass, merged by log-sum-exp).
"""

from __future__ import annotations

import triton
import triton.language as tl


# Triton compiles a kernel once per *specialisation* of its arguments: an int equal to 1 becomes
# a constant and any other int is marked by whether it divides by 16. Block and work counts and
# the strides of the lse rows change with the sequence length and the batch, so with every int
# specialised a stream of new shapes (ListOps' ~1,500 lengths, prompts of any length) compiled
# up to 17 variants of each kernel at ~2 s each: 98 s of compiles over a ListOps-like stream
# (benchmarks/triton_specializations.py). The kernels leave the counts (and the forward's lse
# strides) unspecialised: the sm90 PTX is identical to the fully specialised kernel's at
# lengths divisible by 128, by 16 only, and by neither (Triton 3.6 and 3.9; --compare-ptx). The
# lengths stay specialised: the masks of ragged tiles use their divisibility. The backward's
# lse2/delta rows are padded to a multiple of 16 (ops._bwd_row_stats), so their strides always
# divide and the dk/dv loop's copies of them stay 16 bytes wide. Left: 3 variants per kernel.
def _jit(*unspecialized: str):
    """@triton.jit, leaving the named int arguments unspecialised."""
    return triton.jit(do_not_specialize=list(unspecialized))


def fully_specialized(kernel):
    """`kernel` as plain @triton.jit compiles it (every int specialised): the comparison of
    benchmarks/triton_specializations.py."""
    return triton.jit(kernel.fn)

LN2 = tl.constexpr(0.6931471805599453)  # a constexpr: jit code may read only constexpr globals


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # fp32 inputs: real fp32 products, not tf32
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _dot_acc(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b with the accumulator fed to the MMA (no separate [M, N] fp32 add)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _load_rows(base, row0, stride_n, offs_d, n_len, BR: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
               EVEN_N: tl.constexpr, UPCAST: tl.constexpr, WIDE_ROWS: tl.constexpr):
    """Rows [row0, row0 + BR) x [0, BD) of a (N, D) matrix; rows past n_len and columns past D
    read as 0. The tile's start is one int64 scalar (one head of N * D >= 2^31 elements would
    wrap in int32); offsets inside the tile stay int32, which keeps the per-element address
    arithmetic 32-bit, unless WIDE_ROWS (a row stride so large that 256 rows pass 2^31
    elements: ops.wide_rows)."""
    rows = tl.arange(0, BR)
    if WIDE_ROWS:
        in_tile = rows[:, None].to(tl.int64) * stride_n + offs_d[None, :]
    else:
        in_tile = rows[:, None] * stride_n + offs_d[None, :]
    ptrs = base + row0.to(tl.int64) * stride_n + in_tile
    if EVEN_N and D == BD:
        x = tl.load(ptrs)
    elif EVEN_N:
        x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
    else:
        x = tl.load(ptrs, mask=((row0 + rows)[:, None] < n_len) & (offs_d[None, :] < D), other=0.0)
    if UPCAST:  # the CPU interpreter's bf16 dot is wrong (it multiplies raw bits): compute in fp32
        x = x.to(tl.float32)
    return x


@triton.jit
def _load_tile(base, desc, row0, stride_n, offs_d, n_len, BR: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
               EVEN_N: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr, WIDE_ROWS: tl.constexpr):
    """A [BR, BD] tile at row0, through the TMA descriptor when there is one."""
    if USE_TMA:
        x = desc.load([row0, 0])
        if UPCAST:
            x = x.to(tl.float32)
    else:
        x = _load_rows(base, row0, stride_n, offs_d, n_len, BR, D, BD, EVEN_N, UPCAST, WIDE_ROWS)
    return x


@triton.jit
def _load_row_stats(Lse2, Delta, offsets, offs_m, q_len, EVEN_Q: tl.constexpr):
    """The backward's per-row (lse2, delta) at `offsets`; rows past q_len read as (+inf, 0), so
    their P = exp2(s - lse2) is 0."""
    if EVEN_Q:
        lse2 = tl.load(Lse2 + offsets)
        delta = tl.load(Delta + offsets)
    else:
        lse2 = tl.load(Lse2 + offsets, mask=offs_m < q_len, other=float("inf"))
        delta = tl.load(Delta + offsets, mask=offs_m < q_len, other=0.0)
    return lse2, delta  # one return: compiled Triton handles no early return from a branch


@triton.jit
def _mask_bits(mask_ptr, rows, cols, WORDS: tl.constexpr):
    """Bit (col % 32) of word (col // 32) of row `row` of a partial block's packed mask.
    `rows`/`cols` are block-local and broadcast against each other."""
    words = tl.load(mask_ptr + rows * WORDS + cols // 32)
    return ((words >> (cols % 32)) & 1) != 0


@triton.jit
def _launch_index():
    """This program's index in launch order: pid0 + pid1 * programs0 (int64). The grid is
    (fast, slow) or, when `slow` passes CUDA's 65535 limit on axes 1/2, folded onto axis 0 as
    (fast * slow,) (ops._grid); both give the same index, so kernels decode it one way."""
    return tl.program_id(0).to(tl.int64) + tl.program_id(1).to(tl.int64) * tl.num_programs(0)


@triton.jit
def _work_item(w, block_order, num_blocks, heads, HEADS_FASTEST: tl.constexpr, TILES_PER_BLOCK: tl.constexpr):
    """(tile, batch*head) of work item `w` (int64) of the launch's work list: layout blocks are
    visited in `block_order` (the busiest first, so a row that touches every block, e.g.
    Longformer's globals, does not start last and set the tail); with HEADS_FASTEST the
    busiest blocks of all `heads` go first."""
    tiles = num_blocks * TILES_PER_BLOCK
    if HEADS_FASTEST:
        bh = w % heads
        rank = w // heads
    else:
        rank = w % tiles
        bh = w // tiles
    block = tl.load(block_order + rank // TILES_PER_BLOCK)
    return (block * TILES_PER_BLOCK + rank % TILES_PER_BLOCK).to(tl.int32), bh.to(tl.int32)


@triton.jit
def _program_tile(block_order, num_blocks, HEADS_FASTEST: tl.constexpr, TILES_PER_BLOCK: tl.constexpr):
    """(tile, batch*head) of this program in a grid of one program per work item."""
    pid = _launch_index()
    heads = tl.num_programs(0).to(tl.int64) * tl.num_programs(1) // (num_blocks * TILES_PER_BLOCK)
    return _work_item(pid, block_order, num_blocks, heads, HEADS_FASTEST, TILES_PER_BLOCK)


# Persistent grids (PERSISTENT, issue #16): ops launches min(work items, k x SMs) programs on
# one axis; program p takes items p, p + P, p + 2P, ... (static stride: the work list is
# busiest first, so each program's first items are the long ones), or with QUEUE its first
# item p and then whatever an atomic counter (zeroed per launch) hands out next, a
# longest-first queue that balances programs whose items took unequal time. The kernels
# below write each item's body as one jit function (_fwd_program, _dq_program,
# _dkdv_program) called once per program or once per drained item.


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, t0, t1, idx_ptr, bits_ptr, mask_ptr, k_base, v_base, k_desc, v_desc, stride_kn,
               stride_vn, q_row_in_block, qk_scale, kv_len,
               LBK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
               D: tl.constexpr, DV: tl.constexpr, WORDS: tl.constexpr, LBQ: tl.constexpr,
               IS_PARTIAL: tl.constexpr, EVEN_KV: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
               USE_TMA: tl.constexpr, WIDE_ROWS: tl.constexpr, WS: tl.constexpr):
    TILES: tl.constexpr = LBK // BN
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    for t in tl.range(t0, t1, warp_specialize=WS):
        j = t // TILES  # CSR entry
        kb = tl.load(idx_ptr + j)
        col0 = (t % TILES) * BN  # first column of this tile inside its layout block
        n0 = (kb * LBK + col0).to(tl.int32)  # first key of the tile (t is int64: CSR offsets; TMA wants int32)
        k = _load_tile(k_base, k_desc, n0, stride_kn, offs_d, kv_len, BN, D, BD, EVEN_KV, UPCAST, USE_TMA, WIDE_ROWS)  # [BN, BD]
        s = _dot(q, tl.trans(k), IEEE)  # [BM, BN], unscaled
        if IS_PARTIAL:
            cols = col0 + tl.arange(0, BN)
            mask = tl.load(mask_ptr + j).to(tl.int64)  # which packed mask (row of bits) this entry uses
            keep = _mask_bits(bits_ptr + mask * (LBQ * WORDS), q_row_in_block[:, None], cols[None, :], WORDS)
            s = tl.where(keep, s, float("-inf"))  # ragged keys are already cleared in the bits
        elif not EVEN_KV:
            s = tl.where((n0 + tl.arange(0, BN) < kv_len)[None, :], s, float("-inf"))
        # m is kept in scaled log2 units; scaling the row max (not S) lets s * scale - m be one FMA
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        if IS_PARTIAL or not EVEN_KV:
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: keep exp2 finite
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, v_desc, n0, stride_vn, offs_dv, kv_len, BN, DV, BDV, EVEN_KV, UPCAST, USE_TMA, WIDE_ROWS)  # [BN, BDV]
        acc = _dot_acc(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
        m_i = m_new
    return acc, m_i, l_i


@_jit("num_q_blocks", "num_bh", "total_work", "stride_lb", "stride_lh")
def block_sparse_fwd_kernel(
    Q, K, V, Out, Lse,
    full_off, full_idx, part_off, part_idx, part_bits, part_mask, q_block_order, Counter,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_lb, stride_lh,
    qk_scale, q_len, kv_len, num_q_heads, group_size, num_q_blocks, num_bh, total_work,
    PER_HEAD: tl.constexpr, HEADS_FASTEST: tl.constexpr, LBQ: tl.constexpr, LBK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, WORDS: tl.constexpr,
    EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
    WIDE_ROWS: tl.constexpr, PERSISTENT: tl.constexpr = False, QUEUE: tl.constexpr = False,
    WS: tl.constexpr = False,
):
    """Inner dims of q/k/v/out must be contiguous (stride 1). USE_TMA: k and v tiles arrive
    through TMA descriptors (ops.tma_allowed says when the strides allow it). PERSISTENT /
    QUEUE: a persistent grid drains `total_work` = query tiles x `num_bh` items (Counter: a
    zeroed int32 for QUEUE, else unread); WS: warp-specialised inner loops."""
    TPB: tl.constexpr = LBQ // BM
    if PERSISTENT:
        nprog = tl.num_programs(0).to(tl.int64)
        w = tl.program_id(0).to(tl.int64)
        while w < total_work:
            qt, bh = _work_item(w, q_block_order, num_q_blocks, num_bh, HEADS_FASTEST, TPB)
            _fwd_program(qt, bh, Q, K, V, Out, Lse, full_off, full_idx, part_off, part_idx, part_bits, part_mask,
                         stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                         stride_vn, stride_ob, stride_oh, stride_on, stride_lb, stride_lh, qk_scale, q_len, kv_len,
                         num_q_heads, group_size, num_q_blocks, PER_HEAD, LBQ, LBK, BM, BN, BD, BDV, D, DV, WORDS,
                         EVEN_Q, EVEN_KV, IEEE, UPCAST, USE_TMA, WIDE_ROWS, WS)
            if QUEUE:  # the next item from a shared counter: programs that finish early take more
                w = tl.atomic_add(Counter, 1).to(tl.int64) + nprog
            else:  # a static stride
                w += nprog
    else:
        qt, bh = _program_tile(q_block_order, num_q_blocks, HEADS_FASTEST, TPB)
        _fwd_program(qt, bh, Q, K, V, Out, Lse, full_off, full_idx, part_off, part_idx, part_bits, part_mask,
                     stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                     stride_vn, stride_ob, stride_oh, stride_on, stride_lb, stride_lh, qk_scale, q_len, kv_len,
                     num_q_heads, group_size, num_q_blocks, PER_HEAD, LBQ, LBK, BM, BN, BD, BDV, D, DV, WORDS,
                     EVEN_Q, EVEN_KV, IEEE, UPCAST, USE_TMA, WIDE_ROWS, WS)


@triton.jit
def _fwd_program(
    qt, bh, Q, K, V, Out, Lse, full_off, full_idx, part_off, part_idx, part_bits, part_mask,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on, stride_lb, stride_lh, qk_scale, q_len, kv_len, num_q_heads, group_size,
    num_q_blocks,
    PER_HEAD: tl.constexpr, LBQ: tl.constexpr, LBK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, WORDS: tl.constexpr,
    EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
    WIDE_ROWS: tl.constexpr, WS: tl.constexpr,
):
    """One query tile `qt` of batch*head `bh`: the forward's work item."""
    b = (bh // num_q_heads).to(tl.int64)
    h = bh % num_q_heads
    hk = h // group_size  # GQA: the kv head is read in place, never repeated
    q0 = qt * BM
    row = q0 // LBQ  # layout row of this tile
    if PER_HEAD:
        row += h * num_q_blocks
    TILES: tl.constexpr = LBK // BN

    offs_m = q0 + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    q = _load_rows(Q + b * stride_qb + h.to(tl.int64) * stride_qh, q0, stride_qn, offs_d, q_len, BM, D, BD, EVEN_Q,
                   UPCAST, WIDE_ROWS)  # [BM, BD]
    k_base = K + b * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b * stride_vb + hk.to(tl.int64) * stride_vh
    # TMA descriptors of this head's (kv_len, D) k and v in BN-row boxes (rows and columns past
    # the ends read as 0); made inline: Triton 3.6 returns no descriptor from a jit function
    k_desc = None
    v_desc = None
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_base, shape=[kv_len, D], strides=[stride_kn, 1], block_shape=[BN, BD])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[kv_len, DV], strides=[stride_vn, 1], block_shape=[BN, BDV])
    q_row_in_block = q0 % LBQ + tl.arange(0, BM)

    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)

    f0 = tl.load(full_off + row) * TILES
    f1 = tl.load(full_off + row + 1) * TILES
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, f0, f1, full_idx, part_bits, part_mask, k_base, v_base, k_desc,
                               v_desc, stride_kn, stride_vn, q_row_in_block, qk_scale, kv_len, LBK, BM, BN, BD, BDV,
                               D, DV, WORDS, LBQ, False, EVEN_KV, IEEE, UPCAST, USE_TMA, WIDE_ROWS, WS)
    p0 = tl.load(part_off + row) * TILES
    p1 = tl.load(part_off + row + 1) * TILES
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, p0, p1, part_idx, part_bits, part_mask, k_base, v_base, k_desc,
                               v_desc, stride_kn, stride_vn, q_row_in_block, qk_scale, kv_len, LBK, BM, BN, BD, BDV,
                               D, DV, WORDS, LBQ, True, EVEN_KV, IEEE, UPCAST, USE_TMA, WIDE_ROWS, False)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]  # empty rows: acc is 0, so 0
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    o_ptrs = (Out + b * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None].to(tl.int64) * stride_on
              + offs_dv[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < q_len) & (offs_dv[None, :] < DV))
    tl.store(Lse + b * stride_lb + h.to(tl.int64) * stride_lh + offs_m, lse, mask=offs_m < q_len)


# ---------------------------------------------------------------------------- backward
@triton.jit  # its strides are the padded row statistics' (ops._bwd_row_stats), or dlse's when given
def bwd_preprocess_kernel(
    Out, DO, Lse, DLse, Delta, Lse2,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    stride_lb, stride_lh,
    stride_dlb, stride_dlh, stride_dln,
    q_len, num_q_heads,
    HAS_DLSE: tl.constexpr, BM: tl.constexpr, BDV: tl.constexpr, DV: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse and lse2 = lse * log2(e) (+inf where lse = -inf), read
    straight from the half-precision tensors in one pass (fp32 copies of O and dO would cost
    four times the traffic). Delta/Lse2 share Lse's strides."""
    pid = _launch_index()  # grid (query tiles, B * Hq), folded like the others' (ops._grid)
    tiles = tl.cdiv(q_len, BM)
    bh = pid // tiles
    b = bh // num_q_heads
    h = bh % num_q_heads
    offs_m = (pid % tiles).to(tl.int32) * BM + tl.arange(0, BM)
    rows = offs_m[:, None].to(tl.int64)
    offs_d = tl.arange(0, BDV)
    in_q = offs_m < q_len
    mask = in_q[:, None] & (offs_d[None, :] < DV)
    o = tl.load(Out + b * stride_ob + h * stride_oh + rows * stride_on + offs_d[None, :], mask=mask,
                other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows * stride_don + offs_d[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)  # [BM]
    if HAS_DLSE:
        delta -= tl.load(DLse + b * stride_dlb + h * stride_dlh + offs_m.to(tl.int64) * stride_dln, mask=in_q,
                         other=0.0).to(tl.float32)
    stat = b * stride_lb + h * stride_lh + offs_m
    lse = tl.load(Lse + stat, mask=in_q, other=0.0)
    tl.store(Delta + stat, delta, mask=in_q)
    tl.store(Lse2 + stat, tl.where(lse == float("-inf"), float("inf"), lse / LN2), mask=in_q)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, t0, t1, idx_ptr, bits_ptr, mask_ptr, k_base, v_base, k_desc, v_desc,
              stride_kn, stride_vn, q_row_in_block, qk_scale, kv_len,
              LBK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
              D: tl.constexpr, DV: tl.constexpr, WORDS: tl.constexpr, LBQ: tl.constexpr,
              IS_PARTIAL: tl.constexpr, EVEN_KV: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
              USE_TMA: tl.constexpr, WIDE_ROWS: tl.constexpr, WS: tl.constexpr):
    TILES: tl.constexpr = LBK // BN
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    for t in tl.range(t0, t1, warp_specialize=WS):
        j = t // TILES
        kb = tl.load(idx_ptr + j)
        col0 = (t % TILES) * BN
        n0 = (kb * LBK + col0).to(tl.int32)
        k = _load_tile(k_base, k_desc, n0, stride_kn, offs_d, kv_len, BN, D, BD, EVEN_KV, UPCAST, USE_TMA, WIDE_ROWS)  # [BN, BD]
        v = _load_tile(v_base, v_desc, n0, stride_vn, offs_dv, kv_len, BN, DV, BDV, EVEN_KV, UPCAST, USE_TMA, WIDE_ROWS)  # [BN, BDV]
        s = _dot(q, tl.trans(k), IEEE) * qk_scale  # [BM, BN]
        p = tl.exp2(s - lse2[:, None])
        if IS_PARTIAL:
            cols = col0 + tl.arange(0, BN)
            mask = tl.load(mask_ptr + j).to(tl.int64)  # which packed mask (row of bits) this entry uses
            keep = _mask_bits(bits_ptr + mask * (LBQ * WORDS), q_row_in_block[:, None], cols[None, :], WORDS)
            p = tl.where(keep, p, 0.0)
        elif not EVEN_KV:
            p = tl.where((n0 + tl.arange(0, BN) < kv_len)[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), IEEE)  # [BM, BN]
        ds = p * (dp - delta[:, None])
        dq = _dot_acc(ds.to(k.dtype), k, dq, IEEE)
    return dq


@_jit("num_q_blocks", "num_bh", "total_work")
def block_sparse_bwd_dq_kernel(
    Q, K, V, DO, GradQ, Lse2, Delta,
    full_off, full_idx, part_off, part_idx, part_bits, part_mask, q_block_order, Counter,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_lb, stride_lh,
    qk_scale, scale, q_len, kv_len, num_q_heads, group_size, num_q_blocks, num_bh, total_work,
    PER_HEAD: tl.constexpr, HEADS_FASTEST: tl.constexpr, LBQ: tl.constexpr, LBK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, WORDS: tl.constexpr,
    EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
    WIDE_ROWS: tl.constexpr, PERSISTENT: tl.constexpr = False, QUEUE: tl.constexpr = False,
    WS: tl.constexpr = False,
):
    """PERSISTENT / QUEUE / WS as the forward's."""
    TPB: tl.constexpr = LBQ // BM
    if PERSISTENT:
        nprog = tl.num_programs(0).to(tl.int64)
        w = tl.program_id(0).to(tl.int64)
        while w < total_work:
            qt, bh = _work_item(w, q_block_order, num_q_blocks, num_bh, HEADS_FASTEST, TPB)
            _dq_program(qt, bh, Q, K, V, DO, GradQ, Lse2, Delta, full_off, full_idx, part_off, part_idx, part_bits,
                        part_mask, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb,
                        stride_vh, stride_vn, stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
                        stride_lb, stride_lh, qk_scale, scale, q_len, kv_len, num_q_heads, group_size, num_q_blocks,
                        PER_HEAD, LBQ, LBK, BM, BN, BD, BDV, D, DV, WORDS, EVEN_Q, EVEN_KV, IEEE, UPCAST, USE_TMA,
                        WIDE_ROWS, WS)
            if QUEUE:  # the next item from a shared counter: programs that finish early take more
                w = tl.atomic_add(Counter, 1).to(tl.int64) + nprog
            else:  # a static stride
                w += nprog
    else:
        qt, bh = _program_tile(q_block_order, num_q_blocks, HEADS_FASTEST, TPB)
        _dq_program(qt, bh, Q, K, V, DO, GradQ, Lse2, Delta, full_off, full_idx, part_off, part_idx, part_bits,
                    part_mask, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb,
                    stride_vh, stride_vn, stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
                    stride_lb, stride_lh, qk_scale, scale, q_len, kv_len, num_q_heads, group_size, num_q_blocks,
                    PER_HEAD, LBQ, LBK, BM, BN, BD, BDV, D, DV, WORDS, EVEN_Q, EVEN_KV, IEEE, UPCAST, USE_TMA,
                    WIDE_ROWS, WS)


@triton.jit
def _dq_program(
    qt, bh, Q, K, V, DO, GradQ, Lse2, Delta, full_off, full_idx, part_off, part_idx, part_bits, part_mask,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn, stride_lb, stride_lh,
    qk_scale, scale, q_len, kv_len, num_q_heads, group_size, num_q_blocks,
    PER_HEAD: tl.constexpr, LBQ: tl.constexpr, LBK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, WORDS: tl.constexpr,
    EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr,
    WIDE_ROWS: tl.constexpr, WS: tl.constexpr,
):
    """dQ of one query tile `qt` of batch*head `bh`: the dq kernel's work item."""
    b = (bh // num_q_heads).to(tl.int64)
    h = bh % num_q_heads
    hk = h // group_size
    q0 = qt * BM
    row = q0 // LBQ
    if PER_HEAD:
        row += h * num_q_blocks
    TILES: tl.constexpr = LBK // BN

    offs_m = q0 + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    h64 = h.to(tl.int64)
    q = _load_rows(Q + b * stride_qb + h64 * stride_qh, q0, stride_qn, offs_d, q_len, BM, D, BD, EVEN_Q, UPCAST, WIDE_ROWS)
    do = _load_rows(DO + b * stride_dob + h64 * stride_doh, q0, stride_don, offs_dv, q_len, BM, DV, BDV, EVEN_Q,
                    UPCAST, WIDE_ROWS)
    stat = b * stride_lb + h64 * stride_lh + offs_m
    lse2, delta = _load_row_stats(Lse2, Delta, stat, offs_m, q_len, EVEN_Q)
    k_base = K + b * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b * stride_vb + hk.to(tl.int64) * stride_vh
    # TMA descriptors of this head's (kv_len, D) k and v in BN-row boxes (rows and columns past
    # the ends read as 0); made inline: Triton 3.6 returns no descriptor from a jit function
    k_desc = None
    v_desc = None
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_base, shape=[kv_len, D], strides=[stride_kn, 1], block_shape=[BN, BD])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[kv_len, DV], strides=[stride_vn, 1], block_shape=[BN, BDV])
    q_row_in_block = q0 % LBQ + tl.arange(0, BM)

    dq = tl.zeros([BM, BD], dtype=tl.float32)
    f0 = tl.load(full_off + row) * TILES
    f1 = tl.load(full_off + row + 1) * TILES
    dq = _dq_tiles(dq, q, do, lse2, delta, f0, f1, full_idx, part_bits, part_mask, k_base, v_base, k_desc, v_desc,
                   stride_kn, stride_vn, q_row_in_block, qk_scale, kv_len, LBK, BM, BN, BD, BDV, D, DV, WORDS, LBQ,
                   False, EVEN_KV, IEEE, UPCAST, USE_TMA, WIDE_ROWS, WS)
    p0 = tl.load(part_off + row) * TILES
    p1 = tl.load(part_off + row + 1) * TILES
    dq = _dq_tiles(dq, q, do, lse2, delta, p0, p1, part_idx, part_bits, part_mask, k_base, v_base, k_desc, v_desc,
                   stride_kn, stride_vn, q_row_in_block, qk_scale, kv_len, LBK, BM, BN, BD, BDV, D, DV, WORDS, LBQ,
                   True, EVEN_KV, IEEE, UPCAST, USE_TMA, WIDE_ROWS, False)
    dq_ptrs = (GradQ + b * stride_dqb + h64 * stride_dqh + offs_m[:, None].to(tl.int64) * stride_dqn
               + offs_d[None, :])
    tl.store(dq_ptrs, (dq * scale).to(GradQ.dtype.element_ty), mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < D))


@triton.jit
def _dkdv_tiles(dk, dv, k, v, t0, t1, idx_ptr, entry_ptr, bits_ptr, q_base, do_base, q_desc, do_desc, dq_base,
                stat_base, stride_qn, stride_don, stride_dqn, Lse2, Delta, offs_n, kv_col_in_block, qk_scale, scale,
                q_len, kv_len,
                LBQ: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                D: tl.constexpr, DV: tl.constexpr, WORDS: tl.constexpr, IS_PARTIAL: tl.constexpr,
                EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                FUSED_DQ: tl.constexpr, USE_TMA: tl.constexpr, WIDE_ROWS: tl.constexpr, WS: tl.constexpr):
    """dK/dV of one kv tile over a run of transposed-CSR tiles; with FUSED_DQ also each tile
    pair's dQ share (dS K * scale), added atomically in fp32 at dq_base."""
    TILES: tl.constexpr = LBQ // BM
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    for t in tl.range(t0, t1, warp_specialize=WS):
        j = t // TILES  # transposed-CSR entry
        qb = tl.load(idx_ptr + j)
        row0 = (t % TILES) * BM  # first query row of this tile inside its layout block
        m0 = (qb * LBQ + row0).to(tl.int32)  # first query of the tile (int32 for TMA)
        offs_m = m0 + tl.arange(0, BM)
        q = _load_tile(q_base, q_desc, m0, stride_qn, offs_d, q_len, BM, D, BD, EVEN_Q, UPCAST, USE_TMA, WIDE_ROWS)  # [BM, BD]
        do = _load_tile(do_base, do_desc, m0, stride_don, offs_dv, q_len, BM, DV, BDV, EVEN_Q, UPCAST,
                        USE_TMA, WIDE_ROWS)  # [BM, BDV]
        lse2, delta = _load_row_stats(Lse2, Delta, stat_base + offs_m, offs_m, q_len, EVEN_Q)
        st = _dot(k, tl.trans(q), IEEE) * qk_scale  # [BN, BM] = S^T
        pt = tl.exp2(st - lse2[None, :])
        if IS_PARTIAL:
            entry = tl.load(entry_ptr + j).to(tl.int64)  # the packed mask (row of bits) of this block
            rows = row0 + tl.arange(0, BM)
            keep = _mask_bits(bits_ptr + entry * (LBQ * WORDS), rows[None, :], kv_col_in_block[:, None], WORDS)
            pt = tl.where(keep, pt, 0.0)
        elif FUSED_DQ and not EVEN_KV:
            # keys past kv_len (zero rows of k) must not reach dQ: exp2(0 - lse2) can overflow
            # (dK/dV of those rows are never stored)
            pt = tl.where((offs_n < kv_len)[:, None], pt, 0.0)
        dv = _dot_acc(pt.to(do.dtype), do, dv, IEEE)
        dpt = _dot(v, tl.trans(do), IEEE)  # [BN, BM] = dP^T
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)  # [BN, BM] = dS^T
        dk = _dot_acc(dst, q, dk, IEEE)
        if FUSED_DQ:
            dq = _dot(tl.trans(dst), k, IEEE) * scale  # [BM, BD], this kv tile's share of dQ
            dq_rows = tl.arange(0, BM)[:, None]
            if WIDE_ROWS:
                dq_rows = dq_rows.to(tl.int64)
            dq_ptrs = dq_base + m0.to(tl.int64) * stride_dqn + (dq_rows * stride_dqn + offs_d[None, :])
            if EVEN_Q and D == BD:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < D), sem="relaxed")
    return dk, dv


@_jit("num_kv_blocks", "num_bh", "total_work")
def block_sparse_bwd_dkdv_kernel(
    Q, K, V, DO, GradQAcc, GradK, GradV, Lse2, Delta,
    tfull_off, tfull_idx, tpart_off, tpart_idx, tpart_mask, part_bits, kv_block_order, Counter,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh,
    qk_scale, scale, q_len, kv_len, num_kv_heads, group_size, num_kv_blocks, num_bh, total_work,
    PER_HEAD: tl.constexpr, HEADS_FASTEST: tl.constexpr, LBQ: tl.constexpr, LBK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, WORDS: tl.constexpr,
    EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, FUSED_DQ: tl.constexpr,
    USE_TMA: tl.constexpr, WIDE_ROWS: tl.constexpr, PERSISTENT: tl.constexpr = False, QUEUE: tl.constexpr = False,
    WS: tl.constexpr = False,
):
    """One program per (kv tile, batch * kv head), walking the transposed layout for every query
    head of the GQA group (in order: deterministic dK/dV sums). FUSED_DQ: the one-pass backward,
    which also adds each tile pair's dQ share into GradQAcc (fp32, zero-filled, [B, Hq, Nq, D],
    scale applied); otherwise GradQAcc is unused and dQ comes from the dq kernel.
    PERSISTENT / QUEUE / WS as the forward's (items: kv tiles x `num_bh` = B * Hkv)."""
    TPB: tl.constexpr = LBK // BN
    if PERSISTENT:
        nprog = tl.num_programs(0).to(tl.int64)
        w = tl.program_id(0).to(tl.int64)
        while w < total_work:
            kt, bh = _work_item(w, kv_block_order, num_kv_blocks, num_bh, HEADS_FASTEST, TPB)
            _dkdv_program(kt, bh, Q, K, V, DO, GradQAcc, GradK, GradV, Lse2, Delta, tfull_off, tfull_idx, tpart_off, tpart_idx,
                          tpart_mask, part_bits, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don, stride_dqb,
                          stride_dqh, stride_dqn, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh,
                          stride_dvn, stride_lb, stride_lh, qk_scale, scale, q_len, kv_len, num_kv_heads,
                          group_size, num_kv_blocks, PER_HEAD, LBQ, LBK, BM, BN, BD, BDV, D, DV, WORDS, EVEN_Q,
                          EVEN_KV, IEEE, UPCAST, FUSED_DQ, USE_TMA, WIDE_ROWS, WS)
            if QUEUE:  # the next item from a shared counter: programs that finish early take more
                w = tl.atomic_add(Counter, 1).to(tl.int64) + nprog
            else:  # a static stride
                w += nprog
    else:
        kt, bh = _program_tile(kv_block_order, num_kv_blocks, HEADS_FASTEST, TPB)
        _dkdv_program(kt, bh, Q, K, V, DO, GradQAcc, GradK, GradV, Lse2, Delta, tfull_off, tfull_idx, tpart_off, tpart_idx,
                      tpart_mask, part_bits, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don, stride_dqb,
                      stride_dqh, stride_dqn, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh,
                      stride_dvn, stride_lb, stride_lh, qk_scale, scale, q_len, kv_len, num_kv_heads,
                      group_size, num_kv_blocks, PER_HEAD, LBQ, LBK, BM, BN, BD, BDV, D, DV, WORDS, EVEN_Q,
                      EVEN_KV, IEEE, UPCAST, FUSED_DQ, USE_TMA, WIDE_ROWS, WS)


@triton.jit
def _dkdv_program(
    kt, bh, Q, K, V, DO, GradQAcc, GradK, GradV, Lse2, Delta, tfull_off, tfull_idx, tpart_off, tpart_idx, tpart_mask,
    part_bits, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn, stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn, stride_lb, stride_lh, qk_scale, scale, q_len, kv_len, num_kv_heads,
    group_size, num_kv_blocks,
    PER_HEAD: tl.constexpr, LBQ: tl.constexpr, LBK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, WORDS: tl.constexpr,
    EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, FUSED_DQ: tl.constexpr,
    USE_TMA: tl.constexpr, WIDE_ROWS: tl.constexpr, WS: tl.constexpr,
):
    """dK/dV (and with FUSED_DQ dQ shares) of one kv tile `kt` of batch*kv head `bh`."""
    b = (bh // num_kv_heads).to(tl.int64)
    hk = bh % num_kv_heads
    n0 = kt * BN
    kv_block = n0 // LBK
    TILES: tl.constexpr = LBQ // BM

    offs_n = n0 + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    hk64 = hk.to(tl.int64)
    k = _load_rows(K + b * stride_kb + hk64 * stride_kh, n0, stride_kn, offs_d, kv_len, BN, D, BD, EVEN_KV, UPCAST, WIDE_ROWS)
    v = _load_rows(V + b * stride_vb + hk64 * stride_vh, n0, stride_vn, offs_dv, kv_len, BN, DV, BDV, EVEN_KV,
                   UPCAST, WIDE_ROWS)
    kv_col_in_block = n0 % LBK + tl.arange(0, BN)

    dk = tl.zeros([BN, BD], dtype=tl.float32)
    dv = tl.zeros([BN, BDV], dtype=tl.float32)
    for g in range(0, group_size):  # every query head reading this kv head, in order
        h = (hk * group_size + g).to(tl.int64)
        col = kv_block
        if PER_HEAD:
            col += h * num_kv_blocks
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        dq_base = GradQAcc + b * stride_dqb + h * stride_dqh
        stat_base = b * stride_lb + h * stride_lh
        q_desc = None
        do_desc = None
        if USE_TMA:  # as the forward's: this head's q and dO in BM-row boxes
            q_desc = tl.make_tensor_descriptor(q_base, shape=[q_len, D], strides=[stride_qn, 1], block_shape=[BM, BD])
            do_desc = tl.make_tensor_descriptor(do_base, shape=[q_len, DV], strides=[stride_don, 1],
                                                block_shape=[BM, BDV])
        f0 = tl.load(tfull_off + col) * TILES
        f1 = tl.load(tfull_off + col + 1) * TILES
        dk, dv = _dkdv_tiles(dk, dv, k, v, f0, f1, tfull_idx, tpart_mask, part_bits, q_base, do_base, q_desc, do_desc,
                             dq_base, stat_base, stride_qn, stride_don, stride_dqn, Lse2, Delta, offs_n,
                             kv_col_in_block, qk_scale, scale, q_len, kv_len, LBQ, BM, BN, BD, BDV, D, DV, WORDS,
                             False, EVEN_Q, EVEN_KV, IEEE, UPCAST, FUSED_DQ, USE_TMA, WIDE_ROWS, WS)
        p0 = tl.load(tpart_off + col) * TILES
        p1 = tl.load(tpart_off + col + 1) * TILES
        dk, dv = _dkdv_tiles(dk, dv, k, v, p0, p1, tpart_idx, tpart_mask, part_bits, q_base, do_base, q_desc, do_desc,
                             dq_base, stat_base, stride_qn, stride_don, stride_dqn, Lse2, Delta, offs_n,
                             kv_col_in_block, qk_scale, scale, q_len, kv_len, LBQ, BM, BN, BD, BDV, D, DV, WORDS,
                             True, EVEN_Q, EVEN_KV, IEEE, UPCAST, FUSED_DQ, USE_TMA, WIDE_ROWS, False)
    in_kv = offs_n[:, None] < kv_len
    rows = offs_n[:, None].to(tl.int64)
    dk_ptrs = GradK + b * stride_dkb + hk64 * stride_dkh + rows * stride_dkn + offs_d[None, :]
    tl.store(dk_ptrs, (dk * scale).to(GradK.dtype.element_ty), mask=in_kv & (offs_d[None, :] < D))
    dv_ptrs = GradV + b * stride_dvb + hk64 * stride_dvh + rows * stride_dvn + offs_dv[None, :]
    tl.store(dv_ptrs, dv.to(GradV.dtype.element_ty), mask=in_kv & (offs_dv[None, :] < DV))


# ------------------------------------------------------------ backward, one grid (COMBINED)
@_jit("num_q_blocks", "num_kv_blocks", "num_q_bh", "num_kv_bh", "kv_work")
def block_sparse_bwd_combined_kernel(
    Q, K, V, DO, GradQ, GradK, GradV, Lse2, Delta,
    full_off, full_idx, part_off, part_idx, part_bits, part_mask, q_block_order,
    tfull_off, tfull_idx, tpart_off, tpart_idx, tpart_mask, kv_block_order,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh,
    qk_scale, scale, q_len, kv_len, num_q_heads, num_kv_heads, group_size, num_q_blocks, num_kv_blocks,
    num_q_bh, num_kv_bh, kv_work,
    PER_HEAD: tl.constexpr, Q_HEADS_FASTEST: tl.constexpr, KV_HEADS_FASTEST: tl.constexpr, LBQ: tl.constexpr,
    LBK: tl.constexpr, DQ_BM: tl.constexpr, DQ_BN: tl.constexpr, KV_BM: tl.constexpr, KV_BN: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, WORDS: tl.constexpr,
    EVEN_Q: tl.constexpr, EVEN_KV: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, DQ_TMA: tl.constexpr,
    KV_TMA: tl.constexpr, WIDE_ROWS: tl.constexpr,
):
    """The deterministic backward's dk/dv and dq programs in one grid (FlexAttention's
    arrangement: the two program sets fill each other's tails instead of running as two
    launches). The first `kv_work` programs are dk/dv work items, the rest dq ones; every output
    element is still written by exactly one program, summed in the same order: bitwise the
    three-launch result."""
    pid = _launch_index()
    if pid < kv_work:
        kt, bh = _work_item(pid, kv_block_order, num_kv_blocks, num_kv_bh, KV_HEADS_FASTEST, LBK // KV_BN)
        _dkdv_program(kt, bh, Q, K, V, DO, GradK, GradK, GradV, Lse2, Delta, tfull_off, tfull_idx, tpart_off,
                      tpart_idx, tpart_mask, part_bits, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh,
                      stride_kn, stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don, stride_dkb,
                      stride_dkh, stride_dkn, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                      stride_lb, stride_lh, qk_scale, scale, q_len, kv_len, num_kv_heads, group_size, num_kv_blocks,
                      PER_HEAD, LBQ, LBK, KV_BM, KV_BN, BD, BDV, D, DV, WORDS, EVEN_Q, EVEN_KV, IEEE, UPCAST, False,
                      KV_TMA, WIDE_ROWS, False)
    else:
        qt, bh = _work_item(pid - kv_work, q_block_order, num_q_blocks, num_q_bh, Q_HEADS_FASTEST, LBQ // DQ_BM)
        _dq_program(qt, bh, Q, K, V, DO, GradQ, Lse2, Delta, full_off, full_idx, part_off, part_idx, part_bits,
                    part_mask, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb,
                    stride_vh, stride_vn, stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
                    stride_lb, stride_lh, qk_scale, scale, q_len, kv_len, num_q_heads, group_size, num_q_blocks,
                    PER_HEAD, LBQ, LBK, DQ_BM, DQ_BN, BD, BDV, D, DV, WORDS, EVEN_Q, EVEN_KV, IEEE, UPCAST, DQ_TMA,
                    WIDE_ROWS, False)

