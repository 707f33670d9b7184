"""Linear attention: chunked and recurrent forms against the quadratic reference (float64),
states for prefill + decode, low precision, gradients, guarded denominators, bad arguments,
and that the fast paths never build an Nq x Nkv tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sa_testing import LargestTensor, as_f64, assert_low_precision_close, assert_no_nan, make_qkv

from sparse_attn.ops.linear import (
    LinearState,
    linear_attention,
    linear_attention_features,
    linear_attention_naive,
    linear_attention_step,
)

F64_TOL = 1e-10


def softplus_map(x):
    return F.softplus(x)


def widening_map(x):  # F = 2D: a feature map may change the feature size
    return torch.cat([F.elu(x) + 1, x.square()], dim=-1)


FEATURE_MAPS = ["elu", "relu", softplus_map, widening_map]


def assert_close64(actual, expected, tol=F64_TOL, what="output"):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert_no_nan(actual, what=what)
    scale = max(float(expected.abs().max()), 1.0) if expected.numel() else 1.0
    err = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} > {tol:g} * {scale:.3e}"


# ------------------------------------------------------------- chunk == naive
CASES = [  # (b, hq, hkv, nq, nkv, d, dv, chunk_size)
    (1, 1, 1, 1, 1, 4, 4, 64),  # N = 1
    (2, 2, 2, 113, 113, 8, 8, 16),  # chunk does not divide N
    (1, 2, 2, 113, 113, 8, 8, 113),  # one chunk exactly
    (1, 4, 2, 203, 203, 16, 5, 64),  # GQA, Dv != D, partial last chunk
    (1, 6, 2, 128, 128, 7, 9, 32),  # chunk divides N, GQA 3
    (2, 4, 1, 37, 203, 8, 8, 16),  # Nq < Nkv (queries are the last positions), MQA
    (1, 2, 2, 5, 9, 3, 3, 1),  # chunk_size 1
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_h{}-{}_n{}-{}_d{}-{}_c{}".format(*c))
def test_chunk_matches_naive(case, causal):
    b, hq, hkv, nq, nkv, d, dv, chunk = case
    q, k, v = make_qkv(b, hq, nq, d, hkv=hkv, nkv=nkv, dv=dv, dtype=torch.float64)
    out = linear_attention(q, k, v, causal=causal, chunk_size=chunk)
    assert out.dtype == torch.float64 and out.shape == (b, hq, nq, dv)
    assert_close64(out, linear_attention_naive(q, k, v, causal=causal))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("feature_map", FEATURE_MAPS, ids=lambda f: f if isinstance(f, str) else f.__name__)
def test_each_feature_map(feature_map, causal):
    q, k, v = make_qkv(1, 4, 61, 6, hkv=2, nkv=77, dv=3, dtype=torch.float64)  # Nq < Nkv, GQA, Dv != D
    out = linear_attention(q, k, v, feature_map=feature_map, causal=causal, chunk_size=16)
    assert_close64(out, linear_attention_naive(q, k, v, feature_map=feature_map, causal=causal))


def test_naive_matches_explicit_formula():
    """The reference itself, against the per-query sums written out for one causal row."""
    q, k, v = make_qkv(1, 1, 6, 3, nkv=9, dtype=torch.float64)
    out = linear_attention_naive(q, k, v, causal=True)
    phi = lambda x: F.elu(x) + 1  # noqa: E731
    i = 2  # query 2 sits at position 9 - 6 + 2 = 5: keys 0..5
    w = phi(q[0, 0, i]) @ phi(k[0, 0, :6]).T
    expected = (w[:, None] * v[0, 0, :6]).sum(0) / w.sum()
    assert_close64(out[0, 0, i], expected)


def test_non_causal_more_queries_than_keys():
    q, k, v = make_qkv(1, 2, 40, 8, nkv=11, dtype=torch.float64)
    assert_close64(linear_attention(q, k, v), linear_attention_naive(q, k, v))


def test_chunk_size_does_not_change_result():
    q, k, v = make_qkv(1, 2, 97, 8, dtype=torch.float64)
    outs = [linear_attention(q, k, v, causal=True, chunk_size=c) for c in (1, 7, 32, 97, 500)]
    for o in outs[1:]:
        assert_close64(o, outs[0])


def test_features_core_matches_public_call():
    q, k, v = make_qkv(1, 4, 50, 8, hkv=2, dtype=torch.float64)
    phi = lambda x: F.elu(x) + 1  # noqa: E731
    out, state = linear_attention_features(phi(q), phi(k), v, causal=True, chunk_size=8)
    ref, ref_state = linear_attention(q, k, v, causal=True, chunk_size=13, return_state=True)
    assert_close64(out, ref)
    assert_close64(state.S, ref_state.S, what="S")
    assert_close64(state.z, ref_state.z, what="z")


# --------------------------------------------------------- states and decoding
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2)])
def test_recurrent_steps_equal_causal_forward(hq, hkv):
    q, k, v = make_qkv(2, hq, 23, 8, hkv=hkv, dv=6, dtype=torch.float64)
    full, full_state = linear_attention(q, k, v, causal=True, chunk_size=8, return_state=True)
    state, outs = None, []
    for t in range(q.shape[2]):
        o, state = linear_attention_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
        outs.append(o)
    assert isinstance(state, LinearState)
    assert_close64(torch.cat(outs, dim=2), full)
    assert_close64(state.S, full_state.S, what="S")
    assert_close64(state.z, full_state.z, what="z")
    # several tokens in one step call: the same
    many, _ = linear_attention_step(q, k, v, None)
    assert_close64(many, full)


@pytest.mark.parametrize("feature_map", ["elu", softplus_map], ids=["elu", "softplus"])
def test_prefill_then_decode_equals_full_forward(feature_map):
    q, k, v = make_qkv(1, 4, 70, 8, hkv=2, dv=5, dtype=torch.float64)
    full = linear_attention(q, k, v, feature_map=feature_map, causal=True)
    prompt = 45
    out, state = linear_attention(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], feature_map=feature_map,
                                  causal=True, chunk_size=16, return_state=True)
    outs = [out]
    for t in range(prompt, 60):  # decode token by token
        o, state = linear_attention_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state,
                                         feature_map=feature_map)
        outs.append(o)
    # then a chunked continuation from the decode state
    o = linear_attention(q[:, :, 60:], k[:, :, 60:], v[:, :, 60:], feature_map=feature_map, causal=True,
                         chunk_size=4, initial_state=state)
    outs.append(o)
    assert_close64(torch.cat(outs, dim=2), full)


def test_initial_state_with_fewer_queries_than_keys():
    """State of the first 30 keys, then 20 new keys of which only the last 8 are queried."""
    q, k, v = make_qkv(1, 2, 50, 8, dtype=torch.float64)
    full = linear_attention(q, k, v, causal=True)
    _, state = linear_attention(q[:, :, :30], k[:, :, :30], v[:, :, :30], causal=True, return_state=True)
    out = linear_attention(q[:, :, 42:], k[:, :, 30:], v[:, :, 30:], causal=True, chunk_size=3,
                           initial_state=state)
    assert_close64(out, full[:, :, 42:])


def test_non_causal_state_is_the_sum_over_all_keys():
    q, k, v = make_qkv(1, 2, 20, 4, nkv=33, dtype=torch.float64)
    _, state = linear_attention(q, k, v, return_state=True)
    phi_k = F.elu(k) + 1
    assert_close64(state.S, torch.einsum("bhnf,bhne->bhfe", phi_k, v), what="S")
    assert_close64(state.z, phi_k.sum(2), what="z")


def test_empty_lengths():
    """No keys: every row is 0 (as SDPA); no queries: an empty output, the state still advances."""
    q, k, v = make_qkv(1, 2, 5, 4, nkv=0, dv=3, dtype=torch.float64)
    for fn in (linear_attention, linear_attention_naive):
        out = fn(q, k, v)
        assert out.shape == (1, 2, 5, 3) and torch.equal(out, torch.zeros_like(out))
    _, k, v = make_qkv(1, 2, 1, 4, nkv=6, dv=3, dtype=torch.float64)
    out, state = linear_attention(q[:, :, :0], k, v, causal=True, return_state=True)
    assert out.shape == (1, 2, 0, 3)
    assert_close64(state.z, (F.elu(k) + 1).sum(2), what="z")


# ------------------------------------------------------------- low precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision(dtype, causal):
    q, k, v = make_qkv(1, 4, 150, 16, hkv=2, dtype=dtype)
    out, state = linear_attention(q, k, v, causal=causal, chunk_size=32, return_state=True)
    assert out.dtype == dtype and state.S.dtype == torch.float32 and state.z.dtype == torch.float32
    assert torch.isfinite(out).all()
    ref64 = linear_attention_naive(*as_f64(q, k, v), causal=causal)  # same rounded inputs, exact math
    ref_low = linear_attention_naive(q, k, v, causal=causal)  # the reference run in the low precision
    assert_low_precision_close(out, ref_low, ref64)
    out32 = linear_attention(q.float(), k.float(), v.float(), causal=causal)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert float((out.float() - out32).abs().max()) <= tol * float(out32.abs().max())


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(causal):
    q, k, v = make_qkv(1, 2, 5, 3, hkv=1, nkv=7, dv=2, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v: linear_attention(q, k, v, causal=causal, chunk_size=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gradcheck_through_initial_state():
    q, k, v = make_qkv(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    S = (torch.rand(1, 2, 3, 3, dtype=torch.float64)).requires_grad_()
    z = (torch.rand(1, 2, 3, dtype=torch.float64) + 0.5).requires_grad_()

    def fn(q, k, v, S, z):
        out, state = linear_attention(q, k, v, causal=True, chunk_size=3, initial_state=(S, z), return_state=True)
        return out, state.S, state.z

    assert torch.autograd.gradcheck(fn, (q, k, v, S, z))


def test_gradcheck_recurrent_step():
    q, k, v = make_qkv(1, 2, 3, 3, hkv=1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: linear_attention_step(q, k, v, None)[0], (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
def test_grads_match_naive(causal):
    q, k, v = make_qkv(1, 4, 90, 8, hkv=2, nkv=120, dtype=torch.float64, requires_grad=True)
    q = q.detach()[:, :, :90].requires_grad_()
    dout = torch.randn(1, 4, 90, 8, dtype=torch.float64)
    g_fast = torch.autograd.grad((linear_attention(q, k, v, causal=causal, chunk_size=16) * dout).sum(), (q, k, v))
    g_ref = torch.autograd.grad((linear_attention_naive(q, k, v, causal=causal) * dout).sum(), (q, k, v))
    for name, a, e in zip("qkv", g_fast, g_ref):
        assert_close64(a, e, what=f"d{name}")


# ------------------------------------------------------ guarded denominators
@pytest.mark.parametrize("causal", [False, True])
def test_zero_denominator_gives_zero_not_nan(causal):
    """relu features of an all-negative q are 0: every weight of the row is 0."""
    q, k, v = make_qkv(1, 2, 12, 4, dtype=torch.float64)
    q = -q.abs() - 0.1
    q.requires_grad_(True)
    k.requires_grad_(True)
    out = linear_attention(q, k, v, feature_map="relu", causal=causal, chunk_size=5)
    assert torch.equal(out, torch.zeros_like(out))
    step_out, _ = linear_attention_step(q, k, v, None, feature_map="relu")
    assert torch.equal(step_out, torch.zeros_like(step_out))
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_tiny_denominator_is_bounded_by_v():
    """A denominator below eps: the row stays a bounded (shrunk) average of v."""
    q = torch.full((1, 1, 1, 2), -1.0, dtype=torch.float64)
    q[..., 0] = 1e-9  # relu features (1e-9, 0): weights ~1e-9 for every key
    k = torch.ones(1, 1, 4, 2, dtype=torch.float64)
    v = torch.randn(1, 1, 4, 3, dtype=torch.float64)
    out = linear_attention(q, k, v, feature_map="relu", eps=1e-6)
    assert torch.isfinite(out).all()
    assert float(out.abs().max()) <= float(v.abs().max())
    # the clamp acts only below eps: with eps under the denominator the row is the exact mean
    exact = linear_attention(q, k, v, feature_map="relu", eps=1e-12)
    assert_close64(exact, v.mean(2, keepdim=True))


# --------------------------------------------------------------- O(N) memory


@pytest.mark.parametrize("causal", [False, True])
def test_no_quadratic_intermediate(causal):
    n, d = 4096, 8
    q, k, v = make_qkv(1, 1, n, d)
    with LargestTensor() as mode:
        linear_attention(q, k, v, causal=causal, chunk_size=64)
    assert mode.largest <= 64 * n, f"largest intermediate {mode.largest} elements for N={n}"
    with LargestTensor() as mode:  # the reference does build it: the probe sees it
        linear_attention_naive(q[:, :, :512], k[:, :, :512], v[:, :, :512], causal=causal)
    assert mode.largest >= 512 * 512


# -------------------------------------------------------------------- errors
def qkv(**kw):
    return make_qkv(1, 2, 16, 8, **kw)


@pytest.mark.parametrize("fn", ["chunk", "naive", "step"])
def test_shared_input_errors(fn):
    call = {"chunk": lambda *a, **kw: linear_attention(*a, **kw),
            "naive": lambda *a, **kw: linear_attention_naive(*a, **kw),
            "step": lambda *a, **kw: linear_attention_step(*a, None, **kw)}[fn]
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must have 4 dims.*\(2, 16, 8\)"):
        call(q[0], k, v)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        call(q, k.numpy(), v)
    with pytest.raises(TypeError, match="q must be a floating tensor.*int64"):
        call(q.long(), k, v)
    with pytest.raises(TypeError, match=r"share a dtype.*q torch.float64"):
        call(q.double(), k, v)
    with pytest.raises(ValueError, match=r"one device.*k meta"):
        call(q, k.to("meta"), v)
    with pytest.raises(ValueError, match=r"q heads \(3\).*multiple of k/v heads \(2\)"):
        call(torch.randn(1, 3, 16, 8), k, v)
    with pytest.raises(ValueError, match=r"q and k head dims differ"):
        call(q, torch.randn(1, 2, 16, 7), torch.randn(1, 2, 16, 7))
    with pytest.raises(ValueError, match="batch sizes differ"):
        call(torch.randn(2, 2, 16, 8), k, v)
    with pytest.raises(ValueError, match=r"k and v must have the same heads and length"):
        call(q, k, torch.randn(1, 2, 15, 8))
    with pytest.raises(ValueError, match=r"feature_map must be one of \['elu', 'relu'\].*'softmax'"):
        call(q, k, v, feature_map="softmax")
    with pytest.raises(TypeError, match="feature_map must be a string.*int"):
        call(q, k, v, feature_map=3)
    with pytest.raises(ValueError, match=r"eps must be a positive finite float, got 0"):
        call(q, k, v, eps=0)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.0, True, None])
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match=rf"chunk_size must be an int >= 1, got {chunk_size!r}"):
        linear_attention(*qkv(), causal=True, chunk_size=chunk_size)


@pytest.mark.parametrize("eps", [-1e-6, float("nan"), float("inf"), "1e-6"])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be a positive finite float"):
        linear_attention(*qkv(), eps=eps)


def test_causal_needs_q_len_at_most_kv_len():
    q = torch.randn(1, 2, 20, 8)
    _, k, v = qkv()
    with pytest.raises(ValueError, match=r"q_len=20 > kv_len=16"):
        linear_attention(q, k, v, causal=True)
    with pytest.raises(ValueError, match=r"q_len=20 > kv_len=16"):
        linear_attention_naive(q, k, v, causal=True)
    assert linear_attention(q, k, v).shape == (1, 2, 20, 8)  # non-causal: fine


def test_step_needs_same_new_tokens():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"same new tokens.*q length 1 and k length 16"):
        linear_attention_step(q[:, :, :1], k, v, None)


def test_bad_feature_map_outputs():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"feature_map must map q of shape \(1, 2, 16, 8\).*got shape \(1, 2, 8\)"):
        linear_attention(q, k, v, feature_map=lambda x: x.sum(2))
    with pytest.raises(TypeError, match="feature_map must return a floating tensor for q"):
        linear_attention(q, k, v, feature_map=lambda x: (x > 0))
    with pytest.raises(TypeError, match="feature_map must return a floating tensor.*list"):
        linear_attention(q, k, v, feature_map=lambda x: [x])
    calls = []

    def different_sizes(x):
        calls.append(x)
        return x if len(calls) == 1 else torch.cat([x, x], -1)

    with pytest.raises(ValueError, match="8 features for q but 16 for k"):
        linear_attention(q.abs(), k, v, feature_map=different_sizes)


def test_bad_states():
    q, k, v = qkv()
    _, good = linear_attention(q, k, v, causal=True, return_state=True)
    with pytest.raises(ValueError, match="initial_state .*needs causal=True"):
        linear_attention(q, k, v, initial_state=good)
    with pytest.raises(TypeError, match=r"initial_state must be a \(S, z\) pair.*Tensor"):
        linear_attention(q, k, v, causal=True, initial_state=good.S)
    with pytest.raises(ValueError, match=r"initial_state.S must have shape \(1, 2, 8, 8\).*got \(1, 2, 8, 7\)"):
        linear_attention(q, k, v, causal=True, initial_state=(good.S[..., :7], good.z))
    with pytest.raises(ValueError, match=r"initial_state.z must have shape \(1, 2, 8\).*got \(2, 8\)"):
        linear_attention(q, k, v, causal=True, initial_state=(good.S, good.z[0]))
    with pytest.raises(TypeError, match=r"initial_state.z must be torch.float32.*got torch.float64"):
        linear_attention(q, k, v, causal=True, initial_state=(good.S, good.z.double()))
    with pytest.raises(TypeError, match=r"initial_state.S must be a torch.Tensor"):
        linear_attention(q, k, v, causal=True, initial_state=(None, good.z))
    with pytest.raises(ValueError, match=r"initial_state.S is on meta"):
        linear_attention(q, k, v, causal=True, initial_state=(good.S.to("meta"), good.z))
    with pytest.raises(ValueError, match=r"state.S must have shape \(1, 2, 16, 8\)"):  # widening map: F = 16
        linear_attention_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], good, feature_map=widening_map)
    with pytest.raises(TypeError, match="return_state must be a bool"):
        linear_attention(q, k, v, return_state="yes")
    with pytest.raises(TypeError, match="causal must be a bool"):
        linear_attention(q, k, v, causal=1)


def test_features_core_errors():
    phi_q, phi_k, v = (t.abs() for t in make_qkv(1, 4, 8, 4, hkv=2))
    with pytest.raises(ValueError, match=r"phi_q must be a 4-dim tensor.*\(4, 8, 4\)"):
        linear_attention_features(phi_q[0], phi_k, v)
    with pytest.raises(ValueError, match=r"phi_k must have shape \(1, 2, 8, 4\), got \(1, 2, 8, 3\)"):
        linear_attention_features(phi_q, phi_k[..., :3], v)
    with pytest.raises(ValueError, match=r"q heads \(4\) must be a multiple of k/v heads \(3\)"):
        linear_attention_features(phi_q, torch.rand(1, 3, 8, 4), torch.rand(1, 3, 8, 4))
    with pytest.raises(TypeError, match="phi_q, phi_k, v must share a dtype"):
        linear_attention_features(phi_q.double(), phi_k, v)
    with pytest.raises(ValueError, match="one device"):
        linear_attention_features(phi_q, phi_k.to("meta"), v)
