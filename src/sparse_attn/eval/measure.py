"""Timing, peak memory and error measurement, shared by `sparse-attn compare` and benchmarks/
(`benchmarks/common.py` re-exports the timers for the scripts).

Timers: `time_call` (a warm-up, then perf_counter per call; CUDA synchronised: the CLI),
`time_cpu` (torch.utils.benchmark.Timer), `time_gpu` (triton.testing.do_bench, or a few
synchronised calls for slow ones), `bench_ms` (do_bench, kernel against kernel), `time_once`.

Peak memory is "the most bytes torch held at once during one call, above what it held when
the call started" (the output included):

* CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus the
  bytes allocated before the call.
* CPU: torch has no allocator statistics for the CPU (and `tracemalloc` does not see torch's
  allocations; RSS deltas are page- and allocator-cache-bound). `torch.profiler` with
  `profile_memory=True` records every allocation and free that goes through torch's CPU
  allocator, with a timestamp; we sort them in time and take the maximum of the running sum.
  Exact for tensor memory; scratch that BLAS/OpenMP allocate on their own is not seen.
  The profiler's own start-up (about a second, once per process) is not part of the timings:
  memory is measured on a separate call.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from typing import Callable

import torch

# Elements of one float64 score matrix per reference call (x8 bytes; the reference keeps a
# few of them alive at once), so that checking a long sequence stays within a few GB.
_REFERENCE_BUDGET = 1 << 25
# Query rows per checked segment when only a sample of rows is checked.
_SEGMENT = 64

PEAK_MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() during one call, minus memory allocated before it",
    "cpu": "torch.profiler(profile_memory=True): max running sum of torch CPU allocations during one call",
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable, device: torch.device, repeats: int):
    """One warm-up call, then `repeats` timed calls. Returns (warm-up output, warm-up seconds,
    list of seconds per timed call)."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    warmup = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return out, warmup, times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


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


def time_once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@contextlib.contextmanager
def _quiet_stderr_fd():
    """Silence C++ writes to fd 2 (Kineto prints a line per profiler start/stop)."""
    fd = 2  # C++ writes to the process's fd 2, whatever sys.stderr is now
    try:
        sys.stderr.flush()
        saved = os.dup(fd)
    except (AttributeError, ValueError, OSError):  # no fd 2 (embedded interpreter): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _cpu_peak(fn: Callable) -> int | None:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr_fd():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
        del out
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:  # profiler internals moved: report "unknown" rather than a wrong number
        return None
    allocs = sorted(
        (e.start_ns(), e.nbytes()) for e in events
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    peak = running = 0
    for _, nbytes in allocs:
        running += nbytes
        peak = max(peak, running)
    return peak


def peak_memory(fn: Callable, device: torch.device) -> int | None:
    """Bytes: the most torch held at once during one call of `fn`, above the level at its
    start (see the module docstring). None when it cannot be measured."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak
    if device.type == "cpu":
        return _cpu_peak(fn)
    return None


def error_segments(length: int, rows: int) -> list[tuple[int, int]]:
    """Query rows to check: all of them when rows <= 0 or rows >= length, else about `rows`
    rows in evenly spaced segments of 64 (the first and the last rows always among them)."""
    if rows <= 0 or rows >= length:
        return [(0, length)]
    seg = min(_SEGMENT, rows)
    count = max(2, -(-rows // seg))
    starts = sorted({round(i * (length - seg) / (count - 1)) for i in range(count)})
    merged: list[list[int]] = []
    for s in starts:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], s + seg)
        else:
            merged.append([s, s + seg])
    return [(a, b) for a, b in merged]


def reference_error(out: torch.Tensor, q64, k64, v64, reference: Callable, segments: list[tuple[int, int]]):
    """Max and mean |out - reference| over the query rows in `segments`.

    `reference(start, stop)` returns the float64 reference output of query rows [start, stop);
    segments are split further so that one reference call holds at most _REFERENCE_BUDGET
    scores. Returns (max, mean, rows checked)."""
    b, h, _, _ = q64.shape
    step = max(1, _REFERENCE_BUDGET // max(1, b * h * k64.shape[2]))
    maxima = []
    total = 0.0
    count = 0
    rows = 0
    for seg_start, seg_stop in segments:
        for start in range(seg_start, seg_stop, step):
            stop = min(seg_stop, start + step)
            ref = reference(start, stop)
            diff = (out[:, :, start:stop].to(torch.float64) - ref).abs_()
            if diff.numel():
                maxima.append(float(diff.max()))
            total += float(diff.sum())
            count += diff.numel()
            rows += stop - start
    worst = float(torch.tensor(maxima, dtype=torch.float64).max()) if maxima else 0.0  # NaN stays NaN
    return worst, (total / count if count else 0.0), rows
