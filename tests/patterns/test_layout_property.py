"""Property tests: the analytic block enumerators agree with the element predicate.

For random patterns (every preset with random parameters, and random `|`, `&`, `per_head`
combinations), random lengths, offsets and block sizes, the layout's block states must equal
the states derived densely from `layout.pattern.to_dense(...)` (full: every in-range element
allowed; partial: some; empty: none), and `layout.to_dense()` must equal the pattern's mask.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_attn import patterns as P

MAX_EXAMPLES = 400
SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Named predicates so that failures print something readable.


def _pred_checker(b, h, q, kv):
    return (q + kv) % 3 != 0


def _pred_far(b, h, q, kv):
    return (q - kv).abs() >= 5


def _pred_none(b, h, q, kv):
    return (q < 0) & (kv < 0)


def _pred_head_stride(b, h, q, kv):
    return (q - kv) % (h + 2) == 0


def _pred_head_prefix(b, h, q, kv):
    return kv <= q // (h + 1)


SHARED_PREDICATES = [_pred_checker, _pred_far, _pred_none]
HEAD_PREDICATES = [_pred_head_stride, _pred_head_prefix]


def dense_block_states(mask: torch.Tensor, block_q: int, block_kv: int) -> torch.Tensor:
    """int8 [H, NQB, NKB] states of a bool mask [H, Nq, Nkv], counting only in-range elements."""
    h, nq, nkv = mask.shape
    nqb, nkb = -(-nq // block_q), -(-nkv // block_kv)
    padded = torch.zeros(h, nqb * block_q, nkb * block_kv, dtype=torch.int64)
    padded[:, :nq, :nkv] = mask.long()
    inside = torch.zeros(1, nqb * block_q, nkb * block_kv, dtype=torch.int64)
    inside[:, :nq, :nkv] = 1
    count = padded.reshape(h, nqb, block_q, nkb, block_kv).sum((2, 4))
    area = inside.reshape(1, nqb, block_q, nkb, block_kv).sum((2, 4))
    states = torch.ones_like(count, dtype=torch.int8)
    states[count == 0] = 0
    states[count == area] = 2
    return states


@st.composite
def geometries(draw):
    """(q_len, kv_len, q_offset or None, block_q, block_kv)."""
    q_len = draw(st.integers(1, 70))
    if draw(st.booleans()):  # queries are the last q_len positions
        kv_len = draw(st.integers(q_len, 80))
        q_offset = None
    else:
        kv_len = draw(st.integers(1, 80))
        q_offset = draw(st.integers(0, 40))
    block_q = draw(st.integers(1, 9))
    block_kv = draw(st.integers(1, 9)) if draw(st.booleans()) else block_q
    return q_len, kv_len, q_offset, block_q, block_kv


def _random_bool(draw, shape, label):
    seed = draw(st.integers(0, 2**31 - 1), label=f"{label} seed")
    density = draw(st.sampled_from([0.0, 0.2, 0.5, 0.9, 1.0]), label=f"{label} density")
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) < density


def leaf(draw, geom, heads, *, per_head_ok):
    """One preset with random parameters valid for the geometry."""
    q_len, kv_len, q_offset, _, _ = geom
    q_end = (kv_len if q_offset is None else q_offset + q_len)
    span = max(kv_len, q_end)
    kinds = ["full", "causal", "window", "dilated", "strided", "fixed", "longformer", "streaming", "document",
             "block_sparse", "predicate"]
    if q_end <= kv_len:  # BigBird's cell map is drawn for kv_len positions
        kinds.append("bigbird")
    kind = draw(st.sampled_from(kinds))
    causal = draw(st.booleans())
    if kind == "full":
        return P.full()
    if kind == "causal":
        return P.causal()
    if kind == "window":
        return P.sliding_window(draw(st.integers(1, 24)), causal=causal)
    if kind == "dilated":
        return P.dilated(draw(st.integers(1, 7)), draw(st.integers(1, 5)), causal=causal)
    if kind == "strided":
        return P.strided(draw(st.integers(1, 12)), causal=causal)
    if kind == "fixed":
        block = draw(st.integers(1, 12))
        return P.fixed(block, draw(st.integers(1, block)), causal=causal)
    if kind == "longformer":
        if draw(st.booleans()):
            g = draw(st.integers(0, min(kv_len, 5)))
        else:
            g = draw(st.lists(st.integers(0, kv_len - 1), min_size=1, max_size=4))  # [] is a known bug
        return P.longformer(draw(st.integers(1, 16)), g, causal=causal)
    if kind == "streaming":
        return P.streaming(draw(st.integers(0, 5)), draw(st.integers(1, 16)))
    if kind == "document":
        n_docs = draw(st.integers(1, 6))
        extra = draw(st.integers(0, 3))
        seed = draw(st.integers(0, 2**31 - 1))
        ids = torch.randint(0, n_docs, (span + extra,), generator=torch.Generator().manual_seed(seed))
        return P.document(torch.sort(ids).values)
    if kind == "block_sparse":
        cq = draw(st.integers(1, 9))
        ck = draw(st.integers(1, 9)) if draw(st.booleans()) else cq
        nqb, nkb = -(-span // cq), -(-kv_len // ck)  # rows cover the whole sequence
        if per_head_ok and heads > 1 and draw(st.booleans()):
            cells = _random_bool(draw, (heads, nqb, nkb), "cells")
        else:
            cells = _random_bool(draw, (nqb, nkb), "cells")
        return P.block_sparse(cells, cq if cq == ck else (cq, ck))
    if kind == "predicate":
        if per_head_ok and heads > 1 and draw(st.booleans()):
            return P.predicate(draw(st.sampled_from(HEAD_PREDICATES)), num_heads=heads)
        return P.predicate(draw(st.sampled_from(SHARED_PREDICATES)))
    if kind == "bigbird":
        nh = heads if (per_head_ok and heads > 1 and draw(st.booleans())) else None
        return P.bigbird(draw(st.integers(1, 8)), num_window_blocks=draw(st.integers(1, 4)),
                         num_global_blocks=draw(st.integers(0, 3)), num_random_blocks=draw(st.integers(0, 3)),
                         seed=draw(st.integers(0, 1000)), num_heads=nh)
    raise AssertionError(kind)


def pattern_strategy(draw, geom, heads, depth, *, per_head_ok=True):
    node = draw(st.sampled_from(["leaf", "leaf", "or", "and", "per_head"] if depth > 0 else ["leaf"]))
    if node == "leaf":
        return leaf(draw, geom, heads, per_head_ok=per_head_ok)
    if node == "per_head":
        if not per_head_ok or heads == 1:
            return leaf(draw, geom, heads, per_head_ok=per_head_ok)
        return P.per_head([pattern_strategy(draw, geom, heads, depth - 1, per_head_ok=False) for _ in range(heads)])
    n = draw(st.integers(2, 3))
    parts = [pattern_strategy(draw, geom, heads, depth - 1, per_head_ok=per_head_ok) for _ in range(n)]
    out = parts[0]
    for p in parts[1:]:
        out = (out | p) if node == "or" else (out & p)
    return out


@st.composite
def cases(draw, max_depth=2):
    geom = draw(geometries())
    heads = draw(st.integers(1, 3))
    pattern = pattern_strategy(draw, geom, heads, draw(st.integers(0, max_depth)))
    return geom, pattern


def _check(geom, pattern):
    q_len, kv_len, q_offset, block_q, block_kv = geom
    layout = pattern.layout(q_len, kv_len, block_q=block_q, block_kv=block_kv, q_offset=q_offset)
    expected_offset = kv_len - q_len if q_offset is None else q_offset
    assert (layout.q_len, layout.kv_len, layout.q_offset) == (q_len, kv_len, expected_offset)
    assert layout.num_heads == (pattern.num_heads or 1)
    assert (layout.num_q_blocks, layout.num_kv_blocks) == (-(-q_len // block_q), -(-kv_len // block_kv))
    nh = layout.num_heads if layout.num_heads > 1 else None
    dense = layout.pattern.to_dense(q_len, kv_len, q_offset=layout.q_offset, num_heads=nh)
    assert dense.shape == (layout.num_heads, q_len, kv_len) and dense.dtype == torch.bool
    expected = dense_block_states(dense, block_q, block_kv)
    states = layout.block_states()
    assert states.shape == expected.shape
    if not torch.equal(states, expected):
        diff = (states != expected).nonzero()[:5].tolist()
        raise AssertionError(f"block states differ at (h, qb, kb) {diff}: layout "
                             f"{[int(states[tuple(i)]) for i in diff]} vs dense {[int(expected[tuple(i)]) for i in diff]}"
                             f"\n{layout!r}")
    assert torch.equal(layout.to_dense(), dense)
    # CSR bookkeeping agrees with the states
    assert layout.nnz_blocks() == int((states > 0).sum())
    assert torch.equal(layout.full_kv_num_blocks, (states == 2).sum(-1).to(torch.int32))
    assert torch.equal(layout.kv_num_blocks, (states == 1).sum(-1).to(torch.int32))
    assert torch.equal(layout.allowed_pairs(), dense.sum((1, 2)))


@SETTINGS
@given(cases())
def test_block_states_match_dense_predicate(case):
    _check(*case)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(geometries(), st.data())
def test_single_presets_match_dense_predicate(geom, data):
    """Leaves alone (no combinators), so that every preset gets many examples of its own."""
    heads = data.draw(st.integers(1, 3))
    pattern = leaf(data.draw, geom, heads, per_head_ok=True)
    _check(geom, pattern)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(max_depth=3))
def test_layout_to_dense_deeper_combinations(case):
    _check(*case)
