"""The training comparison of benchmarks/cp_gpu2.sh: its runs of examples/train_lm.py (one GPU and
--context-parallel P) gathered into one JSON, and the long length it tries.

    python3 benchmarks/cp_gpu2_collect.py --work $WORK --out $OUT/cp_train.json     # gather
    python3 benchmarks/cp_gpu2_collect.py --work $WORK --estimate-long --long-batch 1 --nproc 2   # prints N

$WORK holds, per run NAME (short_1gpu, short_cp2, long_cp2, long_1gpu): NAME.history.json (the
loss per step: train_lm.py --history), NAME.summary.json (--summary: peak memory and bytes per
rank), NAME.rc (exit status), NAME.log; long_plan.txt the long length tried.

The long length (--estimate-long): peak memory grows linearly with the tokens of a step (the
attention is sparse: O(N) memory), so from the short one-GPU run, bytes per token = peak / (seq x
batch); the length is the multiple of 64K whose tokens need 1.3x the GPU's memory on one GPU
(out of memory), i.e. 1.3 / P of it on each of P GPUs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

OVER = 1.3  # the long run's tokens need this many times one GPU's memory


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run(work: Path, name: str) -> dict | None:
    rc = work / f"{name}.rc"
    if not rc.is_file():
        return None
    out = {"exit_status": int(rc.read_text().strip() or -1), "summary": _load(work / f"{name}.summary.json"),
           "history": _load(work / f"{name}.history.json")}
    log = work / f"{name}.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    out["out_of_memory"] = "OutOfMemoryError" in text or "CUDA out of memory" in text
    if out["exit_status"] != 0:
        lines = [x for x in text.replace("\r", "\n").splitlines() if x.strip()]
        out["log_tail"] = lines[-6:]
    return out


def compare(a: dict | None, b: dict | None) -> dict | None:
    """Loss curves of two runs of the same steps: the largest differences."""
    if not a or not b or not a.get("history") or not b.get("history"):
        return None
    ha, hb = a["history"], b["history"]
    steps = min(len(ha), len(hb))
    diffs = [abs(x["train_loss"] - y["train_loss"]) for x, y in zip(ha, hb)]
    vals = [(x["step"], x["val_loss"], y.get("val_loss")) for x, y in zip(ha, hb) if "val_loss" in x]
    out = {"steps": steps, "same_length": len(ha) == len(hb),
           "max_abs_train_loss_diff": max(diffs) if diffs else None,
           "step_of_max_diff": ha[diffs.index(max(diffs))]["step"] if diffs else None,
           "max_rel_train_loss_diff": max((d / abs(x["train_loss"]) for d, x in zip(diffs, ha)), default=None),
           "val_loss": [{"step": s, "one_gpu": u, "context_parallel": w} for s, u, w in vals],
           "max_abs_val_loss_diff": max((abs(u - w) for _, u, w in vals if w is not None), default=None)}
    return out


def estimate_long(work: Path, long_batch: int, nproc: int) -> tuple[int | None, dict]:
    import torch

    short = run(work, "short_1gpu")
    summary = (short or {}).get("summary") or {}
    peak = (summary.get("peak_memory_bytes") or [0])[0]
    if not peak or not torch.cuda.is_available():
        return None, {"reason": "no peak memory from the short one-GPU run (or no GPU)"}
    per_token = peak / summary["tokens_per_step"]
    memory = torch.cuda.get_device_properties(0).total_memory
    tokens = OVER * memory / per_token
    seq = int(math.ceil(tokens / long_batch / 65536) * 65536)
    info = {"bytes_per_token": per_token, "gpu_memory_bytes": memory, "over": OVER, "seq_len": seq,
            "batch_size": long_batch, "one_gpu_estimate_bytes": per_token * seq * long_batch,
            "per_rank_estimate_bytes": per_token * seq * long_batch / nproc,
            "from": "short one-GPU run: peak_memory / (seq_len x batch_size)"}
    return seq, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--mechanisms", default="")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--estimate-long", action="store_true", help="print the long run's sequence length and stop")
    ap.add_argument("--long-batch", type=int, default=1)
    args = ap.parse_args()
    if args.estimate_long:
        seq, info = estimate_long(args.work, args.long_batch, args.nproc)
        (args.work / "long_estimate.json").write_text(json.dumps(info, indent=2))
        print(json.dumps(info), file=sys.stderr)
        if seq:
            print(seq)
        return
    from common import environment, write_json

    import torch

    runs = {name: run(args.work, name) for name in ("short_1gpu", "short_cp2", "long_cp2", "long_1gpu")}
    plan = args.work / "long_plan.txt"
    long_len = int(plan.read_text().strip()) if plan.is_file() else None
    long_1 = runs["long_1gpu"]
    payload = {
        "benchmark": "cp_train", "issue": 20, "mechanisms": args.mechanisms, "nproc": args.nproc,
        "environment": environment("cuda" if torch.cuda.is_available() else "cpu"),
        "short": {"one_gpu": runs["short_1gpu"], "context_parallel": runs["short_cp2"],
                  "comparison": compare(runs["short_1gpu"], runs["short_cp2"]),
                  "expected": "equal to bf16 noise: each context-parallel step is the one-GPU step's computation"},
        "long": {"seq_len": long_len, "estimate": _load(args.work / "long_estimate.json"),
                 "context_parallel": runs["long_cp2"], "one_gpu": long_1,
                 "one_gpu_cannot_hold": None if long_1 is None else bool(long_1["out_of_memory"]),
                 "note": "one GPU is tried for 2 steps only: expected to run out of memory"},
    }
    write_json(args.out, payload)
    cmp = payload["short"]["comparison"]
    if cmp:
        print(f"short: {cmp['steps']} steps, largest train-loss difference one GPU vs context parallel "
              f"{cmp['max_abs_train_loss_diff']:.2e} (step {cmp['step_of_max_diff']}), val "
              f"{cmp['max_abs_val_loss_diff']}")
    if long_len:
        cp = runs["long_cp2"] or {}
        last = (cp.get("history") or [{}])[-1]
        print(f"long: seq {long_len}: context parallel exit {cp.get('exit_status')}, last train loss "
              f"{last.get('train_loss')}; one GPU: "
              f"{'out of memory' if long_1 and long_1['out_of_memory'] else long_1 and long_1['exit_status']}")


if __name__ == "__main__":
    main()
