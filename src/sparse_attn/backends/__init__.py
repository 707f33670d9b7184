"""Backends compute attention for a q/k/v triple and a BlockLayout.

`reference` (dense, ground truth), `sdpa` (full/causal only), `blocked` (pure torch, CPU
default), `flex` (FlexAttention from our layout), `triton` (our block-sparse flash kernels, forward and
backward; the CUDA default, or CPU under TRITON_INTERPRET=1).
Each declares its capabilities; `explain_call()` gives the dispatcher's verdict on a call
(`sparse_attn.explain()`, in ops, first applies the rewrites `sparse_attention` applies).
"""

from .registry import (
    AttentionCall,
    Backend,
    BackendError,
    Capabilities,
    Explanation,
    explain_call,
    get_backend,
    list_backends,
    register,
    select,
)


__all__ = ["AttentionCall", "Backend", "BackendError", "Capabilities", "Explanation", "explain_call", "get_backend",
           "list_backends", "register", "select"]
