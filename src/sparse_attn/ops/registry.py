"""The mechanism registry: one entry per mechanism holds all the library knows about it.

An entry (`MechanismInfo`) says

* `kind`: PATTERN (`op` builds a `Pattern`, run by `sparse_attention`), KERNELIZED or DYNAMIC
  (`op` is the attention itself, `op(q, k, v, **params)`);
* `op` and a one-line `summary`;
* its parameter schema: the op's keyword arguments, and `defaults(length)`, the values a spec
  gets when it names none (paper-style sizes at `REFERENCE_LENGTH` and above, scaled down
  below; None for mechanisms that take tensors and have no spec form, e.g. `block_sparse`),
  and `budget(length, keys, seed)`, the values that give each query about `keys` keys (the
  needle grid compares mechanisms at N / 16 keys per query);
* `cache`: the decoding cache it supports (CACHE_PATTERN: chosen from the pattern; CACHE_FULL:
  every key; CACHE_STATE: a recurrent state, the op takes `initial_state=` / `return_state=`;
  None: none; or a callable `mechanism -> KVCache` of its own);
* `leaky`: for a mechanism that, with causal=True, still chooses which earlier keys a row gets
  from later positions, what makes that choice (a causal LM refuses it unless told to accept
  it, no cache decodes it);
* `receptive_field`: for non-pattern kinds, EVERY_KEY (every key gets weight: dense, or causal
  when causal=true), UPPER_BOUND (keys picked from the data: dense / causal is an upper bound),
  or a function `(params, length) -> EVERY_KEY | UPPER_BOUND`; patterns are EXACT;
* `row_local`: output row i depends on query i alone, so a caller may pass only the query rows
  it needs (every pattern; exact top-k).

`Mechanism.parse` (ops/mechanisms.py) is the one spec parser; the CLI, `nn` caches and causal
checks, `hf`, and the evaluations (`reach`, needle, `compare`) read these fields instead of
matching names. Third parties add theirs with `register_mechanism(...)`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

PATTERN, KERNELIZED, DYNAMIC = "pattern", "kernelized", "dynamic"
KINDS = (PATTERN, KERNELIZED, DYNAMIC)

# Receptive field of one layer of the mechanism.
EXACT, EVERY_KEY, UPPER_BOUND = "exact", "every_key", "upper_bound"

# Decoding caches (nn/cache.py maps them to classes).
CACHE_PATTERN, CACHE_FULL, CACHE_STATE = "pattern", "full", "state"
CACHES = (CACHE_PATTERN, CACHE_FULL, CACHE_STATE, None)

# Lengths at or above this get a mechanism's full default sizes; shorter ones get them scaled down.
REFERENCE_LENGTH = 4096

_AUTO: Any = object()  # a field that takes its value from the kind


def scaled(value: int, length: int, floor: int = 4) -> int:
    """`value` at length >= REFERENCE_LENGTH, proportionally less below (never under `floor`)."""
    return max(floor, min(value, value * length // REFERENCE_LENGTH))


@dataclass(frozen=True)
class MechanismInfo:
    """One mechanism: see the module docstring for each field."""

    name: str
    kind: str
    op: Callable
    summary: str
    defaults: Callable[[int], dict] | None = None
    budget: Callable[[int, int, int], dict] | None = None
    cache: Any = _AUTO
    leaky: str | None = None
    receptive_field: Any = _AUTO
    row_local: Any = _AUTO
    builtin: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self):
        auto = {"cache": CACHE_PATTERN if self.kind == PATTERN else CACHE_FULL,
                "receptive_field": EXACT if self.kind == PATTERN else UPPER_BOUND,
                "row_local": self.kind == PATTERN}
        for key, value in auto.items():
            if getattr(self, key) is _AUTO:
                object.__setattr__(self, key, value)

    @property
    def fn(self) -> Callable:
        """The op (the name this field had before the registry carried more)."""
        return self.op

    def parameters(self) -> dict[str, inspect.Parameter]:
        """The keyword arguments a user may give (q, k, v are not among them)."""
        params = dict(inspect.signature(self.op).parameters)
        for name in ("q", "k", "v"):
            params.pop(name, None)
        return params

    def types(self) -> dict[str, Any]:
        """{parameter: a value of its type}, for reading spec strings: the spec default at
        REFERENCE_LENGTH where there is one, else the op's own default (None when it has none)."""
        typed = {key: None if p.default is inspect.Parameter.empty else p.default
                 for key, p in self.parameters().items()}
        if self.defaults is not None:
            typed.update({k: v for k, v in self.defaults(REFERENCE_LENGTH).items() if v is not None or k not in typed})
        return typed

    def defaults_at(self, length: int) -> dict:
        """The spec defaults at `length` (a fresh dict); ValueError if the mechanism has no spec form."""
        if self.defaults is None:
            raise ValueError(f"mechanism {self.name!r} takes tensor arguments and has no spec defaults")
        return dict(self.defaults(length))

    def budget_at(self, length: int, keys: int, seed: int = 0) -> dict:
        """Parameters giving each query about `keys` keys at `length` ({} when the entry has no
        budget: mechanisms with nothing to size, such as full and causal)."""
        return dict(self.budget(length, keys, seed)) if self.budget is not None else {}

    def receptive_field_at(self, params: Mapping, length: int) -> str:
        """EXACT, EVERY_KEY or UPPER_BOUND for one layer with `params` (as given) at `length`."""
        rf = self.receptive_field
        return rf(params, length) if callable(rf) else rf


