"""The conformance suite: what every backend must compute, which any backend joins in one line.

    from conformance import Conformance, conformance_tests
    globals().update(conformance_tests(Conformance("blocked", device="cpu")))

It runs the shared preset zoo (`sa_testing.preset_zoo`: every preset and combinator) x query
/ key lengths (odd sizes, fewer queries than keys) x dtypes, with GQA, against the float64
reference: out, log-sum-exp and the three gradients (through out and lse), by the rules of
`sa_testing.check_backend_against_reference` (fp32 close to float64; fp16/bf16 within
FlashAttention's 2x / 3x of the low-precision reference's error). That is the contract written
in `sparse_attn.backends.registry.Backend`'s docstring.

A backend's test module chooses its device, dtypes, sizes and the zoo subset it can afford
(interpreted Triton kernels cost seconds per case on a CPU), and marks (`gpu`) for suites that
need a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from sa_testing import check_backend_against_reference, make_qkv, preset_zoo


@dataclass(frozen=True)
class Conformance:
    backend: str
    device: str = "cpu"
    dtypes: tuple = (torch.float32,)
    shapes: tuple = ((113, 113), (37, 113))  # (q_len, kv_len); queries are the last positions
    presets: tuple | None = None  # zoo names (None: the whole zoo)
    zoo_block: int = 8  # BigBird's and the block-sparse presets' block (the backend's natural block)
    layout_blocks: tuple | None = None  # (block_q, block_kv): hand the backend a prebuilt layout
    batch: int = 1
    heads: tuple = (4, 2)  # (Hq, Hkv): GQA
    head_dim: int = 16
    variants: dict = field(default_factory=lambda: {"": {}})  # id -> extra sparse_attention kwargs
    marks: tuple = ()

    def names(self, n: int) -> list[str]:
        zoo = preset_zoo(n, self.heads[0], block=self.zoo_block)
        return list(zoo) if self.presets is None else [p for p in self.presets if p in zoo]


def conformance_tests(spec: Conformance) -> dict:
    """{test name: test function} for a module's globals()."""
    n_max = max(nkv for _, nkv in spec.shapes)

    @pytest.mark.parametrize("variant", list(spec.variants), ids=lambda v: v or "default")
    @pytest.mark.parametrize("dtype", spec.dtypes, ids=lambda d: str(d).replace("torch.", ""))
    @pytest.mark.parametrize("nq,nkv", spec.shapes, ids=lambda s: str(s))
    @pytest.mark.parametrize("name", spec.names(n_max))
    def test(name, nq, nkv, dtype, variant):
        if spec.device == "cuda" and not torch.cuda.is_available():
            pytest.skip("needs CUDA")
        pattern = preset_zoo(nkv, spec.heads[0], block=spec.zoo_block)[name]
        hq, hkv = spec.heads
        q, k, v = make_qkv(spec.batch, hq, nq, spec.head_dim, hkv=hkv, nkv=nkv, device=spec.device)
        if spec.layout_blocks is not None:
            bq, bkv = spec.layout_blocks
            pattern = pattern.layout(nq, nkv, block_q=bq, block_kv=bkv, device=spec.device)
        check_backend_against_reference(q, k, v, pattern, backend=spec.backend, dtype=dtype, return_lse=True,
                                        **spec.variants[variant])

    for mark in spec.marks:
        test = mark(test)
    return {f"test_conformance_{spec.backend}": test}
