"""`sdpa`: torch's scaled_dot_product_attention for the two patterns it computes natively,
full and causal (FlashAttention / memory-efficient kernels where torch has them).

It never takes a mask: a mask would make it a dense O(Nq*Nkv) computation.
"""

from __future__ import annotations

import torch.nn.functional as F

from .registry import FLOAT_DTYPES, Backend, Capabilities, register


def native_kind(pattern) -> str | None:
    """'full' or 'causal' if the pattern is exactly one of them, else None."""
    from ..patterns.grid import UNBOUNDED
    from ..patterns.primitives import Band

    if isinstance(pattern, Band) and pattern.dilation == 1 and pattern.hi == UNBOUNDED:
        if pattern.lo == -UNBOUNDED:
            return "full"
        if pattern.lo == 0:
            return "causal"
    return None


def _causal_masks_keys(q_offset: int, kv_len: int) -> bool:
    """Whether a causal pattern hides any key: not when every query sits at or after the last key
    (a decoding step), which then runs unmasked."""
    return q_offset < kv_len - 1


class SdpaBackend(Backend):
    name = "sdpa"
    caps = Capabilities(
        devices=frozenset({"cpu", "cuda"}),
        dtypes=FLOAT_DTYPES,
        grads=True,
        gqa=True,
        per_head_patterns=False,
        returns_lse=False,
        deterministic=False,
        graph_traceable=True,
        reads_layout=False,
        notes="full and causal patterns only (causal with q_offset 0, or queries at or after the last key)",
    )

    def extra_reasons(self, call):
        kind = native_kind(call.pattern)
        if kind is None:
            return ["only full and causal patterns"]
        if kind == "causal" and call.q_offset != 0 and _causal_masks_keys(call.q_offset, call.kv_len):
            return [f"causal with q_offset {call.q_offset} != 0 (SDPA aligns causal masks top-left; queries at or "
                    "after the last key, a decoding step, see every key and run unmasked)"]
        if call.kv_len == 0:
            return ["kv_len 0"]
        return []

    def forward(self, q, k, v, layout, scale, return_lse, *, deterministic=None):
        if return_lse:
            raise ValueError("the sdpa backend cannot return log-sum-exp")
        # causal from position 0 is SDPA's top-left mask (extra_reasons refuses other offsets)
        causal = native_kind(layout.pattern) == "causal" and _causal_masks_keys(layout.q_offset, layout.kv_len)
        kwargs = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **kwargs), None


register(SdpaBackend())
