"""The dispatcher: which backend `auto` picks on CPU and why; forced backends; the sdpa and flex
backends against the reference."""

from __future__ import annotations

import pytest
import torch
from sa_testing import check_backend_against_reference, make_qkv, reference_f64, run_with_grads

import sparse_attn
from sparse_attn import patterns as P

SPARSE = {
    "window": P.sliding_window(8),
    "window_nc": P.sliding_window(8, causal=False),
    "dilated": P.dilated(4, 2),
    "strided": P.strided(5),
    "fixed": P.fixed(8),
    "longformer": P.longformer(8, 2),
    "bigbird": P.bigbird(8),
    "block_sparse": P.block_sparse(torch.eye(8, dtype=torch.bool), 8),
    "streaming": P.streaming(2, 8),
    "document": P.document(torch.tensor([0] * 30 + [1] * 34)),
    "per_head": P.per_head([P.causal(), P.sliding_window(4)]),
    "predicate": P.predicate(lambda b, h, q, kv: kv <= q),
    "causal_and_window": P.causal() & P.sliding_window(9),
    "full_or_window": P.causal() | P.sliding_window(4, causal=False),
}


@pytest.mark.parametrize("name", list(SPARSE))
def test_auto_picks_blocked_on_cpu_for_sparse_patterns(name):
    q, k, v = make_qkv(1, 2, 64, 16)
    ex = sparse_attn.explain(q, k, v, SPARSE[name])
    assert ex.chosen == "blocked", str(ex)
    assert ex.requested == "auto"
    assert "sdpa" in ex.rejected and "reference" in ex.rejected
    assert any("full and causal" in r for r in ex.rejected["sdpa"]) or name == "full_or_window"
    text = str(ex)
    assert "chosen: blocked" in text and "sdpa: rejected" in text


@pytest.mark.parametrize("pattern", [P.full(), P.causal()], ids=repr)
@pytest.mark.parametrize("gqa", [False, True])
def test_auto_picks_sdpa_for_full_and_causal(pattern, gqa):
    q, k, v = make_qkv(1, 4, 64, 16, hkv=2 if gqa else 4)
    ex = sparse_attn.explain(q, k, v, pattern)
    assert ex.chosen == "sdpa", str(ex)
    assert "preferred" in " ".join(ex.rejected["blocked"])


def test_causal_with_q_offset_is_not_sdpa():
    q, k, v = make_qkv(1, 2, 10, 16, nkv=64)
    ex = sparse_attn.explain(q, k, v, P.causal())
    assert ex.chosen == "blocked", str(ex)
    assert any("q_offset" in r for r in ex.rejected["sdpa"])
    # full attention has no alignment problem
    assert sparse_attn.explain(q, k, v, P.full()).chosen == "sdpa"


