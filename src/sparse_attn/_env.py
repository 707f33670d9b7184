"""Where a result was measured: the `env` record of every result file (the CLI's JSON, the
evaluations, benchmarks/*.py). Like `_extras.py`, outside the floors of DESIGN.md: usable from
every floor and from the benchmark scripts."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import time

import torch


def environment(device="cpu", **extra) -> dict:
    """Versions (sparse_attn, python, torch; triton when installed, transformers when this run
    imported it), the device and its name (the GPU's, or the CPU model), the GPU's CUDA version
    and memory, threads, CPU count, platform and date; then `extra` (the run's own settings).

    `device_name` is the device's name whatever it is (`gpu` or `cpu`): the CLI's tables print it."""
    from . import __version__

    device = torch.device(device)
    cpu = _cpu_name()
    env = {"sparse_attn": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for module in ("triton", "transformers"):
        version = _version(module, installed=module == "triton")
        if version is not None:
            env[module] = version
    env |= {"platform": platform.platform(), "device": str(device), "device_name": cpu}
    if device.type == "cuda" and torch.cuda.is_available():
        env |= {"device_name": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory}
        env["gpu"] = env["device_name"]
    env |= {"threads": torch.get_num_threads(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    return env | extra


def _version(module: str, *, installed: bool) -> str | None:
    """The version of `module` if this process imported it; else, with `installed`, of the
    installed distribution (read from its metadata: importing triton takes a while)."""
    loaded = sys.modules.get(module)
    if loaded is not None:
        return getattr(loaded, "__version__", None)
    if not installed:
        return None
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
