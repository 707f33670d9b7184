"""Training a `SparseCausalLM` on byte tokens: AdamW with linear warm-up and cosine decay,
periodic validation loss, checkpoints that resume to the same result, and loss curves.

Reproducible by construction: the batch of step s is drawn from a generator seeded with
(seed, s) and dropout's generator is reseeded per step, so a run resumed from a checkpoint
at step s continues exactly as the uninterrupted run would have (tested on CPU). Validation
uses fixed, evenly spaced windows of the validation split, so every evaluation of every
mechanism sees the same text.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .._extras import figure, progress
from ..nn import ModelConfig, SparseCausalLM
from .._checks import check_int
from .corpus import TokenData


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

    def evals(self) -> list[tuple[int, float]]:
        return [(h["step"], h["val_loss"]) for h in self.history if "val_loss" in h]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine to min_lr."""
    if step < cfg.lr_warmup:
        return cfg.lr * (step + 1) / cfg.lr_warmup
    done = (step - cfg.lr_warmup) / max(1, cfg.steps - cfg.lr_warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, done)))


def _batch(data: TokenData, cfg: TrainConfig, step: int):
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts = torch.randint(0, len(data.train) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
    return data.windows("train", starts, cfg.seq_len)


def _autocast(cfg: TrainConfig):
    device = torch.device(cfg.device)
    enabled = cfg.dtype == "bfloat16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


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
        with _autocast(cfg):
            loss = _loss(model, x.to(device), y.to(device), parallel)
        total += float(loss if parallel is None else parallel.all_sum(loss)) * len(chunk)
    model.train(was_training)
    return total / count


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # no weight decay on norms (1-D weights); the tied embedding is decayed like a matrix
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def optimizer_step(model, optimizer, loss: torch.Tensor, grad_clip: float, parallel=None) -> None:
    """One update: backward, (with `parallel`: gradients summed over its ranks), clip the gradient
    norm at grad_clip (0: no clipping), step, and count the step (the dense-to-sparse warm-up
    reads the count). Shared by every training loop."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if parallel is not None:
        parallel.reduce_gradients(model)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    model.advance()


def save_checkpoint(path: str | os.PathLike, model: SparseCausalLM, optimizer, step: int, train_cfg: TrainConfig,
                    history: list[dict]) -> None:
    """Everything a resume needs, written to a temporary file and renamed (a crash mid-write
    leaves the previous checkpoint intact)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "model_config": model.cfg.to_dict(), "train_config": asdict(train_cfg), "history": history}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, device: str = "cpu"):
    """(model on `device`, checkpoint dict); the model config comes from the checkpoint."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    model = SparseCausalLM(ModelConfig.from_dict(ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model, ckpt


def train_lm(model_cfg: ModelConfig, cfg: TrainConfig, data: TokenData, *, checkpoint: str | None = None,
             resume: bool = False, show_progress: bool = True, label: str = "train",
             on_eval: Callable[[dict], None] | None = None,
             parallel=None) -> tuple[SparseCausalLM, TrainResult]:
    """Train a SparseCausalLM from scratch (or from `checkpoint` with resume=True) for cfg.steps
    optimizer steps in total. With `checkpoint`, saves there at every evaluation and at the end.
    `on_eval(entry)` is called after each evaluation with its history entry (step, train_loss,
    lr, val_loss, elapsed_s), while training goes on: to report it as it happens. Progress:
    `sparse_attn._extras.progress` (a bar on a terminal, plain lines elsewhere).

    `parallel`: a `train.ContextParallel` (torch.distributed: each sequence split over context
    ranks, the batch over data-parallel groups; every rank calls train_lm with the same
    arguments and gets the same model and history; checkpoints are not written in this mode).

    Returns (model, result); result.history holds train loss and learning rate per step and
    the validation loss every eval_every steps and at the last step.
    """
    data.check_length(cfg.seq_len)
    if parallel is not None and (checkpoint is not None or resume):
        raise ValueError("checkpoint / resume are not supported with parallel (the context-parallel model's "
                         "layers are wrapped): pass checkpoint=None")
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = SparseCausalLM(model_cfg).to(device)
    if parallel is not None:
        parallel.parallelize(model, cfg.seq_len, cfg.batch_size, 128)  # shards cut at multiples of every backend's blocks
    optimizer = _optimizer(model, cfg)
    start, history = 0, []
    if resume:
        if checkpoint is None or not Path(checkpoint).is_file():
            raise ValueError(f"resume needs an existing checkpoint file, got {checkpoint!r}")
        ckpt = torch.load(checkpoint, map_location=device, weights_only=True)
        if ckpt["model_config"] != model_cfg.to_dict():
            raise ValueError(f"checkpoint {checkpoint} holds a different model: {ckpt['model_config']}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start, history = ckpt["step"], ckpt["history"]
    result = TrainResult(history=history, num_parameters=sum(p.numel() for p in model.parameters()))
    model.train()
    began = time.perf_counter()
    bar = progress(range(start, cfg.steps), enabled=show_progress, desc=label, unit="step", initial=start,
                   total=cfg.steps, mininterval=1.0)  # mininterval: the bar's; lines off a terminal every 10 s
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = (t.to(device) for t in _batch(data, cfg, step))
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout: the same masks after a resume
        with _autocast(cfg):
            loss = _loss(model, x, y, parallel)
        optimizer_step(model, optimizer, loss, cfg.grad_clip, parallel)
        reported = loss.detach() if parallel is None else parallel.all_sum(loss)
        entry = {"step": step + 1, "train_loss": float(reported), "lr": lr_at(step, cfg)}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            entry["val_loss"] = evaluate(model, data, cfg, parallel)
            entry["elapsed_s"] = time.perf_counter() - began
            if checkpoint is not None:
                save_checkpoint(checkpoint, model, optimizer, step + 1, cfg, history + [entry])
            if on_eval is not None:
                on_eval(entry)
        history.append(entry)
        if hasattr(bar, "set_postfix"):
            last_val = next((h["val_loss"] for h in reversed(history) if "val_loss" in h), math.nan)
            bar.set_postfix(loss=f"{entry['train_loss']:.3f}", val=f"{last_val:.3f}", refresh=False)
    result.seconds = time.perf_counter() - began
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
