"""Performer (FAVOR+): the random features (orthogonality, chi norms, unbiased estimator,
reproducibility, redraw), the fast path against the dense reference for the same features,
the approximation error against exact softmax attention (falls with more features, lower with
orthogonal features), stability at large logits, low precision, gradients, bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
from sa_testing import LargestTensor, as_f64, assert_no_nan, make_qkv

from sparse_attn.ops.linear import linear_attention
from sparse_attn.ops.performer import (
    PerformerFeatures,
    draw_projection,
    performer_attention,
    performer_attention_naive,
    softmax_kernel_estimate,
)


def assert_close64(actual, expected, tol=1e-10, what="output"):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert_no_nan(actual, what=what)
    scale = max(float(expected.abs().max()), 1.0) if expected.numel() else 1.0
    err = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} > {tol:g} * {scale:.3e}"




def exact_softmax_attention(q, k, v, *, causal=False, scale=None):
    """softmax(scale q k^T) v in float64 with repeated kv heads: the target of the estimate."""
    q, k, v = as_f64(q, k, v, requires_grad=False)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if causal:
        nq, nkv = q.shape[2], k.shape[2]
        visible = torch.arange(nkv)[None, :] <= torch.arange(nq)[:, None] + (nkv - nq)
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, -1) @ v


def relative_error(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


# ------------------------------------------------------------------ features
@pytest.mark.parametrize("num_features,head_dim", [(16, 16), (40, 16), (7, 16), (64, 5)])
def test_orthogonal_projection_structure(num_features, head_dim):
    w = draw_projection(num_features, head_dim, orthogonal=True, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
    assert w.shape == (num_features, head_dim)
    norms = w.norm(dim=-1)
    for start in range(0, num_features, head_dim):  # rows of one block are mutually orthogonal
        block = w[start:start + head_dim]
        gram = block @ block.T
        off_diagonal = gram - torch.diag(torch.diagonal(gram))
        assert float(off_diagonal.abs().max()) < 1e-10 * float(gram.abs().max())
    # norms are chi(D)-distributed as for Gaussian rows, not all equal
    assert float(norms.std()) > 0.05 * float(norms.mean())


def test_orthogonal_row_norms_follow_chi_distribution():
    """Mean of |w|^2 is D (chi-squared with D degrees of freedom), variance 2D."""
    d = 8
    w = draw_projection(4000, d, orthogonal=True, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sq = w.square().sum(-1)
    se = math.sqrt(2 * d / sq.numel())
    assert abs(float(sq.mean()) - d) < 5 * se
    assert abs(float(sq.var()) - 2 * d) < 0.15 * 2 * d


@pytest.mark.parametrize("orthogonal", [True, False], ids=["orthogonal", "iid"])
def test_estimator_is_unbiased(orthogonal):
    """Mean of phi(q)·phi(k) over many independent draws is exp(scale q·k) within 4.5 standard errors."""
    d, draws = 8, 300
    q = torch.randn(4, d, dtype=torch.float64) * 0.7
    k = torch.randn(5, d, dtype=torch.float64) * 0.7
    exact = torch.exp(q @ k.T / math.sqrt(d))
    features = PerformerFeatures(d, 32, orthogonal=orthogonal, generator=0, dtype=torch.float64)
    estimates = []
    for _ in range(draws):
        features.redraw()
        estimates.append(softmax_kernel_estimate(q, k, features))
    estimates = torch.stack(estimates)  # [draws, 4, 5]
    z = (estimates.mean(0) - exact) / (estimates.std(0) / math.sqrt(draws))
    assert float(z.abs().max()) < 4.5, f"bias of {float(z.abs().max()):.1f} standard errors"
    # the estimator is a real estimator: one draw differs from the exact value
    assert float((estimates[0] - exact).abs().max()) > 1e-3


def test_kernel_estimate_scale_argument():
    q = torch.randn(3, 6, dtype=torch.float64)
    k = torch.randn(4, 6, dtype=torch.float64)
    f = PerformerFeatures(6, 16, generator=2, dtype=torch.float64)
    # estimate of exp(0.3 q·k) equals estimate of exp(q'·k') with q' = q sqrt(0.3), k' = k sqrt(0.3)
    a = softmax_kernel_estimate(q, k, f, scale=0.3)
    b = softmax_kernel_estimate(q * 0.3 ** 0.5, k * 0.3 ** 0.5, f, scale=1.0)
    assert_close64(a, b)
    lq, lk = f.log_features(q * 0.3 ** 0.5), f.log_features(k * 0.3 ** 0.5)
    assert_close64(a, lq.exp() @ lk.exp().T)  # no stabiliser left in the value


def test_generator_reproducible_and_redraw_changes():
    a = PerformerFeatures(16, 64, generator=torch.Generator().manual_seed(5))
    b = PerformerFeatures(16, 64, generator=torch.Generator().manual_seed(5))
    c = PerformerFeatures(16, 64, generator=6)
    assert torch.equal(a.projection, b.projection)
    assert not torch.equal(a.projection, c.projection)
    first = a.projection.clone()
    a.redraw()
    assert not torch.equal(a.projection, first)
    b.redraw()
    assert torch.equal(a.projection, b.projection)  # the stream of draws is reproducible too
    a.redraw(torch.Generator().manual_seed(5))
    assert torch.equal(a.projection, first)  # an explicit generator restarts from its seed


def test_global_rng_when_no_generator():
    torch.manual_seed(11)
    a = PerformerFeatures(8, 16).projection
    torch.manual_seed(11)
    b = PerformerFeatures(8, 16).projection
    assert torch.equal(a, b)


def test_call_stabilisers_cancel_in_attention():
    """features(x, is_query) differs from the raw feature by a per-row (query) or per-head (key)
    constant only, so attention from them equals the reference."""
    q, k, v = make_qkv(1, 2, 30, 8, dtype=torch.float64)
    f = PerformerFeatures(8, 32, generator=3, dtype=torch.float64)
    root = 8 ** -0.25
    raw_q, raw_k = f.log_features(q * root).exp(), f.log_features(k * root).exp()
    phi_q, phi_k = f(q * root, is_query=True), f(k * root, is_query=False)
    assert float(phi_q.amax(-1).sub(1).abs().max()) < 1e-12  # row max taken out
    assert float(phi_k.amax((-2, -1)).sub(1).abs().max()) < 1e-12  # global max taken out
    row_ratio = phi_q / raw_q
    assert_close64(row_ratio, row_ratio[..., :1].expand_as(row_ratio))
    head_ratio = phi_k / raw_k
    assert_close64(head_ratio, head_ratio[..., :1, :1].expand_as(head_ratio))
    out = linear_attention(q, k, v, feature_map=f.feature_map())
    assert_close64(out, performer_attention_naive(q, k, v, f))


def test_to_moves_projection():
    f = PerformerFeatures(8, 16, generator=0)
    f.to(dtype=torch.float64)
    assert f.projection.dtype == torch.float64 and f.dtype == torch.float64
    f.to("meta")
    assert f.projection.device.type == "meta"


# ------------------------------------------------------------ fast == naive
CASES = [  # (b, hq, hkv, nq, nkv, d, dv, chunk_size, num_features)
    (1, 1, 1, 1, 1, 4, 4, 64, 8),
    (2, 2, 2, 113, 113, 8, 8, 16, 64),
    (1, 4, 2, 203, 203, 16, 5, 64, 40),  # GQA, Dv != D, m not a multiple of D
    (1, 4, 1, 37, 113, 8, 6, 8, 32),  # Nq < Nkv
]


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_h{}-{}_n{}-{}_d{}-{}_c{}_m{}".format(*c))
def test_fast_matches_naive(case, causal, kernel):
    b, hq, hkv, nq, nkv, d, dv, chunk, m = case
    q, k, v = make_qkv(b, hq, nq, d, hkv=hkv, nkv=nkv, dv=dv, dtype=torch.float64)
    features = PerformerFeatures(d, m, kernel=kernel, generator=1, dtype=torch.float64)
    out = performer_attention(q, k, v, features=features, causal=causal, chunk_size=chunk)
    assert out.shape == (b, hq, nq, dv) and out.dtype == torch.float64
    assert_close64(out, performer_attention_naive(q, k, v, features, causal=causal))


def test_same_generator_same_output():
    q, k, v = make_qkv(1, 2, 40, 8)
    a = performer_attention(q, k, v, num_features=32, generator=torch.Generator().manual_seed(3), causal=True)
    b = performer_attention(q, k, v, num_features=32, generator=torch.Generator().manual_seed(3), causal=True)
    c = performer_attention(q, k, v, num_features=32, generator=4, causal=True)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    f = PerformerFeatures(8, 32, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, performer_attention(q, k, v, features=f, causal=True))


def test_scale_argument():
    q, k, v = make_qkv(1, 2, 30, 8, dtype=torch.float64)
    f = PerformerFeatures(8, 32, generator=0, dtype=torch.float64)
    a = performer_attention(q, k, v, features=f, scale=0.2)
    # the features see q sqrt(scale) and k sqrt(scale): the same with q, k times sqrt(2) and half the scale
    b = performer_attention(q * 2 ** 0.5, k * 2 ** 0.5, v, features=f, scale=0.1)
    assert_close64(a, b)
    assert_close64(a, performer_attention_naive(q, k, v, f, scale=0.2))


# ------------------------------------------------------- approximation error
def test_error_falls_as_features_grow():
    """Relative error against exact softmax attention, averaged over inputs and draws, falls
    monotonically over 16 -> 64 -> 256 -> 1024 features (roughly as 1/sqrt(m))."""
    sizes = [16, 64, 256, 1024]
    mean_errors = []
    inputs = [tuple(t * 0.5 if i < 2 else t for i, t in enumerate(make_qkv(1, 2, 64, 16, dtype=torch.float64)))
              for _ in range(3)]
    for m in sizes:
        errors = []
        for q, k, v in inputs:
            exact = exact_softmax_attention(q, k, v)
            for seed in range(4):
                out = performer_attention(q, k, v, num_features=m, generator=seed)
                errors.append(relative_error(out, exact))
        mean_errors.append(sum(errors) / len(errors))
    assert all(a > b for a, b in zip(mean_errors, mean_errors[1:])), mean_errors
    assert mean_errors[-1] < mean_errors[0] / 3, mean_errors


def test_causal_error_falls_as_features_grow():
    q, k, v = make_qkv(1, 2, 64, 16, dtype=torch.float64)
    q, k = q * 0.5, k * 0.5
    exact = exact_softmax_attention(q, k, v, causal=True)
    errs = [sum(relative_error(performer_attention(q, k, v, num_features=m, causal=True, generator=s), exact)
                for s in range(4)) / 4 for m in (16, 1024)]
    assert errs[1] < errs[0] / 3, errs


@pytest.mark.parametrize("num_features", [64, 128])
def test_orthogonal_beats_iid_on_average(num_features):
    errors = {True: [], False: []}
    for _ in range(3):
        q, k, v = make_qkv(1, 2, 64, 16, dtype=torch.float64)
        q, k = q * 0.5, k * 0.5
        exact = exact_softmax_attention(q, k, v)
        for orthogonal in (True, False):
            for seed in range(6):
                out = performer_attention(q, k, v, num_features=num_features, orthogonal=orthogonal, generator=seed)
                errors[orthogonal].append(relative_error(out, exact))
    mean = {key: sum(e) / len(e) for key, e in errors.items()}
    assert mean[True] < mean[False], mean


# ---------------------------------------------------------------- stability
def large_logit_inputs(dtype=torch.float32, target=50.0):
    """q, k (1, 2|1, 96, 16) scaled so that max |scale q·k| == |target|. A negative target points
    every query away from every key: all logits near -|target|."""
    q, k, v = make_qkv(1, 2, 96, 16, hkv=1, dtype=torch.float64)
    if target < 0:
        direction = torch.nn.functional.normalize(torch.randn(16, dtype=torch.float64), dim=0)
        k = direction + 0.1 * k
        q = -direction + 0.1 * q
    peak = float(((q @ k.transpose(-1, -2)) * 16 ** -0.5).abs().max())
    factor = (abs(target) / peak) ** 0.5
    return (q * factor).to(dtype), (k * factor).to(dtype), v.to(dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("target", [50.0, -50.0])
def test_large_logits_stay_finite(causal, target):
    q, k, v = large_logit_inputs(target=target)
    logits = (q.double() @ k.double().transpose(-1, -2)) / 4  # one kv head, broadcast over q heads
    assert abs(float(logits.abs().max()) - 50) < 1e-3
    if target < 0:
        assert float(logits.max()) < -5  # every query points away from every key
    q, k = q.requires_grad_(), k.requires_grad_()
    f = PerformerFeatures(16, 128, generator=0)
    out = performer_attention(q, k, v, features=f, causal=causal, chunk_size=32)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    # and it is the FAVOR+ value for these features, not a stabiliser artefact
    ref = performer_attention_naive(*as_f64(q, k, v, requires_grad=False), f, causal=causal)
    assert float((out.detach().double() - ref).abs().max()) <= 1e-4 * float(v.abs().max())


def test_small_denominators_are_not_floored():
    """D = 64 and logits up to ~30: with the usual row-max query stabiliser (and the global key
    max) a few percent of the causal rows get denominators below 1e-6, exact but tiny: an
    absolute eps = 1e-6 would floor them and shrink the rows towards 0. The softmax kernel
    clamps only at the smallest normal float: the rows match the reference."""
    q, k, v = make_qkv(1, 2, 192, 64, dtype=torch.float64)
    q, k = q * 2.5, k * 2.5
    f = PerformerFeatures(64, 64, generator=0, dtype=torch.float64)
    root = 64 ** -0.25
    log_q, log_k = f.log_features(q * root), f.log_features(k * root)
    row_max_q = torch.exp(log_q - log_q.amax(-1, keepdim=True))
    global_max_k = torch.exp(log_k - log_k.amax((-2, -1), keepdim=True))
    usual_den = (row_max_q @ global_max_k.transpose(-1, -2)).tril().sum(-1)
    assert float((usual_den < 1e-6).double().mean()) > 0.01  # the case this test is about happens
    ref = performer_attention_naive(q, k, v, f, causal=True)
    out = performer_attention(q.float(), k.float(), v.float(), features=f, causal=True)
    assert float((out.double() - ref).abs().max()) <= 1e-4 * float(v.abs().max())
    out64 = performer_attention(q, k, v, features=f, causal=True)
    assert_close64(out64, ref)
    floored = performer_attention(q.float(), k.float(), v.float(), features=f, causal=True, eps=1e-6)
    assert float((floored.double() - ref).abs().max()) > 1e-2 * float(v.abs().max())  # what the default avoids


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision(dtype, causal):
    q, k, v = large_logit_inputs(dtype, target=30.0)
    f = PerformerFeatures(16, 64, generator=0)
    out = performer_attention(q, k, v, features=f, causal=causal)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = performer_attention_naive(*as_f64(q, k, v), f, causal=causal)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3  # output rounding of an O(1) result
    assert float((out.double() - ref).abs().max()) <= tol * float(v.abs().max())


def test_relu_kernel_zero_rows():
    """relu features of a query orthogonal-negative to every projection row are all 0: out 0."""
    q, k, v = make_qkv(1, 1, 5, 4, dtype=torch.float64)
    f = PerformerFeatures(4, 8, kernel="relu", generator=0, dtype=torch.float64)
    q = torch.zeros_like(q)  # W 0 = 0 -> every feature 0
    out = performer_attention(q, k, v, features=f, causal=True)
    assert torch.equal(out, torch.zeros_like(out))


def test_no_keys_gives_zeros():
    q, k, v = make_qkv(1, 2, 5, 4, nkv=0, dv=3)
    f = PerformerFeatures(4, 8, generator=0)
    for out in (performer_attention(q, k, v, features=f), performer_attention_naive(q, k, v, f)):
        assert out.shape == (1, 2, 5, 3) and torch.equal(out, torch.zeros_like(out))
    assert performer_attention(q[:, :, :0], k, v, features=f, causal=True).shape == (1, 2, 0, 3)


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_gradcheck(causal, kernel):
    q, k, v = make_qkv(1, 2, 4, 3, hkv=1, nkv=6, dv=2, dtype=torch.float64, requires_grad=True)
    f = PerformerFeatures(3, 5, kernel=kernel, generator=0, dtype=torch.float64)
    fn = lambda q, k, v: performer_attention(q, k, v, features=f, causal=causal, chunk_size=2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
def test_grads_match_naive(causal):
    q, k, v = make_qkv(1, 4, 50, 8, hkv=2, nkv=70, dtype=torch.float64, requires_grad=True)
    f = PerformerFeatures(8, 32, generator=0, dtype=torch.float64)
    dout = torch.randn(1, 4, 50, 8, dtype=torch.float64)
    fast = performer_attention(q, k, v, features=f, causal=causal, chunk_size=16)
    g_fast = torch.autograd.grad((fast * dout).sum(), (q, k, v))
    g_ref = torch.autograd.grad((performer_attention_naive(q, k, v, f, causal=causal) * dout).sum(), (q, k, v))
    for name, a, e in zip("qkv", g_fast, g_ref):
        assert_close64(a, e, tol=1e-9, what=f"d{name}")


# --------------------------------------------------------------- O(N) memory
@pytest.mark.parametrize("causal", [False, True])
def test_no_quadratic_intermediate(causal):
    n, d, m = 4096, 8, 32
    q, k, v = make_qkv(1, 1, n, d)
    f = PerformerFeatures(d, m, generator=0)
    with LargestTensor() as mode:
        out = performer_attention(q, k, v, features=f, causal=causal)
    assert_no_nan(out)
    assert mode.largest <= 64 * n, f"largest intermediate {mode.largest} elements for N={n}"


# -------------------------------------------------------------------- errors
def qkv(**kw):
    return make_qkv(1, 2, 16, 8, **kw)


@pytest.mark.parametrize("num_features", [0, -1, 2.5, True])
def test_bad_num_features(num_features):
    with pytest.raises(ValueError, match=rf"num_features must be an int >= 1, got {num_features!r}"):
        performer_attention(*qkv(), num_features=num_features)
    with pytest.raises(ValueError, match="num_features must be an int >= 1"):
        PerformerFeatures(8, num_features)


def test_bad_kernel_and_flags():
    with pytest.raises(ValueError, match=r"kernel must be one of \('softmax', 'relu'\), got 'cosine'"):
        performer_attention(*qkv(), kernel="cosine")
    with pytest.raises(ValueError, match="kernel must be one of"):
        PerformerFeatures(8, kernel="exp")
    with pytest.raises(TypeError, match="orthogonal must be a bool"):
        performer_attention(*qkv(), orthogonal="yes")
    with pytest.raises(TypeError, match="generator must be a torch.Generator, an int seed or None, got str"):
        performer_attention(*qkv(), generator="seed")
    with pytest.raises(ValueError, match="head_dim must be an int >= 1, got 0"):
        PerformerFeatures(0)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        PerformerFeatures(8, dtype=torch.int32)


def test_shared_argument_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q_len=20 > kv_len=16"):
        performer_attention(torch.randn(1, 2, 20, 8), k, v, causal=True)
    with pytest.raises(ValueError, match=r"q heads \(3\).*multiple of k/v heads \(2\)"):
        performer_attention(torch.randn(1, 3, 16, 8), k, v)
    with pytest.raises(TypeError, match=r"share a dtype"):
        performer_attention(q.double(), k, v)
    with pytest.raises(ValueError, match=r"one device.*v meta"):
        performer_attention(q, k, v.to("meta"))
    with pytest.raises(ValueError, match=r"chunk_size must be an int >= 1, got 0"):
        performer_attention(q, k, v, causal=True, chunk_size=0)
    with pytest.raises(ValueError, match=r"eps must be a positive finite float"):
        performer_attention(q, k, v, eps=-1.0)
    for scale in (0, -1.0, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match=rf"scale must be a positive finite float or None, got {scale!r}"):
            performer_attention(q, k, v, scale=scale)


def test_features_conflicts():
    q, k, v = qkv()
    f = PerformerFeatures(8, 64, kernel="softmax", orthogonal=True, generator=0)
    assert performer_attention(q, k, v, features=f).shape == (1, 2, 16, 8)  # defaults: no conflict
    assert performer_attention(q, k, v, features=f, num_features=64).shape == (1, 2, 16, 8)  # agrees
    with pytest.raises(ValueError, match=r"num_features=32 conflicts with features.num_features=64"):
        performer_attention(q, k, v, features=f, num_features=32)
    with pytest.raises(ValueError, match=r"kernel='relu' conflicts with features.kernel='softmax'"):
        performer_attention(q, k, v, features=f, kernel="relu")
    with pytest.raises(ValueError, match=r"orthogonal=False conflicts with features.orthogonal=True"):
        performer_attention(q, k, v, features=f, orthogonal=False)
    with pytest.raises(ValueError, match=r"generator conflicts with features"):
        performer_attention(q, k, v, features=f, generator=1)
    with pytest.raises(ValueError, match=r"features were drawn for head_dim=4 but q has head_dim=8"):
        performer_attention(q, k, v, features=PerformerFeatures(4, 16))
    with pytest.raises(ValueError, match=r"features are on meta but q is on cpu"):
        performer_attention(q, k, v, features=PerformerFeatures(8, 16).to("meta"))
    with pytest.raises(TypeError, match="features must be PerformerFeatures or None, got Tensor"):
        performer_attention(q, k, v, features=f.projection)


def test_feature_object_errors():
    f = PerformerFeatures(8, 16, generator=0)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., N, 8\).*\(4, 7\)"):
        f(torch.randn(4, 7), is_query=True)
    with pytest.raises(TypeError, match="is_query must be a bool"):
        f(torch.randn(4, 8), is_query=None)
    with pytest.raises(ValueError, match="x is on meta but the features' projection is on cpu"):
        f(torch.randn(4, 8, device="meta"), is_query=False)
    relu = PerformerFeatures(8, 16, kernel="relu", generator=0)
    with pytest.raises(ValueError, match="softmax_kernel_estimate needs features with kernel='softmax'"):
        softmax_kernel_estimate(torch.randn(2, 8), torch.randn(2, 8), relu)
    with pytest.raises(TypeError, match="features must be PerformerFeatures"):
        softmax_kernel_estimate(torch.randn(2, 8), torch.randn(2, 8), None)
    with pytest.raises(TypeError, match="features must be PerformerFeatures"):
        performer_attention_naive(*qkv(), features=None)


@pytest.mark.parametrize("causal", [False, True])
def test_under_autocast_matches_float32(causal):
    """Models train under bf16 autocast: the feature matmuls must not come out in bf16 beside a
    float32 v (this raised a dtype TypeError in the LRA ListOps run on the GPU)."""
    torch.manual_seed(3)
    q, k, v = make_qkv(1, 2, 96, 16)
    expected = performer_attention(q, k, v, num_features=32, causal=causal, generator=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = performer_attention(q, k, v, num_features=32, causal=causal, generator=0)
    assert got.dtype == q.dtype
    torch.testing.assert_close(got, expected)


def test_int_seed_features_are_drawn_once_and_equal_a_fresh_draw(monkeypatch):
    """An int seed gives the same features at every call: drawn once (no QR and upload per call
    of every layer), and the output equals the one with features drawn from that seed."""
    from sparse_attn.ops.performer import features as features_module

    draws = []
    inner = features_module.draw_projection

    def spy(*args, **kwargs):
        draws.append(args)
        return inner(*args, **kwargs)

    monkeypatch.setattr(features_module, "draw_projection", spy)
    q, k, v = make_qkv(2, 4, 33, 8, hkv=2, dtype=torch.float64)
    seed = 918273  # not used by another test, so the cache starts cold here
    first = performer_attention(q, k, v, num_features=24, generator=seed)
    again = performer_attention(q, k, v, num_features=24, generator=seed)
    assert len(draws) == 1 and torch.equal(first, again)
    fresh = PerformerFeatures(8, 24, generator=seed)
    assert len(draws) == 2
    assert torch.equal(first, performer_attention(q, k, v, features=fresh))
    performer_attention(q, k, v, num_features=24, generator=seed + 1)  # another seed: drawn
    performer_attention(q, k, v, num_features=24, generator=torch.Generator().manual_seed(seed))  # stateful: drawn
    assert len(draws) == 4
