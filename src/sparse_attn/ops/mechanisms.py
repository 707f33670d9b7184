"""One entry for every mechanism: `attention(q, k, v, mechanism, **params)`.

`mechanism` is any of
* a `Pattern` or `BlockLayout`: exact block-sparse attention (`sparse_attention`);
* a name, with the mechanism's keyword arguments: `attention(q, k, v, "performer", num_features=128)`;
* a spec string `"name:key=value,..."` (what the CLI and config files use): `"topk:top_k=32,causal=true"`;
* a `Mechanism` (name + parameters), the serialisable form models keep in their configs:
  `Mechanism("sliding_window", window=512)`, `Mechanism.parse(text)`, `.to_dict()`,
  `Mechanism.from_dict(d)`, `str(m)` gives the spec string back.

Names are the pattern presets (`sliding_window`, `longformer`, `bigbird`, ...: their
arguments build the pattern) and the non-pattern mechanisms (`linear`, `performer`, `topk`,
`block_topk`, `lsh`, `routing`: their arguments go to the op). `mechanisms()` lists them.
Parameters a mechanism does not take raise a TypeError naming them and the valid ones.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .. import patterns as P
from ..patterns import BlockLayout, Pattern
from .linear import linear_attention
from .lsh import lsh_attention
from .performer import performer_attention
from .routing import routing_attention
from .sparse import sparse_attention
from .topk import block_topk_attention, topk_attention

PATTERN, KERNELIZED, DYNAMIC = "pattern", "kernelized", "dynamic"


@dataclass(frozen=True)
class MechanismInfo:
    name: str
    kind: str  # PATTERN (fn builds a Pattern), KERNELIZED or DYNAMIC (fn is the attention op)
    fn: Callable
    summary: str

    def parameters(self) -> dict[str, inspect.Parameter]:
        """The keyword arguments a user may give (q, k, v are not among them)."""
        params = dict(inspect.signature(self.fn).parameters)
        for name in ("q", "k", "v"):
            params.pop(name, None)
        return params


_REGISTRY: dict[str, MechanismInfo] = {
    m.name: m
    for m in [
        MechanismInfo("full", PATTERN, P.full, "dense attention (runs as SDPA)"),
        MechanismInfo("causal", PATTERN, P.causal, "query i sees keys j <= i (runs as SDPA)"),
        MechanismInfo("sliding_window", PATTERN, P.sliding_window, "local window (Mistral causal, Longformer not)"),
        MechanismInfo("longformer", PATTERN, P.longformer, "sliding window + global tokens"),
        MechanismInfo("bigbird", PATTERN, P.bigbird, "BigBird ITC: window + global + random blocks"),
        MechanismInfo("dilated", PATTERN, P.dilated, "window over every dilation-th token"),
        MechanismInfo("strided", PATTERN, P.strided, "Sparse Transformer strided"),
        MechanismInfo("fixed", PATTERN, P.fixed, "Sparse Transformer fixed"),
        MechanismInfo("streaming", PATTERN, P.streaming, "StreamingLLM: sinks + causal window"),
        MechanismInfo("block_sparse", PATTERN, P.block_sparse, "any block layout tensor"),
        MechanismInfo("document", PATTERN, P.document, "packed documents (block-diagonal)"),
        MechanismInfo("linear", KERNELIZED, linear_attention, "linear attention, feature maps (Katharopoulos et al.)"),
        MechanismInfo("performer", KERNELIZED, performer_attention, "Performer FAVOR+ random features"),
        MechanismInfo("topk", DYNAMIC, topk_attention, "exact per-query top-k keys"),
        MechanismInfo("block_topk", DYNAMIC, block_topk_attention,
                      "top-k kv blocks per query block by mean-pooled scores, on the block kernels"),
        MechanismInfo("lsh", DYNAMIC, lsh_attention, "Reformer LSH: hash, sort, chunked attention"),
        MechanismInfo("routing", DYNAMIC, routing_attention, "Routing Transformer: k-means clusters"),
    ]
}


def mechanisms() -> dict[str, MechanismInfo]:
    """Every mechanism name, with its kind, function and a one-line summary."""
    return dict(_REGISTRY)


def mechanism_info(name: str) -> MechanismInfo:
    info = _REGISTRY.get(name.strip().replace("-", "_")) if isinstance(name, str) else None
    if info is None:
        raise ValueError(f"unknown mechanism {name!r}; valid names: {', '.join(_REGISTRY)}")
    return info


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
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if isinstance(default, (int, float)):
        raise ValueError(f"{name}: {key} must be a number, got {raw!r}")
    return text


def parse_params(name: str, text: str, rest: str, defaults: Mapping) -> dict:
    """The `key=value,...` part of a spec: {key: value}, each value of its default's type.
    Only keys of `defaults` are accepted; errors (ValueError) name the bad part."""
    params = {}
    for item in filter(str.strip, rest.split(",")):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{name}: expected key=value, got {item.strip()!r} in {text!r}")
        if key not in defaults:
            raise ValueError(f"{name} has no parameter {key!r}; valid: {', '.join(defaults) or '(none)'}")
        params[key] = _convert(name, key, raw, defaults[key])
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
    def parse(cls, text: str) -> "Mechanism":
        """`name` or `name:key=value,...`; values take the type of the parameter's default."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"mechanism spec must be a non-empty string like 'linear:causal=true', got {text!r}")
        name, _, rest = text.strip().partition(":")
        info = mechanism_info(name)
        defaults = {key: None if p.default is inspect.Parameter.empty else p.default
                    for key, p in info.parameters().items()}
        return cls(info.name, **parse_params(info.name, text, rest, defaults))

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
            self._pattern = self.info.fn(**self.params)
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
        return self.info.fn(q, k, v, **kwargs)

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
    one (per-row padding for `linear`, ...) raises a TypeError naming it.
    """
    m = as_mechanism(mechanism, {k_: v_ for k_, v_ in params.items() if k_ not in _CALL_KEYS})
    call_kw = {k_: v_ for k_, v_ in params.items() if k_ in _CALL_KEYS}
    if isinstance(m, (Pattern, BlockLayout)):
        return sparse_attention(q, k, v, m, scale=scale, backend=backend, **call_kw)
    return m(q, k, v, scale=scale, backend=backend, **call_kw)


# Per-call arguments (not part of a mechanism's identity): passed to the call, not stored.
_CALL_KEYS = ("return_lse", "q_offset", "kv_offset", "key_padding_mask", "document_ids", "deterministic")
