"""The `triton` backend at the edges of its index arithmetic and launch grid (issue 16).

* Offsets past 2^31 elements: row offsets are int64. On CPU (the interpreter, where int32
  arithmetic wraps as on the GPU) q/k/v are views with rows 2^27 elements apart over one
  lazily-committed storage; on CUDA (pytest -m gpu) one head of 2^24 + 256 tokens at D = 128.
* B * H past CUDA's 65535 programs on grid axes 1/2: the grid folds onto axis 0. On CPU the
  limit (ops.MAX_GRID_YZ) is patched down to 3; on CUDA B * H = 70000.
* explain() says when the triton kernels copy inputs or pad the head dim.
* Partial-block masks are stored once per distinct content.

Outputs the kernels write are NaN-filled (as in test_triton.py), so an unwritten tile fails."""

from __future__ import annotations

import os
import time

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from sa_testing import (  # noqa: E402
    LOW_PRECISION_GRAD_FACTOR,
    LOW_PRECISION_OUT_FACTOR,
    assert_fp32_close,
    assert_low_precision_close,
    check_backend_against_reference,
    make_qkv,
)

import sparse_attn  # noqa: E402
from sparse_attn import patterns as P  # noqa: E402
from sparse_attn.backends.triton import ops as triton_ops  # noqa: E402
from sparse_attn.backends.triton.backend import input_notes  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(autouse=True)
def nan_filled_outputs(monkeypatch):
    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_ops, "new_output", poisoned)


@pytest.fixture
def no_copies(monkeypatch):
    """Fails the test if the kernels' inputs were copied (the point is to read them in place)."""
    inner = triton_ops._rows_contiguous

    def spy(x):
        y = inner(x)
        assert y is x, f"input of shape {tuple(x.shape)}, strides {x.stride()} was copied"
        return y

    monkeypatch.setattr(triton_ops, "_rows_contiguous", spy)


# ------------------------------------------------------------------ offsets past 2^31
def test_row_offsets_past_int32_are_read_in_place(no_copies):
    """q, k, v, dO are views whose rows are 2^27 elements apart (row 16 starts at element 2^31)
    over one storage that is only touched at those rows: the kernels read them in place with
    int64 row offsets (int32 offsets wrap negative and fault, as the interpreter reproduces),
    forward and backward, equal to the float64 reference on contiguous copies."""
    n, d, row = 17, 32, 1 << 27
    try:  # 2^31 fp16 elements of address space (4.25 GiB), committed only where written
        x = torch.empty(n, row, dtype=torch.float16, device=DEVICE)
    except (RuntimeError, MemoryError) as e:  # pragma: no cover - a small CI machine
        pytest.skip(f"cannot reserve 4.25 GiB of address space: {e}")
    x[:, : 4 * d] = torch.randn(n, 4 * d, device=DEVICE).half()
    q, k, v, dout = (x[:, i * d:(i + 1) * d].view(1, 1, n, d) for i in range(4))
    assert q.stride(2) * (n - 1) >= 2**31
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    pattern = P.sliding_window(9)
    out, lse = sparse_attn.sparse_attention(q, k, v, pattern, backend="triton", return_lse=True)
    out.backward(dout)
    q64, k64, v64 = (t.detach().contiguous().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = sparse_attn.sparse_attention(q64, k64, v64, pattern, backend="reference", return_lse=True)
    ref.backward(dout.double())
    # fp16 inputs: the float64 reference on the same fp16 values, fp32 accumulation in the kernel
    for name, a, e in (("out", out, ref), ("lse", lse, ref_lse), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad),
                       ("dv", v.grad, v64.grad)):
        assert_fp32_close(a, e, rtol=2e-3, what=name)


def _rows_reference(q, k, v, pattern, rows, keys, dout_rows, scale, dtype=torch.float64):
    """Attention of query positions `rows` over key positions `keys` (every key those rows may
    see must be among them) computed in `dtype` (float64: the truth; the inputs' low precision:
    the bar of FlashAttention's rule), with its gradients for sum(out * dout_rows):
    (out, lse, dq [rows], dk [keys], dv [keys])."""
    qr, kr, vr = (t.detach()[0, 0, idx].to(dtype).requires_grad_() for t, idx in ((q, rows), (k, keys), (v, keys)))
    s = (qr @ kr.T) * scale
    s = s.masked_fill(~pattern.allowed(rows[:, None], keys[None, :]), float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1) @ vr
    (out * dout_rows.to(dtype)).sum().backward()
    return out.detach(), lse.detach(), qr.grad, kr.grad, vr.grad


