"""`reference`: dense masked softmax attention, the ground truth every test compares against.

It evaluates the pattern's element predicate on the full Nq x Nkv grid (never the block
layout), so it also checks the block enumerators. Any float dtype, float64 included; autograd
through plain torch ops. O(Nq * Nkv) memory: never picked automatically.
"""

from __future__ import annotations

import torch

from .registry import FLOAT_DTYPES, Backend, Capabilities, register


def dense_attention(q, k, v, mask, scale):
    """Masked softmax attention on [B, H, N, D] tensors with a bool mask broadcastable to
    [B, H, Nq, Nkv]. Rows with nothing allowed give 0 and lse -inf. Returns (out, lse)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, Nq, Nkv]
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf on empty rows
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])  # 0 where masked
    return torch.matmul(probs, v), lse


class ReferenceBackend(Backend):
    name = "reference"
    caps = Capabilities(
        devices=frozenset({"cpu", "cuda"}),
        dtypes=FLOAT_DTYPES,
        grads=True,
        gqa=True,
        dense=True,
        reads_layout=False,
        notes="dense masked softmax; ground truth; O(Nq*Nkv) memory",
    )

    def forward(self, q, k, v, layout, scale, return_lse, *, deterministic=None):
        # `layout`: a PatternAt (no blocks: reads_layout is False) or a prebuilt BlockLayout
        mask = layout.pattern.to_dense(layout.q_len, layout.kv_len, q_offset=layout.q_offset,
                                       num_heads=layout.num_heads if layout.num_heads > 1 else None,
                                       device=q.device)  # [H or 1, Nq, Nkv]
        out, lse = dense_attention(q, k, v, mask[None], scale)
        return out, (lse if return_lse else None)


register(ReferenceBackend())
