"""Recall with small trained causal LMs, one model per attention schedule: passkey retrieval
and multi-query associative recall (MQAR). These measure what the schedules let a *trained*
model do, beside the attention-level needle test (`needle`) and the structural bound
(`reach`): a layer schedule that cannot connect the answer to the key cannot learn the task,
and one that can may still fail to learn it.

    from sparse_attn.eval.recall import passkey_experiment, mqar_experiment, plot_passkey
    res = passkey_experiment(None, train_length=384, test_lengths=[384, 768, 1536])
    print(res.summary())                          # accuracy per schedule and length, reach bounds
    plot_passkey(res, "passkey.png")              # needs the `viz` extra (matplotlib)
    json.dump(res.to_dict(), open("passkey.json", "w"))

Schedules are `{name: mechanisms}`, `mechanisms` being what `ModelConfig.mechanisms` takes: one
spec for every layer ("sliding_window:window=32"), a list with one spec per layer, or a
Mechanism dict. Every layer must be causal (`SparseCausalLM` refuses the others).
`default_schedules` gives dense, a sliding window, StreamingLLM sinks + window, causal linear
attention, and a hybrid (window layers, then one dense layer on top).

Passkey (`passkey_experiment`). Each model is trained on fresh `passkey_batch`es of
`train_length` bytes with the key at a random depth (a new batch every step, never a test
one), by next-token cross-entropy on the answer digits only, plus `lm_weight` times the mean
cross-entropy over all positions (`passkey_loss`). It is then tested on fixed seeded sets at
each test length and at fixed depths (`depths`, the share of filler before the key).
Accuracy is exact match of all digits (`passkey_accuracy`): the argmax of the logits at every
answer position under teacher forcing. That equals greedy decoding's exact match: if every
teacher-forced argmax is right, greedy decoding makes the same context at every step and
writes the same digits; if one is wrong, the first wrong one is also greedy's first wrong
digit. Per-digit accuracy is reported too (teacher forced).
Test lengths beyond `train_length` put tokens at rotary positions the model never saw in
training (RoPE extrapolation) and give dense attention relative distances it never saw:
dense models typically lose accuracy there for that reason alone, while a sliding window
only ever sees the distances it was trained on.

The reach analysis (`reach`) says, for each schedule and test length, what the last token can
structurally see through the model's layers (`eval.reach.receptive_field` at the model's depth,
from the first answer-predicting position, `length - digits - 1`): `span`, the distance back
to which it sees every position; `farthest_back`, the farthest position it sees at all (sinks
make this the start of the sequence while the span stays the window's); and `key_reachable`,
the fraction of test sequences in which every answer position reaches one of the two copies of
its digit in the key line ("The pass key is N. Remember it. N is ..."). The digits are random,
so a model cannot beat chance on sequences whose key it cannot reach: `key_reachable` is an
upper bound on the accuracy above chance. Attention sinks are the first tokens (the task's
instructions), before the key, so in a causal model they carry nothing about it: sinks reach no
further than the window for this task.

MQAR (`mqar_experiment`, Zoology: Arora et al., 2023). The default schedules follow Zoology's
models: layer 0 is a short local mixer (Zoology: a short convolution; here a causal window of
3, `MQAR_FIRST_LAYER`), the compared mechanism comes after it. One model per schedule is
trained on a mixture of pair counts, as Zoology trains one model on several (length, pairs)
configurations: each batch holds `batch / len(num_kv_pairs_list)` rows of every pair count (the sequence length
is fixed), and the loss is cross-entropy at the query positions only (labels -100 elsewhere).
Accuracy is the fraction of query positions whose argmax is the paired value, per pair count,
on fixed seeded test sets. `reach` gives, per pair count, the fraction of queries whose value
position is structurally reachable (an upper bound on the accuracy above chance, as above).
Expected (Zoology): dense attention solves it; a fixed window loses the pairs that fall out of
its reach as the context grows, and linear attention loses accuracy as the pairs outgrow its
state (a `head_dim x head_dim` matrix per head). Here, unlike in the passkey task, attention
sinks do hold something: the first `sinks` tokens are the first key-value pairs.

Training runs on `train.loop.TrainLoop` (AdamW without decay on norms, warm-up + cosine
learning rate, bf16 autocast, checkpoints that resume bit for bit, a time budget); the batch of step s is drawn from a seed made of
(seed, s), test sets from seeds no training batch uses. Models are re-initialised for their
width (`scaled_init_`: Linear N(0, 1/fan_in), tied embedding N(0, 1/dim)) unless
`init="model"`: with the models' GPT-2 init (N(0, 0.02)) width-64 models sat on a plateau for
thousands of steps on both tasks (MQAR not learnt after 3000 steps; with the scaled init,
learnt in 300 to 600).
"""

from __future__ import annotations

import numbers
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .._extras import figure
from .._extras import progress as _progress
from ..nn import ModelConfig, SparseCausalLM
from ..ops.mechanisms import PATTERN, Mechanism
from ..patterns import Pattern
from ..train.lm import TrainConfig, lr_at
from ..train.loop import TrainLoop, adamw, autocast
from .reach import receptive_field
from .tasks import MQAR_IGNORE_INDEX, mqar_dataset, passkey_batch, passkey_min_length
from .._checks import check_bool, check_fraction, check_int

__all__ = [
    "MQAR_FIRST_LAYER",
    "MQARResult",
    "PasskeyResult",
    "default_schedules",
    "mqar_accuracy",
    "mqar_experiment",
    "passkey_accuracy",
    "passkey_experiment",
    "passkey_loss",
    "plot_mqar",
    "plot_passkey",
    "scaled_init_",
]