def test_return_lse_is_not_sdpa():
    q, k, v = make_qkv(1, 2, 32, 16)
    ex = sparse_attn.explain(q, k, v, P.causal(), return_lse=True)
    assert ex.chosen == "blocked"
    assert any("log-sum-exp" in r for r in ex.rejected["sdpa"])
    out, lse = sparse_attn.sparse_attention(q, k, v, P.causal(), return_lse=True)
    assert lse.shape == (1, 2, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad", [False, True])
def test_auto_never_picks_reference(dtype, grad):
    for pattern in list(SPARSE.values()) + [P.full(), P.causal()]:
        q, k, v = make_qkv(1, 2, 64, 16, dtype=dtype, requires_grad=grad)
        ex = sparse_attn.explain(q, k, v, pattern)
        assert ex.chosen not in (None, "reference"), str(ex)
        assert "dense" in " ".join(ex.rejected["reference"])


def test_flex_is_not_auto_with_grad_on_cpu():
    q, k, v = make_qkv(1, 2, 64, 16, requires_grad=True)
    ex = sparse_attn.explain(q, k, v, P.sliding_window(8), backend="flex")
    assert ex.chosen is None
    assert any("backward" in r for r in ex.rejected["flex"])


def test_forced_sdpa_on_sliding_window_raises_with_reason():
    q, k, v = make_qkv(1, 2, 64, 16)
    with pytest.raises(sparse_attn.BackendError, match="only full and causal"):
        sparse_attn.sparse_attention(q, k, v, P.sliding_window(8), backend="sdpa")
    with pytest.raises(sparse_attn.BackendError, match="sdpa"):
        sparse_attn.sparse_attention(q, k, v, P.sliding_window(8), backend="sdpa")
    ex = sparse_attn.explain(q, k, v, P.sliding_window(8), backend="sdpa")
    assert ex.chosen is None and ex.requested == "sdpa"


@pytest.mark.parametrize("nq, q_offset", [(1, None), (1, 64), (3, 63)])
def test_decoding_step_with_causal_runs_on_sdpa_unmasked(nq, q_offset):
    """Queries at or after the last key see every key: SDPA serves them without a mask."""
    q, k, v = make_qkv(1, 4, nq, 16, hkv=2, nkv=64)
    ex = sparse_attn.explain(q, k, v, P.causal(), q_offset=q_offset)
    assert ex.chosen == "sdpa", str(ex)
    check_backend_against_reference(q, k, v, P.causal(), backend="sdpa", q_offset=q_offset, grads=False)


def test_forced_sdpa_causal_with_offset_raises():
    q, k, v = make_qkv(1, 2, 10, 16, nkv=40)
    with pytest.raises(sparse_attn.BackendError, match="q_offset"):
        sparse_attn.sparse_attention(q, k, v, P.causal(), backend="sdpa")


def test_forced_sdpa_with_lse_raises():
    q, k, v = make_qkv(1, 2, 16, 16)
    with pytest.raises(sparse_attn.BackendError, match="log-sum-exp"):
        sparse_attn.sparse_attention(q, k, v, P.causal(), backend="sdpa", return_lse=True)


@pytest.mark.parametrize("name", ["window", "bigbird", "per_head", "predicate"])
def test_forced_reference_works(name):
    q, k, v = make_qkv(1, 2, 64, 16)
    assert sparse_attn.explain(q, k, v, SPARSE[name], backend="reference").chosen == "reference"
    out, lse = sparse_attn.sparse_attention(q, k, v, SPARSE[name], backend="reference", return_lse=True)
    assert out.shape == (1, 2, 64, 16) and out.dtype == torch.float32 and lse.shape == (1, 2, 64)
    blocked = sparse_attn.sparse_attention(q, k, v, SPARSE[name], backend="blocked")
    torch.testing.assert_close(out, blocked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pattern,shape", [
    (P.full(), (2, 4, 4, 67, 67)), (P.causal(), (2, 4, 4, 67, 67)),  # MHA
    (P.full(), (1, 8, 2, 50, 50)), (P.causal(), (1, 8, 2, 50, 50)),  # GQA
    (P.full(), (1, 4, 1, 9, 40)),  # MQA, fewer queries (sdpa serves causal only with q_offset 0)
], ids=["full-mha", "causal-mha", "full-gqa", "causal-gqa", "full-mqa-decode"])
def test_sdpa_equals_reference(pattern, shape):
    b, hq, hkv, nq, nkv = shape
    q, k, v = make_qkv(b, hq, nq, 24, hkv=hkv, nkv=nkv)
    assert sparse_attn.explain(q, k, v, pattern, backend="sdpa").chosen == "sdpa"
    check_backend_against_reference(q, k, v, pattern, backend="sdpa")
    check_backend_against_reference(q, k, v, pattern, backend="sdpa", dtype=torch.bfloat16)


def test_sdpa_explicit_causal_q_offset_zero():
    q, k, v = make_qkv(1, 2, 20, 16, nkv=50)
    check_backend_against_reference(q, k, v, P.causal(), backend="sdpa", q_offset=0)


def test_deterministic_true_skips_atomic_backwards():
    """deterministic=True with gradients: sdpa and flex (atomics in their backward) are rejected
    with the reason, auto falls back to blocked on CPU, a forced sdpa raises; without gradients
    (the forwards are deterministic) and with deterministic=False / None nothing changes."""
    q, k, v = make_qkv(1, 2, 64, 16, requires_grad=True)
    ex = sparse_attn.explain(q, k, v, P.causal(), deterministic=True)
    assert ex.chosen == "blocked", str(ex)
    assert any("not deterministic" in r for r in ex.rejected["sdpa"])
    for det in (None, False):
        assert sparse_attn.explain(q, k, v, P.causal(), deterministic=det).chosen == "sdpa"
    with pytest.raises(sparse_attn.BackendError, match="backward not deterministic"):
        sparse_attn.sparse_attention(q, k, v, P.causal(), backend="sdpa", deterministic=True)
    with torch.no_grad():
        assert sparse_attn.explain(q, k, v, P.causal(), deterministic=True).chosen == "sdpa"
        sparse_attn.sparse_attention(q, k, v, P.causal(), backend="sdpa", deterministic=True)
    ex = sparse_attn.explain(q, k, v, P.sliding_window(8), backend="flex", deterministic=True)
    assert any("not deterministic" in r for r in ex.rejected["flex"])


