"""Top-k and block top-k attention against their O(N^2) naive references (float64), dense
attention when k covers everything, the selection rules, bounded memory, gradients and
argument errors."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from sa_testing import HostReadError, LargestTensor, NoHostReads, assert_fp32_close, assert_low_precision_close, max_abs_err, reference_f64

from sparse_attn import patterns as P
from sparse_attn._lru import LRU
from sparse_attn.ops.topk import block_topk_attention, select_kv_blocks, topk_attention
from sparse_attn.ops.topk import chunk as topk_chunk
from sparse_attn.ops.topk import block as block_module
from sparse_attn.ops.topk.block import _block_means, _select, device_selection_layout, selection_layout, selection_pattern
from sparse_attn.patterns.grid import BlockGrid
from sparse_attn.ops.topk.naive import (
    block_topk_attention_naive,
    select_kv_blocks_naive,
    topk_attention_naive,
)

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def qkv(b, hq, nq, d, *, hkv=None, nkv=None, dv=None, dtype=F64, device="cpu"):
    hkv = hq if hkv is None else hkv
    nkv = nq if nkv is None else nkv
    dv = d if dv is None else dv
    shapes = ((b, hq, nq, d), (b, hkv, nkv, d), (b, hkv, nkv, dv))
    return tuple(torch.randn(shape, dtype=dtype, device=device) for shape in shapes)


def grads(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    return out.detach(), torch.autograd.grad((out * dout).sum(), (q, k, v))




# ============================================================================ top-k
# (B, Hq, Hkv, Nq, Nkv, D, Dv, top_k, chunk_size, q_offset)
TOPK_CASES = [
    (1, 2, 2, 1, 1, 8, 8, 1, None, None),  # N = 1
    (2, 4, 2, 113, 113, 8, 5, 7, 16, None),  # GQA, Dv != D, chunks of 16 (last one ragged)
    (1, 2, 1, 30, 203, 16, 8, 50, 7, None),  # Nq < Nkv: queries are the last 30 positions
    (1, 3, 3, 203, 203, 8, 8, 13, 64, None),
    (1, 2, 1, 20, 50, 8, 8, 6, 3, 10),  # queries in the middle (explicit q_offset)
    (1, 2, 2, 20, 50, 8, 8, 6, 8, 40),  # queries running past the last key
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", TOPK_CASES, ids=lambda c: "x".join(map(str, c)))
def test_topk_matches_naive(case, causal):
    b, hq, hkv, nq, nkv, d, dv, top_k, chunk, q_offset = case
    q, k, v = qkv(b, hq, nq, d, hkv=hkv, nkv=nkv, dv=dv)
    out = topk_attention(q, k, v, top_k, causal=causal, q_offset=q_offset, chunk_size=chunk)
    ref = topk_attention_naive(q, k, v, top_k, causal=causal, q_offset=q_offset)
    assert out.shape == (b, hq, nq, dv) and out.dtype == F64
    assert_fp32_close(out, ref, rtol=1e-12)


def test_topk_is_sparse():
    """The output depends on the top_k keys only: changing the other values changes nothing,
    changing a selected one does; top_k = 1 returns the best key's value."""
    q, k, v = qkv(1, 2, 40, 8, nkv=60)
    top_k = 5
    out = topk_attention(q, k, v, top_k, chunk_size=16)
    scores = q @ k.transpose(-1, -2)  # [1, 2, 40, 60]
    chosen = scores.topk(top_k, dim=-1).indices
    # the keys no query of head 0 row 0 selects: change their values everywhere
    unused = torch.ones(60, dtype=torch.bool)
    unused[chosen[0, :, 0].reshape(-1)] = False
    v2 = v.clone()
    v2[:, :, unused] += 100.0
    assert torch.allclose(topk_attention(q, k, v2, top_k)[:, :, 0], out[:, :, 0], rtol=0, atol=1e-12)
    v3 = v.clone()
    v3[0, 0, chosen[0, 0, 0, 0]] += 1.0
    assert max_abs_err(topk_attention(q, k, v3, top_k)[0, 0, 0], out[0, 0, 0]) > 1e-3
    best = scores.argmax(-1)  # [1, 2, 40]
    expected = torch.gather(v, 2, best[..., None].expand(-1, -1, -1, 8))
    assert torch.equal(topk_attention(q, k, v, 1), expected)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nkv,hkv", [(113, 113, 2), (17, 203, 1)])
