"""`sdpa`: torch's scaled_dot_product_attention for the two patterns it computes natively,
full and causal (FlashAttention / memory-efficient kernels where torch has them).

It never takes a mask: a mask would make it a dense O(Nq*Nkv) computation.

`scaled_dot_product` is the one place the library calls SDPA on CUDA (this backend, the per-row
gathered path, the decoding caches). cuDNN's attention, which torch may prefer on Hopper, builds
an execution graph at the first call of every new shape: on the H200 (torch 2.11, bf16, 21 rows x
4 heads x 500-2000 tokens x 64) a new length cost 143 ms forward+backward with cuDNN alone
(145 ms under torch's default choice) against 1.4-1.9 ms when revisited, and 2.3 ms for
FlashAttention at a first visit (`benchmarks/sdpa_shapes.py`, results/sdpa_shapes_cuda.json). Work whose shapes keep changing (classification batches of
varying length, every prefill, every decoding step's longer cache) would pay that on most calls,
so a shape may use cuDNN only from its `CUDNN_FROM_CALL`-th call on; until then torch chooses
among its other kernels. Fixed-shape training reaches cuDNN after a few steps.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .._lru import LRU
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


# A shape may run on cuDNN's attention from its CUDNN_FROM_CALL-th call on (module docstring);
# 1 leaves every call to torch's own choice. Shapes are counted in a bounded LRU.
CUDNN_FROM_CALL = 16
_SHAPES_KEPT = 4096
_shape_calls = LRU()


def allows_cudnn(key) -> bool:
    """Count one call of `key` (a hashable shape description); whether cuDNN may serve it."""
    if CUDNN_FROM_CALL <= 1:
        return True
    calls = _shape_calls.keep(key, _shape_calls.recall(key, 0) + 1, _SHAPES_KEPT)
    return calls >= CUDNN_FROM_CALL


def _without_cudnn():
    """A context with cuDNN's attention switched off and every other kernel as the caller left it
    (a user's `sdpa_kernel(...)` choice is narrowed, never widened; cuDNN alone is kept)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = torch.backends.cuda
    others = [b for b, on in ((SDPBackend.FLASH_ATTENTION, cuda.flash_sdp_enabled()),
                              (SDPBackend.EFFICIENT_ATTENTION, cuda.mem_efficient_sdp_enabled()),
                              (SDPBackend.MATH, cuda.math_sdp_enabled())) if on]
    if not cuda.cudnn_sdp_enabled() or not others:
        return contextlib.nullcontext()
    return sdpa_kernel(others)  # torch's own priority order among these is kept


def scaled_dot_product(q, k, v, *, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention, with cuDNN held back from shapes met fewer than
    CUDNN_FROM_CALL times (CUDA only; traced graphs keep torch's own choice)."""
    # torch's own choice off CUDA and inside traced graphs
    if q.device.type != "cuda" or torch.compiler.is_compiling() or allows_cudnn(_shape_key(q, k, v, attn_mask, is_causal)):
        return _sdpa(q, k, v, attn_mask, is_causal, scale, enable_gqa)
    with _without_cudnn():
        return _sdpa(q, k, v, attn_mask, is_causal, scale, enable_gqa)


def _sdpa(q, k, v, attn_mask, is_causal, scale, enable_gqa):
    # is_causal may be a SymBool under dynamic shapes (kv_len): a branch makes it a guarded bool
    is_causal = True if is_causal else False
    # attn_mask and enable_gqa only when used (the GQA flag narrows the kernels some torch versions consider)
    kwargs = {} if attn_mask is None else {"attn_mask": attn_mask}
    if enable_gqa:
        kwargs["enable_gqa"] = True
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, **kwargs)


def _shape_key(q, k, v, attn_mask, is_causal) -> tuple:
    mask = None if attn_mask is None else (tuple(attn_mask.shape), attn_mask.dtype)
    grads = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, q.device.index, is_causal, mask, grads


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
        return scaled_dot_product(q, k, v, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]), None


register(SdpaBackend())
