"""Bad input raises ValueError/TypeError naming the argument (never a bare assert, never a
silent fallback). Each case matches a fragment of the message."""

from __future__ import annotations

import pytest
import torch
from sa_testing import make_qkv

import sparse_attn
from sparse_attn import patterns as P

SW = P.sliding_window(4)


def qkv(**kw):
    return make_qkv(1, 2, 16, 8, **kw)


def call(q, k, v, pattern=SW, **kw):
    return sparse_attn.sparse_attention(q, k, v, pattern, **kw)


# ------------------------------------------------------------------- tensors
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_wrong_rank(which):
    t = dict(zip("qkv", qkv()))
    t[which] = t[which][0]
    with pytest.raises(ValueError, match=rf"{which} must have 4 dims.*\(2, 16, 8\)"):
        call(t["q"], t["k"], t["v"])


def test_not_a_tensor():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        call(q.numpy(), k, v)
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        call(q, k, [1.0])


def test_mismatched_batch():
    q, _, _ = qkv()
    k, v = torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    with pytest.raises(ValueError, match="batch"):
        call(q, k, v)


def test_k_v_length_mismatch():
    q, k, _ = qkv()
    with pytest.raises(ValueError, match=r"k and v .*length.*\(1, 2, 15, 8\)"):
        call(q, k, torch.randn(1, 2, 15, 8))


def test_k_v_heads_mismatch():
    q, k, _ = qkv()
    with pytest.raises(ValueError, match=r"k and v .*heads"):
        call(q, k, torch.randn(1, 1, 16, 8))


def test_q_k_head_dim_mismatch():
    q, _, _ = qkv()
    with pytest.raises(ValueError, match=r"head dim.*q \(1, 2, 16, 8\).*k \(1, 2, 16, 7\)"):
        call(q, torch.randn(1, 2, 16, 7), torch.randn(1, 2, 16, 7))


def test_zero_head_dim():
    with pytest.raises(ValueError, match="head_dim"):
        call(torch.randn(1, 2, 16, 0), torch.randn(1, 2, 16, 0), torch.randn(1, 2, 16, 4))


@pytest.mark.parametrize("hq,hkv", [(3, 2), (2, 4), (2, 0)])
def test_heads_not_divisible(hq, hkv):
    q = torch.randn(1, hq, 16, 8)
    k = v = torch.randn(1, hkv, 16, 8)
    with pytest.raises(ValueError, match=rf"q heads \({hq}\).*multiple of k/v heads \({hkv}\)"):
        call(q, k, v)


def test_dtype_mismatch():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"share a dtype.*q torch.float64.*k torch.float32"):
        call(q.double(), k, v)
    with pytest.raises(TypeError, match=r"v torch.bfloat16"):
        call(q, k, v.bfloat16())


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_dtype(dtype):
    q, k, v = (t.to(dtype) for t in qkv())
    with pytest.raises(TypeError, match=rf"q must be a floating tensor.*{str(dtype).replace('torch.', '')}"):
        call(q, k, v)


def test_device_mismatch_meta():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"one device.*k meta"):
        call(q, k.to("meta"), v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_mismatch_cuda():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="device"):
        call(q.cuda(), k, v)
    layout = SW.layout(16, device="cuda")
    with pytest.raises(ValueError, match="layout is on"):
        call(q, k, v, layout)


# ---------------------------------------------------------------- call args
@pytest.mark.parametrize("scale", [0, -1.0, float("nan"), float("inf"), "0.5", True])
def test_bad_scale(scale):
    with pytest.raises((ValueError, TypeError), match="scale"):
        call(*qkv(), scale=scale)


@pytest.mark.parametrize("q_offset", [-1, 1.5, True])
def test_bad_q_offset(q_offset):
    with pytest.raises((ValueError, TypeError), match="q_offset"):
        call(*qkv(), q_offset=q_offset)


def test_q_len_greater_than_kv_len_needs_q_offset():
    q = torch.randn(1, 2, 20, 8)
    _, k, v = qkv()
    with pytest.raises(ValueError, match=r"q_offset"):
        call(q, k, v)
    with pytest.raises(ValueError, match=r"q_len \(20\) > kv_len \(16\).*q_offset"):
        SW.layout(20, 16)
    assert call(q, k, v, q_offset=0).shape == (1, 2, 20, 8)  # with it, fine


