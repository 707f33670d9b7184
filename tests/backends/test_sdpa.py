"""backends/sdpa.scaled_dot_product: SDPA with cuDNN held back from shapes met fewer than
CUDNN_FROM_CALL times (cuDNN builds a graph per new shape: ~140 ms on the H200)."""

import pytest
import torch
import torch.nn.functional as F

import sparse_attn
from sparse_attn._lru import LRU
from sparse_attn import patterns as P
from sparse_attn.backends import sdpa


@pytest.fixture
def fresh_counts(monkeypatch):
    monkeypatch.setattr(sdpa, "_shape_calls", LRU())
    return sdpa


def test_cudnn_allowed_from_the_nth_call_of_a_shape(fresh_counts, monkeypatch):
    monkeypatch.setattr(sdpa, "CUDNN_FROM_CALL", 3)
    assert [sdpa.allows_cudnn("a") for _ in range(4)] == [False, False, True, True]
    assert sdpa.allows_cudnn("b") is False  # counted per shape
    monkeypatch.setattr(sdpa, "CUDNN_FROM_CALL", 1)  # torch's own choice always, nothing counted
    assert sdpa.allows_cudnn("c") is True and "c" not in sdpa._shape_calls


def test_shape_counts_are_a_bounded_lru(fresh_counts, monkeypatch):
    monkeypatch.setattr(sdpa, "CUDNN_FROM_CALL", 2)
    monkeypatch.setattr(sdpa, "_SHAPES_KEPT", 2)
    sdpa.allows_cudnn("a")
    sdpa.allows_cudnn("b")
    sdpa.allows_cudnn("a")  # a is now the most recent; c pushes b out
    sdpa.allows_cudnn("c")
    assert list(sdpa._shape_calls) == ["a", "c"]
    assert sdpa.allows_cudnn("b") is False  # forgotten: counted from 1 again
    assert sdpa.allows_cudnn("c") is True


@pytest.mark.parametrize("case", ["plain", "causal", "mask", "gqa"])
def test_equals_torch_sdpa_on_cpu_and_counts_nothing(fresh_counts, case):
    g = torch.Generator().manual_seed(0)
    hkv = 2 if case == "gqa" else 4
    q = torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, hkv, 9, 8, generator=g, dtype=torch.float64) for _ in range(2))
    kwargs = {"causal": {"is_causal": True}, "mask": {"attn_mask": torch.rand(9, 9, generator=g) > 0.3},
              "gqa": {"enable_gqa": True}}.get(case, {})
    got = sdpa.scaled_dot_product(q, k, v, scale=0.3, **kwargs)
    assert torch.equal(got, F.scaled_dot_product_attention(q, k, v, scale=0.3, **kwargs))
    assert not sdpa._shape_calls  # the policy is CUDA's only


def _kernel_names(fn) -> set[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type.name == "CUDA"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_new_shapes_run_without_cudnn_then_as_torch_chooses(fresh_counts, monkeypatch):
    """The library's dense causal call at a shape it has not met: no cuDNN kernel for the first
    CUDNN_FROM_CALL - 1 calls (forward and backward), then the kernels torch's default picks."""
    monkeypatch.setattr(sdpa, "CUDNN_FROM_CALL", 3)
    q, k, v = (torch.randn(1, 8, 1237, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))

    def ours():
        sparse_attn.sparse_attention(q, k, v, P.causal(), backend="sdpa").sum().backward()

    def torchs():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    for _ in range(2):
        assert not any("cudnn" in name.lower() for name in _kernel_names(ours))
    assert _kernel_names(ours) == _kernel_names(torchs)


def _enabled():
    cuda = torch.backends.cuda
    return {"flash": cuda.flash_sdp_enabled(), "efficient": cuda.mem_efficient_sdp_enabled(),
            "math": cuda.math_sdp_enabled(), "cudnn": cuda.cudnn_sdp_enabled()}


def test_holding_cudnn_back_narrows_the_callers_kernel_choice_never_widens_it():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION]):  # a user's choice
        with sdpa._without_cudnn():
            assert _enabled() == {"flash": False, "efficient": False, "math": True, "cudnn": False}
        assert _enabled()["cudnn"]  # restored
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):  # cuDNN forced: left alone
        with sdpa._without_cudnn():
            assert _enabled() == {"flash": False, "efficient": False, "math": False, "cudnn": True}
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):  # no cuDNN: unchanged
        with sdpa._without_cudnn():
            assert _enabled() == {"flash": True, "efficient": True, "math": False, "cudnn": False}
