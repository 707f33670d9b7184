"""Per-row information: a padded batch equals each row run alone.

Ground truth is independent of the per-row machinery: each row is cut to its real tokens and
run alone on the float64 `reference` backend. Compared at real positions (outputs and
gradients); pad query rows must be 0 and pad keys must get no gradient.
"""

from __future__ import annotations

import pytest
import torch
from sa_testing import assert_fp32_close, assert_low_precision_close

import sparse_attn
from sparse_attn import patterns as P
from sparse_attn.backends.reference import dense_attention

N = 40
LENGTHS = [40, 1, 23, 9]  # very different, one row of a single token


def presets():
    doc = torch.tensor([0] * 7 + [1] * 20 + [2] * 13)  # positions of the longest row
    return {
        "full": P.full(), "causal": P.causal(), "window": P.sliding_window(6),
        "window_nc": P.sliding_window(6, causal=False), "dilated": P.dilated(3, 2),
        "dilated_nc": P.dilated(3, 3, causal=False), "strided": P.strided(5), "fixed": P.fixed(6, 2),
        "longformer": P.longformer(6, 1), "longformer_causal": P.longformer(6, 3, causal=True),
        "bigbird": P.bigbird(4, seed=1), "bigbird_causal": P.bigbird(4, causal=True),
        "streaming": P.streaming(2, 5), "document": P.document(doc) & P.causal(),
        "per_head": P.per_head([P.sliding_window(3), P.streaming(1, 4)]),
        "predicate": P.predicate(lambda b, h, q, kv: (q - kv) % 3 == 0),
        "union": P.sliding_window(4) | P.strided(7), "intersection": P.longformer(8, 1) & P.causal(),
    }


def _mask(side, lengths=LENGTHS, n=N):
    mask = torch.zeros(len(lengths), n, dtype=torch.bool)
    for b, length in enumerate(lengths):
        mask[b, n - length:] = True if side == "left" else False
        mask[b, :length] = True if side == "right" else mask[b, :length]
    return mask


def _real(mask, b):
    return mask[b].nonzero().squeeze(1)