def test_q_offset_past_every_key_raises():
    """Queries after a gap of key-less positions are an offset mistake, not a request for zeros."""
    q, _, _ = qkv()
    _, k, v = make_qkv(1, 2, 64, 8)
    with pytest.raises(ValueError, match=r"q_offset=1000 .*gap of 936 positions.*q_offset must be <= kv_len"):
        call(q, k, v, P.sliding_window(16), q_offset=1000)
    with pytest.raises(ValueError, match=r"q_offset=65"):
        sparse_attn.attention(q, k, v, "topk", top_k=4, q_offset=65)
    # right after the keys (new tokens attending a cache without their own keys) is allowed
    out = call(q, k, v, P.causal(), q_offset=64, backend="blocked")
    ref = sparse_attn.sparse_attention(q.double(), k.double(), v.double(), P.causal(), q_offset=64,
                                       backend="reference")
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_global_token_count_beyond_the_sequence_raises_like_the_list_form():
    q, k, v = make_qkv(1, 2, 64, 8)
    for pattern in (P.longformer(8, global_tokens=100), P.longformer(8, [100])):
        with pytest.raises(ValueError, match=r"global token index (99|100) is out of range .*64"):
            call(q, k, v, pattern)
    assert call(q, k, v, P.longformer(8, global_tokens=64)).shape == (1, 2, 64, 8)


def test_counts_that_may_exceed_a_growing_sequence_mean_up_to_n():
    """Sinks, and a causal Longformer's global count, are "the first min(n, length)" tokens, so a
    decoder can start from a prompt shorter than n (documented in the presets)."""
    q, k, v = make_qkv(1, 2, 64, 8, dtype=torch.float64)
    for pattern in (P.streaming(100, 8), P.longformer(8, global_tokens=100, causal=True)):
        out = call(q, k, v, pattern, backend="blocked")
        ref = call(q, k, v, P.causal(), backend="reference")  # every token is a sink / global
        assert torch.allclose(out, ref, atol=1e-10)


@pytest.mark.parametrize("pattern", [P.dilated(4, 2), P.dilated(4, 3, causal=False), P.strided(4),
                                     P.strided(3, causal=False), P.sliding_window(4), P.fixed(4)])
@pytest.mark.parametrize("nq, nkv", [(0, 0), (0, 8), (5, 0)])
def test_empty_sequences_return_empty_or_zero_rows(pattern, nq, nkv):
    q = torch.randn(1, 2, nq, 8)
    k, v = torch.randn(1, 2, nkv, 8), torch.randn(1, 2, nkv, 6)
    out, lse = call(q, k, v, pattern, q_offset=0 if nq > nkv else None, return_lse=True)
    assert out.shape == (1, 2, nq, 6) and lse.shape == (1, 2, nq)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


@pytest.mark.parametrize("name", ["topk", "block_topk", "routing"])
def test_dynamic_mechanisms_have_defaults(name):
    q, k, v = make_qkv(1, 2, 40, 8, dtype=torch.float64)
    out = sparse_attn.attention(q, k, v, name)
    assert out.shape == (1, 2, 40, 8) and torch.isfinite(out).all()


def test_routing_defaults_follow_the_paper_and_the_centroids():
    from sparse_attn.ops.routing import route_tokens, routing_sizes

    q, k, _ = make_qkv(1, 2, 100, 8)
    members, _ = route_tokens(q, k)
    sizes = routing_sizes(100)
    assert members.shape[-2:] == (sizes["num_clusters"], sizes["window"])
    members, _ = route_tokens(q, k, centroids=torch.randn(7, 8))
    assert members.shape[-2:] == (7, 15)  # 7 clusters from the centroids, ceil(100 / 7) members


def test_backend_not_a_string():
    with pytest.raises(TypeError, match="backend must be a string"):
        call(*qkv(), backend=None)


