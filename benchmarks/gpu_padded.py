"""GPU benchmark: padded batches and packed sequences (per-row geometry) against the same
tokens without padding, and against SDPA with a dense padding mask, in one process.

    PYTHONPATH=src python3 benchmarks/gpu_padded.py --out $OUT/gpu_padded.json

B=4, H=16 (Hkv 8), D=128, bf16, causal sliding window 4096 (the Mistral pattern), N per row.
Rows of real lengths N, 3N/4, N/2, N/4 (left padding, as transformers pads for generation).
Per length, medians (common.time_gpu), forward and forward+backward:
* padded: `sparse_attention(..., key_padding_mask=mask, backend="triton")`: one call per row
  geometry (here 4), each on its own cached layout;
* unpadded_batch: the same B x N tokens all real (one layout): the cost floor of the batch;
* rows_alone: each row cut to its real tokens and run alone (what a user loops over today);
* packed: the real tokens of the 4 rows packed into one row with `document_ids` (varlen);
* sdpa_mask: SDPA with the dense (B, 1, N, N) bool mask of window & padding (what transformers
  builds for sdpa), where it fits in memory.
Effective work differs between columns by construction; the ratio padded / unpadded_batch is
the price of per-row geometry.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, progress, time_gpu, write_json  # noqa: E402

from sparse_attn import patterns as P  # noqa: E402
from sparse_attn import sparse_attention  # noqa: E402

F = torch.nn.functional


def _fwd_bwd(fn, inputs):
    def run():
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, torch.ones_like(out))
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu_padded.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_padded.py needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    pattern = P.sliding_window(args.window)
    result = {"env": environment("cuda"),
              "setup": f"B=4, H={args.heads}, Hkv={args.kv_heads}, D={args.dim}, bf16, causal window {args.window}, "
                       "rows of N, 3N/4, N/2, N/4 real tokens, left padding; triton backend",
              "rows": []}
    for n in progress(args.lengths, desc="gpu_padded", unit="length"):
        lengths = [n, 3 * n // 4, n // 2, n // 4]
        mask = torch.zeros(4, n, dtype=torch.bool, device=dev)
        for b, length in enumerate(lengths):
            mask[b, n - length:] = True
        gen = torch.Generator(device=dev).manual_seed(n)

        def rand(h):
            return torch.randn(4, h, n, args.dim, device=dev, dtype=torch.bfloat16, generator=gen).requires_grad_()

        q, k, v = rand(args.heads), rand(args.kv_heads), rand(args.kv_heads)
        entry = {"N": n, "lengths": lengths, "real_tokens": sum(lengths)}

        def padded(q, k, v):
            return sparse_attention(q, k, v, pattern, key_padding_mask=mask, backend="triton")

        def unpadded(q, k, v):
            return sparse_attention(q, k, v, pattern, backend="triton")

        def alone(q, k, v):
            return torch.cat([sparse_attention(q[b:b + 1, :, n - L:], k[b:b + 1, :, n - L:], v[b:b + 1, :, n - L:],
                                               pattern, backend="triton").flatten()
                              for b, L in enumerate(lengths)])

        ids = torch.cat([torch.full((L,), b, device=dev) for b, L in enumerate(lengths)])[None]
        packed_inputs = [torch.cat([t[b:b + 1, :, n - L:] for b, L in enumerate(lengths)], dim=2).detach()
                         .requires_grad_() for t in (q, k, v)]

        def packed(q, k, v):
            return sparse_attention(q, k, v, pattern, document_ids=ids, backend="triton")

        cases = {"padded": (padded, [q, k, v]), "unpadded_batch": (unpadded, [q, k, v]),
                 "rows_alone": (alone, [q, k, v]), "packed": (packed, packed_inputs)}
        dense_bytes = 4 * n * n
        if dense_bytes <= 8 << 30:
            i = torch.arange(n, device=dev)
            allowed = ((i[:, None] - i[None, :]) >= 0) & ((i[:, None] - i[None, :]) < args.window)
            full_mask = (allowed[None] & mask[:, None, :] & mask[:, :, None])[:, None]  # [B, 1, N, N]

            def sdpa_mask(q, k, v):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=full_mask, enable_gqa=True)

            cases["sdpa_mask"] = (sdpa_mask, [q, k, v])
        for name, (fn, inputs) in cases.items():
            try:
                with torch.no_grad():
                    fn(*inputs), fn(*inputs)  # warm: kernels compiled, layouts and plans cached
                    fwd, how = time_gpu(lambda: fn(*inputs))
                step = _fwd_bwd(fn, inputs)
                step(), step()
                both, _ = time_gpu(step)
                entry[name] = {"fwd_ms": fwd * 1e3, "fwd_bwd_ms": both * 1e3, "timing": how}
            except Exception as exc:  # record and go on: one failing column must not lose the others
                entry[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"N={n} {name}: {entry[name]}", flush=True)
        result["rows"].append(entry)
        write_json(args.out, result)  # after every length: a cut-off run keeps what it measured
        del cases
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
