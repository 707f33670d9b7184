"""KV caches: step-by-step decoding (and chunked prefill + decoding) equals one full forward
with the same pattern; window and sink caches keep constant memory."""

import pytest
import torch

from sparse_attn import patterns as P
from sparse_attn.nn import FullCache, LinearStateCache, PatternCache, SinkCache, SparseAttention, WindowCache


def decode(layer, x, cache, chunks):
    """Feed x (B, N, dim) through the layer in pieces of the given sizes, with one cache."""
    outs, start = [], 0
    for size in chunks:
        outs.append(layer(x[:, start:start + size], cache=cache))
        start += size
    assert start == x.shape[1]
    return torch.cat(outs, dim=1)


def make(mechanism, **kw):
    torch.manual_seed(0)
    return SparseAttention(32, 4, 2, mechanism, **kw).double().eval()


@pytest.mark.parametrize("mechanism", ["causal", P.sliding_window(8), P.streaming(2, 8), P.dilated(4, 2),
                                       P.longformer(8, 2, causal=True), "topk:top_k=5,causal=true",
                                       "linear:causal=true"])
def test_full_cache_decoding_equals_the_full_forward(mechanism):
    """(Not block_topk: its selection scores the mean of a query block, which a decoding step
    sees one token of, so decoding selects differently from a full forward by design.)"""
    layer = make(mechanism)
    x = torch.randn(2, 60, 32, dtype=torch.float64)
    full = layer(x)
    torch.testing.assert_close(decode(layer, x, FullCache(), [1] * 60), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(decode(layer, x, FullCache(), [17, 1, 1, 5, 36]), full, rtol=1e-10, atol=1e-10)


def test_window_cache_is_exact_for_windows_and_keeps_constant_memory():
    layer = make(P.sliding_window(8))
    x = torch.randn(1, 300, 32, dtype=torch.float64)
    full = layer(x)
    cache = WindowCache(8)
    outs, sizes = [], []
    for t in range(300):
        outs.append(layer(x[:, t:t + 1], cache=cache))
        sizes.append(cache.memory_bytes())
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    assert len(set(sizes[8:])) == 1 and sizes[-1] == 2 * 1 * 2 * 8 * 8 * 8  # k and v: [1, 2, 8, 8] float64
    # chunked prefill bigger than the window, then decoding
    torch.testing.assert_close(decode(layer, x, WindowCache(8), [50, 1, 3, 246]), full, rtol=1e-10, atol=1e-10)
    # a dilated window reaching back 6 positions fits a cache of 7
    dil = make(P.dilated(4, 2))
    torch.testing.assert_close(decode(dil, x[:, :40], WindowCache(7), [1] * 40), dil(x[:, :40]), rtol=1e-10,
                               atol=1e-10)


def test_sink_cache_equals_streaming_until_eviction_then_stays_flat():
    layer = make(P.streaming(2, 8))
    x = torch.randn(1, 200, 32, dtype=torch.float64)
    full = layer(x)
    cache = SinkCache(2, 8)
    outs, sizes = [], []
    for t in range(200):
        outs.append(layer(x[:, t:t + 1], cache=cache))
        sizes.append(cache.memory_bytes())
    out = torch.cat(outs, 1)
    # before any token leaves the cache, positions inside it are the absolute ones: exact
    torch.testing.assert_close(out[:, :11], full[:, :11], rtol=1e-10, atol=1e-10)
    assert len(set(sizes[12:])) == 1  # sinks + ring: constant
    assert torch.isfinite(out).all()
    # without rotary embeddings re-indexing changes nothing: exact all the way
    plain = make(P.streaming(2, 8), rope=False)
    torch.testing.assert_close(decode(plain, x, SinkCache(2, 8), [1] * 200), plain(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(decode(plain, x, SinkCache(2, 8), [5, 30, 1, 164]), plain(x), rtol=1e-10, atol=1e-10)


def test_sink_cache_rotates_by_position_inside_the_cache():
    """After eviction a query at cache position L-1 scores a key at cache position j with angle
    differences (L-1-j), as StreamingLLM does: equal to a full forward over the kept tokens."""
    layer = make(P.streaming(2, 8))
    x = torch.randn(1, 40, 32, dtype=torch.float64)
    cache = SinkCache(2, 8)
    for t in range(39):
        layer(x[:, t:t + 1], cache=cache)
    last = layer(x[:, 39:40], cache=cache)
    kept = torch.cat([x[:, :2], x[:, 31:40]], dim=1)  # 2 sinks + the 9 newest (the pattern uses the last 8)
    torch.testing.assert_close(last, layer(kept)[:, -1:], rtol=1e-10, atol=1e-10)


def test_linear_state_cache_is_exact_in_constant_memory():
    layer = make("linear:causal=true,feature_map=relu")
    x = torch.randn(2, 150, 32, dtype=torch.float64)
    full = layer(x)
    cache = LinearStateCache()
    torch.testing.assert_close(decode(layer, x[:, :10], cache, [1] * 10), full[:, :10], rtol=1e-10, atol=1e-10)
    size = cache.memory_bytes()
    torch.testing.assert_close(decode(layer, x[:, 10:], cache, [37, 1, 1, 101]), full[:, 10:], rtol=1e-10,
                               atol=1e-10)
    assert cache.memory_bytes() == size == 8 * (2 * 2 * 8 * 8 + 2 * 2 * 8)  # S [2, 2, 8, 8] + z [2, 2, 8], float64


@pytest.mark.parametrize("cache, mechanism, message", [
    (LinearStateCache(), "linear", "must run with causal=true"),
    (LinearStateCache(), "causal", "causal linear attention"),
    (WindowCache(8), "causal", "decodes a causal sliding window of at most 8 keys"),
    (WindowCache(4), P.sliding_window(8), "at most 4 keys"),
    (WindowCache(8), P.sliding_window(8, causal=False), "lets queries see later keys"),
    (SinkCache(2, 8), P.sliding_window(8), r"decodes patterns.streaming\(2, 8\)"),
    (WindowCache(8), "linear:causal=true", "has no fixed pattern"),
    (FullCache(), "lsh:causal=true,bucket_size=4,seed=0", "decided from later positions too.*no cache decodes it"),
    (FullCache(), "routing:causal=true,num_clusters=2,window=2", "decided from later positions too"),
    (PatternCache(), "block_topk:causal=true,top_k_blocks=1,block_size=2", "decided from later positions too"),
])
def test_cache_refuses_patterns_it_cannot_serve(cache, mechanism, message):
    layer = make(mechanism)
    with pytest.raises((ValueError, TypeError), match=message):
        layer(torch.randn(1, 3, 32, dtype=torch.float64), cache=cache)
        layer(torch.randn(1, 1, 32, dtype=torch.float64), cache=cache)  # LSH: 1 query, 4 keys


def test_positions_and_cache_exclude_each_other():
    layer = make("causal")
    with pytest.raises(ValueError, match="exclude each other"):
        layer(torch.randn(1, 3, 32, dtype=torch.float64), positions=torch.arange(3), cache=FullCache())


# -------------------------------------------------------------------------- PatternCache
@pytest.mark.parametrize("pattern, kept", [
    (P.longformer(8, 2, causal=True), 2 + 7),  # 2 globals + the window
    (P.streaming(3, 8), 3 + 7),
    (P.dilated(4, 3), 9),  # keys up to 9 back that a future query can still reach
    (P.sliding_window(6) | P.dilated(5, 4), 16),
])
def test_pattern_cache_is_exact_and_keeps_only_reachable_keys(pattern, kept):
    layer = make(pattern)
    x = torch.randn(2, 150, 32, dtype=torch.float64)
    full = layer(x)
    cache = PatternCache()
    torch.testing.assert_close(decode(layer, x, cache, [1] * 150), full, rtol=1e-10, atol=1e-10)
    assert cache.k.shape[2] == kept
    torch.testing.assert_close(decode(layer, x, PatternCache(), [40, 1, 9, 100]), full, rtol=1e-10, atol=1e-10)


def test_pattern_cache_per_head_patterns():
    layer = make(P.per_head([P.sliding_window(4), P.sliding_window(9), P.streaming(2, 3), P.causal()]))
    x = torch.randn(1, 60, 32, dtype=torch.float64)
    torch.testing.assert_close(decode(layer, x, PatternCache(), [1] * 60), layer(x), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------- one cache, one layer, one batch
# each cache with a mechanism it decodes
CACHES = [(FullCache, "causal"), (lambda: WindowCache(8), P.sliding_window(8)),
          (lambda: SinkCache(2, 8), P.streaming(2, 8)), (PatternCache, P.longformer(8, 2, causal=True)),
          (LinearStateCache, "linear:causal=true")]


@pytest.mark.parametrize("new_cache, mechanism", CACHES)
def test_a_cache_belongs_to_the_first_layer_that_uses_it(new_cache, mechanism):
    """Shared by two layers a cache would mix their keys (and count each token twice)."""
    first, second = make(mechanism), SparseAttention(32, 4, 2, mechanism).double().eval()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    cache = new_cache()
    first(x, cache=cache)
    with pytest.raises(ValueError, match="already used by another layer.*one cache per layer"):
        second(x, cache=cache)
    assert cache.position == 5
    torch.testing.assert_close(first(x[:, :1], cache=cache)[0], first(torch.cat([x, x[:, :1]], 1))[:, -1:][0],
                               rtol=1e-10, atol=1e-10)  # still usable by its own layer


@pytest.mark.parametrize("new_cache, mechanism", CACHES)
def test_a_cache_refuses_another_batch_dtype_device_or_head_shape(new_cache, mechanism):
    layer = make(mechanism)
    cache = new_cache()
    layer(torch.randn(2, 5, 32, dtype=torch.float64), cache=cache)
    with pytest.raises(ValueError, match="batch 2.*this call has batch 1"):
        layer(torch.randn(1, 1, 32, dtype=torch.float64), cache=cache)
    with pytest.raises(ValueError, match="dtype torch.float64.*this call has dtype torch.float32"):
        layer.float()(torch.randn(2, 1, 32), cache=cache)
    layer.double()
    q, k = torch.randn(2, 4, 1, 8, dtype=torch.float64), torch.randn(2, 2, 1, 8, dtype=torch.float64)  # called directly
    with pytest.raises(ValueError, match="device cpu.*this call has device meta"):
        cache.attend(q.to("meta"), k.to("meta"), k.to("meta"), layer)
    with pytest.raises(ValueError, match="kv heads 2.*this call has kv heads 4"):
        cache.attend(q, q, q, layer)
    assert cache.position == 5
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        layer(torch.randn(2, 1, 32, dtype=torch.float64), cache="full")


@pytest.mark.parametrize("new_cache, mechanism, message", [
    (FullCache, "sliding_window:window=8,causal=false", "lets queries see later keys"),
    (PatternCache, "sliding_window:window=8,causal=false", "lets queries see later keys"),
    (PatternCache, P.longformer(8, 2), "lets queries see later keys"),
    (FullCache, "topk:top_k=4", "must run with causal=true"),
    (FullCache, "performer:num_features=16", "must run with causal=true"),
])
def test_a_layer_that_sees_later_keys_refuses_a_cache(new_cache, mechanism, message):
    """Decoding one token at a time cannot show a query its later keys: the cached result would
    silently differ from the layer's forward (by 0.75 for a non-causal window of 8)."""
    layer = make(mechanism)
    cache = new_cache()
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(1, 3, 32, dtype=torch.float64), cache=cache)
    assert cache.position == 0
