"""One training loop for every trainer in the library (the LM trainer, passkey / MQAR, ListOps):
batches, loss, learning-rate schedule, autocast, gradient clipping, periodic evaluation, a
history of metrics, progress, and checkpoints that resume bit for bit.

    loop = TrainLoop(model, adamw(model, lr=1e-3, weight_decay=0.1), steps=1000,
                     batches=lambda step: batch_of(step), loss=lambda model, batch: ...,
                     lr=lambda step: warmup_cosine(step, lr=1e-3, min_lr=1e-4, warmup=100, steps=1000),
                     evaluate=lambda model, step: {"val_loss": ...}, eval_every=100,
                     checkpoint="run.pt", checkpoint_every=200, max_minutes=9)
    result = loop.run()       # result.history, result.stopped_early, ...
    # later, maybe on another machine, with a freshly built model and optimizer:
    result = TrainLoop(model, optimizer, ..., checkpoint="run.pt", resume=True).run()

Reproducible by construction. `batches(step)` must depend on the step only (the data position
saved in a checkpoint is the step), and the random state of torch (CPU and CUDA) and Python is
saved with every checkpoint and restored on resume, so a resumed run draws the same dropout
masks and random numbers as the uninterrupted one: its history and weights are equal, bit for
bit, on the CPU (tested). `step_seed(step)` optionally reseeds torch before each step's forward
(what the LM and ListOps trainers do, so that a step's randomness does not depend on what ran
before it).

Checkpoints are one small `torch.save` file (model, optimizer, step, history, random states,
the caller's `state` and `meta`), written to a temporary file and renamed, so a crash while
writing keeps the previous one. They are written at every evaluation, every `checkpoint_every`
steps, every `checkpoint_minutes` minutes, when the `max_minutes` budget stops the run and at
the end. The budget is checked before each step against the time the next step (with its
evaluation and checkpoint) is expected to take, so a run stops inside it.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._checks import check_bool, check_float, check_int
from .._extras import progress as progress_bar

__all__ = ["LoopResult", "TrainLoop", "adamw", "autocast", "optimizer_step", "read_checkpoint", "warmup_cosine",
           "write_checkpoint"]

DTYPES = ("float32", "bfloat16")
# Keys the loop writes into a checkpoint; a caller's `meta` may not use them.
_LOOP_KEYS = ("model", "optimizer", "step", "history", "rng", "state", "train_seconds", "eval_seconds",
              "finished", "format")
_FORMAT = "sparse_attn.train.loop/1"
_now = time.monotonic  # the loop's clock (tests replace it to simulate a time budget running out)


# ---- the pieces every trainer shares --------------------------------------------------------


def warmup_cosine(step: int, *, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up over `warmup` steps to
    `lr`, then cosine decay to `min_lr` at step `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    done = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, done)))


def autocast(device, dtype: str):
    """bfloat16 autocast on `device` for dtype "bfloat16" (weights and optimizer stay float32);
    a disabled context for "float32"."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def adamw(model: torch.nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW with no weight decay on 1-D parameters (norms, biases); matrices (the tied
    embedding too) are decayed."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=lr, betas=betas)