@pytest.mark.parametrize("bad", ["causal", None, 3, torch.ones(4, 4)])
def test_non_pattern_argument(bad):
    with pytest.raises(TypeError, match="pattern must be a sparse_attn Pattern or BlockLayout"):
        call(*qkv(), bad)


def test_combining_with_a_non_pattern():
    with pytest.raises(TypeError, match="other must be a sparse_attn Pattern.*int"):
        SW | 3
    with pytest.raises(TypeError, match="other must be a sparse_attn Pattern.*str"):
        SW & "causal"


# ------------------------------------------------------------------ layouts
def test_layout_built_for_other_lengths():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"layout was built for q_len=32, kv_len=32.*16"):
        call(q, k, v, SW.layout(32))
    with pytest.raises(ValueError, match=r"layout was built for q_len=8, kv_len=16"):
        call(q, k, v, SW.layout(8, 16))


def test_layout_with_a_different_q_offset():
    with pytest.raises(ValueError, match=r"q_offset=3 differs from the layout's q_offset=0"):
        call(*qkv(), SW.layout(16), q_offset=3)


def test_layout_per_head_count_mismatch():
    layout = P.per_head([SW, SW, SW]).layout(16)
    with pytest.raises(ValueError, match=r"3 heads.*q has 2 heads"):
        call(*qkv(), layout)


@pytest.mark.parametrize("name,value", [("block_q", 0), ("block_kv", -2), ("block_q", 1.5), ("q_len", -1)])
def test_bad_layout_arguments(name, value):
    kw = {"q_len": 16, "block_q": 4}
    kw[name] = value
    q_len = kw.pop("q_len")
    with pytest.raises((ValueError, TypeError), match=name):
        SW.layout(q_len, **kw)


