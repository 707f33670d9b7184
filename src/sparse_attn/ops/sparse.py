"""`sparse_attention()`: one call for every pattern, on every backend."""

from __future__ import annotations

import torch

from ..backends import AttentionCall, select
from ..backends.inputs import check_inputs
from ..patterns import BlockLayout, Pattern


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | BlockLayout,
    *,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    q_offset: int | None = None,
):
    """Attention restricted to `pattern`, in SDPA's shapes.

    Args:
        q: (B, Hq, Nq, D); k: (B, Hkv, Nkv, D); v: (B, Hkv, Nkv, Dv). Hq % Hkv == 0 (GQA).
        pattern: a `Pattern` (e.g. `patterns.sliding_window(256)`) or a prebuilt `BlockLayout`
            (to choose block sizes yourself).
        scale: score scale, default 1/sqrt(D).
        backend: "auto" or a backend name ("blocked", "flex", "sdpa", "reference", ...).
            "auto" never picks a dense O(Nq*Nkv) backend for you; `backends.explain()` says why
            it picked what it did. A forced backend that cannot serve the call raises
            `BackendError` with the reason.
        return_lse: also return the log-sum-exp of each row's scores, (B, Hq, Nq) (float32 for
            half inputs), -inf for rows with nothing to attend to.
        q_offset: absolute position of the first query; default Nkv - Nq (queries are the last
            positions, as in decoding and chunked prefill).

    Returns:
        out (B, Hq, Nq, Dv), or (out, lse) if return_lse. Rows with nothing allowed are 0.
    """
    pattern, q_offset, scale = check_inputs(q, k, v, pattern, scale, q_offset, backend)
    layout = pattern if isinstance(pattern, BlockLayout) else None
    call = AttentionCall.of(q, k, v, layout.pattern if layout else pattern, q_offset, return_lse)
    chosen = select(call, backend)
    if layout is None:
        block_q, block_kv = chosen.block_sizes(call)
        layout = pattern.layout(q.shape[2], k.shape[2], block_q=block_q, block_kv=block_kv, q_offset=q_offset,
                                device=q.device)
    elif layout.device != q.device:
        raise ValueError(f"layout is on {layout.device} but q is on {q.device}; build it with device={q.device}")
    out, lse = chosen.forward(q, k, v, layout, scale, return_lse)
    return (out, lse) if return_lse else out
