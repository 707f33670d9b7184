"""`sparse_attention()`: one call for every pattern, on every backend."""

from __future__ import annotations

import torch

from ..backends import AttentionCall, select
from ..backends.inputs import check_inputs
from ..patterns import Band, BlockLayout, Pattern


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

    A token-level dilated pattern (dilation r) is run as r plain bands, one per residue class
    of positions mod r, so only allowed pairs are computed (except on the reference backend,
    which always evaluates the original predicate).
    """
    pattern, q_offset, scale = check_inputs(q, k, v, pattern, scale, q_offset, backend)
    if isinstance(pattern, Band) and backend != "reference" and pattern.residue_split() is not None:
        return _residue_classes(q, k, v, pattern, scale, backend, return_lse, q_offset)
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


def _residue_classes(q, k, v, pattern: Band, scale, backend, return_lse, q_offset):
    """Dilated band: for each residue c mod r, the queries at positions c + r*a see the keys at
    c + r*b through a plain band in (a, b). Outputs are scattered back to their rows."""
    r, inner = pattern.residue_split()
    bsz, hq, nq, _ = q.shape
    kv_len = k.shape[2]
    out = q.new_zeros(bsz, hq, nq, v.shape[3])
    lse = torch.full((bsz, hq, nq), float("-inf"), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                     device=q.device)
    for c in range(r):
        row0 = (c - q_offset) % r  # first query row whose position is = c (mod r)
        if row0 >= nq or c >= kv_len:
            continue  # no queries in this class, or no keys: rows stay 0 / -inf
        inner_offset = (q_offset + row0 - c) // r
        o, l = sparse_attention(q[:, :, row0::r], k[:, :, c::r], v[:, :, c::r], inner, scale=scale, backend=backend,
                                return_lse=True, q_offset=inner_offset)
        out[:, :, row0::r] = o
        lse[:, :, row0::r] = l.to(lse.dtype)
    return (out, lse) if return_lse else out
