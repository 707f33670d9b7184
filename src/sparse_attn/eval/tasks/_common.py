"""Argument checks and seeding shared by the task generators (private)."""

from __future__ import annotations

import numbers

import torch


def seed_to_int(seed: int | torch.Generator, name: str = "seed") -> int:
    """An int seed from `seed`: an int is used as given; a `torch.Generator` gives one draw.

    Drawing from a generator (rather than reading `initial_seed()`) advances it, so two calls
    with the same generator give different data, as any torch sampler would.
    """
    if isinstance(seed, torch.Generator):
        draw = torch.randint(0, 2**62, (1,), generator=seed, device=seed.device)
        return int(draw.item())
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int or a torch.Generator, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"{name} must be >= 0, got {seed}")
    return int(seed)


def torch_generator(seed: int | torch.Generator, name: str = "seed") -> torch.Generator:
    """A fresh CPU generator seeded from `seed` (see `seed_to_int`)."""
    return torch.Generator().manual_seed(seed_to_int(seed, name))


def check_int(value, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int, or a TypeError/ValueError naming `name` and the expected range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_fraction(value, name: str) -> float:
    """`value` as a float in [0, 1], or a TypeError/ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value
