"""Where a ListOps training step spends its time, per phase, and what the per-length layout cache
(`sparse_attn.patterns.layout_cache`, used by `train_listops`) saves. Writes JSON.

    python benchmarks/profile_listops.py --preset cpu-small                 # this CPU, ~3 min
    python benchmarks/profile_listops.py --preset gpu --device cuda --data-cache DIR  # LRA size (H200)

(--data-cache: where benchmarks/listops.py / listops_gpu.sh keep the generated splits; without
it the LRA training split is generated first, in parallel from the marks in benchmarks/data/.)

ListOps batches have varying lengths (LRA: ~1,500 distinct lengths from 500 to 2000; a batch sorted
by length spans ~1.5 of them), and a pattern's layout and the backend's plan are built per length.
With the library's default of 32 layouts kept per pattern, almost every step met a length whose
layout had been dropped. `train_listops` now keeps one per length for the run.

Each mechanism is trained twice from the same initial weights, with the default cache
("default_cache") and with one layout per length ("per_length_cache"), side by side (one step of
each in turn, so that the load of a shared machine falls on both alike), in three stretches:
`--steps` steps from the start (cold: lengths seen for the first time), one evaluation pass over
the validation split (as `train_listops` makes every `eval_every` steps: it meets every length),
and `--steps` more (warm: what most of an LRA run looks like after its first evaluation).
steps/s counts the steps' own time (synchronised), not the other variant's.

Phases of a step (synchronised on CUDA between phases, which costs a little):
  batch       indices of the step, tokens cut to the longest row, moved to the device
  layout      Pattern.layout / Pattern.at lookups and builds, and plans cached on layouts
              (BlockLayout.cached: Triton CSR + masks, blocked masks), inside the forward
  forward     the rest of the forward (listops_logits: one call per distinct length) and the loss
  backward    loss.backward()
  optimizer   gradient clipping and AdamW step
  other       the rest of the step's wall time (Python between phases, learning-rate setting)
`forward_host` is the time until the forward's Python returned (before the sync): on CUDA, a
forward_host close to forward means the step waits on the host, not on the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, write_json
from listops import stream_marks

from sparse_attn.eval.listops_train import (
    LAYOUT_CACHE_SPARE,
    LISTOPS_PRESETS,
    NUM_CLASSES,
    SortedBatches,
    evaluate_listops_model,
    listops_logits,
    listops_mechanisms,
    load_listops_splits,
    to_device_async,
)
from sparse_attn.eval.tasks import LISTOPS_VOCAB
from sparse_attn.nn import ModelConfig, SparseTransformer
from sparse_attn.patterns import BlockLayout, Pattern, layout_cache
from sparse_attn.train import adamw, autocast, optimizer_step

PRESETS = {
    # LRA's spread of lengths at a size a CPU trains: ~300 lengths, two batches per length per epoch
    "cpu-small": {"train_examples": 9600, "val_examples": 500, "min_length": 100, "max_length": 400, "dim": 64,
                  "layers": 2, "heads": 4, "mlp_ratio": 2.0, "batch": 16, "lr": 1e-3, "weight_decay": 0.1,
                  "device": "cpu", "dtype": "float32",
                  "mechanisms": {"window": 64, "block": 16, "num_features": 32, "bucket_size": 32, "n_hashes": 2}},
    "gpu": {k: v for k, v in LISTOPS_PRESETS["gpu"].items() if k not in ("steps", "warmup", "eval_every",
                                                                         "test_examples")},
}


class PhaseTimer:
    """Seconds spent inside Pattern.layout / Pattern.at / plan builds (outermost calls only)."""

    def __init__(self):
        self.seconds, self.layouts_built, self.plans_built, self._depth = 0.0, 0, 0, 0
        self._originals = {}

    def _timed(self, fn):
        def wrapper(*args, **kw):
            if self._depth:
                return fn(*args, **kw)
            self._depth += 1
            began = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.seconds += time.perf_counter() - began
                self._depth -= 1
        return wrapper

    def install(self):
        timer = self
        originals = {(Pattern, "layout"): Pattern.layout, (Pattern, "at"): Pattern.at,
                     (BlockLayout, "cached"): BlockLayout.cached, (BlockLayout, "from_block_set"):
                     BlockLayout.from_block_set.__func__}
        self._originals = originals

        def cached(layout, key, build):
            if key not in layout.cache:
                timer.plans_built += 1
            return originals[(BlockLayout, "cached")](layout, key, build)

        def from_block_set(cls, *args):
            timer.layouts_built += 1
            return originals[(BlockLayout, "from_block_set")](cls, *args)

        Pattern.layout = self._timed(originals[(Pattern, "layout")])
        Pattern.at = self._timed(originals[(Pattern, "at")])
        BlockLayout.cached = self._timed(cached)
        BlockLayout.from_block_set = classmethod(from_block_set)

    def uninstall(self):
        for (cls, name), fn in self._originals.items():
            setattr(cls, name, classmethod(fn) if name == "from_block_set" else fn)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Run:
    """One variant's model, optimizer and phase totals."""

    def __init__(self, spec, p, splits, args, cache_size):
        self.device, self.dtype, self.cache_size = torch.device(p["device"]), p["dtype"], cache_size
        cfg = ModelConfig(vocab_size=len(LISTOPS_VOCAB), dim=p["dim"], num_layers=p["layers"], num_heads=p["heads"],
                          mlp_ratio=p["mlp_ratio"], mechanisms=spec)
        torch.manual_seed(args.seed)
        self.model = SparseTransformer(cfg, num_classes=NUM_CLASSES, pooling="mean").to(self.device)
        self.optimizer = adamw(self.model, lr=p["lr"], weight_decay=p["weight_decay"])
        self.train, self.val, self.eval_batch = splits["train"], splits["val"], 2 * p["batch"]
        self.batches = SortedBatches(self.train.lengths, p["batch"], len(self.train.lengths), args.seed)
        self.stretches: dict = {}

    def cache(self):
        return layout_cache(self.cache_size) if self.cache_size else contextlib.nullcontext()

    def step(self, step: int, timer: PhaseTimer, totals: dict) -> None:
        device, model = self.device, self.model
        with self.cache():
            t0 = time.perf_counter()
            idx = self.batches(step)
            lengths = self.train.lengths[idx]
            x = to_device_async(self.train.tokens[idx, : int(lengths.max())], device).long()  # as train_listops
            y = to_device_async(self.train.labels[idx], device)
            totals["calls"] += len(torch.unique(lengths))
            sync(device)
            t1 = time.perf_counter()
            layout_before, built_before = timer.seconds, timer.layouts_built
            with autocast(device, self.dtype):
                logits = listops_logits(model, x, lengths, check_tokens=False).float()
            loss = torch.nn.functional.cross_entropy(logits, y)
            t_host = time.perf_counter()
            sync(device)
            t2 = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            sync(device)
            t3 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            self.optimizer.step()
            model.advance()
            sync(device)
            t4 = time.perf_counter()
        layout = timer.seconds - layout_before
        totals["layouts_built"] += timer.layouts_built - built_before
        totals["batch"] += t1 - t0
        totals["layout"] += layout
        totals["forward"] += t2 - t1 - layout
        totals["forward_host"] += t_host - t1
        totals["backward"] += t3 - t2
        totals["optimizer"] += t4 - t3
        totals["step"] += t4 - t0

    def evaluate(self, timer: PhaseTimer) -> dict:
        with self.cache():
            sync(self.device)
            began, built = time.perf_counter(), timer.layouts_built
            evaluate_listops_model(self.model, self.val, batch=self.eval_batch, device=self.device, dtype=self.dtype)
            sync(self.device)
            self.model.train()
        return {"seconds": time.perf_counter() - began, "examples": len(self.val.labels),
                "layouts_built": timer.layouts_built - built}


