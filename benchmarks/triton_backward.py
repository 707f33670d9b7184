"""The triton backend's two backwards on the GPU: the fused one-pass backward (default,
atomic fp32 dQ) against the three-launch deterministic one (deterministic=True).

    PYTHONPATH=src python3 benchmarks/triton_backward.py --out benchmarks/results/triton_backward.json

Per pattern (B=1, H=16, Hkv as given, D=128, bf16, 128 x 128 blocks): backward-only time (the
custom backward op on saved out/lse, median of triton.testing.do_bench) for both paths,
fwd+bwd through autograd for both, the speedup, and the largest |difference| of dQ between
the two paths (dK/dV too), as a fraction of max |dQ|. TFLOP/s, effective: backward =
2.5 x forward = 10*D*allowed_pairs_total / time (5 GEMMs of 2*D FLOPs per allowed pair, the
algorithmic count; the three-launch path really does 7), allowed_pairs_total =
B*H*(allowed (q, k) pairs per head).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, bench_ms, environment, write_json  # noqa: E402

import sparse_attn  # noqa: E402
from sparse_attn import patterns as P  # noqa: E402
from sparse_attn.backends.triton import ops  # noqa: E402
from sparse_attn.backends.triton.plan import get_plan  # noqa: E402

CASES = [  # name, pattern expression, N, Hkv
    ("window4096_causal", "P.sliding_window(4096)", 32768, 16),
    ("window4096_causal_gqa4", "P.sliding_window(4096)", 32768, 4),
    ("causal", "P.causal()", 16384, 16),
    ("window1024_causal", "P.sliding_window(1024)", 4096, 16),
    ("longformer4096_g64", "P.longformer(4096, 64)", 32768, 16),
    ("bigbird64", "P.bigbird(64, seed=0)", 16384, 16),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS / "triton_backward.json")
    ap.add_argument("--only", nargs="*", help="case names to run (default: all)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("triton_backward.py needs a CUDA device", file=sys.stderr)
        return 2
    dev, h, d = "cuda", 16, 128
    payload = {"env": environment(dev), "rows": [],
               "setup": "B=1, H=16, D=128, bf16, 128x128 blocks; median ms of triton.testing.do_bench",
               "flops": "effective TFLOP/s (bwd) = 10*D*allowed_pairs_total / bwd_time; allowed_pairs_total = "
                        "B*H*(allowed pairs per head)"}
    for name, expr, n, hkv in CASES:
        if args.only and name not in args.only:
            continue
        torch.manual_seed(0)
        q = torch.randn(1, h, n, d, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
        dout = torch.randn_like(q)
        layout = eval(expr, {"P": P}).layout(n, n, block_q=128, block_kv=128, device=dev)  # noqa: S307
        plan = get_plan(layout)
        scale = d ** -0.5
        out, lse = ops.triton_attention(q, k, v, layout, scale)
        bwd_args = (dout, None, q, k, v, out, lse, *plan.tensors(), scale, 128, 128, layout.num_heads > 1,
                    *plan.flags())
        pairs = float(layout.allowed_pairs().double().sum()) * (h if layout.num_heads == 1 else 1)
        row = {"case": name, "pattern": expr, "N": n, "H": h, "Hkv": hkv, "D": d, "allowed_pairs_total": pairs}
        grads = {}
        for label, op in (("fused", ops.block_sparse_attn_bwd_fused), ("deterministic", ops.block_sparse_attn_bwd)):
            ms = bench_ms(lambda: op(*bwd_args))
            grads[label] = op(*bwd_args)
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            both = bench_ms(lambda: torch.autograd.grad(
                sparse_attn.sparse_attention(qq, kk, vv, layout, backend="triton",
                                             deterministic=label == "deterministic"), (qq, kk, vv), dout))
            row[f"{label}_bwd_ms"], row[f"{label}_fwd_bwd_ms"] = ms, both
            row[f"{label}_bwd_tflops"] = 10 * d * pairs / (ms * 1e-3) / 1e12
        row["bwd_speedup"] = row["deterministic_bwd_ms"] / row["fused_bwd_ms"]
        row["fwd_bwd_speedup"] = row["deterministic_fwd_bwd_ms"] / row["fused_fwd_bwd_ms"]
        for i, g in enumerate("qkv"):
            a, b = grads["fused"][i].float(), grads["deterministic"][i].float()
            row[f"d{g}_max_rel_diff"] = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
        again = ops.block_sparse_attn_bwd(*bwd_args)
        row["deterministic_bitwise_repeat"] = all(torch.equal(x, y) for x, y in zip(again, grads["deterministic"]))
        payload["rows"].append(row)
        print({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)
        write_json(args.out, payload)
        del q, k, v, dout, out, lse, grads, again
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
