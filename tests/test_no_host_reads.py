"""`sa_testing.NoHostReads` fails on every kind of host read it promises to catch (so a test
that relies on it can fail), and lets device-side work through."""

from __future__ import annotations

import pytest
import torch
from sa_testing import HostReadError, NoHostReads

X = torch.arange(10)
MASK = X > 3

READS = {
    "item": lambda: X.sum().item(),
    "bool": lambda: bool((X > 3).any()),
    "if": lambda: 1 if X[0] == 0 else 2,
    "int": lambda: int(X[0]),
    "float": lambda: float(X.float().mean()),
    "tolist": lambda: X.tolist(),
    "numpy": lambda: X.numpy(),
    "nonzero": lambda: MASK.nonzero(),
    "where(cond)": lambda: torch.where(MASK),
    "unique": lambda: torch.unique(X),
    "bincount": lambda: torch.bincount(X),
    "bool mask index": lambda: X[MASK],
    "bool mask put": lambda: X.clone().__setitem__(MASK, torch.zeros(6, dtype=X.dtype)),
    "repeat_interleave": lambda: torch.repeat_interleave(X, X),
    "equal": lambda: torch.equal(X, X),
    "masked_select": lambda: X.masked_select(MASK),
}


@pytest.mark.parametrize("name", list(READS))
def test_catches(name):
    with pytest.raises(HostReadError):
        with NoHostReads():
            READS[name]()
    assert X.tolist()[:2] == [0, 1]  # restored on exit


def test_allows_device_work():
    with NoHostReads():
        out = torch.repeat_interleave(X, X, output_size=45)
        torch.where(MASK, X, 0)
        X[X.clamp(max=3)]
        torch.sort(X, stable=True)
        torch.searchsorted(X, X)
        torch.zeros(3)[1] = 2  # a fill, not a copy
    assert out.shape == (45,)
