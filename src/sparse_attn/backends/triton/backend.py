"""`triton`: our block-sparse flash-attention kernels, forward and backward.

Kernels: kernels.py. What a layout becomes for them (CSR walks, packed bitmasks for partial
blocks, and why bitmasks): plan.py. Tiles per head dim, by measurement: configs.py. The
custom ops (torch.compile-friendly, with autograd): ops.py.
"""

from __future__ import annotations

import dataclasses

import torch

from ..registry import Backend, Capabilities, register
from .ops import _padded, check_block, interpreting, needs_copy, triton_attention, triton_backward_from_stats

_CAPS = Capabilities(
    devices=frozenset({"cuda"}),
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
    grads=True,
    gqa=True,
    min_head_dim=16,
    max_head_dim=256,
    deterministic=True,  # when asked: the three-launch backward
    graph_traceable=True,  # torch.library custom ops with fake implementations
    notes="block-sparse flash attention in Triton: CSR walk of full then partial blocks, partial blocks "
          "masked by cached packed bitmasks; backward fused in one pass with atomic dQ, or with "
          "deterministic=True in three launches without atomics (bitwise reproducible); a torch custom op",
)


class TritonBackend(Backend):
    name = "triton"

    @property
    def caps(self) -> Capabilities:
        """CUDA only, plus CPU tensors under TRITON_INTERPRET=1 (the interpreter runs the kernel
        in numpy: for tests at tiny shapes). Read per call, so setting the variable later works."""
        if interpreting():
            return dataclasses.replace(_CAPS, devices=frozenset({"cuda", "cpu"}))
        return _CAPS

    def unavailable_reason(self):
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return f"triton not importable ({e}); install the 'triton' package (pip install 'sparse_attn[gpu]')"
        if not interpreting() and not torch.cuda.is_available():
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernel on CPU, slowly, for tests)"
        return None

    def block_sizes(self, call):
        """128 x 128 layout blocks on CUDA (the kernels' tiles divide them: configs.py); 32 x 32
        under the interpreter, where work is numpy-slow and shapes are tiny."""
        return (32, 32) if interpreting() and call.device_type == "cpu" else (128, 128)

    def extra_reasons(self, call):
        why = []
        if call.v_head_dim < 16 or call.v_head_dim > 256:
            why.append(f"v head dim {call.v_head_dim} outside [16, 256]")
        for name, value in zip(("block_q", "block_kv"), self.block_sizes(call)):
            w = check_block(name, value)
            if w:
                why.append(w)
        return why

    def input_notes(self, q, k, v):
        return input_notes(q, k, v)

    def forward(self, q, k, v, layout, scale, return_lse, *, deterministic=None):
        out, lse = triton_attention(q, k, v, layout, scale, deterministic)
        return out, (lse if return_lse else None)

    def backward_from_stats(self, q, k, v, layout, scale, out, lse, dout, dlse=None):
        return triton_backward_from_stats(q, k, v, layout, scale, out, lse, dout, dlse)


register(TritonBackend())


def input_notes(q, k, v) -> list[str]:
    """explain()'s notes for the kernels: inputs whose head dim is not unit-stride are copied
    first (other strides are read in place), and a head dim that is not a power of two is
    padded to the next one (at least 16) inside the tiles, so part of every matmul multiplies
    zeros: with D and Dv padded to BD and BDV, a share 1 - (D + Dv) / (BD + BDV) of the forward's
    tensor-core work (q @ k^T is BD wide, p @ v is BDV wide; the backward's mix is alike)."""
    notes = []
    copied = [(name, t) for name, t in zip("qkv", (q, k, v)) if needs_copy(t)]
    if copied:
        nbytes = sum(t.numel() * t.element_size() for _, t in copied)
        notes.append(f"triton: copies {', '.join(name for name, _ in copied)} to a contiguous tensor first (head dim "
                     f"not unit-stride: strides {', '.join(str(t.stride()) for _, t in copied)}): {nbytes:,} bytes")
    d, dv = q.shape[-1], v.shape[-1]
    bd, bdv = _padded(d), _padded(dv)
    if (bd, bdv) != (d, dv):
        if d == dv:
            what = [f"head dim {d} is padded to {bd}"]
        else:
            what = [f"head dim {d} is padded to {bd}"] if bd != d else []
            what += [f"v head dim {dv} is padded to {bdv}"] if bdv != dv else []
        waste = 1 - (d + dv) / (bd + bdv)
        notes.append(f"triton: {' and '.join(what)} in the kernels: {waste:.0%} of their matmul (tensor-core) work "
                     "multiplies zero padding")
    return notes
