"""Pattern and mechanism names the CLI understands, and `name:key=value,...` specs.

    parse_spec("sliding_window:window=512,causal=false", length=8192)
    -> Spec(name="sliding_window", params={"window": 512, "causal": False}, pattern=<Pattern>)
    parse_spec("performer:num_features=128", length=8192)
    -> Spec(name="performer", params={...}, pattern=None, mechanism=Mechanism("performer", ...))

Every preset that takes plain numbers is here, with defaults derived from the sequence length:
the paper-style value at --length >= 4096 (sliding window 256, BigBird block 64, ...), shrunk
in proportion below that so that `show --length 64` still draws something readable.
Keys are the preset's own argument names (see `sparse_attn.patterns`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .. import patterns as P
from ..ops.mechanisms import Mechanism, parse_params
from ..ops.routing import routing_sizes
from ..patterns import Pattern

# Lengths at or above this get the full default sizes; shorter ones get them scaled down.
REFERENCE_LENGTH = 4096


class SpecError(ValueError):
    """A pattern spec the CLI cannot turn into a pattern (unknown name, key or value)."""


def scaled(value: int, length: int, floor: int = 4) -> int:
    """`value` at length >= REFERENCE_LENGTH, proportionally less below (never under `floor`)."""
    return max(floor, min(value, value * length // REFERENCE_LENGTH))


@dataclass(frozen=True)
class PatternSpec:
    name: str
    build: Callable[..., Pattern]
    defaults: Callable[[int], dict]  # length -> keyword arguments of `build`
    summary: str

    def keys(self) -> list[str]:
        return list(self.defaults(REFERENCE_LENGTH))


def _window(n: int) -> int:
    return scaled(256, n, floor=8)


def _streaming_defaults(n: int) -> dict:
    total = _window(n)  # sinks + window = the sliding window's 256 keys
    sinks = min(4, total // 2)
    return {"sinks": sinks, "window": total - sinks}


REGISTRY: dict[str, PatternSpec] = {
    s.name: s
    for s in [
        PatternSpec("full", P.full, lambda n: {}, "dense attention, every query sees every key"),
        PatternSpec("causal", P.causal, lambda n: {}, "query i sees keys j <= i"),
        PatternSpec("sliding_window", P.sliding_window, lambda n: {"window": _window(n), "causal": True},
                    "local window (Mistral's sliding_window when causal, Longformer's when not)"),
        PatternSpec("longformer", P.longformer,
                    lambda n: {"window": _window(n), "global_tokens": scaled(16, n, floor=1), "causal": False},
                    "sliding window + the first global_tokens positions as global tokens"),
        PatternSpec("bigbird", P.bigbird,
                    lambda n: {"block": scaled(64, n), "num_window_blocks": 3, "num_global_blocks": 2,
                               "num_random_blocks": 3, "seed": 0, "num_heads": None},
                    "BigBird ITC: window + global + random blocks (seeded; num_heads for per-head draws)"),
        PatternSpec("dilated", P.dilated, lambda n: {"window": scaled(128, n), "dilation": 2, "causal": True},
                    "window over every dilation-th token"),
        PatternSpec("strided", P.strided, lambda n: {"stride": scaled(128, n), "causal": True},
                    "Sparse Transformer strided: previous stride keys + every stride-th key"),
        PatternSpec("fixed", P.fixed, lambda n: {"block": scaled(128, n), "summary": scaled(16, n, floor=1),
                                                 "causal": True},
                    "Sparse Transformer fixed: own block + the last summary positions of every block"),
        PatternSpec("streaming", P.streaming, _streaming_defaults,
                    "StreamingLLM: the first sinks tokens + a causal window"),
    ]
}

DEFAULT_PATTERNS = ["causal", "sliding_window", "longformer", "bigbird", "dilated", "strided", "streaming"]


def _routing_defaults(n: int) -> dict:
    return {**routing_sizes(n), "causal": False}


@dataclass(frozen=True)
class MechanismSpec:
    """A non-pattern mechanism (sparse_attn.attention names) with CLI defaults per length."""

    name: str
    defaults: Callable[[int], dict]
    summary: str

    def keys(self) -> list[str]:
        return list(self.defaults(REFERENCE_LENGTH))


MECHANISM_REGISTRY: dict[str, MechanismSpec] = {
    s.name: s
    for s in [
        MechanismSpec("linear", lambda n: {"feature_map": "elu", "causal": False},
                      "linear attention with a feature map (elu+1 or relu): O(N)"),
        MechanismSpec("performer", lambda n: {"num_features": 256, "kernel": "softmax", "causal": False},
                      "Performer FAVOR+ positive orthogonal random features (drawn from --seed)"),
        MechanismSpec("topk", lambda n: {"top_k": scaled(64, n), "causal": False},
                      "exact per-query top-k keys (queries in chunks: no N^2 memory)"),
        MechanismSpec("block_topk", lambda n: {"top_k_blocks": 8, "block_size": scaled(64, n, floor=16),
                                               "causal": False},
                      "top-k kv blocks per query block by mean-pooled scores, on the block backends"),
        MechanismSpec("lsh", lambda n: {"bucket_size": scaled(64, n), "n_hashes": 4, "causal": False, "seed": 0},
                      "Reformer LSH: hash rounds, sort, chunks with one chunk of look-back"),
        MechanismSpec("routing", _routing_defaults, "Routing Transformer: k-means clusters, balanced, attention within"),
    ]
}


@dataclass
class Spec:
    """A parsed spec: the registry name, the resolved arguments and the pattern built from them."""

    text: str
    name: str
    params: dict
    pattern: Pattern | None  # None for a non-pattern mechanism
    mechanism: Mechanism | None = None  # set for non-pattern mechanisms

    def params_str(self) -> str:
        return ",".join(f"{k}={_format_value(v)}" for k, v in self.params.items())

    def canonical(self) -> str:
        """A spec string that rebuilds this exact pattern at any length."""
        return f"{self.name}:{self.params_str()}" if self.params else self.name


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "none" if v is None else str(v)


def _convert(spec_name: str, key: str, raw: str, default: Any) -> Any:
    """Convert `raw` to the type of the key's default value (bool, int, or optional int)."""
    text = raw.strip()
    low = text.lower()
    if isinstance(default, bool):
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise SpecError(f"{spec_name}: {key} must be true or false, got {raw!r}")
    if default is None and low == "none":
        return None
    try:
        return int(text)
    except ValueError:
        expected = "an int or none" if default is None else "an int"
        raise SpecError(f"{spec_name}: {key} must be {expected}, got {raw!r}") from None


