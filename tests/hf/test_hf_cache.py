"""sparse_attn.hf's cache layers for generate(): a cached generate equals recomputing every step
without a cache (same pattern), and memory stays at what the pattern can still reach."""

import warnings

import pytest

pytest.importorskip("transformers.masking_utils")

import torch  # noqa: E402
from tiny_hf import BUILDERS, WINDOW, assert_close, build, left_padded  # noqa: E402

import sparse_attn.hf as H  # noqa: E402
from sparse_attn import patterns as P  # noqa: E402

GREEDY = dict(do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)


def _generate(model, ids, mask, cache=None, **kw):
    with warnings.catch_warnings():  # transformers 5.2x renames past_key_values to cache; 5.17 has only the former
        warnings.simplefilter("ignore", FutureWarning)
        extra = {} if cache is None else dict(past_key_values=cache)
        return model.generate(input_ids=ids, attention_mask=mask, **extra, **GREEDY, **kw)


def _assert_same_generation(out, ref):
    assert torch.equal(out.sequences, ref.sequences)
    for step, (a, e) in enumerate(zip(out.logits, ref.logits)):
        assert_close(a, e, what=f"logits of generated token {step}")


class _KeysSeen:
    """Records how many keys each cache layer hands to the attention at every step."""

    def __init__(self, cache):
        self.widest = [0] * len(cache.layers)
        for i, layer in enumerate(cache.layers):
            update = layer.update

            def counted(k, v, *args, _i=i, _update=update, **kwargs):
                keys, values = _update(k, v, *args, **kwargs)
                if k.shape[2] == 1:  # decoding steps (the prefill holds the whole prompt once)
                    self.widest[_i] = max(self.widest[_i], keys.shape[2])
                return keys, values

            layer.update = counted


@pytest.mark.parametrize("name", list(BUILDERS))
def test_pattern_cache_without_a_schedule_equals_the_models_own_generate(name):
    """Each layer keeps what its own mask reaches: sliding layers their window, full layers every real key."""
    model = build(name)
    ids, mask = left_padded([9, 3, 6], seed=2)
    ref = _generate(model, ids, mask, max_new_tokens=3 * WINDOW)
    H.enable(model)
    cache = H.cache_for(model)
    _assert_same_generation(_generate(model, ids, mask, cache, max_new_tokens=3 * WINDOW), ref)
    types = getattr(model.config, "layer_types", None)
    sliding = [t == "sliding_attention" for t in types] if types else \
        [getattr(model.config, "sliding_window", None) is not None] * model.config.num_hidden_layers  # Llama: none, Mistral: all
    seen = 9 + 3 * WINDOW - 1
    for i, layer in enumerate(cache.layers):
        assert layer.get_seq_length() == seen
        assert layer.kept_keys() == (WINDOW - 1 if sliding[i] else seen)  # the longest row has no padding


@pytest.mark.parametrize("name", ["llama", "gpt_oss"])
def test_streaming_llama_keeps_sinks_plus_window_and_equals_a_recompute(name):
    """The issue's case: streaming(4, 64); a cached generate holds at most sinks + window keys per
    layer at every step and equals recomputing every step without a cache under the same pattern."""
    sinks, window = 4, 64
    model = build(name)
    H.enable(model, P.streaming(sinks, window))
    ids, mask = left_padded([40, 7, 23], seed=4)
    new = 100  # 140 tokens: far past sinks + window
    ref = _generate(model, ids, mask, use_cache=False, max_new_tokens=new)
    for cache in (H.cache_for(model, sinks_window=(sinks, window)), H.cache_for(model)):
        seen = _KeysSeen(cache)
        _assert_same_generation(_generate(model, ids, mask, cache, max_new_tokens=new), ref)
        assert max(seen.widest) == sinks + window
        assert all(layer.kept_keys() == sinks + window - 1 for layer in cache.layers)


@pytest.mark.parametrize("pattern, kind", [(P.sliding_window(7), slice), (P.streaming(2, 6), torch.Tensor)],
                         ids=["window", "sinks_window"])
def test_one_row_evicts_by_views_or_one_index_select_and_equals_a_recompute(pattern, kind, monkeypatch):
    """At batch 1 every eviction keeps one set of columns: a window keeps one run of keys (views of
    the cache, no copy), sinks + window two runs (one index_select); both equal a recompute."""
    from sparse_attn.hf import cache as cache_module

    taken = []
    real = cache_module._common_columns
    monkeypatch.setattr(cache_module, "_common_columns", lambda keep: taken.append(real(keep)) or taken[-1])
    model = build("qwen2")
    H.enable(model, pattern)
    ids, mask = left_padded([11], seed=3)
    ref = _generate(model, ids, mask, use_cache=False, max_new_tokens=14)
    cache = H.cache_for(model)
    _assert_same_generation(_generate(model, ids, mask, cache, max_new_tokens=14), ref)
    assert taken and all(isinstance(columns, kind) for columns in taken)
    assert cache.layers[0].kept_keys() == int(pattern.reachable(torch.arange(24), 24).sum())