_DIGIT_LO, _DIGIT_HI = ord("0"), ord("9")
# Layer 0 of the default MQAR schedules: Zoology's models start with a short convolution; a
# causal window of 3 is its stand-in (each position sees its two predecessors).
MQAR_FIRST_LAYER = "sliding_window:window=3"


# ------------------------------------------------------------------------ schedules
def default_schedules(num_layers: int = 2, window: int = 32, *, sinks: int = 4,
                      first: str | None = None) -> dict[str, Any]:
    """Causal schedules to compare: `dense` ("causal"), `sliding_window` (causal, `window`
    keys), `streaming` (StreamingLLM: `sinks` first tokens + the window), `linear` (causal
    linear attention) and, with 2+ such layers, `hybrid` (window layers, one dense layer on top).

    first: a mechanism for layer 0 of every schedule, the compared layers coming after it
    (Zoology's MQAR models put a short convolution there; `"sliding_window:window=3"` is its
    stand-in here, which hands each position its previous tokens)."""
    num_layers = check_int("num_layers", num_layers, 1)
    window = check_int("window", window, 1)
    sinks = check_int("sinks", sinks, 0)
    if first is not None and not isinstance(first, str):
        raise TypeError(f"first must be a mechanism spec string or None, got {type(first).__name__}")
    rest = num_layers - (first is not None)
    if rest < 1:
        raise ValueError(f"num_layers must be >= 2 with first= (one layer for first, one compared), got {num_layers}")
    local = f"sliding_window:window={window}"
    specs: dict[str, list[str]] = {
        "dense": ["causal"] * rest,
        "sliding_window": [local] * rest,
        "streaming": [f"streaming:sinks={sinks},window={window}"] * rest,
        "linear": ["linear:causal=true"] * rest,
    }
    if rest >= 2:
        specs["hybrid"] = [local] * (rest - 1) + ["causal"]
    if first is None:  # one spec for every layer where the layers agree
        return {name: layers[0] if len(set(layers)) == 1 else layers for name, layers in specs.items()}
    return {name: [first] + layers for name, layers in specs.items()}


def _jsonable(mechanisms) -> Any:
    if isinstance(mechanisms, (list, tuple)):
        return [_jsonable(m) for m in mechanisms]
    if isinstance(mechanisms, Mechanism):
        return str(mechanisms)
    if isinstance(mechanisms, Pattern):
        return repr(mechanisms)
    if isinstance(mechanisms, Mapping):
        return {str(k): _jsonable(v) if isinstance(v, (list, tuple, Mechanism, Pattern, Mapping)) else v
                for k, v in mechanisms.items()}
    return mechanisms


def _model_configs(schedules, vocab_size: int, dim: int, layers: int, heads: int) -> dict[str, ModelConfig]:
    """A ModelConfig per schedule, each checked now (a causal LM is built once on CPU) so that a
    bad schedule fails before any training."""
    if schedules is None:
        raise ValueError("schedules must be a dict {name: mechanisms}, got None")
    if not isinstance(schedules, Mapping):
        raise TypeError(f"schedules must be a dict {{name: mechanisms}}, got {type(schedules).__name__}")
    if not schedules:
        raise ValueError("schedules is empty: give at least one {name: mechanisms}")
    configs = {}
    for name, mechanisms in schedules.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"schedule names must be non-empty strings, got {name!r}")
        cfg = ModelConfig(vocab_size=vocab_size, dim=dim, num_layers=layers, num_heads=heads,
                          mechanisms=list(mechanisms) if isinstance(mechanisms, tuple) else mechanisms)
        try:
            SparseCausalLM(cfg)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"schedule {name!r}: {exc}") from None
        configs[name] = cfg
    return configs


