"""Passkey retrieval and MQAR with small causal LMs that differ only in their attention
schedule: dense, sliding window, StreamingLLM sinks + window, causal linear attention, and a
hybrid (window layers, one dense layer on top). One model per schedule and task.

    python benchmarks/recall.py --preset cpu                 # minutes on a 2-core CPU
    PYTHONPATH=src python3 benchmarks/recall.py --preset gpu --device cuda

Writes results/passkey.json + .png and results/mqar.json + .png (the gpu preset:
passkey_gpu.*, mqar_gpu.*), each JSON with the environment, the settings and, per schedule,
accuracy, the reach bound and the training record. The files are rewritten after each
schedule; schedules already there from a run with the same preset and settings are kept, so
`--only` runs (at once, in several processes, or one after another) fill one file. See
`sparse_attn.eval.recall` for what is measured. Notes on the presets:

* Models are re-initialised for their width (`scaled_init_`); with the models' own N(0, 0.02)
  init, width-64 models did not learn MQAR in 3000 steps and found a passkey only sometimes.
* passkey: 1-digit keys, answer-only loss. A dense 2-layer width-64 model finds a 1-digit key
  in about 200 steps; 5-digit keys need an induction circuit (copy the digit that followed the
  one just written) not formed after 500 steps on the CPU. Try `--digits 5 --steps ...` on a GPU.
* MQAR: layer 0 is a causal window of 3 (Zoology's short convolution), the compared mechanism
  is layer 1. `backend="reference"` on the CPU: at 64 tokens the dense masked softmax is 3-6x
  faster than the block kernels, with the same results.
* gpu preset, measured on one H100 (benchmarks/gpu_evals.sh, passkey and MQAR beside the
  ListOps encoders): passkey 45-90 s of training per schedule, and dense learns it (1.00 at
  the train length); MQAR 120-170 s per schedule, but no schedule learnt it at vocabulary
  8192. Both ran with the earlier init (unit embedding, now `init="scaled"`); with today's
  default (`fan_in`) a dense model learns MQAR at vocabulary 8192 on the CPU (README).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, in_order, merge_entries, merge_json

from sparse_attn.eval.arguments import add_checkpoint_flags, checkpoint_options
from sparse_attn.eval.recall import (
    MQAR_FIRST_LAYER,
    MQARResult,
    PasskeyResult,
    default_schedules,
    mqar_experiment,
    passkey_experiment,
    plot_mqar,
    plot_passkey,
)

PRESETS = {
    "cpu": {
        "passkey": {"train_length": 384, "test_lengths": [384, 768, 1536], "steps": 300, "dim": 64, "layers": 2,
                    "heads": 4, "batch": 16, "lr": 3e-3, "digits": 1, "lm_weight": 0.0, "window": 32,
                    "test_examples": 32},
        "mqar": {"num_kv_pairs_list": [4, 8, 16], "seq_len": 64, "vocab_size": 64, "steps": 600, "dim": 64,
                 "layers": 2, "heads": 4, "batch": 48, "lr": 3e-3, "window": 8, "test_examples": 256,
                 "backend": "reference"},
    },
    "gpu": {
        "passkey": {"train_length": 1024, "test_lengths": [1024, 2048, 4096, 8192], "steps": 1500, "dim": 128,
                    "layers": 4, "heads": 4, "batch": 32, "lr": 3e-3, "digits": 1, "lm_weight": 0.0, "window": 64,
                    "test_examples": 64},
        "mqar": {"num_kv_pairs_list": [4, 8, 16, 32, 64], "seq_len": 256, "vocab_size": 8192, "steps": 4000,
                 "dim": 128, "layers": 2, "heads": 2, "batch": 128, "lr": 3e-3, "window": 32, "test_examples": 1000},
    },
}


# Per-schedule entries of the result JSONs, and what must be equal for two runs to share a file.
SCHEDULE_KEYS = ("schedules", "accuracy", "digit_accuracy", "depth_accuracy", "reach", "training")
SAME_KEYS = ("preset", "task", "settings", "lengths", "depths", "num_kv_pairs")


def without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def merge_schedules(old: dict | None, new: dict, order: list[str]) -> dict:
    """The result file's content after `new` (one schedule's run): the schedules of `old` are
    kept when it was made with the same preset and settings (so `--only` runs, at once or one
    after another, fill one file), listed in `order`; `seconds` is then their sum."""
    merged = merge_entries(old, new, tuple(k for k in SCHEDULE_KEYS if k in new), SAME_KEYS)
    if len(merged["schedules"]) > len(new["schedules"]):
        merged["seconds"] = old["seconds"] + new["seconds"]
    for key in SCHEDULE_KEYS:
        if key in merged:
            merged[key] = in_order(merged[key], order)
    return merged


def finished_schedules(path: Path, preset: str, wanted: dict) -> list[str]:
    """Schedules `path` already holds from a run of `preset` whose settings agree with
    `wanted` (this run's preset values and overrides) on every key both have."""
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    settings = old.get("settings", {})
    if old.get("preset") != preset or any(settings[k] != v for k, v in wanted.items() if k in settings):
        return []
    return list(old.get("schedules", {}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--task", choices=["passkey", "mqar", "both"], default="both")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="default: bfloat16 autocast on CUDA, float32 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="override the preset's training steps (both tasks)")
    ap.add_argument("--digits", type=int, default=None, help="override the passkey digits")
    ap.add_argument("--only", nargs="+", default=None, help="run only these schedule names")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and PNG files")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--resume", action="store_true",
                    help="skip the schedules that --out already holds from a run with the same settings")
    ap.add_argument("--replot", action="store_true", help="redraw the PNGs from the JSON files, train nothing")
    add_checkpoint_flags(ap, resume=False)  # with --checkpoint-dir, --resume also continues a cut-off schedule
    args = ap.parse_args(argv)
    checkpoints = {"checkpoint": args.checkpoint_dir, "resume": args.resume and args.checkpoint_dir is not None,
                   **checkpoint_options(ap, args, args.checkpoint_dir, resume_needs_checkpoints=False)}
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    suffix = "" if args.preset == "cpu" else f"_{args.preset}"
    tasks = ["passkey", "mqar"] if args.task == "both" else [args.task]
    if args.replot:
        for task in tasks:
            out = args.out / f"{task}{suffix}.json"
            kind, plot = (PasskeyResult, plot_passkey) if task == "passkey" else (MQARResult, plot_mqar)
            plot(kind.from_dict(json.loads(out.read_text())), out.with_suffix(".png"))
            print(f"wrote {out.with_suffix('.png')}", file=sys.stderr)
        return 0
    for task in tasks:
        p = dict(PRESETS[args.preset][task])
        if args.steps:
            p["steps"] = args.steps
        if args.digits and task == "passkey":
            p["digits"] = args.digits
        first = MQAR_FIRST_LAYER if task == "mqar" else None  # Zoology's short local layer first
        schedules = default_schedules(p["layers"], p.pop("window"), first=first)
        order = list(schedules)
        if args.only:
            unknown = set(args.only) - set(schedules)
            if unknown:
                ap.error(f"--only: unknown schedules {sorted(unknown)}; choose from {sorted(schedules)}")
            schedules = {k: v for k, v in schedules.items() if k in args.only}
        common = {"seed": args.seed, "device": args.device, "dtype": dtype, "progress": not args.no_progress}
        merged = None
        out = args.out / f"{task}{suffix}.json"
        kind, plot = (PasskeyResult, plot_passkey) if task == "passkey" else (MQARResult, plot_mqar)
        if args.resume:
            done = finished_schedules(out, args.preset, {**p, **common})
            if done:
                print(f"{task}: kept from {out}: {', '.join(done)}", file=sys.stderr)
            schedules = {k: v for k, v in schedules.items() if k not in done}
        for name, mechanisms in schedules.items():  # one at a time: the JSON grows after each
            if task == "passkey":
                res = passkey_experiment({name: mechanisms}, p["train_length"], p["test_lengths"],
                                         **without(p, "train_length", "test_lengths"), **common, **checkpoints)
            else:
                res = mqar_experiment({name: mechanisms}, p["num_kv_pairs_list"],
                                      **without(p, "num_kv_pairs_list"), **common, **checkpoints)
            if res.unfinished:  # --max-minutes ran out: checkpointed; nothing of it goes into the JSON
                print(f"{task} {name}: stopped at step {res.unfinished[name]} of {p['steps']} (--max-minutes), "
                      f"checkpointed in {args.checkpoint_dir}; run again with --resume", file=sys.stderr)
                break
            payload = {"env": environment(device.type), "preset": args.preset,
                       "command": "python benchmarks/recall.py " + " ".join(sys.argv[1:] if argv is None else argv),
                       **res.to_dict()}
            merged = kind.from_dict(merge_json(out, payload, lambda old, new: merge_schedules(old, new, order)))
            plot(merged, out.with_suffix(".png"))
        if merged is not None:
            print(merged.summary(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
