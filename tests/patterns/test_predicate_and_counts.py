"""User predicates (FlexAttention mask_mods) and exact pair counts.

* A mask_mod that reads `b` cannot be honoured for a batch of several rows (one layout serves
  the batch): refused, not applied from row 0 to all rows. One that reads `h` without
  `num_heads` is refused (it would be applied from head 0 to all heads).
* A mask_mod is only evaluated at in-range positions, so lookup-table masks of exactly the
  sequence's length work at lengths that are not block multiples (as with FlexAttention).
* `BlockLayout.allowed_pairs()` / `density()` count partial blocks in closed form for bands,
  column/row sets and segments: O(non-empty blocks), not O(partial blocks x block area).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sa_testing import assert_fp32_close, reference_f64

import sparse_attn
from sparse_attn import patterns as P
from sparse_attn.patterns import base as pattern_base
from sparse_attn.patterns.base import count_allowed
from sparse_attn.patterns.grid import BlockGrid
from sparse_attn.patterns.primitives import Band


def _qkv(b, n, h=2, d=8, dtype=torch.float32):
    return tuple(torch.randn(b, h, n, d, dtype=dtype) for _ in range(3))


# ------------------------------------------------------------------ batch and head indices
def test_predicate_reading_b_is_refused_for_a_batch():
    lens = torch.tensor([5, 9])
    pattern = P.predicate(lambda b, h, q, kv: kv < lens[b])
    with pytest.raises(ValueError, match=r"reads the batch index b.*batch of 2 rows"):
        sparse_attn.sparse_attention(*_qkv(2, 16), pattern)
    with pytest.raises(ValueError, match=r"reads the batch index b"):  # also inside a combination
        sparse_attn.sparse_attention(*_qkv(2, 16), pattern | P.sliding_window(4))
    with pytest.raises(ValueError, match=r"reads the batch index b"):  # block top-k folds the batch into heads
        sparse_attn.attention(*_qkv(2, 16), "block_topk", top_k_blocks=1, block_size=4, always=pattern)


def test_predicate_reading_b_runs_for_one_row_with_b_zero():
    lens = torch.tensor([5, 9])
    pattern = P.predicate(lambda b, h, q, kv: kv < lens[b])
    q, k, v = _qkv(1, 16)
    out = sparse_attn.sparse_attention(q, k, v, pattern)
    expected = reference_f64(q, k, v, P.predicate(lambda b, h, q, kv: kv < 5))
    assert_fp32_close(out, expected)


def test_predicate_reading_h_needs_num_heads():
    fn = lambda b, h, q, kv: (q - kv) % (h + 2) == 0  # noqa: E731
    with pytest.raises(ValueError, match=r"reads its head index h: pass num_heads"):
        sparse_attn.sparse_attention(*_qkv(1, 16), P.predicate(fn))
    q, k, v = _qkv(1, 16)
    out = sparse_attn.sparse_attention(q, k, v, P.predicate(fn, num_heads=2))
    assert_fp32_close(out, reference_f64(q, k, v, P.predicate(fn, num_heads=2)))


def test_predicates_that_ignore_b_and_h_run_on_batches():
    q, k, v = _qkv(3, 20)
    pattern = P.predicate(lambda b, h, q, kv: (q - kv).abs() < 3)
    assert_fp32_close(sparse_attn.sparse_attention(q, k, v, pattern), reference_f64(q, k, v, pattern))


# ----------------------------------------------------- lookup tables of the sequence length
@pytest.mark.parametrize("n", [113, 203, 1000])
def test_flex_style_document_mask_at_lengths_that_are_not_block_multiples(n):
    gen = torch.Generator().manual_seed(n)
    doc = torch.sort(torch.randint(0, 6, (n,), generator=gen)).values  # (N,): indexing at N raises

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

    pattern = P.predicate(document_causal)
    q, k, v = _qkv(1, n)
    out = sparse_attn.sparse_attention(q, k, v, pattern, backend="blocked")
    expected = reference_f64(q, k, v, P.document(doc) & P.causal())
    assert_fp32_close(out, expected)
    layout = pattern.layout(n, block_q=64)
    assert torch.equal(layout.to_dense(), (P.document(doc) & P.causal()).to_dense(n))
    assert layout.allowed_pairs().item() == int((P.document(doc) & P.causal()).to_dense(n).sum())


def test_lookup_table_mask_with_fewer_queries_and_an_offset():
    n = 77
    allowed_keys = torch.rand(n) < 0.5  # (N,) per key

    def by_key(b, h, q_idx, kv_idx):
        return allowed_keys[kv_idx] & (kv_idx <= q_idx)

    q, _, _ = _qkv(1, 9)
    _, k, v = _qkv(1, n)
    out = sparse_attn.sparse_attention(q, k, v, P.predicate(by_key), backend="blocked", q_offset=50)
    assert_fp32_close(out, reference_f64(q, k, v, P.predicate(by_key), q_offset=50))


# ------------------------------------------------------------------- closed-form counts
def _all_blocks(grid):
    h, qb, kb = torch.meshgrid(torch.zeros(1, dtype=torch.int64), grid.arange(grid.num_q_blocks),
                               grid.arange(grid.num_kv_blocks), indexing="ij")
    return h.reshape(-1), qb.reshape(-1), kb.reshape(-1)


@settings(max_examples=300, deadline=None)
@given(lo=st.one_of(st.none(), st.integers(-40, 40)), width=st.one_of(st.none(), st.integers(0, 60)),
       dilation=st.integers(1, 7), q_len=st.integers(1, 60), kv_len=st.integers(1, 60), q_offset=st.integers(0, 50),
       block_q=st.integers(1, 17), block_kv=st.integers(1, 17))
def test_band_count_matches_elements(lo, width, dilation, q_len, kv_len, q_offset, block_q, block_kv):
    hi = None if (lo is None or width is None) else lo + width
    band = Band(lo, hi, dilation)
    grid = BlockGrid(q_len, kv_len, q_offset, block_q, block_kv, torch.device("cpu"))
    head, qb, kb = _all_blocks(grid)
    assert torch.equal(band._count(grid, head, qb, kb), count_allowed(band, grid, head, qb, kb)[0])


@pytest.mark.parametrize("pattern", [
    P.longformer(9, [0, 5, 40]), P.longformer(9, 3, causal=True), P.streaming(3, 7), P.fixed(6, 2),
    P.fixed(5, 2, causal=False), P.document(torch.tensor([0] * 7 + [1] * 20 + [2] * 40)), P.strided(5),
    P.strided(4, causal=False), P.per_head([P.sliding_window(5), P.dilated(3, 3)]) | P.causal(),
])
def test_counts_of_every_primitive_match_elements(pattern):
    heads = pattern.num_heads or 1
    for block in (4, 7, 16):
        layout = pattern.layout(67, block_q=block)
        dense = layout.pattern.to_dense(67, num_heads=pattern.num_heads)
        assert torch.equal(layout.allowed_pairs(), dense.sum((1, 2)))
        assert layout.density() == pytest.approx(dense.double().mean().item() if heads == 1
                                                  else dense.double().mean().item())


@pytest.mark.parametrize("pattern", [
    P.sliding_window(1024), P.sliding_window(1024, causal=False), P.longformer(1024, 64), P.streaming(4, 1024),
    P.dilated(512, 2), P.strided(512), P.causal() & P.sliding_window(700),
])
def test_density_does_not_evaluate_partial_blocks_element_by_element(pattern, monkeypatch):
    """O(non-empty blocks): at 64K a window has ~1,000 partial 128-blocks (16M elements); only
    blocks where two parts are both partial may still be counted element by element."""
    n = 65536
    parts = pattern.parts if isinstance(pattern, P.DisjointUnion) else [pattern]
    layouts = [p.layout(n, block_q=128) for p in parts]
    evaluated = []
    real = pattern_base.count_allowed

    def counting(pat, grid, head, qb, kb):
        evaluated.append(qb.numel())
        return real(pat, grid, head, qb, kb)

    monkeypatch.setattr(pattern_base, "count_allowed", counting)
    density = sum(layout.density() for layout in layouts)
    assert sum(evaluated) <= 4, f"{sum(evaluated)} blocks counted element by element"
    assert 0 < density < 0.1