def test_topk_covering_every_key_is_dense(causal, nq, nkv, hkv):
    q, k, v = qkv(2, 4, nq, 16, hkv=hkv, nkv=nkv, dv=12)
    out = topk_attention(q, k, v, nkv + 5, causal=causal, chunk_size=32)
    assert_fp32_close(out, reference_f64(q, k, v, P.causal() if causal else P.full()), rtol=1e-12)
    # and SDPA (queries are the last positions: the causal mask is bottom-right aligned)
    mask = torch.ones(nq, nkv, dtype=torch.bool).tril(nkv - nq) if causal else None
    rep = 4 // hkv
    sdpa = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)
    assert_fp32_close(out, sdpa, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_topk_low_precision(dtype):
    """FlashAttention's rule against the naive reference run in the same precision."""
    q, k, v = qkv(1, 2, 77, 16, nkv=90, dtype=dtype)
    out = topk_attention(q, k, v, 9, causal=True, chunk_size=20)
    assert out.dtype == dtype
    ref_low = topk_attention_naive(q, k, v, 9, causal=True)
    ref64 = topk_attention_naive(q.double(), k.double(), v.double(), 9, causal=True)
    assert_low_precision_close(out, ref_low, ref64)


def test_topk_float32():
    q, k, v = qkv(1, 4, 64, 32, hkv=2, dtype=torch.float32)
    out = topk_attention(q, k, v, 8, causal=True, chunk_size=24)
    assert_fp32_close(out, topk_attention_naive(q.double(), k.double(), v.double(), 8, causal=True))


@pytest.mark.parametrize("causal", [False, True])
def test_topk_gradcheck(causal):
    # causal, Nq = Nkv: the first rows see fewer keys than top_k
    q, k, v = qkv(1, 2, 6, 3, hkv=1, dv=2)
    inputs = tuple(t.requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: topk_attention(q, k, v, 3, causal=causal, chunk_size=4), inputs)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nkv", [(113, 113), (60, 130)])
def test_topk_grads_match_naive(causal, nq, nkv):
    q, k, v = qkv(2, 4, nq, 8, hkv=2, nkv=nkv, dv=5)
    dout = torch.randn(2, 4, nq, 5, dtype=F64)
    out, g = grads(lambda q, k, v: topk_attention(q, k, v, 11, causal=causal, chunk_size=16), q, k, v, dout)
    ref, g_ref = grads(lambda q, k, v: topk_attention_naive(q, k, v, 11, causal=causal), q, k, v, dout)
    assert_fp32_close(out, ref, rtol=1e-12)
    for name, a, e in zip("qkv", g, g_ref):
        assert_fp32_close(a, e, rtol=1e-10, what=f"d{name}")


def test_topk_memory_is_chunked():
    """No op, forward or backward, makes a tensor anywhere near Nq x Nkv: the largest is the
    chunk's score block (chunk x Nkv)."""
    n, chunk = 4096, 64
    q, k, v = (t.requires_grad_(True) for t in qkv(1, 1, n, 16, dtype=torch.float32))
    with LargestTensor() as seen:
        out = topk_attention(q, k, v, 32, causal=True, chunk_size=chunk)
        out.sum().backward()
    assert chunk * n <= seen.largest <= 2 * chunk * n, seen.largest
    assert seen.largest < n * n // 16
    assert q.grad is not None and k.grad is not None and v.grad is not None


def test_topk_default_chunk_follows_the_budget(monkeypatch):
    monkeypatch.setattr(topk_chunk, "SCORE_BLOCK_ELEMENTS", 1 << 16)
    n = 2048
    assert topk_chunk.default_chunk_size(1, 2, n, 8, 16, 16) == (1 << 16) // (2 * n)
    # gathered keys + values dominate when top_k * (D + Dv) > Nkv
    assert topk_chunk.default_chunk_size(1, 1, 100, 100, 64, 64) == (1 << 16) // (100 * 128)
    assert topk_chunk.default_chunk_size(64, 64, 1 << 20, 8, 16, 16) == 1
    q, k, v = qkv(1, 2, n, 16, dtype=torch.float32)
    with LargestTensor() as seen:
        topk_attention(q, k, v, 8)
    assert seen.largest <= 1 << 16


def test_topk_no_keys_or_queries():
    q, k, v = qkv(1, 2, 5, 8, nkv=0, dv=3)
    q.requires_grad_(True)
    out = topk_attention(q, k, v, 4, q_offset=0)
    assert torch.equal(out, torch.zeros(1, 2, 5, 3, dtype=F64))
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))
    q, k, v = qkv(1, 2, 0, 8, nkv=6)
    assert topk_attention(q, k, v, 4, causal=True).shape == (1, 2, 0, 8)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(top_k=0), ValueError, r"top_k must be >= 1, got 0"),
    (dict(top_k=2.0), TypeError, "top_k must be an int, got float"),
    (dict(top_k=True), TypeError, "top_k must be an int, got bool"),
    (dict(top_k=2, chunk_size=0), ValueError, "chunk_size must be >= 1, got 0"),
    (dict(top_k=2, causal="yes"), TypeError, "causal must be a bool"),
    (dict(top_k=2, scale=-1.0), ValueError, "scale must be a positive finite float"),
    (dict(top_k=2, q_offset=-3), ValueError, "q_offset must be a non-negative int"),
])
def test_topk_bad_arguments(kwargs, error, match):
    q, k, v = qkv(1, 2, 8, 4)
    with pytest.raises(error, match=match):
        topk_attention(q, k, v, **kwargs)


def test_topk_bad_tensors():
    q, k, v = qkv(1, 3, 8, 4, hkv=2)
    with pytest.raises(ValueError, match=r"q heads \(3\) must be a multiple of k/v heads \(2\)"):
        topk_attention(q, k, v, 2)
    with pytest.raises(ValueError, match=r"q must have 4 dims.*\(3, 8, 4\)"):
        topk_attention(q[0], k, v, 2)
    q, k, v = qkv(1, 2, 8, 4)
    with pytest.raises(TypeError, match="q, k, v must share a dtype"):
        topk_attention(q.float(), k, v, 2)
    with pytest.raises(ValueError, match="q has more positions"):
        topk_attention(q, k[:, :, :4], v[:, :, :4], 2)


# ====================================================================== block top-k
def test_select_picks_the_obvious_block():
    """Every query points along u; kv block 2 (of 6) holds keys along 3u, the rest noise."""
    bs, d = 8, 16
    u = torch.zeros(d, dtype=F64)
    u[0] = 1.0
    q = u.expand(1, 1, 48, d).clone() + 0.01 * torch.randn(1, 1, 48, d, dtype=F64)
    k = 0.1 * torch.randn(1, 1, 48, d, dtype=F64)
    k[:, :, 16:24] += 3 * u
    k[:, :, 40:48] += 2 * u  # second best
    sel = select_kv_blocks(q, k, 1, bs)
    assert sel.shape == (1, 1, 6, 6)
    assert sel[0, 0].nonzero()[:, 1].tolist() == [2] * 6
    sel = select_kv_blocks(q, k, 2, bs)
    assert (sel[0, 0].nonzero()[:, 1].reshape(6, 2) == torch.tensor([2, 5])).all()
    # causal: future blocks are not eligible, the own block always is (within k)
    sel = select_kv_blocks(q, k, 1, bs, causal=True)
    assert torch.equal(sel[0, 0], torch.eye(6, dtype=torch.bool))
    sel = select_kv_blocks(q, k, 2, bs, causal=True)
    expected = torch.eye(6, dtype=torch.bool)
    expected[0, 0] = expected[1, 0] = expected[1, 1] = True  # block 1 only has blocks 0 and 1
    expected[3:, 2] = True  # blocks after 2 pick it next to themselves
    expected[2, 1] = bool(sel[0, 0, 2, 1])  # block 2: own block + the better of noise blocks 0, 1
    expected[2, 0] = not expected[2, 1]
    assert torch.equal(sel[0, 0], expected)


