"""Each preset against a hand-written loop definition on small n, plus the layout's plain facts
(cache, density, counts, ASCII pictures) and the FlexAttention BlockMask round trip."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from sparse_attn import patterns as P


def loop_mask(n_q, n_kv, rule, *, q_offset=None, heads=1):
    """bool [heads, n_q, n_kv] from a Python rule(i, j[, h]) on absolute positions."""
    q_offset = n_kv - n_q if q_offset is None else q_offset
    out = np.zeros((heads, n_q, n_kv), dtype=bool)
    for h in range(heads):
        for r in range(n_q):
            i = q_offset + r
            for j in range(n_kv):
                out[h, r, j] = rule(i, j, h) if heads > 1 else rule(i, j)
    return torch.from_numpy(out)


def dense(pattern, n_q, n_kv=None, **kw):
    return pattern.to_dense(n_q, n_kv, **kw)


N = 23  # small, odd, not a multiple of any window below


# --------------------------------------------------------------- element semantics
def test_full():
    assert torch.equal(dense(P.full(), N), loop_mask(N, N, lambda i, j: True))


def test_causal():
    assert torch.equal(dense(P.causal(), N), loop_mask(N, N, lambda i, j: j <= i))


@pytest.mark.parametrize("w", [1, 2, 3, 4, 7, 30])
def test_sliding_window_causal(w):
    # query i sees itself and the w-1 keys before it
    want = loop_mask(N, N, lambda i, j: i - w + 1 <= j <= i)
    assert torch.equal(dense(P.sliding_window(w), N), want)
    assert torch.equal(dense(P.sliding_window(w, causal=True), N), want)
    assert int(want[0, -1].sum()) == min(w, N)


@pytest.mark.parametrize("w", [1, 2, 3, 4, 7, 30])
def test_sliding_window_non_causal(w):
    # query i sees w//2 keys on each side (HF Longformer's attention_window)
    want = loop_mask(N, N, lambda i, j: abs(i - j) <= w // 2)
    assert torch.equal(dense(P.sliding_window(w, causal=False), N), want)


@pytest.mark.parametrize("w,r", [(1, 1), (3, 1), (3, 2), (4, 3), (5, 4)])
def test_dilated_causal_token_level(w, r):
    want = loop_mask(N, N, lambda i, j: any(j == i - t * r for t in range(w)))
    assert torch.equal(dense(P.dilated(w, r), N), want)
    if r > 1:  # token-level: neighbouring keys inside the span are skipped
        assert not want[0, 10, 9]


@pytest.mark.parametrize("w,r", [(1, 1), (3, 2), (4, 3), (5, 2)])
def test_dilated_non_causal(w, r):
    want = loop_mask(N, N, lambda i, j: any(j == i + t * r for t in range(-(w // 2), w // 2 + 1)))
    assert torch.equal(dense(P.dilated(w, r, causal=False), N), want)


def test_dilated_with_dilation_one_is_sliding_window():
    for causal in (True, False):
        assert torch.equal(dense(P.dilated(5, 1, causal=causal), N), dense(P.sliding_window(5, causal=causal), N))


@pytest.mark.parametrize("s", [1, 2, 4, 5])
def test_strided(s):
    # Child et al. 2019: the previous s positions, and every s-th position before
    want = loop_mask(N, N, lambda i, j: j <= i and (i - j < s or (i - j) % s == 0))
    assert torch.equal(dense(P.strided(s), N), want)
    want_nc = loop_mask(N, N, lambda i, j: abs(i - j) < s or (i - j) % s == 0)
    assert torch.equal(dense(P.strided(s, causal=False), N), want_nc)


@pytest.mark.parametrize("block,summary", [(1, 1), (4, 1), (4, 2), (5, 5), (6, 3)])
def test_fixed(block, summary):
    # Child et al. 2019: own block of `block` positions, plus the last `summary` cells of each block
    def rule(i, j):
        return i // block == j // block or j % block >= block - summary

    assert torch.equal(dense(P.fixed(block, summary, causal=False), N), loop_mask(N, N, rule))
    assert torch.equal(dense(P.fixed(block, summary), N), loop_mask(N, N, lambda i, j: j <= i and rule(i, j)))


@pytest.mark.parametrize("globals_", [0, 1, 2, [0, 7], [5], (3, 11, 22)])
@pytest.mark.parametrize("w", [1, 4, 5])
def test_longformer(w, globals_):
    g = set(range(globals_)) if isinstance(globals_, int) else set(globals_)

    def rule(i, j):  # globals attend everywhere and are attended by every query
        return abs(i - j) <= w // 2 or i in g or j in g

    assert torch.equal(dense(P.longformer(w, globals_), N), loop_mask(N, N, rule))

    def causal_rule(i, j):  # causal window of w keys, everything clipped to j <= i
        return j <= i and (i - w + 1 <= j or i in g or j in g)

    assert torch.equal(dense(P.longformer(w, globals_, causal=True), N), loop_mask(N, N, causal_rule))


def test_longformer_global_rows_and_columns():
    m = dense(P.longformer(3, [4, 9]), N)[0]
    assert m[4].all() and m[9].all() and m[:, 4].all() and m[:, 9].all()
    assert not m[0, 10]


def test_longformer_empty_global_list_means_no_globals():
    """An empty sequence of global positions is a valid input (no globals)."""
    assert torch.equal(dense(P.longformer(4, []), N), dense(P.longformer(4, 0), N))


@pytest.mark.parametrize("sinks,w", [(0, 3), (1, 1), (2, 4), (4, 6), (30, 2)])
def test_streaming(sinks, w):
    want = loop_mask(N, N, lambda i, j: j <= i and (j < sinks or i - j < w))
    assert torch.equal(dense(P.streaming(sinks, w), N), want)


def test_document():
    ids = torch.tensor([0, 0, 0, 1, 1, 4, 4, 4, 4, 9, 10, 10])
    want = loop_mask(12, 12, lambda i, j: bool(ids[i] == ids[j]))
    assert torch.equal(dense(P.document(ids), 12), want)
    causal_want = loop_mask(12, 12, lambda i, j: j <= i and bool(ids[i] == ids[j]))
    assert torch.equal(dense(P.document(ids) & P.causal(), 12), causal_want)
    # a list works too
    assert torch.equal(dense(P.document(ids.tolist()), 12), want)


def test_block_sparse_shared():
    cells = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    want = loop_mask(12, 12, lambda i, j: bool(cells[i // 4, j // 4]))
    assert torch.equal(dense(P.block_sparse(cells, 4), 12), want)
    # 0/1 integer layout, partial last cell (n = 11 < 3 * 4)
    assert torch.equal(dense(P.block_sparse(cells.int(), 4), 11), want[:, :11, :11])


def test_block_sparse_per_head_and_rectangular_cells():
    cells = torch.rand(3, 4, 5) < 0.5
    pattern = P.block_sparse(cells, (3, 2))  # 3 query rows x 2 keys per cell
    assert pattern.num_heads == 3
    want = loop_mask(12, 10, lambda i, j, h: bool(cells[h, i // 3, j // 2]), q_offset=0, heads=3)
    assert torch.equal(dense(pattern, 12, 10, q_offset=0), want)


def test_per_head():
    parts = [P.causal(), P.sliding_window(3), P.full(), P.streaming(1, 2)]
    pattern = P.per_head(parts)
    assert pattern.num_heads == 4
    d = dense(pattern, N)
    assert d.shape == (4, N, N)
    for h, p in enumerate(parts):
        assert torch.equal(d[h], dense(p, N)[0])


def test_predicate_signature_and_heads():
    seen = {}

    def mask_mod(b, h, q_idx, kv_idx):
        seen.update(b=b, h=h, q=q_idx, kv=kv_idx)
        return (kv_idx <= q_idx) & ((q_idx - kv_idx) % (h + 1) == 0)

    pattern = P.predicate(mask_mod, num_heads=3)
    d = dense(pattern, 10, 14)  # queries are positions 4..13
    want = loop_mask(10, 14, lambda i, j, h: j <= i and (i - j) % (h + 1) == 0, heads=3)
    assert torch.equal(d, want)
    assert torch.is_tensor(seen["b"]) and int(seen["b"]) == 0
    assert int(seen["q"].min()) == 4 and int(seen["q"].max()) == 13  # absolute query positions
    assert sorted(torch.as_tensor(seen["h"]).unique().tolist()) == [0, 1, 2]


def test_predicate_shared():
    pattern = P.predicate(lambda b, h, q, kv: (q + kv) % 2 == 0)
    assert pattern.num_heads is None
    assert torch.equal(dense(pattern, 9), loop_mask(9, 9, lambda i, j: (i + j) % 2 == 0))


def test_combinators():
    a, b = P.sliding_window(3), P.streaming(2, 1)
    assert torch.equal(dense(a | b, N), dense(a, N) | dense(b, N))
    assert torch.equal(dense(a & P.causal(), N), dense(a, N) & dense(P.causal(), N))
    per = P.per_head([P.causal(), P.full()])
    assert torch.equal(dense(per & P.sliding_window(4, causal=False), N),
                       dense(per, N) & dense(P.sliding_window(4, causal=False), N))


# ------------------------------------------------------------------------ BigBird
def _bigbird_cells(pattern, n_tokens, heads=1):
    """The cell map [H, nb, nb] of a BigBird pattern, read off its dense mask (all-or-nothing cells)."""
    b = pattern.block
    layout = pattern.layout(n_tokens, block_q=b)
    d = layout.pattern.to_dense(n_tokens, num_heads=heads if heads > 1 else None)
    nb = n_tokens // b
    cells = d.reshape(heads, nb, b, nb, b)
    any_, all_ = cells.any(4).any(2), cells.all(4).all(2)
    assert torch.equal(any_, all_), "BigBird cells must be all-or-nothing"
    assert torch.equal(layout.block_states(), (all_.to(torch.int8) * 2))
    return all_


@pytest.mark.parametrize("nw,ng,nr", [(3, 2, 3), (1, 0, 2), (3, 1, 1), (5, 3, 2), (3, 2, 0)])
def test_bigbird_structure(nw, ng, nr):
    block, nb = 2, 20
    pattern = P.bigbird(block, num_window_blocks=nw, num_global_blocks=ng, num_random_blocks=nr, seed=3)
    cells = _bigbird_cells(pattern, block * nb)[0]
    g_first, g_last = -(-ng // 2), ng // 2
    globals_ = set(range(g_first)) | set(range(nb - g_last, nb))
    half = nw // 2
    for r in range(nb):
        cols = set(cells[r].nonzero().flatten().tolist())
        if r in globals_:
            assert cols == set(range(nb)), f"global row {r} must see everything"
            continue
        window = {c for c in range(r - half, r - half + nw) if 0 <= c < nb}
        assert window <= cols, f"row {r} misses window blocks"
        assert globals_ <= cols, f"row {r} misses global columns"
        random = cols - window - globals_
        free = nb - len(window | globals_)
        # random blocks are drawn outside the window and the globals, num_random per row
        assert len(random) == min(nr, free), f"row {r}: {len(random)} random blocks, want {min(nr, free)}"
    for g in globals_:
        assert cells[:, g].all()


def test_bigbird_reproducible_and_seeded():
    def cells(seed):
        return _bigbird_cells(P.bigbird(2, seed=seed), 64)

    assert torch.equal(cells(0), cells(0))
    assert torch.equal(cells(7), cells(7))
    assert not torch.equal(cells(0), cells(1))


def test_bigbird_keeps_a_bounded_number_of_lengths_and_redraws_them_identically(monkeypatch):
    """Block maps per length live in an LRU (MAX_CACHED_LENGTHS): a length dropped from it is drawn
    again to the same map (seed and length alone decide the random blocks)."""
    monkeypatch.setattr(P.presets.BigBird, "MAX_CACHED_LENGTHS", 3)
    p = P.bigbird(16, num_random_blocks=2, seed=5)
    first = p.to_dense(200)
    for n in (120, 140, 160, 180):  # pushes 200 out
        p.cells(n)
    assert len(p._cells) == 3 and 200 not in p._cells
    assert torch.equal(p.to_dense(200), first)


def test_bigbird_per_head_differs_across_heads():
    pattern = P.bigbird(2, seed=5, num_heads=4)
    assert pattern.num_heads == 4
    cells = _bigbird_cells(pattern, 64, heads=4)
    assert len({tuple(c.flatten().tolist()) for c in cells}) > 1
    # every head still has the window and the globals
    shared = _bigbird_cells(P.bigbird(2, num_random_blocks=0), 64)[0]
    assert (cells >= shared).all()


def test_bigbird_partial_last_block_and_small_blocks():
    pattern = P.bigbird(4, seed=1)
    layout = pattern.layout(30, block_q=3, block_kv=5)
    d = layout.pattern.to_dense(30)
    cells = layout.pattern.table("cpu")[0]
    want = cells[torch.arange(30)[:, None] // 4, torch.arange(30)[None, :] // 4]
    assert torch.equal(d[0], want)
    assert torch.equal(layout.to_dense(), d)


def test_bigbird_decode_queries_last():
    pattern = P.bigbird(4, seed=2)
    full = pattern.layout(32, block_q=4).pattern.to_dense(32)
    dec = pattern.layout(1, 32, block_q=4)
    assert torch.equal(dec.to_dense(), full[:, -1:])


def test_bigbird_explicit_q_offset_inside_the_sequence():
    """Chunked prefill: the first chunk of queries (q_offset=0) of a 32-token sequence."""
    pattern = P.bigbird(4, seed=2)
    full = pattern.layout(32, block_q=4).pattern.to_dense(32)
    layout = pattern.layout(8, 32, q_offset=0, block_q=4)
    assert torch.equal(layout.to_dense(), full[:, :8])


# ------------------------------------------------------- q_len != kv_len, q_offset
CASES = [
    P.causal(), P.sliding_window(4), P.sliding_window(5, causal=False), P.dilated(3, 2), P.strided(3),
    P.fixed(4, 2), P.longformer(4, 2), P.streaming(2, 3), P.document(torch.tensor([0] * 9 + [1] * 8 + [2] * 6)),
    P.block_sparse(torch.rand(6, 6) < 0.5, 4), P.predicate(lambda b, h, q, kv: (q * kv) % 3 == 1),
]


@pytest.mark.parametrize("pattern", CASES, ids=repr)
def test_fewer_queries_are_the_last_positions(pattern):
    whole = dense(pattern, N)
    for nq in (1, 5, N):
        assert torch.equal(dense(pattern, nq, N), whole[:, N - nq:])
        layout = pattern.layout(nq, N, block_q=3, block_kv=4)
        assert layout.q_offset == N - nq
        assert torch.equal(layout.to_dense(), whole[:, N - nq:])


@pytest.mark.parametrize("pattern", CASES, ids=repr)
def test_explicit_q_offset(pattern):
    whole = dense(pattern, N)
    for off, nq in ((0, 7), (5, 9), (16, 7)):
        want = whole[:, off:off + nq]
        assert torch.equal(dense(pattern, nq, N, q_offset=off), want)
        layout = pattern.layout(nq, N, q_offset=off, block_q=2, block_kv=3)
        assert layout.q_offset == off
        assert torch.equal(layout.to_dense(), want)


def test_block_sparse_explicit_q_offset():
    """The cell map covers the whole sequence; a chunk of queries reads its own rows."""
    cells = torch.rand(6, 6) < 0.5  # 23 positions in cells of 4
    pattern = P.block_sparse(cells, 4)
    for off, nq in ((6, 6), (0, 9), (17, 6)):
        want = loop_mask(nq, N, lambda i, j: bool(cells[i // 4, j // 4]), q_offset=off)
        assert torch.equal(pattern.layout(nq, N, q_offset=off, block_q=4).to_dense(), want)
        assert torch.equal(pattern.layout(nq, N, q_offset=off, block_q=3, block_kv=5).to_dense(), want)


# ----------------------------------------------------------------- layout facts
def test_layout_cache_returns_same_object():
    p = P.sliding_window(5)
    a = p.layout(40, block_q=8)
    assert p.layout(40, block_q=8) is a
    assert p.layout(40, block_q=8, block_kv=8) is a
    assert p.layout(40, 40, block_q=8, q_offset=0) is a
    assert p.layout(40, block_q=4) is not a
    assert p.layout(39, block_q=8) is not a
    assert p.layout(20, 40, block_q=8) is not a
    assert P.sliding_window(5).layout(40, block_q=8) is not a  # per pattern object


@pytest.mark.parametrize("pattern,heads", [
    (P.sliding_window(7), 1), (P.longformer(5, [0, 20]), 1), (P.dilated(4, 3, causal=False), 1),
    (P.per_head([P.causal(), P.streaming(2, 3)]), 2), (P.block_sparse(torch.rand(2, 9, 9) < 0.4, 5), 2),
    (P.bigbird(5, seed=4), 1),
])
def test_counts_consistent_with_dense(pattern, heads):
    n = 43
    layout = pattern.layout(n, block_q=5, block_kv=4)
    d = layout.pattern.to_dense(n, num_heads=heads if heads > 1 else None)
    states = layout.block_states()
    assert layout.num_heads == heads
    assert torch.equal(layout.allowed_pairs(), d.sum((1, 2)))
    assert layout.density() == pytest.approx(float(d.double().mean()))
    assert layout.nnz_blocks() == int((states > 0).sum())
    assert layout.block_density() == pytest.approx(float((states > 0).double().mean()))
    assert torch.equal(layout.kv_num_blocks + layout.full_kv_num_blocks, (states > 0).sum(-1).to(torch.int32))
    # padded index arrays list the right blocks, ascending
    for num, idx, state in ((layout.kv_num_blocks, layout.kv_indices, 1),
                            (layout.full_kv_num_blocks, layout.full_kv_indices, 2)):
        for h in range(heads):
            for r in range(layout.num_q_blocks):
                listed = idx[h, r, : num[h, r]].tolist()
                assert listed == (states[h, r] == state).nonzero().flatten().tolist()


def test_show_characters():
    assert P.causal().show(3) == "#..\n##.\n###"
    assert P.sliding_window(2).show(4) == "#...\n##..\n.##.\n..##"
    per = P.per_head([P.causal(), P.full()])
    assert per.show(2, head=1) == "##\n##"
    assert set(P.longformer(3, 1).show(16)) <= {"#", ".", "\n"}


def test_ascii_block_map():
    text = str(P.causal().layout(8, block_q=4))
    lines = text.splitlines()
    assert lines[0].startswith("BlockLayout(") and "nnz_blocks=3" in lines[0]
    assert lines[1:] == ["░·", "█░"]
    lines = str(P.full().layout(6, block_q=3)).splitlines()
    assert lines[1:] == ["██", "██"]
    per = str(P.per_head([P.causal(), P.full()]).layout(8, block_q=4)).splitlines()
    assert per[1:] == ["head 0:", "░·", "█░", "head 1:", "██", "██"]
    big = str(P.sliding_window(64).layout(64 * 200, block_q=64))  # downsampled to <= 64 columns
    assert all(len(line) <= 64 for line in big.splitlines()[1:])
    assert set("".join(big.splitlines()[1:])) <= {"█", "░", "·"}


# ------------------------------------------------------------------ FlexAttention
FLEX_CASES = [
    (P.sliding_window(5), 37, 37, None),
    (P.longformer(4, [0, 11]) & P.causal(), 30, 30, None),
    (P.per_head([P.causal(), P.dilated(3, 2)]), 20, 20, None),
    (P.streaming(2, 5), 7, 40, None),
    (P.document(torch.tensor([0] * 10 + [1] * 15)) | P.causal(), 25, 25, None),
    (P.bigbird(4, seed=1), 32, 32, None),
    (P.sliding_window(6), 9, 40, 3),
]


@pytest.mark.parametrize("pattern,nq,nkv,off", FLEX_CASES, ids=lambda x: repr(x) if isinstance(x, P.Pattern) else None)
def test_block_mask_round_trip(pattern, nq, nkv, off):
    from torch.nn.attention.flex_attention import BlockMask

    layout = pattern.layout(nq, nkv, q_offset=off, block_q=4, block_kv=8)
    bm = layout.to_block_mask()
    assert isinstance(bm, BlockMask)
    assert tuple(bm.BLOCK_SIZE) == (4, 8)
    back = P.BlockLayout.from_block_mask(bm, pattern=layout.pattern, q_offset=layout.q_offset)
    assert torch.equal(back.block_states(), layout.block_states())
    assert torch.equal(back.to_dense(), layout.to_dense())
    # the block mask's mask_mod evaluated densely is the pattern (q_idx counts query rows)
    mm = bm.mask_mod
    h = torch.arange(layout.num_heads)[:, None, None]
    got = mm(torch.zeros((), dtype=torch.long), h, torch.arange(nq)[None, :, None], torch.arange(nkv)[None, None, :])
    assert torch.equal(got.expand(layout.num_heads, nq, nkv), layout.to_dense())


# --------------------------------------------------------------------- scaling
def test_million_token_sliding_window_layout_is_analytic():
    """1,048,576 tokens, W=4096, 128-blocks: O(non-empty blocks), never N x N."""
    n, w, b = 1 << 20, 4096, 128
    pattern = P.sliding_window(w)
    start = time.perf_counter()
    layout = pattern.layout(n, block_q=b)
    elapsed = time.perf_counter() - start
    nqb = n // b
    # each query block touches w/b + 1 kv blocks (fewer at the start)
    expected = sum(min(r, w // b) + 1 for r in range(nqb))
    assert layout.nnz_blocks() == expected
    assert 260_000 < expected < 280_000
    assert elapsed < 2.0, f"building the layout took {elapsed:.2f}s"


@pytest.mark.parametrize("pattern,nq,nkv,off", [(P.sliding_window(5), 37, 37, None), (P.causal(), 20, 20, None),
                                                (P.per_head([P.causal(), P.dilated(3, 2)]), 20, 20, None)],
                         ids=["window", "causal", "per_head"])
def test_from_block_mask_without_pattern_uses_its_mask_mod(pattern, nq, nkv, off):
    layout = pattern.layout(nq, nkv, q_offset=off, block_q=4, block_kv=8)
    plain = P.BlockLayout.from_block_mask(layout.to_block_mask(), q_offset=layout.q_offset)
    assert torch.equal(plain.block_states(), layout.block_states())
    assert torch.equal(plain.to_dense(), layout.to_dense())


@pytest.mark.parametrize("pattern,nq,nkv,off", [(P.streaming(2, 5), 7, 40, None), (P.sliding_window(6), 9, 40, 3)],
                         ids=["decode-like", "explicit-offset"])
def test_from_block_mask_without_pattern_with_q_offset(pattern, nq, nkv, off):
    """A BlockMask's mask_mod counts query rows from 0 (FlexAttention's convention); wrapped as our
    predicate for a layout whose queries start at q_offset it must see the same rows."""
    layout = pattern.layout(nq, nkv, q_offset=off, block_q=4, block_kv=8)
    plain = P.BlockLayout.from_block_mask(layout.to_block_mask(), q_offset=layout.q_offset)
    assert torch.equal(plain.to_dense(), layout.to_dense())


@pytest.mark.parametrize("nw,ng,nr", [(3, 2, 3), (1, 0, 2), (2, 1, 1), (4, 3, 2), (3, 2, 0)])
def test_bigbird_causal_structure(nw, ng, nr):
    """causal=True: the window is the nw blocks ending at the own block, the first ceil(g/2)
    blocks are global columns, random blocks are drawn among the earlier blocks before the
    window, and nothing after a query is allowed (inside the own block too)."""
    block, nb = 2, 20
    pattern = P.bigbird(block, num_window_blocks=nw, num_global_blocks=ng, num_random_blocks=nr, seed=3,
                        causal=True)
    assert pattern.is_causal()
    n = block * nb
    d = pattern.to_dense(n)[0]
    assert not torch.triu(d, 1).any()
    layout = pattern.layout(n, block_q=4, block_kv=4)
    assert torch.equal(layout.to_dense()[0], d)
    g_first = -(-ng // 2)
    for r in range(nb):
        rows = d[r * block:(r + 1) * block]
        cols = {c for c in range(nb) if rows[:, c * block:(c + 1) * block].any()}
        assert torch.equal(rows[:, r * block:(r + 1) * block], torch.ones(block, block).tril().bool())
        window = set(range(max(0, r - nw + 1), r + 1))
        globals_ = set(range(min(g_first, r + 1)))
        assert window | globals_ <= cols, f"row {r} misses window or global blocks"
        if r < g_first:
            assert cols == set(range(r + 1)), f"global row {r} sees every earlier block"
            continue
        random = cols - window - globals_
        free = len(set(range(g_first, max(g_first, r - nw + 1))))
        assert len(random) == min(nr, free) and all(g_first <= c < r - nw + 1 for c in random), r


def test_is_causal():
    causal = [P.causal(), P.sliding_window(8), P.dilated(4, 2), P.strided(4), P.streaming(2, 4),
              P.longformer(8, 2, causal=True), P.bigbird(4, causal=True), P.sliding_window(8, causal=False) & P.causal(),
              P.per_head([P.causal(), P.sliding_window(3)])]
    not_causal = [P.full(), P.sliding_window(8, causal=False), P.longformer(8, 2), P.bigbird(4),
                  P.causal() | P.sliding_window(3, causal=False), P.predicate(lambda b, h, q, kv: kv <= q)]
    assert all(p.is_causal() for p in causal)
    assert not any(p.is_causal() for p in not_causal)
    cells = torch.zeros(1, 4, 4, dtype=torch.bool)
    cells[0, 2, :2] = True
    assert P.block_sparse(cells, 8).is_causal()
    cells[0, 2, 2] = True  # a diagonal cell lets its first query see later keys
    assert not P.block_sparse(cells, 8).is_causal()


def test_layout_cache_keeps_every_length_inside_and_shrinks_back_outside():
    from sparse_attn.patterns import layout_cache

    pattern = P.sliding_window(8, causal=False)
    lengths = range(20, 120)  # 100 lengths: more than the default 32 kept
    with layout_cache(len(lengths)):
        first = {n: pattern.layout(n, block_q=16) for n in lengths}
        assert all(pattern.layout(n, block_q=16) is first[n] for n in lengths)  # no rebuild: the same objects
    assert all(pattern.layout(n, block_q=16) is first[n] for n in lengths[-5:])  # still there until a new one
    pattern.layout(500, block_q=16)
    assert len(pattern._layouts) == 32  # the default again, least recently used dropped
    again = pattern.layout(20, block_q=16)
    assert again is not first[20] and torch.equal(again.to_dense(), first[20].to_dense())
    with pytest.raises(ValueError, match="size"):
        with layout_cache(0):
            pass
