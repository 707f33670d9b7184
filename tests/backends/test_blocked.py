"""The `blocked` backend against the float64 reference: every preset, combinators, odd sizes,
q_len != kv_len, GQA, Dv != D, fully masked rows, fp32/bf16/fp16 rules, log-sum-exp, gradients.

The blocked backend allocates its own outputs (so the NaN-fill rule cannot be applied from
outside): instead every element is compared and NaN anywhere fails (see sa_testing)."""

from __future__ import annotations

import pytest
import torch
from sa_testing import (
    assert_fp32_close,
    assert_no_nan,
    check_backend_against_reference,
    dense_mask,
    make_qkv,
    masked_scores_lse,
    preset_zoo,
    document_ids_for,
    reference_f64,
    run_with_grads,
)

from conformance import Conformance, conformance_tests

import sparse_attn
from sparse_attn import patterns as P


def presets(n, heads=2):
    """The shared preset zoo (sa_testing.preset_zoo), block size 8 where a preset takes one."""
    return preset_zoo(n, heads, block=8)


N = 113
PRESET_NAMES = list(presets(N))


# The conformance suite (tests/conformance.py): the whole zoo, GQA, fewer queries than keys, on a
# prebuilt layout with small, unequal blocks (many full/partial blocks and ragged edges).
globals().update(conformance_tests(Conformance("blocked", layout_blocks=(16, 8))))


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_auto_path_fp32(name):
    """Default dispatch (blocked on CPU for sparse patterns, sdpa for full/causal)."""
    pattern = presets(N)[name]
    q, k, v = make_qkv(1, 2, N, 16)
    check_backend_against_reference(q, k, v, pattern, backend="auto")
    check_backend_against_reference(q, k, v, pattern, backend="blocked", return_lse=True)


@pytest.mark.parametrize("n", [1, 2, 113, 203])
@pytest.mark.parametrize("d", [59, 111])
@pytest.mark.parametrize("name", ["causal", "window", "longformer", "bigbird", "block_sparse_heads", "union"])
def test_odd_sizes(n, d, name):
    pattern = presets(n)[name]
    q, k, v = make_qkv(1, 2, n, d)
    check_backend_against_reference(q, k, v, pattern, return_lse=True)
    if n > 1:
        check_backend_against_reference(q, k, v, pattern.layout(n, block_q=7, block_kv=5), return_lse=True)


@pytest.mark.parametrize("name", ["window", "longformer", "bigbird"])
def test_n_1000(name):
    pattern = {"window": P.sliding_window(64), "longformer": P.longformer(33, [0, 500, 999]),
               "bigbird": P.bigbird(32, seed=1)}[name]
    q, k, v = make_qkv(1, 2, 1000, 59)
    check_backend_against_reference(q, k, v, pattern, return_lse=True)


# ----------------------------------------------------------- q_len != kv_len
@pytest.mark.parametrize("name", ["causal", "window", "dilated", "dilated_nc", "strided", "strided_nc",
                                  "longformer_causal", "bigbird", "streaming", "document_causal", "block_sparse",
                                  "per_head", "predicate_heads", "mixed"])
