"""Routing Transformer attention: the gathered path equals the dense reference built from the same
clusters, equals dense attention when one cluster holds everything, routes exactly `window`
members per cluster, merges a token's clusters exactly, and the online k-means moves its
centroids toward the data, reproducibly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sa_testing import (BAD_KEY_PADDING_MASKS, assert_fast_equals_naive, assert_fp32_close, assert_low_precision_close,
                        assert_padded_equals_rows_alone, assert_pads_take_no_part, assert_same_lse, loss_and_grads,
                        make_qkv, max_abs_err, padding_mask_for)

from sparse_attn.ops.routing import (RoutingCentroids, route_tokens, routing_attended_pairs, routing_attention,
                                     routing_attention_naive, routing_sizes)

EXACT = 1e-10


def masked_softmax_f64(q, k, v, mask, scale=None):
    """float64 softmax attention restricted to `mask` [B, Hq, N, N]; empty rows 0, lse -inf."""
    q, k, v = (t.detach().double() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    return torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0) @ v, lse


def centroids_of(kind, num_clusters, hq, d):
    if kind == "data":
        return None
    if kind == "module":
        return RoutingCentroids(num_clusters, d, num_heads=hq, generator=torch.Generator().manual_seed(0))
    return torch.randn(num_clusters, d)  # shared by the heads, not normalised


# --------------------------------------------------------------------- gathered == naive
CASES = [  # (n, num_clusters, window, hq, hkv)
    (1, 1, 1, 2, 2),
    (16, 3, 5, 4, 2),
    (113, 4, 30, 2, 2),
    (203, 8, 40, 4, 1),
    (20, 3, 20, 2, 1),  # window = N: every cluster holds everything
]


@pytest.mark.parametrize("kind", ["data", "module", "tensor"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,num_clusters,window,hq,hkv", CASES)
def test_gathered_equals_naive(n, num_clusters, window, hq, hkv, causal, kind):
    q, k, v = make_qkv(2, hq, n, 8, hkv=hkv, dv=5, dtype=torch.float64)
    kw = dict(num_clusters=num_clusters, window=window, causal=causal, centroids=centroids_of(kind, num_clusters, hq, 8))
    dout = torch.randn(2, hq, n, 5, dtype=torch.float64)
    lse_w = torch.randn(2, hq, n, dtype=torch.float64)
    out, lse, grads = loss_and_grads(routing_attention, q, k, v, dout, lse_w, **kw)
    ref, ref_lse, ref_grads = loss_and_grads(routing_attention_naive, q, k, v, dout, lse_w, **kw)
    assert out.shape == (2, hq, n, 5) and not torch.isnan(out).any()
    assert max_abs_err(out, ref) <= EXACT
    assert_same_lse(lse, ref_lse)
    for g, rg in zip(grads, ref_grads):
        assert not torch.isnan(g).any()
        assert max_abs_err(g, rg) <= EXACT


@pytest.mark.parametrize("causal", [False, True])
def test_equals_softmax_over_attended_pairs(causal):
    """Tokens in several clusters: keys shared by those clusters count once."""
    q, k, v = make_qkv(2, 4, 97, 6, hkv=2, dtype=torch.float64)
    kw = dict(num_clusters=6, window=40, causal=causal)  # 6 x 40 > 97: many tokens in several clusters
    out, lse = routing_attention(q, k, v, return_lse=True, **kw)
    pairs = routing_attended_pairs(q, k, **kw)
    ref, ref_lse = masked_softmax_f64(q, k, v, pairs)
    assert max_abs_err(out, ref) <= EXACT
    assert_same_lse(lse, ref_lse)
    q_members, _ = route_tokens(q, k, num_clusters=6, window=40)
    multi = F.one_hot(q_members, 97).sum((2, 3)) > 1  # [B, Hq, N]
    assert multi.any(), "the case should hold tokens routed to several clusters"


@pytest.mark.parametrize("num_clusters", [1, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_full_window_is_dense_attention(causal, num_clusters):
    n = 37
    q, k, v = make_qkv(2, 4, n, 8, hkv=2, dtype=torch.float64)
    out = routing_attention(q, k, v, num_clusters=num_clusters, window=n, causal=causal)
    sdpa = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=causal)
    assert max_abs_err(out, sdpa) <= EXACT


# --------------------------------------------------------------------- routing
@pytest.mark.parametrize("kind", ["data", "module", "tensor"])
def test_every_cluster_has_window_members(kind):
    b, hq, hkv, n, d, c, w = 2, 4, 2, 53, 8, 5, 9
    q, k, _ = make_qkv(b, hq, n, d, hkv=hkv)
    cents = centroids_of(kind, c, hq, d)
    q_members, k_members = route_tokens(q, k, num_clusters=c, window=w, centroids=cents)
    for members, x in ((q_members, q), (k_members, k.repeat_interleave(hq // hkv, 1))):
        assert members.shape == (b, hq, c, w) and members.dtype == torch.long
        assert members.min() >= 0 and members.max() < n
        assert (members.diff(dim=-1) > 0).all(), "members are distinct and sorted by position"
        # they are the `window` tokens most similar to the centroid
        if cents is None:
            positions = torch.linspace(0, n - 1, c).round().long()
            centre = F.normalize(k[:, :, positions], dim=-1).repeat_interleave(hq // hkv, 1)
        else:
            centre = F.normalize((cents.centroids if isinstance(cents, RoutingCentroids) else cents).float(), dim=-1)
            centre = centre.expand(b, hq, c, d)
        sim = centre @ F.normalize(x, dim=-1).transpose(-1, -2)  # [B, Hq, C, N]
        inside = F.one_hot(members, n).sum(-2).bool()
        assert (sim.masked_fill(~inside, float("inf")).amin(-1)
                >= sim.masked_fill(inside, float("-inf")).amax(-1) - 1e-6).all()


def test_unrouted_tokens_get_zero():
    n = 30
    q, k, v = make_qkv(1, 2, n, 8, requires_grad=True)
    out, lse = routing_attention(q, k, v, num_clusters=1, window=10, return_lse=True)
    q_members, _ = route_tokens(q, k, num_clusters=1, window=10)
    routed = F.one_hot(q_members, n).sum((2, 3)).bool()  # [B, H, N]
    assert routed.sum() == 2 * 10
    assert (out[~routed] == 0).all() and torch.isinf(lse[~routed]).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[routed]).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_default_centroids_are_per_sequence_and_deterministic():
    q, k, v = make_qkv(3, 2, 41, 8)
    kw = dict(num_clusters=4, window=12, causal=True)
    out = routing_attention(q, k, v, **kw)
    assert torch.equal(out, routing_attention(q, k, v, **kw))
    for b in range(3):  # a sequence's result does not depend on the others in the batch
        assert max_abs_err(routing_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], **kw), out[b:b + 1]) <= 1e-6


def test_non_contiguous_inputs():
    q, k, v = (torch.randn(2, 30, h, 8).transpose(1, 2) for h in (4, 2, 2))
    kw = dict(num_clusters=3, window=10, causal=True)
    expected = routing_attention(q.contiguous(), k.contiguous(), v.contiguous(), **kw)
    assert torch.equal(routing_attention(q, k, v, **kw), expected)


def test_routing_transformer_module_flow():
    """A model step: route with learned centroids, then update them with the queries and keys."""
    hq, d = 2, 8
    cents = RoutingCentroids(4, d, num_heads=hq, decay=0.9, generator=torch.Generator().manual_seed(1))
    q, k, v = make_qkv(2, hq, 33, d, requires_grad=True)
    out = routing_attention(q, k, v, num_clusters=4, window=10, centroids=cents)
    out.square().mean().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))
    before = cents.centroids.clone()
    cents.update(torch.cat([q, k], dim=2))
    assert not torch.equal(before, cents.centroids)
    assert cents.centroids.grad is None and not cents.centroids.requires_grad


# --------------------------------------------------------------------- k-means
def clustered(b, h, n, d, directions, noise):
    which = torch.randint(directions.shape[-2], (b, h, n))
    picked = directions.expand(b, h, -1, -1).gather(2, which.unsqueeze(-1).expand(-1, -1, -1, d))
    return picked + noise * torch.randn(b, h, n, d)


def test_update_moves_centroids_toward_data():
    h, c, d = 2, 4, 16
    directions = F.normalize(torch.randn(1, h, c, d), dim=-1)
    cents = RoutingCentroids(c, d, num_heads=h, decay=0.8, generator=torch.Generator().manual_seed(0))

    def fit():  # mean cosine of each data point with its nearest centroid
        x = clustered(2, h, 64, d, directions, noise=0.05)
        return float((F.normalize(x, dim=-1) @ cents.centroids.transpose(-1, -2)).amax(-1).mean())

    start = fit()
    for _ in range(30):
        cents.update(clustered(2, h, 64, d, directions, noise=0.05))
    end = fit()
    assert end > start + 0.1 and end > 0.9, (start, end)
    assert torch.allclose(cents.centroids.norm(dim=-1), torch.ones(h, c))


def test_update_is_an_ema_of_the_cluster_means():
    cents = RoutingCentroids(2, 3, num_heads=1, decay=0.75, generator=torch.Generator().manual_seed(0))
    old = cents.centroids.clone()  # [1, 2, 3]
    x = torch.randn(2, 3, 10, 3)  # heads pooled: one set of centroids for all three heads
    assigned = cents.update(x)
    assert assigned.shape == (2, 3, 10)
    xs = F.normalize(x, dim=-1)
    for c in range(2):
        members = xs[assigned == c]
        if len(members):
            expected = F.normalize(0.75 * old[0, c] + 0.25 * members.mean(0), dim=0)
        else:  # a cluster without data keeps its centroid
            expected = old[0, c]
        assert torch.allclose(cents.centroids[0, c], expected, atol=1e-6)
    # the assignment is the most similar centroid
    assert torch.equal(assigned, (xs @ old[0].T).argmax(-1))


def test_centroids_are_deterministic_for_a_seed():
    def run(seed):
        cents = RoutingCentroids(3, 8, num_heads=2, generator=torch.Generator().manual_seed(seed), decay=0.5)
        data = torch.Generator().manual_seed(99)
        for _ in range(3):
            cents.update(torch.randn(1, 2, 20, 8, generator=data))
        return cents.centroids

    assert torch.equal(run(4), run(4))
    assert not torch.equal(run(4), run(5))


def test_centroid_errors():
    with pytest.raises(ValueError, match="num_clusters must be >= 1, got 0"):
        RoutingCentroids(0, 8)
    with pytest.raises(ValueError, match="decay must be a float in"):
        RoutingCentroids(2, 8, decay=1.0)
    cents = RoutingCentroids(2, 8, num_heads=3)
    with pytest.raises(ValueError, match=r"x has 2 heads but the centroids have 3"):
        cents.update(torch.randn(1, 2, 5, 8))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, heads, length, 8\)"):
        cents.assign(torch.randn(1, 3, 5, 4))


# --------------------------------------------------------------------- gradients, precision
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(causal):
    q, k, v = make_qkv(1, 2, 9, 3, hkv=1, dv=2, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v):
        out, lse = routing_attention(q, k, v, num_clusters=3, window=4, causal=causal, return_lse=True)
        return out, torch.where(torch.isfinite(lse), lse, 0.0)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    q, k, v = make_qkv(1, 4, 113, 16, hkv=2, dtype=dtype)
    kw = dict(num_clusters=5, window=32, causal=True)
    dout = torch.randn(1, 4, 113, 16, dtype=torch.float64)
    lse_w = torch.randn(1, 4, 113, dtype=torch.float64)
    out, lse, grads = loss_and_grads(routing_attention, q, k, v, dout.to(dtype), lse_w, **kw)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    ref64, ref_lse64, ref_grads64 = loss_and_grads(routing_attention_naive, *(t.double() for t in (q, k, v)), dout,
                                                   lse_w, **kw)
    ref_lo, _, ref_grads_lo = loss_and_grads(routing_attention_naive, q, k, v, dout.to(dtype), lse_w, **kw)
    assert_low_precision_close(out, ref_lo, ref64, what="out")
    assert_same_lse(lse, ref_lse64, tol=1e-4)  # routed in float32 from the same values: same clusters
    for name, g, lo, g64 in zip("qkv", grads, ref_grads_lo, ref_grads64):
        assert g.dtype == dtype
        assert_low_precision_close(g, lo, g64, factor=3.0, what=f"d{name}")


# --------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_clusters=0, window=4), ValueError, "num_clusters must be >= 1, got 0"),
    (dict(num_clusters=2, window=0), ValueError, "window must be >= 1, got 0"),
    (dict(num_clusters=2, window=17), ValueError, "window must be <= the sequence length 16, got 17"),
    (dict(num_clusters=2.5, window=4), TypeError, "num_clusters must be an int"),
    (dict(num_clusters=2, window=4, causal="yes"), TypeError, "causal must be a bool"),
    (dict(num_clusters=2, window=4, centroids=torch.randn(3, 8)), ValueError, r"centroids must have shape \(2, 8\)"),
    (dict(num_clusters=2, window=4, centroids=torch.randn(2, 4)), ValueError, r"got \(2, 4\)"),
    (dict(num_clusters=2, window=4, centroids=torch.randn(5, 2, 8)), ValueError, r"got \(5, 2, 8\)"),
    (dict(num_clusters=2, window=4, centroids=torch.ones(2, 8, dtype=torch.long)), TypeError, "floating"),
    (dict(num_clusters=2, window=4, centroids=[[0.0] * 8] * 2), TypeError, "centroids must be a RoutingCentroids"),
    (dict(num_clusters=3, window=4, centroids=RoutingCentroids(2, 8)), ValueError, "centroids must have shape"),
    (dict(num_clusters=2, window=4, scale=0.0), ValueError, "scale must be a positive finite float"),
])
def test_bad_arguments(kwargs, exc, match):
    q, k, v = make_qkv(1, 2, 16, 8)
    with pytest.raises(exc, match=match):
        routing_attention(q, k, v, **kwargs)


def test_bad_tensors():
    q, k, v = make_qkv(1, 2, 16, 8)
    with pytest.raises(ValueError, match=r"q heads \(2\) must be a multiple of k/v heads \(3\)"):
        routing_attention(q, *make_qkv(1, 3, 16, 8)[1:], num_clusters=2, window=4)
    with pytest.raises(ValueError, match="same length"):
        routing_attention(q, k[:, :, :8], v[:, :, :8], num_clusters=2, window=4)
    with pytest.raises(ValueError, match="k and v must have the same number of heads"):
        routing_attention(q, k, v[:, :1], num_clusters=2, window=4)


# --------------------------------------------------------------------- padded batches
PAD_N = 40
PAD_LENGTHS = [40, 1, 23, 9]  # very different lengths: default sizes 3, 1, 2 and 2 clusters


PAD_SIZES = [  # (num_clusters, window, centroids kind)
    (None, None, "data"),  # every row its own default sizes and centroids
    (3, None, "data"),  # window ceil(n_b / 3) per row
    (3, 8, "data"),  # window capped at the 1- and 9-token rows
    (None, 12, "module"),  # num_clusters from the centroids
    (4, None, "tensor"),
    (2, 40, "data"),  # every cluster holds a whole row
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("side", ["left", "right", "holes"])
@pytest.mark.parametrize("num_clusters,window,kind", PAD_SIZES)
def test_padded_gathered_equals_naive(num_clusters, window, kind, side, causal):
    q, k, v = make_qkv(4, 4, PAD_N, 8, hkv=2, dv=5, dtype=torch.float64)
    kw = dict(num_clusters=num_clusters, window=window, causal=causal,
              centroids=centroids_of(kind, num_clusters or 3, 4, 8), key_padding_mask=padding_mask_for(side, PAD_LENGTHS, PAD_N))
    dout = torch.randn(4, 4, PAD_N, 5, dtype=torch.float64)
    lse_w = torch.randn(4, 4, PAD_N, dtype=torch.float64)
    assert_fast_equals_naive(routing_attention, routing_attention_naive, q, k, v, dout, lse_w, EXACT, **kw)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("side", ["left", "right", "holes"])
@pytest.mark.parametrize("num_clusters,window,kind", PAD_SIZES)
def test_padded_rows_equal_rows_alone(num_clusters, window, kind, side, causal):
    """Each row's real positions get what its real tokens give alone, with the sizes of its own
    length (a given window capped at it); pad query rows are 0 with lse -inf; pads get no
    gradient."""
    q, k, v = make_qkv(4, 4, PAD_N, 8, hkv=2, dv=5, dtype=torch.float64)
    mask = padding_mask_for(side, PAD_LENGTHS, PAD_N)
    kw = dict(num_clusters=num_clusters, causal=causal, centroids=centroids_of(kind, num_clusters or 3, 4, 8))
    dout = torch.randn(4, 4, PAD_N, 5, dtype=torch.float64)
    lse_w = torch.randn(4, 4, PAD_N, dtype=torch.float64)
    capped = lambda length: {"window": None if window is None else min(window, length)}  # noqa: E731
    assert_padded_equals_rows_alone(routing_attention, q, k, v, mask, dout, lse_w, padded_kw={"window": window},
                                    row_kw=capped, tol=EXACT, **kw)


def test_padded_float32_matches_the_float64_reference():
    q, k, v = make_qkv(4, 4, PAD_N, 8, hkv=2)
    kw = dict(causal=True, key_padding_mask=padding_mask_for("left", PAD_LENGTHS, PAD_N))
    dout = torch.randn(4, 4, PAD_N, 8, dtype=torch.float64)
    lse_w = torch.randn(4, 4, PAD_N, dtype=torch.float64)
    out, lse, grads = loss_and_grads(routing_attention, q, k, v, dout.float(), lse_w, **kw)
    ref, ref_lse, ref_grads = loss_and_grads(routing_attention_naive, *(t.double() for t in (q, k, v)), dout,
                                             lse_w, **kw)  # same values: routed alike
    assert out.dtype == torch.float32
    assert_fp32_close(out, ref, what="out")
    assert_fp32_close(lse, ref_lse, what="lse")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_fp32_close(g, rg, what=f"d{name}")


@pytest.mark.parametrize("side", ["left", "holes"])
@pytest.mark.parametrize("num_clusters,window", [(None, None), (3, 8)])
def test_pad_tokens_take_no_part(num_clusters, window, side):
    """Whatever the pads hold (even vectors that would win every cluster), the real positions'
    outputs and gradients do not change, and the pads' own gradients are 0."""
    q, k, v = make_qkv(4, 4, PAD_N, 8, hkv=2, dtype=torch.float64)
    mask = padding_mask_for(side, PAD_LENGTHS, PAD_N)
    pads = ~mask[:, None, :, None]
    cents = torch.randn(3, 8, dtype=torch.float64)
    kw = dict(num_clusters=num_clusters, window=window, centroids=None if num_clusters is None else cents,
              key_padding_mask=mask)
    dout = torch.randn(4, 4, PAD_N, 8, dtype=torch.float64)
    lse_w = torch.randn(4, 4, PAD_N, dtype=torch.float64)
    # pads pointing at the first centroid: alone they would top its cluster
    magnet = cents[0].expand_as(q) * 1e3
    noisy = [torch.where(pads, magnet[:, :t.shape[1]], t) for t in (q, k)] + [torch.where(pads, 1e3, v)]
    assert_pads_take_no_part(routing_attention, (q, k, v), noisy, mask, dout, lse_w, **kw)