def _check_common(dim, layers, heads, batch, steps, lr, weight_decay, device, dtype):
    dim = check_int("dim", dim, 1)
    layers = check_int("layers", layers, 1)
    heads = check_int("heads", heads, 1)
    if dim % heads:
        raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
    if (dim // heads) % 2:
        raise ValueError(f"dim // heads must be even for rotary embeddings, got {dim} // {heads} = {dim // heads}")
    batch = check_int("batch", batch, 1)
    steps = check_int("steps", steps, 1)
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr > 0:
        raise ValueError(f"lr must be a number > 0, got {lr!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must name a torch device, got {device!r} ({exc})") from None
    return dim, layers, heads, batch, steps, float(lr), float(weight_decay)


def _train_config(seq_len, batch, steps, lr, weight_decay, seed, device, dtype) -> TrainConfig:
    return TrainConfig(seq_len=seq_len, batch_size=batch, steps=steps, lr=lr, min_lr=lr / 10,
                       lr_warmup=max(1, min(50, steps // 10)), weight_decay=weight_decay, grad_clip=1.0,
                       eval_every=steps, seed=seed, device=str(device), dtype=dtype)


def _seed(*parts: int) -> int:
    """A non-negative int seed from ints (a polynomial hash, deterministic across runs)."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p) + 1) % (1 << 61)
    return h


_INITS = ("fan_in", "scaled", "model")


def _check_init(init) -> str:
    if init not in _INITS:
        raise ValueError(f"init must be one of {', '.join(map(repr, _INITS))}, got {init!r}")
    return init


def scaled_init_(model: torch.nn.Module, *, embedding: str = "fan_in") -> torch.nn.Module:
    """Re-initialise in place for the width: every Linear weight N(0, 1 / fan_in), and every
    Embedding N(0, 1 / dim) (`embedding="fan_in"`: the LM's embedding is also its tied output
    head, a map of fan-in dim) or N(0, 1) (`embedding="unit"`). Returns the model.

    The models' own init (N(0, 0.02), GPT-2's, made for width 768) is about 6x too small at
    width 64: attention scores start near 0, attention stays uniform and the retrieval circuit
    of these tasks forms late (MQAR at width 64 had not formed after 3000 steps; with this
    init it forms in 300 to 600). A unit-variance embedding under a tied head starts the logits
    at a standard deviation of ~sqrt(dim): harmless with a vocabulary of 64, but at 8,192 tokens
    no model left the loss plateau (MQAR on the GPU, mean loss 28.6 over the first 80 steps),
    while with N(0, 1 / dim) a width-64 dense model learnt MQAR over 8,192 tokens in 600 steps."""
    if embedding not in ("fan_in", "unit"):
        raise ValueError(f"embedding must be 'fan_in' or 'unit', got {embedding!r}")
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=module.in_features ** -0.5)
        elif isinstance(module, torch.nn.Embedding):
            std = module.embedding_dim ** -0.5 if embedding == "fan_in" else 1.0
            torch.nn.init.normal_(module.weight, std=std)
    return model


def _set_backend(model: SparseCausalLM, backend: str) -> None:
    """Run the pattern layers on `backend` (the kernelized ones have one implementation)."""
    for block in model.blocks:
        m = block.attn.mechanism
        if isinstance(m, Pattern) or (isinstance(m, Mechanism) and m.kind == PATTERN):
            block.attn.backend = backend


def _train(model_cfg: ModelConfig, cfg: TrainConfig, batch_fn, loss_fn, *, label: str, show: bool, init: str,
           backend: str, run: _Checkpoints):
    """Train a fresh SparseCausalLM on `train.loop.TrainLoop`: batch_fn(step) -> batch (tensors
    on the device), loss_fn(model, batch) -> scalar loss. Returns (model, training record, loop
    result); the loop may stop early (run.max_minutes), checkpointed in run.directory."""
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = SparseCausalLM(model_cfg)
    if init != "model":
        scaled_init_(model, embedding="fan_in" if init == "fan_in" else "unit")
    _set_backend(model, backend)
    model = model.to(device)
    optimizer = adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    path = run.path(label)
    settings = {"model_config": model_cfg.to_dict(), "train_config": asdict(cfg), "init": init, "backend": backend}

    def check_resume(ckpt):
        saved = {k: ckpt.get(k) for k in settings}
        if saved != settings:
            raise ValueError(f"checkpoint {path} was made with other settings: {saved}")

    resume = run.resume and path is not None and path.is_file()
    loop = TrainLoop(model, optimizer, steps=cfg.steps, batches=batch_fn, loss=loss_fn,
                     lr=lambda step: lr_at(step, cfg), grad_clip=cfg.grad_clip, device=device, dtype=cfg.dtype,
                     meta=settings, check_resume=check_resume, checkpoint=path, resume=resume,
                     checkpoint_every=run.every if path is not None else None,
                     checkpoint_minutes=run.minutes if path is not None else None,
                     max_minutes=run.minutes_left(), progress=show, label=label)
    result = loop.run()
    model.eval()
    losses = [h["train_loss"] for h in result.history]
    every = max(1, cfg.steps // 50)
    curve = [[i + 1, sum(losses[max(0, i + 1 - every): i + 1]) / len(losses[max(0, i + 1 - every): i + 1])]
             for i in range(len(losses)) if (i + 1) % every == 0 or i + 1 == cfg.steps]
    tail = losses[-max(1, cfg.steps // 10):]  # empty when a time budget stopped the run before its first step
    return model, {"seconds": result.train_seconds, "parameters": sum(p.numel() for p in model.parameters()),
                   "final_loss": sum(tail) / len(tail) if tail else None, "loss_curve": curve}, result


@dataclass
class _Checkpoints:
    """Where and how often the experiments checkpoint each schedule's training, and the time
    budget of the whole experiment (see `passkey_experiment`)."""

    directory: str | os.PathLike | None = None
    resume: bool = False
    every: int | None = None
    minutes: float | None = None
    max_minutes: float | None = None
    began: float = field(default_factory=time.monotonic)

    def __post_init__(self):
        check_bool("resume", self.resume)
        if self.directory is None and (self.resume or self.every is not None or self.minutes is not None):
            raise ValueError("resume, checkpoint_every and checkpoint_minutes need checkpoint= (a directory)")
        if self.directory is not None:
            Path(self.directory).mkdir(parents=True, exist_ok=True)

    def path(self, label: str) -> Path | None:
        if self.directory is None:
            return None
        return Path(self.directory) / (re.sub(r"[^A-Za-z0-9_.-]+", "_", label) + ".pt")

    def minutes_left(self) -> float | None:
        if self.max_minutes is None:
            return None
        return max(1e-9, self.max_minutes - (time.monotonic() - self.began) / 60)


def _chunk_logits(model, tokens: torch.Tensor, chunk: int, cfg: TrainConfig):
    """The model's logits of `tokens`, `chunk` rows at a time, on its device (no grad)."""
    for part in tokens.split(chunk):
        with torch.no_grad(), autocast(cfg.device, cfg.dtype):
            logits = model(part.to(cfg.device))
        yield logits  # outside the contexts: the caller's code between chunks runs in its own modes


def _logits(model, tokens: torch.Tensor, chunk: int, cfg: TrainConfig) -> torch.Tensor:
    return torch.cat([logits.float().cpu() for logits in _chunk_logits(model, tokens, chunk, cfg)])


# -------------------------------------------------------------------------- metrics
def _check_logits(logits, name="logits") -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not logits.dtype.is_floating_point:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{name} must be a float tensor (batch, length, vocab), got {shape}")


def _answer_slice(logits: torch.Tensor, length: int, answer_start: int, digits: int) -> torch.Tensor:
    """[N, D, V]: the logits predicting the answer digits (position t predicts token t + 1)."""
    if logits.shape[1] not in (length - 1, length):
        raise ValueError(f"logits must cover the sequence (length {length}: model(tokens) or model(tokens[:, :-1])), "
                         f"got length {logits.shape[1]}")
    return logits[:, answer_start - 1: answer_start - 1 + digits]


def passkey_loss(logits: torch.Tensor, tokens: torch.Tensor, answer_start: int, *,
                 lm_weight: float = 0.0) -> torch.Tensor:
    """Next-token cross-entropy on the answer digits (mean over digits and rows), plus
    `lm_weight` times the mean next-token cross-entropy over every position.

    logits: [N, L-1, V] from `model(tokens[:, :-1])` (or [N, L, V] from `model(tokens)`: the
    last position, which predicts nothing, is ignored); tokens: [N, L]; the answer is
    `tokens[:, answer_start:]`. With lm_weight=0 only the answer positions get a gradient.
    """
    _check_logits(logits)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point:
        raise ValueError(f"tokens must be an integer tensor (batch, length), got "
                         f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
    n, length = tokens.shape
    answer_start = check_int("answer_start", answer_start, 1, length - 1)
    if logits.shape[0] != n:
        raise ValueError(f"logits has {logits.shape[0]} rows but tokens has {n}")
    _answer_slice(logits, length, answer_start, length - answer_start)  # checks the length
    if isinstance(lm_weight, bool) or not isinstance(lm_weight, numbers.Real) or lm_weight < 0:
        raise ValueError(f"lm_weight must be a number >= 0, got {lm_weight!r}")
    logits = logits[:, : length - 1].float()  # [N, L-1, V]: position t predicts token t + 1
    targets = tokens[:, 1:]
    answer = F.cross_entropy(logits[:, answer_start - 1:].flatten(0, 1), targets[:, answer_start - 1:].flatten())
    if lm_weight == 0:
        return answer
    return answer + lm_weight * F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def passkey_accuracy(logits: torch.Tensor, answer: torch.Tensor,
                     answer_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact [N] bool, per digit [N, D] bool): argmax of the logits at the answer positions
    (teacher forced) against `answer` [N, D]. Exact match here equals greedy decoding's.

    logits: [N, L-1, V] or [N, L, V] over the whole sequence of length L = answer_start + D
    (position t predicts token t + 1)."""
    _check_logits(logits)
    if not isinstance(answer, torch.Tensor) or answer.dim() != 2 or answer.dtype.is_floating_point:
        raise ValueError("answer must be an integer tensor (batch, digits)")
    n, digits = answer.shape
    if logits.shape[0] != n:
        raise ValueError(f"logits has {logits.shape[0]} rows but answer has {n}")
    answer_start = check_int("answer_start", answer_start, 1)
    pred = _answer_slice(logits, answer_start + digits, answer_start, digits).argmax(-1)  # [N, D]
    per_digit = pred == answer.to(pred.device)
    return per_digit.all(1), per_digit


def mqar_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, labelled): query positions (labels != -100) whose argmax is the label.
    logits [N, L, V] from `model(inputs)`; labels [N, L] (already shifted, as `mqar_dataset`
    makes them: the label at t is the target of the output at t)."""
    _check_logits(logits)
    if not isinstance(labels, torch.Tensor) or labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:2])} (logits' batch, length), got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    mask = labels != MQAR_IGNORE_INDEX
    correct = (logits.argmax(-1) == labels.to(logits.device)) & mask.to(logits.device)
    return int(correct.sum()), int(mask.sum())


# --------------------------------------------------------------------------- passkey
@dataclass
class PasskeyResult:
    """What `passkey_experiment` measured. Lists run over `lengths` (and `depths`)."""

    settings: dict
    schedules: dict[str, Any]  # name -> mechanisms (JSON form)
    lengths: list[int]
    depths: list[float]
    accuracy: dict[str, list[float]] = field(default_factory=dict)  # exact match, per length
    digit_accuracy: dict[str, list[float]] = field(default_factory=dict)  # per length
    depth_accuracy: dict[str, list[list[float]]] = field(default_factory=dict)  # [length][depth]
    reach: dict[str, list[dict]] = field(default_factory=dict)  # per length: span, farthest_back, key_reachable
    training: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    unfinished: dict[str, int] = field(default_factory=dict)  # schedule -> steps done, when max_minutes stopped it

    def to_dict(self) -> dict:
        return {"task": "passkey", "settings": self.settings, "schedules": self.schedules, "lengths": self.lengths,
                "depths": self.depths, "accuracy": self.accuracy, "digit_accuracy": self.digit_accuracy,
                "depth_accuracy": self.depth_accuracy, "reach": self.reach, "training": self.training,
                "seconds": self.seconds, "unfinished": self.unfinished}

    @classmethod
    def from_dict(cls, data: Mapping) -> PasskeyResult:
        """The result back from `to_dict()` (e.g. read from JSON, to plot it again)."""
        return cls(**{k: data[k] for k in ("settings", "schedules", "lengths", "depths", "accuracy", "digit_accuracy",
                                           "depth_accuracy", "reach", "training", "seconds")},
                   unfinished=dict(data.get("unfinished", {})))

    def summary(self) -> str:
        s = self.settings
        lines = [(f"passkey: trained at {s['train_length']} bytes, {s['steps']} steps, dim {s['dim']}, "
                 f"{s['layers']} layers, {s['heads']} heads, {s['digits']}-digit keys; "
                 f"{s['test_examples']} test sequences per (length, depth)")]
        width = max(len(n) for n in self.schedules) + 2
        head = "".ljust(width) + "".join(f"{n:>10}" for n in self.lengths)
        for title, table, fmt in (("exact-match accuracy", self.accuracy, "{:>10.2f}"),
                                  ("per-digit accuracy", self.digit_accuracy, "{:>10.2f}")):
            lines += ["", title, head]
            lines += [name.ljust(width) + "".join(fmt.format(v) for v in row) for name, row in table.items()]
        lines += ["", ("reach of the first answer position at the model's depth: span (every position "
                  "this far back) / key reachable (fraction of test sequences)"), head]
        for name, rows in self.reach.items():
            lines.append(name.ljust(width) + "".join(f"{r['span']:>5}/{r['key_reachable']:.2f}" for r in rows))
        lines += ["", "exact-match accuracy by key depth (0 = key at the start, 1 = just before the question)"]
        for li, length in enumerate(self.lengths):
            lines.append(f"  length {length}: depths " + " ".join(f"{d:g}" for d in self.depths))
            for name, per in self.depth_accuracy.items():
                lines.append("    " + name.ljust(width) + " ".join(f"{v:.2f}" for v in per[li]))
        lines += ["", "training: " + ", ".join(f"{n} {t['seconds']:.0f} s (final loss {t['final_loss']:.3f})"
                                               for n, t in self.training.items())]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _digit_positions(tokens: torch.Tensor, answer_start: int, digits: int) -> torch.Tensor:
    """[N, 2, D]: positions of the key's two copies in the key line (the only digits before the
    answer: the instructions, filler and question have none)."""
    prompt = tokens[:, :answer_start]
    is_digit = (prompt >= _DIGIT_LO) & (prompt <= _DIGIT_HI)
    counts = is_digit.sum(1)
    if not bool((counts == 2 * digits).all()):
        raise RuntimeError(f"expected {2 * digits} digits before the answer, found {counts.tolist()}")
    pos = is_digit.nonzero()[:, 1].view(tokens.shape[0], 2, digits)
    return pos


def _passkey_reach(model_cfg: ModelConfig, length: int, digits: int, batches: list) -> dict:
    answer_start = length - digits
    queries = torch.arange(answer_start - 1, length - 1)  # the positions predicting the digits
    rf = receptive_field(model_cfg, length, queries=queries)
    rows = rf.reach(None, queries)  # [D, L] bool
    first = int(queries[0])
    unreached = (~rows[0, : first + 1]).nonzero()
    span = first if unreached.numel() == 0 else first - int(unreached.max()) - 1
    by_depth = []
    for batch in batches:
        pos = _digit_positions(batch.tokens, answer_start, digits)  # [N, 2, D]
        d_idx = torch.arange(digits)[None, None, :].expand_as(pos)
        ok = rows[d_idx, pos]  # [N, 2, D]: answer position i reaches copy c of digit i
        by_depth.append(float(ok.any(1).all(1).float().mean()))
    return {"span": span, "farthest_back": int(rf.farthest_back[-1, 0]),
            "key_reachable": sum(by_depth) / len(by_depth), "key_reachable_by_depth": by_depth,
            "upper_bound": rf.upper_bound}


def passkey_experiment(schedules: Mapping[str, Any] | None = None, train_length: int = 384,
                       test_lengths: Sequence[int] = (384, 768, 1536), *, steps: int = 300, dim: int = 64,
                       layers: int = 2, heads: int = 4, batch: int = 16, lr: float = 3e-3, digits: int = 1,
                       lm_weight: float = 0.0, window: int = 32,
                       depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), test_examples: int = 32,
                       weight_decay: float = 0.0, seed: int = 0, device: str = "cpu", dtype: str = "float32",
                       init: str = "fan_in", backend: str = "auto", progress: bool = True,
                       checkpoint: str | os.PathLike | None = None, resume: bool = False,
                       checkpoint_every: int | None = None, checkpoint_minutes: float | None = None,
                       max_minutes: float | None = None) -> PasskeyResult:
    """Train one byte-level `SparseCausalLM` per schedule on passkey retrieval at
    `train_length`, then test at each of `test_lengths` (see the module docstring).

    schedules: {name: mechanisms}; None gives `default_schedules(layers, window)`.
    steps, batch, lr, weight_decay: AdamW with warm-up and cosine decay to lr / 10.
    digits: passkey digits (1 by default: a width-64 model finds one digit in about 200
        steps, while copying five needs an induction circuit (the digit that followed the one
        just written) that it had not formed after 500 steps).
    lm_weight: weight of the all-position next-token loss beside the answer loss (0 by
        default: with 0.1, tried with the models' own init, they first memorised the fixed
        filler text and found the key later or not at all within 300 steps).
    depths: key depths of the test sets (share of filler before the key); test_examples per
        (length, depth). Test lengths beyond train_length exercise RoPE extrapolation.
    dtype: "float32", or "bfloat16" autocast (CUDA).
    init: "fan_in" (`scaled_init_`, the default), "scaled" (`scaled_init_(embedding="unit")`,
        this module's earlier default, kept to reproduce results made with it) or "model"
        (the model's own N(0, 0.02)).
    backend: block backend of the pattern layers ("auto"; "reference" is faster on CPU for
        sequences of a few hundred tokens or less, same results).
    progress: tqdm bars when installed.
    checkpoint: a directory; each schedule's training is checkpointed there (`<task>_<name>.pt`)
        at the end and every `checkpoint_every` steps / `checkpoint_minutes` minutes. With
        resume=True a schedule whose file exists continues from it (a finished one is not
        trained again; its test is rerun, deterministic).
    max_minutes: a time budget for the whole experiment: training stops cleanly (checkpointed)
        before it runs out; schedules not finished are listed in `result.unfinished` (name ->
        steps done) and left out of the tables, for a later call with resume=True.
    """
    dim, layers, heads, batch, steps, lr, weight_decay = _check_common(dim, layers, heads, batch, steps, lr,
                                                                       weight_decay, device, dtype)
    digits = check_int("digits", digits, 1, 18)
    minimum = passkey_min_length(digits)
    train_length = check_int("train_length", train_length, minimum)
    if isinstance(test_lengths, (str, bytes)) or not isinstance(test_lengths, Sequence) or not test_lengths:
        raise ValueError(f"test_lengths must be a non-empty sequence of ints, got {test_lengths!r}")
    lengths = [check_int("test_lengths entry", n, minimum) for n in test_lengths]
    if isinstance(depths, (str, bytes)) or not isinstance(depths, Sequence) or not depths:
        raise ValueError(f"depths must be a non-empty sequence of floats in [0, 1], got {depths!r}")
    depth_list = [check_fraction("depths entry", d) for d in depths]
    test_examples = check_int("test_examples", test_examples, 1)
    seed = check_int("seed", seed, 0)
    init = _check_init(init)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if isinstance(lm_weight, bool) or not isinstance(lm_weight, numbers.Real) or lm_weight < 0:
        raise ValueError(f"lm_weight must be a number >= 0, got {lm_weight!r}")
    lm_weight = float(lm_weight)
    if schedules is None:
        schedules = default_schedules(layers, window)
    configs = _model_configs(schedules, 256, dim, layers, heads)
    cfg = _train_config(train_length, batch, steps, lr, weight_decay, seed, device, dtype)
    run = _Checkpoints(checkpoint, resume, checkpoint_every, checkpoint_minutes, max_minutes)

    began = time.perf_counter()
    tests = {n: [passkey_batch(test_examples, n, depth=d, digits=digits, seed=_seed(seed, 2, n, i))
                 for i, d in enumerate(depth_list)] for n in lengths}
    result = PasskeyResult(
        settings={"train_length": train_length, "test_lengths": lengths, "steps": steps, "dim": dim, "layers": layers,
                  "heads": heads, "batch": batch, "lr": lr, "min_lr": cfg.min_lr, "lr_warmup": cfg.lr_warmup,
                  "weight_decay": weight_decay, "digits": digits, "lm_weight": lm_weight, "depths": depth_list,
                  "test_examples": test_examples, "seed": seed, "device": str(device), "dtype": dtype,
                  "init": init, "backend": backend, "train_depth": "random per example (passkey_batch depth=None)",
                  "metric": "exact match of all digits, argmax under teacher forcing (= greedy decoding)"},
        schedules={name: _jsonable(m) for name, m in schedules.items()}, lengths=lengths, depths=depth_list)

    def batch_fn(step):
        b = passkey_batch(batch, train_length, digits=digits, seed=_seed(seed, 1, step))
        return b.tokens.to(cfg.device), b.answer_start

    def loss_fn(model, b):
        tokens, answer_start = b
        return passkey_loss(model(tokens[:, :-1]), tokens, answer_start, lm_weight=lm_weight)

    for name, model_cfg in configs.items():
        model, record, loop = _train(model_cfg, cfg, batch_fn, loss_fn, label=f"passkey {name}", show=progress,
                                     init=init, backend=backend, run=run)
        if not loop.finished:  # the time budget ran out: checkpointed, the rest waits for a resume
            result.unfinished = {n: 0 for n in configs if n not in result.training} | {name: loop.step}
            break
        result.training[name] = record
        acc, dig, per_depth, reach = [], [], [], []
        for n in lengths:
            exact_d, digit_d = [], []
            for b in tests[n]:
                logits = _logits(model, b.tokens[:, :-1], batch, cfg)
                exact, per_digit = passkey_accuracy(logits, b.answer, b.answer_start)
                exact_d.append(float(exact.float().mean()))
                digit_d.append(float(per_digit.float().mean()))
            acc.append(sum(exact_d) / len(exact_d))
            dig.append(sum(digit_d) / len(digit_d))
            per_depth.append(exact_d)
            reach.append(_passkey_reach(model_cfg, n, digits, tests[n]))
        result.accuracy[name], result.digit_accuracy[name] = acc, dig
        result.depth_accuracy[name], result.reach[name] = per_depth, reach
        del model
    result.seconds = time.perf_counter() - began
    return result


