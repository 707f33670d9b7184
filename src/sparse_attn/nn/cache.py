"""KV caches for decoding with `SparseAttention(x, cache=...)`: one cache object per layer.

A cache stores the keys/values of the tokens seen so far (what the mechanism can still reach)
and answers `attend(q, k, v, layer)` for the new tokens: it appends their keys/values, applies the
rotary embedding where its position rule says, and runs the layer's mechanism over what it keeps.

* `FullCache`: every key, rotated at its absolute position; any causal pattern, and any causal
  mechanism that takes fewer queries than keys (topk, linear, performer), exact: equals the full
  forward. Memory grows.
* `WindowCache(window)`: the last `window` keys in a ring buffer (memory O(window)); exact for a
  causal sliding window of at most `window` keys (the only keys such a pattern can still reach),
  rotated at absolute positions.
* `SinkCache(sinks, window)`: StreamingLLM (Xiao et al. 2023): the first `sinks` tokens plus a ring
  of the last `window`; keys are stored unrotated and rotated at read time by their position
  *inside the cache* (0..L-1), and the new queries take the positions that follow, as the paper
  does, so positions never exceed sinks + window. Equals the full forward with
  `patterns.streaming(sinks, window)` until the first eviction; after it, the re-indexed positions
  are the method (not an approximation error of the cache).
* `PatternCache`: for any causal pattern, the keys some future query can still reach
  (`Pattern.reachable`: Longformer's globals + the window, sinks + window, dilated windows) and
  nothing else; attends over them with the pattern evaluated at their absolute positions. Exact.
* `LinearStateCache`: linear attention's running state (S, z) (Katharopoulos et al.): O(1) memory
  per layer whatever the length, exact (equals the full causal forward).

Every cache refuses, with a ValueError, calls it cannot serve: a second layer (a cache
belongs to the first layer that uses it: one cache per layer), another batch size, head shape,
dtype or device than its first call (one cache per batch of sequences), and a layer that is not
causal by `check_causal`, the rule `SparseCausalLM` applies to its layers (a non-causal window
decoded one token at a time would differ from the layer's forward). That includes `lsh`,
`routing` and `block_topk` with causal=True: they attend keys j <= i only, but which keys row i
gets is decided from later positions too, so no step-by-step decoding equals their forward.
Rows are whole sequences: there is no per-row padding or offset yet (see `SparseCausalLM`).
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod

import torch

from .._checks import check_int
from ..ops.gathered import attention_at_positions
from ..ops.mechanisms import Mechanism, attention
from ..ops.registry import CACHE_STATE, PATTERN, leaky_mechanisms
from ..patterns import Band, Pattern
from ..patterns import streaming as streaming_pattern
from ..patterns.grid import UNBOUNDED


class KVCache(ABC):
    """Base: `position` = tokens seen so far; subclasses keep what they can still use.

    The first call binds the cache to its layer and to the batch, heads, head dims, dtype and
    device of its keys; later calls must match them (see the module docstring)."""

    def __init__(self) -> None:
        self.position = 0
        self._layer = None  # weakref to the layer of the first call
        self._shape = None  # what the first call's q/k/v looked like

    def attend(self, q, k, v, layer):
        """Store the new tokens' keys/values and return their attention output [B, Hq, n, Dv]."""
        shape = {"batch": k.shape[0], "q heads": q.shape[1], "kv heads": k.shape[1], "head dim": k.shape[3],
                 "value head dim": v.shape[3], "dtype": k.dtype, "device": k.device}
        name = type(self).__name__
        if self._layer is None:
            check_causal(layer.mechanism, name, accepted_leaky=None)
            self._layer, self._shape = weakref.ref(layer), shape
        elif self._layer() is not layer:
            raise ValueError(f"{name} is already used by another layer: a cache holds one layer's keys and values, "
                             "so give one cache per layer (SparseCausalLM.make_caches)")
        elif shape != self._shape:
            first = ", ".join(f"{key} {val}" for key, val in self._shape.items())
            now = ", ".join(f"{key} {val}" for key, val in shape.items() if val != self._shape[key])
            raise ValueError(f"{name} holds keys of {first} from its first call; this call has {now}: start a new "
                             "cache for another batch of sequences")
        return self._attend(q, k, v, layer)

    @abstractmethod
    def _attend(self, q, k, v, layer):
        """`attend` once the call is known to fit the cache."""

    def memory_bytes(self) -> int:
        """Bytes of the tensors the cache holds now."""
        return sum(t.numel() * t.element_size() for t in self._tensors() if t is not None)

    def _tensors(self):
        return ()


