"""Dense O(N^2) reference for Reformer LSH attention (Kitaev et al. 2020).

With the same hashes as `lsh_attention` (same generator state or seed), it builds for every
round the N x N mask of the pairs the chunked algorithm lets attend (key chunk = query chunk or
query chunk - 1, wrapping; causal; no self pair under shared-QK), runs a masked softmax per round
with the same duplicate-count correction, merges the rounds by log-sum-exp and applies the same
self fallback. It never gathers chunks, so it checks the sort/chunk/look-back/unsort machinery of
chunk.py independently. With a key padding mask the same plan holds each row's own chunk
count; the masks then also drop every pair with a pad token, and pad query rows are 0.
For tests and small N only.
"""

from __future__ import annotations

import torch

from .common import (accumulation_dtype, check_lsh_args, combine_rounds, finish, group_heads, hash_and_sort,
                     self_fallback, softmax_with_lse, window_hit)


def lsh_attention_naive(q, k, v, *, bucket_size=64, n_hashes=4, causal=False, shared_qk=False, scale=None,
                        generator=None, seed=None, return_lse=False, key_padding_mask=None):
    """Same arguments and result as `lsh_attention`, computed densely per round."""
    k, scale, generator, key_real = check_lsh_args(q, k, v, bucket_size=bucket_size, n_hashes=n_hashes,
                                                   causal=causal, shared_qk=shared_qk, scale=scale,
                                                   generator=generator, seed=seed, key_padding_mask=key_padding_mask)
    q5, k5, v5 = group_heads(q, k, v, shared_qk, accumulation_dtype(q.dtype), v.shape[1])
    plan = hash_and_sort(q5, None if shared_qk else k5, n_hashes=n_hashes, bucket_size=bucket_size,
                         generator=generator, key_real=key_real)
    masks = round_masks(plan, causal=causal, shared_qk=shared_qk)  # [B, Hkv, G, R, N, N]
    counts = masks.sum(dim=3, keepdim=True).clamp(min=1).to(q5.dtype)  # rounds in which each pair is seen
    scores = torch.matmul(q5, k5.transpose(-1, -2)).unsqueeze(3) * scale  # [B, Hkv, G, 1, N, N]
    probs, lse_rounds = softmax_with_lse(scores - torch.log(counts), masks)  # lse [B, Hkv, G, R, N]
    out_rounds = torch.matmul(probs, v5.unsqueeze(3))  # [B, Hkv, G, R, N, Dv]
    out, lse = combine_rounds(out_rounds, lse_rounds, dim=3)
    if shared_qk:
        out, lse = self_fallback(out, lse, q5, k5, v5, scale)
    return finish(out, lse, q, return_lse, key_real)


def round_masks(plan, *, causal, shared_qk):
    """bool [B, Hkv, G, R, N, N]: may query i attend to key j in round r (self pair excluded
    under shared-QK; the self fallback is applied after the merge; no pair with a pad token)."""
    n = plan.seq_len
    q_chunk = plan.q_chunk[..., :n].unsqueeze(-1)  # [B, Hkv, G, R, N, 1]
    k_chunk = plan.k_chunk[..., :n].unsqueeze(-2)  # [B, Hkv, G or 1, R, 1, N]
    masks = window_hit(k_chunk, q_chunk, plan.chunks_per_row(q_chunk.dim()))
    if plan.key_real is not None:
        real = plan.key_real[:, None, None, None]  # [B, 1, 1, 1, N]
        masks = masks & real.unsqueeze(-1) & real.unsqueeze(-2)
    pos = torch.arange(n, device=q_chunk.device)
    if causal:
        masks = masks & (pos[None, :] <= pos[:, None])
    if shared_qk:
        masks = masks & (pos[None, :] != pos[:, None])
    return masks


@torch.no_grad()
def lsh_attended_pairs(q, k, *, bucket_size=64, n_hashes=4, causal=False, shared_qk=False, generator=None,
                       seed=None, key_padding_mask=None):
    """bool [B, Hq, N, N]: the pairs (query i, key j) that `lsh_attention` attends to with the
    same arguments and hashes: the union over rounds, plus (i, i) for a shared-QK token that
    sees nothing else (a real one, with a key_padding_mask: pad tokens are in no pair).
    `lsh_attention` equals softmax attention restricted to this mask.
    O(N^2): for evaluation (how much true attention mass LSH recovers) at small N."""
    k, _, generator, key_real = check_lsh_args(q, k, None, bucket_size=bucket_size, n_hashes=n_hashes,
                                               causal=causal, shared_qk=shared_qk, scale=None, generator=generator,
                                               seed=seed, key_padding_mask=key_padding_mask)
    kv_heads = q.shape[1] if shared_qk else k.shape[1]
    q5, k5, _ = group_heads(q.detach(), None if k is None else k.detach(), None, shared_qk,
                            accumulation_dtype(q.dtype), kv_heads)
    plan = hash_and_sort(q5, None if shared_qk else k5, n_hashes=n_hashes, bucket_size=bucket_size,
                         generator=generator, key_real=key_real)
    pairs = round_masks(plan, causal=causal, shared_qk=shared_qk).any(dim=3)  # [B, Hkv, G, N, N]
    if shared_qk:
        lone = ~pairs.any(dim=-1)  # [B, Hkv, G, N]
        if key_real is not None:
            lone = lone & key_real[:, None, None, :]
        pairs = pairs | (torch.diag_embed(lone.to(torch.uint8)) > 0)
    return pairs.flatten(1, 2)
