"""Linear attention (Katharopoulos et al., 2020): the O(N) forms, non-causal and chunked causal.

With a non-negative feature map phi, attention weights become phi(q_i)·phi(k_j), and

    out_i = phi(q_i)^T S_i / max(phi(q_i)^T z_i, eps),   S_i = sum_j phi(k_j) v_j^T,  z_i = sum_j phi(k_j)

where the sums run over every key (non-causal) or over the keys at positions <= that of query i
(causal). Non-causal: S and z are one matmul over all keys, then one per query: O(N) time and
memory. Causal: the sequence is cut into chunks of C positions; within a chunk the weights are
computed quadratically (C x C, lower-triangular), and the keys of earlier chunks enter through
the state (S, z) accumulated up to the chunk's start (an exclusive cumulative sum over chunks).
Time O(N·C·F + N·F·Dv), memory O(N·F·Dv / C) for the per-chunk states.

The denominator is guarded with `clamp_min(eps)`, not `+ eps`: a row whose denominator is at
least eps is exact, one below it (e.g. relu features that are all zero) returns a vector of
norm at most max|v| instead of NaN or a huge value, since with non-negative weights
|numerator| <= denominator * max|v|. Feature maps must therefore be non-negative.

fp16/bf16 inputs are computed in float32 and returned in their dtype; states are kept in the
accumulation dtype (float32, or float64 for float64 inputs).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ..._checks import check_bool
from ...backends.inputs import check_qkv as check_sdpa_qkv
from ..common import accumulation_dtype, check_key_padding_mask  # noqa: F401 (accumulation_dtype: naive/recurrent)


class LinearState(NamedTuple):
    """Running sums of a causal linear attention, per key/value head.

    S: (B, Hkv, F, Dv) = sum_j phi(k_j) v_j^T;  z: (B, Hkv, F) = sum_j phi(k_j).
    Kept in the accumulation dtype (float32, or float64 for float64 inputs)."""

    S: torch.Tensor
    z: torch.Tensor


def _elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    # in place on elu's fresh output (its backward reads the input, not the output): one (N, D)
    # buffer fewer; at 64K tokens every fresh buffer costs page faults (measured 9x time for 4x N)
    return F.elu(x).add_(1.0)


FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu": _elu_plus_one,  # Katharopoulos et al.: positive, smooth, phi(0) = 1
    "relu": F.relu,  # can be all zero for a row: the eps guard returns a bounded value
}


# ------------------------------------------------------------------------ checks
def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))




def check_qkv(q, k, v, *, causal) -> None:
    """Shapes as SDPA (backends.inputs.check_qkv), plus causal's q_len <= kv_len."""
    check_sdpa_qkv(q, k, v)
    check_bool("causal", causal)
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"causal attention needs q_len <= kv_len (queries are the last positions), got "
                         f"q_len={q.shape[2]} > kv_len={k.shape[2]}")


def check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return chunk_size


def check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive finite float, got {eps!r}")
    return float(eps)


def resolve_feature_map(feature_map) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(feature_map, str):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)} or a callable, got {feature_map!r}")
        return FEATURE_MAPS[feature_map]
    if callable(feature_map):
        return feature_map
    raise TypeError(f"feature_map must be a string ({sorted(FEATURE_MAPS)}) or a callable, "
                    f"got {type(feature_map).__name__}")


def apply_feature_map(phi, x: torch.Tensor, name: str) -> torch.Tensor:
    """phi(x) checked: a floating tensor with x's leading dims (B, H, N), in x's dtype."""
    out = phi(x)
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"feature_map must return a floating tensor for {name}, got {got}")
    if out.dim() != 4 or out.shape[:3] != x.shape[:3] or out.shape[3] == 0:
        raise ValueError(f"feature_map must map {name} of shape {_shape(x)} to (B, H, N, F) with F >= 1, "
                         f"got shape {_shape(out)}")
    return out.to(x.dtype)


