"""Performer attention (FAVOR+): linear attention with positive random features.

softmax(scale q k^T) v is approximated by linear attention (ops/linear) with phi = the FAVOR+
features of features.py: out_i = sum_j phi(q_i)·phi(k_j) v_j / sum_j phi(q_i)·phi(k_j). The
non-causal and the chunked causal forms are those of `linear_attention_features`, so time and
memory are O(N·m) for m features.

Stabilisation. Raw features exp(w·x - |x|^2/2) overflow for large inputs, so constants are
taken out before exp; they cancel exactly in out_i = num_i / den_i:
* keys: one max over all keys and features of each (batch, head). A single constant, so it
  cancels for every query, causal or not. It is taken over all keys, also those a causal query
  cannot see (this is what makes early causal rows tiny, see below).
* queries: a per-row constant, which cancels in row i. Subtracting the row's max (the usual
  choice) leaves den_i free to be very small, e.g. for early causal rows whose keys lie far
  below the global key max, or for queries pointing away from every key; the eps guard of the
  denominator then floors den_i and shrinks the row towards 0 (measured: a few percent of the
  causal rows at D = 64 with logits ~30). So after the row max, each row is multiplied by
  1 / den_i, with den_i = phi(q_i)·Z_i and Z_i the sum of phi(k_j) over the keys the row sees
  (a cumulative sum over positions when causal): every denominator becomes 1. The factor is
  capped at e^30 so that no query feature can overflow when a row's keys have all but
  vanished (or there are none); only then can eps act. The stabilisers are computed without
  gradient: they cancel, so none flows through them mathematically.
"""

from __future__ import annotations

import math

import torch

from ..linear.chunk import accumulation_dtype, check_chunk_size, check_eps, check_qkv, linear_attention_features
from .features import KERNELS, PerformerFeatures, _check_generator

__all__ = ["performer_attention", "favor_features"]

# Largest log-boost a query feature may get from the denominator normalisation (e^30 ~ 1e13):
# keeps every product far from the float32 range limits.
_MAX_QUERY_BOOST = 30.0


def _check_scale(scale, head_dim) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")
    return float(scale)


def resolve_features(head_dim, *, num_features, kernel, orthogonal, generator, features, device) -> PerformerFeatures:
    """The caller's features (checked against the other arguments) or new ones drawn on `device`.

    With `features` given, num_features/kernel/orthogonal conflict when they differ both from their
    defaults and from the features' values; a generator conflicts always (the features are drawn)."""
    if features is not None:
        if not isinstance(features, PerformerFeatures):
            raise TypeError(f"features must be PerformerFeatures or None, got {type(features).__name__}")
        for name, value, default, theirs in (("num_features", num_features, 256, features.num_features),
                                             ("kernel", kernel, "softmax", features.kernel),
                                             ("orthogonal", orthogonal, True, features.orthogonal)):
            if value != default and value != theirs:
                raise ValueError(f"{name}={value!r} conflicts with features.{name}={theirs!r}; pass one or the other")
        if generator is not None:
            raise ValueError("generator conflicts with features (already drawn); use features.redraw(generator)")
        if features.head_dim != head_dim:
            raise ValueError(f"features were drawn for head_dim={features.head_dim} but q has head_dim={head_dim}")
        if features.projection.device != device:
            raise ValueError(f"features are on {features.projection.device} but q is on {device}")
        return features
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be an int >= 1, got {num_features!r}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if not isinstance(orthogonal, bool):
        raise TypeError(f"orthogonal must be a bool, got {orthogonal!r}")
    return PerformerFeatures(head_dim, num_features, kernel, orthogonal, _check_generator(generator), device=device)