# ------------------------------------------------------------------------------ MQAR
@dataclass
class MQARResult:
    """What `mqar_experiment` measured. Lists run over `num_kv_pairs`."""

    settings: dict
    schedules: dict[str, Any]
    num_kv_pairs: list[int]
    accuracy: dict[str, list[float]] = field(default_factory=dict)  # per pair count
    reach: dict[str, list[float]] = field(default_factory=dict)  # fraction of queries whose value is reachable
    training: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    unfinished: dict[str, int] = field(default_factory=dict)  # schedule -> steps done, when max_minutes stopped it

    def to_dict(self) -> dict:
        return {"task": "mqar", "settings": self.settings, "schedules": self.schedules,
                "num_kv_pairs": self.num_kv_pairs, "accuracy": self.accuracy, "reach": self.reach,
                "training": self.training, "seconds": self.seconds, "unfinished": self.unfinished}

    @classmethod
    def from_dict(cls, data: Mapping) -> MQARResult:
        """The result back from `to_dict()` (e.g. read from JSON, to plot it again)."""
        return cls(**{k: data[k] for k in ("settings", "schedules", "num_kv_pairs", "accuracy", "reach", "training",
                                           "seconds")}, unfinished=dict(data.get("unfinished", {})))

    def summary(self) -> str:
        s = self.settings
        lines = [(f"MQAR: sequence {s['seq_len']}, vocabulary {s['vocab_size']}, {s['steps']} steps, dim {s['dim']}, "
                 f"{s['layers']} layers, {s['heads']} heads; one model per schedule on mixed pair counts")]
        width = max(len(n) for n in self.schedules) + 2
        head = "pairs".ljust(width) + "".join(f"{p:>8}" for p in self.num_kv_pairs)
        for title, table in (("accuracy at query positions", self.accuracy),
                             ("queries whose value is reachable (upper bound)", self.reach)):
            lines += ["", title, head]
            lines += [name.ljust(width) + "".join(f"{v:>8.2f}" for v in row) for name, row in table.items()]
        lines += ["", "training: " + ", ".join(f"{n} {t['seconds']:.0f} s (final loss {t['final_loss']:.3f})"
                                               for n, t in self.training.items())]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _mqar_counts(model, data, chunk: int, cfg: TrainConfig) -> tuple[int, int]:
    """mqar_accuracy over `data` chunk by chunk on the model's device: the whole test set's logits
    would be [N, L, V] (1,000 x 256 x 8,192 floats = 8.4 GB per pair count at Zoology's size)."""
    correct = total = 0
    for logits, labels in zip(_chunk_logits(model, data.inputs, chunk, cfg), data.labels.split(chunk)):
        c, t = mqar_accuracy(logits, labels)
        correct, total = correct + c, total + t
    return correct, total


