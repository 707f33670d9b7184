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


def padding_mask(b, n, block_size, generator):
    """Rows: right padding, left padding, a whole pad block in the middle plus random holes."""
    mask = torch.ones(b, n, dtype=torch.bool)
    kinds = [lambda m: m[n - n // 3:].fill_(False), lambda m: m[:block_size + 3].fill_(False),
             lambda m: (m[block_size:2 * block_size].fill_(False), m.mul_(torch.rand(n, generator=generator) > 0.3))]
    for row in range(b):
        kinds[row % len(kinds)](mask[row])
    return mask


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("ties", [False, True])
def test_kernel_selection_with_a_padding_mask_equals_the_torch_ops(monkeypatch, case, ties):
    """With a key_padding_mask (empty kv blocks scored -inf before the kernel, rows of pads and
    empty blocks dropped after it) the kernel path gives the torch ops' selection and picks,
    bit for bit, and the float64 reference's selection."""
    b, hq, hkv, nq, nkv, d, top_k, bs, causal, q_offset = case
    b = 3  # one row per mask kind
    g = torch.Generator().manual_seed(hash(case) % 2**31 + 1)
    if ties:
        q = torch.randint(-1, 2, (b, hq, nq, d), generator=g).float()
        k = torch.randint(-1, 2, (b, hkv, nkv, d), generator=g).float()
    else:
        q, k = torch.randn(b, hq, nq, d, generator=g), torch.randn(b, hkv, nkv, d, generator=g)
    mask = padding_mask(b, nkv, bs, g)
    q, k, mask = q.to(DEVICE), k.to(DEVICE), mask.to(DEVICE)
    out = {}
    for use in (False, True):
        monkeypatch.setattr(block, "SELECTION_KERNEL", use)
        out[use] = block._select(q, k, top_k, bs, causal, q_offset, mask)
    (sel_torch, picks_torch), (sel_kernel, picks_kernel) = out[False], out[True]
    assert torch.equal(sel_kernel, sel_torch)
    assert torch.equal(picks_kernel, picks_torch)
    unmasked = block._select(q, k, top_k, bs, causal, q_offset)[0]
    assert not torch.equal(sel_kernel, unmasked)  # the mask does change the selection here
    if not ties:
        expected = select_kv_blocks_naive(q.double(), k.double(), top_k, bs, causal=causal, q_offset=q_offset,
                                          key_padding_mask=mask)
        assert torch.equal(sel_kernel.cpu(), expected.cpu())


@pytest.mark.parametrize("causal", [False, True])
def test_block_topk_with_a_padding_mask_on_the_triton_path_equals_the_reference(monkeypatch, causal):
    """The CUDA path (selection kernel + triton attention kernels; interpreted on CPU) with a
    key_padding_mask and streaming sinks that fall on left pads: forward and gradients equal
    the float64 reference with the same mask, pad query rows are 0, pads get no gradient. The
    aligned shape is one the unmasked call runs on the device layout."""
    from sparse_attn import patterns as P
    from sparse_attn.ops.topk.naive import block_topk_attention_naive

    g = torch.Generator().manual_seed(11)
    q, k, v, dout = (torch.randn(3, 4, 64, 16, generator=g) for _ in range(4))
    k, v = k[:, :2].contiguous(), v[:, :2].contiguous()  # GQA 4:2
    mask = padding_mask(3, 64, 16, g)
    q, k, v, dout, mask = (t.to(DEVICE) for t in (q, k, v, dout, mask))
    always = P.streaming(2, 8)
    monkeypatch.setattr(block, "SELECTION_KERNEL", True)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, sel = block.block_topk_attention(*leaves, 2, 16, causal=causal, always=always, backend="triton",
                                          key_padding_mask=mask, return_selection=True)
    grads = torch.autograd.grad((out * dout).sum(), leaves)
    monkeypatch.setattr(block, "SELECTION_KERNEL", False)
    assert torch.equal(sel, block.select_kv_blocks(q, k, 2, 16, causal=causal, key_padding_mask=mask))
    leaves64 = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref = block_topk_attention_naive(*leaves64, sel, 16, causal=causal, always=always, key_padding_mask=mask)
    grads_ref = torch.autograd.grad((ref * dout.double()).sum(), leaves64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for a, e in zip(grads, grads_ref):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5)
    assert (out.transpose(1, 2)[~mask] == 0).all()
    for grad in grads:
        assert (grad.transpose(1, 2)[~mask] == 0).all()
