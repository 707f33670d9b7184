"""GPU benchmark: block top-k attention (dynamic selection, then the triton block kernels)
against dense SDPA causal and FlexAttention on the same selection, in one process.

    PYTHONPATH=src python3 benchmarks/gpu_block_topk.py --out $OUT/gpu_block_topk.json

B=1, H=16, D=128, bf16, causal, selection blocks of 128, top_k_blocks = --fraction (5%) of
the kv blocks. Per length, medians (common.time_gpu) of:
* select: `select_kv_blocks` alone (mean-pooling, scores, top-k);
* layout: the selection -> BlockLayout on the GPU (`selection_layout`, what each call
  rebuilds), and layout_via_pattern: the same layout classified from the selection's pattern
  (the generic path, which block top-k took before selection_layout);
* plan: the triton kernel plan (CSR, transposed CSR, one bitmask per mask class) of a fresh
  layout;
* triton_kernel / flex_kernel: `sparse_attention(q, k, v, layout, backend=...)` on that layout
  (our flex backend is FlexAttention fed a BlockMask made from the layout);
* triton_end_to_end: `block_topk_attention(q, k, v, ..., backend="triton")`: all of the above;
* sdpa_causal: dense causal SDPA;
forward, and forward+backward (`torch.autograd.grad`) for triton_end_to_end and sdpa_causal.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, progress, time_gpu, write_json  # noqa: E402

from sparse_attn import block_topk_attention, select_kv_blocks, sparse_attention  # noqa: E402
from sparse_attn.backends.triton.plan import TritonPlan  # noqa: E402
from sparse_attn.ops.topk.block import selection_layout, selection_pattern  # noqa: E402
from sparse_attn.patterns.grid import BlockGrid  # noqa: E402

F = torch.nn.functional
BLOCK = 128


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--fraction", type=float, default=0.05, help="share of kv blocks each query block selects")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu_block_topk.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_block_topk.py needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    result = {"env": environment("cuda"),
              "setup": f"B=1, H={args.heads}, D={args.dim}, bf16, causal, selection block {BLOCK}, "
                       f"top_k_blocks = ceil({args.fraction} * kv blocks)",
              "rows": []}
    for n in progress(args.lengths, desc="gpu_block_topk", unit="length"):
        gen = torch.Generator(device=dev).manual_seed(n)
        q, k, v, dout = (torch.randn(1, args.heads, n, args.dim, device=dev, dtype=torch.bfloat16, generator=gen)
                         for _ in range(4))
        top_k = max(1, math.ceil(args.fraction * (n // BLOCK)))
        row = {"N": n, "top_k_blocks": top_k, "kv_blocks": n // BLOCK}

        def select():
            return select_kv_blocks(q, k, top_k, BLOCK, causal=True)

        selection = select()

        def build_layout():
            pattern = selection_pattern(selection, BLOCK, n, n, 0, causal=True)
            return selection_layout(selection, pattern, BLOCK, BlockGrid(n, n, 0, BLOCK, BLOCK, dev), causal=True)

        def build_layout_via_pattern():
            pattern = selection_pattern(selection, BLOCK, n, n, 0, causal=True)
            return pattern.layout(n, n, block_q=BLOCK, block_kv=BLOCK, device=dev)

        layout = build_layout()
        row["selected_pairs_fraction"] = float(layout.allowed_pairs().sum()) / (args.heads * n * n)
        timings = {
            "select": select,
            "layout": build_layout,
            "layout_via_pattern": build_layout_via_pattern,
            "plan": lambda: TritonPlan(layout),
            "triton_kernel": lambda: sparse_attention(q, k, v, layout, backend="triton"),
            "flex_kernel": lambda: sparse_attention(q, k, v, layout, backend="flex"),
            "triton_end_to_end": lambda: block_topk_attention(q, k, v, top_k, BLOCK, causal=True, backend="triton"),
            "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        }
        with torch.no_grad():
            for name, fn in timings.items():
                try:
                    fn()  # compile / first call
                    row[f"{name}_ms"] = time_gpu(fn)[0] * 1e3
                except Exception as exc:  # recorded, the run goes on
                    row[f"{name}_error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
        for name, fwd in (("triton_end_to_end", lambda: block_topk_attention(qg, kg, vg, top_k, BLOCK, causal=True,
                                                                              backend="triton")),
                          ("sdpa_causal", lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=True))):
            def fwd_bwd(fwd=fwd):
                torch.autograd.grad(fwd(), (qg, kg, vg), dout)

            try:
                fwd_bwd()
                row[f"{name}_fwd_bwd_ms"] = time_gpu(fwd_bwd)[0] * 1e3
            except Exception as exc:
                row[f"{name}_fwd_bwd_error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        if "sdpa_causal_ms" in row and "triton_end_to_end_ms" in row:
            row["speedup_vs_sdpa_causal"] = row["sdpa_causal_ms"] / row["triton_end_to_end_ms"]
        if "sdpa_causal_fwd_bwd_ms" in row and "triton_end_to_end_fwd_bwd_ms" in row:
            row["speedup_vs_sdpa_causal_fwd_bwd"] = row["sdpa_causal_fwd_bwd_ms"] / row["triton_end_to_end_fwd_bwd_ms"]
        print({key: round(val, 3) if isinstance(val, float) else val for key, val in row.items()}, file=sys.stderr)
        result["rows"].append(row)
        write_json(args.out, result)
        del q, k, v, dout, qg, kg, vg, layout, selection
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
