"""Compile the triton kernels for a GPU target on a machine without one (a script: run with a
clean environment, TRITON_INTERPRET unset, by test_triton_compile.py).

The interpreter that runs the kernels in CPU tests accepts code the real compiler rejects
(int64 TMA coordinates, descriptors returned from jit functions: both reached the H200 once).
This script drives ops.py's real launches with CPU tensors, catches each kernel launch before
it runs, and compiles that launch's exact argument types and constexprs for sm90 (Hopper) with
Triton's ahead-of-time compiler; it prints one line per compiled launch and exits non-zero on
the first compile error.

    python tests/backends/compile_for_gpu.py [--arch 90]
"""

from __future__ import annotations

import argparse
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET: the interpreter compiles nothing"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sparse_attn import patterns as P  # noqa: E402
from sparse_attn.backends.triton import kernels, ops  # noqa: E402
from sparse_attn.backends.triton.plan import get_plan  # noqa: E402

TORCH_TO_TRITON = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
                   torch.int64: "i64", torch.uint8: "u8"}


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TORCH_TO_TRITON[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


class CompilingLauncher:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kw)` compiles instead of running."""

    def __init__(self, jit_fn, target: GPUTarget, log: list):
        self.jit_fn, self.target, self.log = jit_fn, target, log
        self.done: set = set()

    def __getitem__(self, grid):
        return self.launch

    def launch(self, *args, num_warps: int = 4, num_stages: int = 3, num_ctas: int = 1, maxnreg=None, **constexprs):
        names = self.jit_fn.arg_names
        positional = names[:len(args)]
        signature = {name: _arg_type(value) for name, value in zip(positional, args)}
        signature.update({name: "constexpr" for name in constexprs})
        # a runtime launch specialises integer arguments equal to 1 into constants: do the same
        consts = dict(constexprs)
        for name, value in zip(positional, args):
            if isinstance(value, int) and not isinstance(value, bool) and value == 1:
                signature[name], consts[name] = "constexpr", 1
        key = (tuple(sorted(signature.items())), tuple(sorted(consts.items())), num_warps, num_stages, num_ctas, maxnreg)
        if key in self.done:
            return
        self.done.add(key)
        src = ASTSource(fn=self.jit_fn, signature=signature, constexprs=consts)
        options = {"num_warps": num_warps, "num_stages": num_stages, "num_ctas": num_ctas}
        if maxnreg is not None:
            options["maxnreg"] = maxnreg
        compiled = triton.compile(src, target=self.target, options=options)
        flags = ",".join(f"{k}={v}" for k, v in sorted(constexprs.items())
                         if k in ("USE_TMA", "FUSED_DQ", "BM", "BN", "PERSISTENT", "QUEUE", "WS"))
        extra = f" num_warps={num_warps} num_ctas={num_ctas} maxnreg={maxnreg}"
        ttgir = compiled.asm.get("ttgir", ""); ws_ops = (ttgir.count("ttg.warp_specialize"), ttgir.count("async_task_id"), ttgir.count("ttg.partition"))
        self.log.append(f"{self.jit_fn.__name__} [{flags}]{extra} ttg.warp_specialize ops={ws_ops} "
                        f"shared={compiled.metadata.shared} warps={compiled.metadata.num_warps}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: Hopper)")
    ap.add_argument("--variants", nargs="*", default=None,
                    help="also compile these configs.VARIANTS (none named: all), TMA as in production")
    args = ap.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    log: list[str] = []
    for name in ("block_sparse_fwd_kernel", "block_sparse_bwd_dq_kernel", "block_sparse_bwd_dkdv_kernel",
                 "bwd_preprocess_kernel", "block_sparse_bwd_combined_kernel"):
        setattr(kernels, name, CompilingLauncher(getattr(kernels, name), target, log))
    ops.tma_allowed = lambda *tensors: True  # what an aligned bf16 input on sm90 gets
    ops._ensure_allocator = lambda: None

    # a layout with full, partial and ragged blocks, GQA 2:1, bf16, D=128: the tuned tiles
    n = 1000
    q = torch.randn(1, 4, n, 128, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, n, 128, dtype=torch.bfloat16) for _ in range(2))
    layout = P.longformer(300, [0, 500]).layout(n, block_q=128, block_kv=128)
    plan = get_plan(layout)
    fixed = (float(128 ** -0.5), 128, 128, False, *plan.flags())
    for tma in (True, False):  # every phase with TMA descriptors, then with pointer loads
        ops.TMA_DEFAULT = tma
        out, lse = ops.block_sparse_attn_fwd(q, k, v, *plan.tensors(), *fixed, True)
        out, lse = torch.randn_like(out), torch.randn_like(lse)
        for backward in (ops.block_sparse_attn_bwd, ops.block_sparse_attn_bwd_fused):
            backward(torch.randn_like(out), None, q, k, v, out, lse, *plan.tensors(), *fixed)
    ops.TMA_DEFAULT = None
    from sparse_attn.backends.triton import configs

    for name in ([] if args.variants is None else args.variants or list(configs.VARIANTS)):
        configs.OVERRIDES = configs.VARIANTS[name]
        phases = set(configs.OVERRIDES)
        out, lse = ops.block_sparse_attn_fwd(q, k, v, *plan.tensors(), *fixed, True)
        out, lse = torch.randn_like(out), torch.randn_like(lse)
        if phases & {"dq", "dkdv"}:
            ops.block_sparse_attn_bwd(torch.randn_like(out), None, q, k, v, out, lse, *plan.tensors(), *fixed)
        if "fused" in phases:
            ops.block_sparse_attn_bwd_fused(torch.randn_like(out), None, q, k, v, out, lse, *plan.tensors(), *fixed)
        configs.OVERRIDES = {}
    # block top-k's one-kernel selection: causal and not, one row per program and several
    from sparse_attn.ops.topk import select_kernel

    select_kernel._select_kernel = CompilingLauncher(select_kernel._select_kernel, target, log)
    for nkb, causal in ((1024, True), (75, False)):
        select_kernel.select_from_scores(torch.randn(2, 16, nkb, nkb), 52 if nkb > 52 else 5, 3, causal)
    for line in log:
        print("compiled", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
