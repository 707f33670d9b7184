"""One entry for every mechanism: `attention(q, k, v, mechanism, **params)`.

`mechanism` is any of
* a `Pattern` or `BlockLayout`: exact block-sparse attention (`sparse_attention`);
* a name, with the mechanism's keyword arguments: `attention(q, k, v, "performer", num_features=128)`;
* a spec string `"name:key=value,..."` (what the CLI and config files use): `"topk:top_k=32,causal=true"`;
* a `Mechanism` (name + parameters), the serialisable form models keep in their configs:
  `Mechanism("sliding_window", window=512)`, `Mechanism.parse(text)`, `.to_dict()`,
  `Mechanism.from_dict(d)`, `str(m)` gives the spec string back.

Names are those of the mechanism registry (`ops/registry.py`): the pattern presets
(`sliding_window`, `longformer`, `bigbird`, ...: their arguments build the pattern) and the
non-pattern mechanisms (`linear`, `performer`, `topk`, `block_topk`, `lsh`, `routing`: their
arguments go to the op), each entered once below (`_BUILTIN`), plus any added with
`register_mechanism`. `mechanisms()` lists them. Parameters a mechanism does not take raise a
TypeError naming them and the valid ones.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from .. import patterns as P
from ..patterns import BlockLayout, Pattern
from .linear import linear_attention
from .lsh import lsh_attention
from .performer import performer_attention
from .registry import (CACHE_STATE, DYNAMIC, EVERY_KEY, KERNELIZED, PATTERN, UPPER_BOUND, MechanismInfo,
                       mechanism_info, mechanisms, register_mechanism, scaled)
from .routing import routing_attention, routing_sizes
from .sparse import sparse_attention
from .topk import block_topk_attention, topk_attention

__all__ = ["Mechanism", "attention", "as_mechanism", "mechanisms", "mechanism_info", "parse_params", "PATTERN",
           "KERNELIZED", "DYNAMIC"]


# ---------------------------------------------------------------------------- the built-in entries
# `defaults(n)`: what a spec gets at length n (CLI): the paper-style size at n >= REFERENCE_LENGTH,
# scaled down below so that `show --length 64` still draws something readable.
# `budget(n, w, seed)`: about w keys per query at length n (the needle grid: w = N / 16).
def _window(n: int) -> int:
    return scaled(256, n, floor=8)


def _streaming_defaults(n: int) -> dict:
    total = _window(n)  # sinks + window = the sliding window's 256 keys
    sinks = min(4, total // 2)
    return {"sinks": sinks, "window": total - sinks}


def _streaming_budget(n: int, w: int, seed: int) -> dict:
    sinks = min(4, w // 2)
    return {"sinks": sinks, "window": max(1, w - sinks)}


def _topk_reach(params: Mapping, n: int) -> str:
    top_k = params.get("top_k")  # as given: the default does not count
    return EVERY_KEY if isinstance(top_k, int) and top_k >= n else UPPER_BOUND


_BLOCK_TOPK_SIZE = inspect.signature(block_topk_attention).parameters["block_size"].default


def _block_topk_reach(params: Mapping, n: int) -> str:
    blocks = params.get("top_k_blocks")
    keeps_all = isinstance(blocks, int) and blocks * params.get("block_size", _BLOCK_TOPK_SIZE) >= n
    return EVERY_KEY if keeps_all else UPPER_BOUND


_BUILTIN = [
    MechanismInfo("full", PATTERN, P.full, "dense attention, every query sees every key",
                  defaults=lambda n: {}),
    MechanismInfo("causal", PATTERN, P.causal, "query i sees keys j <= i", defaults=lambda n: {}),
    MechanismInfo("sliding_window", PATTERN, P.sliding_window,
                  "local window (Mistral's sliding_window when causal, Longformer's when not)",
                  defaults=lambda n: {"window": _window(n), "causal": True},
                  budget=lambda n, w, seed: {"window": w}),
    MechanismInfo("longformer", PATTERN, P.longformer,
                  "sliding window + the first global_tokens positions as global tokens",
                  defaults=lambda n: {"window": _window(n), "global_tokens": scaled(16, n, floor=1), "causal": False},
                  budget=lambda n, w, seed: {"window": w, "global_tokens": max(1, n // 256)}),
    MechanismInfo("bigbird", PATTERN, P.bigbird,
                  "BigBird ITC: window + global + random blocks (seeded; num_heads for per-head draws)",
                  defaults=lambda n: {"block": scaled(64, n), "num_window_blocks": 3, "num_global_blocks": 2,
                                      "num_random_blocks": 3, "seed": 0, "num_heads": None},
                  budget=lambda n, w, seed: {"block": max(1, n // 64), "num_window_blocks": 3,
                                             "num_global_blocks": 2, "num_random_blocks": 3, "seed": 0}),
    MechanismInfo("dilated", PATTERN, P.dilated, "window over every dilation-th token",
                  defaults=lambda n: {"window": scaled(128, n), "dilation": 2, "causal": True},
                  budget=lambda n, w, seed: {"window": max(1, w // 2), "dilation": 2}),
    MechanismInfo("strided", PATTERN, P.strided,
                  "Sparse Transformer strided: previous stride keys + every stride-th key",
                  defaults=lambda n: {"stride": scaled(128, n), "causal": True},
                  budget=lambda n, w, seed: {"stride": w}),
    MechanismInfo("fixed", PATTERN, P.fixed,
                  "Sparse Transformer fixed: own block + the last summary positions of every block",
                  defaults=lambda n: {"block": scaled(128, n), "summary": scaled(16, n, floor=1), "causal": True},
                  budget=lambda n, w, seed: {"block": w, "summary": 1}),
    MechanismInfo("streaming", PATTERN, P.streaming, "StreamingLLM: the first sinks tokens + a causal window",
                  defaults=_streaming_defaults, budget=_streaming_budget),
    MechanismInfo("block_sparse", PATTERN, P.block_sparse, "any block layout tensor"),
    MechanismInfo("document", PATTERN, P.document, "packed documents (block-diagonal)"),
    MechanismInfo("linear", KERNELIZED, linear_attention, "linear attention with a feature map (elu+1 or relu): O(N)",
                  defaults=lambda n: {"feature_map": "elu", "causal": False},
                  budget=lambda n, w, seed: {"feature_map": "elu"},
                  cache=CACHE_STATE, receptive_field=EVERY_KEY),
    MechanismInfo("performer", KERNELIZED, performer_attention,
                  "Performer FAVOR+ positive orthogonal random features (drawn from --seed)",
                  defaults=lambda n: {"num_features": 256, "kernel": "softmax", "causal": False},
                  budget=lambda n, w, seed: {"num_features": 256, "kernel": "softmax", "generator": seed},
                  receptive_field=EVERY_KEY),
    MechanismInfo("topk", DYNAMIC, topk_attention, "exact per-query top-k keys (queries in chunks: no N^2 memory)",
                  defaults=lambda n: {"top_k": scaled(64, n), "causal": False},
                  budget=lambda n, w, seed: {"top_k": w},
                  receptive_field=_topk_reach, row_local=True),
    MechanismInfo("block_topk", DYNAMIC, block_topk_attention,
                  "top-k kv blocks per query block by mean-pooled scores, on the block backends",
                  defaults=lambda n: {"top_k_blocks": 8, "block_size": scaled(64, n, floor=16), "causal": False},
                  budget=lambda n, w, seed: {"top_k_blocks": 4, "block_size": max(1, n // 64)},
                  cache=None, leaky="the query block's mean score", receptive_field=_block_topk_reach),
    MechanismInfo("lsh", DYNAMIC, lsh_attention, "Reformer LSH: hash rounds, sort, chunks with one chunk of look-back",
                  defaults=lambda n: {"bucket_size": scaled(64, n), "n_hashes": 4, "causal": False, "seed": 0},
                  budget=lambda n, w, seed: {"bucket_size": max(1, n // 128), "n_hashes": 4, "seed": seed},
                  cache=None, leaky="the hash sort and its chunks"),
    MechanismInfo("routing", DYNAMIC, routing_attention,
                  "Routing Transformer: k-means clusters, balanced, attention within",
                  defaults=lambda n: {**routing_sizes(n), "causal": False},
                  budget=lambda n, w, seed: {"num_clusters": -(-n // w), "window": w},
                  cache=None, leaky="the balanced cluster membership"),
]
for _info in _BUILTIN:
    register_mechanism(_info, builtin=True)
del _info


def _convert(name: str, key: str, raw: str, default: Any) -> Any:
    """A spec value as the type of the parameter's default (or the most specific that fits)."""
    text = raw.strip()
    low = text.lower()
    if isinstance(default, bool) or low in ("true", "false"):
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{name}: {key} must be true or false, got {raw!r}")
    if low == "none":
        return None
    if isinstance(default, str):
        return text
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            pass
        try:
            float(text)
        except ValueError:
            raise ValueError(f"{name}: {key} must be a number (an int), got {raw!r}") from None
        raise ValueError(f"{name}: {key} must be an int, got {raw!r}")
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if isinstance(default, float):
        raise ValueError(f"{name}: {key} must be a number, got {raw!r}")
    return text


