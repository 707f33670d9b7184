"""Validation loss of small causal LMs that differ only in their attention: dense, sliding
window, Longformer, BigBird, linear and a hybrid schedule, trained for the same steps on the
same data (issue #6's table).

    python benchmarks/train_compare.py --preset cpu          # minutes on a 2-core CPU
    PYTHONPATH=src python3 benchmarks/train_compare.py --preset gpu --device cuda   # GPU machine

Corpus: the generated records of `sparse_attn.train.corpus` (facts stated in a record's header
and restated hundreds to thousands of bytes later), byte tokens. Every run uses the same
model size, data order (batch of step s seeded by (seed, s)), learning-rate schedule and
validation windows; only `mechanisms` changes. Writes JSON after each run, and a loss plot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, write_json  # noqa: E402

from sparse_attn.nn import ModelConfig  # noqa: E402
from sparse_attn.train import TokenData, TrainConfig, plot_loss_curves, synthetic_corpus, train_lm  # noqa: E402

PRESETS = {
    # dim, layers, heads, seq_len, batch, steps, window, corpus bytes
    "cpu": dict(dim=128, layers=4, heads=4, seq_len=256, batch=8, steps=300, window=32, corpus=1_000_000),
    "gpu": dict(dim=256, layers=6, heads=8, seq_len=1024, batch=32, steps=1000, window=64, corpus=8_000_000),
}


def schedules(layers: int, window: int, seq_len: int) -> dict:
    block = max(16, window // 2)
    hybrid = ["causal" if (i + 1) % 3 == 0 else f"sliding_window:window={window}" for i in range(layers)]
    return {
        "dense": "causal",
        "sliding_window": f"sliding_window:window={window}",
        "longformer": f"longformer:window={window},global_tokens={max(1, seq_len // 64)},causal=true",
        "bigbird": f"bigbird:block={block},num_window_blocks=3,num_global_blocks=2,num_random_blocks=3,causal=true",
        "linear": "linear:causal=true",
        "hybrid (dense every 3rd layer, window elsewhere)": hybrid,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="default: bfloat16 autocast on CUDA, float32 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    ap.add_argument("--only", nargs="+", default=None, help="run only these schedule names")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="default: results/train_compare_<preset>.json")
    ap.add_argument("--plot", type=Path, default=None, help="default: beside --out, .png")
    args = ap.parse_args(argv)
    p = dict(PRESETS[args.preset])
    if args.steps:
        p["steps"] = args.steps
    out = args.out or RESULTS / f"train_compare_{args.preset}.json"
    plot = args.plot or out.with_suffix(".png")
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    data = TokenData.from_bytes(synthetic_corpus(p["corpus"], seed=args.seed))
    cfg = TrainConfig(seq_len=p["seq_len"], batch_size=p["batch"], steps=p["steps"], eval_every=max(1, p["steps"] // 10),
                      eval_batches=16, seed=args.seed, device=args.device, dtype=dtype)
    runs = schedules(p["layers"], p["window"], p["seq_len"])
    if args.only:
        unknown = set(args.only) - set(runs)
        if unknown:
            ap.error(f"--only: unknown schedules {sorted(unknown)}; choose from {sorted(runs)}")
        runs = {k: v for k, v in runs.items() if k in args.only}
    result = {"env": environment(device.type), "preset": args.preset, "setup": p | {"dtype": dtype},
              "corpus": f"synthetic_corpus({p['corpus']}, seed={args.seed}), 90/10 train/val split, byte tokens",
              "train_config": vars(cfg), "rows": []}
    curves = {}
    for name, mechanisms in runs.items():
        model_cfg = ModelConfig(vocab_size=256, dim=p["dim"], num_layers=p["layers"], num_heads=p["heads"],
                                mechanisms=mechanisms)
        _, res = train_lm(model_cfg, cfg, data, label=name)
        curves[name] = res.history
        row = {"name": name, "mechanisms": mechanisms, "final_val_loss": res.final_val_loss,
               "val_curve": res.evals(), "seconds": res.seconds, "parameters": res.num_parameters,
               "steps_per_s": cfg.steps / res.seconds}
        print(f"{name}: val loss {res.final_val_loss:.4f} after {cfg.steps} steps ({res.seconds:.0f} s)",
              file=sys.stderr)
        result["rows"].append(row)
        write_json(out, result)
        plot_loss_curves(curves, str(plot), title=f"{args.preset}: dim {p['dim']}, {p['layers']} layers, "
                                                  f"seq {p['seq_len']}, batch {p['batch']}, {cfg.steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
