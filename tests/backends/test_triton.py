"""The `triton` backend (forward and backward) against the float64 reference.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before
triton is imported) at tiny shapes; on the GPU machine the same tests run on CUDA, and the
@pytest.mark.gpu cases add real shapes (N=4096, D=128, bf16). Every tensor the kernels write
(out, lse, dq, dk, dv) is allocated NaN-filled in these tests (fixture below), so an
unwritten tile fails loudly: every element is compared and NaN anywhere fails (the fused
backward's dQ buffer is the exception: it is summed into, so it starts at zero).

Both backwards are tested (`BACKWARDS`): the fused one-pass backward (deterministic=False)
and the three-launch one (the default, deterministic=True)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from conformance import Conformance, conformance_tests  # noqa: E402
from sa_testing import (  # noqa: E402
    NoHostReads,
    assert_fp32_close,
    assert_no_nan,
    check_backend_against_reference,
    make_qkv,
    preset_zoo,
    reference_f64,
)

import sparse_attn  # noqa: E402
from sparse_attn import patterns as P  # noqa: E402
from sparse_attn import explain  # noqa: E402
from sparse_attn.backends.triton import ops as triton_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEADS = 4
# deterministic=False: the fused one-pass backward (atomic dQ); True: the three launches
BACKWARDS = pytest.mark.parametrize("deterministic", [False, True], ids=["fused", "three_launch"])


@pytest.fixture(autouse=True)
def nan_filled_outputs(monkeypatch):
    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_ops, "new_output", poisoned)


# the zoo's patterns the interpreted kernels run in the default test run (each costs seconds)
TRITON_PRESETS = ("full", "causal", "window", "window_nc", "dilated", "strided", "longformer", "bigbird",
                  "bigbird_heads", "block_sparse_heads", "streaming", "per_head", "predicate_heads", "union")


def presets(n, heads=HEADS):
    """The shared preset zoo (sa_testing.preset_zoo) at the kernels' 16-token blocks, the
    subset TRITON_PRESETS."""
    zoo = preset_zoo(n, heads, block=16)
    return {name: zoo[name] for name in TRITON_PRESETS}


def _layout(pattern, nq, nkv=None, block=16, q_offset=None):
    return pattern.layout(nq, nkv, block_q=block, block_kv=block, q_offset=q_offset, device=DEVICE)


# The conformance suite (tests/conformance.py), TRITON_PRESETS at N=70: a prebuilt 16x16 layout
# reaches the kernels as is (full blocks, partial bitmasks, ragged edges); forward and the three
# gradients (also through lse), GQA 4:2, both backwards.
globals().update(conformance_tests(Conformance(
    "triton", device=DEVICE, shapes=((70, 70),), presets=TRITON_PRESETS, zoo_block=16, layout_blocks=(16, 16),
    variants={"fused": {"deterministic": False}, "three_launch": {"deterministic": True}})))


@BACKWARDS
@pytest.mark.parametrize("nq,nkv,d,dv", [(1, 1, 16, 16), (17, 17, 24, 24), (70, 70, 16, 24), (17, 70, 24, 16),
                                         (1, 70, 16, 16), (70, 17, 16, 16)])
def test_shapes_fp32_gqa(nq, nkv, d, dv, deterministic):
    """N in {1, 17, 70}, q_len != kv_len (queries are the last positions), D not a power of two, Dv != D."""
    q, k, v = make_qkv(2, 4, nq, d, hkv=2, nkv=nkv, dv=dv, device=DEVICE)
    kw = {"q_offset": 0} if nq > nkv else {}  # queries past the keys then see nothing: 0 and -inf
    check_backend_against_reference(q, k, v, P.sliding_window(20), backend="triton", return_lse=True,
                                    deterministic=deterministic, **kw)


def test_q_offset_prebuilt_layout():
    q, k, v = make_qkv(1, 2, 17, 16, nkv=70, device=DEVICE)
    layout = _layout(P.sliding_window(9), 17, 70, q_offset=30)
    check_backend_against_reference(q, k, v, layout, backend="triton", return_lse=True)


@BACKWARDS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["window", "bigbird_heads", "per_head", "longformer"])
def test_low_precision(name, dtype, deterministic):
    n = 70
    q, k, v = make_qkv(1, HEADS, n, 24, hkv=2, device=DEVICE, dtype=dtype)
    check_backend_against_reference(q, k, v, _layout(presets(n)[name], n), backend="triton", return_lse=True,
                                    deterministic=deterministic)


def test_empty_rows_are_zero_with_lse_minus_inf():
    """Rows with nothing allowed (every third query, and the whole second query block) -> 0, -inf."""
    pattern = P.predicate(lambda b, h, q, kv: (q % 3 != 0) & (kv <= q) & ((q < 16) | (q >= 32)))
    n = 40
    q, k, v = make_qkv(1, 2, n, 16, device=DEVICE)
    layout = _layout(pattern, n)
    out, lse = sparse_attn.sparse_attention(q, k, v, layout, backend="triton", return_lse=True)
    assert_no_nan(out, lse)
    empty = torch.tensor([not ((i % 3 != 0) and (i < 16 or i >= 32)) for i in range(n)], device=DEVICE)
    assert torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty]))
    assert torch.isinf(lse[:, :, empty]).all() and (lse[:, :, empty] < 0).all()
    out64, lse64 = reference_f64(q, k, v, layout, return_lse=True)
    assert_fp32_close(out, out64)
    assert_fp32_close(lse, lse64, what="lse")


@BACKWARDS
def test_empty_rows_and_unread_keys_get_zero_gradients(deterministic):
    """Rows that see nothing (lse2 = +inf in the backward: P = 0) get dQ = 0 exactly, keys no
    row reads get dK = dV = 0, and the other gradients match the reference (GQA 4:2)."""
    pattern = P.predicate(lambda b, h, q, kv: (q % 3 != 0) & (kv <= q) & ((q < 16) | (q >= 32)) & (kv % 5 != 1))
    n = 40
    q, k, v = make_qkv(1, 4, n, 16, hkv=2, device=DEVICE)
    layout = _layout(pattern, n)
    _, _, (dq, dk, dv) = check_backend_against_reference(q, k, v, layout, backend="triton", return_lse=True,
                                                          deterministic=deterministic)
    empty = torch.tensor([not ((i % 3 != 0) and (i < 16 or i >= 32)) for i in range(n)], device=DEVICE)
    unread = torch.arange(n, device=DEVICE) % 5 == 1
    assert torch.all(dq[:, :, empty] == 0)
    assert torch.all(dk[:, :, unread] == 0) and torch.all(dv[:, :, unread] == 0)


def test_pattern_with_default_blocks_and_cache():
    """Through a pattern: the layout gets the backend's blocks; its plan is cached on it."""
    n = 70
    q, k, v = make_qkv(1, 2, n, 16, device=DEVICE)
    pattern = P.sliding_window(13)
    check_backend_against_reference(q, k, v, pattern, backend="triton", return_lse=True)
    layout = pattern.layout(n, block_q=64, block_kv=64, device=DEVICE)
    sparse_attn.sparse_attention(q, k, v, layout, backend="triton")
    plan = layout.cache["triton"]
    assert plan.bits.dtype == torch.int32 and plan.bits.shape[1:] == (64, 2)
    sparse_attn.sparse_attention(q, k, v, layout, backend="triton")
    assert layout.cache["triton"] is plan


