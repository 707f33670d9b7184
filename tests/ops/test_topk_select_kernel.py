"""The one-kernel block top-k selection (ops/topk/select_kernel.py) against the torch ops it
replaces: the same selection and picks, bit for bit, for random and tie-heavy scores, causal or
not, GQA, query offsets, ragged blocks, k from 1 to every block. Without CUDA the kernel runs in
Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from sparse_attn.ops.topk import block  # noqa: E402
from sparse_attn.ops.topk.naive import select_kv_blocks_naive  # noqa: E402
from sparse_attn.ops.topk.select_kernel import select_from_scores  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def both_paths(monkeypatch, q, k, top_k, block_size, causal, q_offset):
    out = {}
    for use in (False, True):
        monkeypatch.setattr(block, "SELECTION_KERNEL", use)
        out[use] = block._select(q, k, top_k, block_size, causal, q_offset)
    return out[False], out[True]


CASES = [  # (B, Hq, Hkv, Nq, Nkv, D, top_k, block_size, causal, q_offset)
    (1, 2, 2, 64, 64, 8, 2, 8, False, 0),
    (2, 4, 2, 70, 70, 8, 3, 8, True, 0),  # GQA, ragged last block
    (1, 2, 1, 13, 90, 16, 4, 8, True, 77),  # queries at the end (decoding-like), ragged first query block
    (1, 2, 2, 40, 40, 8, 100, 8, True, 0),  # k beyond the blocks: every block
    (1, 3, 3, 33, 120, 4, 1, 16, False, 0),
    (1, 2, 2, 300, 300, 8, 5, 4, True, 0),  # 75 kv blocks: several rows per program, padded columns
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("ties", [False, True])
def test_kernel_selection_equals_the_torch_ops(monkeypatch, case, ties):
    b, hq, hkv, nq, nkv, d, top_k, bs, causal, q_offset = case
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    if ties:  # integer entries in {-1, 0, 1}: exact block sums, many equal scores (and -0.0 vs +0.0)
        q = torch.randint(-1, 2, (b, hq, nq, d), generator=g).float()
        k = torch.randint(-1, 2, (b, hkv, nkv, d), generator=g).float()
        k[..., :bs, :] = 0.0  # a whole block of zero keys: scores of exactly 0
    else:
        q, k = torch.randn(b, hq, nq, d, generator=g), torch.randn(b, hkv, nkv, d, generator=g)
    q, k = q.to(DEVICE), k.to(DEVICE)
    (sel_torch, picks_torch), (sel_kernel, picks_kernel) = both_paths(monkeypatch, q, k, top_k, bs, causal, q_offset)
    assert sel_kernel.dtype == torch.bool and picks_kernel.dtype == torch.int64
    assert torch.equal(sel_kernel, sel_torch)
    assert torch.equal(picks_kernel, picks_torch)
    if not ties:  # and both equal the float64 reference's selection
        expected = select_kv_blocks_naive(q.double(), k.double(), top_k, bs, causal=causal, q_offset=q_offset)
        assert torch.equal(sel_kernel.cpu(), expected.cpu())


def test_kernel_ties_go_to_the_lowest_block_and_signed_zeros_tie():
    scores = torch.tensor([[[0.0, -0.0, 1.0, 0.0, -0.0, 1.0, -2.0]]])  # [1, 1, 7]
    sel, picks = select_from_scores(scores.to(DEVICE), 3, 0, False)
    assert picks.tolist() == [[[0, 2, 5]]]  # the two 1.0s, then the first of the zeros (+0.0 and -0.0 tie)
    assert sel.tolist() == [[[True, False, True, False, False, True, False]]]
    sel, picks = select_from_scores(torch.full((1, 2, 4), float("-inf")).to(DEVICE), 2, 0, False)
    assert picks.tolist() == [[[0, 1], [0, 1]]]


def test_kernel_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="float32"):
        select_from_scores(torch.zeros(1, 2, 4, dtype=torch.float64), 1, 0, False)
    with pytest.raises(ValueError, match="top_k"):
        select_from_scores(torch.zeros(1, 2, 4), 5, 0, False)


@pytest.mark.parametrize("causal", [False, True])
def test_block_topk_attention_with_the_kernel_selection_equals_the_reference(monkeypatch, causal):
    from sparse_attn import block_topk_attention
    from sparse_attn.ops.topk.naive import block_topk_attention_naive

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 4, 72, 16, generator=g).to(DEVICE) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA 4:2
    monkeypatch.setattr(block, "SELECTION_KERNEL", True)
    out, sel = block_topk_attention(q, k, v, 3, 8, causal=causal, backend="blocked", return_selection=True)
    monkeypatch.setattr(block, "SELECTION_KERNEL", False)
    assert torch.equal(sel, block.select_kv_blocks(q, k, 3, 8, causal=causal))
    ref = block_topk_attention_naive(q.double(), k.double(), v.double(), sel, 8, causal=causal)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
