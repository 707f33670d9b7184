"""Training a `SparseCausalLM` on byte tokens: AdamW with linear warm-up and cosine decay,
periodic validation loss, checkpoints that resume to the same result (`train.loop`), and loss
curves.

Reproducible by construction: the batch of step s is drawn from a generator seeded with
(seed, s) and dropout's generator is reseeded per step, so a run resumed from a checkpoint
at step s continues exactly as the uninterrupted run would have (tested on CPU). Validation
uses fixed, evenly spaced windows of the validation split, so every evaluation of every
mechanism sees the same text.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .._extras import figure
from ..nn import ModelConfig, SparseCausalLM
from .._checks import check_int
from .corpus import TokenData
from .loop import TrainLoop, adamw, autocast, warmup_cosine


@dataclass
class TrainConfig:
    """How to train (the model is described by `nn.ModelConfig`)."""

    seq_len: int = 256
    batch_size: int = 16
    steps: int = 400
    lr: float = 3e-3
    min_lr: float = 3e-4  # cosine decay floor
    lr_warmup: int = 40  # linear learning-rate warm-up steps (not the dense-to-sparse warm-up)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"  # "bfloat16": autocast (CUDA); weights and optimizer stay fp32

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "steps", "eval_every", "eval_batches"):
            check_int(name, getattr(self, name), 1)
        check_int("lr_warmup", self.lr_warmup, minimum=0)
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one entry per step; val_loss on eval steps
    final_val_loss: float = math.nan
    num_parameters: int = 0
    seconds: float = 0.0  # wall time of this process's steps (a resumed run counts its own)
    stopped_early: bool = False  # max_minutes ran out before cfg.steps (checkpointed: resume goes on)

    def evals(self) -> list[tuple[int, float]]:
        return [(h["step"], h["val_loss"]) for h in self.history if "val_loss" in h]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine to min_lr."""
    return warmup_cosine(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.lr_warmup, steps=cfg.steps)


def _batch(data: TokenData, cfg: TrainConfig, step: int):
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts = torch.randint(0, len(data.train) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
    return data.windows("train", starts, cfg.seq_len)


def _loss(model, x, y, parallel=None):
    """Mean next-byte cross-entropy of the batch; with `parallel`, this rank's share of the
    mean over the whole (global) batch, x and y being the whole batch [B, N]."""
    if parallel is None:
        logits = model(x)  # [B, N, V]
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    x_r, y_r = parallel.local(x, y)  # [B / dp, N_r]
    logits = model(x_r)
    local_sum = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y_r.flatten(), reduction="sum")
    return parallel.share(local_sum, y.numel())


@torch.no_grad()
def evaluate(model: SparseCausalLM, data: TokenData, cfg: TrainConfig, parallel=None) -> float:
    """Mean next-byte cross-entropy (nats) over eval_batches x batch_size fixed windows spread
    evenly over the validation split (with `parallel`, split over its ranks as in training)."""
    was_training = model.training
    model.eval()
    count = cfg.eval_batches * cfg.batch_size
    starts = torch.linspace(0, len(data.val) - cfg.seq_len - 1, count).long()
    total = 0.0
    device = torch.device(cfg.device)
    for chunk in starts.split(cfg.batch_size):
        x, y = data.windows("val", chunk, cfg.seq_len)
        with autocast(device, cfg.dtype):
            loss = _loss(model, x.to(device), y.to(device), parallel)
        total += float(loss if parallel is None else parallel.all_sum(loss)) * len(chunk)
    model.train(was_training)
    return total / count


