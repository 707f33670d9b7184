"""Shared helpers and the tolerance rules of DESIGN.md ("Testing rules").

Imported by the test modules as `from sa_testing import ...` (tests/conftest.py puts this
folder on sys.path).

* Ground truth: the `reference` backend on float64 copies of the inputs.
* fp32 fast path: within 1e-5 relative of the float64 reference.
* fp16/bf16 fast path: error at most 2x the error of the reference backend run in the same low
  precision (FlashAttention's rule), for outputs; gradients get 3x.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import (
    TorchDispatchMode,  # private, but what FlopCounterMode is built on
)

import sparse_attn
from sparse_attn import patterns as P

FP32_RTOL = 1e-5
LOW_PRECISION_OUT_FACTOR = 2.0
LOW_PRECISION_GRAD_FACTOR = 3.0
ABS_FLOOR = 1e-6


# ------------------------------------------------------------------------- inputs
def make_qkv(b=1, hq=2, nq=16, d=8, *, hkv=None, nkv=None, dv=None, dtype=torch.float32, requires_grad=False,
             device="cpu"):
    """Random q [B, Hq, Nq, D], k [B, Hkv, Nkv, D], v [B, Hkv, Nkv, Dv]."""
    hkv = hq if hkv is None else hkv
    nkv = nq if nkv is None else nkv
    dv = d if dv is None else dv
    q = torch.randn(b, hq, nq, d, dtype=torch.float64, device=device).to(dtype)
    k = torch.randn(b, hkv, nkv, d, dtype=torch.float64, device=device).to(dtype)
    v = torch.randn(b, hkv, nkv, dv, dtype=torch.float64, device=device).to(dtype)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v


def as_f64(*tensors, requires_grad=None):
    """float64 leaf copies of the given tensors (same values, exactly representable)."""
    out = []
    for t in tensors:
        rg = t.requires_grad if requires_grad is None else requires_grad
        out.append(t.detach().to(torch.float64).requires_grad_(rg))
    return out


def reference_f64(q, k, v, pattern, **kw):
    """The ground truth: `reference` backend on float64 copies of q, k, v."""
    q64, k64, v64 = as_f64(q, k, v, requires_grad=False)
    return sparse_attn.sparse_attention(q64, k64, v64, pattern, backend="reference", **kw)


def run_with_grads(q, k, v, pattern, dout, *, backend, lse_weight=None, **kw):
    """Forward + backward of `sum(out * dout) [+ sum(lse * lse_weight)]` on leaf copies of q/k/v.

    Returns (out, lse or None, (dq, dk, dv)). Inputs keep their dtype.
    """
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    want_lse = lse_weight is not None
    res = sparse_attn.sparse_attention(q, k, v, pattern, backend=backend, return_lse=want_lse, **kw)
    out, lse = res if want_lse else (res, None)
    loss = (out.to(torch.float64) * dout.to(torch.float64)).sum()
    if want_lse:
        finite = torch.isfinite(lse)
        loss = loss + (torch.where(finite, lse, 0.0).to(torch.float64) * lse_weight.to(torch.float64)).sum()
    grads = torch.autograd.grad(loss, (q, k, v), allow_unused=False)
    return out.detach(), (lse.detach() if lse is not None else None), tuple(g.detach() for g in grads)


# --------------------------------------------------------------------- tolerances
def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    if a.numel() == 0:
        return 0.0
    both_inf = torch.isinf(a) & torch.isinf(e) & (torch.sign(a) == torch.sign(e))
    diff = torch.where(both_inf, 0.0, (a - e).abs())
    return float(diff.max())


def assert_no_nan(*tensors, what="output"):
    for t in tensors:
        if t is None:
            continue
        assert not torch.isnan(t).any(), f"{what} contains NaN at {torch.isnan(t).nonzero()[:5].tolist()}"


def assert_fp32_close(actual, expected64, *, rtol=FP32_RTOL, what="output"):
    """fp32 rule: max |actual - ref| <= rtol * max |ref| (+ a tiny floor for all-zero refs).

    Every element is compared (the blocked backend allocates its own outputs, so an unwritten
    tile would show up as a mismatch), and NaN anywhere fails."""
    assert actual.shape == expected64.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    assert_no_nan(actual, what=what)
    exp = expected64.detach().to(torch.float64)
    finite = torch.isfinite(exp)
    a = actual.detach().to(torch.float64)
    # infinities (lse of empty rows) must match exactly
    assert torch.equal(torch.isinf(a), torch.isinf(exp)), f"{what}: infinities differ"
    scale = float(exp[finite].abs().max()) if finite.any() else 0.0
    err = max_abs_err(actual, expected64)
    assert err <= rtol * scale + 1e-12, f"{what}: max abs err {err:.3e} > {rtol:g} * max|ref| ({scale:.3e})"


def assert_low_precision_close(fast, ref_low, ref64, *, factor=LOW_PRECISION_OUT_FACTOR, floor=ABS_FLOOR,
                               what="output"):
    """FlashAttention's rule: err(fast) <= factor * err(reference in the same low precision) + floor."""
    assert fast.shape == ref64.shape, f"{what}: shape {tuple(fast.shape)} != {tuple(ref64.shape)}"
    assert_no_nan(fast, what=what)
    err_fast = max_abs_err(fast, ref64)
    err_ref = max_abs_err(ref_low, ref64)
    assert err_fast <= factor * err_ref + floor, (
        f"{what}: fast err {err_fast:.3e} > {factor} x reference-in-low-precision err {err_ref:.3e} + {floor:g}")