def parse_params(name: str, text: str, rest: str, types: Mapping, *, keys_word: str = "valid") -> dict:
    """The `key=value,...` part of a spec: {key: value}, each value of the type of `types[key]`.
    Only keys of `types` are accepted; errors (ValueError) name the bad part and list the keys."""
    listing = ", ".join(types) or "(none: this mechanism takes no parameters)"
    params = {}
    for item in filter(str.strip, rest.split(",")):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{name}: expected key=value, got {item.strip()!r} in {text!r}; {keys_word}: {listing}")
        if key not in types:
            raise ValueError(f"{name} has no parameter {key!r}; {keys_word}: {listing}")
        params[key] = _convert(name, key, raw, types[key])
    return params


class Mechanism:
    """A mechanism name and its parameters: serialisable (`to_dict`, `str`), callable on q, k, v.

        m = Mechanism("performer", num_features=128, causal=True)
        out = m(q, k, v)                      # same as attention(q, k, v, m)
        Mechanism.parse(str(m)) == m          # spec strings round-trip (scalar parameters)
    """

    def __init__(self, name: str, **params):
        self.info = mechanism_info(name)
        self.name = self.info.name
        valid = self.info.parameters()
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise TypeError(f"mechanism {self.name!r} takes no parameter(s) {', '.join(unknown)}; valid: "
                            f"{', '.join(valid) or '(none)'}")
        self.params = dict(params)
        self._pattern: Pattern | None = None

    @classmethod
    def parse(cls, text: str, length: int | None = None) -> "Mechanism":
        """`name` or `name:key=value,...`, the one spec parser (the CLI's too). Values take the
        type of the parameter's spec default (or the op's default). With `length`, the parameters
        the spec does not set take the mechanism's spec defaults at that length
        (`MechanismInfo.defaults`), and only those keys are accepted."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"mechanism spec must be a non-empty string like 'linear:causal=true', got {text!r}")
        name, _, rest = text.strip().partition(":")
        info = mechanism_info(name)
        if length is None:
            return cls(info.name, **parse_params(info.name, text, rest, info.types()))
        params = info.defaults_at(length)
        types = info.types()
        given = parse_params(info.name, text, rest, {key: types.get(key) for key in params}, keys_word="valid keys")
        return cls(info.name, **{**params, **given})

    def to_dict(self) -> dict:
        """{"name", "params"}: JSON-ready when the parameters are scalars (numbers, bools,
        strings, None); objects such as a generator, PerformerFeatures or an `always` Pattern are
        kept as they are."""
        return {"name": self.name, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Mechanism":
        if not isinstance(data, Mapping) or "name" not in data:
            raise ValueError(f"a mechanism dict needs a 'name' (and optional 'params'), got {data!r}")
        return cls(data["name"], **dict(data.get("params") or {}))

    @property
    def kind(self) -> str:
        return self.info.kind

    def pattern(self) -> Pattern | None:
        """The Pattern this mechanism stands for (pattern kinds), else None. Built once."""
        if self.kind != PATTERN:
            return None
        if self._pattern is None:
            self._pattern = self.info.op(**self.params)
        return self._pattern

    def __call__(self, q, k, v, *, scale: float | None = None, backend: str = "auto", **call_kw):
        if self.kind == PATTERN:
            return sparse_attention(q, k, v, self.pattern(), scale=scale, backend=backend, **call_kw)
        kwargs = dict(self.params)
        kwargs.update(call_kw)
        valid = self.info.parameters()
        for key, value, default in (("scale", scale, None), ("backend", backend, "auto")):
            if value == default:
                continue
            if key not in valid:
                raise TypeError(f"mechanism {self.name!r} takes no {key!r}; valid: {', '.join(valid)}")
            kwargs[key] = value
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise TypeError(f"mechanism {self.name!r} takes no parameter(s) {', '.join(unknown)}; valid: "
                            f"{', '.join(valid)}")
        return self.info.op(q, k, v, **kwargs)

    def __eq__(self, other) -> bool:
        return isinstance(other, Mechanism) and (self.name, self.params) == (other.name, other.params)

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted((k, repr(v)) for k, v in self.params.items()))))

    def __str__(self) -> str:
        def fmt(v):
            return ("true" if v else "false") if isinstance(v, bool) else "none" if v is None else str(v)

        return self.name + (":" + ",".join(f"{k}={fmt(v)}" for k, v in self.params.items()) if self.params else "")

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"Mechanism({self.name!r}{args})"


def as_mechanism(mechanism, params: Mapping | None = None) -> Mechanism | Pattern | BlockLayout:
    """Normalise what `attention()` accepts: Pattern/BlockLayout pass through (no params allowed)."""
    params = dict(params or {})
    if isinstance(mechanism, (Pattern, BlockLayout)):
        if params:
            raise TypeError(f"a Pattern or BlockLayout takes no mechanism parameters, got {', '.join(params)}")
        return mechanism
    if isinstance(mechanism, Mechanism):
        if params:
            return Mechanism(mechanism.name, **{**mechanism.params, **params})
        return mechanism
    if isinstance(mechanism, str):
        if ":" in mechanism:
            parsed = Mechanism.parse(mechanism)
            return Mechanism(parsed.name, **{**parsed.params, **params}) if params else parsed
        return Mechanism(mechanism, **params)
    raise TypeError(f"mechanism must be a Pattern, BlockLayout, Mechanism or a name/spec string, got "
                    f"{type(mechanism).__name__}")


def attention(q, k, v, mechanism, *, scale: float | None = None, backend: str = "auto", **params):
    """Attention with any mechanism, in SDPA's shapes: q (B, Hq, Nq, D), k/v (B, Hkv, Nkv, D/Dv).

    `mechanism`: a Pattern / BlockLayout, a name plus its keyword `params`, a spec string, or a
    `Mechanism` (see the module docstring). `backend` picks the block backend for patterns and
    `block_topk`; other mechanisms have one implementation each and reject a forced backend.
    Keyword arguments a pattern call takes (`return_lse`, `q_offset`, `kv_offset`,
    `key_padding_mask`, `deterministic`) go to `sparse_attention`; a mechanism that cannot take
    one (e.g. `document_ids` for `topk`) raises a TypeError naming it.
    """
    m = as_mechanism(mechanism, {k_: v_ for k_, v_ in params.items() if k_ not in _CALL_KEYS})
    call_kw = {k_: v_ for k_, v_ in params.items() if k_ in _CALL_KEYS}
    if isinstance(m, (Pattern, BlockLayout)):
        return sparse_attention(q, k, v, m, scale=scale, backend=backend, **call_kw)
    return m(q, k, v, scale=scale, backend=backend, **call_kw)


# Per-call arguments (not part of a mechanism's identity): passed to the call, not stored.
_CALL_KEYS = ("return_lse", "q_offset", "kv_offset", "key_padding_mask", "document_ids", "deterministic")
