"""Shared helpers for the benchmark scripts: the environment record (sparse_attn._env), result JSON files
(written whole, or merged under a file lock by processes that share one), progress. Timers and peak memory
are `sparse_attn.eval.measure`'s, shared with `sparse-attn compare`; re-exported here for the scripts."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from filelock import FileLock

from sparse_attn._env import environment  # noqa: F401 (the scripts import it from here: the `env` of every result)
from sparse_attn.eval.measure import bench_ms, time_cpu, time_gpu, time_once  # noqa: F401 (for the scripts)

RESULTS = Path(__file__).resolve().parent / "results"


def progress(iterable, **kwargs):
    """tqdm on stderr when installed; the bare iterable otherwise (progress is optional)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, file=sys.stderr, **kwargs)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def merge_json(path: Path, payload: dict, merge) -> dict:
    """Write `payload` to `path`, merged with what `path` already holds: `merge(old, new)`
    returns the dict to write (`old` is None when there is no file). Read, merge and the
    atomic replace happen under one lock, so several processes each running some of a
    benchmark's entries (`--only`) fill one file without losing each other's entries.
    Returns what was written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(path.name + ".lock")):
        old = json.loads(path.read_text()) if path.is_file() else None
        merged = merge(old, payload)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(merged, indent=2) + "\n")
        os.replace(tmp, path)
    print(f"wrote {path}", file=sys.stderr)
    return merged


def merge_entries(old: dict | None, new: dict, keys: tuple[str, ...], same: tuple[str, ...]) -> dict:
    """`new` with the per-entry dicts under each of `keys` completed from `old` (entries of
    `new` win), when `old` has equal values under every one of `same` (the settings that make
    two runs comparable); otherwise `new` alone, with a note on stderr of what differed."""
    if old is None:
        return new
    differ = [k for k in same if old.get(k) != new.get(k)]
    if differ:
        print(f"note: replacing the earlier results: their {', '.join(differ)} differ from this run's",
              file=sys.stderr)
        return new
    merged = dict(new)
    for key in keys:
        merged[key] = {**old.get(key, {}), **new.get(key, {})}
    return merged


def in_order(entries: dict, order: list[str]) -> dict:
    """`entries` with its keys listed as in `order`, any others after them."""
    rank = {name: i for i, name in enumerate(order)}
    return dict(sorted(entries.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def fmt_ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def fmt_mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"