def _alone(q, k, v, pattern, mask, dout, dtype, backend="reference"):
    """Per row, the row's real tokens alone: (out, dq, dk, dv) scattered back into padded shape."""
    outs, grads = torch.zeros(*q.shape[:3], v.shape[3], dtype=dtype), [torch.zeros_like(t, dtype=dtype) for t in (q, k, v)]
    for b in range(q.shape[0]):
        idx = _real(mask, b)
        parts = [t[b:b + 1, :, idx].detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = sparse_attn.sparse_attention(*parts, pattern, backend=backend)
        out.backward(dout[b:b + 1, :, idx].to(dtype))
        outs[b][:, idx] = out.detach()[0]
        for g, p in zip(grads, parts):
            g[b][:, idx] = p.grad[0]
    return outs, grads


def _padded(q, k, v, pattern, mask, dout, dtype, backend):
    parts = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = sparse_attn.sparse_attention(*parts, pattern, key_padding_mask=mask, backend=backend)
    out.backward(dout.to(dtype))
    return out.detach(), [p.grad for p in parts]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", list(presets()))
@pytest.mark.parametrize("backend", ["blocked", "reference"])
def test_padded_batch_equals_rows_alone_float64(name, side, backend):
    pattern = presets()[name]
    mask = _mask(side)
    q, k, v = (torch.randn(len(LENGTHS), 2, N, 8, dtype=torch.float64) for _ in range(3))
    dout = torch.randn_like(q)
    out, grads = _padded(q, k, v, pattern, mask, dout, torch.float64, backend)
    out64, grads64 = _alone(q, k, v, pattern, mask, dout, torch.float64)
    assert torch.all(out[~mask[:, None, :].expand_as(out[..., 0])] == 0), "pad query rows must be 0"
    assert_fp32_close(out, out64, rtol=1e-10, what="out")
    for g, g64, what in zip(grads, grads64, ("dq", "dk", "dv")):
        assert_fp32_close(g, g64, rtol=1e-10, what=what)  # pads: no gradient, as alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["window", "longformer", "bigbird", "streaming", "strided"])
def test_padded_batch_low_precision(name, dtype):
    pattern = presets()[name]
    mask = _mask("left")
    q, k, v = (torch.randn(len(LENGTHS), 2, N, 16, dtype=torch.float64) for _ in range(3))
    dout = torch.randn_like(q)
    out, grads = _padded(q, k, v, pattern, mask, dout, dtype, "blocked")
    out64, grads64 = _alone(q, k, v, pattern, mask, dout, torch.float64)
    if dtype == torch.float32:
        assert_fp32_close(out, out64, what="out")
        for g, g64 in zip(grads, grads64):
            assert_fp32_close(g, g64, what="grad")
        return
    out_lo, grads_lo = _alone(q, k, v, pattern, mask, dout, dtype)
    assert_low_precision_close(out, out_lo, out64, what="out")
    for g, lo, g64 in zip(grads, grads_lo, grads64):
        assert_low_precision_close(g, lo, g64, factor=3, what="grad")


def test_sinks_and_globals_are_each_rows_first_real_token():
    """Under left padding a sink is the row's first real token, not index 0 (a pad)."""
    mask = _mask("left", [12, 5], 12)
    q, k, v = (torch.randn(2, 1, 12, 4, dtype=torch.float64) for _ in range(3))
    out = sparse_attn.sparse_attention(q, k, v, P.streaming(1, 2), key_padding_mask=mask)
    last = q[1:, :, -1:]  # row 1's last query sees its first real key (index 7) and the last two keys
    keys = torch.tensor([7, 10, 11])
    expected, _ = dense_attention(last, k[1:, :, keys], v[1:, :, keys], torch.ones(1, 3, dtype=torch.bool), 0.5)
    assert torch.allclose(out[1:, :, -1:], expected, atol=1e-12)


def test_rows_without_real_keys_return_zero():
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 3:] = True
    q, k, v = (torch.randn(2, 2, 10, 4) for _ in range(3))
    out, lse = sparse_attn.sparse_attention(q, k, v, P.causal(), key_padding_mask=mask, return_lse=True)
    assert torch.all(out[1] == 0) and torch.all(torch.isneginf(lse[1]))


def test_a_mask_with_holes_drops_those_keys_only():
    mask = torch.ones(1, 16, dtype=torch.bool)
    mask[0, [3, 4, 9]] = False
    q, k, v = (torch.randn(1, 2, 16, 4, dtype=torch.float64) for _ in range(3))
    out = sparse_attn.sparse_attention(q, k, v, P.sliding_window(5), key_padding_mask=mask)
    dense = P.sliding_window(5).to_dense(16)[0] & mask[0][None, :] & mask[0][:, None]
    expected, _ = dense_attention(q, k, v, dense, 0.5)
    assert torch.allclose(out, expected, atol=1e-12)


def _explicit_positions(q, k, v, pattern, q_pos, k_pos):
    mask = pattern.allowed(q_pos[:, None], k_pos[None, :])
    return dense_attention(q, k, v, mask, q.shape[-1] ** -0.5)[0]


@pytest.mark.parametrize("pattern", [P.sliding_window(5), P.streaming(2, 4), P.longformer(4, 1, causal=True),
                                     P.dilated(3, 2)])