def leaky_selection() -> dict[str, str]:
    """{name: what chooses} of the mechanisms that, with causal=True, attend keys j <= i only but
    choose which of them row i gets from later positions too (LSH's hash sort and its chunks,
    routing's balanced top-`window` cluster membership, block top-k's query-block mean): a causal
    LM trained with them can read the future through that choice, and no cache decodes them equal
    to their forward. The registry entry's `leaky` field says it."""
    return leaky_mechanisms()


def check_causal(mechanism, where: str, accepted_leaky=()) -> None:
    """The one rule for "this layer never sees a later token", for causal LMs and caches: every
    pattern must be provably causal (`Pattern.is_causal`), every other mechanism must run with
    causal=true, and a mechanism of `leaky_selection()` is refused unless its name is in
    `accepted_leaky` (None: nothing can accept it, as for a cache). Refused, not silently
    restricted, so the model runs the pattern its config names. `where` starts the message."""
    pattern = mechanism.pattern() if isinstance(mechanism, Mechanism) else mechanism
    if isinstance(pattern, Pattern):
        if not pattern.is_causal():
            raise ValueError(f"{where}: {mechanism} lets queries see later keys; a causal LM and its caches need a "
                             "causal pattern (e.g. sliding_window:causal=true, longformer:causal=true, "
                             "bigbird:causal=true, or pattern & patterns.causal())")
    elif isinstance(mechanism, Mechanism):
        if mechanism.params.get("causal") is not True:
            raise ValueError(f"{where}: {mechanism} must run with causal=true in a causal LM and its caches "
                             f"(e.g. '{mechanism.name}:causal=true')")
        if mechanism.info.leaky and mechanism.name not in (accepted_leaky or ()):
            remedy = ("no cache decodes it" if accepted_leaky is None else
                      f"to train with it anyway, accept that in ModelConfig(leaky_mechanisms=['{mechanism.name}'])")
            raise ValueError(f"{where}: {mechanism} attends keys j <= i only, but which keys row i gets "
                             f"({mechanism.info.leaky}) is decided from later positions too: a causal LM "
                             "trained with it can read the future through that choice, and its step-by-step "
                             f"decoding cannot equal its full forward; {remedy}")


def _layer_pattern(layer) -> Pattern:
    pattern = _pattern_or_none(layer)
    if pattern is None:
        raise TypeError(f"{type(layer).__name__} with mechanism {layer.mechanism} has no fixed pattern; this cache decodes "
                        "pattern mechanisms (use linear_attention_step's state for linear attention)")
    return pattern


def _pattern_or_none(layer) -> Pattern | None:
    m = layer.mechanism
    pattern = m.pattern() if isinstance(m, Mechanism) else m
    return pattern if isinstance(pattern, Pattern) else None


def _attend_cached(q, keys, values, layer, pattern, q_pos, k_pos):
    """The layer's attention of new queries over cached keys (queries are the last rows).

    One new token (the decoding step) with a pattern mechanism takes the direct path: the
    pattern's row evaluated at the cached positions and one dense product over the cached keys,
    O(cached keys) with a handful of ops, instead of building a block layout for a single row.
    Longer blocks (prefill) go through the layer's mechanism and backend as in a full forward."""
    if q.shape[2] == 1 and pattern is not None:
        return attention_at_positions(q, keys, values, pattern, q_pos, k_pos)
    return attention(q, keys, values, layer.mechanism, backend=layer.backend)


def _rotate(layer, x, positions):
    return x if layer.rotary is None else layer.rotary(x, positions)


class FullCache(KVCache):
    """Every key and value (rotated at absolute positions): exact for any causal mechanism."""

    def __init__(self) -> None:
        super().__init__()
        self.k = self.v = None  # [B, Hkv, L, D]

    def _tensors(self):
        return (self.k, self.v)

    def _attend(self, q, k, v, layer):
        n = q.shape[2]
        pos = torch.arange(self.position, self.position + n, device=q.device)
        q, k = _rotate(layer, q, pos), _rotate(layer, k, pos)
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        self.position += n
        # queries are the last n of the cached positions 0..L-1 (every op's default offset)
        return _attend_cached(q, self.k, self.v, layer, _pattern_or_none(layer), pos,
                              torch.arange(self.position, device=q.device))