def load_checkpoint(path: str | os.PathLike, device: str = "cpu"):
    """(model on `device`, checkpoint dict); the model config comes from the checkpoint."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    model = SparseCausalLM(ModelConfig.from_dict(ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model, ckpt


def train_lm(model_cfg: ModelConfig, cfg: TrainConfig, data: TokenData, *, checkpoint: str | None = None,
             resume: bool = False, checkpoint_every: int | None = None, checkpoint_minutes: float | None = None,
             max_minutes: float | None = None, show_progress: bool = True, label: str = "train",
             on_eval: Callable[[dict], None] | None = None, parallel=None) -> tuple[SparseCausalLM, TrainResult]:
    """Train a SparseCausalLM from scratch (or from `checkpoint` with resume=True) for cfg.steps
    optimizer steps in total, on `train.loop.TrainLoop`. With `checkpoint` (a file), saves there
    at every evaluation, every `checkpoint_every` steps / `checkpoint_minutes` minutes and at the
    end; `max_minutes` stops the run cleanly (checkpointed, result.stopped_early) before it
    would overrun. `on_eval(entry)` is called after each evaluation with its history entry
    (step, train_loss, lr, val_loss, elapsed_s), while training goes on: to report it as it
    happens. Progress: `sparse_attn._extras.progress` (a bar on a terminal, plain lines elsewhere).

    `parallel`: a `train.ContextParallel` (torch.distributed: each sequence split over context
    ranks, the batch over data-parallel groups; every rank calls train_lm with the same
    arguments and gets the same model and history). Checkpoints and a time budget are refused
    in this mode (the wrapped layers change the state dict's keys; ranks stopping on their own
    clocks could stop at different steps and hang the others).

    Returns (model, result); result.history holds train loss and learning rate per step and
    the validation loss every eval_every steps and at the last step.
    """
    data.check_length(cfg.seq_len)
    if parallel is not None and (checkpoint is not None or resume or max_minutes is not None):
        raise ValueError("checkpoint / resume / max_minutes are not supported with parallel (the context-parallel "
                         "model's layers are wrapped; ranks must stop at the same step): leave them unset")
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = SparseCausalLM(model_cfg).to(device)
    if parallel is not None:
        parallel.parallelize(model, cfg.seq_len, cfg.batch_size, 128)  # shards cut at multiples of every backend's blocks
    optimizer = adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def check_resume(ckpt):
        if ckpt.get("model_config") != model_cfg.to_dict():
            raise ValueError(f"checkpoint {checkpoint} holds a different model: {ckpt.get('model_config')}")

    loop = TrainLoop(model, optimizer, steps=cfg.steps,
                     batches=lambda step: tuple(t.to(device) for t in _batch(data, cfg, step)),
                     loss=lambda model, batch: _loss(model, *batch, parallel), lr=lambda step: lr_at(step, cfg),
                     evaluate=lambda model, step: {"val_loss": evaluate(model, data, cfg, parallel)},
                     eval_every=cfg.eval_every,
                     grad_clip=cfg.grad_clip, device=device, dtype=cfg.dtype,
                     step_seed=lambda step: cfg.seed * 1_000_003 + step,
                     meta={"model_config": model_cfg.to_dict(), "train_config": asdict(cfg)},
                     check_resume=check_resume, checkpoint=checkpoint, resume=resume,
                     checkpoint_every=checkpoint_every, checkpoint_minutes=checkpoint_minutes,
                     max_minutes=max_minutes, on_eval=on_eval, progress=show_progress, label=label,
                     after_backward=None if parallel is None else parallel.reduce_gradients,
                     report_loss=None if parallel is None else lambda loss: float(parallel.all_sum(loss)))
    run = loop.run()
    result = TrainResult(history=run.history, num_parameters=sum(p.numel() for p in model.parameters()),
                         seconds=run.session_seconds, stopped_early=run.stopped_early)
    evals = result.evals()
    result.final_val_loss = evals[-1][1] if evals else evaluate(model, data, cfg, parallel)
    return model, result


def plot_loss_curves(runs: dict[str, list[dict]], path: str, title: str = "") -> None:
    """Training loss (smoothed, thin) and validation loss (markers) per run, against steps."""
    fig = figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for i, (name, history) in enumerate(runs.items()):
        color = f"C{i % 10}"
        steps = [h["step"] for h in history]
        loss = [h["train_loss"] for h in history]
        smooth, acc = [], None
        for value in loss:  # exponential moving average, as loss curves are usually shown
            acc = value if acc is None else 0.9 * acc + 0.1 * value
            smooth.append(acc)
        ax.plot(steps, smooth, color=color, alpha=0.35, linewidth=1)
        evals = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
        if evals:
            ax.plot(*zip(*evals), color=color, marker="o", markersize=3, label=f"{name} (val {evals[-1][1]:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=120)
