"""Backends compute attention for a q/k/v triple and a BlockLayout.

`reference` (dense, ground truth), `sdpa` (full/causal only), `blocked` (pure torch, CPU
default), `flex` (FlexAttention from our layout), `triton` (our block-sparse flash kernels, forward and
backward; the CUDA default, or CPU under TRITON_INTERPRET=1).
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


def explain(q, k, v, pattern, *, backend: str = "auto", q_offset: int | None = None, return_lse: bool = False,
            deterministic: bool | None = None):
    """Which backend `sparse_attention(q, k, v, pattern, ...)` would use, and why each other
    backend was rejected; notes say what the chosen one costs beyond the attention itself (the
    triton kernels: inputs they copy, head dims they pad). Returns an `Explanation` (print it)."""
    from .inputs import check_inputs
    from .registry import explain_call

    from ..patterns import Band, BlockLayout, DisjointUnion

    pattern, q_offset, _ = check_inputs(q, k, v, pattern, None, q_offset, backend)
    split = pattern.residue_split() if isinstance(pattern, Band) and backend != "reference" else None
    notes = []
    if isinstance(pattern, DisjointUnion) and backend != "reference":
        notes.append(f"disjoint union: its {len(pattern.parts)} parts run one by one (each dispatched like this "
                     "call) and are merged by log-sum-exp")
    if split is not None:  # sparse_attention runs each residue class as a plain band
        r, pattern = split
        notes.append(f"dilation {r}: runs as {r} residue classes of {pattern!r} (about Nq/{r} queries each)")
        q, k, v = q[:, :, ::r], k[:, :, ::r], v[:, :, ::r]
        q_offset = q_offset // r
    call_pattern = pattern.pattern if isinstance(pattern, BlockLayout) else pattern
    ex = explain_call(AttentionCall.of(q, k, v, call_pattern, q_offset, return_lse or split is not None,
                                       deterministic), backend)
    ex.notes.extend(notes)
    if ex.chosen is not None:
        ex.notes.extend(get_backend(ex.chosen).input_notes(q, k, v))
    return ex


__all__ = ["AttentionCall", "Backend", "BackendError", "Capabilities", "Explanation", "explain", "get_backend",
           "list_backends", "register", "select"]