def _mqar_reach(model_cfg: ModelConfig, data, pairs: int) -> float:
    n = data.inputs.shape[1]
    reach = receptive_field(model_cfg, n, exact=True).matrix()  # [n, n]
    rows, cols = (data.labels != MQAR_IGNORE_INDEX).nonzero(as_tuple=True)
    keys = data.inputs[:, 0: 2 * pairs: 2]  # [N, pairs]
    j = (keys[rows] == data.inputs[rows, cols][:, None]).float().argmax(1)  # which pair is queried
    return float(reach[cols, 2 * j + 1].float().mean())


def mqar_experiment(schedules: Mapping[str, Any] | None = None, num_kv_pairs_list: Sequence[int] = (4, 8, 16), *,
                    seq_len: int = 64, vocab_size: int = 64, steps: int = 600, dim: int = 64, layers: int = 2,
                    heads: int = 4, batch: int = 48, lr: float = 3e-3, window: int = 8, power_a: float = 0.01,
                    test_examples: int = 256, weight_decay: float = 0.0, seed: int = 0, device: str = "cpu",
                    dtype: str = "float32", init: str = "fan_in", backend: str = "auto",
                    progress: bool = True, checkpoint: str | os.PathLike | None = None, resume: bool = False,
                    checkpoint_every: int | None = None, checkpoint_minutes: float | None = None,
                    max_minutes: float | None = None) -> MQARResult:
    """Train one `SparseCausalLM` per schedule on MQAR with the pair counts of
    `num_kv_pairs_list` mixed in every batch, then report accuracy per pair count (see the
    module docstring).

    schedules: {name: mechanisms}; None gives Zoology's layout, a short local layer first and
        the compared mechanisms after it: `default_schedules(layers, window,
        first="sliding_window:window=3")` (dense, sliding_window, streaming, linear; hybrid
        too with 3+ layers).
    seq_len, vocab_size, power_a: as `mqar_dataset` (every pair count must fit:
        4 * pairs <= seq_len, pairs < vocab_size // 2).
    steps, batch, lr, weight_decay, init, backend, dtype, progress, checkpoint, resume,
    checkpoint_every, checkpoint_minutes, max_minutes: as `passkey_experiment`.
    """
    dim, layers, heads, batch, steps, lr, weight_decay = _check_common(dim, layers, heads, batch, steps, lr,
                                                                       weight_decay, device, dtype)
    if isinstance(num_kv_pairs_list, (str, bytes)) or not isinstance(num_kv_pairs_list, Sequence) \
            or not num_kv_pairs_list:
        raise ValueError(f"num_kv_pairs_list must be a non-empty sequence of ints, got {num_kv_pairs_list!r}")
    pair_counts = [check_int("num_kv_pairs_list entry", p, 1) for p in num_kv_pairs_list]
    if batch < len(pair_counts):
        raise ValueError(f"batch ({batch}) must be >= len(num_kv_pairs_list) ({len(pair_counts)}): every batch "
                         "holds every pair count")
    test_examples = check_int("test_examples", test_examples, 1)
    seed = check_int("seed", seed, 0)
    init = _check_init(init)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    seq_len = check_int("seq_len", seq_len, 2)
    vocab_size = check_int("vocab_size", vocab_size, 2)
    tests = {p: mqar_dataset(test_examples, vocab_size=vocab_size, input_seq_len=seq_len, num_kv_pairs=p,
                             power_a=power_a, seed=_seed(seed, 4, p)) for p in pair_counts}  # also checks them
    schedules_default = schedules is None
    if schedules_default:
        schedules = default_schedules(layers, window, first=MQAR_FIRST_LAYER)
    configs = _model_configs(schedules, vocab_size, dim, layers, heads)
    cfg = _train_config(seq_len, batch, steps, lr, weight_decay, seed, device, dtype)
    run = _Checkpoints(checkpoint, resume, checkpoint_every, checkpoint_minutes, max_minutes)
    rows_per = [batch // len(pair_counts) + (i < batch % len(pair_counts)) for i in range(len(pair_counts))]

    began = time.perf_counter()
    result = MQARResult(
        settings={"seq_len": seq_len, "vocab_size": vocab_size, "num_kv_pairs": pair_counts, "steps": steps,
                  "dim": dim, "layers": layers, "heads": heads, "batch": batch, "rows_per_pair_count": rows_per,
                  "lr": lr, "min_lr": cfg.min_lr, "lr_warmup": cfg.lr_warmup, "weight_decay": weight_decay,
                  "power_a": power_a, "test_examples": test_examples, "seed": seed, "device": str(device),
                  "dtype": dtype, "init": init, "backend": backend,
                  "training_mix": "every batch holds every pair count (Zoology-style mixed training)",
                  "first_layer": MQAR_FIRST_LAYER if schedules_default else None},
        schedules={name: _jsonable(m) for name, m in schedules.items()}, num_kv_pairs=pair_counts)

    def batch_fn(step):
        parts = [mqar_dataset(r, vocab_size=vocab_size, input_seq_len=seq_len, num_kv_pairs=p, power_a=power_a,
                              seed=_seed(seed, 3, step, i)) for i, (p, r) in enumerate(zip(pair_counts, rows_per))]
        return (torch.cat([d.inputs for d in parts]).to(cfg.device),
                torch.cat([d.labels for d in parts]).to(cfg.device))

    def loss_fn(model, b):
        inputs, labels = b
        logits = model(inputs)
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=MQAR_IGNORE_INDEX)

    for name, model_cfg in configs.items():
        model, record, loop = _train(model_cfg, cfg, batch_fn, loss_fn, label=f"mqar {name}", show=progress,
                                     init=init, backend=backend, run=run)
        if not loop.finished:  # the time budget ran out: checkpointed, the rest waits for a resume
            result.unfinished = {n: 0 for n in configs if n not in result.training} | {name: loop.step}
            break
        result.training[name] = record
        acc, reach = [], []
        for p in pair_counts:
            data = tests[p]
            correct, total = _mqar_counts(model, data, batch, cfg)
            acc.append(correct / total)
            reach.append(_mqar_reach(model_cfg, data, p))
        result.accuracy[name], result.reach[name] = acc, reach
        del model
    result.seconds = time.perf_counter() - began
    return result


