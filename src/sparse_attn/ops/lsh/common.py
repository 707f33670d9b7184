"""What the chunked LSH attention and its dense reference share: argument checks, the hashing
(random rotations, Kitaev et al. 2020, section 3), the sort by (bucket, position) that places
every token in a chunk per round, and the masked softmax / round merge with log-sum-exp.

Both implementations call `hash_and_sort` with the same generator state, so they see the same
hashes, the same sorted order and the same chunks; they differ only in how the attention over
the allowed pairs is evaluated (gathered chunks vs a dense N x N mask).

A key padding mask makes the geometry per row: row b, with n_b real tokens, hashes into the
buckets and chunks of length n_b (`lsh_geometry(n_b, ...)`, rotations drawn as a call on that
row alone draws them), its pad tokens sort after every real token, and its chunk 0 looks back
to its own last chunk. So its real tokens meet exactly the pairs they meet alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..._checks import check_bool, check_int
from ..common import (accumulation_dtype, check_scale,  # noqa: F401 (lsh's modules import them here)
                      check_key_padding_mask, check_self_attention_qkv, softmax_with_lse)


# ----------------------------------------------------------------------------- checks


def resolve_generator(generator, seed):
    """The generator that draws the rotations: `generator` as given, a fresh CPU generator
    seeded with `seed`, or None (torch's global generator)."""
    if generator is not None and seed is not None:
        raise ValueError(f"pass either generator or seed, not both (got seed={seed!r} and a generator)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if seed is not None:
        check_int("seed", seed, 0)
        return torch.Generator().manual_seed(seed)
    return generator


def check_lsh_args(q, k, v, *, bucket_size, n_hashes, causal, shared_qk, scale, generator, seed,
                   key_padding_mask=None):
    """Validates an LSH call; returns (k to use or None when shared, scale, generator, key_real:
    bool [B, N], True = a real token, or None without a key_padding_mask)."""
    check_int("bucket_size", bucket_size, 1)
    check_int("n_hashes", n_hashes, 1)
    check_bool("causal", causal)
    check_bool("shared_qk", shared_qk)
    if shared_qk:
        if k is not None and k is not q:
            raise ValueError("shared_qk=True derives the keys from q (keys = q / |q|): pass k=None (or k=q), "
                             f"got a separate k of shape {tuple(k.shape) if isinstance(k, torch.Tensor) else k!r}")
        k = None
        check_self_attention_qkv(q, None, v)  # the keys share q's heads; v sets the kv heads
    else:
        if k is None:
            raise ValueError("k is None but shared_qk=False: pass k, or shared_qk=True to use q as the keys")
        check_self_attention_qkv(q, k, v)
    # self-attention: keys and queries share the indices, so q stands for k's shape under shared-QK
    key_real = None if key_padding_mask is None else check_key_padding_mask(key_padding_mask, q if k is None else k)
    return k, check_scale(scale, q.shape[3]), resolve_generator(generator, seed), key_real


# ----------------------------------------------------------------------------- hashing


def lsh_geometry(seq_len, bucket_size):
    """(n_chunks, chunk_len, n_buckets) for a sequence of seq_len tokens.

    The sorted order is cut into ceil(N / bucket_size) chunks of bucket_size tokens (one chunk
    of N tokens when bucket_size >= N) and there are two buckets per chunk, n_buckets =
    2 * ceil(N / bucket_size): an even number >= 2 with, on average, half a chunk per bucket."""
    n_chunks = -(-seq_len // bucket_size)
    chunk_len = bucket_size if n_chunks > 1 else seq_len
    return n_chunks, chunk_len, 2 * n_chunks


def random_rotations(head_dim, n_buckets, n_hashes, *, generator=None, device=None):
    """float32 [n_hashes, head_dim, n_buckets // 2] Gaussian rotations, one per hash round,
    shared by the batch and the heads. Drawn on the generator's device (CPU for a seed or the
    global generator) and then moved, so a seed gives the same hashes on every device."""
    if n_buckets < 2 or n_buckets % 2:
        raise ValueError(f"n_buckets must be an even number >= 2, got {n_buckets}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    rot = torch.randn(n_hashes, head_dim, n_buckets // 2, generator=generator, device=gen_device,
                      dtype=torch.float32)
    return rot.to(device) if device is not None else rot


@torch.no_grad()
def lsh_hash(x, n_buckets, n_hashes, generator=None, *, rotations=None):
    """Angular LSH: bucket = argmax([x R, -x R]) for a random rotation R per round.

    x: [..., N, D]. Returns int64 [..., n_hashes, N] in [0, n_buckets). Computed in float32
    whatever x's dtype (so a half-precision call and a float32 call on the same values get the
    same buckets). Pass `rotations` ([n_hashes, D, n_buckets // 2]) to hash several tensors
    with the same rotations; otherwise they are drawn from `generator`."""
    if rotations is None:
        rotations = random_rotations(x.shape[-1], n_buckets, n_hashes, generator=generator, device=x.device)
    elif tuple(rotations.shape) != (n_hashes, x.shape[-1], n_buckets // 2):
        raise ValueError(f"rotations must have shape {(n_hashes, x.shape[-1], n_buckets // 2)}, "
                         f"got {tuple(rotations.shape)}")
    x = x.detach().float()
    n = x.shape[-2]
    buckets = torch.empty(*x.shape[:-2], n_hashes, n, dtype=torch.long, device=x.device)
    # the rotated vectors are [.., R, N, n_buckets / 2]: hash a slice of tokens at a time so that
    # this temporary stays small when n_buckets grows with N
    step = max(1, (1 << 22) // max(1, n_hashes * n_buckets * math.prod(x.shape[:-2])))
    with torch.autocast(x.device.type, enabled=False):  # autocast would round the rotations to bf16
        for start in range(0, n, step):
            part = x[..., start:start + step, :]
            rotated = torch.einsum("...nd,rdk->...rnk", part, rotations.float())  # [.., R, n, n_buckets / 2]
            buckets[..., start:start + step] = torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)
    return buckets


@dataclass
class LshPlan:
    """Where every token goes in every round (the tail positions N..Np-1, and pad tokens of a
    key padding mask, sort last).

    q_pos / k_pos:     [B, Hkv, G or Gk, R, Np] original position at each sorted slot.
    q_rank / k_rank:   [.., R, Np] sorted slot of each original position (inverse permutation).
    q_chunk / k_chunk: [.., R, Np] chunk of each original position (= rank // chunk_len).
    key_real:          bool [B, N], True = a real token; None without a key padding mask.
    row_chunks:        int64 [B], chunks of each row's real tokens (>= 1); None without a mask
                       (every row has n_chunks).
    """

    q_pos: torch.Tensor
    q_rank: torch.Tensor
    q_chunk: torch.Tensor
    k_pos: torch.Tensor
    k_rank: torch.Tensor
    k_chunk: torch.Tensor
    seq_len: int
    n_chunks: int
    chunk_len: int
    key_real: torch.Tensor | None = None
    row_chunks: torch.Tensor | None = None

    @property
    def n_hashes(self):
        return self.q_pos.shape[-2]

    @property
    def padded_len(self):
        return self.n_chunks * self.chunk_len

    def chunks_per_row(self, ndim):
        """The chunk count `window_hit` wraps at: n_chunks, or with a mask each row's own count
        as int64 [B, 1, ..., 1] with `ndim` dims."""
        if self.row_chunks is None:
            return self.n_chunks
        return self.row_chunks.view(-1, *[1] * (ndim - 1))

    def previous_chunk(self):
        """int64 [B, C]: the chunk each chunk looks back to, per row (chunk 0 wraps to the row's
        last chunk of real tokens); None without a mask (every row wraps at n_chunks)."""
        if self.row_chunks is None:
            return None
        chunk = torch.arange(self.n_chunks, device=self.row_chunks.device)
        # a row of one chunk has no look-back: point its chunk 0 at chunk 1, which holds only pads
        # (its real tokens fill chunk 0; n_chunks > 1 wherever a look-back exists at all)
        wrap = torch.where(self.row_chunks > 1, self.row_chunks - 1, 1)  # [B]
        return torch.where(chunk == 0, wrap[:, None], chunk - 1)

    def is_real(self, positions):
        """bool, positions' shape [B, ...]: is the token at each original position a real one
        (positions >= N, the tail, are not). Only with a mask."""
        real = F.pad(self.key_real, (0, self.padded_len - self.seq_len))  # [B, Np]
        return real.gather(1, positions.reshape(positions.shape[0], -1)).view(positions.shape)


def sort_by_bucket(buckets, n_buckets, padded_len):
    """Sort positions by (bucket, position); positions >= N (padding) go last.

    buckets: [..., R, N]. Returns (positions, ranks), both int64 [..., R, padded_len]."""
    n = buckets.shape[-1]
    pad_bucket = buckets.new_full((*buckets.shape[:-1], padded_len - n), n_buckets)
    position = torch.arange(padded_len, device=buckets.device)
    sort_key = torch.cat([buckets, pad_bucket], dim=-1) * padded_len + position  # unique per position
    positions = sort_key.argsort(dim=-1)
    ranks = torch.empty_like(positions).scatter_(-1, positions, position.expand_as(positions).contiguous())
    return positions, ranks


@torch.no_grad()
def hash_and_sort(q5, k5, *, n_hashes, bucket_size, generator, key_real=None):
    """Hash queries (and keys, with the same rotations) and sort them into chunks.

    q5: [B, Hkv, G, N, D]; k5: [B, Hkv, 1, N, D], or None for shared-QK (the keys are the
    normalised queries, which hash like the queries: a positive scale does not move an argmax).
    key_real: bool [B, N] (True = a real token) or None: see `hash_rows`."""
    n = q5.shape[-2]
    n_chunks, chunk_len, n_buckets = lsh_geometry(n, bucket_size)
    padded = n_chunks * chunk_len
    row_chunks = None
    if key_real is None:
        rotations = random_rotations(q5.shape[-1], n_buckets, n_hashes, generator=generator, device=q5.device)
        q_buckets = lsh_hash(q5, n_buckets, n_hashes, rotations=rotations)
        k_buckets = None if k5 is None else lsh_hash(k5, n_buckets, n_hashes, rotations=rotations)
    else:
        q_buckets, k_buckets, row_chunks = hash_rows(q5, k5, key_real, n_hashes=n_hashes, bucket_size=bucket_size,
                                                     generator=generator)
    q_pos, q_rank = sort_by_bucket(q_buckets, n_buckets, padded)
    if k5 is None:
        k_pos, k_rank = q_pos, q_rank
    else:
        k_pos, k_rank = sort_by_bucket(k_buckets, n_buckets, padded)
    return LshPlan(q_pos, q_rank, q_rank // chunk_len, k_pos, k_rank, k_rank // chunk_len, n, n_chunks, chunk_len,
                   key_real, row_chunks)


@torch.no_grad()
def hash_rows(q5, k5, key_real, *, n_hashes, bucket_size, generator):
    """Buckets of a padded batch, each row hashed as it is alone: (q buckets [B, Hkv, G, R, N],
    k buckets [B, Hkv, 1, R, N] or None for shared-QK, row_chunks int64 [B]).

    Row b with n_b real tokens uses the bucket count of length n_b (2 * ceil(n_b / bucket_size))
    and the rotations a call on that row alone draws from the same generator state. Its pad
    tokens get bucket n_buckets(N), after every real bucket (every row's count is <= that of N),
    so they sort after its real tokens, like the tail N..Np-1. Reads the distinct row lengths
    back to the host (one synchronisation)."""
    n, head_dim = q5.shape[-2], q5.shape[-1]
    _, _, pad_bucket = lsh_geometry(n, bucket_size)
    row_chunks = ((key_real.sum(1) + bucket_size - 1) // bucket_size).clamp(min=1)  # [B]; a row of pads: 1
    counts = sorted(set((2 * row_chunks).tolist()))
    rotations = rotations_per_count(head_dim, counts, n_hashes, generator=generator, device=q5.device,
                                    padded_count=pad_bucket)
    pad = ~key_real[:, None, None, None, :]  # [B, 1, 1, 1, N]

    def hash_each_row(x):  # [B, Hkv, G, N, D] -> [B, Hkv, G, R, N]
        buckets = torch.full((*x.shape[:-2], n_hashes, n), pad_bucket, dtype=torch.long, device=x.device)
        for count in counts:
            rows = (2 * row_chunks == count).nonzero().squeeze(1)
            buckets[rows] = lsh_hash(x[rows], count, n_hashes, rotations=rotations[count])
        return buckets.masked_fill_(pad, pad_bucket)

    return hash_each_row(q5), None if k5 is None else hash_each_row(k5), row_chunks


def rotations_per_count(head_dim, counts, n_hashes, *, generator, device, padded_count):
    """{n_buckets: rotations} for every bucket count in `counts`, each drawn from the
    generator's state at the call (what a call on a row of that length alone draws). The
    generator (torch's global one when None) is then left where an unmasked call of the padded
    length leaves it: advanced by one draw for `padded_count` buckets."""
    source = torch.default_generator if generator is None else generator
    start = source.get_state()
    random_rotations(head_dim, padded_count, n_hashes, generator=source)
    after = source.get_state()
    drawn = {}
    for count in counts:
        source.set_state(start)
        drawn[count] = random_rotations(head_dim, count, n_hashes, generator=source, device=device)
    source.set_state(after)
    return drawn


def group_heads(q, k, v, shared_qk, dtype, kv_heads):
    """Fold GQA groups: q [B, Hkv, G, N, D], keys [B, Hkv, G or 1, N, D], v [B, Hkv, 1, N, Dv]
    (None if v is None), all in `dtype`. Shared-QK keys are q / |q| (one key set per query head)."""
    q5 = q.to(dtype).unflatten(1, (kv_heads, q.shape[1] // kv_heads))
    k5 = F.normalize(q5, dim=-1) if shared_qk else k.to(dtype).unsqueeze(2)
    v5 = v.to(dtype).unsqueeze(2) if v is not None else None
    return q5, k5, v5


def window_hit(key_chunk, query_chunk, n_chunks):
    """Is a key in chunk `key_chunk` visible from a query in chunk `query_chunk`? Own chunk or
    the previous one, wrapping (chunk 0 looks back to the last chunk, as in Reformer).
    n_chunks: an int, or per row an int64 tensor broadcastable to the chunks (`chunks_per_row`);
    one chunk has no look-back."""
    hit = key_chunk == query_chunk
    if isinstance(n_chunks, torch.Tensor):
        return hit | ((n_chunks > 1) & (key_chunk == (query_chunk - 1) % n_chunks))
    if n_chunks > 1:
        hit = hit | (key_chunk == (query_chunk - 1) % n_chunks)
    return hit


# ----------------------------------------------------------------------------- softmax


def combine_rounds(out, lse, dim):
    """Merge partial attentions along `dim` by log-sum-exp: out = sum_r exp(lse_r - lse) out_r.

    out: [..., R, ..., N, Dv] and lse: the same without Dv, with the round axis at `dim` (>= 0)."""
    shift = lse.detach().amax(dim=dim, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    weights = torch.exp(lse - shift)  # 0 for rounds where a row saw nothing
    total = weights.sum(dim=dim, keepdim=True)
    seen = total > 0
    safe_total = torch.where(seen, total, torch.ones_like(total))
    merged = (weights.unsqueeze(-1) * out).sum(dim=dim) / safe_total.squeeze(dim).unsqueeze(-1)
    merged_lse = torch.where(seen, shift + torch.log(safe_total), torch.full_like(total, float("-inf")))
    return merged, merged_lse.squeeze(dim)


def self_fallback(out, lse, q5, k5, v5, scale):
    """Shared-QK: a token with no other key in any round attends to itself alone (Reformer's
    rule). out [B, Hkv, G, N, Dv], lse [B, Hkv, G, N]."""
    lone = ~torch.isfinite(lse)
    self_score = (q5 * k5).sum(-1) * scale  # [B, Hkv, G, N]
    out = torch.where(lone.unsqueeze(-1), v5.expand_as(out), out)
    return out, torch.where(lone, self_score, lse)


def finish(out, lse, q, return_lse, key_real=None):
    """[B, Hkv, G, N, Dv] -> [B, Hq, N, Dv] in q's dtype; lse [B, Hq, N] in the compute dtype.
    Query rows on pad tokens (key_real False) give 0 and lse -inf (and no gradient)."""
    if key_real is not None:
        real = key_real[:, None, None, :]  # [B, 1, 1, N]
        out = torch.where(real.unsqueeze(-1), out, torch.zeros_like(out))
        lse = torch.where(real, lse, torch.full_like(lse, float("-inf")))
    out = out.flatten(1, 2).to(q.dtype)
    lse = lse.flatten(1, 2)
    return (out, lse) if return_lse else out
