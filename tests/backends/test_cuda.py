"""The CPU-tested paths on CUDA tensors (run on the GPU machine: pytest -m gpu)."""

import pytest
import torch
from conformance import Conformance, conformance_tests

import sparse_attn
from sparse_attn import patterns as P

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PATTERNS = {
    "window": lambda: P.sliding_window(64),
    "window_bi": lambda: P.sliding_window(64, causal=False),
    "longformer": lambda: P.longformer(32, [0, 5, 300]),
    "bigbird": lambda: P.bigbird(32, seed=3),
    "dilated": lambda: P.dilated(16, 3),
    "strided": lambda: P.strided(32),
    "streaming": lambda: P.streaming(4, 60),
    "per_head": lambda: P.per_head([P.causal(), P.sliding_window(20), P.full(), P.dilated(8, 2)]),
}


def _inputs(nq, nkv, dtype, hq=4, hkv=2, d=64, grad=True):
    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda n, h: torch.randn(2, h, n, d, device="cuda", dtype=dtype, generator=g).requires_grad_(grad)  # noqa: E731
    return make(nq, hq), make(nkv, hkv), make(nkv, hkv)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("shape", [(515, 515), (17, 515)])
def test_blocked_on_cuda_matches_reference(name, shape):
    pattern = PATTERNS[name]()
    q, k, v = _inputs(*shape, torch.float64)
    ref = sparse_attn.sparse_attention(q, k, v, pattern, backend="reference")
    out = sparse_attn.sparse_attention(q, k, v, pattern, backend="blocked")
    assert _rel(out, ref) < 1e-12
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    g_out = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert max(_rel(a, b) for a, b in zip(g_out, g_ref)) < 1e-12


@pytest.mark.parametrize("name", ["window", "longformer", "bigbird", "per_head"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_cuda(name, dtype):
    pattern = PATTERNS[name]()
    q, k, v = _inputs(1024, 1024, dtype)
    exact = sparse_attn.sparse_attention(q.double(), k.double(), v.double(), pattern, backend="reference")
    low_ref = sparse_attn.sparse_attention(q, k, v, pattern, backend="reference")
    for backend in ("blocked", "flex"):
        out = sparse_attn.sparse_attention(q, k, v, pattern, backend=backend)
        assert (out.double() - exact).abs().max() <= 2 * (low_ref.double() - exact).abs().max() + 1e-6, backend


@pytest.mark.parametrize("name", list(PATTERNS))
def test_flex_backend_on_cuda(name):
    pattern = PATTERNS[name]()
    q, k, v = _inputs(1024, 1024, torch.float32)
    ref = sparse_attn.sparse_attention(q.double(), k.double(), v.double(), pattern, backend="reference")
    out = sparse_attn.sparse_attention(q, k, v, pattern, backend="flex")
    assert _rel(out, ref) < 1e-5
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    g_out = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert max(_rel(a, b) for a, b in zip(g_out, g_ref)) < 1e-4


# The conformance suite (tests/conformance.py) for the flex backend on CUDA, fp32: a subset of
# the zoo (FlexAttention compiles per layout, seconds each), GQA, fewer queries than keys.
globals().update(conformance_tests(Conformance(
    "flex", device="cuda", shapes=((515, 515), (17, 515)), zoo_block=16,
    presets=("window", "longformer", "bigbird", "dilated", "strided", "streaming", "per_head", "union",
             "document_causal", "predicate_heads"))))


def test_auto_on_cuda_never_picks_reference():
    q, k, v = _inputs(256, 256, torch.bfloat16, grad=False)
    ex = sparse_attn.explain(q, k, v, P.sliding_window(64))
    assert ex.chosen in {"flex", "blocked", "triton"}