def _now(device) -> float:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def _check_long_head(n, d, window, row_groups, device, dtype=torch.float32):
    """One head of n tokens under Longformer (window, global token 0): the kernel's out, lse and
    gradients at the rows of `row_groups` ([start, stop) pairs) against float64 on those rows
    alone (fp32: within 1e-5; bf16/fp16: FlashAttention's rule against the same rows computed in
    that precision). dO is zero elsewhere, so dq must be exactly 0 on every other row and dk/dv
    on every key those rows cannot see: every element of every output is checked, none stays NaN."""
    pattern = P.longformer(window, [0])
    scale = d ** -0.5
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, d, device=device, generator=g).to(dtype).requires_grad_() for _ in range(3))
    rows = torch.cat([torch.arange(a, b, device=device) for a, b in row_groups])
    keys = torch.cat([torch.arange(max(0, a - window), min(n, b + window), device=device)
                      for a, b in row_groups] + [torch.zeros(1, dtype=torch.long, device=device)]).unique()
    dout = torch.zeros(1, 1, n, d, device=device, dtype=dtype)
    dout[0, 0, rows] = torch.randn(rows.numel(), d, device=device, generator=g).to(dtype)
    began = _now(device)
    out, lse = sparse_attn.sparse_attention(q, k, v, pattern, backend="triton", return_lse=True)
    forward = _now(device)
    out.backward(dout)
    backward = _now(device)
    print(f"n={n} {dtype}: forward {forward - began:.1f} s, backward {backward - forward:.1f} s (layouts, plans, "
          "compiles included)")  # shown with pytest -s: where a long run's time went
    ours = (out[0, 0, rows], lse[0, 0, rows], q.grad[0, 0, rows], k.grad[0, 0, keys], v.grad[0, 0, keys])
    truth = _rows_reference(q, k, v, pattern, rows, keys, dout[0, 0, rows], scale)
    names = ("out", "lse", "dq", "dk", "dv")
    if dtype == torch.float32:
        for name, a, e in zip(names, ours, truth):
            assert_fp32_close(a, e, what=name)
    else:
        low = _rows_reference(q, k, v, pattern, rows, keys, dout[0, 0, rows], scale, dtype=dtype)
        for name, a, lo, e in zip(names, ours, low, truth):
            factor = LOW_PRECISION_OUT_FACTOR if name in ("out", "lse") else LOW_PRECISION_GRAD_FACTOR
            assert_low_precision_close(a, lo, e, factor=factor, what=name)
    for name, grad, idx in (("dq", q.grad, rows), ("dk", k.grad, keys), ("dv", v.grad, keys)):
        nonzero = (grad[0, 0] != 0).any(-1)  # [n]; NaN != 0 too
        nonzero[idx] = False
        assert not nonzero.any(), f"{name} is not exactly 0 (or is NaN) at rows {nonzero.nonzero()[:5].tolist()}"
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_long_head_rows_against_reference_small(dtype):
    """_check_long_head at interpreter size (the GPU test below runs it past 2^31 elements)."""
    n = 70
    _check_long_head(n, 16, 9, [(1, 6), (30, 37), (n - 6, n)], DEVICE, dtype)
    pattern = P.longformer(9, [0])  # the candidate keys of the check (global key 0, rows -+ window) cover what the rows see
    dense = pattern.to_dense(n)[0]
    assert not dense[30:37, 1:30 - 9].any() and not dense[30:37, 37 + 9:].any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_one_head_past_2_31_elements():
    """N = 2^24 + 256 tokens at D = 128 (N * D > 2^31 elements, past 2^32 bytes) in bf16 (about
    45 GB with the backward): rows at the start, across row 2^24 (element 2^31) and at the end,
    forward and backward. Longformer's global row makes the layout imbalanced, so heads go
    fastest in the grid and the 131074 query tiles fold onto grid axis 0 as well. Not fp32: its
    IEEE products run without tensor cores, and the ~2.5e13 FLOP of this layout (9 products per
    block pair, ~655K pairs) would take over 6 minutes at the H200's ~67 TFLOP/s (two attempts
    were cut off by their command's limit)."""
    n, d = (1 << 24) + 256, 128
    _check_long_head(n, d, 256, [(1, 65), ((1 << 24) - 32, (1 << 24) + 32), (n - 64, n)], "cuda", torch.bfloat16)


# ------------------------------------------------------------------------ grid limit
def test_grid_shapes(monkeypatch):
    assert triton_ops._grid(5, 10, False) == (5, 10)
    assert triton_ops._grid(5, 10, True) == (10, 5)
    monkeypatch.setattr(triton_ops, "MAX_GRID_YZ", 3)
    assert triton_ops._grid(5, 3, False) == (5, 3)
    assert triton_ops._grid(5, 10, False) == (50,)  # same launch order: tiles fastest, then heads
    assert triton_ops._grid(5, 10, True) == (50,)
    assert triton_ops._grid(5, 2, True) == (10,)  # 5 tiles on axis 1 would pass the limit too
    monkeypatch.setattr(triton_ops, "MAX_GRID_X", 49)
    with pytest.raises(ValueError, match="more than CUDA's 49"):
        triton_ops._grid(5, 10, False)


