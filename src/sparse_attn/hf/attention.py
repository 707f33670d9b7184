"""The attention side of the transformers integration: `attention_forward`, registered with
transformers' `AttentionInterface`, runs a layer through `sparse_attention` with the per-row
information of the `RowMask` that `row_mask` built. No transformers import here."""

from __future__ import annotations

import weakref

import torch

from .. import patterns as P
from ..ops import Mechanism, attention_at_positions, sparse_attention
from ..ops.batch_rows import documents_from_cu_seqlens
from ..patterns import Pattern
from .mask import RowMask

# The attribute `enable` sets on each attention module: its schedule entry (a Pattern, a
# non-pattern Mechanism, or None = the model's own mask).
MECHANISM_ATTR = "sparse_attn_mechanism"

# id(keys a sparse_attn cache layer returned) -> (weakref to those keys, weakref to the layer): how
# the attention function finds the cache layer whose keys it was handed (transformers does not pass
# the cache to it). The layers are in hf/cache.py (they need transformers); this side does not.
_PENDING: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def register_pending(keys: torch.Tensor, layer) -> None:
    """Called by a cache layer's `update`: `keys` (returned to the model) belong to `layer`."""
    key_id = id(keys)
    _PENDING[key_id] = (weakref.ref(keys, lambda _, i=key_id: _PENDING.pop(i, None)), weakref.ref(layer))


def forget_pending(keys: torch.Tensor) -> None:
    _PENDING.pop(id(keys), None)


def pending_layer(key: torch.Tensor):
    """The cache layer whose last `update` returned `key`, or None."""
    if not _PENDING:  # no sparse_attn cache in use: no identity lookup (torch.compile would guard on it)
        return None
    entry = _PENDING.get(id(key))
    if entry is None:
        return None
    layer = entry[1]()
    if entry[0]() is not key or layer is None or layer.pending_keys() is not key:
        return None
    return layer


def _layer(module) -> str:
    return f"layer {getattr(module, 'layer_idx', '?')} ({type(module).__name__})"


