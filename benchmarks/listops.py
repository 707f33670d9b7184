"""ListOps accuracy (LRA's task, generated here) of encoders that differ only in their attention:
dense, sliding window, Longformer, BigBird, linear, Performer, LSH (Reformer). Same data, model
size, batch order and schedule for every mechanism; writes JSON after each mechanism and a
picture (validation curves, test accuracy beside LRA's Table 1 and the majority class).

    python benchmarks/listops.py --preset cpu            # 11 min on one core of this CPU
    python benchmarks/listops.py --preset gpu --checkpoint /tmp/listops_ckpt --resume   # GPU machine

Presets:

* cpu: trees of 20 < length < 100 (mean 44 tokens), 4000 train / 500 val / 500 test, dim 64,
  2 layers, 4 heads, batch 32, 400 steps; 11 min in all on one core of this 2-core machine
  (7.7 min of it training). Shorter trees than LRA's because here the block-sparse patterns
  (blocked backend, which loops over batch x heads) cost 4-10x dense SDPA per step, and with
  50 < length < 200 a dense model needed ~600 steps to leave the majority baseline (measured:
  17% after 400 steps at lr 3e-3, 30% after 600 at 2e-3). The window (16: 8 keys each side)
  sees ~40% of a mean-length tree; BigBird's 8 blocks of 4 see ~70% of it (in LRA's setting,
  8 x 64 of ~1000 tokens: ~50%), so BigBird is close to dense here.
* gpu: LRA's data (96K train trees of 500 < length < 2000, mean ~1045 tokens; 2K val, 2K test)
  and schedule (batch 32, 5000 steps, 1000 warm-up steps), a smaller encoder than LRA's 512 x 6
  (dim 256, 4 layers, 4 heads, MLP x4), bfloat16 autocast; window 256 (~25% of a mean tree),
  BigBird blocks of 64 (as LRA), Performer 128 features, LSH buckets of 64. Measured on one
  H100 with the seven encoders sharing it (benchmarks/gpu_evals.sh): 5000 steps took linear
  442 s, Performer 479 s, LSH 706 s of training; the pattern encoders ran at 3-7 steps/s in
  that company (dense ~3, window and BigBird ~6), so ~15-25 min each. One command may run
  10 min, so pass --checkpoint (and --resume on the next command): each mechanism saves at
  every evaluation and a finished one is not rerun. --only picks mechanisms; processes running
  different ones at once (or one after another) fill the same JSON: runs made with the same
  preset and data are kept. Generating the 96K trees takes ~2 CPU-minutes (--data-only does
  just that); they are kept in --data-cache for the next command.

Every number is to be read against the majority class (14-17% per split here, "~17%" in LRA): the JSON
has it per split, the table prints it as a row.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, in_order, merge_entries, merge_json

from sparse_attn.eval.listops_train import (
    LISTOPS_PRESETS as PRESETS,
)
from sparse_attn.eval.listops_train import (
    ListOpsResult,
    listops_mechanisms,
    load_listops_splits,
    plot_listops,
    train_listops,
)

STARTED = time.monotonic()  # --max-minutes counts from here
# Per-step history points kept in the JSON (evaluation steps are always kept).
HISTORY_POINTS = 500


def thin(history: list[dict], steps: int) -> list[dict]:
    every = max(1, steps // HISTORY_POINTS)
    return [h for h in history if "val_accuracy" in h or h["step"] % every == 0]


def merge_runs(old: dict | None, new: dict, order: list[str]) -> dict:
    """The result file's content after `new` (one mechanism's run): the runs of `old` are kept
    when it was made with the same preset, data and settings, so that processes running
    different `--only` mechanisms at once, or one after another, fill one file. Runs are
    listed in `order` (the benchmark's table), any others after them."""
    def view(d):
        return {**d, "core_settings": {k: v for k, v in d["settings"].items() if k != "mechanisms"}}

    same = ("preset", "mechanism_settings", "core_settings", "data")
    merged = merge_entries(None if old is None else view(old), view(new), ("runs",), same)
    merged.pop("core_settings")
    if len(merged["runs"]) > len(new["runs"]):  # old runs kept: their mechanisms' specs too
        merged["settings"] = {**new["settings"], "mechanisms": {**old["settings"]["mechanisms"],
                                                                 **new["settings"]["mechanisms"]}}
    merged["runs"] = in_order(merged["runs"], order)
    merged["settings"]["mechanisms"] = in_order(merged["settings"]["mechanisms"], order)
    return merged


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--device", default=None, help="default: the preset's (cpu / cuda)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: the preset's")
    ap.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    ap.add_argument("--only", nargs="+", default=None, help="run only these mechanisms")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 1 on CPU: a shared machine)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="directory for per-mechanism checkpoints")
    ap.add_argument("--resume", action="store_true", help="continue from --checkpoint (finished ones are kept)")
    ap.add_argument("--checkpoint-every", type=int, default=None, help="also checkpoint every N steps")
    ap.add_argument("--checkpoint-minutes", type=float, default=None, help="also checkpoint every M minutes")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="time budget of this process (from its start): training checkpoints and stops before it "
                         "runs out; run again with --resume to go on. Unfinished runs stay out of the JSON")
    ap.add_argument("--data-cache", type=Path, default=Path(tempfile.gettempdir()) / "sparse_attn_listops_data",
                    help="where the generated splits are kept between runs")
    ap.add_argument("--data-only", action="store_true",
                    help="generate the preset's splits into --data-cache (for processes started after it) and exit")
    ap.add_argument("--out", type=Path, default=None, help="default: results/listops_<preset>.json")
    ap.add_argument("--plot", type=Path, default=None, help="default: beside --out, .png")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    p = dict(PRESETS[args.preset])
    mechanism_args = p.pop("mechanisms")
    if args.steps:
        p["steps"] = args.steps
    p["device"] = args.device or p["device"]
    p["dtype"] = args.dtype or p["dtype"]
    if p["device"] == "cpu" or args.threads:
        torch.set_num_threads(args.threads or 1)
    if args.data_only:
        splits = {"train": p["train_examples"], "val": p["val_examples"], "test": p["test_examples"]}
        data = load_listops_splits(splits, args.seed, p["min_length"], p["max_length"], args.data_cache)
        print(", ".join(f"{k}: {len(v.labels)} trees" for k, v in data.items()) + f" in {args.data_cache}",
              file=sys.stderr)
        return 0
    table = listops_mechanisms(**mechanism_args, seed=args.seed)
    order = list(table)  # the result file lists runs in this order, whichever --only ran
    if args.only:
        unknown = set(args.only) - set(table)
        if unknown:
            ap.error(f"--only: unknown mechanisms {sorted(unknown)}; choose from {sorted(table)}")
        table = {k: v for k, v in table.items() if k in args.only}
    out = args.out or RESULTS / f"listops_{args.preset}.json"
    plot = args.plot or out.with_suffix(".png")
    device = torch.device(p["device"])

    if (args.max_minutes or args.checkpoint_every or args.checkpoint_minutes) and args.checkpoint is None:
        ap.error("--max-minutes, --checkpoint-every and --checkpoint-minutes need --checkpoint DIR")
    merged: ListOpsResult | None = None
    for name, spec in table.items():
        budget = None if args.max_minutes is None else args.max_minutes - (time.monotonic() - STARTED) / 60
        if budget is not None and budget <= 0:
            print(f"{name}: not started, --max-minutes {args.max_minutes} spent", file=sys.stderr)
            break
        result = train_listops({name: spec}, **p, seed=args.seed, checkpoint=args.checkpoint, resume=args.resume,
                               checkpoint_every=args.checkpoint_every, checkpoint_minutes=args.checkpoint_minutes,
                               max_minutes=budget, data_cache=args.data_cache, progress=not args.no_progress)
        run = result.runs[name]
        if not run.finished:  # the budget ran out: the checkpoint has it, the JSON keeps finished runs only
            last = run.evals()[-1] if run.evals() else (0, float("nan"))
            print(f"{name}: stopped at step {run.steps_done}/{p['steps']} (checkpointed in {args.checkpoint}; "
                  f"{run.train_seconds:.0f} s training so far, {run.steps_per_s:.2f} steps/s; val "
                  f"{100 * last[1]:.2f}% at step {last[0]}); run again with --resume", file=sys.stderr)
            break
        run.history = thin(run.history, p["steps"])
        maj = result.majority_accuracy
        print(f"{name}: val {100 * run.val_accuracy:.2f}%, test {100 * run.test_accuracy:.2f}% (majority "
              f"{100 * maj['test']:.2f}%), {run.train_seconds:.0f} s training, {run.steps_per_s:.2f} steps/s",
              file=sys.stderr)
        payload = {"env": environment(device.type), "preset": args.preset,
                   "mechanism_settings": mechanism_args | {"seed": args.seed}, **result.to_dict()}
        merged = ListOpsResult.from_dict(merge_json(out, payload, lambda old, new: merge_runs(old, new, order)))
        plot_listops(merged, plot, title=f"ListOps ({args.preset} preset): {merged.settings['min_length']} < length < "
                                         f"{merged.settings['max_length']}, {p['train_examples']} train trees, dim "
                                         f"{p['dim']} x {p['layers']} layers, {p['steps']} steps, batch {p['batch']}")
    if merged is not None:
        print(merged.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
