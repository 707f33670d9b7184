"""Linear attention as a recurrence: the decoding form.

Causal linear attention is an RNN whose state is (S, z) = (sum_j phi(k_j) v_j^T, sum_j phi(k_j)):
each new token t updates S += phi(k_t) v_t^T, z += phi(k_t), then reads
out_t = phi(q_t)^T S / max(phi(q_t)^T z, eps). Constant memory per token, whatever the context
length; `linear_attention(..., causal=True, return_state=True)` gives the state after a prompt.
"""

from __future__ import annotations

import torch

from .chunk import (
    LinearState,
    accumulation_dtype,
    apply_feature_map,
    check_eps,
    check_qkv,
    check_state,
    resolve_feature_map,
)

__all__ = ["LinearState", "linear_attention_step"]


def linear_attention_step(q, k, v, state, *, feature_map="elu", eps=1e-6):
    """Decode T new tokens one by one from `state`.

    Args:
        q: (B, Hq, T, D); k: (B, Hkv, T, D); v: (B, Hkv, T, Dv): the new tokens (T is usually 1);
            token t of q sits at the same position as token t of k/v. Hq % Hkv == 0.
        state: `LinearState` (S (B, Hkv, F, Dv), z (B, Hkv, F)) of the keys so far, in the
            accumulation dtype (float32, float64 for float64 inputs); None starts empty.
        feature_map: as in `linear_attention` ("elu", "relu" or a callable); must be the one that
            built the state.
        eps: the denominator is clamped to at least eps.

    Returns:
        (out (B, Hq, T, Dv) in q's dtype, the new LinearState). Autograd flows through the state.
    """
    check_qkv(q, k, v, causal=True)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k/v must hold the same new tokens, got q length {q.shape[2]} and k length "
                         f"{k.shape[2]}")
    phi = resolve_feature_map(feature_map)
    eps = check_eps(eps)
    acc = accumulation_dtype(q.dtype)
    phi_q = apply_feature_map(phi, q.to(acc), "q")
    phi_k = apply_feature_map(phi, k.to(acc), "k")
    if phi_q.shape[3] != phi_k.shape[3]:
        raise ValueError(f"feature_map gave {phi_q.shape[3]} features for q but {phi_k.shape[3]} for k")
    v = v.to(acc)
    bsz, hq, steps, nf = phi_q.shape
    hkv, dv = k.shape[1], v.shape[3]
    if state is None:
        S, z = phi_k.new_zeros(bsz, hkv, nf, dv), phi_k.new_zeros(bsz, hkv, nf)
    else:
        S, z = check_state(state, batch=bsz, kv_heads=hkv, num_features=nf, dv=dv, dtype=acc, device=q.device,
                           name="state")
    phi_q = phi_q.reshape(bsz, hkv, hq // hkv, steps, nf)  # [B, Hkv, G, T, F]
    outs = []
    for t in range(steps):
        phi_k_t = phi_k[:, :, t]  # [B, Hkv, F]
        S = S + phi_k_t[..., :, None] * v[:, :, t, None, :]  # out of place: autograd sees every state
        z = z + phi_k_t
        phi_q_t = phi_q[:, :, :, t]  # [B, Hkv, G, F]
        num = torch.einsum("bhgf,bhfe->bhge", phi_q_t, S)
        den = torch.einsum("bhgf,bhf->bhg", phi_q_t, z)
        outs.append(num / den.clamp_min(eps)[..., None])
    out = torch.stack(outs, dim=3) if outs else phi_q.new_zeros(bsz, hkv, hq // hkv, 0, dv)  # [B, Hkv, G, T, Dv]
    return out.reshape(bsz, hq, steps, dv).to(q.dtype), LinearState(S, z)
