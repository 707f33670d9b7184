"""Pattern and mechanism names the CLI understands, and `name:key=value,...` specs.

    parse_spec("sliding_window:window=512,causal=false", length=8192)
    -> Spec(name="sliding_window", params={"window": 512, "causal": False}, pattern=<Pattern>)
    parse_spec("performer:num_features=128", length=8192)
    -> Spec(name="performer", params={...}, pattern=None, mechanism=Mechanism("performer", ...))

The names are the mechanism registry's (`sparse_attn.ops.registry`) that have spec defaults
(`MechanismInfo.defaults`: patterns that take plain numbers, and the non-pattern mechanisms),
with defaults derived from the sequence length: the paper-style value at --length >= 4096
(sliding window 256, BigBird block 64, ...), shrunk in proportion below that so that
`show --length 64` still draws something readable. Keys are the op's own argument names.
Parsing is `Mechanism.parse(text, length)`: this module only words the errors for the CLI.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterator

from ..ops.mechanisms import Mechanism
from ..ops.registry import PATTERN, REFERENCE_LENGTH, MechanismInfo, mechanisms, scaled
from ..patterns import Pattern

__all__ = ["DEFAULT_PATTERNS", "MECHANISM_REGISTRY", "REFERENCE_LENGTH", "REGISTRY", "Spec", "SpecError",
           "describe", "parse_spec", "scaled", "valid_names"]


class SpecError(ValueError):
    """A pattern spec the CLI cannot turn into a pattern (unknown name, key or value)."""


class _Names(Mapping):
    """A live view of the registry's entries with spec defaults, patterns or the others: what is
    registered later (`register_mechanism`) shows up here too."""

    def __init__(self, patterns: bool) -> None:
        self._patterns = patterns

    def _entries(self) -> dict[str, MechanismInfo]:
        return {name: info for name, info in mechanisms().items()
                if info.defaults is not None and (info.kind == PATTERN) == self._patterns}

    def __getitem__(self, name: str) -> MechanismInfo:
        return self._entries()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries())

    def __len__(self) -> int:
        return len(self._entries())


REGISTRY: Mapping[str, MechanismInfo] = _Names(patterns=True)  # patterns with a spec form
MECHANISM_REGISTRY: Mapping[str, MechanismInfo] = _Names(patterns=False)  # non-pattern mechanisms

DEFAULT_PATTERNS = ["causal", "sliding_window", "longformer", "bigbird", "dilated", "strided", "streaming"]


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


def _format_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "none" if v is None else str(v)


def valid_names() -> str:
    return ", ".join(list(REGISTRY) + list(MECHANISM_REGISTRY))


def parse_spec(text: str, length: int) -> Spec:
    """Parse `name` or `name:key=value,key=value` into a pattern; defaults come from `length`.

    Raises SpecError naming the bad part and listing what is valid.
    """
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"empty pattern spec; valid names: {valid_names()}")
    name = text.strip().partition(":")[0].strip().replace("-", "_")
    if name not in REGISTRY and name not in MECHANISM_REGISTRY:
        raise SpecError(f"unknown pattern {name!r}; valid names: {valid_names()}")
    try:
        m = Mechanism.parse(text, length)
    except (ValueError, TypeError) as exc:
        raise SpecError(str(exc)) from None
    if m.kind != PATTERN:
        return Spec(text, m.name, dict(m.params), None, m)
    try:
        pattern = m.pattern()
    except (ValueError, TypeError) as exc:
        raise SpecError(f"{text}: {exc}") from exc
    return Spec(text, m.name, dict(m.params), pattern)


def describe(length: int = REFERENCE_LENGTH) -> str:
    """One line per pattern name with its keys and their defaults at `length` (for --help)."""
    lines = []
    width = max(len(n) for n in list(REGISTRY) + list(MECHANISM_REGISTRY))

    def entry(name: str, info: MechanismInfo) -> None:
        params = ",".join(f"{k}={_format_value(v)}" for k, v in info.defaults_at(length).items())
        lines.append(f"  {name:<{width}}  {params or '-'}")
        lines.append(f"  {'':<{width}}    {info.summary}")

    for name, info in REGISTRY.items():
        entry(name, info)
    lines.append("")
    lines.append("mechanisms (compare only; error is measured against dense softmax attention):")
    for name, info in MECHANISM_REGISTRY.items():
        entry(name, info)
    return "\n".join(lines)