class _Ring:
    """A fixed-size ring of the last `size` rows along dim 2, read back in order."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = None  # [B, H, size, D]
        self.count = 0  # rows written so far

    def write(self, x: torch.Tensor) -> None:
        """Append rows x [B, H, n, D]; of a block longer than the ring only the last `size` stay."""
        if self.data is None:
            self.data = x.new_zeros(*x.shape[:2], self.size, x.shape[3])
        dropped = max(0, x.shape[2] - self.size)  # would be overwritten within this write anyway
        self.count += dropped
        x = x[:, :, dropped:]
        slots = (torch.arange(x.shape[2], device=x.device) + self.count) % self.size
        self.data[:, :, slots] = x
        self.count += x.shape[2]

    def read(self) -> torch.Tensor:
        """The kept rows, oldest first: [B, H, min(count, size), D]."""
        if self.count <= self.size:
            return self.data[:, :, :self.count]
        order = (torch.arange(self.size, device=self.data.device) + self.count) % self.size
        return self.data[:, :, order]


class WindowCache(KVCache):
    """The last `window` keys/values (ring buffer, memory O(window)); for causal sliding windows
    of at most `window` keys."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = check_int("window", window, 1)
        self.k, self.v = _Ring(self.window), _Ring(self.window)

    def _tensors(self):
        return (self.k.data, self.v.data)

    def _check(self, layer) -> Band:
        pattern = _layer_pattern(layer)
        # a causal band lo <= i - j <= hi (window, dilated window) reaches back hi positions
        bounded = isinstance(pattern, Band) and pattern.lo >= 0 and pattern.hi < self.window
        if not bounded:
            raise ValueError(f"WindowCache({self.window}) keeps the last {self.window} keys: it decodes a causal "
                             f"sliding window of at most {self.window} keys, not {pattern!r}")
        return pattern

    def _attend(self, q, k, v, layer):
        pattern = self._check(layer)
        n = q.shape[2]
        pos = torch.arange(self.position, self.position + n, device=q.device)
        q, k = _rotate(layer, q, pos), _rotate(layer, k, pos)
        # new queries may need keys from before this step that a block of n new rows would push
        # out of the ring: attend over (kept rows + new rows), then store
        keys = torch.cat([self.k.read(), k], dim=2) if self.k.data is not None else k
        values = torch.cat([self.v.read(), v], dim=2) if self.v.data is not None else v
        self.k.write(k)
        self.v.write(v)
        self.position += n
        # the band is shift-invariant: local positions (first kept key = 0) give the same mask
        local = torch.arange(keys.shape[2], device=q.device)
        return _attend_cached(q, keys, values, layer, pattern, local[keys.shape[2] - n:], local)


class SinkCache(KVCache):
    """StreamingLLM: the first `sinks` tokens + the last `window` (memory O(sinks + window)),
    rotary positions re-indexed inside the cache (see the module docstring)."""

    def __init__(self, sinks: int, window: int) -> None:
        super().__init__()
        self.sinks = check_int("sinks", sinks, minimum=0)
        self.window = check_int("window", window, 1)
        self.sink_k = self.sink_v = None  # unrotated [B, Hkv, <= sinks, D]
        self.k, self.v = _Ring(self.window), _Ring(self.window)

    def _tensors(self):
        return (self.sink_k, self.sink_v, self.k.data, self.v.data)

    def _attend(self, q, k, v, layer):
        pattern = _layer_pattern(layer)
        if repr(pattern) != repr(streaming_pattern(self.sinks, self.window)):
            raise ValueError(f"SinkCache({self.sinks}, {self.window}) decodes patterns.streaming({self.sinks}, "
                             f"{self.window}), not {pattern!r}")
        n = q.shape[2]
        take = min(n, max(0, self.sinks - self.position))  # new tokens that are still sinks
        if take:
            self.sink_k = k[:, :, :take] if self.sink_k is None else torch.cat([self.sink_k, k[:, :, :take]], 2)
            self.sink_v = v[:, :, :take] if self.sink_v is None else torch.cat([self.sink_v, v[:, :, :take]], 2)
        parts_k = [t for t in (self.sink_k, self.k.read() if self.k.data is not None else None) if t is not None]
        parts_v = [t for t in (self.sink_v, self.v.read() if self.v.data is not None else None) if t is not None]
        rest_k, rest_v = k[:, :, take:], v[:, :, take:]
        keys = torch.cat(parts_k + [rest_k], dim=2)  # unrotated, in cache order
        values = torch.cat(parts_v + [rest_v], dim=2)
        length = keys.shape[2]
        cache_pos = torch.arange(length, device=q.device)  # positions inside the cache
        keys = _rotate(layer, keys, cache_pos)
        q = _rotate(layer, q, cache_pos[length - n:])
        if rest_k.shape[2]:
            self.k.write(rest_k)
            self.v.write(rest_v)
        self.position += n
        # in cache coordinates (sinks at 0..sinks-1, then the kept tokens in order) the same
        # streaming pattern selects exactly the sinks and the last `window` tokens
        return _attend_cached(q, keys, values, layer, pattern, cache_pos[length - n:], cache_pos)