def test_per_row_q_offset_and_kv_offset(pattern):
    """kv_offset: key index 0 is a later position (an evicted cache head); q_offset per row."""
    q, k, v = (torch.randn(2, 2, n, 4, dtype=torch.float64) for n in (3, 10, 10))
    kv_offset = torch.tensor([0, 6])
    q_offset = torch.tensor([8, 13])  # row 0: queries at 8..10; row 1: at 13..15 (keys at 6..15)
    out = sparse_attn.sparse_attention(q, k, v, pattern, q_offset=q_offset, kv_offset=kv_offset, backend="blocked")
    for b in range(2):
        k_pos = torch.arange(10) + int(kv_offset[b])
        q_pos = torch.arange(3) + int(q_offset[b])
        expected = _explicit_positions(q[b:b + 1], k[b:b + 1], v[b:b + 1], pattern, q_pos, k_pos)
        assert torch.allclose(out[b:b + 1], expected, atol=1e-12)
    # one int kv_offset for the whole batch, queries last by default
    out = sparse_attn.sparse_attention(q, k, v, pattern, kv_offset=100)
    expected = _explicit_positions(q, k, v, pattern, torch.arange(107, 110), torch.arange(100, 110))
    assert torch.allclose(out, expected, atol=1e-12)


def test_decoding_step_with_left_padding_equals_the_row_alone():
    """One new token per row over a left-padded cache: queries are the last index."""
    mask = _mask("left", [20, 6, 13], 20)
    q = torch.randn(3, 2, 1, 8, dtype=torch.float64)
    k, v = (torch.randn(3, 2, 20, 8, dtype=torch.float64) for _ in range(2))
    pattern = P.streaming(2, 4)
    out = sparse_attn.sparse_attention(q, k, v, pattern, key_padding_mask=mask)
    for b in range(3):
        idx = _real(mask, b)
        alone = sparse_attn.sparse_attention(q[b:b + 1], k[b:b + 1, :, idx], v[b:b + 1, :, idx], pattern,
                                             backend="reference")
        assert torch.allclose(out[b:b + 1], alone, atol=1e-12)


