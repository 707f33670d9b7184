"""Quick GPU timing of the forward-only triton backend vs our flex backend and SDPA causal
(median of triton.testing.do_bench, ms). A smoke check for issue 4, not its benchmark."""
import json
import os
import sys

import torch
import triton

import sparse_attn
from sparse_attn import patterns as P

rows = []
for n in (8192, 32768):
    q, k, v = (torch.randn(1, 16, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    rows.append({"N": n, "pattern": "sdpa_causal", "ms": triton.testing.do_bench(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))})
    for name, p in [("window4096_causal", P.sliding_window(4096)), ("longformer4096_g64", P.longformer(4096, 64)),
                    ("bigbird128", P.bigbird(128))]:
        out = sparse_attn.sparse_attention(q, k, v, p, backend="triton")  # checked below
        for backend in ("triton", "flex"):
            fn = lambda: sparse_attn.sparse_attention(q, k, v, p, backend=backend)  # noqa: E731
            rows.append({"N": n, "pattern": name, "backend": backend, "ms": triton.testing.do_bench(fn)})
        ref = sparse_attn.sparse_attention(q[:, :, -256:].double(), k.double(), v.double(), p, backend="reference")
        rows[-2]["max_err_last256_vs_fp64"] = (out[:, :, -256:].float() - ref).abs().max().item()
        print(rows[-2], rows[-1], flush=True)
out_dir = os.environ.get("OUT", ".")
json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
          open(os.path.join(out_dir, "triton_smoke.json"), "w"), indent=2)
sys.exit(0)
