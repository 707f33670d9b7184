"""KV-cache layers for `model.generate(...)` on a model switched with `sparse_attn.hf.enable`:
memory that stays flat for windows, sinks and globals.

* `PatternCacheLayer()`: keeps, per row, the keys some future query of its layer can still reach
  under the layer's pattern (its schedule entry, or the model's own causal / sliding-window mask):
  `Pattern.reachable` at each row's positions, as `sparse_attn.nn.PatternCache` does. Exact for
  every causal pattern: a window keeps its window, sinks + window their sinks and window,
  Longformer its globals and window, a full causal layer every key.
* `SinkWindowLayer(sinks, window)`: StreamingLLM's cache (transformers v5 has no SinkCache): the
  first `sinks` real tokens of each row and the last `window`, at most sinks + window keys. Its
  layer must not read anything else (a `streaming(sinks, window)` schedule or a narrower
  pattern); a layer whose pattern would reach an evicted key raises instead of reading less.
* `cache_for(model)` / `SparseCache`: a `transformers.Cache` with one `PatternCacheLayer` per layer
  (transformers' `DynamicLayer` for a layer whose schedule is a non-pattern mechanism).

Keys are stored rotated by the model at their absolute positions (transformers applies RoPE
before the cache), so a cached `generate` equals recomputing every step without a cache under the
same pattern. Rows keep their own keys ([B, Hkv, L, D] with a per-row index of each kept key, -1
for an empty slot), so left padding costs no memory: pad keys are dropped at once.

How the pieces meet: a layer reports mask sizes of the whole logical sequence (every token seen),
so the model's `RowMask` describes positions and padding as for a full cache; `update` returns the
kept keys plus the new ones and records which token each one is; `attention_forward` recognises
those keys (by identity), runs the pattern at the kept keys' positions, and tells the layer what
it may drop. A layer whose keys were not read that way (the model was not switched by `enable`, or
runs another attention) raises on its next update instead of computing over a half-evicted cache.
"""

from __future__ import annotations

import torch

from .. import patterns as P
from .._checks import check_int
from ..patterns import Pattern
from .attention import forget_pending, register_pending
from .switch import _transformers, attention_layers

try:
    from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer
except ImportError as exc:  # pragma: no cover - the hf extra is missing
    from .._extras import MissingExtra
    raise MissingExtra(f"sparse_attn.hf's cache layers need transformers >= 5.17: pip install 'sparse_attn[hf]' "
                       f"({exc})") from None


