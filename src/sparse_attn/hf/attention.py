"""The attention side of the transformers integration: `attention_forward`, registered with
transformers' `AttentionInterface`, runs a layer through `sparse_attention` with the per-row
information of the `RowMask` that `row_mask` built. No transformers import here."""

from __future__ import annotations

import torch

from .. import patterns as P
from ..ops import Mechanism, sparse_attention
from ..ops.batch_rows import documents_from_cu_seqlens
from ..patterns import Pattern
from .mask import RowMask

# The attribute `enable` sets on each attention module: its schedule entry (a Pattern, a
# non-pattern Mechanism, or None = the model's own mask).
MECHANISM_ATTR = "sparse_attn_mechanism"
# Non-pattern mechanisms that pick keys from later positions even with causal=True (README).
LEAKY = ("lsh", "routing", "block_topk")


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
    if mask is not None and key.shape[2] != mask.kv_length:
        raise ValueError(f"attention_mask: the mask was built for {mask.kv_length} keys but {_layer(module)} got "
                         f"{key.shape[2]}")
    if mask is not None and mask.kv_used < key.shape[2]:  # unwritten static-cache slots after the last query
        key, value = key[:, :, :mask.kv_used], value[:, :, :mask.kv_used]
    documents = None if mask is None else mask.document_ids
    _check_packed_kwargs(module, kwargs, documents, key.shape[2])

    mechanism = getattr(module, MECHANISM_ATTR, None)
    if mechanism is None:
        pattern = _own_pattern(module, mask, sliding_window, is_causal)
    elif isinstance(mechanism, Pattern):
        pattern = mechanism
        if mask is not None:
            if mask.causal and not pattern.is_causal():
                raise ValueError(f"schedule: {_layer(module)} is causal but its pattern {pattern!r} is not")
            _check_evicted(module, mask, pattern)
    elif isinstance(mechanism, Mechanism):
        return _mechanism_forward(module, mechanism, query, key, value, mask, scaling, s_aux)
    else:
        raise TypeError(f"{MECHANISM_ATTR} of {_layer(module)} must be a Pattern, a Mechanism or None, got "
                        f"{type(mechanism).__name__}")

    per_row = {}
    if mask is not None and not mask.is_plain:
        per_row = dict(key_padding_mask=mask.key_padding_mask, kv_offset=mask.kv_offset, document_ids=documents)
        if documents is not None:
            per_row.pop("kv_offset")
    want_lse = s_aux is not None
    res = sparse_attention(query, key, value, pattern, scale=scaling, return_lse=want_lse, **per_row)
    out = _sink(module, *res, s_aux, query.shape[1]) if want_lse else res
    return out.transpose(1, 2).contiguous(), None


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
    """A non-pattern mechanism (linear, performer, topk, ...): one geometry for the whole batch."""
    if mask is not None and not mask.is_plain:
        raise ValueError(f"schedule: {_layer(module)} runs {mechanism}, which takes no per-row padding, packing or "
                         "evicted-cache offsets (only pattern mechanisms do); run it on unpadded batches (equal "
                         "lengths, no attention_mask padding) without a sliding-window cache")
    params = mechanism.info.parameters()
    kw = {}
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
