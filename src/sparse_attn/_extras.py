"""Optional dependencies, imported only where used: matplotlib (the `viz` extra) for pictures,
tqdm (the `progress` extra) for progress bars, markdown (the `report` extra) for the report's
HTML page. A missing one fails with the pip command."""

from __future__ import annotations

import sys
import time


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


def markdown_module():
    """The `markdown` package (Python-Markdown), for the report's HTML page."""
    try:
        import markdown
    except ImportError as exc:
        raise MissingExtra("writing HTML needs the markdown package: pip install 'sparse_attn[report]' "
                           f"(or pip install markdown) ({exc})") from None
    return markdown


def progress(iterable, *, enabled: bool = True, lines_every: float = 10.0, **kw):
    """Progress over `iterable` on stderr, when enabled: a tqdm bar on a terminal (when tqdm is
    installed); elsewhere (output to a file, a pipe, a CI log) plain lines, flushed, at the
    start, then at most every `lines_every` seconds as items finish, and at the end: a bar's
    carriage returns make such a log unreadable and it may show nothing for minutes.
    `desc`, `total`, `unit` and `initial` are used by both; other keywords go to tqdm."""
    if not enabled:
        return iterable
    if sys.stderr.isatty() or "ipykernel" in sys.modules:  # a terminal, or a notebook's widget bar
        try:
            from tqdm.auto import tqdm
        except ImportError:  # progress is a nicety, never a requirement
            return iterable
        return tqdm(iterable, file=sys.stderr, **kw)
    return _Lines(iterable, kw.get("desc"), kw.get("total"), kw.get("unit"), kw.get("initial", 0), lines_every)


class _Lines:
    """What progress() gives off a terminal: `desc: n/total units, postfix (elapsed s)` lines on
    stderr. Has tqdm's set_postfix / set_postfix_str / close, so callers need not care which."""

    def __init__(self, iterable, desc, total, unit, initial, every):
        self.iterable, self.desc, self.unit, self.n, self.every = iterable, desc or "progress", unit, initial, every
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.postfix = ""

    def __len__(self):
        return len(self.iterable)

    def __iter__(self):
        began = time.perf_counter()
        self._line(began)
        last, shown = began, self.n
        for item in self.iterable:
            yield item
            self.n += 1
            now = time.perf_counter()
            if now - last >= self.every or self.n == self.total:
                self._line(began)
                last, shown = now, self.n
        if shown != self.n:  # ended early, or the total was unknown
            self._line(began)

    def _line(self, began: float) -> None:
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        unit = f" {self.unit}s" if self.unit else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {count}{unit}{postfix} ({time.perf_counter() - began:.1f} s)", file=sys.stderr,
              flush=True)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kw) -> None:
        items = {**(ordered_dict or {}), **kw}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        pass


def write(line: str) -> None:
    """Print a line on stdout now (flushed), without breaking a tqdm bar drawn on stderr."""
    try:
        from tqdm import tqdm
    except ImportError:
        print(line, flush=True)
        return
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()