def _window_band(window: int, causal: bool) -> Pattern:
    """The layer's `sliding_window` kwarg as a band: keys at distance < window (flash's reading)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding_window must be a positive int, got {window!r}")
    return P.sliding_window(window) if causal else P.sliding_window(max(2 * (window - 1), 1), causal=False)


def _own_pattern(module, mask: RowMask | None, sliding_window, is_causal) -> Pattern:
    """What the model computes for this layer without a schedule."""
    if mask is None:  # no mask reached the layer: sdpa's / flash's reading of (is_causal, sliding_window)
        causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
        base = P.causal() if causal else P.full()
        return base if sliding_window is None else _window_band(sliding_window, causal)
    if sliding_window is None or mask.pattern.band_bounds() == _window_band(sliding_window, mask.causal).band_bounds():
        return mask.pattern
    want = _window_band(sliding_window, mask.causal)
    if mask.agrees(want):  # this call cannot tell them apart (e.g. shorter than the window)
        return want
    raise ValueError(f"sliding_window={sliding_window}: {_layer(module)} asks for {want!r} but the model built "
                     f"its mask as {mask.pattern!r}; refusing to pick one")


def _check_evicted(module, mask: RowMask, pattern: Pattern) -> None:
    """A schedule on a layer whose cache dropped its head (a sliding-window cache layer) must not
    need the dropped keys: positions [0, kv_offset) of each row are gone."""
    if mask.kv_start == 0:
        return
    kv_pos = mask.kv_offset if isinstance(mask.kv_offset, torch.Tensor) else \
        torch.full_like(mask.query_position, mask.kv_offset)
    for b in range(kv_pos.numel()):
        gone, next_q = int(kv_pos[b]), int(mask.query_position[b])
        if gone and bool(pattern.reachable(torch.arange(gone), max(next_q, 0)).any()):
            raise ValueError(f"schedule: {_layer(module)} runs {pattern!r}, which still reaches keys its cache "
                             f"evicted (positions < {gone} of row {b}: a sliding-window cache layer keeps only its "
                             "window); use a schedule inside the layer's window or a cache that keeps every key")


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                      sliding_window: int | None = None, softcap: float | None = None,
                      s_aux: torch.Tensor | None = None, **kwargs):
    """transformers' attention-interface signature: q (B, Hq, Nq, D), k/v (B, Hkv, Nkv, D) ->
    (out (B, Nq, Hq, D), None). GQA runs without repeating k/v.

    * attention_mask: the `RowMask` of `row_mask`; None means no mask reached the layer (then,
      as sdpa/flash read it: causal per `is_causal` / `module.is_causal`, windowed per
      `sliding_window`, no padding). A tensor (a dense mask) is refused.
    * scaling: the score scale (Gemma's query_pre_attn_scalar**-0.5, ...); None = 1/sqrt(D).
    * sliding_window: the layer's window, checked against the mask the model built.
    * s_aux: GPT-OSS's per-head sink logits, one extra column of the softmax that takes mass and
      gives nothing: out * exp(lse) / (exp(lse) + exp(s)) = out * sigmoid(lse - s), exact.
    * softcap (Gemma2's tanh capping of the scores) and dropout > 0 in training are refused.
    The layer's schedule entry (`module.sparse_attn_mechanism`, set by `enable`) replaces its
    pattern; the mask's padding, offsets and documents still apply.
    """
    if softcap is not None:
        raise ValueError(f"softcap={softcap}: {_layer(module)} caps its scores with tanh (Gemma2's "
                         "attn_logit_softcapping), which sparse_attn's kernels do not compute; refusing rather than "
                         "computing attention without it")
    if dropout and getattr(module, "training", False):
        raise ValueError(f"dropout={dropout}: {_layer(module)} drops attention probabilities in training, which "
                         "sparse_attn does not implement; set the config's attention_dropout to 0 or call model.eval()")
    if attention_mask is not None and not isinstance(attention_mask, RowMask):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else None
        raise TypeError(f"attention_mask: {_layer(module)} got a {type(attention_mask).__name__} {shape or ''}, not "
                        "the RowMask of sparse_attn's mask function: a dense mask was built (a custom 4-D mask, or "
                        "the model was not switched with sparse_attn.hf.enable)")
    mask: RowMask | None = attention_mask
    cache_layer = pending_layer(key)
    if cache_layer is not None:  # keys of a sparse_attn cache layer (hf/cache.py): kept keys + new ones
        return _cached_forward(module, cache_layer, query, mask, scaling, s_aux, sliding_window, is_causal)
    if mask is not None and key.shape[2] != mask.kv_length:
        raise ValueError(f"attention_mask: the mask was built for {mask.kv_length} keys but {_layer(module)} got "
                         f"{key.shape[2]}")
    if mask is not None and mask.kv_used < key.shape[2]:  # unwritten static-cache slots after the last query
        key, value = key[:, :, :mask.kv_used], value[:, :, :mask.kv_used]
    _check_packed_kwargs(module, kwargs, None if mask is None else mask.document_ids, key.shape[2])
    pattern = _layer_pattern(module, mask, sliding_window, is_causal)
    if isinstance(pattern, Mechanism):
        return _mechanism_forward(module, pattern, query, key, value, mask, scaling, s_aux)
    if mask is not None and getattr(module, MECHANISM_ATTR, None) is not None:
        _check_evicted(module, mask, pattern)
    out = _pattern_forward(module, query, key, value, pattern, mask, scaling, s_aux)
    return out.transpose(1, 2).contiguous(), None


def _layer_pattern(module, mask: RowMask | None, sliding_window, is_causal) -> Pattern | Mechanism:
    """The layer's schedule entry (a Pattern or a non-pattern Mechanism), or the model's own pattern."""
    mechanism = getattr(module, MECHANISM_ATTR, None)
    if mechanism is None:
        return _own_pattern(module, mask, sliding_window, is_causal)
    if isinstance(mechanism, Pattern):
        if mask is not None and mask.causal and not mechanism.is_causal():
            raise ValueError(f"schedule: {_layer(module)} is causal but its pattern {mechanism!r} is not")
        return mechanism
    if isinstance(mechanism, Mechanism):
        return mechanism
    raise TypeError(f"{MECHANISM_ATTR} of {_layer(module)} must be a Pattern, a Mechanism or None, got "
                    f"{type(mechanism).__name__}")


def _pattern_forward(module, query, key, value, pattern: Pattern, mask: RowMask | None, scaling, s_aux):
    """`sparse_attention` over contiguous keys with the mask's per-row padding, offsets and documents."""
    per_row = {}
    if mask is not None and not mask.is_plain:
        per_row = dict(key_padding_mask=mask.key_padding_mask, kv_offset=mask.kv_offset,
                       document_ids=mask.document_ids)
        if mask.document_ids is not None:
            per_row.pop("kv_offset")
    if s_aux is None:
        return sparse_attention(query, key, value, pattern, scale=scaling, **per_row)
    out, lse = sparse_attention(query, key, value, pattern, scale=scaling, return_lse=True, **per_row)
    return _sink(module, out, lse, s_aux, query.shape[1])


def _sink(module, out: torch.Tensor, lse: torch.Tensor, s_aux: torch.Tensor, heads: int) -> torch.Tensor:
    """out * sigmoid(lse - s_h): a softmax with one extra logit s_h per head whose value is 0.
    Rows with nothing to attend to (lse = -inf) stay 0."""
    if tuple(s_aux.shape) != (heads,):
        raise ValueError(f"s_aux of {_layer(module)} must have one sink logit per query head ({heads},), got "
                         f"{tuple(s_aux.shape)}")
    keep = torch.sigmoid(lse.float() - s_aux.float()[None, :, None])  # [B, H, Nq]
    return out * keep[..., None].to(out.dtype)


def _check_packed_kwargs(module, kwargs, documents, nkv) -> None:
    """Flash-style packed kwargs (cu_seq_lens_k) must describe the documents the mask found:
    sparse_attn reads packing from the mask, and never drops a boundary it was given."""
    cu = kwargs.get("cu_seq_lens_k")
    if cu is None:
        return
    want = documents_from_cu_seqlens(cu, total=nkv).cpu()
    if documents is None or documents.shape[0] != 1 or not torch.equal(documents, want):
        raise ValueError(f"cu_seq_lens_k: {_layer(module)} was given packed-sequence boundaries {cu.tolist()} that "
                         "the mask (from position_ids) does not show; pass position_ids that restart at each "
                         "document and no attention_mask")


def _mechanism_forward(module, mechanism: Mechanism, query, key, value, mask: RowMask | None, scaling, s_aux):
    """A non-pattern mechanism (linear, performer, topk, ...): position-free or index-causal, so
    of the per-row information only key padding applies (pad keys out, as each row alone)."""
    params = mechanism.info.parameters()
    kw = {}
    if mask is not None and not mask.is_plain:
        if "key_padding_mask" not in params or mask.document_ids is not None or mask.kv_start != 0:
            raise ValueError(f"schedule: {_layer(module)} runs {mechanism}, which takes no per-row padding, packing "
                             "or evicted-cache offsets (linear, performer, topk, block_topk, lsh and routing take key "
                             "padding; no non-pattern mechanism takes packed documents or an evicted cache head)")
        kw["key_padding_mask"] = mask.key_padding_mask
    if scaling is not None and "scale" in params:
        kw["scale"] = scaling  # linear attention has no score scale: its feature map replaces the softmax
    if s_aux is not None:
        if "return_lse" not in params:
            raise ValueError(f"s_aux: {_layer(module)} has sink logits, which need the log-sum-exp that "
                             f"{mechanism.name} does not give")
        out, lse = mechanism(query, key, value, return_lse=True, **kw)
        out = _sink(module, out, lse, s_aux, query.shape[1])
    else:
        out = mechanism(query, key, value, **kw)
    return out.transpose(1, 2).contiguous(), None


def _reachable_per_row(pattern: Pattern, positions: torch.Tensor, next_q: torch.Tensor) -> torch.Tensor:
    """pattern.reachable for row b's key positions [B, L] with its next query at next_q[b]."""
    out = torch.empty_like(positions, dtype=torch.bool)
    for value in torch.unique(next_q).tolist():
        rows = next_q == value
        out[rows] = pattern.reachable(positions[rows], int(value))
    return out


def _cached_forward(module, layer, query, mask: RowMask | None, scaling, s_aux, sliding_window, is_causal):
    """Attention over a sparse_attn cache layer's kept keys plus the new ones, then its eviction.

    The mask describes the whole logical sequence (the layer reports it so); the layer says which
    token each key is. Positions count from each row's first real token, as everywhere."""
    keys, values, indices, q_start = layer.pending()
    n = query.shape[2]
    total = q_start + n
    where = f"{_layer(module)} with a {type(layer).__name__}"
    if mask is not None and (mask.kv_length != total or mask.kv_start != 0):
        raise ValueError(f"attention_mask: {where} expects a mask over all {total} tokens seen, got kv_length="
                         f"{mask.kv_length}, kv_offset={mask.kv_start} (every layer of the cache must be a sparse_attn "
                         "cache layer: use sparse_attn.hf.cache_for(model))")
    if mask is not None and mask.document_ids is not None:
        raise ValueError(f"position_ids: {where} got packed sequences (position_ids restart); generate one "
                         "sequence per row")
    pattern = _layer_pattern(module, mask, sliding_window, is_causal)
    if not isinstance(pattern, Pattern):
        raise ValueError(f"schedule: {where} runs {pattern}, which is not a pattern: the cache keeps the keys a "
                         "pattern can still reach; use transformers' DynamicCache for this layer")
    if not pattern.is_causal():
        raise ValueError(f"{where}: its pattern {pattern!r} is not causal; a decoding cache serves causal layers")

    # bookkeeping on the host (token indices, padding, positions, what to keep): the device sees
    # one mask upload and, when a key is dropped, one gather; no syncs
    bsz = keys.shape[0]
    real = None if mask is None else mask.real
    if real is not None and real.shape[1] < total:
        raise ValueError(f"attention_mask: {where} needs a 2-D mask over all {total} tokens, got {tuple(real.shape)}")
    first_real = torch.zeros(bsz, dtype=torch.long) if mask is None else mask.first_real
    valid = indices >= 0
    if real is not None:
        valid &= real.gather(1, indices.clamp(min=0))
    key_pos = indices - first_real[:, None]  # [B, L]
    query_pos = torch.arange(q_start, total)[None, :] - first_real[:, None]  # [B, n]

    if n > 1 and layer.holds_every_token():  # a prefill, nothing dropped: the sparse path with the mask
        out = _pattern_forward(module, query, keys, values, pattern, mask, scaling, s_aux)
    else:  # a decoding step (one query, all its keys), or keys with gaps: the pattern at their positions
        res = attention_at_positions(query, keys, values, pattern, query_pos, key_pos, key_valid=valid,
                                     scale=scaling, return_lse=s_aux is not None)
        out = _sink(module, *res, s_aux, query.shape[1]) if s_aux is not None else res

    next_q = query_pos[:, -1] + 1 if n else torch.full_like(first_real, q_start) - first_real
    rule = layer.keep_rule(pattern)
    keep = valid & _reachable_per_row(rule, key_pos, next_q)
    if rule is not pattern:
        lost = valid & ~keep & _reachable_per_row(pattern, key_pos, next_q)
        if bool(lost.any()):
            b, j = lost.nonzero()[0].tolist()
            raise ValueError(f"schedule: {where} keeps {rule!r}, but the layer's pattern {pattern!r} still reaches "
                             f"keys it would drop (row {b}, position {int(key_pos[b, j])}); switch the layer to "
                             f"that pattern (sparse_attn.hf.enable(model, schedule)) or use PatternCacheLayer")
    layer.commit(keep)
    return out.transpose(1, 2).contiguous(), None