def test_plan_transposed_layout_and_schedule():
    """The backward's transposed walk lists, per (head, kv block), the query blocks touching it,
    and points each partial block at its bitmask; the schedule visits the busiest rows first."""
    pattern = P.longformer(9, [0]) | P.per_head([P.sliding_window(5 + 3 * h) for h in range(3)])
    layout = pattern.layout(400, block_q=16, block_kv=16, device=DEVICE)
    plan = triton_ops.get_plan(layout)
    nqb, nkb = layout.num_q_blocks, layout.num_kv_blocks
    for csr, off, idx in ((layout.full, plan.tfull_off, plan.tfull_idx), (layout.partial, plan.tpart_off,
                                                                         plan.tpart_idx)):
        forward_pairs = {(int(r) // nqb, int(r) % nqb, int(c)) for r, c in zip(csr.rows, csr.indices)}
        transposed = set()
        for col in range(layout.num_heads * nkb):
            for j in range(int(off[col]), int(off[col + 1])):
                transposed.add((col // nkb, int(idx[j]), col % nkb))
        assert transposed == forward_pairs
    for col in range(layout.num_heads * nkb):
        for j in range(int(plan.tpart_off[col]), int(plan.tpart_off[col + 1])):
            e = int(plan.tpart_entry[j])
            assert int(layout.partial.indices[e]) == col % nkb and int(layout.partial.rows[e]) % nqb == int(
                plan.tpart_idx[j])
    work = (plan.full_off.diff() + plan.part_off.diff()).reshape(layout.num_heads, nqb).amax(0)
    ordered = work[plan.q_block_order.long()]
    assert torch.all(ordered[:-1] >= ordered[1:]) and sorted(plan.q_block_order.tolist()) == list(range(nqb))
    assert plan.q_heads_fastest  # the global row reads all 25 blocks, the others about 3: imbalanced
    assert not triton_ops.get_plan(P.sliding_window(9).layout(400, block_q=16, block_kv=16)).q_heads_fastest


def _grads(q, k, v, pattern, dout, **kw):
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out = sparse_attn.sparse_attention(qq, kk, vv, pattern, backend="triton", **kw)
    return torch.autograd.grad(out, (qq, kk, vv), dout)


@BACKWARDS
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("name", ["window", "longformer", "per_head"])
def test_tile_loads_tma_and_pointers(monkeypatch, name, tma, deterministic):
    """By default (ops.TMA_PHASES) the forward loads tiles through pointers and the backward
    through TMA descriptors (the interpreter emulates them); here every phase takes one kind:
    pointers (GPUs without TMA, misaligned inputs) or TMA (TMA_DEFAULT=True)."""
    monkeypatch.setattr(triton_ops, "TMA_DEFAULT", tma)
    q, k, v = make_qkv(1, HEADS, 45, 24, hkv=2, device=DEVICE)
    check_backend_against_reference(q, k, v, presets(45)[name], backend="triton", return_lse=True,
                                    deterministic=deterministic)


@BACKWARDS
def test_wide_rows_take_int64_in_tile_offsets(monkeypatch, deterministic):
    """In-tile offsets are int32 unless a row stride could pass 2^31 inside a tile
    (ops.MAX_ROW_STRIDE, made small here so a [B, N, H, D] view crosses it): then int64, in place.
    (test_triton_robust reads rows 2^27 elements apart for real.)"""
    monkeypatch.setattr(triton_ops, "MAX_ROW_STRIDE", 64)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in make_qkv(1, HEADS, 45, 16, device=DEVICE))
    assert q.stride(2) == HEADS * 16 and triton_ops.wide_rows(q) and not triton_ops.needs_copy(q)
    check_backend_against_reference(q, k, v, P.sliding_window(9), backend="triton", return_lse=True,
                                    deterministic=deterministic)


def test_backward_is_deterministic():
    """deterministic=True, no atomics: two backward passes give bitwise-identical gradients
    (GQA group of 2)."""
    q, k, v = make_qkv(1, 4, 45, 16, hkv=2, device=DEVICE)
    dout = torch.randn(1, 4, 45, 16, device=DEVICE)
    first, second = (_grads(q, k, v, P.longformer(9, [0, 20]), dout, deterministic=True) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


class _Spy:
    """Counts the calls of one of ops.py's backward ops (the autograd formula looks them up in
    the module at call time)."""

    def __init__(self, monkeypatch, name):
        self.calls, real = 0, getattr(triton_ops, name)

        def spy(*args):
            self.calls += 1
            return real(*args)

        monkeypatch.setattr(triton_ops, name, spy)


@pytest.mark.parametrize("default_fused", [False, True])
@pytest.mark.parametrize("deterministic,torch_mode,fused", [(None, False, None), (None, True, False),
                                                            (False, True, True), (True, False, False)])
def test_which_backward_runs(monkeypatch, deterministic, torch_mode, fused, default_fused):
    """Default (None): the fused backward when FUSED_BACKWARD_DEFAULT is on and
    torch.use_deterministic_algorithms(True) is off, else the three launches; an explicit
    True / False wins over both."""
    monkeypatch.setattr(triton_ops, "FUSED_BACKWARD_DEFAULT", default_fused)
    if fused is None:
        fused = default_fused
    spies = {name: _Spy(monkeypatch, name) for name in ("block_sparse_attn_bwd", "block_sparse_attn_bwd_fused")}
    q, k, v = make_qkv(1, 2, 20, 16, device=DEVICE)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(torch_mode)
    try:
        _grads(q, k, v, P.sliding_window(5), torch.randn_like(q), deterministic=deterministic)
    finally:
        torch.use_deterministic_algorithms(was)
    assert spies["block_sparse_attn_bwd_fused"].calls == int(fused)
    assert spies["block_sparse_attn_bwd"].calls == int(not fused)


def test_fused_and_three_launch_agree():
    """Same inputs through both backwards: dQ differs only by the order of its fp32 sums, dK/dV
    are computed the same way (GQA 4:2, partial blocks, a global row and column)."""
    q, k, v = make_qkv(1, 4, 70, 24, hkv=2, device=DEVICE)
    dout = torch.randn(1, 4, 70, 24, device=DEVICE)
    pattern = _layout(P.longformer(9, [0, 35]), 70)
    fused = _grads(q, k, v, pattern, dout, deterministic=False)
    three = _grads(q, k, v, pattern, dout, deterministic=True)
    for a, b in zip(fused, three):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_deterministic_is_checked():
    q, k, v = make_qkv(1, 2, 20, 16, device=DEVICE)
    with pytest.raises(TypeError, match="deterministic must be True, False or None"):
        sparse_attn.sparse_attention(q, k, v, P.causal(), backend="triton", deterministic="yes")


@BACKWARDS
def test_torch_compile_traces_without_graph_breaks(deterministic):
    """The kernels are custom ops with fake implementations: a module calling sparse_attention
    compiles with fullgraph=True (a graph break would raise), forward and both backwards."""
    torch._dynamo.reset()
    pattern = P.sliding_window(9)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 3 * 16)

        def forward(self, x):  # x [B, N, 16] -> one head of dim 16
            q, k, v = self.proj(x).unsqueeze(1).chunk(3, dim=-1)
            return sparse_attn.sparse_attention(q, k, v, pattern, backend="triton",
                                                deterministic=deterministic).sum()

    model = Block().to(DEVICE)
    x = torch.randn(1, 40, 16, device=DEVICE)
    eager = model(x)
    eager_grad = torch.autograd.grad(eager, model.proj.weight)[0]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    grad = torch.autograd.grad(loss, model.proj.weight)[0]
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_block_topk_selection_layout(causal):
    """Block top-k with selection blocks of 64 over 32-blocks (CPU interpreter; 128 on CUDA):
    the layout built on the device from the selection with no host read (NoHostReads: on CUDA
    the sync debug mode too) from selection to kernels, forward and backward; equal to the
    dense reference on the selection's pattern, with gradients, and bitwise equal to the same
    selection run through the table-built layout (`selection_layout`, the path before)."""
    from sparse_attn.ops.topk.block import select_kv_blocks, selection_layout, selection_pattern
    from sparse_attn.patterns.grid import BlockGrid

    n = (200 if causal else 192) if DEVICE == "cpu" else 1000  # not causal: cells of whole kernel blocks
    bs = 64 if DEVICE == "cpu" else 256
    block = 32 if DEVICE == "cpu" else 128
    q, k, v = make_qkv(1, 2, n, 16, hkv=1, device=DEVICE, requires_grad=True)
    dout = torch.randn_like(q)
    with NoHostReads():
        out = sparse_attn.block_topk_attention(q, k, v, 2, bs, causal=causal, backend="triton")
        g = torch.autograd.grad((out * dout).sum(), (q, k, v))
    selection = select_kv_blocks(q, k, 2, bs, causal=causal)
    pattern = selection_pattern(selection, bs, n, n, 0, causal=causal)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = sparse_attn.sparse_attention(q64, k64, v64, pattern, backend="reference")
    g_ref = torch.autograd.grad((ref * dout.double()).sum(), (q64, k64, v64))
    assert_fp32_close(out, ref)
    for a, e in zip(g, g_ref):
        assert_fp32_close(a, e, what="gradient")
    table_layout = selection_layout(selection, pattern, bs, BlockGrid(n, n, 0, block, block, q.device), causal=causal)
    before = sparse_attn.sparse_attention(q, k, v, table_layout, backend="triton")
    g_before = torch.autograd.grad((before * dout).sum(), (q, k, v))
    assert torch.equal(out, before)
    for a, e in zip(g, g_before):
        assert torch.equal(a, e)


@BACKWARDS
@pytest.mark.parametrize("name", ["window", "longformer", "bigbird", "streaming", "strided"])
def test_padded_batch_equals_rows_alone(name, deterministic):
    """key_padding_mask (left and right padding, rows of 70, 9 and 33 tokens) through the kernels:
    each row's real positions equal that row alone on the float64 reference, grads too."""
    pattern = P.longformer(9, 2) if name == "longformer" else presets(70)[name]  # its globals fit every row
    n = 70
    mask = torch.zeros(3, n, dtype=torch.bool)
    mask[0], mask[1, -9:], mask[2, :33] = True, True, True  # full, left-padded, right-padded
    q, k, v = (torch.randn(3, 2, n, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    dout = torch.randn(3, 2, n, 16, device=DEVICE)
    out = sparse_attn.sparse_attention(q, k, v, pattern, key_padding_mask=mask.to(DEVICE), backend="triton",
                                       deterministic=deterministic)
    out.backward(dout)
    assert_no_nan(out, q.grad, k.grad, v.grad)
    for b in range(3):
        idx = mask[b].nonzero().squeeze(1).to(DEVICE)
        parts = [t.detach()[b:b + 1, :, idx].double().requires_grad_() for t in (q, k, v)]
        alone = sparse_attn.sparse_attention(*parts, pattern, backend="reference")
        alone.backward(dout[b:b + 1, :, idx].double())
        assert_fp32_close(out[b:b + 1, :, idx], alone, what=f"row {b} out")
        for t, p, what in zip((q, k, v), parts, "qkv"):
            assert_fp32_close(t.grad[b:b + 1, :, idx], p.grad, what=f"row {b} d{what}")
        pads = ~mask[b].to(DEVICE)
        assert torch.all(out[b][:, pads] == 0) and torch.all(k.grad[b][:, pads] == 0)
        assert torch.all(q.grad[b][:, pads] == 0) and torch.all(v.grad[b][:, pads] == 0)


@BACKWARDS
@pytest.mark.parametrize("name", ["window", "bigbird"])
def test_packed_documents_equal_separate_runs(name, deterministic):
    """Packed documents and pad ids (-1) run over the full length: pad rows are empty rows of
    the kernel's layout and get zero gradients."""
    pattern = presets(70)[name]
    ids = torch.tensor([[0] * 20 + [1] * 33 + [2] * 17, [4] * 50 + [-1] * 20])
    q, k, v = (torch.randn(2, 2, 70, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    out = sparse_attn.sparse_attention(q, k, v, pattern, document_ids=ids.to(DEVICE), backend="triton",
                                       deterministic=deterministic)
    out.sum().backward()
    assert_no_nan(out, q.grad, k.grad, v.grad)
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.all(t[1, :, 50:] == 0)
    for b in range(2):
        for d in ids[b].unique().tolist():
            if d < 0:
                continue
            idx = (ids[b] == d).nonzero().squeeze(1).to(DEVICE)
            parts = [t.detach()[b:b + 1, :, idx].double().requires_grad_() for t in (q, k, v)]
            alone = sparse_attn.sparse_attention(*parts, pattern, backend="reference")
            alone.sum().backward()
            assert_fp32_close(out[b:b + 1, :, idx], alone, what=f"row {b} document {d}")
            for t, p, what in zip((q, k, v), parts, "qkv"):
                assert_fp32_close(t.grad[b:b + 1, :, idx], p.grad, what=f"row {b} document {d} d{what}")


def test_rejects_bad_block_sizes():
    q, k, v = make_qkv(1, 2, 40, 16, device=DEVICE)
    with pytest.raises(ValueError, match="block_kv must be a power of two"):
        sparse_attn.sparse_attention(q, k, v, P.causal().layout(40, block_q=16, block_kv=24, device=DEVICE),
                                     backend="triton")


def test_grads_served_and_explain_names_triton():
    q, k, v = make_qkv(1, 2, 17, 16, device=DEVICE, requires_grad=True)
    ex = explain(q, k, v, P.sliding_window(5), backend="triton")
    assert ex.chosen == "triton", str(ex)


# ---------------------------------------------------------------- GPU scale (pytest -m gpu)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@BACKWARDS
@pytest.mark.parametrize("name", ["causal", "window", "longformer", "bigbird", "per_head"])
def test_gpu_scale_bf16(name, deterministic):
    n = 4096
    pattern = {
        "causal": P.causal(),
        "window": P.sliding_window(1024),
        "longformer": P.longformer(512, [0, 100, 2000]),
        "bigbird": P.bigbird(64, seed=0),
        "per_head": P.per_head([P.sliding_window(256 * (h + 1)) for h in range(HEADS)]),
    }[name]
    q, k, v = make_qkv(1, HEADS, n, 128, hkv=2, device="cuda", dtype=torch.bfloat16)
    check_backend_against_reference(q, k, v, pattern, backend="triton", return_lse=True, deterministic=deterministic)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fused_backward_matches_deterministic():
    """4096 tokens, bf16, causal window 1024, GQA 8:2, D=128: the fused backward and the
    three-launch one each within 3x the bf16 reference's error of the float64 truth, and within
    that bar of each other; deterministic=True twice gives identical bits."""
    from sa_testing import LOW_PRECISION_GRAD_FACTOR, as_f64, max_abs_err, run_with_grads

    n, pattern = 4096, P.sliding_window(1024)
    q, k, v = make_qkv(2, 8, n, 128, hkv=2, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn(2, 8, n, 128, device="cuda", dtype=torch.bfloat16)
    fused = run_with_grads(q, k, v, pattern, dout, backend="triton", deterministic=False)[2]
    three = run_with_grads(q, k, v, pattern, dout, backend="triton", deterministic=True)[2]
    again = run_with_grads(q, k, v, pattern, dout, backend="triton", deterministic=True)[2]
    low = run_with_grads(q, k, v, pattern, dout, backend="reference")[2]
    truth = run_with_grads(*as_f64(q, k, v), pattern, dout.double(), backend="reference")[2]
    for name, f, t, a, lo, e in zip("qkv", fused, three, again, low, truth):
        assert torch.equal(t, a), f"d{name}: deterministic=True is not bitwise reproducible"
        bar = LOW_PRECISION_GRAD_FACTOR * max_abs_err(lo, e) + 1e-6
        for what, g in (("fused", f), ("three-launch", t)):
            assert max_abs_err(g, e) <= bar, f"d{name} {what}: err {max_abs_err(g, e):.3e} > {bar:.3e}"
        assert max_abs_err(f, t) <= bar, f"d{name}: fused vs three-launch {max_abs_err(f, t):.3e} > {bar:.3e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("d,dv", [(128, 128), (96, 64), (256, 256), (16, 16), (59, 111)])
def test_gpu_scale_fp32_and_head_dims(d, dv):
    n = 4096
    q, k, v = make_qkv(1, 2, n, d, dv=dv, device="cuda")
    check_backend_against_reference(q, k, v, P.sliding_window(777), backend="triton", return_lse=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@BACKWARDS
def test_gpu_tma_and_its_fallback(deterministic):
    """bf16 inputs with 16-byte aligned strides read their tiles through TMA descriptors on
    sm90+; a view starting one element in (misaligned base) takes the pointer loads. Both exact."""
    q, k, v = make_qkv(1, HEADS, 3000, 128, hkv=2, device="cuda", dtype=torch.bfloat16)
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert triton_ops.tma_allowed(q, k, v) == hopper
    check_backend_against_reference(q, k, v, P.longformer(700, [0, 999]), backend="triton", return_lse=True,
                                    deterministic=deterministic)
    shifted = [torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")[1:].view(t.shape).copy_(t) for t in (q, k, v)]
    assert not triton_ops.tma_allowed(*shifted)
    check_backend_against_reference(*shifted, P.longformer(700, [0, 999]), backend="triton", return_lse=True,
                                    deterministic=deterministic)


# On the GPU: every preset and combinator of TRITON_PRESETS at odd lengths, GQA, q_len != kv_len,
# with the backend's own 128x128 blocks and the tuned tiles, fp16 and bf16 (FlashAttention's rule).
_gpu_suite = conformance_tests(Conformance(
    "triton", device="cuda", dtypes=(torch.float16, torch.bfloat16), shapes=((1000, 1000), (203, 1000)),
    presets=TRITON_PRESETS, zoo_block=16, batch=2, head_dim=64, marks=(pytest.mark.gpu,)))
test_gpu_every_preset_low_precision = _gpu_suite.pop("test_conformance_triton")


# Kernel variants of issue #16 (configs.OVERRIDES; off by default): a persistent grid draining
# the busiest-first work list by static stride or from an atomic queue, and the warp_specialize
# loop flag. Under the interpreter a persistent grid has ops.INTERPRETED_SMS programs per unit,
# so each program drains several work items (and with one program per unit, every item).
VARIANTS = {
    "persistent_stride": {"persistent": 1},
    "persistent_queue": {"persistent": 2, "queue": True},
    "warp_specialize": {"warp_specialize": True},
    "combined_backward": {"combined": True},  # read on the dq phase only
}


@BACKWARDS
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name,n", [("longformer", 45), ("per_head", 70)])
def test_kernel_variants_against_reference(monkeypatch, variant, name, n, deterministic):
    """Every phase (forward, dq, dk/dv, fused) in the variant: full and partial blocks, ragged
    last blocks (N=45, 70 with 16-blocks), GQA 4:2, per-head layouts, both backwards."""
    from sparse_attn.backends.triton import configs

    monkeypatch.setattr(configs, "OVERRIDES", {ph: VARIANTS[variant] for ph in ("fwd", "dq", "dkdv", "fused")})
    monkeypatch.setattr(triton_ops, "INTERPRETED_SMS", 1)
    q, k, v = make_qkv(1, HEADS, n, 24, hkv=2, device=DEVICE)
    check_backend_against_reference(q, k, v, presets(n)[name], backend="triton", return_lse=True,
                                    deterministic=deterministic)


@pytest.mark.parametrize("name,n", [("longformer", 45), ("per_head", 70)])
def test_combined_backward_is_bitwise_the_three_launch_one(monkeypatch, name, n):
    """dq and dk/dv programs in one grid (TileConfig.combined) write every gradient element from
    exactly one program in the same order as the two launches: identical bits, and the
    combined kernel really ran."""
    from sparse_attn.backends.triton import configs, kernels

    q, k, v = make_qkv(1, HEADS, n, 24, hkv=2, device=DEVICE)
    dout = torch.randn(1, HEADS, n, 24, device=DEVICE)
    apart = _grads(q, k, v, presets(n)[name], dout, deterministic=True)
    launches = []
    real = kernels.block_sparse_bwd_combined_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(kernels, "block_sparse_bwd_combined_kernel", Spy())
    monkeypatch.setattr(configs, "OVERRIDES", {"dq": {"combined": True}})
    together = _grads(q, k, v, presets(n)[name], dout, deterministic=True)
    assert len(launches) == 1
    for a, b in zip(apart, together):
        assert torch.equal(a, b)


def test_persistent_schedule_drains_every_item(monkeypatch):
    """The launch's schedule: one program per item by default; a persistent one launches
    min(items, k x SMs) programs on one axis, with a zeroed counter for the queue."""
    from sparse_attn.backends.triton.configs import TileConfig

    dev = torch.device(DEVICE)
    grid, _, work, flags = triton_ops._schedule(TileConfig(16, 16, 1, 1), 5, 3, False, dev)
    assert grid == (5, 3) and work == (3, 15) and not flags["PERSISTENT"]
    monkeypatch.setattr(triton_ops, "INTERPRETED_SMS", 4)
    grid, counter, work, flags = triton_ops._schedule(TileConfig(16, 16, 1, 1, persistent=2, queue=True), 5, 3,
                                                      True, dev)
    if dev.type == "cpu":
        assert grid == (8,)
    assert work == (3, 15) and flags["PERSISTENT"] and flags["QUEUE"] and int(counter.item()) == 0
    grid, _, _, _ = triton_ops._schedule(TileConfig(16, 16, 1, 1, persistent=64), 2, 3, False, dev)
    assert grid == (6,)  # never more programs than items
