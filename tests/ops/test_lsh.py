"""Reformer LSH attention: the chunked path equals the dense per-round reference with the same
hashes, equals softmax over the attended pairs, equals dense attention when one chunk holds the
sequence, is reproducible, never lets a token attend to itself unless alone, recovers more
attention mass with more rounds, and has correct gradients and low-precision behaviour."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from sa_testing import (BAD_KEY_PADDING_MASKS, assert_fast_equals_naive, assert_fp32_close, assert_low_precision_close,
                        assert_padded_equals_rows_alone, assert_pads_take_no_part, assert_same_lse, loss_and_grads,
                        make_qkv, max_abs_err, padding_mask_for)

from sparse_attn.ops.lsh import lsh_attended_pairs, lsh_attention, lsh_attention_naive, lsh_hash, random_rotations

EXACT = 1e-10


def masked_softmax_f64(q, k, v, mask, scale=None):
    """float64 softmax attention restricted to `mask` [B, Hq, N, N]; empty rows 0, lse -inf."""
    q, k, v = (t.detach().double() for t in (q, k, v))
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)  # shared-QK keys have q's heads, v the kv heads
    v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    probs = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    return probs @ v, lse


def qkv_for(shared_qk, *, b=2, hq=4, hkv=2, n=16, d=8, dv=None, dtype=torch.float64, requires_grad=False):
    q, k, v = make_qkv(b, hq, n, d, hkv=hkv, dv=dv, dtype=dtype, requires_grad=requires_grad)
    return q, (None if shared_qk else k), v


# --------------------------------------------------------------------- chunked == naive
CASES = [  # (n, bucket_size, n_hashes, hq, hkv)
    (1, 4, 2, 2, 2),
    (16, 4, 3, 4, 2),
    (113, 16, 3, 2, 2),
    (203, 32, 2, 4, 1),
    (40, 64, 3, 2, 1),  # one chunk, bucket_size > N
    (64, 8, 1, 2, 2),
    (9, 1, 5, 2, 1),  # chunks of one token
]


@pytest.mark.parametrize("shared_qk", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,bucket_size,n_hashes,hq,hkv", CASES)
def test_chunked_equals_naive(n, bucket_size, n_hashes, hq, hkv, causal, shared_qk):
    q, k, v = qkv_for(shared_qk, b=2, hq=hq, hkv=hkv, n=n, d=8, dv=5)
    kw = dict(bucket_size=bucket_size, n_hashes=n_hashes, causal=causal, shared_qk=shared_qk, seed=7)
    dout = torch.randn(2, hq, n, 5, dtype=torch.float64)
    lse_w = torch.randn(2, hq, n, dtype=torch.float64)
    out, _ = assert_fast_equals_naive(lsh_attention, lsh_attention_naive, q, k, v, dout, lse_w, EXACT, **kw)
    assert out.shape == (2, hq, n, 5) and out.dtype == torch.float64


@pytest.mark.parametrize("shared_qk", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_equals_softmax_over_attended_pairs(causal, shared_qk):
    """Duplicates across rounds count once: the merged rounds are softmax over the union."""
    q, k, v = qkv_for(shared_qk, b=2, hq=4, hkv=2, n=77, d=6)
    kw = dict(bucket_size=8, n_hashes=4, causal=causal, shared_qk=shared_qk, seed=11)
    out, lse = lsh_attention(q, k, v, return_lse=True, **kw)
    pairs = lsh_attended_pairs(q, k, **kw)
    assert pairs.shape == (2, 4, 77, 77) and pairs.dtype == torch.bool
    keys = F.normalize(q, dim=-1) if shared_qk else k
    ref, ref_lse = masked_softmax_f64(q, keys, v, pairs)
    assert max_abs_err(out, ref) <= EXACT
    assert_same_lse(lse, ref_lse)
    # the pairs are far from dense: bounded by rounds x (2 chunks) per row
    assert pairs.sum(-1).max() <= 4 * 2 * 8


@pytest.mark.parametrize("n_hashes", [1, 3])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shared_qk", [False, True])
def test_one_chunk_is_dense_attention(shared_qk, causal, n_hashes):
    """bucket_size >= N: one chunk holds everything, in every round (duplicates counted once)."""
    n = 37
    q, k, v = qkv_for(shared_qk, b=2, hq=4, hkv=2, n=n, d=8)
    out, lse = lsh_attention(q, k, v, bucket_size=n + 5, n_hashes=n_hashes, causal=causal, shared_qk=shared_qk,
                             seed=0, return_lse=True)
    mask = torch.ones(n, n, dtype=torch.bool)
    if causal:
        mask = mask.tril()
    if shared_qk:  # no self, except the causal first token, which has nothing else
        mask = mask & ~torch.eye(n, dtype=torch.bool)
        mask[0, 0] = causal
    keys = F.normalize(q, dim=-1) if shared_qk else k
    ref, ref_lse = masked_softmax_f64(q, keys, v, mask.expand(2, 4, n, n))
    assert max_abs_err(out, ref) <= EXACT
    assert_same_lse(lse, ref_lse)
    if not shared_qk:  # plain (causal) softmax attention, as SDPA computes it
        sdpa = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                              is_causal=causal)
        assert max_abs_err(out, sdpa) <= EXACT


# --------------------------------------------------------------------- randomness
def test_reproducible_with_seed_and_generator():
    q, k, v = qkv_for(False, n=113, dtype=torch.float32)
    kw = dict(bucket_size=16, n_hashes=2)
    a = lsh_attention(q, k, v, seed=5, **kw)
    assert torch.equal(a, lsh_attention(q, k, v, seed=5, **kw))
    assert torch.equal(a, lsh_attention(q, k, v, generator=torch.Generator().manual_seed(5), **kw))
    assert not torch.equal(a, lsh_attention(q, k, v, seed=6, **kw))
    # without seed or generator: torch's global generator
    torch.manual_seed(123)
    b = lsh_attention(q, k, v, **kw)
    torch.manual_seed(123)
    assert torch.equal(b, lsh_attention(q, k, v, **kw))
    # the pairs follow the same hashes
    p = lsh_attended_pairs(q, k, seed=5, **kw)
    assert torch.equal(p, lsh_attended_pairs(q, k, seed=5, **kw))
    assert not torch.equal(p, lsh_attended_pairs(q, k, seed=6, **kw))


def test_non_contiguous_inputs():
    """[B, N, H, D] memory viewed as [B, H, N, D] (what a projection gives) works as is."""
    q, k, v = (torch.randn(2, 30, h, 8).transpose(1, 2) for h in (4, 2, 2))
    for shared_qk in (False, True):
        kw = dict(bucket_size=4, n_hashes=2, shared_qk=shared_qk, seed=0)
        kk = None if shared_qk else k
        expected = lsh_attention(q.contiguous(), None if shared_qk else k.contiguous(), v.contiguous(), **kw)
        assert torch.equal(lsh_attention(q, kk, v, **kw), expected)


def test_lsh_hash_properties():
    x = torch.randn(2, 3, 50, 8)
    rot = random_rotations(8, 6, 4, generator=torch.Generator().manual_seed(0))
    assert rot.shape == (4, 8, 3) and rot.dtype == torch.float32
    buckets = lsh_hash(x, 6, 4, rotations=rot)
    assert buckets.shape == (2, 3, 4, 50) and buckets.dtype == torch.long
    assert buckets.min() >= 0 and buckets.max() < 6
    # angular: a positive scale keeps the bucket, the opposite vector lands in the opposite bucket
    assert torch.equal(lsh_hash(2.5 * x, 6, 4, rotations=rot), buckets)
    assert torch.equal(lsh_hash(-x, 6, 4, rotations=rot), (buckets + 3) % 6)
    # drawing from a generator is the same as passing its rotations
    assert torch.equal(lsh_hash(x, 6, 4, torch.Generator().manual_seed(0)), buckets)
    # a half-precision copy hashes like its float32 values
    x16 = x.half()
    assert torch.equal(lsh_hash(x16, 6, 4, rotations=rot), lsh_hash(x16.float(), 6, 4, rotations=rot))
    # nearby vectors share buckets more often than unrelated ones
    near = lsh_hash(x + 0.05 * torch.randn_like(x), 6, 4, rotations=rot)
    far = lsh_hash(torch.randn_like(x), 6, 4, rotations=rot)
    assert (near == buckets).float().mean() > (far == buckets).float().mean() + 0.3
    with pytest.raises(ValueError, match="n_buckets must be an even number >= 2, got 5"):
        lsh_hash(x, 5, 1)


# --------------------------------------------------------------------- self attention rule
@pytest.mark.parametrize("causal", [False, True])
def test_token_attends_to_itself_only_when_alone(causal):
    n = 64
    q, _, v = qkv_for(True, b=1, hq=2, hkv=2, n=n, d=8)
    kw = dict(bucket_size=4, n_hashes=1, causal=causal, shared_qk=True, seed=3)
    pairs = lsh_attended_pairs(q, None, **kw)
    diag = pairs.diagonal(dim1=-2, dim2=-1)  # [B, H, N]
    others = (pairs & ~torch.eye(n, dtype=torch.bool)).any(-1)
    assert torch.equal(diag, ~others), "self is attended exactly when nothing else is"
    if causal:  # the first token has only itself; so do tokens whose window holds only later keys
        assert diag[..., 0].all()
    else:  # a window of 2 chunks always holds another token
        assert not diag.any()
    out = lsh_attention(q, None, v, **kw)
    lone = diag[0]  # [H, N]
    # a lone token returns its own value
    assert max_abs_err(out[0][lone], v[0][lone]) <= EXACT
    # a token with other candidates does not depend on its own value
    for h, i in (~lone).nonzero()[:5].tolist():
        v2 = v.clone()
        v2[0, h, i] += 100.0
        assert max_abs_err(lsh_attention(q, None, v2, **kw)[0, h, i], out[0, h, i]) <= EXACT


def test_single_token_attends_to_itself():
    q, _, v = qkv_for(True, b=2, hq=2, hkv=1, n=1, d=4)
    out, lse = lsh_attention(q, None, v, bucket_size=4, n_hashes=2, shared_qk=True, seed=0, return_lse=True)
    assert max_abs_err(out, v.expand(2, 2, 1, 4)) <= EXACT
    assert max_abs_err(lse, q.norm(dim=-1) / 2) <= EXACT  # score of (i, i): q . q / |q| * D^-0.5


def test_shared_qk_keys_are_normalised_queries():
    """shared_qk=True equals the non-shared variant run with k = q / |q| when hashes agree
    (one chunk: hashes do not matter), apart from the self rule."""
    q, _, v = qkv_for(True, b=1, hq=2, hkv=1, n=20, d=4)
    shared = lsh_attention(q, None, v, bucket_size=32, n_hashes=1, shared_qk=True, seed=0)
    assert torch.equal(shared, lsh_attention(q, q, v, bucket_size=32, n_hashes=1, shared_qk=True, seed=0))
    k = F.normalize(q, dim=-1)[:, :1]  # one kv head, as v
    qq = q[:, :1]
    mask = ~torch.eye(20, dtype=torch.bool)
    ref, _ = masked_softmax_f64(qq, k, v, mask.expand(1, 1, 20, 20))
    assert max_abs_err(shared[:, :1], ref) <= EXACT


# --------------------------------------------------------------------- quality
def clustered_queries(b, h, n, d, n_clusters, noise):
    centers = F.normalize(torch.randn(b, h, n_clusters, d, dtype=torch.float64), dim=-1)
    which = torch.randint(n_clusters, (b, h, n))
    picked = centers.gather(2, which.unsqueeze(-1).expand(-1, -1, -1, d))
    return 32.0 * (picked + noise * torch.randn(b, h, n, d, dtype=torch.float64))


def test_recovered_mass_grows_with_rounds():
    """Share of the true (shared-QK, no self) softmax mass inside the attended pairs, on
    clustered inputs, averaged over seeds: more rounds recover more."""
    b, h, n, d = 2, 2, 256, 16
    q = clustered_queries(b, h, n, d, n_clusters=16, noise=0.05)
    keys = F.normalize(q, dim=-1)
    true = (q @ keys.transpose(-1, -2) / math.sqrt(d)).masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    true = true.softmax(-1)
    mass = {}
    for n_hashes in (1, 2, 4, 8):
        per_seed = []
        for seed in range(4):
            pairs = lsh_attended_pairs(q, None, bucket_size=16, n_hashes=n_hashes, shared_qk=True, seed=seed)
            per_seed.append(float((true * pairs).sum(-1).mean()))
        mass[n_hashes] = sum(per_seed) / len(per_seed)
    assert mass[1] < mass[2] < mass[4] < mass[8], mass
    assert mass[8] > 0.85 and mass[8] > mass[1] + 0.2, mass
    # and far better than a random choice of as many pairs per row (about 32 of 255 for one round)
    assert mass[1] > 2 * (2 * 16) / n, mass


# --------------------------------------------------------------------- gradients, precision
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shared_qk", [False, True])
def test_gradcheck(shared_qk, causal):
    q, k, v = qkv_for(shared_qk, b=1, hq=2, hkv=1, n=11, d=3, dv=2, requires_grad=True)
    inputs = tuple(t for t in (q, k, v) if t is not None)

    def fn(*xs):
        qq, kk, vv = (xs[0], None, xs[1]) if shared_qk else xs
        out, lse = lsh_attention(qq, kk, vv, bucket_size=4, n_hashes=2, causal=causal, shared_qk=shared_qk,
                                 seed=1, return_lse=True)
        return out, torch.where(torch.isfinite(lse), lse, 0.0)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shared_qk", [False, True])
def test_low_precision(dtype, shared_qk):
    """Half inputs: finite, the same hashes as float32 on the same values, and errors within the
    FlashAttention rule (2x the reference's own error in that precision; 3x for gradients)."""
    q, k, v = qkv_for(shared_qk, b=1, hq=4, hkv=2, n=113, d=16, dtype=dtype)
    kw = dict(bucket_size=16, n_hashes=3, causal=True, shared_qk=shared_qk, seed=2)
    dout = torch.randn(1, 4, 113, 16, dtype=torch.float64)
    lse_w = torch.randn(1, 4, 113, dtype=torch.float64)
    out, lse, grads = loss_and_grads(lsh_attention, q, k, v, dout.to(dtype), lse_w, **kw)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    q64, k64, v64 = (t.double() if t is not None else None for t in (q, k, v))
    ref64, ref_lse64, ref_grads64 = loss_and_grads(lsh_attention_naive, q64, k64, v64, dout, lse_w, **kw)
    ref_lo, _, ref_grads_lo = loss_and_grads(lsh_attention_naive, q, k, v, dout.to(dtype), lse_w, **kw)
    assert_low_precision_close(out, ref_lo, ref64, what="out")
    assert_same_lse(lse, ref_lse64, tol=1e-4)  # same hashes: lse is float32
    for name, g, lo, g64 in zip("qkv", grads, ref_grads_lo, ref_grads64):
        assert g.dtype == dtype
        assert_low_precision_close(g, lo, g64, factor=3.0, what=f"d{name}")
    # and close to the float32 run on the same values
    out32 = lsh_attention(*(t.float() if t is not None else None for t in (q, k, v)), **kw)
    assert max_abs_err(out, out32) <= (1e-2 if dtype == torch.float16 else 5e-2)


@pytest.mark.slow
def test_long_sequence_memory_is_not_quadratic():
    """N = 65536 would need 16 GiB for one float32 N x N score matrix per head; the chunked
    path needs O(N * bucket_size * n_hashes)."""
    n = 65536
    q, _, v = qkv_for(True, b=1, hq=1, hkv=1, n=n, d=16, dtype=torch.float32)
    out = lsh_attention(q, None, v, bucket_size=64, n_hashes=2, causal=True, shared_qk=True, seed=0)
    assert out.shape == (1, 1, n, 16) and torch.isfinite(out).all()


# --------------------------------------------------------------------- errors
def small():
    return make_qkv(1, 2, 16, 8)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(bucket_size=0), ValueError, "bucket_size must be >= 1, got 0"),
    (dict(bucket_size=2.0), TypeError, "bucket_size must be an int"),
    (dict(n_hashes=0), ValueError, "n_hashes must be >= 1, got 0"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(scale=-1.0), ValueError, "scale must be a positive finite float"),
    (dict(seed=-3), ValueError, "seed must be >= 0, got -3"),
    (dict(seed=1, generator=torch.Generator()), ValueError, "either generator or seed"),
    (dict(generator=3), TypeError, "generator must be a torch.Generator"),
])
def test_bad_arguments(kwargs, exc, match):
    q, k, v = small()
    with pytest.raises(exc, match=match):
        lsh_attention(q, k, v, **kwargs)


