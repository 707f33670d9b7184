"""`train_lm(..., parallel=ContextParallel(mesh))` on 2 gloo ranks (context only) and on 4 (a 2 x 2
("dp", "cp") mesh) gives the single-process run's losses, step by step, to float rounding; and
`examples/train_lm.py --context-parallel 2` under torchrun gives its single-process losses (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gloo_pool import pool
from sparse_attn.distributed import zigzag
from sparse_attn.nn import ModelConfig
from sparse_attn.train import ContextParallel, TokenData, TrainConfig, synthetic_corpus, train_lm

ROOT = Path(__file__).resolve().parents[2]
# a window layer (halo) and a causal layer (ring / all-to-all): the sharding is head-tail for both
MODEL = dict(vocab_size=256, dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
             mechanisms=["sliding_window:window=40", "causal"])
TRAIN = dict(seq_len=256, batch_size=4, steps=3, eval_every=3, eval_batches=1, lr=1e-2, lr_warmup=1)


def _data():
    return TokenData.from_bytes(synthetic_corpus(50_000, seed=0))


def train_ranks(rank, world_size, mesh_shape):
    from torch.distributed.device_mesh import init_device_mesh

    names = ("dp", "cp") if len(mesh_shape) == 2 else None
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    parallel = ContextParallel(mesh)
    model, result = train_lm(ModelConfig(**MODEL), TrainConfig(**TRAIN), _data(), show_progress=False,
                             parallel=parallel)
    sent = model.context_comm.stats.total("kv", "dkv", "a2a", "a2a_grad")
    return [(h["train_loss"], h.get("val_loss")) for h in result.history], sent, parallel.sharding.describe()


@pytest.mark.parametrize("mesh_shape", [(2,), (2, 2)], ids=["cp2", "dp2xcp2"])
def test_context_parallel_training_equals_one_process(mesh_shape):
    _, single = train_lm(ModelConfig(**MODEL), TrainConfig(**TRAIN), _data(), show_progress=False)
    want = [(h["train_loss"], h.get("val_loss")) for h in single.history]
    world = 1
    for size in mesh_shape:
        world *= size
    results = pool(world).run(train_ranks, mesh_shape)
    for history, sent, sharding in results:
        assert len(history) == len(want)
        for (loss, val), (want_loss, want_val) in zip(history, want):
            assert loss == pytest.approx(want_loss, rel=2e-5)
            assert (val is None) == (want_val is None) and (val is None or val == pytest.approx(want_val, rel=2e-5))
        assert sent > 0  # keys did move between the context ranks
    # the window layer alone would take contiguous shards, the causal one head-tail: head-tail for both
    assert all(sharding == zigzag(TRAIN["seq_len"], 2, 128).describe() for _, _, sharding in results)


def test_context_parallel_refuses_checkpoints():
    with pytest.raises(ValueError, match="checkpoint"):
        train_lm(ModelConfig(**MODEL), TrainConfig(**TRAIN), _data(), checkpoint="x.pt", parallel=object())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_example_under_torchrun_equals_one_process(tmp_path):
    args = [str(ROOT / "examples" / "train_lm.py"), "--steps", "2", "--seq-len", "128", "--batch-size", "2",
            "--plot", "", "--sample", "0", "--checkpoint", "", "--mechanisms", "sliding_window:window=32", "causal",
            "sliding_window:window=32", "causal"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, *args, "--history", str(tmp_path / "one.json")], env=env, check=True,
                   cwd=tmp_path, timeout=600)
    subprocess.run(["torchrun", "--nproc-per-node", "2", *args, "--context-parallel", "2",
                    "--history", str(tmp_path / "cp.json")], env=env, check=True, cwd=tmp_path, timeout=600)
    one, cp = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "cp.json"))
    assert [h["train_loss"] for h in cp] == pytest.approx([h["train_loss"] for h in one], rel=2e-5)
    assert [h["val_loss"] for h in cp] == pytest.approx([h["val_loss"] for h in one], rel=2e-5)


def test_example_writes_history_and_summary(tmp_path):
    """examples/train_lm.py --history / --summary (what benchmarks/cp_gpu2.sh compares)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(ROOT / "examples" / "train_lm.py"), "--steps", "2", "--seq-len", "64",
                    "--batch-size", "2", "--plot", "", "--sample", "0", "--checkpoint", "",
                    "--history", str(tmp_path / "h.json"), "--summary", str(tmp_path / "s.json")],
                   env=env, check=True, cwd=tmp_path, timeout=300, capture_output=True)
    history = json.loads((tmp_path / "h.json").read_text())
    summary = json.loads((tmp_path / "s.json").read_text())
    assert [h["step"] for h in history] == [1, 2]
    assert summary["tokens_per_step"] == 128 and summary["world_size"] == 1
    assert summary["final_val_loss"] == pytest.approx(history[-1]["val_loss"])
    assert summary["peak_memory_bytes"] == [0] and summary["bytes_sent"] == [0]  # CPU, one process
