"""Optional dependencies, imported only where used: matplotlib (the `viz` extra) for pictures,
tqdm (the `progress` extra) for progress bars. A missing one fails with the pip command."""

from __future__ import annotations

import sys


class MissingExtra(RuntimeError):
    """An optional dependency is not installed."""


def figure(**kw):
    """A bare `matplotlib.figure.Figure` (Agg canvas): no pyplot, no global state, no display."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingExtra("writing pictures needs matplotlib: pip install 'sparse_attn[viz]' "
                           f"(or pip install matplotlib) ({exc})") from None
    return Figure(**kw)


def progress(iterable, *, enabled: bool = True, **kw):
    """tqdm over `iterable` on stderr when enabled and installed, else the iterable itself
    (progress is a nicety, never a requirement)."""
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, file=sys.stderr, **kw)