def test_select_ragged_last_block_divides_by_its_length():
    """The last kv block has 3 keys along 1.5u: its mean (1.5u) beats block 0's (1.0u) only
    if divided by 3, not by the block size."""
    bs, d = 16, 8
    u = torch.zeros(d, dtype=F64)
    u[0] = 1.0
    q = u.expand(1, 1, 35, d).clone()
    k = torch.zeros(1, 1, 35, d, dtype=F64)
    k[:, :, :16] = u
    k[:, :, 16:32] = -u
    k[:, :, 32:] = 1.5 * u
    sel = select_kv_blocks(q, k, 1, bs)
    assert sel[0, 0, :, 2].all() and sel.sum() == 3


def test_block_means_use_real_counts():
    x = torch.randn(2, 3, 10, 4, dtype=F64)
    means = _block_means(x, 3, 4, 4)  # slots 3..12 hold rows 0..9: blocks of 1, 4, 4, 1 rows
    expected = torch.stack([x[:, :, :1].mean(2), x[:, :, 1:5].mean(2), x[:, :, 5:9].mean(2), x[:, :, 9:].mean(2)], 2)
    assert torch.allclose(means, expected, rtol=1e-14, atol=0)


# (B, Hq, Hkv, Nq, Nkv, D, top_k_blocks, block_size, q_offset)
SELECT_CASES = [
    (2, 4, 2, 113, 113, 8, 3, 16, None),
    (1, 2, 1, 37, 203, 8, 2, 32, None),  # queries start mid-block (q_offset 166)
    (1, 2, 2, 1, 70, 8, 3, 16, None),  # decoding one token
    (1, 2, 1, 30, 50, 8, 2, 8, 40),  # queries running past the last key
    (1, 1, 1, 1, 1, 8, 1, 16, None),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", SELECT_CASES, ids=lambda c: "x".join(map(str, c)))
def test_select_matches_naive(case, causal):
    b, hq, hkv, nq, nkv, d, top_k, bs, q_offset = case
    q, k, _ = qkv(b, hq, nq, d, hkv=hkv, nkv=nkv)
    sel = select_kv_blocks(q, k, top_k, bs, causal=causal, q_offset=q_offset)
    assert torch.equal(sel, select_kv_blocks_naive(q, k, top_k, bs, causal=causal, q_offset=q_offset))
    first = (nkv - nq if q_offset is None else q_offset) // bs
    q_block = torch.arange(sel.shape[2])[:, None] + first
    kv_block = torch.arange(sel.shape[3])[None, :]
    eligible = (kv_block <= q_block) if causal else torch.ones_like(kv_block, dtype=torch.bool)
    assert not (sel & ~eligible).any()
    assert torch.equal(sel.sum(-1), torch.clamp(eligible.sum(-1), max=top_k).expand_as(sel[..., 0]))
    if causal:  # the own block, where it holds keys
        own = (kv_block == q_block) & (q_block < sel.shape[3])
        assert (sel | ~own).all()


ALWAYS = {
    "none": None,
    "streaming": P.streaming(2, 8),
    "window_nc": P.sliding_window(9, causal=False),
}


@pytest.mark.parametrize("backend", ["blocked", "reference"])
@pytest.mark.parametrize("always", list(ALWAYS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", [
    (2, 4, 2, 113, 113, 8, 8, 3, 16, None),  # B = 2 folded into heads, GQA
    (1, 2, 1, 37, 203, 8, 5, 2, 32, None),  # Nq < Nkv, q_offset not a block multiple, Dv != D
    (1, 2, 2, 1, 1, 8, 8, 1, 16, None),  # N = 1
    (2, 2, 1, 19, 45, 8, 8, 2, 8, 9),  # explicit q_offset
    # aligned (selection blocks a multiple of the backend's blocks, q_offset too): the layout
    # comes straight from the selection (selection_layout)
    (2, 2, 1, 128, 128, 8, 8, 3, 64, None),
    (1, 2, 2, 72, 200, 8, 8, 2, 64, None),  # q_offset 128, ragged last kv block
    (1, 2, 1, 100, 100, 8, 8, 2, 32, None),
], ids=lambda c: "x".join(map(str, c)))
def test_block_topk_matches_naive(case, causal, always, backend):
    b, hq, hkv, nq, nkv, d, dv, top_k, bs, q_offset = case
    always = ALWAYS[always]
    q, k, v = qkv(b, hq, nq, d, hkv=hkv, nkv=nkv, dv=dv)
    out, sel = block_topk_attention(q, k, v, top_k, bs, causal=causal, always=always, backend=backend,
                                    q_offset=q_offset, return_selection=True)
    assert torch.equal(sel, select_kv_blocks(q, k, top_k, bs, causal=causal, q_offset=q_offset))
    ref = block_topk_attention_naive(q, k, v, sel, bs, causal=causal, always=always, q_offset=q_offset)
    assert out.shape == (b, hq, nq, dv)
    assert_fp32_close(out, ref, rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_selection_layout_equals_the_patterns_layout(causal):
    """The layout built straight from a selection has the blocks and elements the selection's
    pattern classifies to, for selection blocks that are 1, 2 or 4 layout blocks, ragged edges,
    Nq < Nkv and B * Hq folded heads; and its mask classes only join equal masks."""
    torch.manual_seed(0)
    for nq, nkv, bs, block, top_k in itertools.product([1, 37, 64, 200], [64, 200, 256], [32, 64], [16, 32],
                                                       [1, 3]):
        q_offset = nkv - nq
        if nq > nkv or q_offset % block:
            continue
        q, k, _ = qkv(2, 2, nq, 8, hkv=1, nkv=nkv)
        sel = select_kv_blocks(q, k, top_k, bs, causal=causal)
        pattern = selection_pattern(sel, bs, nq, nkv, q_offset, causal=causal)
        expected = pattern.layout(nq, nkv, block_q=block, block_kv=block, q_offset=q_offset)
        layout = selection_layout(sel, pattern, bs, BlockGrid(nq, nkv, q_offset, block, block, torch.device("cpu")),
                                  causal=causal)
        assert torch.equal(layout.block_states(), expected.block_states()), (nq, nkv, bs, block, top_k)
        assert torch.equal(layout.to_dense(), expected.to_dense()), (nq, nkv, bs, block, top_k)
        part = layout.partial
        if part.indices.numel():
            g = layout.grid
            masks = layout.element_masks(torch.div(part.rows, g.num_q_blocks, rounding_mode="floor"),
                                         part.rows % g.num_q_blocks, part.indices.long())
            for c in layout.partial_mask_class.unique():
                same = masks[layout.partial_mask_class == c]
                assert (same == same[0]).all()


def test_block_topk_takes_the_device_layout_when_aligned(monkeypatch):
    """Aligned calls build the layout on the device; the table path (`selection_layout`) is
    left for aligned calls whose counts depend on the selection; unaligned ones classify."""
    calls = {"device": [], "table": []}
    for name, key in (("device_selection_layout", "device"), ("selection_layout", "table")):
        real = getattr(block_module, name)
        monkeypatch.setattr(block_module, name, lambda *a, _r=real, _k=key, **kw: calls[_k].append(_r(*a, **kw))
                            or calls[_k][-1])
    q, k, v = qkv(1, 2, 128, 8)
    block_topk_attention(q, k, v, 2, 64, causal=True, backend="blocked")  # blocked picks 64-blocks here
    assert calls["device"][-1] is not None and not calls["table"]
    block_topk_attention(q[:, :, 1:], k, v, 2, 64, causal=True, backend="blocked")  # q_offset 1: unaligned
    assert len(calls["device"]) == 1 and not calls["table"]
    # not causal, 128-cells over 64-blocks, the last cell (22 keys) holds one 64-block, not two:
    # counts depend on whether it is picked
    q, k, v = qkv(1, 2, 22, 8, nkv=150)
    block_topk_attention(q, k, v, 1, 128, backend="blocked", q_offset=128)
    assert calls["device"][-1] is None and len(calls["table"]) == 1


# (Nq, Nkv, selection block, layout block, top_k): layouts the device path builds
DEVICE_LAYOUT_CASES = [(nq, nkv, bs, block, top_k)
                       for nq, nkv, bs, block, top_k in itertools.product([1, 37, 64, 200], [64, 200, 256],
                                                                          [32, 64], [16, 32], [1, 3])
                       if nq <= nkv and (nkv - nq) % block == 0]


@pytest.mark.parametrize("causal", [False, True])
def test_device_selection_layout_equals_the_patterns_layout(causal):
    """The layout built on the device from the picks has the blocks and elements the selection's
    pattern classifies to, kv blocks ascending per row, mask classes that only join equal masks;
    and where it declines (None) it is because counts would depend on the selection."""
    built = 0
    for nq, nkv, bs, block, top_k in DEVICE_LAYOUT_CASES:
        q_offset = nkv - nq
        q, k, _ = qkv(2, 2, nq, 8, hkv=1, nkv=nkv)
        sel, picks = _select(q, k, top_k, bs, causal, q_offset)
        pattern = selection_pattern(sel, bs, nq, nkv, q_offset, causal=causal)
        grid = BlockGrid(nq, nkv, q_offset, block, block, torch.device("cpu"))
        layout = device_selection_layout(sel, picks, pattern, bs, grid, causal=causal)
        ragged_cells = -(-nkv // block) != (bs // block) * -(-nkv // bs)
        if layout is None:
            assert not causal and ragged_cells, (nq, nkv, bs, block, top_k)
            continue
        built += 1
        expected = pattern.layout(nq, nkv, block_q=block, block_kv=block, q_offset=q_offset)
        case = (nq, nkv, bs, block, top_k)
        assert torch.equal(layout.block_states(), expected.block_states()), case
        assert torch.equal(layout.to_dense(), expected.to_dense()), case
        for csr in (layout.full, layout.partial):
            assert torch.equal(csr.offsets, torch.cat([torch.zeros(1, dtype=torch.int64), csr.counts.cumsum(0)]))
            same_row = csr.rows[1:] == csr.rows[:-1]
            assert (csr.indices[1:][same_row] > csr.indices[:-1][same_row]).all(), case
        part = layout.partial
        if part.indices.numel():
            g = layout.grid
            masks = layout.element_masks(torch.div(part.rows, g.num_q_blocks, rounding_mode="floor"),
                                         part.rows % g.num_q_blocks, part.indices.long())
            h, qb, kb = layout.mask_class_blocks.unbind(1)
            representative = layout.element_masks(h, qb, kb)  # [n_classes, block, block]
            assert set(layout.partial_mask_class.tolist()) == set(range(representative.shape[0]))  # all used
            cls = layout.partial_mask_class
            # padded query rows (past nq) are never stored by kernels: compare real rows only
            rows = torch.arange(block)[None, :]
            real = ((part.rows % g.num_q_blocks)[:, None] * block + rows < nq) & (qb[cls][:, None] * block + rows < nq)
            assert ((masks == representative[cls]) | ~real[:, :, None]).all(), case
    assert built == len(DEVICE_LAYOUT_CASES) if causal else built > 15


def test_device_layout_class_masks_are_reused_only_where_equal(monkeypatch):
    """Causal device layouts declare their diagonal classes by (rows, keys) really there, and the
    kernel plan reuses their packed masks across layouts: over every case in a mixed order the
    reused masks equal the ones evaluated from that layout's own pattern, and reuse happens."""
    from sparse_attn.backends.triton import plan as plan_module

    monkeypatch.setattr(plan_module, "_class_bits", LRU())
    hits = 0
    # queries at the end of the keys, at the start, and in between (offsets on the blocks)
    cases = [(nq, nkv, bs, block, top_k, q_offset) for nq, nkv, bs, block, top_k in DEVICE_LAYOUT_CASES
             for q_offset in sorted({nkv - nq, 0, (nkv - nq) // 2 // block * block}) if q_offset % block == 0]
    random.Random(0).shuffle(cases)
    for nq, nkv, bs, block, top_k, q_offset in cases:
        q, k, _ = qkv(2, 2, nq, 8, hkv=1, nkv=nkv)
        sel, picks = _select(q, k, top_k, bs, True, q_offset)
        pattern = selection_pattern(sel, bs, nq, nkv, q_offset, causal=True)
        grid = BlockGrid(nq, nkv, q_offset, block, block, torch.device("cpu"))
        layout = device_selection_layout(sel, picks, pattern, bs, grid, causal=True)
        words = -(-block // 32)
        before = len(plan_module._class_bits)
        reused = plan_module._class_bits_of(layout, words)
        hits += len(plan_module._class_bits) == before
        h, qb, kb = layout.mask_class_blocks.unbind(1)
        fresh = plan_module._pack(layout.element_masks(h, qb, kb), words, weights_device=torch.device("cpu"))
        real = (qb[:, None] * block + torch.arange(block)[None, :] < nq)[:, :, None]  # rows kernels store
        assert reused.shape == fresh.shape, (nq, nkv, bs, block, top_k, q_offset)
        assert ((reused == fresh) | ~real).all(), (nq, nkv, bs, block, top_k, q_offset)
    assert hits > len(cases) // 2
    q, k, _ = qkv(2, 2, 37, 8, hkv=1, nkv=64)
    sel, picks = _select(q, k, 1, 32, True, 27)
    pattern = selection_pattern(sel, 32, 37, 64, 27, causal=True)
    with pytest.raises(ValueError, match="q_offset=27"):  # its blocks would straddle cells and the diagonal
        device_selection_layout(sel, picks, pattern, 32, BlockGrid(37, 64, 27, 16, 16, torch.device("cpu")),
                                causal=True)


def test_device_path_reads_nothing_back():
    """Selection, device layout and the triton kernel plan (forward and backward walks) with
    no host read (NoHostReads), and NoHostReads does fail once a read is added."""
    from sparse_attn.backends.triton.plan import TritonPlan

    q, k, _ = qkv(2, 4, 200, 8, hkv=2, nkv=256, dtype=torch.float32)
    for causal in (False, True):
        grid = BlockGrid(200, 256, 56, 8, 8, torch.device("cpu"))
        with NoHostReads():
            sel, picks = _select(q, k, 3, 16, causal, 56)
            pattern = selection_pattern(sel, 16, 200, 256, 56, causal=causal)
            layout = device_selection_layout(sel, picks, pattern, 16, grid, causal=causal)
            plan = TritonPlan(layout)
            plan.tensors(backward=True)
        assert layout is not None
        assert plan.part_idx.numel() == (layout.num_heads * layout.num_q_blocks if causal else 0)
        if causal:  # kv_len 256 is a multiple of 8: one mask class, the causal diagonal
            assert plan.bits.shape[0] == 1 and torch.equal(plan.part_mask, torch.zeros_like(plan.part_mask))
    with pytest.raises(HostReadError, match="_local_scalar_dense"):
        with NoHostReads():
            sel, picks = _select(q, k, 3, 16, True, 56)
            int(picks.max())


@pytest.mark.parametrize("causal", [False, True])
def test_device_plan_equals_the_table_plan(causal):
    """The triton plan of the device layout walks the same blocks in the same order, with the
    same masks, as the plan of the table-built layout (the path before): same kernel work."""
    from sparse_attn.backends.triton.plan import TritonPlan

    n, bs = (600 if causal else 640), 64  # not causal: whole 32-blocks in every 64-cell
    q, k, _ = qkv(1, 2, n, 8, dtype=torch.float32)
    sel, picks = _select(q, k, 3, bs, causal, 0)
    grid = BlockGrid(n, n, 0, 32, 32, torch.device("cpu"))
    pattern = selection_pattern(sel, bs, n, n, 0, causal=causal)
    new = TritonPlan(device_selection_layout(sel, picks, pattern, bs, grid, causal=causal))
    old = TritonPlan(selection_layout(sel, pattern, bs, grid, causal=causal))
    for name in ("full_off", "full_idx", "part_off", "part_idx", "q_block_order", "tfull_off", "tfull_idx",
                 "tpart_off", "tpart_idx", "kv_block_order"):
        assert torch.equal(getattr(new, name), getattr(old, name)), name
    assert torch.equal(new.bits[new.part_mask.long()], old.bits[old.part_mask.long()])
    assert torch.equal(new.bits[new.tpart_mask.long()], old.bits[old.tpart_mask.long()])


def test_select_ties_go_to_the_lowest_block():
    """Equal scores: the naive reference's stable order (lower kv block first), causal or not."""
    q = torch.ones(1, 2, 64, 4, dtype=F64)
    k = torch.ones(1, 1, 64, 4, dtype=F64)
    k[:, :, 40:48] = 2.0  # kv block 5 beats the rest; every other block ties
    for causal in (False, True):
        for top_k in (1, 2, 3):
            sel = select_kv_blocks(q, k, top_k, 8, causal=causal)
            assert torch.equal(sel, select_kv_blocks_naive(q, k, top_k, 8, causal=causal)), (causal, top_k)


def test_block_topk_is_sparse():
    """Keys in unselected blocks do not matter; keys in selected ones do."""
    q, k, v = qkv(1, 1, 64, 8)
    out, sel = block_topk_attention(q, k, v, 1, 16, backend="blocked", return_selection=True)
    unused = ~sel[0, 0].any(0)  # kv blocks no query block picked
    assert unused.any()
    v2 = v.clone()
    v2[:, :, unused.repeat_interleave(16)] += 100.0
    assert_fp32_close(block_topk_attention(q, k, v2, 1, 16, backend="blocked"), out, rtol=1e-12)
    used = sel[0, 0, 0].nonzero()[0, 0]
    v2 = v.clone()
    v2[:, :, used * 16] += 1.0
    assert max_abs_err(block_topk_attention(q, k, v2, 1, 16, backend="blocked")[0, 0, :16], out[0, 0, :16]) > 1e-3


@pytest.mark.parametrize("causal", [False, True])
def test_block_topk_covering_every_block_is_dense(causal):
    q, k, v = qkv(2, 4, 75, 16, hkv=2, nkv=75)
    pattern = P.causal() if causal else P.full()
    out = block_topk_attention(q, k, v, 5, 16, causal=causal, backend="blocked")  # 5 = ceil(75 / 16)
    assert_fp32_close(out, reference_f64(q, k, v, pattern), rtol=1e-12)
    out = block_topk_attention(q, k, v, 100, 16, causal=causal, always=P.sliding_window(4), backend="blocked")
    assert_fp32_close(out, reference_f64(q, k, v, pattern), rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_block_topk_grads_match_naive(causal):
    q, k, v = qkv(2, 4, 75, 8, hkv=2, dv=6)
    dout = torch.randn(2, 4, 75, 6, dtype=F64)
    always = P.streaming(1, 5)
    sel = select_kv_blocks(q, k, 2, 16, causal=causal)
    out, g = grads(lambda q, k, v: block_topk_attention(q, k, v, 2, 16, causal=causal, always=always,
                                                        backend="blocked"), q, k, v, dout)
    ref, g_ref = grads(lambda q, k, v: block_topk_attention_naive(q, k, v, sel, 16, causal=causal, always=always),
                       q, k, v, dout)
    assert_fp32_close(out, ref, rtol=1e-12)
    for name, a, e in zip("qkv", g, g_ref):
        assert_fp32_close(a, e, rtol=1e-10, what=f"d{name}")


def test_block_topk_gradcheck():
    q, k, v = qkv(2, 2, 7, 2, hkv=1, dv=2)
    inputs = tuple(t.requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: block_topk_attention(q, k, v, 1, 2, causal=True, always=P.streaming(1, 1),
                                             backend="blocked"), inputs)


def test_block_topk_per_head_always():
    """A per-head `always` (Hq heads) with B = 2: one call per batch element."""
    q, k, v = qkv(2, 2, 50, 8)
    always = P.per_head([P.sliding_window(4), P.streaming(1, 9)])
    out, sel = block_topk_attention(q, k, v, 1, 16, causal=True, always=always, backend="blocked",
                                    return_selection=True)
    assert_fp32_close(out, block_topk_attention_naive(q, k, v, sel, 16, causal=True, always=always), rtol=1e-12)


def test_block_topk_float32():
    q, k, v = qkv(2, 4, 130, 32, hkv=1, dtype=torch.float32)
    out, sel = block_topk_attention(q, k, v, 2, 32, causal=True, always=P.streaming(4, 16), return_selection=True)
    ref = block_topk_attention_naive(q.double(), k.double(), v.double(), sel, 32, causal=True,
                                     always=P.streaming(4, 16))
    assert_fp32_close(out, ref)


def test_block_topk_no_keys():
    q, k, v = qkv(1, 2, 4, 8, nkv=0)
    out, sel = block_topk_attention(q, k, v, 2, 16, q_offset=0, return_selection=True)
    assert torch.equal(out, torch.zeros_like(out)) and sel.shape == (1, 2, 1, 0)


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((0,), {}, ValueError, r"top_k_blocks must be >= 1, got 0"),
    ((2, 0), {}, ValueError, r"block_size must be >= 1, got 0"),
    ((2, "16"), {}, TypeError, "block_size must be an int, got str"),
    ((2,), dict(always="window"), TypeError, "always must be a sparse_attn Pattern or None, got str"),
    ((2,), dict(always=P.per_head([P.causal()] * 3)), ValueError, "always is defined for 3 heads but q has 2"),
    ((2,), dict(causal=1), TypeError, "causal must be a bool"),
    ((2,), dict(return_selection="yes"), TypeError, "return_selection must be a bool"),
    ((2,), dict(backend="nope"), ValueError, "backend must be 'auto' or one of"),
])
def test_block_topk_bad_arguments(args, kwargs, error, match):
    q, k, v = qkv(1, 2, 32, 8)
    with pytest.raises(error, match=match):
        block_topk_attention(q, k, v, *args, **kwargs)


def test_select_bad_arguments():
    q, k, _ = qkv(1, 2, 32, 8)
    with pytest.raises(ValueError, match="top_k_blocks must be >= 1"):
        select_kv_blocks(q, k, -1, 16)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        select_kv_blocks(q, k, 2, 0)
    with pytest.raises(ValueError, match=r"q and k head dims differ"):
        select_kv_blocks(q, k[..., :4], 2, 16)


# ============================================================ block top-k with key padding
def padding_masks(b, n, block_size):
    """(B, n) masks, one kind per row (cycled): right padding off the blocks, left padding
    (pads where streaming sinks sit), holes, whole pad blocks in the middle, all real."""
    kinds = [lambda m: m[n - n // 3:].fill_(False), lambda m: m[:5].fill_(False),
             lambda m: m[3::4].fill_(False), lambda m: m[block_size:3 * block_size].fill_(False), lambda m: m]
    mask = torch.ones(b, n, dtype=torch.bool)
    for row in range(b):
        kinds[row % len(kinds)](mask[row])
    return mask


def masked_block_topk(q, k, v, mask, top_k, bs, **kw):
    return block_topk_attention(q, k, v, top_k, bs, key_padding_mask=mask, return_selection=True, **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("always", ["none", "streaming"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", [
    (5, 4, 2, 45, 45, 8, 6, 2, 8, None),  # GQA, ragged last block, every mask kind
    (5, 2, 1, 30, 70, 8, 8, 3, 16, 24),  # queries in the middle (explicit q_offset, mid-block)
    (3, 2, 2, 128, 128, 8, 8, 3, 64, None),  # aligned: the unmasked call would take the device layout
], ids=lambda c: "x".join(map(str, c)))
def test_block_topk_with_padding_matches_naive(case, causal, always, dtype):
    """Forward and gradients against the float64 naive reference with the same mask; the
    selection equals the naive selection, pad query rows are 0 and pads get no gradient."""
    b, hq, hkv, nq, nkv, d, dv, top_k, bs, q_offset = case
    always = ALWAYS[always]
    q, k, v = qkv(b, hq, nq, d, hkv=hkv, nkv=nkv, dv=dv, dtype=dtype)
    mask = padding_masks(b, nkv, bs)
    dout = torch.randn(b, hq, nq, dv, dtype=dtype)
    sel = masked_block_topk(q, k, v, mask, top_k, bs, causal=causal, always=always, q_offset=q_offset,
                            backend="blocked")[1]
    q64, k64, v64 = (t.double() for t in (q, k, v))
    assert torch.equal(sel, select_kv_blocks_naive(q64, k64, top_k, bs, causal=causal, q_offset=q_offset,
                                                   key_padding_mask=mask))
    out, g = grads(lambda q, k, v: masked_block_topk(q, k, v, mask, top_k, bs, causal=causal, always=always,
                                                     q_offset=q_offset, backend="blocked")[0], q, k, v, dout)
    ref, g_ref = grads(lambda q, k, v: block_topk_attention_naive(q, k, v, sel, bs, causal=causal, always=always,
                                                                  q_offset=q_offset, key_padding_mask=mask),
                       q64, k64, v64, dout.double())
    rtol = (1e-12, 1e-10) if dtype == F64 else (2e-6, 2e-5)
    assert_fp32_close(out, ref, rtol=rtol[0])
    for name, a, e in zip("qkv", g, g_ref):
        assert_fp32_close(a, e, rtol=rtol[1], what=f"d{name}")
    q_start = nkv - nq if q_offset is None else q_offset
    pad_rows = ~mask[:, q_start:q_start + nq]  # [B, Nq]
    assert pad_rows.any() and (out.transpose(1, 2)[pad_rows] == 0).all()
    assert (g[0].transpose(1, 2)[pad_rows] == 0).all()  # dq of pad queries
    for grad in g[1:]:  # dk, dv of pad keys
        assert (grad.transpose(1, 2)[~mask] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_block_topk_pad_values_change_nothing(causal):
    """Any finite q, k, v at pad positions (even huge, aligned with the queries so that their
    blocks would win if counted): the real rows' outputs and every gradient are unchanged, bit
    for bit, and so is the selection."""
    b, n, bs = 5, 45, 8
    q, k, v = qkv(b, 4, n, 8, hkv=2)
    mask = padding_masks(b, n, bs)
    dout = torch.randn(b, 4, n, 8, dtype=F64)
    pads = ~mask[:, None, :, None]
    q2 = torch.where(pads, 1e3 * torch.randn_like(q), q)
    k2 = torch.where(pads, 1e3 * q.mean((1, 2), keepdim=True)[:, :2], k)
    v2 = torch.where(pads, -1e6, v)

    def run(q, k, v):
        return grads(lambda q, k, v: masked_block_topk(q, k, v, mask, 2, bs, causal=causal, always=P.streaming(2, 5),
                                                       backend="blocked")[0], q, k, v, dout)

    (out, g), (out2, g2) = run(q, k, v), run(q2, k2, v2)
    assert torch.equal(out, out2)
    for a, e in zip(g, g2):
        assert torch.equal(a, e)
    sel = select_kv_blocks(q, k, 2, bs, causal=causal, key_padding_mask=mask)
    assert torch.equal(sel, select_kv_blocks(q2, k2, 2, bs, causal=causal, key_padding_mask=mask))
    # and without the mask those pads would change the result: the test has teeth
    assert not torch.equal(block_topk_attention(q2, k2, v2, 2, bs, causal=causal, backend="blocked")[:1], out[:1])


@pytest.mark.parametrize("causal", [False, True])
def test_block_topk_all_real_mask_changes_nothing(causal):
    q, k, v = qkv(2, 4, 75, 8, hkv=2)
    mask = torch.ones(2, 75, dtype=torch.bool)
    for always in (None, P.streaming(2, 5)):
        out, sel = masked_block_topk(q, k, v, mask, 2, 16, causal=causal, always=always, backend="blocked")
        plain, plain_sel = block_topk_attention(q, k, v, 2, 16, causal=causal, always=always, backend="blocked",
                                                return_selection=True)
        assert torch.equal(sel, plain_sel)
        assert_fp32_close(out, plain, rtol=1e-13)


@pytest.mark.parametrize("causal", [False, True])
def test_block_topk_never_selects_an_all_pad_block(causal):
    """Pad blocks hold keys along the queries (they would win by far if counted): never selected,
    and they take no top-k slot from a real block; a row with fewer real blocks than k selects
    all of them and no more; query blocks of pads alone select nothing."""
    bs, n, d = 8, 48, 8
    q, k, _ = qkv(2, 2, n, d)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, 8:24] = False  # kv blocks 1, 2 all pad
    mask[1, 16:] = False  # blocks 2.. all pad: 2 real blocks
    k = torch.where(~mask[:, None, :, None], 100 * q.mean(2, keepdim=True), k)
    for top_k in (1, 2, 4):
        sel = select_kv_blocks(q, k, top_k, bs, causal=causal, key_padding_mask=mask)
        assert torch.equal(sel, select_kv_blocks_naive(q, k, top_k, bs, causal=causal, key_padding_mask=mask))
        assert not sel[0, :, :, 1:3].any() and not sel[1, :, :, 2:].any()
        assert not sel[0, :, 1:3].any() and not sel[1, :, 2:].any()  # query blocks of pads alone
        q_block = torch.arange(6)[:, None]
        real_blocks = torch.tensor([[1, 0, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
        eligible = real_blocks[:, None, :] & ((torch.arange(6)[None, :] <= q_block) if causal else True)  # [2, 6, 6]
        want = torch.clamp(eligible.sum(-1), max=top_k) * real_blocks  # per real query block
        assert torch.equal(sel.sum(-1), want[:, None].expand(2, 2, 6)), top_k
        if not causal:  # the unmasked selection does pick the pad blocks: the keys are set up to win
            assert select_kv_blocks(q, k, top_k, bs)[0, :, :, 1:3].any()


def test_block_topk_right_padding_equals_the_row_alone():
    """Right padding (real tokens at indices 0..n-1, any n): blocks sit where they sit alone and
    the last real block's means are over its real tokens, as the ragged last block alone: the
    real rows equal the row alone (forward and gradients), causal or not, with `always`. Left
    padding cuts the row into other blocks: not the row alone (shown here)."""
    bs, n = 8, 40
    lengths = (40, 24, 13, 21, 1)
    q, k, v = qkv(len(lengths), 4, n, 8, hkv=2)
    dout = torch.randn(len(lengths), 4, n, 8, dtype=F64)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    for causal, always in ((False, None), (True, P.streaming(2, 5)), (False, P.sliding_window(5, causal=False))):
        kw = dict(causal=causal, always=always, backend="blocked")
        out, g = grads(lambda q, k, v: masked_block_topk(q, k, v, mask, 2, bs, **kw)[0], q, k, v, dout)
        for row, length in enumerate(lengths):
            alone = [t[row:row + 1, :, :length] for t in (q, k, v, dout)]
            ref, g_ref = grads(lambda q, k, v: block_topk_attention(q, k, v, 2, bs, **kw), *alone)
            assert_fp32_close(out[row:row + 1, :, :length], ref, rtol=1e-12)
            for a, e in zip(g, g_ref):
                assert_fp32_close(a[row:row + 1, :, :length], e, rtol=1e-10)
    # left padding: 20 real tokens at indices 20..39 are cut into blocks by absolute index
    row = [t[:1, :, :21] for t in (q, k, v)]
    padded = [torch.zeros_like(t[:1]) for t in (q, k, v)]
    for p, r in zip(padded, row):
        p[:, :, 19:] = r
    out = block_topk_attention(*padded, 1, bs, backend="blocked", key_padding_mask=torch.arange(n)[None] >= 19)
    assert max_abs_err(out[:, :, 19:], block_topk_attention(*row, 1, bs, backend="blocked")) > 1e-3


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(key_padding_mask=torch.ones(2, 32)), TypeError, "key_padding_mask must be a bool tensor"),
    (dict(key_padding_mask=torch.ones(2, 31, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \(batch, kv_len\) = \(2, 32\), got \(2, 31\)"),
    (dict(key_padding_mask=[[True] * 32] * 2), TypeError, "key_padding_mask must be a bool tensor of shape"),
    (dict(key_padding_mask=torch.ones(2, 32, dtype=torch.bool), q_offset=20), ValueError,
     r"key_padding_mask needs the queries on key indices \(q_offset \+ q_len <= kv_len\), got q_offset=20"),
])
def test_block_topk_key_padding_mask_errors(kwargs, error, match):
    q, k, v = qkv(2, 2, 32, 8)
    with pytest.raises(error, match=match):
        block_topk_attention(q, k, v, 2, 8, **kwargs)
    with pytest.raises(error, match=match):
        select_kv_blocks(q, k, 2, 8, **kwargs)


# ============================================================================== GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_topk_and_block_topk(causal):
    """On CUDA: top-k, and block top-k on the default (triton) backend, fp32 and bf16 with grads."""
    q, k, v = qkv(2, 8, 1000, 64, hkv=2, dtype=torch.float32, device=DEVICE)
    out = topk_attention(q, k, v, 32, causal=causal, chunk_size=256)
    assert_fp32_close(out, topk_attention_naive(q.double(), k.double(), v.double(), 32, causal=causal), rtol=1e-4)
    always = P.streaming(4, 64)
    dout = torch.randn(2, 8, 1000, 64, dtype=torch.float32, device=DEVICE)
    for dtype in (torch.float32, torch.bfloat16):
        ql, kl, vl = (t.to(dtype) for t in (q, k, v))
        sel = select_kv_blocks(ql, kl, 4, 64, causal=causal)
        fast, g = grads(lambda q, k, v: block_topk_attention(q, k, v, 4, 64, causal=causal, always=always),
                        ql, kl, vl, dout.to(dtype))
        q64, k64, v64 = (t.double() for t in (ql, kl, vl))
        ref, g_ref = grads(lambda q, k, v: block_topk_attention_naive(q, k, v, sel, 64, causal=causal, always=always),
                           q64, k64, v64, dout.double())
        if dtype == torch.float32:
            assert_fp32_close(fast, ref, rtol=2e-5)
            for a, e in zip(g, g_ref):
                assert_fp32_close(a, e, rtol=2e-5)
        else:  # the same pattern on the dense reference backend, in bf16: the low-precision bar
            low, g_low = grads(lambda q, k, v: block_topk_attention(q, k, v, 4, 64, causal=causal, always=always,
                                                                    backend="reference"), ql, kl, vl, dout.to(dtype))
            assert_low_precision_close(fast, low, ref)
            for a, lo, e in zip(g, g_low, g_ref):
                assert_low_precision_close(a, lo, e, factor=3.0)