def test_common_columns():
    from sparse_attn.hf.cache import _common_columns

    keep = torch.tensor([[False, True, True, False], [False, True, True, False]])
    assert _common_columns(keep) == slice(1, 3)
    assert _common_columns(keep[:1]) == slice(1, 3)
    assert _common_columns(torch.tensor([[True, False, True]])).tolist() == [0, 2]
    assert _common_columns(torch.tensor([[True, False], [False, True]])) is None  # rows differ
    assert _common_columns(torch.tensor([[False, False]])) is None  # nothing kept


@pytest.mark.parametrize("pattern", [P.longformer(5, 3, causal=True), P.dilated(4, 2), P.sliding_window(7),
                                     P.streaming(2, 3) | P.dilated(3, 4), P.causal()],
                         ids=["longformer", "dilated", "window", "sinks_or_dilated", "causal"])
def test_pattern_cache_with_a_schedule_equals_a_recompute(pattern):
    model = build("qwen2")
    H.enable(model, pattern)
    ids, mask = left_padded([12, 4, 9], seed=6)
    ref = _generate(model, ids, mask, use_cache=False, max_new_tokens=16)
    cache = H.cache_for(model)
    _assert_same_generation(_generate(model, ids, mask, cache, max_new_tokens=16), ref)
    # what is kept is exactly what the pattern can still reach from the next query (longest row: no padding)
    positions = torch.arange(cache.layers[0].get_seq_length())
    reach = int(pattern.reachable(positions, len(positions)).sum())
    assert cache.layers[0].kept_keys() == reach


def test_chunked_prefill_and_beam_search_with_the_pattern_cache():
    model = build("mistral")
    H.enable(model, P.streaming(2, 5))
    ids, mask = left_padded([17, 3, 11], seed=5)
    ref = _generate(model, ids, mask, use_cache=False, max_new_tokens=12)
    _assert_same_generation(_generate(model, ids, mask, H.cache_for(model, (2, 5)), max_new_tokens=12,
                                      prefill_chunk_size=4), ref)
    beams = dict(max_new_tokens=8, num_beams=3, output_logits=False, return_dict_in_generate=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        want = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, do_sample=False, pad_token_id=0,
                              **beams)
        got = model.generate(input_ids=ids, attention_mask=mask, past_key_values=H.cache_for(model), do_sample=False,
                             pad_token_id=0, **beams)
    assert torch.equal(got, want)


def test_a_non_pattern_layer_keeps_every_key_beside_pattern_layers():
    model = build("llama")
    H.enable(model, ["linear:causal=true", P.streaming(2, 4)])
    ids = left_padded([10], seed=8)[0]
    ref = _generate(model, ids, None, use_cache=False, max_new_tokens=8)
    cache = H.cache_for(model)
    _assert_same_generation(_generate(model, ids, None, cache, max_new_tokens=8), ref)
    assert cache.kept_keys() == [None, 2 + 4 - 1]
    assert cache.layers[0].get_seq_length() == 17
    with pytest.raises(ValueError, match="not a pattern"):  # a pattern layer under a non-pattern mechanism
        _generate(model, ids, None, H.SparseCache([H.PatternCacheLayer(), H.PatternCacheLayer()]), max_new_tokens=2)


def test_cache_layers_refuse_what_they_cannot_serve():
    ids, mask = left_padded([12, 5], seed=7)
    # a sinks + window cache under a layer that reads every key: refused at the first eviction
    model = build("llama")
    H.enable(model)
    with pytest.raises(ValueError, match="still reaches keys it would drop"):
        _generate(model, ids, mask, H.cache_for(model, (2, 4)), max_new_tokens=4)
    # the model not switched: its attention never reads the kept keys' positions
    plain = build("llama")  # transformers' eager attention
    with pytest.raises(RuntimeError, match="not read by sparse_attn's attention"):
        _generate(plain, ids, mask, H.cache_for(model), max_new_tokens=3)
    with pytest.raises(ValueError, match="not switched to sparse_attn"):
        H.cache_for(plain)
    with pytest.raises(TypeError, match="sinks_window"):
        H.cache_for(model, [2, 4])
    with pytest.raises(ValueError, match="window must be >= 1"):
        H.SinkWindowLayer(2, 0)
