"""Seeding shared by the task generators (private)."""

from __future__ import annotations

import numbers

import torch

from ..._checks import check_int


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
    return check_int(name, seed, 0)


def torch_generator(seed: int | torch.Generator, name: str = "seed") -> torch.Generator:
    """A fresh CPU generator seeded from `seed` (see `seed_to_int`)."""
    return torch.Generator().manual_seed(seed_to_int(seed, name))
