"""Argument checks shared by every floor: one argument order `(name, value, ...)`, one wording.

    TypeError   "{name} must be an int, got {type} ({value!r})"
    ValueError  "{name} must be >= {minimum}, got {value}"   (and "<= {maximum}")

Each returns the value (as a plain int / float / bool), so a check can sit in an assignment.
Like `_extras.py`, this module stands outside the floors of DESIGN.md and imports nothing of
the package."""

from __future__ import annotations

import numbers

__all__ = ["check_int", "check_bool", "check_float", "check_fraction"]


def _got(value) -> str:
    return f"got {type(value).__name__} ({value!r})"


def _check_range(name: str, value, minimum, maximum) -> None:
    if minimum is not None and not value >= minimum:  # `not >=`: NaN fails too
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and not value <= maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int in [minimum, maximum] (None: unbounded). Python and numpy integers are
    ints; bools are not. TypeError for a non-int, ValueError outside the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, {_got(value)}")
    value = int(value)
    _check_range(name, value, minimum, maximum)
    return value


def check_bool(name: str, value) -> bool:
    """`value` if it is True or False (not 0/1, not None); TypeError otherwise."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, {_got(value)}")
    return value


def check_float(name: str, value, minimum: float | None = None, maximum: float | None = None) -> float:
    """`value` as a float in [minimum, maximum] (None: unbounded); any real number but a bool is
    accepted. TypeError for a non-number, ValueError outside the range (NaN is outside any)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, {_got(value)}")
    value = float(value)
    _check_range(name, value, minimum, maximum)
    return value


def check_fraction(name: str, value) -> float:
    """`value` as a float in [0, 1]."""
    return check_float(name, value, 0, 1)