def test_bad_tensors():
    q, k, v = small()
    with pytest.raises(ValueError, match="shared_qk=True derives the keys from q"):
        lsh_attention(q, k, v, shared_qk=True)
    with pytest.raises(ValueError, match="k is None but shared_qk=False"):
        lsh_attention(q, None, v)
    with pytest.raises(ValueError, match=r"q heads \(2\) must be a multiple of k/v heads \(3\)"):
        lsh_attention(q, *make_qkv(1, 3, 16, 8)[1:])
    with pytest.raises(ValueError, match="same length"):
        lsh_attention(q, k[:, :, :8], v[:, :, :8])
    with pytest.raises(ValueError, match=r"q must have 4 dims.*\(2, 16, 8\)"):
        lsh_attention(q[0], k, v)
    with pytest.raises(TypeError, match="share a dtype"):
        lsh_attention(q, k.double(), v)
    with pytest.raises(ValueError, match=r"q and k head dims differ"):
        lsh_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="shared_qk=True derives the keys from q"):
        lsh_attended_pairs(q, k, shared_qk=True)


def test_hash_is_float32_under_autocast():
    """lsh_hash promises float32 buckets whatever the caller's precision: under bf16 autocast
    the rotation matmul must not be rounded (it moved ~0.5% of the buckets before)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 500, 64)
    rotations = random_rotations(64, 16, 2, generator=torch.Generator().manual_seed(1))
    expected = lsh_hash(x, 16, 2, rotations=rotations)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lsh_hash(x, 16, 2, rotations=rotations)
    assert torch.equal(got, expected)


# --------------------------------------------------------------------- padded batches
PAD_N = 40
PAD_LENGTHS = [40, 1, 23, 9]  # very different lengths (10, 1, 6 and 3 chunks at bucket_size 4)


PAD_CASES = [  # (bucket_size, n_hashes)
    (4, 3),  # every row its own chunk count, one row of a single chunk
    (8, 2),
    (64, 2),  # bucket_size > N: one chunk for every row
    (1, 2),  # chunks of one token
]


@pytest.mark.parametrize("shared_qk", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("side", ["left", "right", "holes"])
@pytest.mark.parametrize("bucket_size,n_hashes", PAD_CASES)
def test_padded_chunked_equals_naive(bucket_size, n_hashes, side, causal, shared_qk):
    q, k, v = qkv_for(shared_qk, b=4, hq=4, hkv=2, n=PAD_N, d=8, dv=5)
    mask = padding_mask_for(side, PAD_LENGTHS, PAD_N)
    kw = dict(bucket_size=bucket_size, n_hashes=n_hashes, causal=causal, shared_qk=shared_qk, seed=7,
              key_padding_mask=mask)
    dout = torch.randn(4, 4, PAD_N, 5, dtype=torch.float64)
    lse_w = torch.randn(4, 4, PAD_N, dtype=torch.float64)
    assert_fast_equals_naive(lsh_attention, lsh_attention_naive, q, k, v, dout, lse_w, EXACT, **kw)


@pytest.mark.parametrize("shared_qk", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("side", ["left", "right", "holes"])
@pytest.mark.parametrize("bucket_size,n_hashes", PAD_CASES)
def test_padded_rows_equal_rows_alone(bucket_size, n_hashes, side, causal, shared_qk):
    """Each row's real positions get what its real tokens give alone (its own bucket count and
    chunks, the same rotations); pad query rows are 0 with lse -inf; pads get no gradient."""
    q, k, v = qkv_for(shared_qk, b=4, hq=4, hkv=2, n=PAD_N, d=8, dv=5)
    mask = padding_mask_for(side, PAD_LENGTHS, PAD_N)
    kw = dict(bucket_size=bucket_size, n_hashes=n_hashes, causal=causal, shared_qk=shared_qk, seed=7)
    dout = torch.randn(4, 4, PAD_N, 5, dtype=torch.float64)
    lse_w = torch.randn(4, 4, PAD_N, dtype=torch.float64)
    assert_padded_equals_rows_alone(lsh_attention, q, k, v, mask, dout, lse_w, tol=EXACT, **kw)


@pytest.mark.parametrize("shared_qk", [False, True])
def test_padded_float32_matches_the_float64_reference(shared_qk):
    q, k, v = qkv_for(shared_qk, b=4, hq=4, hkv=2, n=PAD_N, d=8, dtype=torch.float32)
    mask = padding_mask_for("left", PAD_LENGTHS, PAD_N)
    kw = dict(bucket_size=4, n_hashes=3, causal=True, shared_qk=shared_qk, seed=2, key_padding_mask=mask)
    dout = torch.randn(4, 4, PAD_N, 8, dtype=torch.float64)
    lse_w = torch.randn(4, 4, PAD_N, dtype=torch.float64)
    out, lse, grads = loss_and_grads(lsh_attention, q, k, v, dout.float(), lse_w, **kw)
    q64, k64, v64 = (t.double() if t is not None else None for t in (q, k, v))  # same values: same hashes
    ref, ref_lse, ref_grads = loss_and_grads(lsh_attention_naive, q64, k64, v64, dout, lse_w, **kw)
    assert out.dtype == torch.float32
    assert_fp32_close(out, ref, what="out")
    assert_fp32_close(lse, ref_lse, what="lse")
    for name, g, rg in zip("qkv" if not shared_qk else "qv", grads, ref_grads):
        assert_fp32_close(g, rg, what=f"d{name}")


@pytest.mark.parametrize("shared_qk", [False, True])
@pytest.mark.parametrize("side", ["left", "holes"])
def test_pad_tokens_take_no_part(side, shared_qk):
    """Whatever the pads hold, the real positions' outputs and gradients do not change, and the
    pads' own gradients are 0."""
    q, k, v = qkv_for(shared_qk, b=4, hq=4, hkv=2, n=PAD_N, d=8)
    mask = padding_mask_for(side, PAD_LENGTHS, PAD_N)
    pads = ~mask[:, None, :, None]
    kw = dict(bucket_size=4, n_hashes=3, causal=False, shared_qk=shared_qk, seed=5, key_padding_mask=mask)
    dout = torch.randn(4, 4, PAD_N, 8, dtype=torch.float64)
    lse_w = torch.randn(4, 4, PAD_N, dtype=torch.float64)
    noisy = [None if t is None else torch.where(pads, 1e3 * torch.randn_like(t), t) for t in (q, k, v)]
    assert_pads_take_no_part(lsh_attention, (q, k, v), noisy, mask, dout, lse_w, **kw)