@pytest.mark.parametrize("nq", [1, 37])
def test_queries_are_the_last_positions(name, nq):
    """Decode (q_len=1) and chunked prefill (q_len=37) against 203 keys."""
    nkv = 203
    pattern = presets(nkv)[name]
    q, k, v = make_qkv(1, 2, nq, 20, nkv=nkv)
    out, lse, _ = check_backend_against_reference(q, k, v, pattern, return_lse=True)
    check_backend_against_reference(q, k, v, pattern.layout(nq, nkv, block_q=8, block_kv=16), return_lse=True)
    # the same rows of a full-length call
    qf, kf, vf = make_qkv(1, 2, nkv, 20)
    qf[:, :, nkv - nq:] = q
    kf.copy_(k), vf.copy_(v)
    full = sparse_attn.sparse_attention(qf, kf, vf, pattern, backend="blocked")
    torch.testing.assert_close(out, full[:, :, nkv - nq:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["causal", "window", "window_nc", "dilated", "strided_nc", "longformer", "bigbird",
                                  "block_sparse", "document", "predicate"])
@pytest.mark.parametrize("q_offset,nq", [(0, 40), (50, 31), (150, 53)])
def test_explicit_q_offset(name, q_offset, nq):
    nkv = 203
    pattern = presets(nkv)[name]
    q, k, v = make_qkv(1, 2, nq, 16, nkv=nkv)
    check_backend_against_reference(q, k, v, pattern, return_lse=True, q_offset=q_offset)
    layout = pattern.layout(nq, nkv, q_offset=q_offset, block_q=16, block_kv=8)
    check_backend_against_reference(q, k, v, layout, return_lse=True)


def test_more_queries_than_keys_with_offset():
    """Queries past the last key (q_offset given): causal rows see every key."""
    q, k, v = make_qkv(1, 2, 30, 16, nkv=20)
    check_backend_against_reference(q, k, v, P.causal(), q_offset=5, return_lse=True)
    check_backend_against_reference(q, k, v, P.sliding_window(8), q_offset=5, return_lse=True)


# ------------------------------------------------------------------------ GQA
@pytest.mark.parametrize("name", ["causal", "window", "dilated", "strided", "longformer", "bigbird", "bigbird_heads",
                                  "block_sparse_heads", "per_head", "predicate_heads", "mixed"])
def test_gqa(name):
    n = 77
    pattern = presets(n, heads=8)[name]
    q, k, v = make_qkv(2, 8, n, 16, hkv=2)
    check_backend_against_reference(q, k, v, pattern, return_lse=True)
    check_backend_against_reference(q, k, v, pattern.layout(n, block_q=8, block_kv=16), return_lse=True)


def test_gqa_equals_repeated_kv():
    n = 64
    pattern = P.per_head([P.sliding_window(4 + h) for h in range(6)])
    q, k, v = make_qkv(1, 6, n, 8, hkv=3)
    out = sparse_attn.sparse_attention(q, k, v, pattern, backend="blocked")
    rep = sparse_attn.sparse_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), pattern,
                                       backend="blocked")
    torch.testing.assert_close(out, rep, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["causal", "window", "bigbird", "per_head"])
def test_value_dim_differs(name):
    n = 90
    pattern = presets(n)[name]
    q, k, v = make_qkv(1, 2, n, 12, dv=33)
    out, _, _ = check_backend_against_reference(q, k, v, pattern, return_lse=True)
    assert out.shape == (1, 2, n, 33)
    q, k, v = make_qkv(1, 4, n, 40, hkv=2, dv=7)
    check_backend_against_reference(q, k, v, pattern if name != "per_head" else presets(n, 4)[name])


def test_batch_and_scale():
    q, k, v = make_qkv(3, 2, 50, 8)
    check_backend_against_reference(q, k, v, P.sliding_window(9), scale=0.37, return_lse=True)


# -------------------------------------------------------------- masked rows
def _empty_row_patterns(n):
    cells = torch.ones(-(-n // 8), -(-n // 8), dtype=torch.bool)
    cells[1] = False  # queries 8..15 see nothing
    cells[3, :] = False
    none = P.predicate(lambda b, h, q, kv: q < 0)
    return {
        "block_sparse_empty_rows": (P.block_sparse(cells, 8), list(range(8, 16)) + list(range(24, 32))),
        "document_and_empty": (P.document(document_ids_for(n)) & none, list(range(n))),
        "streaming_no_past": (P.streaming(0, 3) & P.predicate(lambda b, h, q, kv: q % 4 != 0),
                              list(range(0, n, 4))),
    }


@pytest.mark.parametrize("name", ["block_sparse_empty_rows", "document_and_empty", "streaming_no_past"])
@pytest.mark.parametrize("blocks", [None, (8, 8), (5, 3)])
def test_fully_masked_rows(name, blocks):
    n = 45
    pattern, empty = _empty_row_patterns(n)[name]
    target = pattern if blocks is None else pattern.layout(n, block_q=blocks[0], block_kv=blocks[1])
    q, k, v = make_qkv(1, 2, n, 8)
    mask = dense_mask(pattern, n, n)
    assert not mask[:, empty].any() and (mask.sum(-1) > 0).sum() == n - len(empty)  # the test's premise
    dout = torch.randn(1, 2, n, 8)
    out, lse, grads = run_with_grads(q, k, v, target, dout, backend="blocked",
                                     lse_weight=torch.randn(1, 2, n, dtype=torch.float64))
    assert_no_nan(out, lse, *grads)
    assert torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty]))
    assert torch.isneginf(lse[:, :, empty]).all()
    assert torch.isfinite(lse[:, :, [i for i in range(n) if i not in empty]]).all()
    assert torch.equal(grads[0][:, :, empty], torch.zeros_like(grads[0][:, :, empty]))
    check_backend_against_reference(q, k, v, target)


