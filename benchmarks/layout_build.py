"""Layout construction cost: analytic block enumeration, O(non-empty blocks), never N x N.

    python benchmarks/layout_build.py            # 1,048,576 tokens, W=4096, blocks of 128
    PYTHONPATH=src python3 benchmarks/layout_build.py --device cuda --length 131072 1048576 \
        --json $OUT/layout_build_gpu.json      # on the GPU (synchronised; peak from the CUDA allocator)

For each pattern: build time (median of fresh builds: a new pattern object each time, so the
cache is not hit), non-empty blocks, the layout's own memory (its CSR arrays) and the peak of
torch allocations during one build (torch.profiler memory events). For comparison, an N x N boolean mask at 1M tokens
is 1 TiB, and FlexAttention's BlockMask stores kv indices padded to NQB x NKB.
Writes benchmarks/results/layout_build.json (layout_build_gpu.json with --device cuda).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, write_json  # noqa: E402

from sparse_attn import patterns as P  # noqa: E402
from sparse_attn.eval.measure import PEAK_MEMORY_METHOD, peak_memory  # noqa: E402

W = 4096
PATTERNS = {
    "sliding_window_causal": lambda n: P.sliding_window(W, causal=True),
    "sliding_window": lambda n: P.sliding_window(W, causal=False),
    "longformer_g64": lambda n: P.longformer(W, 64),
    "streaming_4_sinks": lambda n: P.streaming(4, W),
    "dilated_r2": lambda n: P.dilated(W // 2, 2),
    "bigbird_128": lambda n: P.bigbird(128, seed=0),
    "document_64_docs": lambda n: P.document(torch.arange(n) // (n // 64)),
}


def layout_bytes(layout) -> int:
    return sum(t.numel() * t.element_size() for csr in (layout.full, layout.partial)
               for t in (csr.offsets, csr.counts, csr.indices, csr.rows))


def build(name: str, n: int, block: int, device: torch.device):
    layout = PATTERNS[name](n).layout(n, block_q=block, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return layout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, nargs="+", default=[1 << 20])
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", type=Path, default=None,
                    help="default benchmarks/results/layout_build.json (layout_build_gpu.json on cuda)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    out = args.json or RESULTS / ("layout_build.json" if device.type == "cpu" else "layout_build_gpu.json")
    rows = []
    print("| pattern | N | block | build ms (median) | nnz blocks | layout MiB | peak MiB during build |")
    print("|---|---|---|---|---|---|---|")
    for n in args.length:
        for name in args.patterns:
            try:
                rows.append(measure(name, n, args.block, args.repeats, device))
            except Exception as e:  # noqa: BLE001 - one pattern failing on a device is a result, not the end
                rows.append({"pattern": name, "N": n, "block": args.block, "error": f"{type(e).__name__}: {e}"})
                print(f"| {name} | {n} | {args.block} | error: {rows[-1]['error'][:100]} |", flush=True)
                continue
            row = rows[-1]
            growth = row["peak_build_bytes"]
            print(f"| {name} | {n} | {args.block} | {row['build_s'] * 1e3:.0f} | {row['nnz_blocks']} | "
                  f"{row['layout_bytes'] / 2**20:.1f} | {'-' if growth is None else f'{growth / 2**20:.0f}'} |",
                  flush=True)
    write_json(out, {"benchmark": "layout_build", "env": environment(args.device),
                     "peak_method": PEAK_MEMORY_METHOD[device.type], "rows": rows})
    return 0


def measure(name: str, n: int, block: int, repeats: int, device: torch.device) -> dict:
    build(name, 4096, block, device)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        layout = build(name, n, block, device)
        times.append(time.perf_counter() - t)
    peak = peak_memory(lambda: build(name, n, block, device), device)
    return {"pattern": name, "N": n, "block": block, "device": str(device), "build_s": statistics.median(times),
            "build_s_all": times, "nnz_blocks": layout.nnz_blocks(), "layout_bytes": layout_bytes(layout),
            "peak_build_bytes": peak, "dense_mask_bytes": n ** 2}


if __name__ == "__main__":
    sys.exit(main())