@pytest.mark.parametrize("shared_qk", [False, True])
def test_padded_pairs_hold_no_pad_token(shared_qk):
    """`lsh_attended_pairs` with a mask: no pair with a pad token, and the padded output is
    softmax over those pairs."""
    q, k, v = qkv_for(shared_qk, b=4, hq=4, hkv=2, n=PAD_N, d=6)
    mask = padding_mask_for("holes", PAD_LENGTHS, PAD_N)
    kw = dict(bucket_size=4, n_hashes=3, causal=True, shared_qk=shared_qk, seed=11, key_padding_mask=mask)
    out, lse = lsh_attention(q, k, v, return_lse=True, **kw)
    pairs = lsh_attended_pairs(q, k, **kw)
    real = mask[:, None, :]
    assert not (pairs & ~real.unsqueeze(-1)).any() and not (pairs & ~real.unsqueeze(-2)).any()
    if shared_qk:  # every real token sees something: a lone one, itself
        assert pairs.any(-1)[real.expand(4, 4, PAD_N)].all()
    keys = F.normalize(q, dim=-1) if shared_qk else k
    ref, ref_lse = masked_softmax_f64(q, keys, v, pairs)
    assert max_abs_err(out, ref) <= EXACT
    assert_same_lse(lse, ref_lse)