def test_per_row_errors():
    q, k, v = (torch.randn(2, 2, 8, 4) for _ in range(3))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, kv_len\) = \(2, 8\)"):
        sparse_attn.sparse_attention(q, k, v, P.causal(), key_padding_mask=torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        sparse_attn.sparse_attention(q, k, v, P.causal(), key_padding_mask=torch.ones(2, 8))
    with pytest.raises(ValueError, match=r"q_offset must be an int or a tensor of shape \(2,\)"):
        sparse_attn.sparse_attention(q, k, v, P.causal(), q_offset=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="kv_offset must be an int or an integer tensor"):
        sparse_attn.sparse_attention(q, k, v, P.causal(), kv_offset=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="kv_offset must be >= 0"):
        sparse_attn.sparse_attention(q, k, v, P.causal(), kv_offset=-1)
    with pytest.raises(ValueError, match=r"q_offset=20 of row 0 puts its first query at key index 20"):
        sparse_attn.sparse_attention(q, k, v, P.causal(), q_offset=torch.tensor([20, 0]))
    with pytest.raises(TypeError, match="prebuilt BlockLayout"):
        sparse_attn.sparse_attention(q, k, v, P.causal().layout(8), key_padding_mask=torch.ones(2, 8, dtype=torch.bool))
    mask = _mask("left", [8, 5], 8)
    with pytest.raises(ValueError, match="global token index 6 is out of range for a sequence of 5"):
        sparse_attn.sparse_attention(q, k, v, P.longformer(4, [6]), key_padding_mask=mask)  # as row 1 alone


def test_attention_passes_per_row_arguments_to_patterns_and_refuses_them_elsewhere():
    mask = _mask("left", [10, 4], 10)
    q, k, v = (torch.randn(2, 2, 10, 4, dtype=torch.float64) for _ in range(3))
    out = sparse_attn.attention(q, k, v, "sliding_window:window=3", key_padding_mask=mask)
    assert torch.equal(out, sparse_attn.sparse_attention(q, k, v, P.sliding_window(3), key_padding_mask=mask))
    sparse_attn.register_mechanism(name="no_padding_toy", kind="dynamic", summary="test: no mask",
                                   op=lambda q, k, v, *, causal=False: sparse_attn.attention(q, k, v, "causal"))
    try:
        with pytest.raises(TypeError, match="takes no parameter.*key_padding_mask"):
            sparse_attn.attention(q, k, v, "no_padding_toy", key_padding_mask=mask)
    finally:
        sparse_attn.unregister_mechanism("no_padding_toy")


# ------------------------------------------------------------------------ packed documents
DOC_IDS = torch.tensor([[0] * 12 + [1] * 20 + [2] * 8, [7] * 25 + [-1] * 15, [0] * 1 + [1] * 39])


def _documents_alone(q, k, v, pattern, ids, dout):
    out, grads = torch.zeros_like(q), [torch.zeros_like(t) for t in (q, k, v)]
    for b in range(ids.shape[0]):
        for d in ids[b].unique().tolist():
            if d < 0:
                continue
            idx = (ids[b] == d).nonzero().squeeze(1)
            parts = [t[b:b + 1, :, idx].detach().requires_grad_() for t in (q, k, v)]
            o = sparse_attn.sparse_attention(*parts, pattern, backend="reference")
            o.backward(dout[b:b + 1, :, idx])
            out[b][:, idx] = o.detach()[0]
            for g, p in zip(grads, parts):
                g[b][:, idx] = p.grad[0]
    return out, grads


@pytest.mark.parametrize("name", [n for n in presets() if n not in ("document", "longformer_causal")])
@pytest.mark.parametrize("backend", ["blocked", "reference"])
def test_packed_documents_equal_separate_runs(name, backend):
    pattern = presets()[name]
    q, k, v = (torch.randn(3, 2, N, 8, dtype=torch.float64) for _ in range(3))
    dout = torch.randn_like(q)
    parts = [t.clone().requires_grad_() for t in (q, k, v)]
    out = sparse_attn.sparse_attention(*parts, pattern, document_ids=DOC_IDS, backend=backend)
    out.backward(dout)
    out64, grads64 = _documents_alone(q, k, v, pattern, DOC_IDS, dout)
    assert_fp32_close(out, out64, rtol=1e-10, what="out")
    for p, g64, what in zip(parts, grads64, ("dq", "dk", "dv")):
        assert_fp32_close(p.grad, g64, rtol=1e-10, what=what)


@pytest.mark.parametrize("pattern", [P.sliding_window(5), P.longformer(4, 1), P.bigbird(3, seed=2), P.causal()])
@pytest.mark.parametrize("block", [4, 7, 16])
def test_packed_layout_blocks_are_exact(pattern, block):
    """The packed view's full/partial/empty split equals the one derived from its element mask."""
    from sparse_attn.patterns.rows import Packed

    docs = [(0, 9), (9, 30), (33, 47)]  # indices 30..32 are pads
    alones = [(b - a, b - a, 0, 0) for a, b in docs]
    view = Packed(pattern, docs, alones)
    layout = view.layout(47, block_q=block)
    dense = layout.pattern.to_dense(47)
    assert torch.equal(layout.to_dense(), dense)
    states = layout.block_states()[0]
    for qb in range(states.shape[0]):
        for kb in range(states.shape[1]):
            cell = dense[0, qb * block:(qb + 1) * block, kb * block:(kb + 1) * block]
            expected = 0 if not cell.any() else 2 if cell.all() else 1
            assert int(states[qb, kb]) == expected, (qb, kb)
    assert int(layout.allowed_pairs()) == int(dense.sum())


def test_cu_seqlens_packing():
    from sparse_attn.ops.batch_rows import documents_from_cu_seqlens

    ids = documents_from_cu_seqlens(torch.tensor([0, 5, 12, 20]), total=24)
    assert ids.tolist() == [[0] * 5 + [1] * 7 + [2] * 8 + [-1] * 4]
    q, k, v = (torch.randn(1, 2, 24, 4, dtype=torch.float64) for _ in range(3))
    out = sparse_attn.sparse_attention(q, k, v, P.causal(), document_ids=ids)
    expected = sparse_attn.sparse_attention(q, k, v, P.document(torch.where(ids[0] < 0, 3, ids[0])) & P.causal(),
                                            key_padding_mask=ids >= 0)
    assert torch.allclose(out, expected, atol=1e-12)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        documents_from_cu_seqlens(torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="document_ids must have shape"):
        sparse_attn.sparse_attention(q, k, v, P.causal(), document_ids=ids[:, :10])
    with pytest.raises(ValueError, match="take neither q_offset nor kv_offset"):
        sparse_attn.sparse_attention(q, k, v, P.causal(), document_ids=ids, kv_offset=3)


@pytest.mark.parametrize("name, params", [("linear", {}), ("topk", {"top_k": 5}), ("performer", {"generator": 0})])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
def test_mechanisms_with_key_padding_equal_rows_alone(name, params, causal, side):
    """linear and performer (pad keys get zero features) and topk (pad keys never picked) take the mask too."""
    mask = _mask(side)
    q, k, v = (torch.randn(len(LENGTHS), 2, N, 8, dtype=torch.float64) for _ in range(3))
    dout = torch.randn_like(q)
    parts = [t.clone().requires_grad_() for t in (q, k, v)]
    out = sparse_attn.attention(*parts, name, **params, causal=causal, key_padding_mask=mask)
    out.backward(dout)
    assert torch.isfinite(out).all() and all(torch.isfinite(p.grad).all() for p in parts)
    for b in range(len(LENGTHS)):
        idx = _real(mask, b)
        alone_parts = [t[b:b + 1, :, idx].clone().requires_grad_() for t in (q, k, v)]
        alone = sparse_attn.attention(*alone_parts, name, **params, causal=causal)
        alone.backward(dout[b:b + 1, :, idx])
        torch.testing.assert_close(out[b:b + 1, :, idx], alone, rtol=1e-10, atol=1e-12)
        for p, a in zip(parts, alone_parts):
            torch.testing.assert_close(p.grad[b:b + 1, :, idx], a.grad, rtol=1e-10, atol=1e-12)
        assert torch.all(out[b][:, ~mask[b]] == 0) and torch.all(parts[1].grad[b][:, ~mask[b]] == 0)


def test_row_geometry_is_reused_only_for_the_same_unmodified_mask(monkeypatch):
    from sparse_attn.ops import batch_rows

    calls = []
    real = batch_rows._batch_geometries
    monkeypatch.setattr(batch_rows, "_batch_geometries", lambda *a: calls.append(1) or real(*a))
    mask = _mask("left", [10, 4], 10)
    q, k, v = (torch.randn(2, 2, 10, 4, dtype=torch.float64) for _ in range(3))
    first = sparse_attn.sparse_attention(q, k, v, P.sliding_window(3), key_padding_mask=mask)
    sparse_attn.sparse_attention(q, k, v, P.causal(), key_padding_mask=mask)  # another layer, same mask
    assert len(calls) == 1
    mask[1, 3] = True  # edited in place: read again, and the result follows the edit
    changed = sparse_attn.sparse_attention(q, k, v, P.sliding_window(3), key_padding_mask=mask)
    assert len(calls) == 2 and not torch.allclose(changed[1], first[1])
    other = mask.clone()  # an equal mask in another tensor: read again (no identity, no reuse)
    sparse_attn.sparse_attention(q, k, v, P.sliding_window(3), key_padding_mask=other)
    assert len(calls) == 3
    with torch.inference_mode():  # inference tensors have no version counter: never reused
        inf_mask = _mask("left", [10, 4], 10)
        a = sparse_attn.sparse_attention(q, k, v, P.sliding_window(3), key_padding_mask=inf_mask)
        inf_mask[1, 3] = True
        b = sparse_attn.sparse_attention(q, k, v, P.sliding_window(3), key_padding_mask=inf_mask)
    assert not torch.allclose(a[1], b[1])
