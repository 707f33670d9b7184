"""Measure the triton backend's tile configurations per head dim and phase (GPU only).

    PYTHONPATH=src python3 benchmarks/tune_triton.py --out benchmarks/results/tune_triton.json

For each padded head dim (64, 128, 256) and phase (forward, backward dq, backward dk/dv, fused
backward), time
every candidate (BM, BN, num_warps, num_stages) on a causal sliding window of 4096 at 32K
tokens (B=1, H=16, bf16; 16K for D=256), one phase varied at a time with the others at the
table's current entry, median of triton.testing.do_bench. Also times both grid orders
(heads fastest or query tiles fastest) on the window and on Longformer (64 globals), and our
flex backend on the same layouts as a yardstick. configs.TUNED is written from the result by
hand (the script prints the winners); the JSON keeps every candidate's time.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_ms, environment, write_json  # noqa: E402

import sparse_attn  # noqa: E402
from sparse_attn import patterns as P  # noqa: E402
from sparse_attn.backends.triton import configs, ops  # noqa: E402
from sparse_attn.backends.triton.plan import get_plan  # noqa: E402

C = configs.TileConfig
CANDIDATES = {
    "fwd": [C(128, 64, 8, 3), C(128, 64, 8, 4), C(128, 64, 4, 3), C(128, 128, 8, 3), C(128, 128, 8, 2),
            C(64, 64, 4, 3), C(64, 128, 4, 3), C(128, 32, 4, 4)],
    "dq": [C(128, 64, 8, 2), C(128, 64, 8, 3), C(128, 32, 8, 3), C(128, 32, 4, 3), C(64, 64, 4, 3), C(64, 32, 4, 4),
           C(128, 128, 8, 2)],
    "dkdv": [C(64, 128, 8, 2), C(64, 128, 8, 3), C(32, 128, 4, 3), C(64, 64, 4, 3), C(32, 64, 4, 4),
             C(128, 128, 8, 2), C(64, 128, 4, 3), C(32, 64, 4, 3), C(64, 64, 4, 4), C(32, 128, 8, 3)],
}
# the fused backward: dk/dv's walk plus atomic dQ; 8 warps added since its register pressure is higher
# (compiled for sm_90 with triton 3.9, D=128 64x64: 1720 bytes of stack with 4 warps, 704 with 8)
CANDIDATES["fused"] = CANDIDATES["dkdv"] + [C(64, 64, 8, 2), C(64, 64, 8, 3), C(32, 128, 8, 2), C(128, 64, 8, 2),
                                           C(64, 128, 8, 1), C(64, 128, 4, 2)]
SMALL = {  # D=256: tiles that fit shared memory
    "fwd": [C(64, 64, 8, 2), C(64, 64, 4, 2), C(128, 32, 8, 2), C(64, 32, 4, 3), C(128, 64, 8, 2)],
    "dq": [C(64, 32, 4, 2), C(64, 64, 8, 2), C(32, 32, 4, 3), C(128, 32, 8, 2), C(64, 32, 8, 2)],
    "dkdv": [C(32, 64, 4, 2), C(32, 128, 8, 2), C(64, 64, 8, 2), C(16, 64, 4, 3), C(32, 64, 8, 2)],
}
SMALL["fused"] = SMALL["dkdv"] + [C(64, 32, 8, 2)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/tune_triton.json"))
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 64, 256])
    ap.add_argument("--length", type=int, default=32768, help="N for head dims up to 128 (D=256: N/2)")
    ap.add_argument("--sections", nargs="+", choices=["tiles", "grid"], default=["tiles", "grid"],
                    help="tiles: every candidate per phase; grid: grid orders and our flex backend")
    args = ap.parse_args(argv)
    dev = "cuda"
    rows, best = [], {}
    payload = {"env": environment(dev), "rows": rows, "best": best,
               "setup": f"B=1, H=16, bf16, causal window 4096; N={args.length} ({args.length // 2} for D=256); "
                        "median ms of do_bench"}
    for d in (args.dims if "tiles" in args.sections else []):
        n = args.length // 2 if d > 128 else args.length
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 16, n, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
        dout = torch.randn_like(q)
        layout = P.sliding_window(4096).layout(n, block_q=128, block_kv=128, device=dev)
        plan = get_plan(layout)
        scale = d ** -0.5
        out, lse = ops.triton_attention(q, k, v, layout, scale)
        bwd_args = (dout, None, q, k, v, out, lse, *plan.tensors(), scale, 128, 128, False, *plan.flags())
        table = configs.TUNED.setdefault(d, dict(configs.TUNED[128]))
        best[d] = {}
        for phase in ("fwd", "dq", "dkdv", "fused"):
            fn = {"fwd": lambda: ops.triton_attention(q, k, v, layout, scale),
                  "fused": lambda: ops.block_sparse_attn_bwd_fused(*bwd_args)}.get(
                phase, lambda: ops.block_sparse_attn_bwd(*bwd_args))
            results = []
            for cfg in (SMALL if d > 128 else CANDIDATES)[phase]:
                table[phase] = cfg
                try:
                    ms = bench_ms(fn)
                    err = None
                except Exception as e:  # out of shared memory etc.: record and go on
                    ms, err = None, f"{type(e).__name__}: {str(e)[:200]}"
                row = {"D": d, "N": n, "phase": phase, **vars(cfg), "ms": ms, "error": err}
                rows.append(row)
                results.append((ms if ms is not None else float("inf"), cfg))
                print(row, flush=True)
            table[phase] = min(results, key=lambda r: r[0])[1]
            best[d][phase] = {**vars(table[phase]), "ms": min(results, key=lambda r: r[0])[0]}
            write_json(args.out, payload)
        del q, k, v, dout, out, lse
        torch.cuda.empty_cache()

    if "grid" not in args.sections:
        print("best:", best)
        return 0
    # grid order, and our flex backend as the yardstick, at D=128
    n, d = args.length, 128
    q, k, v = (torch.randn(1, 16, n, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    for name, pattern in (("window4096", P.sliding_window(4096)), ("longformer4096_g64", P.longformer(4096, 64))):
        layout = pattern.layout(n, block_q=128, block_kv=128, device=dev)
        plan = get_plan(layout)
        chosen = plan.flags()
        for q_fast, kv_fast in itertools.product((False, True), repeat=2):
            plan.q_heads_fastest, plan.kv_heads_fastest = q_fast, kv_fast
            with torch.no_grad():
                fwd = bench_ms(lambda: sparse_attn.sparse_attention(q, k, v, layout, backend="triton"))
            both = bench_ms(lambda: torch.autograd.grad(sparse_attn.sparse_attention(q, k, v, layout, backend="triton"),
                                                     (q, k, v), dout))
            row = {"pattern": name, "N": n, "D": d, "q_heads_fastest": q_fast, "kv_heads_fastest": kv_fast,
                   "chosen_by_plan": [q_fast, kv_fast] == chosen, "fwd_ms": fwd, "fwd_bwd_ms": both}
            rows.append(row)
            print(row, flush=True)
        plan.q_heads_fastest, plan.kv_heads_fastest = chosen
        with torch.no_grad():
            fwd = bench_ms(lambda: sparse_attn.sparse_attention(q, k, v, layout, backend="flex"))
        both = bench_ms(lambda: torch.autograd.grad(sparse_attn.sparse_attention(q, k, v, layout, backend="flex"),
                                                 (q, k, v), dout))
        row = {"pattern": name, "N": n, "D": d, "method": "sparse_attn_flex", "fwd_ms": fwd, "fwd_bwd_ms": both}
        rows.append(row)
        print(row, flush=True)
        write_json(args.out, payload)
    print("best:", best)
    return 0


if __name__ == "__main__":
    sys.exit(main())