@pytest.mark.parametrize("name", ["window", "bigbird", "document"])
def test_deterministic_true_is_bitwise_reproducible_on_cpu(name):
    """What deterministic=True promises, on the CPU path (blocked): identical bits twice, and
    the same values as the default call."""
    q, k, v = make_qkv(1, 2, 64, 16)
    dout = torch.randn(1, 2, 64, 16)
    runs = [run_with_grads(q, k, v, SPARSE[name], dout, backend="auto", deterministic=det)
            for det in (True, True, None)]
    for a, b in zip((runs[0][0], *runs[0][2]), (runs[1][0], *runs[1][2])):
        assert torch.equal(a, b)
    for a, b in zip((runs[0][0], *runs[0][2]), (runs[2][0], *runs[2][2])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_deterministic_reaches_the_block_backend_only(monkeypatch):
    """The keyword travels through attention() and mechanisms to the backend's forward; a
    mechanism with its own single implementation refuses it by name."""
    seen = []
    blocked = sparse_attn.backends.get_backend("blocked")
    real = blocked.forward

    def spy(*args, **kw):
        seen.append(kw.get("deterministic"))
        return real(*args, **kw)

    monkeypatch.setattr(blocked, "forward", spy)
    q, k, v = make_qkv(1, 2, 64, 16)
    sparse_attn.attention(q, k, v, "sliding_window:window=8", deterministic=True)
    sparse_attn.attention(q, k, v, "block_topk:top_k_blocks=2,block_size=16", deterministic=False)
    sparse_attn.sparse_attention(q, k, v, P.dilated(4, 2), deterministic=True)  # via residue classes
    sparse_attn.sparse_attention(q, k, v, P.strided(5), deterministic=True)  # via a disjoint union
    sparse_attn.sparse_attention(q, k, v, P.sliding_window(8), deterministic=True,
                                 key_padding_mask=torch.arange(64)[None] >= 5)  # per row
    assert seen and seen[0] is True and seen[1] is False and all(s is True for s in seen[2:]), seen
    with pytest.raises(TypeError, match="deterministic"):
        sparse_attn.attention(q, k, v, "linear", deterministic=True)


def test_unknown_backend_names_the_choices():
    q, k, v = make_qkv(1, 2, 16, 16)
    with pytest.raises(ValueError, match=r"one of .*blocked.*reference.*sdpa.*'nope'"):
        sparse_attn.sparse_attention(q, k, v, P.causal(), backend="nope")
    with pytest.raises(ValueError, match="auto"):
        sparse_attn.explain(q, k, v, P.causal(), backend="nope")


def test_backend_registry_lists_capabilities():
    names = {b.name for b in sparse_attn.backends.list_backends()}
    assert {"reference", "blocked", "sdpa", "flex"} <= names
    ref = sparse_attn.backends.get_backend("reference")
    assert ref.caps.dense and torch.float64 in ref.caps.dtypes
    assert sparse_attn.backends.get_backend("blocked").caps.grads


def test_explain_does_not_run_or_change_inputs():
    q, k, v = make_qkv(1, 2, 16, 16)
    before = [t.clone() for t in (q, k, v)]
    sparse_attn.explain(q, k, v, P.sliding_window(3))
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v)))


@pytest.mark.slow
def test_flex_forward_matches_reference():
    """torch.compile'd FlexAttention on CPU (compiles: tens of seconds)."""
    q, k, v = make_qkv(1, 2, 128, 16)
    pattern = P.sliding_window(32)
    assert sparse_attn.explain(q, k, v, pattern, backend="flex").chosen == "flex"
    out = sparse_attn.sparse_attention(q, k, v, pattern, backend="flex")
    ref = reference_f64(q, k, v, pattern)
    assert out.shape == ref.shape and not torch.isnan(out).any()
    err = float((out.double() - ref).abs().max())
    assert err <= 1e-5 * float(ref.abs().max()) + 1e-6, err


@pytest.mark.parametrize("backend, make_pattern", [("sdpa", P.causal), ("reference", lambda: P.sliding_window(5)),
                                                   ("reference", lambda: P.bigbird(8, seed=1))])
def test_backends_that_read_no_layout_get_none_built(backend, make_pattern):
    """sdpa and the reference never read blocks (`Capabilities.reads_layout` False): they get the
    pattern at the call's lengths, bound and validated, and no layout is built or cached."""
    pattern = make_pattern()
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    out = sparse_attn.sparse_attention(q, k, v, pattern, backend=backend)
    assert not pattern._layouts
    expected = sparse_attn.sparse_attention(q, k, v, pattern.layout(40, block_q=8), backend=backend)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="out of range"):  # validated as a layout would be
        sparse_attn.sparse_attention(q, k, v, P.longformer(5, [0, 45]), backend="reference")