# ---------------------------------------------------------------------------- plots
def _check_result(result, kind, name):
    if not isinstance(result, kind):
        raise TypeError(f"result must be a {kind.__name__} (from {name}), got {type(result).__name__}")


_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _style(i: int) -> dict:
    """Line style of the i-th schedule, the same in every recall plot."""
    return {"color": f"C{i % 10}", "marker": _MARKERS[i % len(_MARKERS)], "markersize": 7 - i % 3, "alpha": 0.85}


def _accuracy_axis(ax, xlabel: str, ylabel: str, ticks: Sequence[int] | None = None) -> None:
    """Accuracy in [0, 1] against `xlabel`; `ticks`: a log2 x axis labelled at these values."""
    if ticks is not None:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)


def plot_passkey(result: PasskeyResult, path) -> None:
    """Exact-match accuracy against test length, one line per schedule (dashed: the reach
    bound, the fraction of test sequences whose key the answer can reach), and accuracy
    against key depth at the first test length. Needs matplotlib (the `viz` extra)."""
    _check_result(result, PasskeyResult, "passkey_experiment")
    fig = figure(figsize=(11, 4.2), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    for i, name in enumerate(result.accuracy):
        style = _style(i)
        ax.plot(result.lengths, result.accuracy[name], label=name, **style)
        ax.plot(result.lengths, [r["key_reachable"] for r in result.reach[name]], ls="--", lw=1,
                color=style["color"], alpha=0.6)
        ax2.plot(result.depths, result.depth_accuracy[name][0], label=name, **style)
    chance = 1 / (9 * 10 ** (result.settings["digits"] - 1))  # first digit non-zero
    for a in (ax, ax2):
        a.axhline(chance, color="gray", ls="-.", lw=0.8)
    ax.axvline(result.settings["train_length"], color="gray", ls=":", lw=1)
    _accuracy_axis(ax, "test length (bytes); dotted: train length, dash-dot: chance",
                   "exact-match accuracy (dashed: key reachable)", ticks=result.lengths)
    ax.legend(fontsize=8)
    _accuracy_axis(ax2, "key depth (0 = start of the filler, 1 = just before the question)",
                   f"exact-match accuracy at length {result.lengths[0]}")
    s = result.settings
    fig.suptitle(f"passkey retrieval ({s['digits']}-digit key): trained at {s['train_length']} bytes, "
                 f"{s['steps']} steps, dim {s['dim']}, {s['layers']} layers", fontsize=10)
    fig.savefig(path, dpi=110)


def plot_mqar(result: MQARResult, path) -> None:
    """Accuracy at the query positions against the number of key-value pairs, one line per
    schedule (dashed: queries whose value is reachable). Needs matplotlib (the `viz` extra)."""
    _check_result(result, MQARResult, "mqar_experiment")
    fig = figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    for i, name in enumerate(result.accuracy):
        style = _style(i)
        ax.plot(result.num_kv_pairs, result.accuracy[name], label=name, **style)
        ax.plot(result.num_kv_pairs, result.reach[name], ls="--", lw=1, color=style["color"], alpha=0.6)
    _accuracy_axis(ax, "key-value pairs", "accuracy (dashed: value reachable)", ticks=result.num_kv_pairs)
    ax.legend(fontsize=8)
    s = result.settings
    fig.suptitle(f"MQAR: sequence {s['seq_len']}, vocabulary {s['vocab_size']}, {s['steps']} steps, "
                 f"dim {s['dim']}, {s['layers']} layers", fontsize=10)
    fig.savefig(path, dpi=110)
