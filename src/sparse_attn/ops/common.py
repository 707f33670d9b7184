"""Tensor checks and numerics shared by the op folders (linear, performer, topk, lsh, routing):
one wording for every error, one rule for the accumulation dtype, one masked softmax. Scalar
arguments (ints, bools, fractions) are checked by `sparse_attn._checks`."""

from __future__ import annotations

import torch

from ..backends.inputs import check_scale, check_tensor

__all__ = ["check_scale", "check_tensor", "check_self_attention_qkv", "accumulation_dtype",
           "softmax_with_lse", "check_key_padding_mask"]


def check_self_attention_qkv(q, k, v):
    """Self-attention shapes with GQA: q [B, Hq, N, D], k [B, Hkv, N, D], v [B, Hkv, N, Dv].
    k is None for shared-QK (keys from q), v is None where only the pairs are wanted."""
    named = [(n, t) for n, t in (("q", q), ("k", k), ("v", v)) if t is not None]
    for name, t in named:
        check_tensor(name, t)
    listed = ", ".join(f"{n} {tuple(t.shape)}" for n, t in named)
    if len({t.dtype for _, t in named}) != 1:
        raise TypeError("q, k, v must share a dtype, got " + ", ".join(f"{n} {t.dtype}" for n, t in named))
    if len({t.device for _, t in named}) != 1:
        raise ValueError("q, k, v must be on one device, got " + ", ".join(f"{n} {t.device}" for n, t in named))
    if len({t.shape[0] for _, t in named}) != 1:
        raise ValueError(f"batch sizes differ: {listed}")
    if len({t.shape[2] for _, t in named}) != 1:
        raise ValueError(f"q, k, v must have the same length (self-attention), got {listed}")
    if q.shape[2] == 0:
        raise ValueError(f"sequence length must be >= 1, got q {tuple(q.shape)}")
    if q.shape[3] == 0:
        raise ValueError(f"head_dim must be >= 1, got q {tuple(q.shape)}")
    if k is not None and q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k head dims differ: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k is not None and v is not None and k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    kv = k if k is not None else v
    if kv is not None and (kv.shape[1] == 0 or q.shape[1] % kv.shape[1] != 0):
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({kv.shape[1]}) for GQA")


def check_key_padding_mask(mask, k, *, same_device: bool = True) -> torch.Tensor:
    """A bool (B, Nkv) mask (True = real key) for k (B, H, Nkv, D); on k's device unless
    `same_device` is False (callers that read it on the host)."""
    bsz, nkv = k.shape[0], k.shape[2]
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor of shape ({bsz}, {nkv}), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = real key), got dtype {mask.dtype}; use "
                        "mask.bool() for 0/1 masks")
    if tuple(mask.shape) != (bsz, nkv):
        raise ValueError(f"key_padding_mask must have shape (batch, kv_len) = ({bsz}, {nkv}), got "
                         f"{tuple(mask.shape)}")
    if same_device and mask.device != k.device:
        raise ValueError(f"key_padding_mask is on {mask.device} but k is on {k.device}")
    return mask


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores, softmax and running sums: float64 stays float64; everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax_with_lse(scores: torch.Tensor, allowed: torch.Tensor):
    """Masked softmax along the last dim and its log-sum-exp (-inf, probs 0 for empty rows).

    The shift is detached (the result does not depend on it) and empty rows never produce
    inf/NaN in the backward."""
    s = scores.masked_fill(~allowed, float("-inf"))
    shift = s.detach().amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    e = torch.exp(s - shift)
    total = e.sum(dim=-1, keepdim=True)
    seen = total > 0
    safe_total = torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, shift + torch.log(safe_total), torch.full_like(total, float("-inf")))
    return e / safe_total, lse.squeeze(-1)


_EAGER: dict = {}  # function -> its torch.compiler.disable wrapper


def eager_under_compile(fn):
    """`fn` behind `torch.compiler.disable`: it runs eagerly inside torch.compile (one graph
    break) instead of being traced. Made on first use and kept, so every caller gets the same
    wrapper: torch.compiler.disable imports torch._dynamo, which doubles the package's import
    time and imports triton before a test can set TRITON_INTERPRET. (A plain dict, not
    functools.cache: dynamo traces a dict lookup, but breaks the graph at an lru_cache wrapper.)"""
    wrapper = _EAGER.get(fn)
    if wrapper is None:
        wrapper = _EAGER[fn] = torch.compiler.disable(fn)
    return wrapper
