"""benchmarks/triton_specializations.py: the library's real kernel launches over a stream of
shapes, counted by Triton's specialisation key (nothing runs), and `kernels.lengths_unspecialized`,
which leaves the length-dependent int arguments unspecialised. A clean subprocess: the script
needs the interpreter flag off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # the dry run below runs the kernels in the interpreter
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "triton_specializations.py"


def _compiling_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return env


def _run(tmp_path, *flags):
    out = tmp_path / f"spec{len(flags)}.json"
    env = _compiling_env()
    cmd = [sys.executable, str(SCRIPT), "--calls", "40", "--min-len", "100", "--max-len", "400", "--max-rows", "8",
           "--dim", "16", "--out", str(out), *flags]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())["kernels"]


def test_new_shapes_compile_new_variants_unless_lengths_are_unspecialized(tmp_path):
    specialized = _run(tmp_path)
    free = _run(tmp_path, "--unspecialize-lengths")
    for name in ("block_sparse_fwd_kernel", "block_sparse_bwd_dq_kernel", "block_sparse_bwd_dkdv_kernel"):
        assert specialized[name]["launches"] == free[name]["launches"] == 40
        # lengths and counts met both divisibilities: several variants; unspecialised, only the
        # constexprs (EVEN_Q / EVEN_KV) still split them
        assert {"q_len", "kv_len"} <= set(specialized[name]["varying_int_arguments"]), name
        assert specialized[name]["variants"] >= 4 and free[name]["variants"] <= 2, (name, specialized, free)
        assert not free[name]["varying_int_arguments"]


CHECK_UNSPECIALIZED = """
from sparse_attn.backends.triton import kernels
for name in ("block_sparse_fwd_kernel", "block_sparse_bwd_dq_kernel", "block_sparse_bwd_dkdv_kernel",
             "bwd_preprocess_kernel", "block_sparse_bwd_combined_kernel"):
    kernel = kernels.lengths_unspecialized(getattr(kernels, name))
    free = {p.name for p in kernel.params if p.do_not_specialize}
    assert free and free <= set(kernels.LENGTH_ARGUMENTS), name
    # the q/k/v strides keep their divisibility (vectorised tile loads)
    assert not {n for n in free if n.startswith(("stride_q", "stride_k", "stride_v"))}, name
    assert "q_len" in free, name
print("ok")
"""


def test_lengths_unspecialized_marks_only_the_length_arguments():
    done = subprocess.run([sys.executable, "-c", CHECK_UNSPECIALIZED], env=_compiling_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.parametrize("unspecialize", [False, True])
def test_gpu_mode_dry_run_under_the_interpreter(tmp_path, monkeypatch, unspecialize):
    """The --device cuda path (a stream really run and timed, then a long call) at tiny shapes
    on the CPU under the interpreter: it runs, times every call, writes its JSON."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import argparse
    import importlib.util

    from sparse_attn import patterns as P
    from sparse_attn.backends.triton import kernels

    if torch.cuda.is_available():
        pytest.skip("the interpreter's dry run is for machines without CUDA")
    for name in ("block_sparse_fwd_kernel", "bwd_preprocess_kernel", "block_sparse_bwd_dq_kernel",
                 "block_sparse_bwd_dkdv_kernel", "block_sparse_bwd_combined_kernel"):
        monkeypatch.setattr(kernels, name, getattr(kernels, name))  # restored after the run's swap
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("triton_specializations", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    out = tmp_path / "gpu.json"
    args = argparse.Namespace(calls=3, min_len=20, max_len=40, max_rows=2, heads=2, dim=16, seed=0, steady_len=24,
                              steady_heads=1, steady_dim=16, unspecialize_lengths=unspecialize, out=out)
    assert module.run_on_gpu(args, P.sliding_window(8, causal=False), device="cpu", repeats=2, warmup=1) == 0
    result = json.loads(out.read_text())
    assert result["stream"]["calls"] == 3 and len(result["stream"]["seconds"]) == 3
    assert all(s > 0 for s in result["stream"]["seconds"])
    assert result["steady"]["fwd_ms"] > 0 and result["steady"]["fwd_bwd_ms"] > 0
