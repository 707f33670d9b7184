"""Decoding benchmark: generate a long sequence token by token with a small SparseCausalLM and
FullCache vs WindowCache vs SinkCache; per-token latency and cache memory over time.

    python benchmarks/decode.py                                  # 32K tokens on CPU, ~10 min
    python benchmarks/decode.py --tokens 4096 --plot benchmarks/results/decode.png
    PYTHONPATH=src python3 benchmarks/decode.py --device cuda --tokens 131072   # GPU machine

Model: 2 layers, dim 64, 4 heads, vocab 256, random weights (decoding cost does not depend on
the weights), greedy. Every layer uses the pattern its cache serves exactly: causal for
FullCache, sliding_window(W) for WindowCache(W), streaming(sinks, W) for SinkCache(sinks, W).
Latency = wall time of one decoding step (synchronised on CUDA), reported as the median over
each block of --block tokens; memory = bytes the caches hold after the step.
Goals (issue #6): window/sink memory flat; their last --block tokens no slower than 1.2x the
first; full cache grows linearly.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, progress, write_json  # noqa: E402

from sparse_attn.nn import FullCache, ModelConfig, SinkCache, SparseCausalLM, WindowCache  # noqa: E402


def _summary(kind, mech, latencies, memory, block, tokens) -> dict:
    blocks = [latencies[i:i + block] for i in range(0, len(latencies) - len(latencies) % block, block)]
    medians = [statistics.median(b) * 1e3 for b in blocks]
    return {"cache": kind, "mechanism": mech, "block_median_ms": medians,
            "memory_bytes": memory[block - 1::block], "tokens_done": len(latencies), "tokens_asked": tokens,
            "last_over_first": medians[-1] / medians[0] if medians else None,
            "final_memory_bytes": memory[-1] if memory else 0}


def run(kind: str, args, device, save_partial=None) -> dict:
    mech = {"full": "causal", "window": f"sliding_window:window={args.window}",
            "sink": f"streaming:sinks={args.sinks},window={args.window}"}[kind]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, dim=64, num_layers=2, num_heads=4, mechanisms=mech)
    model = SparseCausalLM(cfg).to(device).eval()
    caches = [{"full": FullCache, "window": lambda: WindowCache(args.window),
               "sink": lambda: SinkCache(args.sinks, args.window)}[kind]() for _ in model.blocks]
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    latencies, memory = [], []
    with torch.no_grad():
        for _ in progress(range(args.tokens), desc=f"decode {kind}", unit="tok", mininterval=2):
            t0 = time.perf_counter()
            logits = model(token, caches)
            token = logits[:, -1].argmax(-1, keepdim=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            latencies.append(time.perf_counter() - t0)
            memory.append(sum(c.memory_bytes() for c in caches))
            if save_partial is not None and len(latencies) % (8 * args.block) == 0:  # survives a time limit
                save_partial(_summary(kind, mech, latencies, memory, args.block, args.tokens))
    return _summary(kind, mech, latencies, memory, args.block, args.tokens)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--block", type=int, default=1024, help="tokens per latency/memory sample")
    ap.add_argument("--caches", nargs="+", default=["full", "window", "sink"], choices=["full", "window", "sink"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=RESULTS / "decode.json")
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.tokens < 2 * args.block:
        ap.error(f"--tokens ({args.tokens}) must cover at least two --block ({args.block}) samples")
    device = torch.device(args.device)
    result = {"env": environment(device.type), "setup": vars(args) | {"out": str(args.out), "plot": str(args.plot)},
              "rows": []}
    for kind in args.caches:
        row = run(kind, args, device, lambda partial: write_json(args.out, result | {"rows": result["rows"] + [partial]}))
        print(f"{kind}: first block {row['block_median_ms'][0]:.2f} ms/token, last {row['block_median_ms'][-1]:.2f} "
              f"({row['last_over_first']:.2f}x), cache {row['final_memory_bytes'] / 2**20:.2f} MiB", file=sys.stderr)
        result["rows"].append(row)
        write_json(args.out, result)
    if args.plot:
        plot(result, args.plot, args.block)
    return 0


def plot(result: dict, path: Path, block: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for row in result["rows"]:
        x = [(i + 1) * block for i in range(len(row["block_median_ms"]))]
        a.plot(x, row["block_median_ms"], marker=".", label=f"{row['cache']} ({row['mechanism']})")
        b.plot(x[:len(row["memory_bytes"])], [m / 2**20 for m in row["memory_bytes"]], marker=".", label=row["cache"])
    a.set(xlabel="tokens generated", ylabel=f"median ms / token (per {block})", title="latency")
    b.set(xlabel="tokens generated", ylabel="cache MiB", title="cache memory")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
