"""Shared helpers for the benchmark scripts: environment record (sparse_attn._env), timers, peak memory, JSON."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from sparse_attn._env import environment  # noqa: F401 (the scripts import it from here: the `env` of every result)

RESULTS = Path(__file__).resolve().parent / "results"


def time_cpu(fn, repeats: int = 5, min_run_time: float = 0.0) -> float:
    """Median seconds of `fn()` over `repeats` runs (torch.utils.benchmark.Timer, one thread
    setting as the process has). A warm-up call is made first."""
    from torch.utils.benchmark import Timer

    fn()
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    if min_run_time:
        return timer.blocked_autorange(min_run_time=min_run_time).median
    return statistics.median(timer.timeit(1).mean for _ in range(repeats))


def _synced_seconds(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def time_gpu(fn, warmup_ms: float = 10, rep_ms: float = 50, slow_s: float = 0.02) -> tuple[float, str]:
    """Median seconds per call of `fn` on CUDA, and how it was measured (call it warm: compile
    and first-call costs are not excluded here).

    One synchronised call estimates the cost. Under `slow_s`:
    `triton.testing.do_bench(fn, warmup_ms, rep_ms, return_mode="median")`. Slower calls get the
    median of a few synchronised calls instead (3 under 0.5 s, 2 under 2 s, else the estimate
    alone), since do_bench makes at least 8 calls whatever `rep` says."""
    import triton.testing

    estimate = _synced_seconds(fn)
    if estimate < slow_s:
        ms = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        return ms / 1e3, f"triton.testing.do_bench(warmup={warmup_ms}, rep={rep_ms}, median)"
    extra = 2 if estimate < 0.5 else 1 if estimate < 2 else 0
    samples = [estimate] + [_synced_seconds(fn) for _ in range(extra)]
    return statistics.median(samples), f"median of {len(samples)} synchronised calls"


def bench_ms(fn) -> float:
    """Median ms of `fn` on the GPU (one call first, then triton's do_bench): kernel tuning and
    kernel-against-kernel comparisons."""
    import triton

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def progress(iterable, **kwargs):
    """tqdm on stderr when installed; the bare iterable otherwise (progress is optional)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, file=sys.stderr, **kwargs)


def time_once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on `path`.lock (POSIX), so that processes sharing one result file
    read and write it in turn."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no concurrent writers supported
            yield
            return
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def merge_json(path: Path, payload: dict, merge) -> dict:
    """Write `payload` to `path`, merged with what `path` already holds: `merge(old, new)`
    returns the dict to write (`old` is None when there is no file). Read, merge and the
    atomic replace happen under one lock, so several processes each running some of a
    benchmark's entries (`--only`) fill one file without losing each other's entries.
    Returns what was written."""
    with _locked(path):
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
