"""The kernels leave their length-dependent int arguments unspecialised (kernels._jit), so a
stream of new shapes compiles a bounded number of variants: benchmarks/triton_specializations.py
drives the library's real launches, counted by Triton's specialisation key (nothing runs),
against the same kernels fully specialised. Clean subprocesses: the counts need the
interpreter flag off."""

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


def test_new_shapes_compile_a_bounded_number_of_variants(tmp_path):
    free = _run(tmp_path)
    specialized = _run(tmp_path, "--fully-specialized")
    for name in ("block_sparse_fwd_kernel", "block_sparse_bwd_dq_kernel", "block_sparse_bwd_dkdv_kernel"):
        assert specialized[name]["launches"] == free[name]["launches"] == 40
        # fully specialised, lengths, block and work counts met both divisibilities: many variants;
        # as the library launches them only the lengths' divisibility (which the compiler uses for
        # the masks of ragged tiles) and the constexprs (EVEN_Q / EVEN_KV) split them
        assert {"q_len", "kv_len", "total_work"} <= set(specialized[name]["varying_int_arguments"]), name
        assert specialized[name]["variants"] >= 5 and free[name]["variants"] <= 3, (name, specialized, free)
        assert set(free[name]["varying_int_arguments"]) <= {"q_len", "kv_len"}


CHECK_UNSPECIALIZED = """
from sparse_attn.backends.triton import kernels
for name in ("block_sparse_fwd_kernel", "block_sparse_bwd_dq_kernel", "block_sparse_bwd_dkdv_kernel",
             "block_sparse_bwd_combined_kernel"):
    kernel = getattr(kernels, name)
    free = {p.name for p in kernel.params if p.do_not_specialize}
    assert free and not {"q_len", "kv_len"} & free, name  # the masks of ragged tiles use their divisibility
    # tile strides keep their divisibility (vectorised tile loads), and so do the backward's
    # lse2/delta strides (rows padded to a multiple of 16 by ops._bwd_row_stats)
    assert not {n for n in free if n.startswith(("stride_q", "stride_k", "stride_v", "stride_o", "stride_d"))
                }, (name, free)
    if name in ("block_sparse_bwd_dq_kernel", "block_sparse_bwd_dkdv_kernel", "block_sparse_bwd_combined_kernel"):
        assert not {"stride_lb", "stride_lh"} & free, name
    assert not any(p.do_not_specialize for p in kernels.fully_specialized(kernel).params), name
print("ok")
"""


def test_kernels_leave_only_length_arguments_unspecialized():
    done = subprocess.run([sys.executable, "-c", CHECK_UNSPECIALIZED], env=_compiling_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.parametrize("fully_specialized", [False, True])
def test_gpu_mode_dry_run_under_the_interpreter(tmp_path, monkeypatch, fully_specialized):
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
                              steady_heads=1, steady_dim=16, fully_specialized=fully_specialized, out=out)
    assert module.run_on_gpu(args, P.sliding_window(8, causal=False), device="cpu", repeats=2, warmup=1) == 0
    result = json.loads(out.read_text())
    assert result["stream"]["calls"] == 3 and len(result["stream"]["seconds"]) == 3
    assert all(s > 0 for s in result["stream"]["seconds"])
    assert result["steady"]["fwd_ms"] > 0 and result["steady"]["fwd_bwd_ms"] > 0


@pytest.mark.slow  # ~1 min of sm90 compiles
def test_unspecialized_counts_generate_the_same_ptx(tmp_path):
    """The kernels as the library launches them compile to the same sm90 PTX as fully
    specialised, at lengths divisible by 128, by 16 only and by neither."""
    out = tmp_path / "ptx.json"
    cmd = [sys.executable, str(SCRIPT), "--compare-ptx", "512", "400", "399", "--max-rows", "2", "--dim", "16",
           "--out", str(out)]
    done = subprocess.run(cmd, env=_compiling_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3 * 4 and all(row["identical"] for row in rows)
