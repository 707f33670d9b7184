"""transformers integration: any decoder that routes attention through transformers'
`AttentionInterface` (Llama, Mistral, Qwen2, Gemma3, GPT-OSS, ...) runs on sparse_attn.

    import sparse_attn.hf
    sparse_attn.hf.enable(model)                                   # exactly the model's own attention
    sparse_attn.hf.enable(model, "streaming:sinks=4,window=1020")  # or a schedule (one, or one per layer)
    sparse_attn.hf.disable(model)

Two functions registered under one name ("sparse_attn"): `row_mask` (the mask interface:
returns a small `RowMask` of per-row padding, offsets and packed documents, never a dense mask)
and `attention_forward` (the attention interface: runs `sparse_attention` with it). transformers
is imported only by `enable` / `disable` / `register` and the cache layers (the `hf` extra).

Caches for `generate()` (hf/cache.py, imported on first use): `cache_for(model)` gives one
`PatternCacheLayer` per layer (the keys the layer's pattern can still reach), or
`SinkWindowLayer`s with `sinks_window=(sinks, window)`:

    model.generate(ids, past_key_values=sparse_attn.hf.cache_for(model), max_new_tokens=256)
"""

from .attention import MECHANISM_ATTR, attention_forward
from .mask import NAME, RowMask, row_mask
from .switch import attention_layers, disable, enable, register, schedule_of

_CACHE_NAMES = ("PatternCacheLayer", "SinkWindowLayer", "SparseCache", "cache_for")


def __getattr__(name):  # the cache layers subclass transformers' CacheLayerMixin: imported on first use
    if name in _CACHE_NAMES:
        from . import cache
        return getattr(cache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_CACHE_NAMES, "enable", "disable", "register", "schedule_of", "attention_layers", "NAME", "RowMask", "row_mask",
           "attention_forward", "MECHANISM_ATTR"]