@pytest.mark.parametrize("deterministic", [True, False], ids=["three_launch", "fused"])
@pytest.mark.parametrize("name", ["window", "longformer"])
def test_grid_folded_past_axis_limit(monkeypatch, name, deterministic):
    """With the axis-1 limit patched to 3, B * Hq = 10 and B * Hkv = 5 (GQA) launch folded grids
    (heads fastest for Longformer's imbalanced rows, tiles fastest for the window) in every
    kernel; out, lse and the three gradients still equal the float64 reference."""
    monkeypatch.setattr(triton_ops, "MAX_GRID_YZ", 3)
    grids = []
    inner = triton_ops._grid

    def spy(tiles, heads, heads_fastest):
        grids.append(inner(tiles, heads, heads_fastest))
        return grids[-1]

    monkeypatch.setattr(triton_ops, "_grid", spy)
    pattern = P.longformer(9, [0, 40]) if name == "longformer" else P.sliding_window(17)
    q, k, v = make_qkv(1, 10, 70, 16, hkv=5, device=DEVICE)
    check_backend_against_reference(q, k, v, pattern, backend="triton", return_lse=True, deterministic=deterministic)
    launches = 4 if deterministic else 3  # fwd, preprocess, then dq and dk/dv, or the fused pass
    assert len(grids) == launches and all(len(g) == 1 for g in grids), grids


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["window", "longformer"])
def test_gpu_batch_heads_past_grid_limit(name):
    """B * H = 70000 (> 65535) at N = 128, D = 16, with GQA (B * Hkv = 14000)."""
    pattern = P.longformer(32, [0]) if name == "longformer" else P.sliding_window(33)
    q, k, v = make_qkv(2, 35000, 128, 16, hkv=7000, device="cuda", dtype=torch.bfloat16)
    check_backend_against_reference(q, k, v, pattern, backend="triton", return_lse=True)


# --------------------------------------------------------------------------- explain
def test_explain_reports_copies_and_head_dim_padding():
    """explain() (triton chosen: CUDA, or the interpreter here) names the inputs the kernels
    copy and their bytes, and the head dim padding with the share of matmul work it wastes."""
    q = torch.randn(1, 2, 17, 96, device=DEVICE)
    k = torch.randn(1, 2, 96, 17, device=DEVICE).transpose(-1, -2)  # head dim not unit-stride: copied
    v = torch.randn(1, 17, 2, 96, device=DEVICE).transpose(1, 2)  # other strides are read in place
    ex = sparse_attn.explain(q, k, v, P.sliding_window(5), backend="triton")
    assert ex.chosen == "triton", str(ex)
    assert ex.notes == [
        "triton: copies k to a contiguous tensor first (head dim not unit-stride: strides (3264, 1632, 1, 17)): "
        "13,056 bytes",  # 2 * 17 * 96 fp32
        "triton: head dim 96 is padded to 128 in the kernels: 25% of their matmul (tensor-core) work multiplies "
        "zero padding"], str(ex)
    assert all(f"note: {n}" in str(ex) for n in ex.notes)
    # D = 96, Dv = 64: (96 + 64) of (128 + 64) columns do work; Dv = 48: (96 + 48) of (128 + 64)
    notes = input_notes(q, k.contiguous(), torch.randn(1, 2, 17, 64, device=DEVICE))
    assert notes == ["triton: head dim 96 is padded to 128 in the kernels: 17% of their matmul (tensor-core) "
                     "work multiplies zero padding"], notes
    notes = input_notes(q, k.contiguous(), torch.randn(1, 2, 17, 48, device=DEVICE))
    assert notes == ["triton: head dim 96 is padded to 128 and v head dim 48 is padded to 64 in the kernels: 25% "
                     "of their matmul (tensor-core) work multiplies zero padding"], notes
    assert input_notes(*(torch.randn(1, 2, 17, 64, device=DEVICE) for _ in range(3))) == []
    # another backend chosen: no triton notes
    assert not sparse_attn.explain(q, k, v, P.sliding_window(5), backend="blocked").notes