def test_padded_routing_puts_pads_in_no_cluster():
    b, hq, hkv, d = 4, 4, 2, 8
    q, k, v = make_qkv(b, hq, PAD_N, d, hkv=hkv, dtype=torch.float64)
    mask = padding_mask_for("holes", PAD_LENGTHS, PAD_N)
    q_members, k_members = route_tokens(q, k, key_padding_mask=mask)
    sizes = [routing_sizes(n_b) for n_b in PAD_LENGTHS]
    assert q_members.shape == (b, hq, max(s["num_clusters"] for s in sizes), max(s["window"] for s in sizes))
    for members in (q_members, k_members):
        for row, size in enumerate(sizes):
            used = members[row, :, :size["num_clusters"], :size["window"]]
            assert mask[row][used].all(), "members are real tokens of the row"
            assert (members[row][..., size["window"]:] == PAD_N).all(), "slots past the row's window are empty"
            assert (members[row, :, size["num_clusters"]:] == PAD_N).all(), "clusters past the row's count are empty"
    out = routing_attention(q, k, v, key_padding_mask=mask)
    pairs = routing_attended_pairs(q, k, key_padding_mask=mask)
    real = mask[:, None, :]
    assert not (pairs & ~real.unsqueeze(-1)).any() and not (pairs & ~real.unsqueeze(-2)).any()
    ref, _ = masked_softmax_f64(q, k, v, pairs)
    assert max_abs_err(out, ref) <= EXACT