def check_state(state, *, batch, kv_heads, num_features, dv, dtype, device, name="initial_state") -> LinearState:
    """state = (S, z) with S (B, Hkv, F, Dv) and z (B, Hkv, F) in the accumulation dtype."""
    if not isinstance(state, tuple) or len(state) != 2:
        raise TypeError(f"{name} must be a (S, z) pair (LinearState), got {type(state).__name__}")
    S, z = state
    want = {"S": (batch, kv_heads, num_features, dv), "z": (batch, kv_heads, num_features)}
    for part, t in (("S", S), ("z", z)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}.{part} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != want[part]:
            raise ValueError(f"{name}.{part} must have shape {want[part]} (batch, kv_heads, features"
                             f"{', v_dim' if part == 'S' else ''}), got {_shape(t)}")
        if t.dtype != dtype:
            raise TypeError(f"{name}.{part} must be {dtype} (the accumulation dtype of the inputs), got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name}.{part} is on {t.device} but the inputs are on {device}")
    return LinearState(S, z)


# --------------------------------------------------------------------- forward
def linear_attention_features(phi_q, phi_k, v, *, causal=False, chunk_size=64, eps=1e-6, initial_state=None):
    """Linear attention on precomputed features; the core that `linear_attention` and
    `performer_attention` share.

    Args:
        phi_q: (B, Hq, Nq, F), phi_k: (B, Hkv, Nkv, F), v: (B, Hkv, Nkv, Dv), all in one floating
            dtype (the computation runs in it: pass float32/float64). Features must be >= 0.
        causal: query i (at position Nkv - Nq + i) sees the keys at positions <= its own.
        chunk_size: positions per chunk of the causal form.
        eps: the denominator is clamped to at least eps.
        initial_state: (S, z) of the keys before these (causal only), see `LinearState`.

    Returns:
        (out (B, Hq, Nq, Dv), LinearState after all Nkv keys).
    """
    chunk_size, eps = check_chunk_size(chunk_size), check_eps(eps)
    for name, t in (("phi_q", phi_q), ("phi_k", phi_k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-dim tensor (batch, heads, length, dim), got "
                             f"{_shape(t) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not (phi_q.device == phi_k.device == v.device):
        raise ValueError(f"phi_q, phi_k, v must be on one device, got {phi_q.device}, {phi_k.device}, {v.device}")
    bsz, hq, q_len, nf = phi_q.shape
    _, hkv, kv_len, dv = v.shape
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv}) for GQA")
    if phi_k.shape != (bsz, hkv, kv_len, nf):
        raise ValueError(f"phi_k must have shape {(bsz, hkv, kv_len, nf)}, got {_shape(phi_k)}")
    if not (phi_q.dtype == phi_k.dtype == v.dtype):
        raise TypeError(f"phi_q, phi_k, v must share a dtype, got {phi_q.dtype}, {phi_k.dtype}, {v.dtype}")
    if causal and q_len > kv_len:
        raise ValueError(f"causal attention needs q_len <= kv_len, got q_len={q_len} > kv_len={kv_len}")
    if initial_state is not None and not causal:
        raise ValueError("initial_state continues a causal sequence; it needs causal=True")
    groups = hq // hkv
    phi_q = phi_q.reshape(bsz, hkv, groups, q_len, nf)  # q head h uses kv head h // groups

    if initial_state is None:
        S0 = phi_k.new_zeros(bsz, hkv, nf, dv)
        z0 = phi_k.new_zeros(bsz, hkv, nf)
    else:
        S0, z0 = check_state(initial_state, batch=bsz, kv_heads=hkv, num_features=nf, dv=dv, dtype=phi_k.dtype,
                             device=phi_k.device)

    if not causal:
        S = S0 + torch.einsum("bhnf,bhne->bhfe", phi_k, v)  # [B, Hkv, F, Dv]
        z = z0 + phi_k.sum(2)  # [B, Hkv, F]
        num = torch.einsum("bhgnf,bhfe->bhgne", phi_q, S)  # [B, Hkv, G, Nq, Dv]
        den = torch.einsum("bhgnf,bhf->bhgn", phi_q, z)
    else:
        prefix = kv_len - q_len  # keys before the first query: they only feed the state
        if prefix:
            S0 = S0 + torch.einsum("bhnf,bhne->bhfe", phi_k[:, :, :prefix], v[:, :, :prefix])
            z0 = z0 + phi_k[:, :, :prefix].sum(2)
        num, den, S, z = _causal_chunks(phi_q, phi_k[:, :, prefix:], v[:, :, prefix:], S0, z0, chunk_size)
    den = den.clamp_min(eps)[..., None]
    # without autograd, divide in place: no fresh (N, Dv) buffer (see _elu_plus_one)
    out = num / den if (torch.is_grad_enabled() and num.requires_grad) else num.div_(den)
    return out.reshape(bsz, hq, q_len, dv), LinearState(S, z)