def valid_names() -> str:
    return ", ".join(list(REGISTRY) + list(MECHANISM_REGISTRY))


def parse_spec(text: str, length: int) -> Spec:
    """Parse `name` or `name:key=value,key=value` into a pattern; defaults come from `length`.

    Raises SpecError naming the bad part and listing what is valid.
    """
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"empty pattern spec; valid names: {valid_names()}")
    name, _, rest = text.strip().partition(":")
    name = name.strip().replace("-", "_")
    if name in MECHANISM_REGISTRY:
        return _parse_mechanism(text, name, rest, length)
    spec = REGISTRY.get(name)
    if spec is None:
        raise SpecError(f"unknown pattern {name!r}; valid names: {valid_names()}")
    params = spec.defaults(length)
    valid_keys = ", ".join(params) if params else "(none: this pattern takes no parameters)"
    if rest.strip():
        for item in rest.split(","):
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise SpecError(f"{name}: expected key=value, got {item.strip()!r} in {text!r}; valid keys: "
                                f"{valid_keys}")
            if key not in params:
                raise SpecError(f"{name} has no parameter {key!r}; valid keys: {valid_keys}")
            params[key] = _convert(name, key, raw, spec.defaults(REFERENCE_LENGTH)[key])
    try:
        pattern = spec.build(**params)
    except (ValueError, TypeError) as exc:
        raise SpecError(f"{text}: {exc}") from exc
    return Spec(text, name, params, pattern)


def _parse_mechanism(text: str, name: str, rest: str, length: int) -> Spec:
    params = MECHANISM_REGISTRY[name].defaults(length)
    try:
        params.update(parse_params(name, text, rest, params))
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    try:
        mechanism = Mechanism(name, **params)
    except (ValueError, TypeError) as exc:
        raise SpecError(f"{text}: {exc}") from exc
    return Spec(text, name, params, None, mechanism)


def describe(length: int = REFERENCE_LENGTH) -> str:
    """One line per pattern name with its keys and their defaults at `length` (for --help)."""
    lines = []
    width = max(len(n) for n in list(REGISTRY) + list(MECHANISM_REGISTRY))
    for name, spec in REGISTRY.items():
        params = ",".join(f"{k}={_format_value(v)}" for k, v in spec.defaults(length).items())
        lines.append(f"  {name:<{width}}  {params or '-'}")
        lines.append(f"  {'':<{width}}    {spec.summary}")
    lines.append("")
    lines.append("mechanisms (compare only; error is measured against dense softmax attention):")
    for name, spec in MECHANISM_REGISTRY.items():
        params = ",".join(f"{k}={_format_value(v)}" for k, v in spec.defaults(length).items())
        lines.append(f"  {name:<{width}}  {params}")
        lines.append(f"  {'':<{width}}    {spec.summary}")
    return "\n".join(lines)