class PatternCacheLayer(CacheLayerMixin):
    """The keys a future query of this layer can still reach under its pattern (module docstring)."""

    is_compileable = False
    is_sliding = False  # mask sizes of the whole sequence, whatever is kept (see the module docstring)
    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.indices: torch.Tensor | None = None  # [B, L] token index of each kept key, -1 = empty slot (host)
        self.cumulative_length = 0                # tokens seen (the next token's index)
        self._pending = None                      # (keys, values, indices, first new index) of the last update
        self._dropped_any = False                 # whether a key was ever dropped (else keys = tokens 0..seen-1)

    def __repr__(self) -> str:
        kept = 0 if self.keys is None else self.keys.shape[-2]
        return f"{type(self).__name__}(seen={self.cumulative_length}, kept={kept})"

    # -------------------------------------------------------------- transformers' interface
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        bsz = key_states.shape[0]
        self.device = key_states.device
        self.keys = key_states.new_zeros(*key_states.shape[:2], 0, key_states.shape[3])
        self.values = value_states.new_zeros(*value_states.shape[:2], 0, value_states.shape[3])
        self.indices = torch.zeros(bsz, 0, dtype=torch.long)  # bookkeeping stays on the host: no device syncs
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new keys/values; return the kept ones followed by the new ones."""
        if torch.compiler.is_compiling():
            raise RuntimeError(f"{type(self).__name__} cannot be traced by torch.compile (its size changes at every "
                               "step); compile the model with a static cache, or generate without compiling")
        if self._pending is not None:
            raise RuntimeError(f"{type(self).__name__}: the keys of the previous step were not read by sparse_attn's "
                               "attention (the model was not switched with sparse_attn.hf.enable, or another "
                               "attention implementation ran); this cache drops keys only sparse_attn's attention "
                               "knows how to do without")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.keys.shape[0] or key_states.shape[1] != self.keys.shape[1]:
            raise ValueError(f"key_states: {type(self).__name__} holds batch {self.keys.shape[0]} x "
                             f"{self.keys.shape[1]} heads, got {tuple(key_states.shape)}")
        n = key_states.shape[-2]
        new = torch.arange(self.cumulative_length, self.cumulative_length + n)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        indices = torch.cat([self.indices, new[None].expand(keys.shape[0], n)], dim=1)
        self._pending = (keys, values, indices, self.cumulative_length)
        register_pending(keys, self)
        self.cumulative_length += n
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # the whole logical sequence: the mask describes positions and padding, not what is kept
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.indices = None
        self.is_initialized = False
        self.cumulative_length = 0
        self._dropped_any = False
        self._forget_pending()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)
            self.indices = self.indices.repeat_interleave(repeats, dim=0)

    # ----------------------------------------------------------- what sparse_attn's attention calls
    def keep_rule(self, pattern: Pattern) -> Pattern:
        """The pattern whose reachable keys are kept: the layer's own."""
        return pattern

    def pending(self):
        """(keys, values, token index of each [B, L], index of the first new token) of the last update."""
        if self._pending is None:
            raise RuntimeError(f"{type(self).__name__}: no update is waiting for its attention")
        return self._pending

    def pending_keys(self) -> torch.Tensor | None:
        return None if self._pending is None else self._pending[0]

    def holds_every_token(self) -> bool:
        """Nothing was ever dropped: the keys of the last update are tokens 0..seen-1 in every row."""
        return not self._dropped_any

    def commit(self, keep: torch.Tensor) -> None:
        """After the attention of the last update: keep[b, j] says whether the j-th key returned
        by it stays. Rows keep their kept keys in order, packed to the left; slots past a row's
        count are empty (index -1)."""
        keys, values, indices, _ = self._pending
        self._forget_pending()
        keep = keep.cpu()
        if bool(keep.all()):  # nothing to drop (a full layer, or a window not yet full): no copy
            self.keys, self.values, self.indices = keys, values, indices
            return
        self._dropped_any = True
        columns = _common_columns(keep)
        if columns is not None:  # every row keeps the same keys (always at batch 1)
            if isinstance(columns, slice):  # one run of them (a window's steady state): views, no copy
                self.keys, self.values, self.indices = keys[:, :, columns], values[:, :, columns], indices[:, columns]
            else:
                on_device = columns.to(keys.device, non_blocking=True)
                self.keys, self.values = keys.index_select(2, on_device), values.index_select(2, on_device)
                self.indices = indices.index_select(1, columns)
            return
        count = keep.sum(dim=1)
        width = int(count.max()) if count.numel() else 0
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]  # kept first, in order
        filled = torch.arange(width)[None, :] < count[:, None]
        self.indices = torch.where(filled, indices.gather(1, order), torch.full_like(order, -1))
        gather = order.to(keys.device, non_blocking=True)[:, None, :, None]
        self.keys = keys.gather(2, gather.expand(*keys.shape[:2], width, keys.shape[3]))
        self.values = values.gather(2, gather.expand(*values.shape[:2], width, values.shape[3]))

    def kept_keys(self) -> int:
        """Keys held per row (the widest row), the memory this layer uses between steps."""
        return 0 if self.keys is None else self.keys.shape[-2]

    def _forget_pending(self) -> None:
        if self._pending is not None:
            forget_pending(self._pending[0])
        self._pending = None

    def _select_rows(self, rows: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys = self.keys.index_select(0, rows.to(self.keys.device))
            self.values = self.values.index_select(0, rows.to(self.values.device))
            self.indices = self.indices.index_select(0, rows.cpu())


def _common_columns(keep: torch.Tensor) -> slice | torch.Tensor | None:
    """The key columns every row of keep [B, L] (a host tensor) keeps, when all rows keep the same
    non-empty set: slice(a, b) for one run [a, b), else their int64 indices; None otherwise."""
    columns = keep[0]
    if keep.shape[0] > 1 and not bool((keep == columns).all()):
        return None
    where = columns.nonzero()[:, 0]
    if where.numel() == 0:
        return None
    a, b = int(where[0]), int(where[-1]) + 1
    return slice(a, b) if b - a == where.numel() else where


class SinkWindowLayer(PatternCacheLayer):
    """StreamingLLM's cache: the first `sinks` real tokens of each row and the last `window`
    (keys at distance < window of the next query), at most sinks + window keys per row. Its layer's
    pattern must not reach any other key (checked at every eviction)."""

    def __init__(self, sinks: int, window: int) -> None:
        super().__init__()
        self.sinks = check_int("sinks", sinks, minimum=0)
        self.window = check_int("window", window, minimum=1)
        self._rule = P.streaming(self.sinks, self.window)

    def __repr__(self) -> str:
        return f"SinkWindowLayer(sinks={self.sinks}, window={self.window}, seen={self.cumulative_length})"

    def keep_rule(self, pattern: Pattern) -> Pattern:
        return self._rule

    def get_max_length(self) -> int:
        return self.sinks + self.window


class SparseCache(Cache):
    """A `transformers.Cache` of sparse_attn cache layers, one per attention layer (transformers'
    `DynamicLayer` for layers that run a non-pattern mechanism: every key, as before)."""

    def __init__(self, layers: list) -> None:
        if not layers or not all(isinstance(layer, (PatternCacheLayer, DynamicLayer)) for layer in layers) or \
                any(getattr(layer, "is_sliding", False) for layer in layers):
            raise TypeError("layers must be a non-empty list of PatternCacheLayer / SinkWindowLayer (or transformers' "
                            "DynamicLayer): every layer reports the whole sequence to the mask")
        super().__init__(layers=list(layers))

    def kept_keys(self) -> list[int | None]:
        """Keys held per row by each layer (None: a DynamicLayer's every key)."""
        return [layer.kept_keys() if isinstance(layer, PatternCacheLayer) else None for layer in self.layers]


def cache_for(model, sinks_window: tuple[int, int] | None = None) -> SparseCache:
    """A cache for `model.generate(past_key_values=...)` on a model switched with `enable`: one
    `PatternCacheLayer` per attention layer (each keeps what its own pattern can still reach), or
    with `sinks_window=(sinks, window)` one `SinkWindowLayer` per layer. Layers whose schedule is
    a non-pattern mechanism (linear, topk, ...) get transformers' `DynamicLayer` (every key)."""
    from .attention import MECHANISM_ATTR
    from .mask import NAME

    _transformers()
    if getattr(getattr(model, "config", None), "_attn_implementation", None) != NAME:
        raise ValueError(f"model: {type(model).__name__} is not switched to sparse_attn; call "
                         "sparse_attn.hf.enable(model, schedule) first (only sparse_attn's attention reads these "
                         "cache layers)")
    if sinks_window is not None and (not isinstance(sinks_window, tuple) or len(sinks_window) != 2):
        raise TypeError(f"sinks_window must be a (sinks, window) tuple, got {sinks_window!r}")
    out = []
    for modules in attention_layers(model).values():
        entry = getattr(modules[0], MECHANISM_ATTR, None)
        if entry is not None and not isinstance(entry, Pattern):
            out.append(DynamicLayer())
        elif sinks_window is None:
            out.append(PatternCacheLayer())
        else:
            out.append(SinkWindowLayer(*sinks_window))
    return SparseCache(out)