# ----------------------------------------------------------------- patterns
@pytest.mark.parametrize("make,name", [
    (lambda: P.sliding_window(0), "window"),
    (lambda: P.sliding_window(-3, causal=False), "window"),
    (lambda: P.dilated(0, 2), "window"),
    (lambda: P.dilated(3, 0), "dilation"),
    (lambda: P.dilated(3, -1, causal=False), "dilation"),
    (lambda: P.strided(0), "stride"),
    (lambda: P.fixed(0), "block"),
    (lambda: P.fixed(4, 0), "summary"),
    (lambda: P.fixed(4, 5), "summary"),
    (lambda: P.longformer(0, 1), "window"),
    (lambda: P.longformer(4, -2), "global_tokens"),
    (lambda: P.streaming(-1, 4), "sinks"),
    (lambda: P.streaming(2, 0), "window"),
    (lambda: P.block_sparse(torch.ones(2, 2), 0), "block_size"),
    (lambda: P.block_sparse(torch.ones(2, 2), (4, 0)), "block_size"),
    (lambda: P.bigbird(0), "block"),
    (lambda: P.bigbird(4, num_window_blocks=0), "num_window_blocks"),
    (lambda: P.bigbird(4, num_random_blocks=-1), "num_random_blocks"),
    (lambda: P.bigbird(4, num_global_blocks=-1), "num_global_blocks"),
    (lambda: P.bigbird(4, num_heads=0), "num_heads"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_non_positive_parameters(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize("make,name", [
    (lambda: P.sliding_window(2.5), "window"),
    (lambda: P.strided(True), "stride"),
    (lambda: P.dilated(3, 2.0), "dilation"),
    (lambda: P.bigbird(4, seed=1.0), "seed"),
    (lambda: P.longformer(4, True), "global_tokens"),
    (lambda: P.longformer(4, [1.5]), "global_tokens"),
    (lambda: P.block_sparse([[1, 0], [0, 1]], 4), "layout"),
    (lambda: P.document(torch.tensor([0.0, 1.0])), "doc_ids"),
    (lambda: P.predicate(3), "callable"),
    (lambda: P.per_head([]), "per_head"),
    (lambda: P.per_head(SW), "per_head"),
    (lambda: P.per_head([SW, "causal"]), r"patterns\[1\]"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_wrong_parameter_types(make, name):
    with pytest.raises(TypeError, match=name):
        make()


def test_global_token_out_of_range_at_call_time():
    pattern = P.longformer(4, [3, 20])  # fine to build: lengths are not known yet
    with pytest.raises(ValueError, match=r"global token index 20 is out of range.*16"):
        call(*qkv(), pattern)
    with pytest.raises(ValueError, match="global token index 20"):
        pattern.layout(16)
    q, k, v = make_qkv(1, 2, 21, 8)
    assert call(q, k, v, pattern).shape == (1, 2, 21, 8)  # a longer sequence is fine


def test_global_token_negative():
    with pytest.raises(ValueError, match=r"global token index -1 is negative"):
        P.longformer(4, [-1, 3])


def test_per_head_head_count_mismatch():
    with pytest.raises(ValueError, match=r"pattern is defined for 3 heads but q has 2 heads"):
        call(*qkv(), P.per_head([SW, SW, SW]))
    with pytest.raises(ValueError, match=r"defined for 4 heads"):
        call(*qkv(), P.bigbird(4, num_heads=4))
    with pytest.raises(ValueError, match=r"defined for 3 heads"):
        call(*qkv(), P.predicate(lambda b, h, q, kv: q >= kv, num_heads=3))


def test_per_head_of_per_head():
    with pytest.raises(ValueError, match=r"patterns\[0\] is itself per-head"):
        P.per_head([P.per_head([SW, SW]), SW])


def test_combining_different_head_counts():
    with pytest.raises(ValueError, match=r"different head counts \[2, 3\]"):
        P.per_head([SW, SW]) | P.per_head([SW, SW, SW])


def test_block_sparse_wrong_shape():
    with pytest.raises(ValueError, match=r"shape \(H, 3, 3\).*need \(H, 4, 4\)"):
        call(*qkv(), P.block_sparse(torch.ones(3, 3), 4))
    with pytest.raises(ValueError, match=r"\(H, 4, 2\)"):
        call(*qkv(), P.block_sparse(torch.ones(4, 2), (4, 4)))
    with pytest.raises(ValueError, match=r"layout must have shape \(H, NQB, NKB\) or \(NQB, NKB\).*\(4,\)"):
        P.block_sparse(torch.ones(4), 4)
    with pytest.raises(ValueError, match=r"3 heads but q has 2"):
        call(*qkv(), P.block_sparse(torch.ones(3, 4, 4), 4))


def test_document_length_mismatch():
    with pytest.raises(ValueError, match=r"document pattern was built for 10 positions.*keys up to position 15"):
        call(*qkv(), P.document(torch.zeros(10, dtype=torch.long)))


def test_document_not_sorted():
    with pytest.raises(ValueError, match="doc_ids must be non-decreasing"):
        P.document(torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="doc_ids must not be empty"):
        P.document(torch.tensor([], dtype=torch.long))


def test_predicate_must_return_bool():
    with pytest.raises(TypeError, match="must return a bool tensor.*int64"):
        call(*qkv(), P.predicate(lambda b, h, q, kv: q - kv), backend="blocked")


def test_bigbird_predicate_needs_a_length():
    with pytest.raises(ValueError, match="depend on the sequence length"):
        P.bigbird(4).allowed(torch.arange(3), torch.arange(3))
    with pytest.raises(ValueError, match="sequence length"):
        P.bigbird(4).mask_mod()


def test_to_dense_head_count_mismatch():
    with pytest.raises(ValueError, match=r"defined for 2 heads, asked for 3"):
        P.per_head([SW, SW]).to_dense(4, num_heads=3)


def test_errors_are_not_bare_asserts():
    """Every failure above is a ValueError/TypeError (BackendError only for dispatch)."""
    with pytest.raises(sparse_attn.BackendError):
        call(*qkv(), backend="sdpa")
    assert issubclass(sparse_attn.BackendError, RuntimeError)


def test_bigbird_queries_past_the_keys():
    with pytest.raises(ValueError, match="queries must lie within the 20 key positions"):
        P.bigbird(4).layout(8, 20, q_offset=16, block_q=4)


@pytest.mark.parametrize("make", [P.sliding_window, P.strided])
def test_causal_must_be_bool(make):
    with pytest.raises(TypeError, match="causal must be a bool"):
        make(8, causal="maybe")
