"""The mask side of the transformers integration: `row_mask`, registered with transformers'
`AttentionMaskInterface`, returns a `RowMask` (a few per-row tensors) where "sdpa" and "eager"
build a dense (B, 1, Nq, Nkv) mask. No transformers import here: transformers only calls in.

What transformers hands a mask function is a predicate (`mask_function(b, h, q_idx, kv_idx)`,
composed from causal / sliding-window / packed-sequence / overlay pieces) plus the 2-D padding
mask and the cache geometry. The predicate is a closure whose shape differs between versions, so
it is not taken apart: `row_mask` names the band the model means (causal, a causal window,
bidirectional, a bidirectional window; candidates from the `local_size` and `config.sliding_window`
hints), finds packed documents from where the predicate breaks the sub-diagonal, and then checks
that description against the predicate on O(B * Nq) probe pairs: every query at the band's edges
(distances 0, +-1, +-(W-1), +-W, +-(W+1)), the first and last kept key and the edges of its
document. A predicate that differs there (chunked attention, image-token blocks, a custom
`or_mask_function`) raises a ValueError instead of being dropped. The probes are an edge check,
not a proof: an overlay that only adds pairs far inside the band's interior would not be seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import patterns as P
from ..patterns import Pattern

NAME = "sparse_attn"
_FAR = 1 << 40  # band bounds beyond this are the patterns' "unbounded"


@dataclass(frozen=True, eq=False)
class RowMask:
    """What a layer needs to know about the batch, in place of a dense mask.

    * pattern: the model's own mask for these layers, as a band over positions (causal, a causal
      sliding window, full, a bidirectional window); `causal`: no query sees a later key.
    * kv_length: keys the layer receives (transformers' kv_length); kv_used: keys up to the last
      query (a static cache's unwritten tail is dropped); kv_start: absolute index of the first
      key (transformers' kv_offset, > 0 when a sliding-window cache evicted its head).
    * key_padding_mask: bool (B, kv_used), True = real key; None when every key is real.
    * kv_offset: position of each row's first real kept key (int, or a (B,) CPU tensor): its
      distance in the 2-D mask from the row's first real token, evicted or not, so positions stay
      exact when a cache dropped its head (index distance, as transformers' windows and
      `sparse_attention` count positions: a pad hole inside a row counts).
    * query_position: (B,) position of each row's first query (negative for pad queries of a
      left-padded prefill), for the evicted-keys check.
    * document_ids: int (B, kv_used) when position_ids restart (packed sequences), else None.
    """

    pattern: Pattern
    causal: bool
    kv_length: int
    kv_used: int
    kv_start: int
    key_padding_mask: torch.Tensor | None
    kv_offset: int | torch.Tensor
    query_position: torch.Tensor
    document_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None  # the 2-D mask it was built from, to build it again
    _probe: "_Probe"
    # host copies for the cache layers' bookkeeping (hf/cache.py): which tokens are real, bool
    # (B, >= kv_end) or None when all are, and the index of each row's first real token (B,)
    real: torch.Tensor | None = None
    first_real: torch.Tensor | None = None

    # generate() prepares masks ahead for compileable (static) caches and hands them back to the
    # model's mask creation, which calls `.ndim` to decide whether to build again: not 2 ("already
    # prepared") lets it through to `row_mask`, which rebuilds from the 2-D mask for that call.
    ndim = 4

    @property
    def is_plain(self) -> bool:
        """No padding, no packing, nothing evicted: one geometry for every row."""
        return self.key_padding_mask is None and self.document_ids is None and isinstance(self.kv_offset, int) \
            and self.kv_offset == 0

    def agrees(self, pattern: Pattern) -> bool:
        """Whether `pattern` (a band) gives the model's mask on this call's geometry (probed)."""
        return self._probe.agrees(pattern)

    def __repr__(self) -> str:
        rows = self.query_position.numel()
        pad = "none" if self.key_padding_mask is None else f"{int((~self.key_padding_mask).sum())} pad keys"
        docs = "" if self.document_ids is None else f", documents={int(self.document_ids.max()) + 1} max per row"
        return (f"RowMask({self.pattern!r}, rows={rows}, kv_used={self.kv_used}/{self.kv_length}, "
                f"kv_start={self.kv_start}, padding={pad}{docs})")


# ------------------------------------------------------------------------------ probes
@dataclass(frozen=True, eq=False)
class _Probe:
    """The model's predicate at a few (query, key) index pairs per query row."""

    q: torch.Tensor          # [1, Nq, 1] absolute query indices
    kv: torch.Tensor         # [B, Nq, P] absolute key indices (clamped into range)
    inside: torch.Tensor     # [B, Nq, P] the pair is in range (out-of-range probes are ignored)
    value: torch.Tensor      # [B, Nq, P] the model's predicate
    same_doc: torch.Tensor   # [B, Nq, P] query and key in one packed document (all True if not packed)
    distances: frozenset     # the q - kv distances probed at every query

    def agrees(self, pattern: Pattern) -> bool:
        bounds = pattern.band_bounds()
        if bounds is None or bounds[2] != 1:
            return False  # only bands are described from transformers' predicates
        if not _edges(pattern) <= self.distances:
            return False  # its edges were not probed: cannot vouch for it
        ours = pattern.allowed(self.q, self.kv) & self.same_doc
        return bool(((ours == self.value) | ~self.inside).all())

    def first_mismatch(self, pattern: Pattern) -> str:
        ours = pattern.allowed(self.q, self.kv) & self.same_doc
        bad = ((ours != self.value) & self.inside).nonzero()
        if bad.numel() == 0:
            return "its window edges were not probed"
        b, i, p = bad[0].tolist()
        qa, ka = int(self.q[0, i, 0]), int(self.kv[b, i, p])
        return (f"row {b}: query index {qa} {'sees' if self.value[b, i, p] else 'does not see'} key index {ka} "
                f"in the model's mask, {'not ' if self.value[b, i, p] else ''}in {pattern!r}")


def _evaluate(mask_function: Callable, b, q, kv) -> torch.Tensor:
    """The model's predicate on broadcast index tensors, as a bool tensor of kv's shape."""
    try:
        out = mask_function(b, torch.zeros((), dtype=torch.long, device=kv.device), q, kv)
    except Exception as exc:  # a predicate that only works under vmap or on scalars
        name = getattr(mask_function, "__name__", mask_function)
        raise ValueError(f"mask_function: the model's mask predicate {name} cannot be evaluated on index tensors "
                         f"({type(exc).__name__}: {exc}); sparse_attn reads it index-wise to check it is a band it "
                         "can run without a dense mask") from exc
    return torch.as_tensor(out, dtype=torch.bool, device=kv.device).expand(kv.shape).cpu()


def _edges(pattern: Pattern) -> set[int]:
    """The q - kv distances on both sides of each finite edge of a band."""
    lo, hi, _ = pattern.band_bounds()
    return {e for b in (lo, hi) if abs(b) < _FAR for e in (b - 1, b, b + 1)}


def _band_candidates(local_size, config_window) -> list[Pattern]:
    """Bands transformers builds, most likely first: the creator's own `local_size` windows, then
    causal / full, then windows of `config.sliding_window` (a short call cannot tell them apart
    from causal, and then they compute the same)."""

    def windows(w):
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            return []
        return [P.sliding_window(w),                                   # kv > q - w (causal)
                P.sliding_window(2 * w, causal=False),                 # |q - kv| <= w
                P.sliding_window(max(2 * (w - 1), 1), causal=False)]   # |q - kv| < w (Gemma3 bidirectional)

    seen, out = set(), []
    for p in windows(local_size) + [P.causal(), P.full()] + windows(config_window):
        if p.band_bounds() not in seen:
            seen.add(p.band_bounds())
            out.append(p)
    return out


def _documents(mask_function, bsz, n, device) -> torch.Tensor | None:
    """Packed documents (B, n) from where the predicate refuses key i-1 to query i, else None.

    transformers adds a packed-sequence predicate only without a 2-D mask and without a cache,
    when position_ids restart; there q and kv indices coincide. (For a window of 1 every token
    would look like a document: the same computation.)"""
    if n < 2:
        return None
    i = torch.arange(1, n, device=device)[None, :]
    sub = _evaluate(mask_function, torch.arange(bsz, device=device)[:, None], i, (i - 1).expand(bsz, -1))
    if bool(sub.all()):
        return None
    return torch.cat([torch.zeros(bsz, 1, dtype=torch.long), (~sub).long().cumsum(1)], dim=1)


def _probe(mask_function, bsz, q_abs, kv_start, kv_end, distances, docs, device) -> _Probe:
    """The predicate for every query at each probed distance, at the first and last key, and at
    the edges of the query's document."""
    nq = q_abs.numel()
    q = q_abs.view(1, nq, 1)
    cols = [q - d for d in sorted(distances)] + [torch.full_like(q, kv_start), torch.full_like(q, kv_end - 1)]
    kv = torch.cat([c.expand(bsz, nq, 1) for c in cols], dim=2)
    if docs is not None:  # edges of each query's document: [start - 1, start, end - 1, end]
        d = docs.gather(1, q_abs.expand(bsz, nq))  # [B, Nq] (packed: q index = kv index)
        start = torch.searchsorted(docs, d, right=False)
        end = torch.searchsorted(docs, d, right=True)
        kv = torch.cat([kv, torch.stack([start - 1, start, end - 1, end], dim=2)], dim=2)
    inside = (kv >= kv_start) & (kv < kv_end)
    kv = kv.clamp(kv_start, kv_end - 1)
    value = _evaluate(mask_function, torch.arange(bsz, device=device).view(bsz, 1, 1), q.to(device), kv.to(device))
    value = value & inside
    if docs is None:
        same = torch.ones_like(inside)
    else:
        same = docs.gather(1, kv.flatten(1)).view_as(kv) == docs.gather(1, q_abs.expand(bsz, nq))[:, :, None]
    return _Probe(q, kv, inside, value, same, frozenset(distances))


# -------------------------------------------------------------------------- the mask fn
def row_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
             mask_function: Callable | None = None, attention_mask: torch.Tensor | None = None,
             local_size: int | None = None, device=None, config=None, **kwargs) -> RowMask:
    """transformers' mask-interface signature (`sdpa_mask`'s); returns a `RowMask`, never a dense mask.

    attention_mask: the 2-D padding mask (B, past + q) in absolute token indices (True = real),
    or None. q_offset / kv_offset: absolute indices of the first query / first key the layer
    sees (kv_offset > 0: the cache evicted its head). Positions count from each row's first real
    token, as `sparse_attention` counts them."""
    if mask_function is None:
        raise ValueError("mask_function: transformers passes the model's mask predicate; got None")
    if isinstance(attention_mask, RowMask):  # prepared ahead by generate(): same tokens, this call's geometry
        attention_mask = attention_mask.attention_mask
    q_start = int(q_offset)  # a static cache passes a 0-d tensor
    kv_start = int(kv_offset)
    kv_end = kv_start + kv_length
    q_index0 = q_start - kv_start  # first query, as an index into the keys the layer receives
    kv_used = q_index0 + q_length
    if q_index0 < 0 or kv_used > kv_length:
        raise ValueError(f"q_offset={q_start}, q_length={q_length}: the queries do not lie within the keys "
                         f"[{kv_start}, {kv_end}) the layer receives (cross-attention is not supported yet)")
    device = torch.device("cpu") if device is None else torch.device(device)
    config_window = getattr(config, "sliding_window", None) if config is not None else None

    docs = None
    if attention_mask is None and kv_start == 0 and q_start == 0 and q_length == kv_length:
        docs = _documents(mask_function, batch_size, kv_length, device)
    candidates = _band_candidates(local_size, config_window)
    distances = {0, 1, -1}
    for p in candidates:
        distances |= _edges(p)
    q_abs = torch.arange(q_start, q_start + q_length)
    probe = _probe(mask_function, batch_size, q_abs, kv_start, kv_end, distances, docs, device)
    pattern = next((p for p in candidates if probe.agrees(p)), None)
    if pattern is None:
        raise ValueError(f"mask_function: the model's mask is not one sparse_attn can run without a dense mask "
                         f"(tried {', '.join(repr(p) for p in candidates)}; {probe.first_mismatch(candidates[0])}). "
                         "Chunked attention, image-token blocks and custom or/and mask functions are not supported")
    causal = pattern.is_causal()

    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or \
                attention_mask.shape[0] != batch_size:
            raise TypeError(f"attention_mask must be transformers' 2-D padding mask ({batch_size}, past + q), got "
                            f"{type(attention_mask).__name__} {tuple(getattr(attention_mask, 'shape', ()))}")
        full = attention_mask.detach().to("cpu", torch.bool)
        if full.shape[1] < kv_end:  # a static cache's unwritten slots (transformers pads the same way)
            full = torch.nn.functional.pad(full, (0, kv_end - full.shape[1]))
        kept = full[:, kv_start:kv_start + kv_used]
        real_tail = bool(full[:, kv_start + kv_used:kv_end].any())
        first_real = full.int().argmax(1)  # first real token of each row (0 for an all-pad row)
        first_kept = kept.int().argmax(1)
        has_kept = kept.any(1)
        positions = torch.where(has_kept, kv_start + first_kept - first_real, torch.zeros_like(first_real))
        query_position = positions + q_index0 - first_kept
        key_padding = None if bool(kept.all()) else kept
    else:
        positions = torch.full((batch_size,), kv_start, dtype=torch.long)
        query_position = positions + q_index0
        key_padding = None
        real_tail = kv_used < kv_length
        full, first_real = None, torch.zeros(batch_size, dtype=torch.long)
    if real_tail and not causal:  # keys after the last query are dropped: only a causal layer never sees them
        raise ValueError(f"attention_mask: a bidirectional layer has keys after its last query (kv_length={kv_length}, "
                         f"queries end at {kv_used}: cross-attention or a static cache), which sparse_attn does not "
                         "support yet")
    positions = positions.long()
    same = key_padding is None and bool((positions == positions[0]).all())
    kv_pos = int(positions[0]) if same else positions
    return RowMask(pattern, causal, kv_length, kv_used, kv_start, key_padding, kv_pos, query_position.long(), docs,
                   attention_mask, probe, full, first_real.long())
