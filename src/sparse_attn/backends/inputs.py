"""Validation of a call's q/k/v/pattern arguments: every error names the argument, the value
and what was expected (never a bare assert)."""

from __future__ import annotations

import math

import torch

from ..patterns import BlockLayout, Pattern
from .registry import FLOAT_DTYPES


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def check_scale(scale, head_dim: int) -> float:
    """The score scale: 1/sqrt(head_dim) for None, else a positive finite float."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")
    return float(scale)


def check_tensor(name: str, t) -> None:
    """A 4-dim floating torch.Tensor (batch, heads, length, head_dim)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have 4 dims (batch, heads, length, head_dim), got shape {_shape(t)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")


def check_qkv(q, k, v) -> None:
    """SDPA shapes: q (B, Hq, Nq, D), k (B, Hkv, Nkv, D), v (B, Hkv, Nkv, Dv), Hq % Hkv == 0, one
    dtype and device. Shared by every op; each adds its own rules (causal lengths, ...)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same heads and length, got k {_shape(k)}, v {_shape(v)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k head dims differ: q {_shape(q)}, k {_shape(k)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]}) for GQA")
    if q.shape[3] == 0:
        raise ValueError(f"head_dim must be >= 1, got q {_shape(q)}")


def check_inputs(q, k, v, pattern, scale, q_offset, backend):
    """Returns (pattern or layout, q_offset, scale) normalised; raises TypeError/ValueError."""
    check_qkv(q, k, v)
    scale = check_scale(scale, q.shape[3])
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if q_offset is not None and (isinstance(q_offset, bool) or not isinstance(q_offset, int) or q_offset < 0):
        raise ValueError(f"q_offset must be a non-negative int or None, got {q_offset!r}")
    q_len, kv_len = q.shape[2], k.shape[2]
    if isinstance(pattern, BlockLayout):
        g = pattern.grid
        if (g.q_len, g.kv_len) != (q_len, kv_len):
            raise ValueError(f"layout was built for q_len={g.q_len}, kv_len={g.kv_len} but q has length {q_len} "
                             f"and k has length {kv_len}")
        if q_offset is not None and q_offset != g.q_offset:
            raise ValueError(f"q_offset={q_offset} differs from the layout's q_offset={g.q_offset}")
        q_offset = g.q_offset
        heads = pattern.num_heads if pattern.num_heads > 1 else None
    elif isinstance(pattern, Pattern):
        if q_offset is None:
            if q_len > kv_len:
                raise ValueError(f"q has more positions ({q_len}) than k ({kv_len}): pass q_offset (the position "
                                 "of the first query) explicitly")
            q_offset = kv_len - q_len
        elif q_offset > kv_len:
            # keys are positions 0..kv_len-1: queries starting after a gap of positions that
            # have no keys is a caller's mistake (an off-by-cache offset), not a request
            raise ValueError(f"q_offset={q_offset} puts the queries after a gap of {q_offset - kv_len} positions "
                             f"beyond the last key (keys sit at positions 0..{kv_len - 1}); q_offset must be <= kv_len")
        heads = pattern.num_heads
    else:
        raise TypeError(f"pattern must be a sparse_attn Pattern or BlockLayout, got {type(pattern).__name__}")
    if heads is not None and heads != q.shape[1]:
        raise ValueError(f"pattern is defined for {heads} heads but q has {q.shape[1]} heads")
    return pattern, q_offset, float(scale)
