"""Context-parallel traffic from the planner: bytes of k/v each rank receives per layer in the
forward (the backward returns as many bytes of dK/dV) for the patterns of gpu_patterns.py,
against a ring and an all-gather (every rank receives every other shard's k and v) and Ulysses
(q, k, v of the shard for the other ranks' heads, plus the outputs back). No tensors are
allocated: this is the plan's count, which the gloo tests check equals the bytes actually sent.

    PYTHONPATH=src python3 benchmarks/cp_traffic.py                       # writes results/cp_traffic.json
    PYTHONPATH=src python3 benchmarks/cp_traffic.py --lengths 131072 --world-sizes 8

B=1, Hq=16, Hkv=8, D=Dv=128, bf16, blocks of 128 (the triton backend's on CUDA). The sharding is
the one `choose_sharding` picks (contiguous for bands, head-tail for causal, balanced on row
costs otherwise); `plan` is the most any rank receives (the planner sends each needed key once:
at key granularity the analytic minimum for that sharding); ring / all-gather: (N - N_r) keys.
With global rows (issue #19: rows attending more than half of the other ranks' keys are computed
where their keys are; their q rows go out and partial out + lse come back), `plan` counts those
messages too, and is the plan `global_rows="auto"` takes: the one whose worst rank receives less;
`key_plan_bytes_max` is the plan without global rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, write_json  # noqa: E402

from sparse_attn import patterns as P  # noqa: E402
from sparse_attn.distributed import choose_scheme, choose_sharding, plan_context_parallel  # noqa: E402
from sparse_attn.distributed.ulysses import ulysses_bytes  # noqa: E402

PATTERNS = {  # gpu_patterns.py's, less strided512 (every query block touches every earlier kv block
    # partially: its plan needs O(N^2 / 128) element-mask work on the CPU)
    "window4096_causal": "P.sliding_window(4096)",
    "longformer4096_g64": "P.longformer(4096, 64)",
    "bigbird128": "P.bigbird(128)",
    "dilated4096_r2_causal": "P.dilated(4096, 2)",
    "causal": "P.causal()",
}
B, HQ, HKV, D, ITEMSIZE, BLOCK = 1, 16, 8, 128, 2, 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[131072, 524288, 1048576])
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--max-nonlocal", type=int, default=131072,
                    help="longest N for the patterns other than the window (causal's layout has N^2/2 blocks; "
                         "the dilated band's blocks are all partial: their element masks take many minutes on a CPU "
                         "past it)")
    ap.add_argument("--out", type=Path, default=RESULTS / "cp_traffic.json")
    args = ap.parse_args()
    rows = []
    for name, code in PATTERNS.items():
        for n in args.lengths:
            if name != "window4096_causal" and n > args.max_nonlocal:
                continue
            pattern = eval(code, {"P": P})
            t0 = time.perf_counter()
            layout = pattern.layout(n, block_q=BLOCK)
            for p in args.world_sizes:
                sharding = choose_sharding(pattern, layout, n, p, BLOCK)
                plan = plan_context_parallel(layout, sharding, HKV)  # keys per GQA group for per-head layouts
                per_key = plan.bytes_per_key(B, HKV, D, D, ITEMSIZE)
                dims = dict(batch=B, q_heads=HQ, kv_heads=HKV, head_dim=D, v_head_dim=D, itemsize=ITEMSIZE,
                            lse_itemsize=4)
                key_received = plan.forward_bytes_received(**dims)
                received, global_in = key_received, None
                with_global = plan_context_parallel(layout, sharding, HKV, global_rows=True)
                if with_global.has_global_rows:
                    g_received = with_global.forward_bytes_received(**dims)
                    if int(g_received.max()) < int(key_received.max()):  # what global_rows="auto" takes
                        plan, received = with_global, g_received
                        g = plan.global_bytes(B, HQ, D, D, ITEMSIZE, 4)
                        global_in = g["gq"][1] + g["gout"][1]
                ring = max(n - sharding.length(r) for r in range(p)) * B * HKV * 2 * D * ITEMSIZE
                u = ulysses_bytes(sharding, B, HQ, HKV, D, D, ITEMSIZE)
                row = dict(pattern=name, code=code, n=n, world_size=p,
                           sharding=("contiguous" if len(set(map(len, sharding.runs))) == 1
                                     and len(sharding.runs[0]) == 1 and max(sharding.lengths()) - min(sharding.lengths()) <= BLOCK
                                     else "zigzag" if name == "causal" else "balanced"),
                           plan_bytes_max=int(received.max()), plan_bytes_mean=float(received.double().mean()),
                           key_plan_bytes_max=int(key_received.max()),
                           global_rows=sum(int(r.numel()) for r in plan.global_rows.values()),
                           ring_bytes=ring, all_gather_bytes=ring, ulysses_bytes=u,
                           busy_pairs=plan.busy_pairs(), max_hop=plan.max_hop(),
                           scheme=choose_scheme(plan, HQ % p == 0 and HKV % p == 0, u, per_key, global_in),
                           key_groups=plan.groups,
                           plan_seconds=round(time.perf_counter() - t0, 2))
                rows.append(row)
                print(f"{name:24s} N={n:>8d} P={p}  plan {row['plan_bytes_max'] / 1e6:8.1f} MB  ring/all-gather "
                      f"{ring / 1e6:8.1f} MB  ulysses {u / 1e6:7.1f} MB  global rows {row['global_rows']}  "
                      f"-> {row['scheme']}", flush=True)
                t0 = time.perf_counter()
    write_json(args.out, dict(benchmark="cp_traffic", units="bytes received per rank per layer, forward",
                              shapes=dict(batch=B, q_heads=HQ, kv_heads=HKV, head_dim=D, dtype="bfloat16", block=BLOCK),
                              environment=environment(), rows=rows))


if __name__ == "__main__":
    main()