def favor_features(q, k, features: PerformerFeatures, *, scale: float, causal: bool):
    """Stabilised features (phi_q (B, Hq, Nq, m), phi_k (B, Hkv, Nkv, m)) of q, k already in the
    accumulation dtype; see the module docstring for the stabilisers."""
    root = scale ** 0.5
    if features.kernel == "relu":
        inv_sqrt_m = 1.0 / math.sqrt(features.num_features)
        return (torch.relu(features.projected(q * root)) * inv_sqrt_m,
                torch.relu(features.projected(k * root)) * inv_sqrt_m)
    log_q = features.log_features(q * root)  # [B, Hq, Nq, m]
    log_k = features.log_features(k * root)  # [B, Hkv, Nkv, m]
    bsz, hq, q_len, m = log_q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    if kv_len:
        phi_k = torch.exp(log_k - log_k.detach().amax(dim=(-2, -1), keepdim=True))  # global max per (b, h)
    else:
        phi_k = log_k.exp()
    # row max first (no overflow, at least one feature of 1), then one factor per row making den = 1
    phi_q = torch.exp(log_q - log_q.detach().amax(-1, keepdim=True))
    with torch.no_grad():
        grouped = phi_q.reshape(bsz, hkv, hq // hkv, q_len, m)  # [B, Hkv, G, Nq, m]
        if causal:  # the keys each query sees: positions <= kv_len - q_len + i
            seen = torch.cumsum(phi_k, dim=2)[:, :, kv_len - q_len:]  # [B, Hkv, Nq, m]
            den = torch.einsum("bhgnf,bhnf->bhgn", grouped, seen)
        else:
            den = torch.einsum("bhgnf,bhf->bhgn", grouped, phi_k.sum(2))
        # den == 0 (nothing seen, or every product underflowed) gives the largest boost
        boost = torch.exp((-torch.log(den)).clamp_max(_MAX_QUERY_BOOST)).reshape(bsz, hq, q_len, 1)
    return phi_q * boost, phi_k


def performer_attention(q, k, v, *, num_features=256, kernel="softmax", orthogonal=True, causal=False,
                        generator=None, features=None, chunk_size=64, eps=1e-6, scale=None):
    """Performer (FAVOR+) approximation of softmax(scale q k^T) v in O(N) time and memory.

    Args:
        q: (B, Hq, Nq, D); k: (B, Hkv, Nkv, D); v: (B, Hkv, Nkv, Dv). Hq % Hkv == 0 (GQA).
        num_features: m, random features per head (error falls roughly as 1/sqrt(m)).
        kernel: "softmax" (positive random features estimating exp(scale q·k)) or "relu"
            (generalised attention with relu(W x)).
        orthogonal: orthogonal random features (lower variance) or i.i.d. Gaussian ones.
        causal: query i sees keys at positions <= its own; with Nq < Nkv queries are the last
            positions. Chunked as in `linear_attention`.
        generator: torch.Generator or int seed for drawing the features; None uses torch's
            global generator (so every call draws new features).
        features: a `PerformerFeatures` to use instead of drawing (e.g. one a module keeps and
            redraws on a schedule). num_features/kernel/orthogonal, if not left at their
            defaults, must agree with it; generator must be None.
        chunk_size: positions per chunk of the causal form.
        eps: the denominator is clamped to at least eps. The softmax kernel's stabilisation makes
            every denominator 1 (see the module docstring) unless it would take a factor above
            e^30, so eps only acts for rows that see (almost) nothing, and for relu rows whose
            features are all zero (which give 0).
        scale: score scale, default 1/sqrt(D).

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype (fp16/bf16 inputs accumulate in float32).
    """
    check_qkv(q, k, v, causal=causal)
    scale = _check_scale(scale, q.shape[3])
    chunk_size, eps = check_chunk_size(chunk_size), check_eps(eps)
    features = resolve_features(q.shape[3], num_features=num_features, kernel=kernel, orthogonal=orthogonal,
                                generator=generator, features=features, device=q.device)
    acc = accumulation_dtype(q.dtype)
    phi_q, phi_k = favor_features(q.to(acc), k.to(acc), features, scale=scale, causal=causal)
    out, _ = linear_attention_features(phi_q, phi_k, v.to(acc), causal=causal, chunk_size=chunk_size, eps=eps)
    return out.to(q.dtype)
