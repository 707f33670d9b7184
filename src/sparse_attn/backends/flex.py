"""`flex`: torch's FlexAttention, fed with a BlockMask made directly from our layout (its
`kv_num_blocks`/`kv_indices` and full blocks) and the pattern's predicate as `mask_mod`.
We never call `create_block_mask`, which evaluates the mask on all Nq x Nkv elements.

FlexAttention must run compiled (uncompiled it falls back to a dense O(N^2) reference), so
this backend always calls a `torch.compile`d flex_attention; the first call per shape pays the
compile. On CPU torch supports the forward only.
"""

from __future__ import annotations

import types

import torch

from .registry import Backend, Capabilities, register

def _flex_call(q, k, v, block_mask, scale, return_lse, enable_gqa):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, return_lse=return_lse, enable_gqa=enable_gqa)


def _flex_for(layout):
    """A torch.compile'd FlexAttention call of the layout's own (a fresh code object, so
    torch.compile keeps a separate cache for it). With one shared compiled function every new
    mask_mod is a recompile, and past torch.compile's recompile limit FlexAttention silently
    falls back to its unfused O(N^2) path. fullgraph=True: a graph break is an error, never a
    silent fallback."""

    def build():
        code = _flex_call.__code__.replace(co_name=f"_flex_call_{id(layout)}")
        fn = types.FunctionType(code, _flex_call.__globals__, code.co_name)
        return torch.compile(fn, dynamic=False, fullgraph=True)

    return layout.cached("flex_fn", build)


class FlexBackend(Backend):
    name = "flex"
    caps = Capabilities(
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        grads=True,
        gqa=True,
        min_head_dim=16,
        max_head_dim=256,
        deterministic=False,
        notes="torch.compile'd FlexAttention with a BlockMask built from our layout; first call compiles",
    )

    def unavailable_reason(self):
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError:
            return f"FlexAttention not available in torch {torch.__version__}"
        return None

    def block_sizes(self, call):
        return 128, 128

    def extra_reasons(self, call):
        why = []
        if call.device_type == "cpu" and call.requires_grad:
            why.append("FlexAttention has no backward on CPU")
        if call.device_type == "cpu" and call.dtype == torch.float16:
            why.append("FlexAttention on CPU does not take float16")
        return why

    def forward(self, q, k, v, layout, scale, return_lse, *, deterministic=None):
        block_mask = layout.cached("flex", layout.to_block_mask)
        result = _flex_for(layout)(q, k, v, block_mask, scale, return_lse, q.shape[1] != k.shape[1])
        if return_lse:
            out, lse = result
            return out, lse
        return result, None


register(FlexBackend())
