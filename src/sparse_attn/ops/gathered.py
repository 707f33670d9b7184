"""Attention over keys kept at arbitrary positions: what a decoding cache that evicts keys a
pattern can no longer reach (sinks + window, Longformer globals + window, dilated windows) runs.

The kept keys of a row are not a contiguous run, so no block layout describes them; instead the
pattern is evaluated element-wise at the given positions, dense over the kept keys only. That is
O(queries x kept keys), which is what a decoding step costs anyway (one query against every key it
can see); longer query blocks are processed in chunks so that the score tensor stays bounded.
Without the log-sum-exp, and when every query sees some key, a chunk is one SDPA call with the
boolean mask; otherwise (lse wanted, or rows that see nothing and must give 0, where SDPA would
give NaN) the masked softmax is written out.
"""

from __future__ import annotations

import torch

from ..backends.sdpa import scaled_dot_product
from ..patterns import Pattern
from .common import softmax_with_lse

_QUERY_CHUNK = 256  # query rows per score tensor: [B, Hq, chunk, kept keys]


def _per_row(positions: torch.Tensor, bsz: int, name: str) -> torch.Tensor:
    """[n] or [B, n] integer positions as [B, n]."""
    if positions.dtype in (torch.bool,) or positions.is_floating_point() or positions.is_complex():
        raise TypeError(f"{name} must hold integer positions, got {positions.dtype}")
    if positions.dim() == 1:
        return positions[None].expand(bsz, -1)
    if positions.dim() != 2 or positions.shape[0] != bsz:
        raise ValueError(f"{name} must be [n] or [B={bsz}, n], got {tuple(positions.shape)}")
    return positions


def attention_at_positions(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern,
                           q_positions: torch.Tensor, kv_positions: torch.Tensor, *,
                           key_valid: torch.Tensor | None = None, scale: float | None = None,
                           return_lse: bool = False):
    """Softmax attention of q [B, Hq, n, D] over k/v [B, Hkv, L, D] (Hq a multiple of Hkv: GQA
    without repeating k/v), query i of row b at position q_positions[b, i] seeing key j where
    `pattern.allowed(q_pos, kv_pos)` and key_valid[b, j] (default all valid).

    q_positions: [n] or [B, n]; kv_positions: [L] or [B, L]; key_valid: bool [B, L]. Rows that see
    no key give 0 (lse -inf). Returns out [B, Hq, n, Dv] (and lse [B, Hq, n] float32 with
    return_lse)."""
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a Pattern, got {type(pattern).__name__}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, N, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    bsz, hq, n, d = q.shape
    hkv, kept = k.shape[1], k.shape[2]
    if k.shape[0] != bsz or v.shape[:3] != k.shape[:3] or k.shape[3] != d:
        raise ValueError(f"k and v must be [B={bsz}, Hkv, L, D={d}] with one shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if hq % hkv:
        raise ValueError(f"q has {hq} heads, not a multiple of the {hkv} key/value heads")
    q_pos = _per_row(q_positions, bsz, "q_positions")
    kv_pos = _per_row(kv_positions, bsz, "kv_positions")
    if q_pos.shape[1] != n or kv_pos.shape[1] != kept:
        raise ValueError(f"q_positions / kv_positions must give {n} / {kept} positions, got {q_pos.shape[1]} / "
                         f"{kv_pos.shape[1]}")
    if key_valid is not None and (key_valid.dtype != torch.bool or tuple(key_valid.shape) != (bsz, kept)):
        raise ValueError(f"key_valid must be bool [B={bsz}, L={kept}], got {key_valid.dtype} {tuple(key_valid.shape)}")
    pattern.check_batch(bsz, kv_pos.device)  # one pattern for every row: a mask_mod reading b cannot be honoured
    heads = pattern.num_heads
    if heads is not None and heads != hq:
        raise ValueError(f"pattern is per-head with {heads} heads but q has {hq}")
    scale = d ** -0.5 if scale is None else scale
    group = hq // hkv
    # the mask is built where the positions live: positions kept on the host (a decoding cache's
    # bookkeeping) give one upload per call instead of a dozen small device kernels
    where = kv_pos.device
    q_pos = q_pos.to(where)
    head = None if heads is None else torch.arange(hq, device=where).view(1, hq, 1, 1)
    valid = None if key_valid is None else key_valid.to(where)[:, None, None, :]
    acc = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16 scores in float32, float64 stays
    if n == 0:
        out = q.new_zeros(bsz, hq, 0, v.shape[3])
        return (out, q.new_zeros(bsz, hq, 0, dtype=acc)) if return_lse else out
    keys_t = k.transpose(-1, -2)  # [B, Hkv, D, L]
    outs, lses = [], []
    for start in range(0, n, _QUERY_CHUNK):
        stop = min(start + _QUERY_CHUNK, n)
        rows = stop - start
        allowed = pattern.allowed(q_pos[:, None, start:stop, None], kv_pos[:, None, None, :], head)  # [B, 1|Hq, r, L]
        if valid is not None:
            allowed = allowed & valid
        if not return_lse and bool(allowed.all()):
            # every query sees every kept key (a cache that holds exactly what its pattern reaches):
            # SDPA without a mask, as over a plain cache, and no mask upload
            outs.append(scaled_dot_product(q[:, :, start:stop], k, v, scale=scale, enable_gqa=group > 1))
            continue
        if not return_lse and bool(allowed.any(dim=-1).all()):
            # every row sees a key: SDPA with the boolean mask (one fused kernel; GQA without copies)
            outs.append(scaled_dot_product(q[:, :, start:stop], k, v, attn_mask=allowed.to(q.device, non_blocking=True),
                                           scale=scale, enable_gqa=group > 1))
            continue
        allowed = allowed.to(q.device, non_blocking=True).expand(bsz, hq, rows, kept)
        allowed = allowed.reshape(bsz, hkv, group * rows, kept)
        # query head h reads kv head h // group: the group's queries as rows of one product, no k/v copies
        qg = q[:, :, start:stop].reshape(bsz, hkv, group * rows, d)
        scores = torch.matmul(qg, keys_t).to(acc) * scale  # [B, Hkv, G * r, L]
        probs, lse = softmax_with_lse(scores, allowed)
        outs.append(torch.matmul(probs.to(v.dtype), v).reshape(bsz, hq, rows, -1))
        lses.append(lse.reshape(bsz, hq, rows))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    if not return_lse:
        return out
    return out, (lses[0] if len(lses) == 1 else torch.cat(lses, dim=2))
