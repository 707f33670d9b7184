"""A dict that keeps its most recently used entries: the one bounded cache of the package
(layouts per pattern, BigBird's block maps per length, row views, SDPA's per-shape call counts,
the Triton plan's packed mask classes). Like `_checks.py`, this module stands outside the
floors of DESIGN.md and imports nothing of the package.

Not for code that torch.compile traces: dynamo follows a plain dict there (see
`ops.common.eager_under_compile`), so the Performer's seeded features keep one."""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["LRU"]


class LRU(OrderedDict):
    """An OrderedDict, least recently used first. `recall` reads and marks an entry used; `keep`
    stores one and drops the least recently used beyond `capacity`, which each call passes (so a
    caller's limit may change between calls: `layout_cache()`, a test's monkeypatch)."""

    def recall(self, key, default=None):
        """The value at `key` (now the most recent), or `default` when absent."""
        if key not in self:
            return default
        self.move_to_end(key)
        return self[key]

    def keep(self, key, value, capacity: int):
        """Store `value` at `key` as the most recent and keep at most `capacity` entries; `value`."""
        self[key] = value
        self.move_to_end(key)
        while len(self) > capacity:
            self.popitem(last=False)
        return value
