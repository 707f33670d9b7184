"""CPU benchmark: time and peak memory against length for every non-pattern mechanism, with
dense SDPA and the sliding window as yardsticks, in one process.

    python benchmarks/cpu_mechanisms.py                       # N in 1K 4K 16K 64K, ~10 min on 2 cores
    python benchmarks/cpu_mechanisms.py --lengths 1024 4096 --mechanisms linear performer_256
    python benchmarks/cpu_mechanisms.py --update --mechanisms performer_256   # re-measure some rows in place

B=1, H=4, D=64, fp32, forward only (torch.no_grad). Each row: median seconds of
`common.time_cpu` (torch.utils.benchmark, after a warm-up call), peak torch allocation during one
call beyond the inputs (torch.profiler memory, as `sparse-attn compare`), and whether that peak
reaches the N^2 bytes a dense fp32 score matrix of one head would take (`n2_bytes`). Calls whose
estimated time is past --max-call-s (from the previous length, scaled by the mechanism's
complexity) are skipped and listed in `skipped`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, progress, time_cpu, write_json  # noqa: E402

import sparse_attn  # noqa: E402
from sparse_attn import patterns as P  # noqa: E402
from sparse_attn.ops.routing import routing_sizes  # noqa: E402
from sparse_attn.eval.measure import peak_memory  # noqa: E402

F = torch.nn.functional


# name -> (complexity exponent in N for the time estimate, call builder)
MECHANISMS = {
    "sdpa": (2, lambda n: lambda q, k, v: F.scaled_dot_product_attention(q, k, v)),
    "sdpa_causal": (2, lambda n: lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
    "sliding_window_256": (1, lambda n: _pattern_call(P.sliding_window(256))),
    "linear": (1, lambda n: _mech("linear")),
    "linear_causal": (1, lambda n: _mech("linear", causal=True)),
    "performer_256": (1, lambda n: _mech("performer", num_features=256, generator=torch.Generator().manual_seed(0))),
    "performer_256_causal": (1, lambda n: _mech("performer", num_features=256, causal=True,
                                                 generator=torch.Generator().manual_seed(0))),
    "topk_64_causal": (2, lambda n: _mech("topk", top_k=64, causal=True)),
    "block_topk_8x64_causal": (2, lambda n: _mech("block_topk", top_k_blocks=8, block_size=64, causal=True)),
    "lsh_b64_h4": (1, lambda n: _mech("lsh", bucket_size=64, n_hashes=4, seed=0)),
    "lsh_b64_h4_causal": (1, lambda n: _mech("lsh", bucket_size=64, n_hashes=4, causal=True, seed=0)),
    "routing_causal": (1.5, lambda n: _mech("routing", causal=True, **routing_sizes(n))),
}
LINEAR_GOAL = ("linear", "linear_causal", "performer_256", "performer_256_causal")


def _pattern_call(pattern):
    return lambda q, k, v: sparse_attn.sparse_attention(q, k, v, pattern)


def _mech(name, **params):
    m = sparse_attn.Mechanism(name, **params)
    return lambda q, k, v: m(q, k, v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--mechanisms", nargs="+", default=list(MECHANISMS), choices=list(MECHANISMS))
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-call-s", type=float, default=60.0, help="skip calls estimated to take longer")
    ap.add_argument("--no-memory", dest="memory", action="store_false")
    ap.add_argument("--out", type=Path, default=RESULTS / "cpu_mechanisms.json")
    ap.add_argument("--update", action="store_true",
                    help="keep the other rows of --out and replace only the (mechanism, N) rows run now")
    args = ap.parse_args(argv)

    result = {"env": environment("cpu"), "setup": f"B=1, H={args.heads}, D={args.dim}, fp32, forward, no_grad",
              "time": "median of torch.utils.benchmark Timer runs after one warm-up call",
              "peak": "torch.profiler(profile_memory=True): max running sum of torch CPU allocations in one call",
              "rows": [], "skipped": []}
    if args.update and args.out.exists():
        kept = json.loads(args.out.read_text())
        ran = {(m, n) for m in args.mechanisms for n in args.lengths}
        result["rows"] = [r for r in kept["rows"] if (r["mechanism"], r["N"]) not in ran]
        result["skipped"] = [r for r in kept.get("skipped", []) if (r["mechanism"], r["N"]) not in ran]
        result["updated"] = kept.get("updated", []) + [{"date": result["env"]["date"], "rows": sorted(ran)}]
        result["env"]["first_run"] = kept["env"]
    last: dict[str, tuple[int, float]] = {}  # mechanism -> (N, seconds) of its last run
    jobs = [(n, name) for n in sorted(args.lengths) for name in args.mechanisms]
    for n, name in progress(jobs, desc="cpu_mechanisms", unit="call"):
        exponent, build = MECHANISMS[name]
        if name in last:
            n0, s0 = last[name]
            estimate = s0 * (n / n0) ** exponent
            if estimate > args.max_call_s:
                result["skipped"].append({"mechanism": name, "N": n, "estimated_s": estimate})
                continue
        gen = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, args.heads, n, args.dim, generator=gen) for _ in range(3))
        fn = build(n)
        row = {"mechanism": name, "N": n, "n2_bytes": 4 * n * n}
        try:
            with torch.no_grad():
                t0 = time.perf_counter()
                fn(q, k, v)  # warm-up (layouts, plans)
                row["first_call_s"] = time.perf_counter() - t0
                row["seconds"] = time_cpu(lambda: fn(q, k, v), repeats=args.repeats)
                if args.memory:
                    row["peak_bytes"] = peak_memory(lambda: fn(q, k, v), torch.device("cpu"))
                    row["peak_below_n2"] = row["peak_bytes"] is not None and row["peak_bytes"] < row["n2_bytes"]
        except Exception as exc:  # recorded, the run goes on
            row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        if "seconds" in row:
            last[name] = (n, row["seconds"])
            print(f"N={n:>6} {name:<24} {row['seconds'] * 1e3:10.1f} ms  peak "
                  f"{(row.get('peak_bytes') or 0) / 2**20:8.1f} MiB", file=sys.stderr)
        result["rows"].append(row)
        write_json(args.out, result)
    result["rows"].sort(key=lambda r: (r["N"], list(MECHANISMS).index(r["mechanism"])))
    result["goals"] = goals(result["rows"])
    write_json(args.out, result)
    return 0


def goals(rows: list[dict]) -> dict:
    """Issue #5's CPU goals, evaluated on the rows: linear scaling 16K -> 64K (<= 5x), >= 10x
    faster than dense SDPA at 16K, and no N^2 allocation for topk / LSH / routing."""
    t = {(r["mechanism"], r["N"]): r.get("seconds") for r in rows}
    out = {}
    for name in LINEAR_GOAL:
        s16, s64 = t.get((name, 16384)), t.get((name, 65536))
        dense = t.get(("sdpa_causal" if "causal" in name else "sdpa", 16384))
        out[name] = {"time_64k_over_16k": s64 / s16 if s16 and s64 else None,
                     "speedup_vs_dense_at_16k": dense / s16 if dense and s16 else None}
    for r in rows:
        if r["mechanism"].startswith(("topk", "lsh", "routing", "block_topk")) and "peak_bytes" in r:
            out.setdefault("peak_below_n2", {})[f"{r['mechanism']}@{r['N']}"] = r["peak_below_n2"]
    return out


if __name__ == "__main__":
    sys.exit(main())