def optimizer_step(model, optimizer, loss: torch.Tensor, grad_clip: float,
                   after_backward: Callable[[torch.nn.Module], None] | None = None) -> None:
    """One update: backward, `after_backward(model)` (e.g. gradients summed over ranks), clip the
    gradient norm at grad_clip (0: no clipping), step, and count the step on models that count
    them (`advance()`: the dense-to-sparse warm-up reads it)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if after_backward is not None:
        after_backward(model)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if hasattr(model, "advance"):
        model.advance()


# ---- checkpoint files -----------------------------------------------------------------------


def write_checkpoint(path: str | os.PathLike, payload: Mapping) -> None:
    """torch.save to a temporary file beside `path`, then rename: a crash mid-write leaves the
    previous checkpoint intact."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(payload), tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | os.PathLike, device="cpu") -> dict | None:
    """The checkpoint at `path` (tensors on `device`), or None when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return None
    return torch.load(path, map_location=device, weights_only=True)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if device.type == "cuda" and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(state["python"]), gauss))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ---- the loop -------------------------------------------------------------------------------


@dataclass
class LoopResult:
    """What a `TrainLoop.run()` did. history: one entry per step done so far (over every resumed
    session): step, train_loss, the loss function's metrics, lr; on evaluation steps the
    evaluation's metrics and elapsed_s (training seconds so far, evaluation excluded)."""

    history: list[dict] = field(default_factory=list)
    step: int = 0  # optimizer steps done in total
    steps: int = 0  # steps asked for
    stopped_early: bool = False  # the max_minutes budget stopped the run before `steps`
    resumed_from: int | None = None  # the checkpoint's step when this session resumed
    train_seconds: float = 0.0  # optimizer steps, summed over sessions
    eval_seconds: float = 0.0  # evaluations, summed over sessions
    session_seconds: float = 0.0  # this session's wall time in run()
    last_eval_seconds: float = 0.0  # the last evaluation's duration in this session (0: none ran)
    checkpoints_written: int = 0  # in this session

    @property
    def finished(self) -> bool:
        return self.step >= self.steps


