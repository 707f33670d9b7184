"""The triton kernels compile for a Hopper GPU (sm90) with the exact argument types of ops.py's
launches, TMA on and off, both backwards: the CPU interpreter that runs them in the other tests
accepts code the real compiler rejects. Runs compile_for_gpu.py in a clean subprocess (the
interpreter flag, set by test_triton.py for the whole session, must be off there)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("triton.compiler")

SCRIPT = Path(__file__).with_name("compile_for_gpu.py")
SRC = Path(__file__).resolve().parents[2] / "src"


def test_kernels_compile_for_sm90():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this Triton has no ahead-of-time CUDA compiler: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"compile for sm90 failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    compiled = [line for line in done.stdout.splitlines() if line.startswith("compiled ")]
    kinds = {line.split()[1] for line in compiled}
    assert kinds == {"block_sparse_fwd_kernel", "block_sparse_bwd_dq_kernel", "block_sparse_bwd_dkdv_kernel",
                     "bwd_preprocess_kernel", "_select_kernel"}, compiled  # _select_kernel: block top-k's selection
    assert any("USE_TMA=True" in line for line in compiled) and any("USE_TMA=False" in line for line in compiled)
    assert sum(line.split()[1] == "_select_kernel" for line in compiled) == 2  # causal at 1024 kv blocks, not causal at 75


@pytest.mark.slow  # ~40 s of compiles for switches that are off by default
def test_persistent_variants_compile_for_sm90():
    """The persistent-grid variants (static stride and atomic queue) of every kernel and the
    one-grid backward compile for sm90 (configs.VARIANTS; benchmarks/kernel_variants.py measures
    them on the GPU)."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this Triton has no ahead-of-time CUDA compiler: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    names = ["fwd_persistent1", "dq_queue1", "dkdv_persistent1", "fused_queue1", "dq_combined"]
    done = subprocess.run([sys.executable, str(SCRIPT), "--variants", *names], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, f"compile for sm90 failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    compiled = [line for line in done.stdout.splitlines() if line.startswith("compiled ")]
    assert any("PERSISTENT=True,QUEUE=True" in line for line in compiled)
    assert any("PERSISTENT=True,QUEUE=False" in line for line in compiled)
    assert any(line.split()[1] == "block_sparse_bwd_combined_kernel" for line in compiled)
