"""CPU benchmark of the pattern backends against FlexAttention and SDPA, in one process.

    python benchmarks/cpu_patterns.py                       # N = 4K, 16K, 64K (about 15 min)
    python benchmarks/cpu_patterns.py --lengths 4096 --no-flex

For each length and pattern (B=1, H=8, D=64, fp32):
* `blocked` forward through `sparse_attention(q, k, v, pattern)` (default blocks, layout cached
  on the pattern): first call (layout + plan + compute, no compile) and median of repeats;
  forward+backward at the lengths in --grad-lengths;
* FlexAttention, torch.compile'd on CPU, with a BlockMask built from our layout (the same
  blocks and mask_mod FlexAttention's create_block_mask would produce, without its O(N^2)
  build); its first call includes the compile;
* SDPA with the equivalent dense boolean mask, where the mask fits (--max-dense);
* peak memory of the blocked forward beyond the inputs (torch allocations during one call,
  from torch.profiler's memory events: `sparse_attn.eval.measure.peak_memory`);
* max abs error against the float64 reference on the first and last 128 query rows.
FLOPs: effective = 4*B*H*D*(allowed pairs); dense-equivalent = 4*B*H*D*N^2.
Writes benchmarks/results/cpu_patterns.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, fmt_mib, fmt_ms, progress, time_cpu, time_once, write_json  # noqa: E402

import sparse_attn  # noqa: E402
from sparse_attn import patterns as P  # noqa: E402
from sparse_attn.eval.measure import peak_memory  # noqa: E402

B, H, D = 1, 8, 64
PATTERNS = {
    "window256_causal": lambda: P.sliding_window(256, causal=True),
    "window256": lambda: P.sliding_window(256, causal=False),
    "longformer256_g16": lambda: P.longformer(256, 16),
    "bigbird64": lambda: P.bigbird(64, num_window_blocks=3, num_global_blocks=2, num_random_blocks=3, seed=0),
    "dilated128_r2_causal": lambda: P.dilated(128, 2, causal=True),
}


def inputs(n: int, requires_grad: bool = False):
    gen = torch.Generator().manual_seed(n)
    return [torch.randn(B, H, n, D, generator=gen).requires_grad_(requires_grad) for _ in range(3)]


def reference_error(out: torch.Tensor, q, k, v, pattern, rows: int = 128) -> float:
    """Max abs error of `out` on the first and last `rows` queries vs the float64 reference."""
    n = q.shape[2]
    err = 0.0
    for start in (0, max(0, n - rows)):
        stop = min(n, start + rows)
        ref = sparse_attn.sparse_attention(q[:, :, start:stop].double(), k.double(), v.double(), pattern,
                                           backend="reference", q_offset=start)
        err = max(err, (out[:, :, start:stop].double() - ref).abs().max().item())
    return err


def bench_one(name: str, n: int, args, flex_fn) -> dict:
    row: dict = {"pattern": name, "N": n, "B": B, "H": H, "D": D, "dtype": "float32"}
    pattern = PATTERNS[name]()
    q, k, v = inputs(n)
    def blocked():  # the user's path: default block sizes, layout cached on the pattern, rewrites
        return sparse_attn.sparse_attention(q, k, v, pattern, backend="blocked")

    with torch.no_grad():
        row["blocked_first_call_s"] = time_once(blocked)
        layout = pattern.layout(n, block_q=128)  # for the counts only (density is exact)
        pairs = int(layout.allowed_pairs()[0])
        row.update(density=layout.density(), allowed_pairs=pairs)
        out = blocked()
        row["blocked_fwd_s"] = time_cpu(blocked, repeats=args.repeats)
        row["blocked_max_err"] = reference_error(out, q, k, v, pattern)
        row["effective_tflops"] = 4 * B * H * D * pairs / row["blocked_fwd_s"] / 1e12
        row["dense_equiv_tflops"] = 4 * B * H * D * n * n / row["blocked_fwd_s"] / 1e12
    if n in args.grad_lengths:
        qg, kg, vg = inputs(n, requires_grad=True)
        grad = torch.randn(B, H, n, D)

        def fwd_bwd():
            sparse_attn.sparse_attention(qg, kg, vg, pattern, backend="blocked").backward(grad)

        row["blocked_fwd_bwd_s"] = time_cpu(fwd_bwd, repeats=max(1, args.repeats // 2))
    if flex_fn is not None:
        torch._dynamo.reset()  # a fresh compile per pattern: no recompile-limit fallbacks
        flex_layout = pattern.layout(n, block_q=128)
        block_mask = flex_layout.to_block_mask()
        with torch.no_grad():
            row["flex_first_call_s"] = time_once(lambda: flex_fn(q, k, v, block_mask=block_mask))
            out = flex_fn(q, k, v, block_mask=block_mask)
            row["flex_fwd_s"] = time_cpu(lambda: flex_fn(q, k, v, block_mask=block_mask), repeats=args.repeats)
            row["flex_max_err"] = reference_error(out, q, k, v, pattern)
        row["blocked_vs_flex"] = row["flex_fwd_s"] / row["blocked_fwd_s"]
    if n <= args.max_dense:
        mask = layout.pattern.to_dense(n)[None]  # [1, 1, N, N]
        with torch.no_grad():
            fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
            out = fn()
            row["sdpa_mask_fwd_s"] = time_cpu(fn, repeats=args.repeats)
            row["sdpa_mask_max_err"] = reference_error(out, q, k, v, pattern)
        row["blocked_vs_sdpa_mask"] = row["sdpa_mask_fwd_s"] / row["blocked_fwd_s"]
        del mask
    if args.memory:
        with torch.no_grad():
            row["blocked_peak_beyond_inputs_bytes"] = peak_memory(blocked, torch.device("cpu"))
    return row


def table(rows: list[dict]) -> str:
    head = ("| N | pattern | density | blocked fwd ms | flex fwd ms | blocked vs flex | SDPA+mask ms | "
            "blocked fwd+bwd ms | blocked 1st call ms | flex 1st call s | peak MiB beyond inputs | max err |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        flex_first = "-" if "flex_first_call_s" not in r else f"{r['flex_first_call_s']:.1f}"
        ratio = "-" if "blocked_vs_flex" not in r else f"{r['blocked_vs_flex']:.2f}x"
        lines.append(
            f"| {r['N']} | {r['pattern']} | {r['density']:.4f} | {fmt_ms(r['blocked_fwd_s'])} | "
            f"{fmt_ms(r.get('flex_fwd_s'))} | {ratio} | {fmt_ms(r.get('sdpa_mask_fwd_s'))} | "
            f"{fmt_ms(r.get('blocked_fwd_bwd_s'))} | {fmt_ms(r['blocked_first_call_s'])} | {flex_first} | "
            f"{fmt_mib(r.get('blocked_peak_beyond_inputs_bytes'))} | {r['blocked_max_err']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    ap.add_argument("--grad-lengths", type=int, nargs="*", default=[16384])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-dense", type=int, default=16384, help="largest N for SDPA with a dense mask")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-memory", dest="memory", action="store_false")
    ap.add_argument("--json", type=Path, default=RESULTS / "cpu_patterns.json")
    args = ap.parse_args(argv)
    flex_fn = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex_fn = torch.compile(flex_attention, dynamic=False)
    rows = []
    jobs = [(n, name) for n in args.lengths for name in args.patterns]
    for n, name in progress(jobs, desc="cpu_patterns"):
        rows.append(bench_one(name, n, args, flex_fn))
        write_json(args.json, {"benchmark": "cpu_patterns", "env": environment("cpu"),
                               "flops_formula": "effective = 4*B*H*D*allowed_pairs; dense = 4*B*H*D*N^2",
                               "rows": rows})
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
