"""Per-kernel GPU time of one forward+backward, our triton backend against our flex backend on
the same layout (torch.profiler, CUDA activity only): where the time goes, kernel by kernel.

    PYTHONPATH=src python3 benchmarks/profile_kernels.py --out $OUT/profile_kernels.json

B=1, H=16, D=128, bf16, 128 x 128 blocks; patterns: causal window 4096 and full causal at 32K.
Each method is warmed up (compile, autotune) and then profiled over --iters fwd+bwd calls;
the JSON lists, per (pattern, method), every CUDA kernel's mean time per call, longest first.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, write_json  # noqa: E402

import sparse_attn  # noqa: E402
from sparse_attn import patterns as P  # noqa: E402

PATTERNS = {"window4096_causal": "P.sliding_window(4096)", "causal": "P.causal()"}


def kernel_times(fn, iters: int) -> list[dict]:
    """Mean CUDA time per call of each kernel `fn` launches, longest first."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total_us: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total_us[e.name] += e.device_time
    rows = [{"kernel": k[:160], "ms_per_call": us / iters / 1e3} for k, us in total_us.items()]
    return sorted(rows, key=lambda r: -r["ms_per_call"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS / "profile_kernels.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_kernels.py needs a CUDA device", file=sys.stderr)
        return 2
    n, dev = args.length, torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v, dout = (torch.randn(1, 16, n, 128, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    result = {"env": environment("cuda"), "setup": f"B=1, H=16, N={n}, D=128, bf16, fwd+bwd per call",
              "rows": []}
    for name, expr in PATTERNS.items():
        layout = eval(expr, {"P": P}).layout(n, n, block_q=128, block_kv=128, device=dev)  # noqa: S307
        for backend in ("triton", "flex"):
            def fn():
                out = sparse_attn.sparse_attention(q, k, v, layout, backend=backend)
                torch.autograd.grad(out, (q, k, v), dout)

            kernels = kernel_times(fn, args.iters)
            total = sum(r["ms_per_call"] for r in kernels)
            result["rows"].append({"pattern": name, "backend": backend, "total_ms": total, "kernels": kernels})
            print(f"{name} {backend}: {total:.2f} ms of kernels per fwd+bwd")
            for r in kernels[:6]:
                print(f"    {r['ms_per_call']:8.3f} ms  {r['kernel'][:100]}")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