def check_backend_against_reference(q, k, v, pattern, *, backend="blocked", dtype=None, grads=True,
                                    return_lse=False, **kw):
    """Run `backend` on q/k/v (their dtype) and compare outputs (and grads) with the rules above.

    For fp32 the float64 reference is the bar; for fp16/bf16 the reference backend run in the
    same precision sets the allowed error."""
    dtype = q.dtype if dtype is None else dtype
    q, k, v = (t.detach().to(dtype) for t in (q, k, v))
    dout = torch.randn(*q.shape[:3], v.shape[-1], dtype=torch.float64, device=q.device).to(dtype)
    lse_w = torch.randn(q.shape[:3], dtype=torch.float64, device=q.device) if return_lse else None
    if grads:
        out, lse, g = run_with_grads(q, k, v, pattern, dout, backend=backend, lse_weight=lse_w, **kw)
        out64, lse64, g64 = run_with_grads(*as_f64(q, k, v), pattern, dout.double(), backend="reference",
                                           lse_weight=lse_w, **kw)
    else:
        with torch.no_grad():
            res = sparse_attn.sparse_attention(q, k, v, pattern, backend=backend, return_lse=return_lse, **kw)
            res64 = sparse_attn.sparse_attention(*as_f64(q, k, v), pattern, backend="reference",
                                                 return_lse=return_lse, **kw)
        out, lse = res if return_lse else (res, None)
        out64, lse64 = res64 if return_lse else (res64, None)
        g = g64 = ()
    assert out.dtype == dtype
    if dtype in (torch.float32, torch.float64):
        assert_fp32_close(out, out64, what="out")
        if return_lse:
            assert_fp32_close(lse, lse64, what="lse")
        for name, a, e in zip("qkv", g, g64):
            assert a.dtype == dtype
            assert_fp32_close(a, e, what=f"d{name}")
    else:
        if grads:
            out_lo, lse_lo, g_lo = run_with_grads(q, k, v, pattern, dout, backend="reference", lse_weight=lse_w, **kw)
        else:
            with torch.no_grad():
                res_lo = sparse_attn.sparse_attention(q, k, v, pattern, backend="reference", return_lse=return_lse,
                                                      **kw)
            out_lo, lse_lo = res_lo if return_lse else (res_lo, None)
            g_lo = ()
        assert_low_precision_close(out, out_lo, out64, what="out")
        if return_lse:
            assert_low_precision_close(lse, lse_lo, lse64, what="lse")
        for name, a, lo, e in zip("qkv", g, g_lo, g64):
            assert a.dtype == dtype
            assert_low_precision_close(a, lo, e, factor=LOW_PRECISION_GRAD_FACTOR, what=f"d{name}")
    return out, lse, g


