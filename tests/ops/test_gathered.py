"""attention_at_positions: the pattern at kept keys' (per-row) positions, against the float64
reference of sparse_attention on the full sequence (keys a pattern cannot reach removed)."""

import pytest
import torch
from sa_testing import make_qkv

from sparse_attn import patterns as P
from sparse_attn.ops import attention_at_positions, sparse_attention

PATTERNS = {
    "streaming": P.streaming(3, 5),
    "longformer": P.longformer(4, [0, 7], causal=True),
    "dilated": P.dilated(4, 3),
    "per_head": P.per_head([P.sliding_window(3), P.causal(), P.streaming(1, 2), P.dilated(2, 2)]),
}


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kept_keys_at_their_positions_equal_the_full_sequence(name, dtype):
    """Row b's keys are a scattered subset (what a cache keeps, plus junk slots marked invalid),
    its queries the last n positions of a sequence of its own length: equal to the full run."""
    pattern = PATTERNS[name]
    torch.manual_seed(0)
    lengths, n = [40, 29], 3
    q, k, v = make_qkv(b=1, hq=4, hkv=2, nq=max(lengths), d=8, dtype=torch.float64)
    kept_idx, outs_ref, lse_ref = [], [], []
    for length in lengths:
        ref, lse = sparse_attention(q[:, :, length - n:length], k[:, :, :length], v[:, :, :length], pattern,
                                    backend="reference", return_lse=True)
        outs_ref.append(ref)
        lse_ref.append(lse)
        positions = torch.arange(length)
        kept_idx.append(positions[pattern.reachable(positions, length - n)])
    width = max(len(i) for i in kept_idx) + 2  # two junk slots per row at least
    kv_pos = torch.full((2, width), 5)
    valid = torch.zeros(2, width, dtype=torch.bool)
    gather = torch.zeros(2, width, dtype=torch.long)
    for b, idx in enumerate(kept_idx):
        kv_pos[b, :len(idx)], valid[b, :len(idx)], gather[b, :len(idx)] = idx, True, idx
    rows_k = torch.stack([k[0][:, gather[b]] for b in range(2)])  # [B, Hkv, width, D]
    rows_v = torch.stack([v[0][:, gather[b]] for b in range(2)])
    rows_q = torch.stack([q[0][:, length - n:length] for length in lengths])
    q_pos = torch.stack([torch.arange(length - n, length) for length in lengths])
    out, lse = attention_at_positions(rows_q.to(dtype), rows_k.to(dtype), rows_v.to(dtype), pattern, q_pos, kv_pos,
                                      key_valid=valid, return_lse=True)
    # without the lse, rows that all see a key take SDPA with the boolean mask: the same numbers
    out_sdpa = attention_at_positions(rows_q.to(dtype), rows_k.to(dtype), rows_v.to(dtype), pattern, q_pos, kv_pos,
                                      key_valid=valid)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for b in range(2):
        assert torch.allclose(out[b].double(), outs_ref[b][0], atol=tol, rtol=tol)
        assert torch.allclose(out_sdpa[b].double(), outs_ref[b][0], atol=tol, rtol=tol)
        assert torch.allclose(lse[b].double(), lse_ref[b][0].double(), atol=tol, rtol=tol)


def test_long_query_blocks_are_chunked_and_empty_rows_give_zero():
    torch.manual_seed(1)
    q, k, v = make_qkv(b=1, hq=2, nq=600, d=4, dtype=torch.float64)
    pattern = P.sliding_window(9)
    ref = sparse_attention(q, k, v, pattern, backend="reference")
    pos = torch.arange(600)
    assert torch.allclose(attention_at_positions(q, k, v, pattern, pos, pos, scale=None), ref, atol=1e-12)
    nothing = torch.zeros(1, 600, dtype=torch.bool)
    out, lse = attention_at_positions(q, k, v, pattern, pos, pos, key_valid=nothing, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    empty = attention_at_positions(q[:, :, :0], k, v, pattern, pos[:0], pos)
    assert empty.shape == (1, 2, 0, 4)


def test_bad_arguments_raise():
    q, k, v = make_qkv(b=2, hq=3, hkv=2, nq=4, d=4)
    pos = torch.arange(4)
    with pytest.raises(ValueError, match="not a multiple"):
        attention_at_positions(q, k, v, P.causal(), pos, pos)
    q, k, v = make_qkv(b=2, hq=2, nq=4, d=4)
    with pytest.raises(TypeError, match="integer positions"):
        attention_at_positions(q, k, v, P.causal(), pos.float(), pos)
    with pytest.raises(ValueError, match="q_positions / kv_positions"):
        attention_at_positions(q, k, v, P.causal(), pos[:3], pos)
    with pytest.raises(ValueError, match="key_valid"):
        attention_at_positions(q, k, v, P.causal(), pos, pos, key_valid=torch.ones(2, 4))
    with pytest.raises(TypeError, match="Pattern"):
        attention_at_positions(q, k, v, "causal", pos, pos)
    with pytest.raises(ValueError, match="batch"):  # a mask_mod reading b cannot run on two rows
        attention_at_positions(q, k, v, P.predicate(lambda b, h, i, j: (j <= i) & (b == 0)), pos, pos)