def test_an_all_real_mask_changes_nothing():
    q, k, v = qkv_for(False, b=2, n=37, dtype=torch.float32)
    kw = dict(bucket_size=8, n_hashes=3, causal=True, seed=4)
    everything = torch.ones(2, 37, dtype=torch.bool)
    assert torch.equal(lsh_attention(q, k, v, key_padding_mask=everything, **kw), lsh_attention(q, k, v, **kw))


def test_a_row_of_pads_returns_zero():
    q, k, v = qkv_for(False, b=2, hq=2, hkv=2, n=12, d=4, requires_grad=True)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1] = False
    out, lse = lsh_attention(q, k, v, bucket_size=4, n_hashes=2, seed=0, key_padding_mask=mask, return_lse=True)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all() and torch.isfinite(out[0]).all()
    out.sum().backward()
    assert all((t.grad[1] == 0).all() and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_padded_rows_draw_the_rotations_a_row_alone_draws():
    """With a generator (or torch's global one) each row gets the rotations its lone call would
    draw from the same state, and the generator ends where an unmasked call leaves it."""
    q, k, v = qkv_for(False, n=PAD_N, b=4, dtype=torch.float32)
    mask = padding_mask_for("right", [33, 1, 23, 9], PAD_N)  # no row of the padded length's bucket count
    kw = dict(bucket_size=4, n_hashes=2)
    gen = torch.Generator().manual_seed(9)
    start = gen.get_state()
    out = lsh_attention(q, k, v, generator=gen, key_padding_mask=mask, **kw)
    after_padded = gen.get_state()
    gen.set_state(start)
    lsh_attention(q, k, v, generator=gen, **kw)
    assert torch.equal(after_padded, gen.get_state())
    for b in range(4):
        idx = mask[b].nonzero().squeeze(1)
        gen.set_state(start)
        alone = lsh_attention(q[b:b + 1, :, idx], k[b:b + 1, :, idx], v[b:b + 1, :, idx], generator=gen, **kw)
        assert max_abs_err(out[b:b + 1, :, idx], alone) <= 1e-6
        torch.manual_seed(3)
        alone_global = lsh_attention(q[b:b + 1, :, idx], k[b:b + 1, :, idx], v[b:b + 1, :, idx], **kw)
        torch.manual_seed(3)
        padded_global = lsh_attention(q, k, v, key_padding_mask=mask, **kw)
        assert max_abs_err(padded_global[b:b + 1, :, idx], alone_global) <= 1e-6
    torch.manual_seed(3)
    lsh_attention(q, k, v, key_padding_mask=mask, **kw)
    after_global = torch.rand(3)
    torch.manual_seed(3)
    lsh_attention(q, k, v, **kw)
    assert torch.equal(after_global, torch.rand(3))


def test_padded_gradcheck():
    q, k, v = qkv_for(False, b=2, hq=2, hkv=1, n=11, d=3, dv=2, requires_grad=True)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, :4] = False
    mask[1, [2, 7, 8]] = False

    def fn(qq, kk, vv):
        out, lse = lsh_attention(qq, kk, vv, bucket_size=2, n_hashes=2, causal=True, seed=1, return_lse=True,
                                 key_padding_mask=mask)
        return out, torch.where(torch.isfinite(lse), lse, 0.0)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("mask,exc,match", BAD_KEY_PADDING_MASKS)
def test_bad_key_padding_mask(mask, exc, match):
    q, k, v = small()
    for call in (lambda: lsh_attention(q, k, v, key_padding_mask=mask),
                 lambda: lsh_attention(q, None, v, shared_qk=True, key_padding_mask=mask),
                 lambda: lsh_attention_naive(q, k, v, key_padding_mask=mask),
                 lambda: lsh_attended_pairs(q, k, key_padding_mask=mask)):
        with pytest.raises(exc, match=match):
            call()