def masked_scores_lse(q, k, pattern_or_mask, *, q_offset=None, scale=None):
    """torch.logsumexp of the masked scores, computed directly in float64 from a dense mask."""
    q64, k64 = q.detach().double(), k.detach().double()
    rep = q.shape[1] // k.shape[1]
    k64 = k64.repeat_interleave(rep, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if isinstance(pattern_or_mask, torch.Tensor):
        mask = pattern_or_mask
    else:
        mask = dense_mask(pattern_or_mask, q.shape[2], k.shape[2], q_offset=q_offset, heads=q.shape[1])
    s = (q64 @ k64.transpose(-1, -2)) * scale
    return torch.logsumexp(s.masked_fill(~mask, float("-inf")), dim=-1)


def dense_mask(pattern, q_len, kv_len, *, q_offset=None, heads=None):
    """bool [H or 1, q_len, kv_len] through the layout's (bound) pattern, so BigBird works."""
    layout = pattern if isinstance(pattern, P.BlockLayout) else pattern.layout(q_len, kv_len, q_offset=q_offset)
    nh = layout.num_heads if layout.num_heads > 1 else None
    return layout.pattern.to_dense(q_len, kv_len, q_offset=layout.q_offset, num_heads=nh)


# -------------------------------------------------------------------- memory probes
class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns (forward and
    backward), e.g. to show an op never builds an Nq x Nkv intermediate."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


# ------------------------------------------------------------------- host reads
class HostReadError(AssertionError):
    """An op read a tensor's values back to the host inside `NoHostReads`."""


_aten = torch.ops.aten
# aten ops whose output depends on the host knowing tensor values: on CUDA each is a
# device -> host synchronisation (item/bool/int/float all reach _local_scalar_dense)
_HOST_READ_OPS = {
    _aten._local_scalar_dense.default, _aten.nonzero.default, _aten.argwhere.default, _aten._unique2.default,
    _aten.unique_dim.default, _aten.unique_consecutive.default, _aten.bincount.default,
    _aten.masked_select.default, _aten.equal.default, _aten.is_nonzero.default, _aten.histc.default,
}


class NoHostReads(TorchDispatchMode):
    """Fails the test (`HostReadError`) when code inside reads tensor values back to the host:
    `.item()`, `bool(t)` / `int(t)` / `if t`, `.tolist()`, `.numpy()`, `nonzero` /
    `torch.where(cond)`, `unique`, `bincount`, `masked_select`, indexing or index_put with a
    bool mask, `repeat_interleave` without `output_size`, `torch.equal`, copies to the CPU from
    another device. On CUDA, `torch.cuda.set_sync_debug_mode("error")` is armed as well, so any
    synchronising call fails too. It works on CPU tensors (where nothing synchronises), so CPU
    tests catch a host read before it costs a stall on the GPU.

    Our own kernels (custom ops in the `sparse_attn` namespace) run unchecked inside: under
    TRITON_INTERPRET=1 they run on numpy; on CUDA the sync debug mode still watches them.
    Ops that merely allocate or compute stay allowed."""

    def __init__(self):
        super().__init__()
        self.kernel_depth = 0
        self._patched = {}
        self._sync_mode = None

    def _fail(self, what):
        raise HostReadError(f"host read inside NoHostReads: {what}")

    def __enter__(self):
        for name in ("tolist", "numpy", "__array__"):
            real = getattr(torch.Tensor, name)
            self._patched[name] = real

            def guarded(t, *args, _real=real, _name=name, **kwargs):
                if self.kernel_depth == 0:
                    self._fail(f"Tensor.{_name}()")
                return _real(t, *args, **kwargs)

            setattr(torch.Tensor, name, guarded)
        if torch.cuda.is_available():
            self._sync_mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, real in self._patched.items():
                setattr(torch.Tensor, name, real)
            self._patched.clear()
            if self._sync_mode is not None:
                torch.cuda.set_sync_debug_mode(self._sync_mode)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "sparse_attn":  # our kernels: see the class docstring
            self.kernel_depth += 1
            try:
                return func(*args, **kwargs)
            finally:
                self.kernel_depth -= 1
        if func in _HOST_READ_OPS:
            self._fail(str(func))
        if func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self._fail("repeat_interleave without output_size (it sums the repeats on the host)")
        if func in (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default,
                    _aten._index_put_impl_.default):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
                self._fail(f"{func} with a bool mask (its size is the mask's count)")
        if func in (_aten._to_copy.default, _aten.copy_.default):
            src = args[1] if func is _aten.copy_.default else args[0]
            dst = args[0].device if func is _aten.copy_.default else kwargs.get("device", src.device)
            if isinstance(src, torch.Tensor) and torch.device(dst).type == "cpu" and src.device.type != "cpu":
                self._fail(f"copy from {src.device} to the CPU")
        return func(*args, **kwargs)


# --------------------------------------------------------------- the preset zoo
def document_ids_for(n, sizes=(7, 30, 1, 19)):
    """Document ids of n tokens in runs of the given sizes (a 1-token document among them)."""
    ids = []
    d = 0
    while len(ids) < n:
        ids.extend([d] * sizes[d % len(sizes)])
        d += 1
    return torch.tensor(ids[:n])


def preset_zoo(n, heads=2, block=8):
    """Every preset and some combinations for length n, by readable name: the patterns every
    backend must compute as the float64 reference does. `block`: the block of BigBird and of
    the block-sparse presets (a backend's natural block, so their edges fall on its tiles)."""
    nb = -(-n // block)
    g = torch.Generator().manual_seed(n)
    return {
        "full": P.full(),
        "causal": P.causal(),
        "window": P.sliding_window(17),
        "window_nc": P.sliding_window(16, causal=False),
        "dilated": P.dilated(5, 3),
        "dilated_nc": P.dilated(4, 2, causal=False),
        "strided": P.strided(9),
        "strided_nc": P.strided(7, causal=False),
        "fixed": P.fixed(10, 2),
        "fixed_nc": P.fixed(12, 3, causal=False),
        "longformer": P.longformer(9, [0, n // 2]),
        "longformer_causal": P.longformer(9, 2, causal=True),
        "bigbird": P.bigbird(block, seed=3),
        "bigbird_heads": P.bigbird(block, seed=3, num_heads=heads),
        "block_sparse": P.block_sparse(torch.rand(nb, nb, generator=g) < 0.4, block),
        "block_sparse_heads": P.block_sparse(torch.rand(heads, nb, nb, generator=g) < 0.4, block),
        "streaming": P.streaming(3, 11),
        "document": P.document(document_ids_for(n)),
        "document_causal": P.document(document_ids_for(n)) & P.causal(),
        "per_head": P.per_head([P.sliding_window(5 + 3 * h) for h in range(heads)]),
        "predicate": P.predicate(lambda b, h, q, kv: (q - kv) % 5 != 1),
        "predicate_heads": P.predicate(lambda b, h, q, kv: kv <= q - h, num_heads=heads),
        "union": P.sliding_window(6) | P.strided(11) | P.streaming(2, 1),
        "intersection": P.sliding_window(30, causal=False) & P.dilated(10, 2, causal=False),
        "mixed": (P.longformer(5, [3]) | P.per_head([P.fixed(8 + h) if h % 2 else P.causal() for h in range(heads)])) & P.causal(),
    }



def run_cli(capsys, *argv):
    """`sparse-attn ARGV` in-process: (exit code, stdout, stderr)."""
    from sparse_attn.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------- padded batches of dynamic mechanisms
def loss_and_grads(fn, q, k, v, dout, lse_weight, **kw):
    """Forward + backward of sum(out * dout) + sum(finite lse * lse_weight) on leaf copies of
    q, k, v (k may be None: shared-qk LSH): (out, lse, grads of the given inputs)."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (q, k, v)]
    out, lse = fn(*leaves, return_lse=True, **kw)
    loss = (out.double() * dout).sum() + (torch.where(torch.isfinite(lse), lse, 0.0).double() * lse_weight).sum()
    return out.detach(), lse.detach(), torch.autograd.grad(loss, [t for t in leaves if t is not None])


def assert_same_lse(a, b, tol=1e-10):
    """Equal infinities (rows that see nothing) and finite values within `tol`."""
    assert torch.equal(torch.isinf(a), torch.isinf(b)), "rows with nothing to attend to differ"
    finite = torch.isfinite(b)
    assert max_abs_err(a[finite], b[finite]) <= tol


def padding_mask_for(side, lengths, n, seed=0):
    """bool [B, n], True = a real token: real tokens at the end (left padding), at the start
    (right padding) or scattered ("holes")."""
    mask = torch.zeros(len(lengths), n, dtype=torch.bool)
    order = torch.Generator().manual_seed(seed)
    for b, length in enumerate(lengths):
        if side == "left":
            mask[b, n - length:] = True
        elif side == "right":
            mask[b, :length] = True
        else:
            mask[b, torch.randperm(n, generator=order)[:length]] = True
    return mask


def rows_alone(fn, q, k, v, mask, dout, lse_w, row_kw=None, **kw):
    """Each row's real tokens run alone through `fn` (with `row_kw(real_length)`'s extra keywords,
    if given), scattered back into the padded shape: (out, lse, grads); pad positions hold out 0,
    lse -inf and zero gradients. k may be None (shared-qk LSH)."""
    out = torch.zeros(*q.shape[:3], v.shape[3], dtype=q.dtype)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float64)
    grads = [torch.zeros_like(t) for t in (q, k, v) if t is not None]
    for b in range(q.shape[0]):
        idx = mask[b].nonzero().squeeze(1)
        cut = [None if t is None else t[b:b + 1, :, idx] for t in (q, k, v)]
        extra = row_kw(len(idx)) if row_kw is not None else {}
        o, lse_row, g = loss_and_grads(fn, *cut, dout[b:b + 1, :, idx], lse_w[b:b + 1, :, idx], **kw, **extra)
        out[b][:, idx], lse[b][:, idx] = o[0], lse_row[0].double()
        for total, part in zip(grads, g):
            total[b][:, idx] = part[0]
    return out, lse, grads


def assert_fast_equals_naive(fast, naive, q, k, v, dout, lse_weight, tol=1e-10, **kw):
    """`fast` and `naive` (same signature, return_lse=True) give the same out, lse and gradients
    of sum(out * dout) + sum(finite lse * lse_weight), within `tol`, with no NaN; (out, lse)."""
    out, lse, grads = loss_and_grads(fast, q, k, v, dout, lse_weight, **kw)
    ref, ref_lse, ref_grads = loss_and_grads(naive, q, k, v, dout, lse_weight, **kw)
    assert not torch.isnan(out).any()
    assert max_abs_err(out, ref) <= tol
    assert_same_lse(lse, ref_lse, tol)
    for g, rg in zip(grads, ref_grads):
        assert not torch.isnan(g).any()
        assert max_abs_err(g, rg) <= tol
    return out, lse


def assert_pads_take_no_part(fn, clean, noisy, mask, dout, lse_weight, **kw):
    """`fn` on (q, k, v) = `clean` and on `noisy` (the same with other values at pad positions)
    gives bitwise the same out, lse and gradients at the real positions of `mask` (bool [B, N]),
    and zero gradients at the pads."""
    out, lse, grads = loss_and_grads(fn, *clean, dout, lse_weight, **kw)
    out2, lse2, grads2 = loss_and_grads(fn, *noisy, dout, lse_weight, **kw)
    real = mask[:, None, :].expand(*out.shape[:3])
    assert torch.equal(out[real], out2[real]) and torch.equal(lse[real], lse2[real])
    for g, g2 in zip(grads, grads2):
        real_kv = mask[:, None, :].expand(*g.shape[:3])
        assert torch.equal(g[real_kv], g2[real_kv])
        assert (g2[~real_kv] == 0).all()


# (mask, exception, message) for a call on batch 1 and 16 keys: what check_key_padding_mask refuses
BAD_KEY_PADDING_MASKS = [
    (torch.ones(1, 15, dtype=torch.bool), ValueError, r"key_padding_mask must have shape \(batch, kv_len\) = \(1, 16\)"),
    (torch.ones(2, 16, dtype=torch.bool), ValueError, r"key_padding_mask must have shape"),
    (torch.ones(1, 16), TypeError, "key_padding_mask must be a bool tensor"),
    ([[True] * 16], TypeError, "key_padding_mask must be a bool tensor of shape"),
]


def assert_padded_equals_rows_alone(fn, q, k, v, mask, dout, lse_weight, *, padded_kw=None, row_kw=None,
                                    tol=1e-10, **kw):
    """`fn` over the padded batch (key_padding_mask=mask, plus `padded_kw`) equals each row's real
    tokens run alone (`rows_alone`, with `row_kw`) within `tol`: out, lse and gradients; pad
    query rows are 0 with lse -inf, pads get exactly zero gradients."""
    out, lse, grads = loss_and_grads(fn, q, k, v, dout, lse_weight, key_padding_mask=mask, **(padded_kw or {}), **kw)
    alone, alone_lse, alone_grads = rows_alone(fn, q, k, v, mask, dout, lse_weight, row_kw=row_kw, **kw)
    pads = ~mask[:, None, :].expand(*out.shape[:3])
    assert (out[pads] == 0).all() and torch.isneginf(lse[pads]).all()
    assert max_abs_err(out, alone) <= tol
    assert_same_lse(lse, alone_lse, tol)
    for g, ga in zip(grads, alone_grads):
        assert max_abs_err(g, ga) <= tol  # pads: exactly 0, as alone