def test_an_all_real_mask_changes_nothing():
    q, k, v = make_qkv(2, 4, 37, 8, hkv=2)
    everything = torch.ones(2, 37, dtype=torch.bool)
    for kw in (dict(), dict(num_clusters=3, window=10, causal=True)):
        assert torch.equal(routing_attention(q, k, v, key_padding_mask=everything, **kw),
                           routing_attention(q, k, v, **kw))


def test_a_row_of_pads_returns_zero():
    q, k, v = make_qkv(2, 2, 12, 4, requires_grad=True)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1] = False
    out, lse = routing_attention(q, k, v, num_clusters=2, window=4, key_padding_mask=mask, return_lse=True)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all() and torch.isfinite(out[0]).all()
    out.sum().backward()
    assert all((t.grad[1] == 0).all() and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_padded_gradcheck():
    q, k, v = make_qkv(2, 2, 9, 3, hkv=1, dv=2, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :3] = False
    mask[1, [2, 5]] = False

    def fn(q, k, v):
        out, lse = routing_attention(q, k, v, num_clusters=3, window=4, causal=True, return_lse=True,
                                     key_padding_mask=mask)
        return out, torch.where(torch.isfinite(lse), lse, 0.0)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)


def test_update_with_a_mask_ignores_the_pads():
    """update(x, mask) moves the centroids as an update on the real tokens alone does."""
    x = torch.randn(2, 3, 10, 8)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 6:] = False
    mask[1, :2] = False
    for heads in (1, 3):
        padded = RoutingCentroids(4, 8, num_heads=heads, decay=0.5, generator=torch.Generator().manual_seed(0))
        alone = RoutingCentroids(4, 8, num_heads=heads, decay=0.5, generator=torch.Generator().manual_seed(0))
        noisy = torch.where(mask[:, None, :, None], x, 50 * torch.randn_like(x))
        assigned = padded.update(noisy, mask=mask)
        assert assigned.shape == (2, 3, 10)
        # the real tokens of both rows in one batch row: the same clusters, the same means
        alone.update(torch.cat([x[:1, :, mask[0]], x[1:, :, mask[1]]], dim=2))
        assert torch.allclose(padded.centroids, alone.centroids, atol=1e-6)
        moved = RoutingCentroids(4, 8, num_heads=heads, decay=0.5, generator=torch.Generator().manual_seed(0))
        moved.update(noisy)
        assert not torch.allclose(moved.centroids, alone.centroids, atol=1e-3)  # the pads would have moved them
    with pytest.raises(TypeError, match=r"mask must be a bool tensor of shape \(2, 10\).*torch.float32"):
        padded.update(x, mask=torch.ones(2, 10))
    with pytest.raises(ValueError, match=r"mask must have shape \(batch, length\) = \(2, 10\) like x, got \(2, 9\)"):
        padded.update(x, mask=mask[:, :9])


@pytest.mark.parametrize("mask,exc,match", BAD_KEY_PADDING_MASKS)
def test_bad_key_padding_mask(mask, exc, match):
    q, k, v = make_qkv(1, 2, 16, 8)
    for call in (lambda: routing_attention(q, k, v, key_padding_mask=mask),
                 lambda: routing_attention_naive(q, k, v, key_padding_mask=mask),
                 lambda: routing_attended_pairs(q, k, key_padding_mask=mask),
                 lambda: route_tokens(q, k, key_padding_mask=mask)):
        with pytest.raises(exc, match=match):
            call()
