"""GPU check: FlexAttention with BlockMasks from our layouts, several patterns in one process.

Compares (a) one shared torch.compile(flex_attention) reused across patterns with (b) our
flex backend (a compiled function per layout), against the float64 reference."""
import torch

import sparse_attn
from sparse_attn import patterns as P
from torch.nn.attention.flex_attention import flex_attention

torch.manual_seed(0)
shared = torch.compile(flex_attention, dynamic=False)
cases = [("window", P.sliding_window(64)), ("streaming", P.streaming(4, 60)),
         ("per_head", P.per_head([P.causal(), P.sliding_window(20), P.full(), P.dilated(8, 2)])),
         ("stride_part", P.Band(32, None, 32)), ("causal_strict", P.Band(1, None)),
         ("longformer", P.longformer(32, [0, 5, 300])), ("bigbird", P.bigbird(32, seed=3))]
for name, p in cases:
    q, k, v = (torch.randn(2, 4, 1024, 64, device="cuda") for _ in range(3))
    ref = sparse_attn.sparse_attention(q.double(), k.double(), v.double(), p, backend="reference")
    lay = p.layout(1024, block_q=128, device="cuda")
    try:
        err_shared = (shared(q, k, v, block_mask=lay.to_block_mask()).double() - ref).abs().max().item()
    except Exception as e:  # noqa: BLE001
        err_shared = f"error {type(e).__name__}"
    err_backend = (sparse_attn.sparse_attention(q, k, v, p, backend="flex").double() - ref).abs().max().item()
    print(f"{name:14s} shared compiled flex max err: {err_shared}   flex backend max err: {err_backend:.2e}", flush=True)