class TrainLoop:
    """Train `model` with `optimizer` for `steps` optimizer steps (see the module docstring).

    Args:
        batches: step -> batch (moved to the device by the caller); a pure function of the step.
        loss: (model, batch) -> loss tensor, or (loss, {metric: float}) whose metrics go into
            the step's history entry (e.g. train_accuracy). Runs under autocast.
        lr: step -> learning rate, set on every parameter group before the step.
        evaluate: (model, step) -> {metric: float}, run every `eval_every` steps and after the
            last one (the model is put back in train mode after it).
        grad_clip: gradient-norm clipping (0: none).
        device, dtype: where the model is, and "float32" or "bfloat16" (autocast).
        step_seed: step -> seed for `torch.manual_seed` before each step's forward (None: the
            random state simply runs on, and is saved in checkpoints).
        state: the caller's counters (numbers, tensors, lists): saved in checkpoints and
            restored in place on resume (the caller's closures may update it during the run).
        meta: saved in checkpoints beside the loop's keys (model config, settings).
        check_resume: called with the checkpoint before anything is loaded from it, to refuse
            one made with other settings (raise ValueError).
        checkpoint: the checkpoint file (None: no checkpoints). resume: continue from it (it must
            exist).
        checkpoint_every, checkpoint_minutes: also write a checkpoint every this many steps /
            minutes (None: only at evaluations, at a budget stop and at the end).
        max_minutes: a time budget for this session's steps: the run checkpoints and stops
            (result.stopped_early) before a step that would end past it.
        on_eval: entry -> None, called after each evaluation (to report it as it happens).
        progress, label: a progress bar or lines (`_extras.progress`).
        after_backward: model -> None, between backward and clipping (distributed training sums
            gradients over its ranks there: `train.ContextParallel.reduce_gradients`).
        report_loss: loss tensor -> the float the history records (default float(loss); a rank
            holding its share of a global mean sums the shares over the ranks).

    The loss and the loss function's metrics may stay 0-dim tensors on the device: the loop
    reads them back together, at most about once a second (progress), and at every evaluation,
    checkpoint and the end, instead of synchronising with the device at every step.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, steps: int,
                 batches: Callable[[int], Any], loss: Callable[[torch.nn.Module, Any], Any],
                 lr: Callable[[int], float], evaluate: Callable[[torch.nn.Module, int], Mapping] | None = None,
                 eval_every: int | None = None, grad_clip: float = 1.0, device="cpu", dtype: str = "float32",
                 step_seed: Callable[[int], int] | None = None, state: dict | None = None,
                 meta: Mapping | None = None, check_resume: Callable[[dict], None] | None = None,
                 checkpoint: str | os.PathLike | None = None, resume: bool = False,
                 checkpoint_every: int | None = None, checkpoint_minutes: float | None = None,
                 max_minutes: float | None = None, on_eval: Callable[[dict], None] | None = None,
                 progress: bool = True, label: str = "train",
                 after_backward: Callable[[torch.nn.Module], None] | None = None,
                 report_loss: Callable[[torch.Tensor], float] | None = None):
        self.steps = check_int("steps", steps, 1)
        if eval_every is not None:
            check_int("eval_every", eval_every, 1)
        if eval_every is not None and evaluate is None:
            raise ValueError("eval_every needs evaluate= (the function that evaluates the model)")
        self.grad_clip = check_float("grad_clip", grad_clip, 0)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        if checkpoint_every is not None:
            check_int("checkpoint_every", checkpoint_every, 1)
        for name, value in (("checkpoint_minutes", checkpoint_minutes), ("max_minutes", max_minutes)):
            if value is not None and check_float(name, value, 0) <= 0:
                raise ValueError(f"{name} must be > 0 (or None), got {value!r}")
        check_bool("resume", resume)
        if checkpoint is None:
            for name, value in (("resume", resume or None), ("checkpoint_every", checkpoint_every),
                                ("checkpoint_minutes", checkpoint_minutes)):
                if value is not None:
                    raise ValueError(f"{name} needs checkpoint= (the checkpoint file)")
        if meta is not None and set(meta) & set(_LOOP_KEYS):
            raise ValueError(f"meta may not use the loop's keys {sorted(set(meta) & set(_LOOP_KEYS))}")
        self.model, self.optimizer = model, optimizer
        self.batches, self.loss, self.lr, self.evaluate, self.eval_every = batches, loss, lr, evaluate, eval_every
        self.device, self.dtype, self.step_seed = torch.device(device), dtype, step_seed
        self.state = {} if state is None else state
        self.meta, self.check_resume = dict(meta or {}), check_resume
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.resume, self.checkpoint_every, self.checkpoint_minutes = resume, checkpoint_every, checkpoint_minutes
        self.max_minutes, self.on_eval, self.progress, self.label = max_minutes, on_eval, progress, label
        self.after_backward, self.report_loss = after_backward, report_loss
        self.result = LoopResult(steps=self.steps)
        self._unread: list[dict] = []  # history entries holding device tensors not read back yet

    # -- checkpoints
    def save(self, **extra) -> None:
        """Write the checkpoint now (with `extra` keys beside the loop's, e.g. a finished run's
        record). Nothing without checkpoint=."""
        if self.checkpoint is None:
            return
        self._read_back()
        r = self.result
        write_checkpoint(self.checkpoint, {
            **self.meta, **extra, "format": _FORMAT, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "step": r.step, "history": r.history,
            "rng": _rng_state(self.device), "state": self.state, "train_seconds": r.train_seconds,
            "eval_seconds": r.eval_seconds, "finished": r.finished})
        r.checkpoints_written += 1

    def _load(self) -> None:
        ckpt = read_checkpoint(self.checkpoint, self.device)
        if ckpt is None:
            raise ValueError(f"resume needs an existing checkpoint file, got {str(self.checkpoint)!r}")
        if ckpt.get("format") != _FORMAT:
            raise ValueError(f"checkpoint {self.checkpoint} was not written by sparse_attn.train.loop "
                             f"(format {ckpt.get('format')!r})")
        if self.check_resume is not None:
            self.check_resume(ckpt)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.state.update(ckpt["state"])
        r = self.result
        r.history, r.step, r.resumed_from = list(ckpt["history"]), int(ckpt["step"]), int(ckpt["step"])
        r.train_seconds, r.eval_seconds = float(ckpt["train_seconds"]), float(ckpt["eval_seconds"])
        _set_rng_state(ckpt["rng"], self.device)

    def _read_back(self) -> None:
        """Replace the tensors in the history entries of the steps since the last call by their
        values: one copy to the host for all of them (one synchronisation)."""
        cells = [(entry, key) for entry in self._unread for key, value in entry.items()
                 if isinstance(value, torch.Tensor)]
        if cells:
            device = cells[0][0][cells[0][1]].device  # metrics may live elsewhere than the loss: one device
            values = torch.stack([entry[key].detach().reshape(()).to(device, torch.float64)
                                  for entry, key in cells]).tolist()
            for (entry, key), value in zip(cells, values):
                entry[key] = value
        self._unread.clear()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- the loop
    def run(self) -> LoopResult:
        """Train from the start (or the checkpoint) to `steps`, or until the time budget ends."""
        r = self.result
        if self.resume:
            self._load()
        self.model.train()
        session_began = _now()
        last_save = last_postfix = session_began
        step_cost = eval_cost = save_cost = 0.0  # the last ones measured: the budget's forecast
        bar = progress_bar(range(r.step, self.steps), enabled=self.progress, desc=self.label, unit="step",
                           initial=r.step, total=self.steps, mininterval=1.0)
        self._sync()
        began = _now()
        for step in bar:
            evaluates = self.evaluate is not None and self.eval_every is not None and \
                ((step + 1) % self.eval_every == 0 or step + 1 == self.steps)
            if self.max_minutes is not None:
                forecast = step_cost + (eval_cost if evaluates else 0.0) + 2 * save_cost
                if _now() - session_began + forecast > 60 * self.max_minutes:
                    r.stopped_early = True
                    break
            step_began = _now()
            lr = self.lr(step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            batch = self.batches(step)
            if self.step_seed is not None:
                torch.manual_seed(self.step_seed(step))  # dropout and random draws: the same after a resume
            with autocast(self.device, self.dtype):
                out = self.loss(self.model, batch)
            loss, metrics = out if isinstance(out, tuple) else (out, {})
            optimizer_step(self.model, self.optimizer, loss, self.grad_clip, self.after_backward)
            reported = loss.detach() if self.report_loss is None else self.report_loss(loss.detach())
            entry = {"step": step + 1, "train_loss": reported, **metrics, "lr": lr}
            self._unread.append(entry)  # read back later, with the other steps' (see the class docstring)
            r.step = step + 1
            step_cost = _now() - step_began
            if evaluates:
                self._read_back()
                self._sync()
                now = _now()
                r.train_seconds += now - began
                entry.update(self.evaluate(self.model, step + 1))
                entry["elapsed_s"] = r.train_seconds
                self.model.train()
                r.history.append(entry)
                self._sync()
                began = _now()
                eval_cost = r.last_eval_seconds = began - now
                r.eval_seconds += eval_cost
                if self.on_eval is not None:
                    self.on_eval(entry)
            else:
                r.history.append(entry)
            due = evaluates or (self.checkpoint_every is not None and r.step % self.checkpoint_every == 0) or \
                (self.checkpoint_minutes is not None and _now() - last_save >= 60 * self.checkpoint_minutes)
            if due and self.checkpoint is not None and r.step < self.steps:
                save_began = _now()
                self.save()
                last_save = _now()
                save_cost = last_save - save_began
            if hasattr(bar, "set_postfix") and _now() - last_postfix >= 1.0:  # reads the losses back
                self._read_back()
                bar.set_postfix(self._postfix(entry), refresh=False)
                last_postfix = _now()
        if hasattr(bar, "close"):
            bar.close()
        self._read_back()
        self._sync()
        r.train_seconds += _now() - began
        r.session_seconds = _now() - session_began
        if r.resumed_from is None or r.step > r.resumed_from or r.stopped_early:
            self.save()  # the end, or where the budget stopped it
        return r

    def _postfix(self, entry: dict) -> dict:
        out = {"loss": f"{entry['train_loss']:.3f}"}
        last = next((h for h in reversed(self.result.history) if "elapsed_s" in h), None)
        key = None if last is None else next((k for k in last if k.startswith("val")), None)
        if key is not None:  # the last evaluation's first validation metric
            out[key] = f"{last[key]:.3f}"
        return out
