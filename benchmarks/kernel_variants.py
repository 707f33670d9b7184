"""Issue #16's kernel variants side by side with today's kernels, one phase at a time (GPU only).

    PYTHONPATH=src python3 benchmarks/kernel_variants.py --out $OUT/kernel_variants.json

Causal sliding window 4096, B=1, H=16, D=128, bf16, 128 x 128 layout blocks, at 32K and 128K
(--lengths). Each variant is a `configs.VARIANTS` entry: per-phase overrides of the tuned tiles
(`configs.OVERRIDES`): a persistent grid of 1 or 2 programs per SM draining the busiest-first
work list by static stride (persistentK) or from an atomic counter (queueK), dq on wider kv
tiles with 8 warps, the fused backward with a register cap. Timed, median of
triton.testing.do_bench:
  fwd    the forward op (block_sparse_attn_fwd: one launch)
  dq     the deterministic backward op (preprocess + dq + dk/dv launches), dq kernel varied
  dkdv   the same op, dk/dv kernel varied
  fused  the fused backward op (preprocess + one dk/dv+dQ launch + dQ conversion)
The baseline (today's tables, no overrides) of every phase is timed first and again last, so
the drift of the machine is visible (`baseline_ms`, `baseline_again_ms`). Per variant: ms,
speedup = baseline / variant (> 1: the variant is faster), and its outputs against the
baseline's (max |diff| / max |baseline|; `bitwise`: equal bit for bit: persistent grids
change no arithmetic, so they must be). The JSON is rewritten after every row.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_ms, environment, write_json  # noqa: E402

from sparse_attn import patterns as P  # noqa: E402
from sparse_attn.backends.triton import configs, ops  # noqa: E402
from sparse_attn.backends.triton.plan import get_plan  # noqa: E402

PHASES = ("fwd", "dq", "dkdv", "fused")


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _time_once_ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/kernel_variants.json"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    ap.add_argument("--variants", nargs="*", help="configs.VARIANTS names (default: every one of the phases)")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--budget-s", type=float, default=270.0,
                    help="start no new variant after this many seconds (the JSON keeps what was measured)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script under TRITON_INTERPRET=1")
    args = ap.parse_args(argv)
    if args.device == "cpu":  # tiny shapes in the interpreter: checks the script, times nothing real
        global bench_ms
        bench_ms = _time_once_ms
    elif not torch.cuda.is_available():
        print("kernel_variants.py needs a CUDA device", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    dev, h, d = args.device, args.heads, args.dim
    names = args.variants or [n for n, v in configs.VARIANTS.items() if set(v) & set(args.phases)]
    rows: list[dict] = []
    payload = {"env": environment(dev), "rows": rows, "variants": {n: configs.VARIANTS[n] for n in names},
               "tuned": {ph: vars(configs.tile_config(128, ph, 128, 128, interpreted=False)) for ph in PHASES},
               "setup": f"causal sliding window {args.window}, B=1, H={h}, D={d}, bf16, 128x128 blocks; "
                        "median ms of triton.testing.do_bench; speedup = baseline_ms / ms"}
    for n in args.lengths:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, h, n, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
        dout = torch.randn_like(q)
        layout = P.sliding_window(args.window).layout(n, block_q=128, block_kv=128, device=dev)
        plan = get_plan(layout)
        fixed = (d ** -0.5, 128, 128, False, *plan.flags())
        fwd_args = (q, k, v, *plan.tensors(), *fixed, False)
        configs.OVERRIDES = {}
        out, lse = ops.block_sparse_attn_fwd(*fwd_args)
        bwd_args = (dout, None, q, k, v, out, lse, *plan.tensors(), *fixed)
        ops_of = {"fwd": lambda: ops.block_sparse_attn_fwd(*fwd_args),
                  "dq": lambda: ops.block_sparse_attn_bwd(*bwd_args),
                  "dkdv": lambda: ops.block_sparse_attn_bwd(*bwd_args),
                  "fused": lambda: ops.block_sparse_attn_bwd_fused(*bwd_args)}
        base, ref = {}, {}
        for ph in args.phases:
            ref[ph] = ops_of[ph]()
            base[ph] = bench_ms(ops_of[ph])
            row = {"N": n, "phase": ph, "variant": "baseline", "ms": base[ph], "speedup": 1.0}
            rows.append(row)
            print(row, flush=True)
        write_json(args.out, payload)
        for name in names:
            for ph, over in configs.VARIANTS[name].items():
                if ph not in args.phases:
                    continue
                row = {"N": n, "phase": ph, "variant": name, "overrides": over, "baseline_ms": base[ph]}
                if time.perf_counter() - t_start > args.budget_s:
                    row["error"] = "skipped: --budget-s reached"
                    rows.append(row)
                    continue
                configs.OVERRIDES = {ph: over}
                try:
                    got = ops_of[ph]()
                    got = got if isinstance(got, tuple) else (got,)
                    want = ref[ph] if isinstance(ref[ph], tuple) else (ref[ph],)
                    row["rel_diff"] = [_rel(a, b) for a, b in zip(got, want)]
                    row["bitwise"] = all(torch.equal(a, b) for a, b in zip(got, want))
                    row["ms"] = bench_ms(ops_of[ph])
                    row["speedup"] = base[ph] / row["ms"]
                except Exception as e:  # out of shared memory, compile failure: record and go on
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                finally:
                    configs.OVERRIDES = {}
                rows.append(row)
                print({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)
                write_json(args.out, payload)
        for ph in args.phases:  # the baseline again: how far the machine drifted during the run
            again = bench_ms(ops_of[ph])
            for row in rows:
                if row["N"] == n and row["phase"] == ph and row["variant"] == "baseline":
                    row["baseline_again_ms"] = again
        write_json(args.out, payload)
        del q, k, v, dout, out, lse, ref, bwd_args, fwd_args, ops_of
        torch.cuda.empty_cache()
    payload["wall_s"] = time.perf_counter() - t_start
    write_json(args.out, payload)
    best = {}
    for row in rows:
        if "speedup" in row and row["variant"] != "baseline":
            key = (row["N"], row["phase"])
            if row["speedup"] > best.get(key, ("", 0.0))[1]:
                best[key] = (row["variant"], row["speedup"])
    for (n, ph), (name, sp) in sorted(best.items()):
        print(f"N={n} {ph}: best variant {name} at {sp:.3f}x the baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