def summarise(totals: dict, steps: int) -> dict:
    per_step = {k: totals[k] / steps for k in ("batch", "layout", "forward", "forward_host", "backward",
                                                "optimizer", "step")}
    per_step["other"] = max(0.0, per_step["step"] - sum(per_step[k] for k in ("batch", "layout", "forward",
                                                                              "backward", "optimizer")))
    return {"steps": steps, "steps_per_s": steps / totals["step"], "seconds_per_step": per_step,
            "forward_calls_per_step": totals["calls"] / steps, "layouts_built": totals["layouts_built"]}


def profile_mechanism(spec, p, splits, args, variants: dict, timer) -> dict:
    """The variants {label: cache size or None} trained side by side, one step of each in turn,
    so that a shared machine's load falls on both alike."""
    runs = {label: Run(spec, p, splits, args, size) for label, size in variants.items()}
    out = {label: {"layout_cache_size": size or "library default (32)"} for label, size in variants.items()}
    for stretch, first in (("cold", 0), ("warm", args.steps)):
        totals = {label: defaultdict(float) for label in runs}
        for step in range(first, first + args.steps):
            for label, run in runs.items():
                run.step(step, timer, totals[label])
        for label in runs:
            out[label][stretch] = summarise(totals[label], args.steps)
        if stretch == "cold":
            for label, run in runs.items():
                out[label]["evaluation"] = run.evaluate(timer)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    ap.add_argument("--mechanisms", nargs="+", default=["sliding_window", "bigbird"],
                    help="names from listops_mechanisms (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=150, help="steps per stretch (cold, then warm)")
    ap.add_argument("--train-examples", type=int, default=None, help="default: the preset's")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    ap.add_argument("--data-cache", type=Path, default=None, help="generated splits kept here (benchmarks/listops.py)")
    ap.add_argument("--out", type=Path, default=None, help="default: results/profile_listops_<preset>.json")
    args = ap.parse_args(argv)

    p = dict(PRESETS[args.preset])
    mechanism_args = p.pop("mechanisms")
    p["device"] = args.device or p["device"]
    if args.train_examples:
        p["train_examples"] = args.train_examples
    torch.set_num_threads(args.threads)
    table = listops_mechanisms(**mechanism_args, seed=args.seed)
    unknown = set(args.mechanisms) - set(table)
    if unknown:
        ap.error(f"--mechanisms: unknown {sorted(unknown)}; choose from {sorted(table)}")
    wanted = {"train": p["train_examples"], "val": p["val_examples"]}
    splits = load_listops_splits(wanted, args.seed, p["min_length"], p["max_length"], args.data_cache,
                                 marks=stream_marks(wanted, args.seed, p["min_length"], p["max_length"]),
                                 workers=os.cpu_count() or 1)
    per_length = p["max_length"] - p["min_length"] + LAYOUT_CACHE_SPARE
    timer = PhaseTimer()
    timer.install()
    results = {}
    try:
        for name in args.mechanisms:
            results[name] = profile_mechanism(table[name], p, splits, args,
                                              {"default_cache": None, "per_length_cache": per_length}, timer)
            for label, r in results[name].items():
                print(f"{name:15s} {label:17s} cold {r['cold']['steps_per_s']:6.2f} steps/s "
                      f"({r['cold']['layouts_built']:.0f} layouts built), eval {r['evaluation']['seconds']:.1f} s, "
                      f"warm {r['warm']['steps_per_s']:6.2f} steps/s ({r['warm']['layouts_built']:.0f} built); per "
                      f"warm step ms: " + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in
                                                    r['warm']['seconds_per_step'].items()), flush=True)
    finally:
        timer.uninstall()
    payload = {"env": environment(torch.device(p["device"]).type), "preset": args.preset,
               "settings": {**p, "mechanisms": {n: table[n] for n in args.mechanisms}, "steps": args.steps,
                            "threads": args.threads, "seed": args.seed, "per_length_cache_size": per_length},
               "lengths": {"distinct_train": len(torch.unique(splits["train"].lengths))},
               "results": results}
    out = args.out or RESULTS / f"profile_listops_{args.preset}.json"
    write_json(out, payload)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
