"""Shared helpers for the benchmark scripts: environment record, timers, peak memory, JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment(device: str = "cpu") -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def time_cpu(fn, repeats: int = 5, min_run_time: float = 0.0) -> float:
    """Median seconds of `fn()` over `repeats` runs (torch.utils.benchmark.Timer, one thread
    setting as the process has). A warm-up call is made first."""
    from torch.utils.benchmark import Timer

    fn()
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    if min_run_time:
        return timer.blocked_autorange(min_run_time=min_run_time).median
    return statistics.median(timer.timeit(1).mean for _ in range(repeats))


def time_once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def fmt_ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def fmt_mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"
