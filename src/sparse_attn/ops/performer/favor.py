"""Performer attention (FAVOR+): linear attention with positive random features.

softmax(scale q k^T) v is approximated by linear attention (ops/linear) with phi = the FAVOR+
features of features.py: out_i = sum_j phi(q_i)·phi(k_j) v_j / sum_j phi(q_i)·phi(k_j). The
non-causal and the chunked causal forms are those of `linear_attention_features`, so time and
memory are O(N·m) for m features.

Stabilisation. Raw features exp(w·x - |x|^2/2) overflow for large inputs, so constants are
taken out before exp; they cancel exactly in out_i = num_i / den_i:
* keys: one max over all keys and features of each (batch, head). A single constant, so it
  cancels for every query, causal or not.
* queries: a per-row constant cancels in row i, so a query's features are exp(w·x - max_f w_f·x):
  the |x|^2/2 and log(m)/2 terms of the estimator are per-row constants too and are dropped
  (two passes over the (N, m) features fewer).
Because of these factors a row's denominator has an arbitrary scale: rows whose keys all lie far
below the global key max (early causal rows, queries pointing away from every key) have tiny but
exact denominators (measured: a few percent of causal rows below 1e-6 at D = 64, logits ~30).
An absolute eps = 1e-6 would floor them and shrink the row towards 0, so for the softmax kernel
the denominator is clamped only at the smallest normal float of the accumulation dtype: only
rows whose denominator underflows (they see no key, or every product underflows) return 0.
"""

from __future__ import annotations

import math

import torch

from ..._checks import check_bool
from ..common import accumulation_dtype, check_scale
from ..linear.chunk import check_chunk_size, check_eps, check_qkv, drop_padded_keys, linear_attention_features
from .features import KERNELS, PerformerFeatures, _check_generator

__all__ = ["performer_attention", "favor_features"]



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
    check_bool("orthogonal", orthogonal)
    if isinstance(generator, int) and not isinstance(generator, bool):
        return _seeded_features(head_dim, num_features, kernel, orthogonal, generator, torch.device(device))
    return PerformerFeatures(head_dim, num_features, kernel, orthogonal, _check_generator(generator), device=device)


_SEEDED: dict = {}  # (head_dim, num_features, kernel, orthogonal, seed, device) -> PerformerFeatures
_SEEDED_KEPT = 32


def _seeded_features(head_dim, num_features, kernel, orthogonal, seed, device) -> PerformerFeatures:
    """Features from an int seed are the same at every call: drawn once per (shape, seed, device)
    instead of a float64 QR on the CPU and a blocking upload at every call of every layer (with
    that redraw the ListOps Performer encoder trained at 1.4 steps/s on the H200, beside linear's
    11). Kept private: performer_attention never hands them out, so nobody redraws them in place.
    A plain dict, not functools.lru_cache: dynamo traces a dict lookup (ops.common.eager_under_compile)."""
    key = (head_dim, num_features, kernel, orthogonal, seed, device)
    features = _SEEDED.get(key)
    if features is None:
        if len(_SEEDED) >= _SEEDED_KEPT:
            _SEEDED.pop(next(iter(_SEEDED)))  # the oldest drawn
        features = _SEEDED[key] = PerformerFeatures(head_dim, num_features, kernel, orthogonal, seed, device=device)
    return features


def favor_features(q, k, features: PerformerFeatures, *, scale: float):
    """Stabilised features (phi_q (B, Hq, Nq, m), phi_k (B, Hkv, Nkv, m)) of q, k already in the
    accumulation dtype; see the module docstring for the stabilisers."""
    root = scale ** 0.5
    if features.kernel == "relu":
        inv_sqrt_m = 1.0 / math.sqrt(features.num_features)
        return (torch.relu(features.projected(q * root)) * inv_sqrt_m,
                torch.relu(features.projected(k * root)) * inv_sqrt_m)
    w = features.projection.to(q.dtype)  # [m, D]
    # in-place sub_/exp_ on fresh matmul outputs: no extra (N, m) buffers (matmul's backward
    # needs its inputs, not its output, so autograd allows it)
    phi_q = features.projected(q * root)  # [B, Hq, Nq, m]; per-row terms dropped (they cancel)
    phi_q = phi_q.sub_(phi_q.detach().amax(-1, keepdim=True)).exp_()
    # keys: log phi = w·x - |x|^2/2 (log(m)/2 is a constant: dropped), the row term folded into
    # the matmul as one more input column, [x, -|x|^2/2] @ [w, 1]^T, instead of a pass over (N, m)
    kx = k * root
    kx = torch.cat([kx, -0.5 * kx.square().sum(-1, keepdim=True)], dim=-1)  # [B, Hkv, Nkv, D + 1]
    log_k = kx @ torch.cat([w, w.new_ones(w.shape[0], 1)], dim=-1).T  # [B, Hkv, Nkv, m]
    if log_k.numel() == 0:
        return phi_q, log_k.exp()
    phi_k = log_k.sub_(log_k.detach().amax(dim=(-2, -1), keepdim=True)).exp_()  # global max per (b, h)
    return phi_q, phi_k


def performer_attention(q, k, v, *, num_features=256, kernel="softmax", orthogonal=True, causal=False,
                        generator=None, features=None, chunk_size=64, eps=None, scale=None, key_padding_mask=None):
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
        eps: the denominator is clamped to at least eps. None (default): 1e-6 for the relu
            kernel; for the softmax kernel the smallest normal float of the accumulation dtype,
            since its stabilised denominators have an arbitrary per-row scale (module
            docstring), so only rows that see no key return 0.
        scale: score scale, default 1/sqrt(D).
        key_padding_mask: bool (B, Nkv), True = a real key: pad keys get zero features and
            query rows on pad indices return 0 (as `linear_attention`): each row of a padded
            batch gives what it gives alone, with the same features.

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype (fp16/bf16 inputs accumulate in float32).
    """
    check_qkv(q, k, v, causal=causal)
    scale = check_scale(scale, q.shape[3])
    chunk_size = check_chunk_size(chunk_size)
    features = resolve_features(q.shape[3], num_features=num_features, kernel=kernel, orthogonal=orthogonal,
                                generator=generator, features=features, device=q.device)
    acc = accumulation_dtype(q.dtype)
    if eps is None:
        eps = torch.finfo(acc).tiny if features.kernel == "softmax" else 1e-6
    eps = check_eps(eps)
    # The precision is chosen here (features and sums in `acc`): under autocast the feature
    # matmuls would otherwise come out in bf16/fp16 beside a float32 v.
    with torch.autocast(q.device.type, enabled=False):
        phi_q, phi_k = favor_features(q.to(acc), k.to(acc), features, scale=scale)
        phi_k, q_real = drop_padded_keys(phi_k, key_padding_mask, k, q.shape[2])
        out, _ = linear_attention_features(phi_q, phi_k, v.to(acc), causal=causal, chunk_size=chunk_size, eps=eps)
    if q_real is not None:
        out = out * q_real[:, None, :, None].to(out.dtype)
    return out.to(q.dtype)
