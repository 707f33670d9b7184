"""GPU benchmark: block top-k attention (dynamic selection, then the triton block kernels)
against dense SDPA causal and FlexAttention on the same selection, in one process.

    PYTHONPATH=src python3 benchmarks/gpu_block_topk.py --out $OUT/gpu_block_topk.json

B=1, H=16, D=128, bf16, causal, selection blocks of --block-size (128), top_k_blocks =
--fraction (5%) of the kv blocks. Per length, medians (common.time_gpu) of the split, for the
path before issue #16 ("old": the layout from the bool selection table, which reads counts
back to the host, and the generic kernel plan, which deduplicates masks with unique and
builds the backward's transposed walk up front) and the device path ("new": the layout from
the picks with no host read, the plan for a forward without the transposed walk):
* select: `_select` (mean-pooling, scores, top-k with ties to the lowest block) as the new path
  runs it (one kernel after the scores' matmul: ops/topk/select_kernel.py); select_torch_ops:
  the same by torch ops (the old path's), and select_kernel_equals_torch_ops (bit-equal);
* old_layout / layout: `selection_layout` / `device_selection_layout` (what each call rebuilds),
  and layout_via_pattern: the layout classified from the selection's pattern (the generic
  path, which unaligned block sizes take);
* old_plan / plan: the triton kernel plan of a fresh layout;
* kernel: `sparse_attention(q, k, v, layout, backend="triton")` on a layout whose plan is
  cached (the kernel and its launch); flex_kernel: FlexAttention on a BlockMask of it;
* old_end_to_end: select + old layout + old plan + kernel, in one function;
  triton_end_to_end: `block_topk_attention(q, k, v, ..., backend="triton")` (the new path);
  new_end_to_end_over_kernel = triton_end_to_end / kernel (issue #16's goal: <= 1.10);
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
from sparse_attn.ops.topk import block as topk_block  # noqa: E402
from sparse_attn.ops.topk.block import (  # noqa: E402
    _select,
    device_selection_layout,
    selection_layout,
    selection_pattern,
)
from sparse_attn.patterns.grid import BlockGrid  # noqa: E402

F = torch.nn.functional


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--fraction", type=float, default=0.05, help="share of kv blocks each query block selects")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128, help="selection block (the kernels' blocks are 128)")
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu_block_topk.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_block_topk.py needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda", torch.cuda.current_device())
    BLOCK = args.block_size
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
        grid = BlockGrid(n, n, 0, 128, 128, dev)
        qf, kf, vf = (t.reshape(1, args.heads, n, args.dim) for t in (q, k, v))  # B = 1: folding is a view

        def select():  # the default: on CUDA one kernel after the scores' matmul (ops/topk/select_kernel.py)
            return _select(q, k, top_k, BLOCK, True, 0)

        def select_torch_ops():  # the same selection by ~14 torch ops (before the kernel)
            topk_block.SELECTION_KERNEL = False
            try:
                return _select(q, k, top_k, BLOCK, True, 0)
            finally:
                topk_block.SELECTION_KERNEL = None

        selection, picks = select()
        with torch.no_grad():
            sel_ops, picks_ops = select_torch_ops()
        row["select_kernel_equals_torch_ops"] = bool(torch.equal(selection, sel_ops) and torch.equal(picks, picks_ops))
        del sel_ops, picks_ops

        def old_layout():
            pattern = selection_pattern(selection, BLOCK, n, n, 0, causal=True)
            return selection_layout(selection, pattern, BLOCK, grid, causal=True)

        def new_layout():
            pattern = selection_pattern(selection, BLOCK, n, n, 0, causal=True)
            return device_selection_layout(selection, picks, pattern, BLOCK, grid, causal=True)

        def layout_via_pattern():
            pattern = selection_pattern(selection, BLOCK, n, n, 0, causal=True)
            return pattern.layout(n, n, block_q=128, block_kv=128, device=dev)

        def old_plan_of(layout):
            plan = TritonPlan(layout)
            plan.tensors(backward=True)  # built up front before issue #16
            return plan

        def old_end_to_end():
            sel, _ = select_torch_ops()
            pattern = selection_pattern(sel, BLOCK, n, n, 0, causal=True)
            layout = selection_layout(sel, pattern, BLOCK, grid, causal=True)
            layout.cache["triton"] = old_plan_of(layout)
            return sparse_attention(qf, kf, vf, layout, backend="triton")

        layout = new_layout()
        device_path = layout is not None
        row["device_path"] = device_path
        if not device_path:  # e.g. a selection block that is not a multiple of 128
            layout = layout_via_pattern()
        old = old_layout() if BLOCK % 128 == 0 else layout
        row["selected_pairs_fraction"] = float(layout.allowed_pairs().sum()) / (args.heads * n * n)
        timings = {
            "select": select,
            "select_torch_ops": select_torch_ops,
            "old_layout": old_layout if BLOCK % 128 == 0 else None,
            "layout": new_layout if device_path else None,
            "layout_via_pattern": layout_via_pattern,
            "old_plan": lambda: old_plan_of(old),
            "plan": lambda: TritonPlan(layout).tensors(backward=False),
            "kernel": lambda: sparse_attention(qf, kf, vf, layout, backend="triton"),
            "flex_kernel": lambda: sparse_attention(qf, kf, vf, layout, backend="flex"),
            "old_end_to_end": old_end_to_end if BLOCK % 128 == 0 else None,
            "triton_end_to_end": lambda: block_topk_attention(q, k, v, top_k, BLOCK, causal=True, backend="triton"),
            "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        }
        with torch.no_grad():
            for name, fn in timings.items():
                if fn is None:
                    continue
                try:
                    fn()  # compile / first call
                    row[f"{name}_ms"] = time_gpu(fn)[0] * 1e3
                except Exception as exc:  # recorded, the run goes on
                    row[f"{name}_error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            try:  # the device path end to end reads nothing back: checked, not assumed
                torch.cuda.set_sync_debug_mode("error")
                block_topk_attention(q, k, v, top_k, BLOCK, causal=True, backend="triton")
                row["new_end_to_end_host_syncs"] = 0
            except RuntimeError as exc:
                row["new_end_to_end_host_syncs"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            finally:
                torch.cuda.set_sync_debug_mode("default")
        for path in ("old", "new"):
            e2e = row.get("old_end_to_end_ms" if path == "old" else "triton_end_to_end_ms")
            if e2e is not None and row.get("kernel_ms"):
                row[f"{path}_end_to_end_over_kernel"] = e2e / row["kernel_ms"]
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
        del q, k, v, dout, qg, kg, vg, layout, selection, picks, old
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
