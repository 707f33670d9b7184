"""SDPA when every call has a new shape: ListOps-style training (batches of 500-2000 tokens, ~1,500
distinct lengths) meets a sequence length the process has not seen on most steps. Some of torch's
SDPA kernels build a plan per shape (cuDNN's graph), so the first call at a shape can cost far
more than the next. This times forward+backward of SDPA per kernel choice over a stream of
distinct lengths, twice: the first pass meets every length for the first time, the second
revisits them in another order. Also the library's own `full` pattern call (what the dense
ListOps encoder runs: the `sdpa` backend under torch's default kernel choice). Each kernel gets
its own lengths, met by no kernel before it: a plan cached per shape (cuDNN's graphs are cached
by torch, whichever choice built them) would otherwise make a later kernel's first pass a
revisit. (The first H200 runs shared one stream of lengths, so their cuDNN-only pass, after the
default's, measured revisits.)

    PYTHONPATH=src python3 benchmarks/sdpa_shapes.py --device cuda          # H200: ~1 min
    PYTHONPATH=src python3 benchmarks/sdpa_shapes.py --device cpu --lengths 4 --min-len 32 --max-len 96 --dtype float32

Writes results/sdpa_shapes_<device>.json: per kernel, its lengths, ms per call in each pass
(mean, median, max) and whether the kernel was available for these inputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, progress, write_json

from sparse_attn import patterns as P
from sparse_attn import sparse_attention


def _kernels():
    """(name, context manager factory) for torch's default choice and each SDPA backend alone."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    yield "default", contextlib.nullcontext
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is not None:
            yield name.lower(), (lambda b=backend: sdpa_kernel([b]))


def _step(fn, q, k, v, sync) -> float:
    """Seconds of one forward+backward (inputs' grads cleared first)."""
    for t in (q, k, v):
        t.grad = None
    sync()
    began = time.perf_counter()
    fn(q, k, v).float().sum().backward()
    sync()
    return time.perf_counter() - began


def run_kernel(fn, context, lengths, args, device, dtype, sync) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    passes = []
    for pass_index in range(args.passes):
        order = lengths if pass_index == 0 else [lengths[i] for i in torch.randperm(len(lengths), generator=g)]
        times = []
        with context():
            for n in progress(order, desc=f"pass {pass_index + 1}", leave=False):
                q, k, v = (torch.randn(args.rows, args.heads, n, args.dim, generator=g).to(device, dtype)
                           .requires_grad_() for _ in range(3))
                times.append(_step(fn, q, k, v, sync))
        passes.append({"calls": len(times), "mean_ms": 1e3 * statistics.fmean(times),
                       "median_ms": 1e3 * statistics.median(times), "max_ms": 1e3 * max(times),
                       "total_s": sum(times)})
    return {"available": True, "passes": passes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--lengths", type=int, default=200,
                    help="distinct sequence lengths per pass, per kernel (each kernel its own)")
    ap.add_argument("--min-len", type=int, default=500)
    ap.add_argument("--max-len", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=21, help="batch rows per call (a ListOps batch of 32 spans ~1.5 lengths)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-math", action="store_true", help="leave out the math kernel (slow, N^2 memory)")
    ap.add_argument("--out", type=Path, default=None, help="default: results/sdpa_shapes_<device>.json")
    args = ap.parse_args(argv)
    for name in ("lengths", "min_len", "rows", "heads", "dim", "passes"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    jobs_at_most = len(list(_kernels())) + 1 - (args.skip_math and any(n == "math" for n, _ in _kernels()))
    if args.max_len - args.min_len + 1 < args.lengths * jobs_at_most:
        ap.error(f"--lengths {args.lengths} distinct lengths for each of {jobs_at_most} kernels do not fit in "
                 f"[{args.min_len}, {args.max_len}]")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(args.seed)
    span = [int(n) for n in torch.randperm(args.max_len - args.min_len + 1, generator=g) + args.min_len]
    out = args.out or RESULTS / f"sdpa_shapes_{device.type}.json"
    payload = {"env": environment(device.type), "settings": {**vars(args), "out": str(out)}, "kernels": {}}

    # warm-up at one length outside the stream, so a pass does not pay for loading kernels
    warm = [torch.randn(args.rows, args.heads, args.min_len - 1 or 1, args.dim).to(device, dtype).requires_grad_()
            for _ in range(3)]
    library_full = lambda q, k, v: sparse_attention(q, k, v, P.full())  # noqa: E731
    jobs = [(f"sdpa {name}", F.scaled_dot_product_attention, ctx) for name, ctx in _kernels()
            if not (args.skip_math and name == "math")]
    jobs.append(("sparse_attn full (auto)", library_full, _kernels().__next__()[1]))
    for index, (label, fn, ctx) in enumerate(progress(jobs, desc="kernels")):
        lengths = span[index * args.lengths:(index + 1) * args.lengths]  # met by no kernel before
        try:
            with ctx():
                _step(fn, *warm, sync)
        except RuntimeError as err:  # no such kernel for these inputs (device, dtype, head dim)
            payload["kernels"][label] = {"available": False, "reason": str(err).splitlines()[0][:300]}
            write_json(out, payload)
            continue
        payload["kernels"][label] = {"lengths": lengths, **run_kernel(fn, ctx, lengths, args, device, dtype, sync)}
        write_json(out, payload)
    print(f"{'kernel':<28} " + " ".join(f"pass {i + 1} mean / median ms" for i in range(args.passes)))
    for label, row in payload["kernels"].items():
        cells = (["unavailable"] if not row["available"] else
                 [f"{p['mean_ms']:.2f} / {p['median_ms']:.2f}" for p in row["passes"]])
        print(f"{label:<28} " + "   ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