# ------------------------------------------------------------------- mask storage
def test_partial_masks_stored_once_per_content():
    """Per-head windows: bits holds each distinct partial-block mask once; every CSR entry (and
    every transposed entry) points at the mask equal to its own element mask."""
    heads = 4
    layout = P.per_head([P.sliding_window(5 + 7 * h) for h in range(heads)]).layout(
        400, block_q=16, block_kv=16, device=DEVICE)
    plan = triton_ops.get_plan(layout)
    csr = layout.partial
    nqb = layout.num_q_blocks
    masks = layout.element_masks(torch.div(csr.rows, nqb, rounding_mode="floor"), csr.rows % nqb,
                                 csr.indices.long())  # [n_partial, 16, 16]
    distinct = torch.unique(masks.reshape(masks.shape[0], -1), dim=0).shape[0]
    assert plan.bits.shape[0] == distinct < csr.indices.numel() // 10
    bits = plan.bits[plan.part_mask.long()]  # [n_partial, 16, words]
    unpacked = ((bits[..., None] >> torch.arange(32, device=DEVICE)) & 1).bool().flatten(-2)[..., :16]
    assert torch.equal(unpacked, masks)
    assert torch.equal(plan.tpart_mask, plan.part_mask[plan.tpart_entry])
    assert plan.part_mask.dtype == plan.tpart_mask.dtype == torch.int32


@pytest.mark.parametrize("pattern, n, q_offset", [
    (P.sliding_window(37), 403, 0),
    (P.sliding_window(21, causal=False), 300, 0),
    (P.dilated(9, 3), 250, 0),
    (P.sliding_window(30) | P.dilated(6, 4), 333, 0),
    (P.sliding_window(50) & P.sliding_window(19, causal=False), 290, 0),
    (P.sliding_window(25), 170, 61),  # queries after the first keys (a decoding chunk)
    (P.longformer(9, [0, 100, 101, 263]), 300, 0),
    (P.longformer(12, 3, causal=True), 333, 0),
    (P.streaming(4, 20), 250, 37),
], ids=["window", "bidirectional", "dilated", "union", "intersection", "offset", "longformer", "longformer_causal",
        "streaming_offset"])
def test_block_signatures_evaluate_one_mask_per_class(monkeypatch, pattern, n, q_offset):
    """Bands, row and column sets and their unions / intersections give exact block signatures:
    the plan evaluates one block per distinct signature (block offset, global rows and columns
    met, real rows and keys), and every CSR entry still points at its own element mask (ragged
    last query and kv blocks, query offsets)."""
    from sparse_attn.backends.triton import plan as plan_module

    evaluated = []
    real = plan_module._pack
    monkeypatch.setattr(plan_module, "_pack", lambda ok, *a, **k: evaluated.append(ok.shape[0]) or real(ok, *a, **k))
    monkeypatch.setattr(plan_module, "_SIGNATURE_CHUNK", 7)  # several chunks
    q_len = n - q_offset
    layout = pattern.layout(q_len, n, q_offset=q_offset, block_q=16, block_kv=16, device=DEVICE)
    plan = plan_module.TritonPlan(layout)
    csr = layout.partial
    nqb = layout.num_q_blocks
    masks = layout.element_masks(torch.div(csr.rows, nqb, rounding_mode="floor"), csr.rows % nqb,
                                 csr.indices.long())
    bits = plan.bits[plan.part_mask.long()]
    unpacked = ((bits[..., None] >> torch.arange(32, device=DEVICE)) & 1).bool().flatten(-2)[..., :16]
    assert torch.equal(unpacked, masks)
    distinct = torch.unique(masks.reshape(masks.shape[0], -1), dim=0).shape[0]
    assert distinct <= sum(evaluated) < csr.indices.numel() // 2


def test_patterns_without_a_block_signature_evaluate_every_partial_block(monkeypatch):
    from sparse_attn.backends.triton import plan as plan_module

    evaluated = []
    real = plan_module._pack
    monkeypatch.setattr(plan_module, "_pack", lambda ok, *a, **k: evaluated.append(ok.shape[0]) or real(ok, *a, **k))
    pattern = P.predicate(lambda b, h, q, kv: (q - kv).abs() <= 9)
    assert pattern.block_signature(torch.zeros(1, 16, dtype=torch.long), torch.zeros(1, 16, dtype=torch.long)) is None
    layout = pattern.layout(200, block_q=16, block_kv=16, device=DEVICE)
    plan_module.TritonPlan(layout)
    assert sum(evaluated) == layout.partial.indices.numel()


def test_membership_words_pack_exactly():
    from sparse_attn.patterns.primitives import _membership_words

    member = torch.zeros(3, 130, dtype=torch.bool)
    member[0, [0, 61, 62, 129]] = True
    member[1, 61] = True
    member[2, 62] = True
    words = _membership_words(member)
    assert words.shape == (3, 3) and (words >= 0).all()
    assert words[0].tolist() == [1 | 1 << 61, 1, 1 << 5] and words[1].tolist() == [1 << 61, 0, 0]
    assert words[2].tolist() == [0, 1, 0]