class LinearStateCache(KVCache):
    """Causal linear attention's state (S, z): O(1) memory per layer; exact. The layer's mechanism
    must be `linear` with causal=True (its feature map, chunk size and eps are used as given), or
    any mechanism whose registry entry has cache=CACHE_STATE: its op takes `initial_state=` and
    `return_state=True` and returns (out, state), as `linear_attention` does."""

    def __init__(self) -> None:
        super().__init__()
        self.state = None  # LinearState(S [B, Hkv, F, Dv], z [B, Hkv, F])

    def _tensors(self):
        return () if self.state is None else tuple(self.state)

    def _attend(self, q, k, v, layer):
        m = layer.mechanism
        if not (isinstance(m, Mechanism) and m.info.cache == CACHE_STATE and m.params.get("causal") is True):
            raise ValueError(f"LinearStateCache decodes causal linear attention (mechanism 'linear:causal=true'), "
                             f"not {m}")
        n = q.shape[2]
        pos = torch.arange(self.position, self.position + n, device=q.device)
        q, k = _rotate(layer, q, pos), _rotate(layer, k, pos)
        params = {key: val for key, val in m.params.items() if key != "causal"}
        out, self.state = m.info.op(q, k, v, causal=True, initial_state=self.state, return_state=True, **params)
        self.position += n
        return out


class PatternCache(KVCache):
    """The keys a causal pattern can still reach, at their absolute positions (see the module
    docstring); memory is what the pattern needs: constant for windows, sinks and globals."""

    def __init__(self) -> None:
        super().__init__()
        self.k = self.v = None  # [B, Hkv, L, D], rotated at their absolute positions
        self.positions = None  # [L] absolute positions of the kept keys

    def _tensors(self):
        return (self.k, self.v, self.positions)

    def _attend(self, q, k, v, layer):
        pattern = _layer_pattern(layer)
        n = q.shape[2]
        pos = torch.arange(self.position, self.position + n, device=q.device)
        q, k = _rotate(layer, q, pos), _rotate(layer, k, pos)
        keys = k if self.k is None else torch.cat([self.k, k], dim=2)
        values = v if self.v is None else torch.cat([self.v, v], dim=2)
        key_pos = pos if self.positions is None else torch.cat([self.positions, pos])
        out = attention_at_positions(q, keys, values, pattern, pos, key_pos)
        self.position += n
        keep = pattern.reachable(key_pos, self.position)  # evict what no future query can see
        self.k, self.v, self.positions = keys[:, :, keep], values[:, :, keep], key_pos[keep]
        return out


def auto_cache(mechanism) -> KVCache:
    """The smallest exact cache for a layer's mechanism (`SparseCausalLM.make_caches("auto")`).

    A non-pattern mechanism gets the cache its registry entry names (`MechanismInfo.cache`):
    CACHE_STATE with causal=true: `LinearStateCache`; a cache factory of its own: what it makes;
    else `FullCache` (which refuses, at its first call, what no cache decodes). A pattern's cache
    follows from the pattern: a causal (dilated) window: `WindowCache`; plain causal / full:
    `FullCache` (SDPA over every key); anything else (globals + window, sinks + window, unions):
    `PatternCache`, which keeps only the reachable keys."""
    m = mechanism
    if isinstance(m, Mechanism) and m.kind != PATTERN:
        cache = m.info.cache
        if callable(cache):
            return cache(m)
        if cache == CACHE_STATE and m.params.get("causal") is True:
            return LinearStateCache()
        return FullCache()
    pattern = m.pattern() if isinstance(m, Mechanism) else m
    if isinstance(pattern, Band) and pattern.lo >= 0 and pattern.hi != UNBOUNDED:  # a causal (dilated) window
        return WindowCache(pattern.hi + 1)
    if pattern is None or isinstance(pattern, Band):  # plain causal: SDPA over all
        return FullCache()
    return PatternCache()