_REGISTRY: dict[str, MechanismInfo] = {}


def _normal(name: str) -> str:
    return name.strip().replace("-", "_")


def _check_info(info: MechanismInfo) -> None:
    if not isinstance(info.name, str) or not info.name.isidentifier():
        raise ValueError(f"a mechanism name must be an identifier like 'my_mechanism', got {info.name!r}")
    if info.kind not in KINDS:
        raise ValueError(f"mechanism {info.name!r}: kind must be one of {', '.join(KINDS)}, got {info.kind!r}")
    if not callable(info.op):
        raise TypeError(f"mechanism {info.name!r}: op must be callable, got {type(info.op).__name__}")
    if not isinstance(info.summary, str):
        raise TypeError(f"mechanism {info.name!r}: summary must be a string, got {type(info.summary).__name__}")
    for key in ("defaults", "budget"):
        value = getattr(info, key)
        if value is not None and not callable(value):
            raise TypeError(f"mechanism {info.name!r}: {key} must be a function of the length or None, got "
                            f"{type(value).__name__}")
    if info.cache not in CACHES and not callable(info.cache):
        raise ValueError(f"mechanism {info.name!r}: cache must be one of {CACHES} or a function "
                         f"mechanism -> KVCache, got {info.cache!r}")
    if info.kind == PATTERN and info.cache != CACHE_PATTERN:
        raise ValueError(f"mechanism {info.name!r}: a pattern's cache is chosen from its pattern (CACHE_PATTERN)")
    valid_rf = (EXACT,) if info.kind == PATTERN else (EVERY_KEY, UPPER_BOUND)
    if info.receptive_field not in valid_rf and not (info.kind != PATTERN and callable(info.receptive_field)):
        raise ValueError(f"mechanism {info.name!r}: receptive_field of a {info.kind} mechanism must be "
                         f"{' or '.join(valid_rf)}{'' if info.kind == PATTERN else ' or a function (params, length)'}"
                         f", got {info.receptive_field!r}")
    if info.leaky is not None and not isinstance(info.leaky, str):
        raise TypeError(f"mechanism {info.name!r}: leaky must be None or a string saying what reads later "
                        f"positions, got {type(info.leaky).__name__}")
    if not isinstance(info.row_local, bool):
        raise TypeError(f"mechanism {info.name!r}: row_local must be a bool, got {info.row_local!r}")


def register_mechanism(info: MechanismInfo | None = None, /, *, replace_existing: bool = False,
                       **fields) -> MechanismInfo:
    """Add a mechanism to the registry: a `MechanismInfo`, or its fields as keywords
    (`register_mechanism(name=..., kind=..., op=..., summary=..., defaults=..., ...)`).

    From then on it is reachable by name everywhere: `attention()`, `Mechanism`, spec strings,
    `sparse_attn.mechanisms()`, the CLI (`compare --mechanisms`, `show` for patterns), `nn`
    models and caches, `hf`, and the evaluations (needle, reach). A name already registered
    raises unless replace_existing=True. Returns the entry."""
    if info is None:
        info = MechanismInfo(**fields)
    elif fields:
        info = replace(info, **fields)
    if not isinstance(info, MechanismInfo):
        raise TypeError(f"register_mechanism takes a MechanismInfo or its fields, got {type(info).__name__}")
    _check_info(info)
    if info.name in _REGISTRY and not replace_existing:
        raise ValueError(f"mechanism {info.name!r} is already registered (pass replace_existing=True to replace it)")
    _REGISTRY[info.name] = info
    return info


def unregister_mechanism(name: str) -> MechanismInfo:
    """Remove a mechanism that `register_mechanism` added (the built-in ones stay). Returns it."""
    info = mechanism_info(name)
    if info.builtin:
        raise ValueError(f"mechanism {info.name!r} is built in and cannot be unregistered")
    return _REGISTRY.pop(info.name)


def mechanisms() -> dict[str, MechanismInfo]:
    """Every mechanism name, with its entry (kind, op, summary, defaults, cache, ...)."""
    return dict(_REGISTRY)


def mechanism_info(name: str) -> MechanismInfo:
    info = _REGISTRY.get(_normal(name)) if isinstance(name, str) else None
    if info is None:
        raise ValueError(f"unknown mechanism {name!r}; valid names: {', '.join(_REGISTRY)}")
    return info


def leaky_mechanisms() -> dict[str, str]:
    """{name: what reads later positions} of the mechanisms that choose keys from later positions
    even with causal=True."""
    return {name: info.leaky for name, info in _REGISTRY.items() if info.leaky}
