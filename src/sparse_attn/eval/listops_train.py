"""Train encoders that differ only in their attention on ListOps (LRA, Tay et al. 2021), and
compare their accuracy, as LRA's ListOps column does.

    result = train_listops(listops_mechanisms(window=32, block=16), train_examples=4000,
                           val_examples=500, test_examples=500, min_length=50, max_length=200,
                           dim=64, layers=2, heads=4, mlp_ratio=2.0, batch=32, steps=400, lr=1e-3,
                           warmup=40, weight_decay=0.1, eval_every=100, seed=0, device="cpu",
                           dtype="float32")
    print(result.summary())
    plot_listops(result, "listops.png")

The model is `nn.SparseTransformer` (pre-norm blocks, rotary positions, mean pooling over the
sequence, a linear head over the 10 values) on `listops_dataset(..., prepend_cls=True)`: every
sequence starts with `<cls>`, which Longformer's preset here makes its one global token.

Padding. `SparseTransformer` masks padding only in its pooling: its attention (every
mechanism here) lets real queries attend to padded keys, so a padded example would get other
logits than the same example alone, and how much depends on the batch it lands in (BigBird's
last global block, LSH buckets and kernel sums would all take the padding in). The attention
API has no per-example key mask to fix that with, so nothing padded ever reaches the model:
`listops_logits` splits a padded batch into groups of equal length and runs each group cut to
its length. Every example's logits are then exactly those of the example alone (tested in
float64), for every mechanism. The cost is one forward call per distinct length in a batch,
kept low by bucketing: each epoch is shuffled, sorted by length within chunks of
`sort_chunk` examples (default: the whole epoch, so a batch spans one or a few lengths), cut
into batches, and the batches are shuffled.

Reproducible by construction, as `train.lm`: the batches of step s come from (seed, epoch),
dropout and any random draws of a step from (seed, s), the initial weights from `seed`, so a run
resumed from its checkpoint ends as the uninterrupted run would (tested on CPU). The random
features of Performer and the LSH rotations are fixed by a seed in `listops_mechanisms`, so
evaluation is deterministic.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._extras import figure, progress
from ..nn import ModelConfig, SparseTransformer
from .._checks import check_bool, check_int
from ..patterns import layout_cache
from ..train.lm import TrainConfig, lr_at
from ..train.loop import TrainLoop, adamw, autocast, read_checkpoint
from .tasks.listops import (
    LISTOPS_SPLIT_SIZES,
    LISTOPS_VOCAB,
    ListOpsData,
    listops_dataset,
)

__all__ = [
    "LRA_LISTOPS_ACCURACY",
    "LRA_LISTOPS_NAMES",
    "ListOpsResult",
    "ListOpsRun",
    "evaluate_listops_model",
    "listops_logits",
    "listops_mechanisms",
    "load_listops_splits",
    "plot_listops",
    "train_listops",
]

NUM_CLASSES = 10
LAYOUT_CACHE_SPARE = 32  # layouts kept per pattern beyond one per ListOps length (others' lengths)

# LRA's ListOps test accuracy (%), Tay et al. 2021 ("Long Range Arena", ICLR 2021), Table 1.
# Their setting: 96K training trees of 500 < length < 2000, a 6-layer, 512-wide encoder with 8
# heads, batch 32 for 5000 steps, [CLS] pooling. Majority class is about 17%.
LRA_LISTOPS_ACCURACY = {
    "Transformer": 36.37,
    "Local Attention": 15.82,
    "Sparse Transformer": 17.07,
    "Longformer": 35.63,
    "Reformer": 37.27,
    "BigBird": 36.05,
    "Linear Transformer": 16.13,
    "Performer": 18.01,
}

# Our mechanism names (`listops_mechanisms`) -> the LRA row they stand for.
LRA_LISTOPS_NAMES = {
    "dense": "Transformer",
    "sliding_window": "Local Attention",
    "strided": "Sparse Transformer",
    "longformer": "Longformer",
    "bigbird": "BigBird",
    "linear": "Linear Transformer",
    "performer": "Performer",
    "lsh": "Reformer",
}


# Settings of `benchmarks/listops.py --preset` and `sparse-attn eval listops --preset` (the
# benchmark's docstring says how they were chosen); "mechanisms" are `listops_mechanisms` arguments.
LISTOPS_PRESETS = {
    "cpu": {"train_examples": 4000, "val_examples": 500, "test_examples": 500, "min_length": 20, "max_length": 100,
            "dim": 64, "layers": 2, "heads": 4, "mlp_ratio": 2.0, "batch": 32, "steps": 400, "lr": 3e-3,
            "warmup": 40, "weight_decay": 0.1, "eval_every": 50, "device": "cpu", "dtype": "float32",
            "mechanisms": {"window": 16, "block": 4, "num_features": 32, "bucket_size": 16, "n_hashes": 2}},
    "gpu": {"train_examples": 96_000, "val_examples": 2000, "test_examples": 2000, "min_length": 500,
            "max_length": 2000, "dim": 256, "layers": 4, "heads": 4, "mlp_ratio": 4.0, "batch": 32, "steps": 5000,
            "lr": 1e-4, "warmup": 1000, "weight_decay": 0.1, "eval_every": 500, "device": "cuda", "dtype": "bfloat16",
            "mechanisms": {"window": 256, "block": 64, "num_features": 128, "bucket_size": 64, "n_hashes": 2}},
}

def listops_mechanisms(*, window: int = 32, block: int = 16, num_features: int = 64, bucket_size: int = 32,
                       n_hashes: int = 2, seed: int = 0) -> dict[str, str]:
    """The seven encoders compared, as mechanism specs (non-causal everywhere):

    * dense: full attention (SDPA);
    * sliding_window: `window` // 2 keys on each side (LRA's "Local Attention");
    * longformer: the same window plus `<cls>` (position 0) as a global token;
    * bigbird: blocks of `block`: 3 window blocks, 2 global blocks (first, last), 3 random;
    * linear: elu+1 feature map (Katharopoulos et al.);
    * performer: FAVOR+ with `num_features` positive orthogonal features, fixed by `seed`;
    * lsh: Reformer LSH with buckets of `bucket_size`, `n_hashes` rounds, rotations fixed by `seed`.
    """
    for name, value in (("window", window), ("block", block), ("num_features", num_features),
                        ("bucket_size", bucket_size), ("n_hashes", n_hashes)):
        check_int(name, value, 1)
    check_int("seed", seed, minimum=0)
    return {
        "dense": "full",
        "sliding_window": f"sliding_window:window={window},causal=false",
        "longformer": f"longformer:window={window},global_tokens=1,causal=false",
        "bigbird": f"bigbird:block={block},num_window_blocks=3,num_global_blocks=2,num_random_blocks=3,seed={seed}",
        "linear": "linear:causal=false",
        "performer": f"performer:num_features={num_features},causal=false,generator={seed}",
        "lsh": f"lsh:bucket_size={bucket_size},n_hashes={n_hashes},causal=false,seed={seed}",
    }


# ---- exact logits of padded batches ------------------------------------------------------


def listops_logits(model: SparseTransformer, tokens: torch.Tensor, lengths: torch.Tensor, *,
                   max_batch: int | None = None, check_tokens: bool = True) -> torch.Tensor:
    """Logits (B, classes) of a padded batch, each row exactly as if it were run alone.

    tokens: (B, L) integer ids, each row's real tokens first; lengths: (B,) real tokens per row.
    Rows of equal length run together, cut to that length (at most `max_batch` rows per call),
    so no padding reaches the attention or the pooling. Differentiable. check_tokens: as in
    `SparseTransformer.classify` (False: the ids were validated before; no host read of tokens).
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point:
        raise ValueError(f"tokens must be an integer tensor (batch, length), got "
                         f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
    if not isinstance(lengths, torch.Tensor) or lengths.shape != tokens.shape[:1] or lengths.dtype.is_floating_point:
        raise ValueError(f"lengths must be an integer tensor of shape ({tokens.shape[0]},), got "
                         f"{tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__}")
    if max_batch is not None:
        check_int("max_batch", max_batch, 1)
    lengths = lengths.cpu()
    if tokens.shape[0] and not (1 <= int(lengths.min()) and int(lengths.max()) <= tokens.shape[1]):
        raise ValueError(f"lengths must be in [1, {tokens.shape[1]}] (the padded length), got "
                         f"{int(lengths.min())}..{int(lengths.max())}")
    order = torch.argsort(lengths, stable=True)
    sizes, counts = torch.unique_consecutive(lengths[order], return_counts=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    # the row order and its inverse in one copy to the device, with no stream synchronisation
    order_and_inverse = to_device_async(torch.cat([order, inverse]), tokens.device)
    order, inverse = order_and_inverse[:len(order)], order_and_inverse[len(order):]
    pieces = []
    for chunk_rows, size in zip(order.split(counts.tolist()), sizes.tolist()):
        for part in chunk_rows.split(max_batch or len(chunk_rows)):
            pieces.append(model.classify(tokens[part, :size], check_tokens=check_tokens))  # [b, C]: no padding
    logits = torch.cat(pieces)  # rows in order of length
    return logits[inverse]  # inverse is on the tokens' device already


def to_device_async(t: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor on `device` with no stream synchronisation: on CUDA through pinned memory
    (torch's caching host allocator keeps the block until the copy is done), so the host goes
    on preparing the next call while the device works."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _check_vocabulary(tokens: torch.Tensor, vocab_size: int, name: str = "data.tokens") -> None:
    """Every id of a split (a CPU tensor: no device read) in [0, vocab_size)."""
    if tokens.numel() and not (0 <= int(tokens.min()) and int(tokens.max()) < vocab_size):
        raise ValueError(f"{name} must be token ids in [0, {vocab_size}) (the model's vocab_size), got "
                         f"{int(tokens.min())}..{int(tokens.max())}")


@torch.no_grad()
def evaluate_listops_model(model: SparseTransformer, data: ListOpsData, *, batch: int = 64, device="cpu",
                           dtype: str = "float32") -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` on `data`, in batches of `batch` examples
    taken in order of length (so a batch holds few distinct lengths)."""
    check_int("batch", batch, 1)
    was_training = model.training
    model.eval()
    device = torch.device(device)
    order = torch.argsort(data.lengths, stable=True)
    _check_vocabulary(data.tokens, model.cfg.vocab_size)  # once here, not per call (host reads)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    for idx in order.split(batch):  # summed on the device: read back once, at the end
        lengths = data.lengths[idx]
        x = to_device_async(data.tokens[idx, : int(lengths.max())], device).long()
        y = to_device_async(data.labels[idx], device)
        with autocast(device, dtype):
            logits = listops_logits(model, x, lengths, check_tokens=False).float()
        correct += (logits.argmax(-1) == y).sum()
        loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    correct, loss = int(correct), float(loss)
    model.train(was_training)
    n = len(data.labels)
    return correct / n, loss / n


# ---- results ------------------------------------------------------------------------------


@dataclass
class ListOpsRun:
    """One mechanism's run. history: one entry per step (train_loss, train_accuracy, lr), with
    val_accuracy, val_loss and elapsed_s (training seconds so far) on evaluation steps."""

    name: str
    mechanism: str | list
    val_accuracy: float = math.nan
    test_accuracy: float = math.nan
    best_val_accuracy: float = math.nan
    best_val_step: int = 0
    parameters: int = 0
    train_seconds: float = 0.0  # optimizer steps only, summed over resumed sessions
    eval_seconds: float = 0.0
    steps_per_s: float = 0.0
    tokens_per_s: float = 0.0  # real (unpadded) training tokens per training second
    calls_per_step: float = 0.0  # mean forward calls per step (distinct lengths per batch)
    steps_done: int = 0  # optimizer steps trained; below the settings' steps when max_minutes stopped the run
    history: list[dict] = field(default_factory=list)

    def evals(self) -> list[tuple[int, float]]:
        return [(h["step"], h["val_accuracy"]) for h in self.history if "val_accuracy" in h]

    @property
    def finished(self) -> bool:
        """Trained to the end and tested (False when max_minutes stopped it first): only then is
        there a test accuracy."""
        return not math.isnan(self.test_accuracy)

    @property
    def lra_name(self) -> str | None:
        return LRA_LISTOPS_NAMES.get(self.name)


@dataclass
class ListOpsResult:
    """All mechanisms' runs on the same data, with the settings and the majority baseline."""

    settings: dict
    data: dict  # examples, lengths and label counts per split; majority class and its accuracy
    runs: dict[str, ListOpsRun] = field(default_factory=dict)

    @property
    def majority_accuracy(self) -> dict[str, float]:
        """Accuracy of always answering the training split's most frequent value, per split."""
        return self.data["majority_accuracy"]

    def to_dict(self) -> dict:
        return {"settings": self.settings, "data": self.data,
                "runs": {name: asdict(run) for name, run in self.runs.items()},
                "lra_reference": {"source": "Tay et al. 2021, Long Range Arena, Table 1 (ListOps test accuracy, %)",
                                  "accuracy": dict(LRA_LISTOPS_ACCURACY), "names": dict(LRA_LISTOPS_NAMES)}}

    @classmethod
    def from_dict(cls, data: Mapping) -> ListOpsResult:
        return cls(settings=dict(data["settings"]), data=dict(data["data"]),
                   runs={name: ListOpsRun(**run) for name, run in data["runs"].items()})

    def summary(self) -> str:
        """A Markdown table: accuracies (%) per mechanism, the majority baseline and LRA's."""
        s = self.settings
        maj = self.majority_accuracy
        header = (f"ListOps: {self.data['train']['examples']} train trees, {s['min_length']} < length < "
                  f"{s['max_length']}; dim {s['dim']}, {s['layers']} layers, {s['heads']} heads; batch {s['batch']}, "
                  f"{s['steps']} steps, lr {s['lr']}, {s['device']} {s['dtype']}")
        lines = [
            header,
            "",
            "| mechanism | val acc | test acc | best val (step) | LRA test acc | params | train s | steps/s | calls/step |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, run in self.runs.items():
            lra = LRA_LISTOPS_ACCURACY.get(run.lra_name or "")
            lines.append(
                f"| {name} | {100 * run.val_accuracy:.2f} | {100 * run.test_accuracy:.2f} | "
                f"{100 * run.best_val_accuracy:.2f} ({run.best_val_step}) | "
                f"{'-' if lra is None else f'{lra:.2f} ({run.lra_name})'} | {run.parameters:,} | "
                f"{run.train_seconds:.0f} | {run.steps_per_s:.2f} | {run.calls_per_step:.1f} |")
        lines.append(f"| majority class ({self.data['majority_class']}) | {100 * maj['val']:.2f} | "
                     f"{100 * maj['test']:.2f} | - | ~17 | - | - | - | - |")
        return "\n".join(lines)


# ---- training -----------------------------------------------------------------------------


def _split_stats(data: ListOpsData) -> dict:
    lengths = data.lengths.float()
    return {"examples": len(data.labels), "mean_length": float(lengths.mean()), "min_length": int(data.lengths.min()),
            "max_length": int(data.lengths.max()),
            "label_counts": torch.bincount(data.labels, minlength=NUM_CLASSES).tolist()}


def load_listops_splits(splits: dict[str, int], seed: int, min_length: int, max_length: int,
                        cache: str | os.PathLike | None, *, marks: Mapping[str, Mapping] | None = None,
                        workers: int = 1) -> dict[str, ListOpsData]:
    """The splits {name: examples} of `listops_dataset` (with `<cls>` prepended) that
    `train_listops` trains and tests on, read from the directory `cache` when it holds them and
    written there when not (None: generated every time). Tokens are kept as uint8 (17 ids) on
    the CPU; batches are widened and moved when used. `marks` {split: `listops_stream_marks`
    of that split} lets `workers` processes generate a split at once (the same examples,
    checked by digest)."""
    out = {}
    for split, n in splits.items():
        path = None
        if cache is not None:
            path = Path(cache) / f"listops_{split}_{n}_len{min_length}-{max_length}_seed{seed}.pt"
            if path.is_file():
                saved = torch.load(path, weights_only=True)
                out[split] = ListOpsData(saved["tokens"], saved["lengths"], saved["labels"])
                continue
        data = listops_dataset(split, n, seed=seed, min_length=min_length, max_length=max_length, prepend_cls=True,
                               marks=(marks or {}).get(split), workers=workers)
        data = ListOpsData(data.tokens.to(torch.uint8), data.lengths, data.labels)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            torch.save(data._asdict(), tmp)
            os.replace(tmp, path)
        out[split] = data
    return out


class SortedBatches:
    """Batch indices of step s: epoch e = s // per_epoch is a permutation drawn from (seed, e),
    stably sorted by length within chunks of `sort_chunk` examples, cut into full batches (the
    remainder of each chunk is left out of that epoch), the batches then shuffled."""

    def __init__(self, lengths: torch.Tensor, batch: int, sort_chunk: int, seed: int):
        self.lengths, self.batch, self.sort_chunk, self.seed = lengths, batch, sort_chunk, seed
        n = len(lengths)
        self.per_epoch = sum((min(sort_chunk, n - start)) // batch for start in range(0, n, sort_chunk))
        if self.per_epoch == 0:
            raise ValueError(f"sort_chunk ({sort_chunk}) and train_examples ({n}) must hold at least one batch "
                             f"of {batch}")
        self._epoch, self._plan = -1, []

    def __call__(self, step: int) -> torch.Tensor:
        epoch = step // self.per_epoch
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(len(self.lengths), generator=gen)
            batches = []
            for chunk in perm.split(self.sort_chunk):
                chunk = chunk[torch.argsort(self.lengths[chunk], stable=True)]
                usable = len(chunk) // self.batch * self.batch
                batches.extend(chunk[:usable].split(self.batch))
            order = torch.randperm(len(batches), generator=gen)
            self._epoch, self._plan = epoch, [batches[i] for i in order]
        return self._plan[step % self.per_epoch]


def _checkpoint_path(directory: str | os.PathLike, name: str) -> Path:
    return Path(directory) / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".pt")


def _mechanism_table(mechanisms) -> dict[str, str | list]:
    if isinstance(mechanisms, str):
        mechanisms = [mechanisms]
    if isinstance(mechanisms, Mapping):
        table = dict(mechanisms)
    elif isinstance(mechanisms, Sequence):
        table = {}
        for spec in mechanisms:
            if not isinstance(spec, str):
                raise TypeError(f"mechanisms given as a list must hold spec strings (or pass a dict name -> spec), "
                                f"got {type(spec).__name__}")
            table[spec] = spec
    else:
        raise TypeError(f"mechanisms must be a spec string, a list of specs or a dict name -> spec, got "
                        f"{type(mechanisms).__name__}")
    if not table:
        raise ValueError("mechanisms must name at least one mechanism")
    for name, spec in table.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"mechanism names must be non-empty strings, got {name!r}")
        if not isinstance(spec, (str, list)):
            raise TypeError(f"mechanism {name!r}: spec must be a string or a per-layer list of strings, got "
                            f"{type(spec).__name__}")
    return table


def train_listops(mechanisms, *, train_examples: int, val_examples: int, test_examples: int, min_length: int,
                  max_length: int, dim: int, layers: int, heads: int, mlp_ratio: float, batch: int, steps: int,
                  lr: float, warmup: int, weight_decay: float, eval_every: int, seed: int, device="cpu",
                  dtype: str = "float32", pooling: str = "mean", sort_chunk: int | None = None,
                  checkpoint: str | os.PathLike | None = None, resume: bool = False,
                  checkpoint_every: int | None = None, checkpoint_minutes: float | None = None,
                  max_minutes: float | None = None, data_cache: str | os.PathLike | None = None,
                  progress: bool = True) -> ListOpsResult:
    """Train one ListOps encoder per mechanism on the same data, and evaluate each.

    Args:
        mechanisms: a spec string, a list of spec strings, or a dict name -> spec (a spec may be
            a per-layer list); `listops_mechanisms()` gives the seven LRA-like ones.
        train_examples, val_examples, test_examples: split sizes (val and test at most 2000);
            the splits are disjoint, drawn from one stream seeded by `seed`.
        min_length, max_length: exclusive bounds on a tree's length (LRA: 500, 2000); each
            sequence is one token longer (`<cls>`).
        dim, layers, heads, mlp_ratio: the encoder (`nn.ModelConfig`); pooling "mean" (over the
            real tokens) or "first" (the `<cls>` position, as LRA).
        batch, steps, lr, warmup, weight_decay: AdamW (betas 0.9, 0.95, no decay on norms),
            linear warm-up for `warmup` steps then cosine decay to lr / 10, gradients clipped at 1.
        eval_every: validation accuracy every this many steps (and at the last one); test
            accuracy once, at the end (of the final model, as LRA reports).
        seed: data, initial weights, batch order and per-step randomness.
        device, dtype: "float32", or "bfloat16" autocast (weights stay float32).
        sort_chunk: examples sorted by length together before batching (None: the whole
            epoch, fewest forward calls per step; smaller chunks give more varied batches).
        checkpoint: a directory; each mechanism saves `<name>.pt` there at every evaluation.
            With resume=True, a mechanism whose file exists continues from it (a finished one
            is not rerun) and the others start afresh.
        data_cache: a directory to keep the generated splits in (the LRA-size training split
            takes minutes to generate); reused when the same split, size, lengths and seed are
            asked for again.
        progress: a progress bar per mechanism (tqdm, when installed).

    Returns a `ListOpsResult`: per mechanism, final and best validation accuracy, final test
    accuracy, history, timing and parameter count; the settings; the majority baseline.
    """
    began = time.monotonic()
    table = _mechanism_table(mechanisms)
    for name, value in (("train_examples", train_examples), ("val_examples", val_examples),
                        ("test_examples", test_examples), ("dim", dim), ("layers", layers), ("heads", heads),
                        ("batch", batch), ("steps", steps), ("eval_every", eval_every)):
        check_int(name, value, 1)
    check_int("warmup", warmup, minimum=0)
    check_int("seed", seed, minimum=0)
    for split, value in (("val", val_examples), ("test", test_examples)):
        if value > LISTOPS_SPLIT_SIZES[split]:
            raise ValueError(f"{split}_examples must be <= {LISTOPS_SPLIT_SIZES[split]} (LRA's split size), got {value}")
    for name, spec in table.items():  # unknown names and parameters fail here, before any data is made
        ModelConfig(vocab_size=len(LISTOPS_VOCAB), num_layers=layers, mechanisms=spec).layer_mechanisms()
    for name, value in (("mlp_ratio", mlp_ratio), ("lr", lr), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                value < 0 or (value == 0 and name != "weight_decay"):
            raise ValueError(f"{name} must be a {'number >= 0' if name == 'weight_decay' else 'number > 0'}, "
                             f"got {value!r}")
    if pooling not in ("mean", "first"):
        raise ValueError(f"pooling must be 'mean' or 'first', got {pooling!r}")
    if batch > train_examples:
        raise ValueError(f"batch ({batch}) must be <= train_examples ({train_examples})")
    sort_chunk = train_examples if sort_chunk is None else check_int("sort_chunk", sort_chunk, 1)
    if sort_chunk < batch:
        raise ValueError(f"sort_chunk ({sort_chunk}) must be >= batch ({batch})")
    check_bool("resume", resume)
    check_bool("progress", progress)
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint= (the directory the runs were saved in)")
    if not isinstance(dtype, str) or dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    device = torch.device(device)
    cfg = TrainConfig(seq_len=max_length, batch_size=batch, steps=steps, lr=float(lr), min_lr=float(lr) / 10,
                      lr_warmup=warmup, weight_decay=float(weight_decay), eval_every=eval_every, seed=seed,
                      device=str(device), dtype=dtype)
    settings = {"train_examples": train_examples, "val_examples": val_examples, "test_examples": test_examples,
                "min_length": min_length, "max_length": max_length, "dim": dim, "layers": layers, "heads": heads,
                "mlp_ratio": float(mlp_ratio), "batch": batch, "steps": steps, "lr": float(lr), "min_lr": cfg.min_lr,
                "warmup": warmup, "weight_decay": float(weight_decay), "grad_clip": cfg.grad_clip,
                "eval_every": eval_every, "seed": seed, "device": str(device), "dtype": dtype, "pooling": pooling,
                "sort_chunk": sort_chunk, "vocab_size": len(LISTOPS_VOCAB), "prepend_cls": True,
                "mechanisms": {name: spec for name, spec in table.items()}}

    splits = load_listops_splits({"train": train_examples, "val": val_examples, "test": test_examples}, seed,
                                 min_length, max_length, data_cache)
    majority = int(torch.bincount(splits["train"].labels, minlength=NUM_CLASSES).argmax())
    data_info = {split: _split_stats(d) for split, d in splits.items()}
    data_info["majority_class"] = majority
    data_info["majority_accuracy"] = {split: float((d.labels == majority).double().mean())
                                      for split, d in splits.items()}
    result = ListOpsResult(settings=settings, data=data_info)
    if checkpoint is not None:
        Path(checkpoint).mkdir(parents=True, exist_ok=True)
    for name, spec in table.items():
        path = None if checkpoint is None else _checkpoint_path(checkpoint, name)
        result.runs[name] = _train_one(name, spec, splits, settings, cfg, pooling, sort_chunk, path, resume, progress,
                                       checkpoint_every, checkpoint_minutes,
                                       None if max_minutes is None else max_minutes - (time.monotonic() - began) / 60)
        if not result.runs[name].finished:  # the time budget ran out: the others wait for the next call
            break
    return result


def _train_one(name, spec, splits, settings, cfg: TrainConfig, pooling, sort_chunk, path, resume, show,
               checkpoint_every, checkpoint_minutes, max_minutes) -> ListOpsRun:
    device = torch.device(cfg.device)
    model_cfg = ModelConfig(vocab_size=len(LISTOPS_VOCAB), dim=settings["dim"], num_layers=settings["layers"],
                            num_heads=settings["heads"], mlp_ratio=settings["mlp_ratio"], mechanisms=spec)
    run_settings = {k: v for k, v in settings.items() if k != "mechanisms"}
    torch.manual_seed(cfg.seed)
    model = SparseTransformer(model_cfg, num_classes=NUM_CLASSES, pooling=pooling).to(device)
    optimizer = adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = ListOpsRun(name=name, mechanism=spec, parameters=sum(p.numel() for p in model.parameters()))
    resume = resume and path is not None and path.is_file()
    if resume:
        ckpt = read_checkpoint(path)
        if ckpt.get("model_config") != model_cfg.to_dict() or ckpt.get("settings") != run_settings:
            raise ValueError(f"checkpoint {path} was made with other settings: {ckpt.get('settings')}, "
                             f"model {ckpt.get('model_config')}")
        if ckpt.get("run") is not None:  # finished and tested
            return ListOpsRun(**ckpt["run"])

    train = splits["train"]
    _check_vocabulary(train.tokens, model_cfg.vocab_size, "the training split's tokens")  # the steps skip it
    batches = SortedBatches(train.lengths, cfg.batch_size, sort_chunk, cfg.seed)
    eval_batch = 2 * cfg.batch_size
    # counters kept in the checkpoint; the best validation accuracy starts as NaN (none yet)
    state = {"calls": 0, "tokens": 0, "best_val_accuracy": math.nan, "best_val_step": 0}

    def batch(step):
        idx = batches(step)
        lengths = train.lengths[idx]
        state["calls"] += len(torch.unique(lengths))
        state["tokens"] += int(lengths.sum())
        # copies with no stream synchronisation: the host prepares the next step while the device runs this one
        return (to_device_async(train.tokens[idx, : int(lengths.max())], device).long(), lengths,
                to_device_async(train.labels[idx], device))

    def loss(model, batch):
        x, lengths, y = batch
        logits = listops_logits(model, x, lengths, check_tokens=False).float()  # tokens checked at load
        accuracy = (logits.detach().argmax(-1) == y).float().mean()  # read back by the loop, with the loss
        return torch.nn.functional.cross_entropy(logits, y), {"train_accuracy": accuracy}

    def evaluate(model, step):
        acc, val_loss = evaluate_listops_model(model, splits["val"], batch=eval_batch, device=device, dtype=cfg.dtype)
        if not acc <= state["best_val_accuracy"]:  # also replaces the initial NaN
            state["best_val_accuracy"], state["best_val_step"] = acc, step
        return {"val_accuracy": acc, "val_loss": val_loss}

    loop = TrainLoop(model, optimizer, steps=cfg.steps, batches=batch, loss=loss, lr=lambda step: lr_at(step, cfg),
                     evaluate=evaluate, eval_every=cfg.eval_every, grad_clip=cfg.grad_clip, device=device,
                     dtype=cfg.dtype, step_seed=lambda step: cfg.seed * 1_000_003 + step, state=state,
                     meta={"model_config": model_cfg.to_dict(), "settings": run_settings}, checkpoint=path,
                     resume=resume, checkpoint_every=checkpoint_every if path else None,
                     checkpoint_minutes=checkpoint_minutes if path else None, max_minutes=max_minutes,
                     progress=show, label=name)
    # every sequence length of the data (fewer than max_length - min_length) keeps its layouts and
    # their kernel plans for the whole run, instead of rebuilding them at almost every step
    with layout_cache(settings["max_length"] - settings["min_length"] + LAYOUT_CACHE_SPARE):
        done = loop.run()
        run.history, run.steps_done = done.history, done.step
        run.train_seconds, run.eval_seconds = done.train_seconds, done.eval_seconds
        run.best_val_accuracy, run.best_val_step = state["best_val_accuracy"], state["best_val_step"]
        run.steps_per_s = done.step / run.train_seconds if run.train_seconds > 0 else math.nan
        run.tokens_per_s = state["tokens"] / run.train_seconds if run.train_seconds > 0 else math.nan
        run.calls_per_step = state["calls"] / done.step if done.step else math.nan
        if not done.finished:  # stopped by max_minutes: the checkpoint holds the rest
            return run
        if max_minutes is not None and done.session_seconds + done.last_eval_seconds > 60 * max_minutes:
            return run  # trained, but testing (as long as a validation pass) would overrun: on resume
        evals = run.evals()
        run.val_accuracy = evals[-1][1] if evals else math.nan
        now = time.perf_counter()
        run.test_accuracy, _ = evaluate_listops_model(model, splits["test"], batch=eval_batch, device=device,
                                                      dtype=cfg.dtype)
    run.eval_seconds += time.perf_counter() - now
    loop.save(run=asdict(run))
    return run


# ---- picture ------------------------------------------------------------------------------


def plot_listops(results: ListOpsResult | Mapping, path: str | os.PathLike, title: str = "") -> None:
    """Validation accuracy against steps per mechanism (smoothed training accuracy thin),
    beside the final test accuracy per mechanism with LRA's reported number; the majority
    baseline dashed in both. `results`: a ListOpsResult or its `to_dict()`."""
    if isinstance(results, Mapping):
        results = ListOpsResult.from_dict(results)
    if not isinstance(results, ListOpsResult):
        raise TypeError(f"results must be a ListOpsResult or its to_dict(), got {type(results).__name__}")
    fig = figure(figsize=(11, 4.5), layout="constrained")
    curves, bars = fig.subplots(1, 2, width_ratios=[3, 2])
    majority = results.majority_accuracy
    for i, (name, run) in enumerate(results.runs.items()):
        color = f"C{i % 10}"
        smooth, acc = [], None
        for h in run.history:  # exponential moving average of the per-batch accuracy
            acc = h["train_accuracy"] if acc is None else 0.95 * acc + 0.05 * h["train_accuracy"]
            smooth.append(100 * acc)
        curves.plot([h["step"] for h in run.history], smooth, color=color, alpha=0.3, linewidth=1)
        evals = run.evals()
        if evals:
            curves.plot([s for s, _ in evals], [100 * a for _, a in evals], color=color, marker="o", markersize=3,
                        label=f"{name} (val {100 * evals[-1][1]:.1f})")
    curves.axhline(100 * majority["val"], color="gray", linestyle="--", linewidth=1,
                   label=f"majority class ({100 * majority['val']:.1f})")
    curves.set_xlabel("step")
    curves.set_ylabel("accuracy (%): val (markers), train (thin)")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=7)

    names = list(results.runs)
    xs = range(len(names))
    bars.bar(xs, [100 * results.runs[n].test_accuracy for n in names], color=[f"C{i % 10}" for i in xs],
             label="test accuracy (this run)")
    lra = [(i, LRA_LISTOPS_ACCURACY[results.runs[n].lra_name]) for i, n in enumerate(names)
           if results.runs[n].lra_name in LRA_LISTOPS_ACCURACY]
    if lra:
        bars.scatter([i for i, _ in lra], [a for _, a in lra], marker="_", s=300, color="black", zorder=3,
                     label="LRA paper (500-2000 tokens)")
    bars.axhline(100 * majority["test"], color="gray", linestyle="--", linewidth=1, label="majority class")
    top = max([100 * r.test_accuracy for r in results.runs.values() if r.test_accuracy == r.test_accuracy] +
              [a for _, a in lra] + [100 * majority["test"]])
    bars.set_ylim(0, 1.3 * top)
    bars.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    bars.set_ylabel("test accuracy (%)")
    bars.grid(alpha=0.3, axis="y")
    bars.legend(fontsize=7)
    s = results.settings
    fig.suptitle(title or f"ListOps, {s['min_length']} < length < {s['max_length']}, "
                          f"{results.data['train']['examples']} train trees, dim {s['dim']} x {s['layers']} layers, "
                          f"{s['steps']} steps", fontsize=9)
    fig.savefig(path, dpi=120)
