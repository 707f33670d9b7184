"""Backends compute attention for a q/k/v triple and a BlockLayout.

`reference` (dense, ground truth), `sdpa` (full/causal only), `blocked` (pure torch, CPU
default), `flex` (FlexAttention from our layout); `triton` arrives with the GPU kernels.
Each declares its capabilities; `explain()` shows which one a call gets and why.
"""

from .registry import (
    AttentionCall,
    Backend,
    BackendError,
    Capabilities,
    Explanation,
    get_backend,
    list_backends,
    register,
    select,
)


def explain(q, k, v, pattern, *, backend: str = "auto", q_offset: int | None = None, return_lse: bool = False):
    """Which backend `sparse_attention(q, k, v, pattern, ...)` would use, and why each other
    backend was rejected. Returns an `Explanation` (print it)."""
    from .inputs import check_inputs
    from .registry import explain_call

    pattern, q_offset, _ = check_inputs(q, k, v, pattern, None, q_offset, backend)
    return explain_call(AttentionCall.of(q, k, v, pattern, q_offset, return_lse), backend)


__all__ = ["AttentionCall", "Backend", "BackendError", "Capabilities", "Explanation", "explain", "get_backend",
           "list_backends", "register", "select"]