def test_fully_masked_rows_half_precision():
    n = 40
    pattern, empty = _empty_row_patterns(n)["block_sparse_empty_rows"]
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v = make_qkv(1, 2, n, 8, dtype=dtype)
        dout = torch.randn(1, 2, n, 8).to(dtype)
        out, lse, grads = run_with_grads(q, k, v, pattern, dout, backend="blocked",
                                         lse_weight=torch.randn(1, 2, n, dtype=torch.float64))
        assert_no_nan(out, lse, *grads)
        assert (out[:, :, empty] == 0).all() and torch.isneginf(lse[:, :, empty]).all()


def test_everything_masked():
    q, k, v = make_qkv(1, 2, 20, 8, requires_grad=True)
    out, lse = sparse_attn.sparse_attention(q, k, v, P.predicate(lambda b, h, q, kv: q < 0), backend="blocked",
                                            return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.equal(t.grad, torch.zeros_like(t.grad))


# ---------------------------------------------------------- low precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["causal", "window", "dilated", "strided", "longformer", "bigbird_heads", "block_sparse",
                                  "document_causal", "union", "mixed"])
def test_low_precision_rule(dtype, name):
    n = 113
    pattern = presets(n)[name]
    q, k, v = make_qkv(2, 2, n, 32, dtype=dtype)
    out, lse, grads = check_backend_against_reference(q, k, v, pattern, return_lse=True)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert lse.dtype == torch.float32
    check_backend_against_reference(q, k, v, pattern.layout(n, block_q=16, block_kv=8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_gqa_decode(dtype):
    pattern = P.streaming(4, 32)
    q, k, v = make_qkv(1, 8, 1, 64, hkv=2, nkv=301, dtype=dtype)
    check_backend_against_reference(q, k, v, pattern, return_lse=True)
    q, k, v = make_qkv(1, 8, 29, 64, hkv=2, nkv=301, dtype=dtype)
    check_backend_against_reference(q, k, v, pattern)


def test_float64_inputs_compute_in_float64():
    q, k, v = make_qkv(1, 2, 70, 16, dtype=torch.float64)
    out, lse = sparse_attn.sparse_attention(q, k, v, P.sliding_window(9), backend="blocked", return_lse=True)
    ref, ref_lse = reference_f64(q, k, v, P.sliding_window(9), return_lse=True)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------- lse
@pytest.mark.parametrize("name", ["window", "longformer", "bigbird_heads", "predicate_heads", "document_causal"])
def test_lse_is_logsumexp_of_masked_scores(name):
    n = 61
    pattern = presets(n)[name]
    q, k, v = make_qkv(1, 2, n, 16)
    _, lse = sparse_attn.sparse_attention(q, k, v, pattern.layout(n, block_q=8, block_kv=4), backend="blocked",
                                          return_lse=True)
    want = masked_scores_lse(q, k, pattern)
    assert lse.shape == (1, 2, n)
    assert_fp32_close(lse, want, what="lse")
    _, lse2 = sparse_attn.sparse_attention(q, k, v, pattern, backend="blocked", return_lse=True, scale=0.5)
    assert_fp32_close(lse2, masked_scores_lse(q, k, pattern, scale=0.5), what="lse (scale 0.5)")


# ---------------------------------------------------------------- gradients
GRADCHECK_PATTERNS = {
    "causal": P.causal(),
    "window": P.sliding_window(3),
    "dilated_nc": P.dilated(3, 2, causal=False),
    "longformer": P.longformer(2, [4]),
    "per_head": P.per_head([P.streaming(1, 2), P.fixed(3)]),
    "block_sparse_empty_row": P.block_sparse(torch.tensor([[1, 0, 0], [0, 0, 0], [1, 1, 1]]), 3),
}


@pytest.mark.parametrize("name", list(GRADCHECK_PATTERNS))
@pytest.mark.parametrize("blocks", [None, (4, 3)])
def test_gradcheck_float64(name, blocks):
    pattern = GRADCHECK_PATTERNS[name]
    n = 9
    target = pattern if blocks is None else pattern.layout(n, block_q=blocks[0], block_kv=blocks[1])
    q, k, v = make_qkv(1, 2, n, 4, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        return sparse_attn.sparse_attention(q, k, v, target, backend="blocked")

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["window", "longformer", "per_head"])
def test_gradcheck_float64_through_lse(name):
    pattern = GRADCHECK_PATTERNS[name]
    q, k, v = make_qkv(1, 2, 9, 4, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        out, lse = sparse_attn.sparse_attention(q, k, v, pattern.layout(9, block_q=2, block_kv=4), backend="blocked",
                                                return_lse=True)
        return out, lse

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_gqa_decode():
    q, k, v = make_qkv(1, 4, 2, 4, hkv=2, nkv=11, dv=3, dtype=torch.float64, requires_grad=True)

    def f(q, k, v):
        return sparse_attn.sparse_attention(q, k, v, P.sliding_window(4).layout(2, 11, block_q=1, block_kv=3),
                                            backend="blocked", return_lse=True)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["window", "bigbird_heads", "mixed", "document_causal"])
def test_grads_through_lse_match_reference(name):
    n = 97
    pattern = presets(n)[name]
    q, k, v = make_qkv(2, 2, n, 16)
    dout = torch.randn(2, 2, n, 16)
    w = torch.randn(2, 2, n, dtype=torch.float64)
    zero = torch.zeros_like(dout)
    # lse alone
    _, lse, g = run_with_grads(q, k, v, pattern, zero, backend="blocked", lse_weight=w)
    _, lse64, g64 = run_with_grads(*(t.double() for t in (q, k, v)), pattern, zero.double(), backend="reference",
                                   lse_weight=w)
    assert_fp32_close(lse, lse64, what="lse")
    for a, e, name_ in zip(g, g64, "qkv"):
        assert_fp32_close(a, e, what=f"d{name_} (lse loss)")
    assert torch.equal(g[2], torch.zeros_like(g[2]))  # lse does not depend on v
    # out and lse together
    check_backend_against_reference(q, k, v, pattern, return_lse=True)


@pytest.mark.parametrize("name", ["window", "longformer", "bigbird_heads", "per_head", "union"])
def test_grads_larger_shapes(name):
    n = 203
    pattern = presets(n)[name]
    q, k, v = make_qkv(2, 2, n, 40)
    check_backend_against_reference(q, k, v, pattern)
    check_backend_against_reference(q, k, v, pattern.layout(n, block_q=32, block_kv=16))


def test_grads_only_for_some_inputs():
    q, k, v = make_qkv(1, 2, 30, 8)
    k.requires_grad_(True)
    out = sparse_attn.sparse_attention(q, k, v, P.sliding_window(5), backend="blocked")
    (gk,) = torch.autograd.grad(out.square().sum(), (k,))
    k64 = k.detach().double().requires_grad_(True)
    ref = sparse_attn.sparse_attention(q.double(), k64, v.double(), P.sliding_window(5), backend="reference")
    (gk64,) = torch.autograd.grad(ref.square().sum(), (k64,))
    assert_fp32_close(gk, gk64, what="dk")


def test_deterministic_on_cpu():
    q, k, v = make_qkv(1, 2, 100, 16)
    pattern = P.bigbird(8, seed=2)
    dout = torch.randn(1, 2, 100, 16)
    a = run_with_grads(q, k, v, pattern, dout, backend="blocked")
    b = run_with_grads(q, k, v, pattern, dout, backend="blocked")
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[2], b[2]))


def test_layout_reused_across_calls():
    layout = P.sliding_window(7).layout(50, block_q=8)
    for _ in range(2):
        q, k, v = make_qkv(1, 2, 50, 8)
        check_backend_against_reference(q, k, v, layout, return_lse=True)


@pytest.mark.parametrize("kind", ["block_sparse", "predicate"])
def test_descending_block_runs(kind):
    """Rows whose kv blocks move backwards as the query block advances (an anti-diagonal)."""
    n, c = 24, 4
    nb = n // c
    if kind == "block_sparse":
        pattern = P.block_sparse(torch.eye(nb, dtype=torch.bool).flip(1), c)
    else:
        pattern = P.predicate(lambda b, h, q, kv: q // c + kv // c == nb - 1)
    q, k, v = make_qkv(1, 2, n, 8)
    check_backend_against_reference(q, k, v, pattern.layout(n, block_q=c), return_lse=True)
    check_backend_against_reference(q, k, v, pattern.layout(n, block_q=c, block_kv=2 * c), return_lse=True)
