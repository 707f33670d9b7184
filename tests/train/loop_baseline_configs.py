"""Tiny runs of the three trainers (LM, passkey/MQAR, ListOps) whose numbers were recorded with
the code before `train/loop.py` existed (tests/train/data/loop_baseline.json); test_loop.py runs
them again and compares, so that moving the trainers onto one loop changed no result."""

from __future__ import annotations

import torch

from sparse_attn.eval.listops_train import listops_mechanisms, train_listops
from sparse_attn.eval.recall import mqar_experiment, passkey_experiment
from sparse_attn.eval.tasks import passkey_min_length
from sparse_attn.nn import ModelConfig
from sparse_attn.train import TokenData, TrainConfig, synthetic_corpus, train_lm

TIME_KEYS = ("elapsed_s", "seconds", "train_seconds", "eval_seconds", "steps_per_s", "tokens_per_s")


def without_times(value):
    """`value` with every wall-clock number dropped (they differ between any two runs)."""
    if isinstance(value, dict):
        return {k: without_times(v) for k, v in value.items() if k not in TIME_KEYS}
    if isinstance(value, (list, tuple)):
        return [without_times(v) for v in value]
    return value


def run_lm() -> dict:
    data = TokenData.from_bytes(synthetic_corpus(50_000, seed=0))
    model_cfg = ModelConfig(vocab_size=256, dim=32, num_layers=2, num_heads=2, mechanisms="sliding_window:window=8")
    cfg = TrainConfig(seq_len=32, batch_size=4, steps=8, lr=3e-3, min_lr=3e-4, lr_warmup=3, eval_every=4,
                      eval_batches=2, seed=0)
    model, result = train_lm(model_cfg, cfg, data, show_progress=False)
    return {"history": without_times(result.history), "final_val_loss": result.final_val_loss,
            "weight_sum": float(sum(p.detach().double().sum() for p in model.parameters()))}


def run_recall() -> dict:
    tiny = {"steps": 4, "dim": 16, "layers": 2, "heads": 2, "batch": 4, "test_examples": 4, "progress": False}
    n0 = passkey_min_length(2)
    passkey = passkey_experiment({"dense": "causal", "window": "sliding_window:window=8"}, n0 + 8, [n0 + 8, n0 + 24],
                                 digits=2, depths=[0.0, 1.0], **tiny)
    mqar = mqar_experiment({"dense": "causal", "linear": "linear:causal=true"}, [2, 4], seq_len=32, vocab_size=32,
                           **tiny)
    return {"passkey": without_times(passkey.to_dict()), "mqar": without_times(mqar.to_dict())}


def run_listops(cache) -> dict:
    mechanisms = listops_mechanisms(window=8, block=4, num_features=16, bucket_size=8, n_hashes=2)
    result = train_listops({k: mechanisms[k] for k in ("dense", "bigbird", "performer")}, train_examples=120,
                           val_examples=40, test_examples=40, min_length=10, max_length=40, dim=16, layers=2, heads=2,
                           mlp_ratio=2.0, batch=8, steps=6, lr=3e-3, warmup=2, weight_decay=0.1, eval_every=3, seed=0,
                           device="cpu", dtype="float32", progress=False, data_cache=cache)
    return without_times(result.to_dict()["runs"])


def run_all(cache=None) -> dict:
    torch.manual_seed(0)
    return {"lm": run_lm(), "recall": run_recall(), "listops": run_listops(cache)}