def _causal_chunks(phi_q, phi_k, v, S0, z0, chunk_size):
    """Aligned causal part: phi_q [B, H, G, N, F], phi_k [B, H, N, F], v [B, H, N, Dv], query i at key i.

    Returns num [B, H, G, N, Dv], den [B, H, G, N] and the final (S, z)."""
    bsz, hkv, groups, n, nf = phi_q.shape
    dv = v.shape[-1]
    if n == 0:
        return phi_q.new_zeros(bsz, hkv, groups, 0, dv), phi_q.new_zeros(bsz, hkv, groups, 0), S0, z0
    c = min(chunk_size, n)
    nc = -(-n // c)
    pad = nc * c - n
    if pad:  # zero features after the feature map: padded keys add nothing, padded queries are cut off
        phi_q = F.pad(phi_q, (0, 0, 0, pad))
        phi_k = F.pad(phi_k, (0, 0, 0, pad))
        v = F.pad(v, (0, 0, 0, pad))
    phi_q = phi_q.reshape(bsz, hkv, groups, nc, c, nf)
    phi_k = phi_k.reshape(bsz, hkv, nc, c, nf)
    v = v.reshape(bsz, hkv, nc, c, dv)

    chunk_S = torch.einsum("bhncf,bhnce->bhnfe", phi_k, v)  # [B, H, NC, F, Dv]
    chunk_z = phi_k.sum(3)  # [B, H, NC, F]
    # state at each chunk's start: exclusive prefix sums, accumulated chunk by chunk (torch's CPU
    # cumsum over a non-last dim is a strided scalar loop: 150 ms for [4, 256, 256, 64] measured,
    # against ~10 ms for this loop of NC vector adds; also no subtraction error)
    S_before, z_before = _exclusive_prefix(chunk_S, S0), _exclusive_prefix(chunk_z, z0)

    num = torch.einsum("bhgncf,bhnfe->bhgnce", phi_q, S_before)  # [B, H, G, NC, C, Dv]
    den = torch.einsum("bhgncf,bhnf->bhgnc", phi_q, z_before)
    weights = torch.einsum("bhgncf,bhnsf->bhgncs", phi_q, phi_k).tril()  # [B, H, G, NC, C, C]
    num = num + torch.einsum("bhgncs,bhnse->bhgnce", weights, v)
    den = den + weights.sum(-1)

    num = num.reshape(bsz, hkv, groups, nc * c, dv)[:, :, :, :n]
    den = den.reshape(bsz, hkv, groups, nc * c)[:, :, :, :n]
    return num, den, S_before[:, :, -1] + chunk_S[:, :, -1], z_before[:, :, -1] + chunk_z[:, :, -1]


def _exclusive_prefix(per_chunk: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """[B, H, NC, ...] -> the running sum before each chunk, starting from `start` [B, H, ...]."""
    running = start
    before = []
    for c in range(per_chunk.shape[2]):
        before.append(running)
        running = running + per_chunk[:, :, c]
    return torch.stack(before, dim=2)


def linear_attention(q, k, v, *, feature_map="elu", causal=False, chunk_size=64, eps=1e-6, initial_state=None,
                     return_state=False, key_padding_mask=None):
    """Linear attention out_i = sum_j phi(q_i)·phi(k_j) v_j / max(sum_j phi(q_i)·phi(k_j), eps).

    Args:
        q: (B, Hq, Nq, D); k: (B, Hkv, Nkv, D); v: (B, Hkv, Nkv, Dv). Hq % Hkv == 0 (GQA: query
            head h uses kv head h // (Hq // Hkv), without repeating k/v).
        feature_map: "elu" (elu(x) + 1, Katharopoulos et al.), "relu", or a callable applied to q
            and to k ((B, H, N, D) -> (B, H, N, F), non-negative; it receives float32 tensors for
            half inputs).
        causal: query i sees the keys at positions <= its own; with Nq < Nkv the queries are the
            last Nq positions. Computed in chunks of `chunk_size` positions.
        chunk_size: positions per chunk (causal); any value >= 1 gives the same result.
        eps: the denominator is clamped to at least eps (`den.clamp_min(eps)`); rows with a larger
            denominator are exact, a row whose features are all zero returns 0.
        initial_state: (S, z) from a previous call (`return_state=True`) or decoding step: the
            keys before these, so a long sequence can be fed in pieces. Causal only.
        return_state: also return the `LinearState` after the last key (for causal decoding;
            non-causal: the sums over all keys).
        key_padding_mask: bool (B, Nkv), True = a real key: pad keys get zero features (they
            add nothing to S and z), and query rows on pad indices return 0. Linear attention
            has no positions, so left or right padding gives each row what it gives alone.

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype, or (out, LinearState) if return_state. fp16/bf16 inputs
        accumulate in float32; the state is float32 (float64 for float64 inputs).
    """
    check_qkv(q, k, v, causal=causal)
    phi = resolve_feature_map(feature_map)
    check_chunk_size(chunk_size)
    check_eps(eps)
    if initial_state is not None and not causal:
        raise ValueError("initial_state continues a causal sequence; it needs causal=True")
    check_bool("return_state", return_state)
    acc = accumulation_dtype(q.dtype)
    q_acc, k_acc, v_acc = q.to(acc), k.to(acc), v.to(acc)
    phi_q = apply_feature_map(phi, q_acc, "q")
    phi_k = apply_feature_map(phi, k_acc, "k")
    if phi_q.shape[3] != phi_k.shape[3]:
        raise ValueError(f"feature_map gave {phi_q.shape[3]} features for q but {phi_k.shape[3]} for k")
    phi_k, q_real = drop_padded_keys(phi_k, key_padding_mask, k, q.shape[2])
    out, state = linear_attention_features(phi_q, phi_k, v_acc, causal=causal, chunk_size=chunk_size, eps=eps,
                                           initial_state=initial_state)
    if q_real is not None:
        out = out * q_real[:, None, :, None].to(out.dtype)  # pad query rows: 0, as every mechanism
    out = out.to(q.dtype)
    return (out, state) if return_state else out


def drop_padded_keys(phi_k, key_padding_mask, k, q_len: int):
    """Feature-map attention under a key padding mask (B, Nkv): pad keys get zero features, so
    they add nothing to the sums; returns (phi_k, q_real), q_real (B, q_len) marking the query
    rows on real indices (queries are the last key indices), None without a mask. With no
    positions in the sums, left or right padding gives each row what it gives alone."""
    if key_padding_mask is None:
        return phi_k, None
    key_real = check_key_padding_mask(key_padding_mask, k)
    if q_len > k.shape[2]:
        raise ValueError("key_padding_mask needs q_len <= kv_len (queries are the last key indices)")
    return phi_k * key_real[:, None, :, None].to(phi_k.dtype), key_real[:, k.shape[2] - q_len:]
