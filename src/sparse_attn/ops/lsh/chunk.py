"""Reformer LSH attention, sorted and chunked (Kitaev, Kaiser, Levskaya 2020, "Reformer: The
Efficient Transformer", section 3).

Per hash round: hash every token with a random rotation (bucket = argmax([xR, -xR])), sort the
tokens by (bucket, position), cut the sorted order into chunks of `bucket_size`, and let each
chunk's queries attend to the keys of their own chunk and of the previous chunk. Rounds are
merged by log-sum-exp. Memory is O(N * bucket_size * n_hashes): the scores of one round are
[N / bucket_size, bucket_size, 2 * bucket_size], never N x N.

Choices (the dense reference in naive.py follows the same ones):
* Look-back wraps: chunk 0 also sees the last chunk (as Reformer's `look_one_back`). With a
  single chunk (bucket_size >= N) there is no look-back.
* A query sees every key of the two chunks, not only keys of its own bucket (as Reformer's
  implementations do); the tail slots (N is padded to a multiple of bucket_size) are never seen.
* causal: a query at position i sees keys at positions <= i (original positions, not sorted).
  Which of those keys share its chunks is decided by the sort over all N positions (as in the
  paper), so changing a later token changes earlier outputs: a causal LM trained with it can
  read the future through the sort, and token-by-token decoding cannot equal the full forward
  (`nn.SparseCausalLM` refuses it unless `ModelConfig(leaky_mechanisms=["lsh"])`; no KV cache
  decodes it).
* shared_qk=True (Reformer's shared-QK): the keys are q / |q| and the `k` argument must be None
  (or q itself). A token never attends to itself when any other key is visible to it in any
  round; a token with no other key attends to itself alone (output v_i, lse = score of (i, i)).
  Reformer gets the same effect by giving the self score a large negative value (-1e5): with
  it, a self weight is exp(-1e5 - ...) = 0 as soon as anything else is visible. Here the self
  pair is masked out and used as an explicit fallback, so the rule holds exactly.
* shared_qk=False (the non-shared variant): queries and keys are hashed separately with the
  same rotations and sorted separately; query chunk c meets key chunks c and c - 1. A token's
  own key is an ordinary key (no self mask: q_i . k_i is not special when q != k). A query
  whose window holds no visible key gets 0 output and lse -inf.
* Duplicates: a pair that falls in the window of several rounds is counted once. Each round's
  score of the pair is lowered by log(number of rounds in which the pair is visible) (the
  count correction of the Reformer paper), so the merged result is exactly softmax attention
  over the union of the rounds' pairs: `lsh_attended_pairs` gives that union.

Padded batches (`key_padding_mask`, True = a real token): pad tokens take no part. They are
never attended to, their query rows return 0 (lse -inf, no gradient), and they do not move a
real token's place: they sort after every real token in every round. The bucket count and the
chunks follow each row's real length n_b (2 * ceil(n_b / bucket_size) buckets; chunk 0 looks
back to the row's own last chunk), and the rotations are those a call on the row alone draws.
So each row's real positions get what `lsh_attention` gives on the row alone (its real tokens,
in order, with the same seed or generator state), whatever the padding (left, right, holes)
and the padded length: outputs, lse and gradients equal up to float rounding (the float32
hash projections are computed in other shapes, so a projection tied to the last bit could in
principle fall the other way). A generator is left as an unmasked call of the padded shape
leaves it.

Randomness: rotations come from `generator`, or from a fresh CPU generator seeded with `seed`,
or from torch's global generator; they are drawn on CPU (or the generator's device) so a seed
gives the same hashes everywhere. Hashes are computed in float32 from the inputs' values.
The sort indices are not differentiated; gradients flow through the gathers to q, k and v.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import (accumulation_dtype, check_lsh_args, combine_rounds, finish, group_heads, hash_and_sort,
                     self_fallback, softmax_with_lse, window_hit)


def lsh_attention(q, k, v, *, bucket_size=64, n_hashes=4, causal=False, shared_qk=False, scale=None,
                  generator=None, seed=None, return_lse=False, key_padding_mask=None):
    """Reformer LSH attention over sorted chunks with one chunk of look-back.

    Args:
        q: [B, Hq, N, D]; k: [B, Hkv, N, D], or None with shared_qk=True; v: [B, Hkv, N, Dv].
            Hq % Hkv == 0 (GQA: query head h uses kv head h // (Hq / Hkv)).
        bucket_size: chunk length of the sorted order (n_buckets = 2 * ceil(N / bucket_size)).
        n_hashes: hash rounds; more rounds see more of the true attention.
        causal: queries see keys at their position or before; which of them a query gets is
            still decided from all positions (see the module docstring: not autoregressive).
        shared_qk: keys are q / |q| (Reformer); no self attention unless a token is alone.
        scale: score scale, default 1 / sqrt(D).
        generator / seed: where the random rotations come from (not both).
        return_lse: also return the log-sum-exp of each row's attended scores, [B, Hq, N]
            (float32 for half inputs), -inf where a row attends to nothing.
        key_padding_mask: bool [B, N], True = a real token: pad tokens are never attended to
            and their query rows return 0; each row's real positions get what the row alone
            gets (module docstring). Reads the rows' lengths back to the host once.

    Returns:
        out [B, Hq, N, Dv] in q's dtype, or (out, lse).
    """
    k, scale, generator, key_real = check_lsh_args(q, k, v, bucket_size=bucket_size, n_hashes=n_hashes,
                                                   causal=causal, shared_qk=shared_qk, scale=scale,
                                                   generator=generator, seed=seed, key_padding_mask=key_padding_mask)
    n = q.shape[2]
    q5, k5, v5 = group_heads(q, k, v, shared_qk, accumulation_dtype(q.dtype), v.shape[1])
    plan = hash_and_sort(q5, None if shared_qk else k5, n_hashes=n_hashes, bucket_size=bucket_size,
                         generator=generator, key_real=key_real)
    n_chunks, chunk_len, padded = plan.n_chunks, plan.chunk_len, plan.padded_len
    previous = plan.previous_chunk()  # [B, C] per row with a mask, else None (every row wraps at n_chunks)

    def pad(x):  # [.., N, E] -> [.., Np, E]
        return F.pad(x, (0, 0, 0, padded - n))

    def chunks(x):  # [.., R, Np, E] -> [.., R, C, L, E]
        return x.unflatten(-2, (n_chunks, chunk_len))

    q_sorted = gather_tokens(pad(q5), plan.q_pos)  # [B, Hkv, G, R, Np, D]
    k_sorted = gather_tokens(pad(k5), plan.k_pos)  # [B, Hkv, G or 1, R, Np, D]
    v_sorted = gather_tokens(pad(v5), plan.k_pos)  # [B, Hkv, G or 1, R, Np, Dv]
    k_window = with_look_back(chunks(k_sorted), -3, previous)  # [.., R, C, W, D], W = 2L (L if C == 1)
    v_window = with_look_back(chunks(v_sorted), -3, previous)

    q_at = plan.q_pos.unflatten(-1, (n_chunks, chunk_len)).unsqueeze(-1)  # [.., R, C, L, 1]
    k_at = with_look_back(plan.k_pos.unflatten(-1, (n_chunks, chunk_len)), -2, previous)
    k_at = k_at.unsqueeze(-2)  # [.., R, C, 1, W]
    if key_real is None:
        allowed = k_at < n
    else:  # pad tokens take no part, as keys or as queries (so every allowed pair is in a window)
        allowed = plan.is_real(k_at) & plan.is_real(q_at)
    if causal:
        allowed = allowed & (k_at <= q_at)
    if shared_qk:
        allowed = allowed & (k_at != q_at)

    scores = torch.matmul(chunks(q_sorted), k_window.transpose(-1, -2)) * scale  # [B, Hkv, G, R, C, L, W]
    if plan.n_hashes > 1:
        scores = scores - torch.log(duplicate_counts(plan, scores.dtype))
    probs, lse_sorted = softmax_with_lse(scores, allowed)  # lse [.., R, C, L]
    out_sorted = torch.matmul(probs, v_window).flatten(-3, -2)  # [B, Hkv, G, R, Np, Dv]

    # back to the original order, then merge the rounds
    out_rounds = out_sorted.gather(-2, plan.q_rank.unsqueeze(-1).expand_as(out_sorted))[..., :n, :]
    lse_rounds = lse_sorted.flatten(-2).gather(-1, plan.q_rank)[..., :n]  # [B, Hkv, G, R, N]
    out, lse = combine_rounds(out_rounds, lse_rounds, dim=3)  # [B, Hkv, G, N, Dv], [B, Hkv, G, N]
    if shared_qk:
        out, lse = self_fallback(out, lse, q5, k5, v5, scale)
    return finish(out, lse, q, return_lse, key_real)


def gather_tokens(x, positions):
    """x [B, Hkv, Gx, Np, E], positions [B, Hkv, Gp, R, Np] -> [B, Hkv, Gp, R, Np, E]
    (Gx is 1 or Gp)."""
    shape = (*positions.shape, x.shape[-1])
    return x.unsqueeze(3).expand(shape).gather(-2, positions.unsqueeze(-1).expand(shape))


def with_look_back(x, chunk_dim, previous=None):
    """Append the previous chunk (wrapping) to each chunk: [B, .., C, L, ..] -> [B, .., C, 2L, ..]
    along the dim after `chunk_dim` (< 0). A single chunk has no look-back. previous: int64
    [B, C], the chunk each chunk looks back to per row (`LshPlan.previous_chunk`), or None for
    chunk - 1 wrapping at C."""
    if x.shape[chunk_dim] == 1:
        return x
    if previous is None:
        back = x.roll(1, dims=chunk_dim)
    else:
        index_shape = [1] * x.dim()
        index_shape[0], index_shape[chunk_dim] = previous.shape
        back = x.gather(chunk_dim, previous.view(index_shape).expand(x.shape))
    return torch.cat([x, back], dim=chunk_dim + 1)


@torch.no_grad()
def duplicate_counts(plan, dtype):
    """For each (query slot, window key) of each round: in how many rounds that pair is in a
    window. [B, Hkv, G, R, C, L, W], >= 1 (the pair's own round)."""
    n_chunks, chunk_len = plan.n_chunks, plan.chunk_len
    previous = plan.previous_chunk()
    wrap = plan.chunks_per_row(plan.q_pos.dim() + 2)  # broadcasts to [.., R, C, L, W]
    counts = None
    for r in range(plan.n_hashes):
        # chunk, in round r, of the token at every slot of every round
        q_chunk = plan.q_chunk[..., r, :].gather(-1, plan.q_pos.flatten(-2)).view_as(plan.q_pos)
        k_chunk = plan.k_chunk[..., r, :].gather(-1, plan.k_pos.flatten(-2)).view_as(plan.k_pos)
        q_chunk = q_chunk.unflatten(-1, (n_chunks, chunk_len)).unsqueeze(-1)  # [.., R, C, L, 1]
        k_chunk = with_look_back(k_chunk.unflatten(-1, (n_chunks, chunk_len)), -2, previous)
        k_chunk = k_chunk.unsqueeze(-2)  # [.., R, C, 1, W]
        hit = window_hit(k_chunk, q_chunk, wrap)
        counts = hit.to(dtype) if counts is None else counts.add_(hit)
    return counts
