"""Fidelity of every mechanism against dense softmax attention: relative output error and
attention-mass recall, on random inputs and on inputs with planted structure.

    python benchmarks/fidelity.py                        # N in 1K 4K 16K, ~5 min on 2 cores
    python benchmarks/fidelity.py --lengths 1024 --plot benchmarks/results/fidelity.png

Causal, B=1, H=4, D=64, fp32 mechanisms against a float64 dense causal reference computed in
row chunks (never an N x N matrix for all rows at once), on --rows query rows in evenly spaced
64-row segments (first and last included).
* rel_err = ||out - ref||_F / ||ref||_F over the checked rows;
* recall = mean over checked rows of the dense softmax mass that falls on the (query, key)
  pairs the mechanism attends to (patterns: allowed pairs; topk: its k keys; block_topk: the
  selected blocks; LSH / routing: the union of pairs over rounds / clusters, for N <= 4096
  only, where their N x N pair masks fit). Linear and Performer attend to every key with
  approximate weights: recall does not apply.
Inputs: `random` (q, k, v ~ N(0, 1)) and `planted` (each query is noise plus a multiple of the
mean of --targets earlier keys, so a few keys carry most of its softmax mass, as in trained
models; v random).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, progress, write_json  # noqa: E402

import sparse_attn  # noqa: E402
from sparse_attn import Mechanism  # noqa: E402
from sparse_attn import patterns as P  # noqa: E402
from sparse_attn.ops.routing import routing_sizes  # noqa: E402
from sparse_attn.eval.measure import error_segments  # noqa: E402
from sparse_attn.ops.lsh import lsh_attended_pairs  # noqa: E402
from sparse_attn.ops.routing import routing_attended_pairs  # noqa: E402

PAIRS_MAX_N = 4096  # LSH / routing pair masks are N x N


def settings(n: int) -> dict[str, Mechanism | P.Pattern]:
    gen = torch.Generator().manual_seed(0)
    out: dict = {"window256": P.sliding_window(256), "linear_elu": Mechanism("linear", causal=True),
                 "linear_relu": Mechanism("linear", feature_map="relu", causal=True)}
    for m in (64, 256, 1024):
        out[f"performer_{m}"] = Mechanism("performer", num_features=m, causal=True, generator=gen)
    for kk in (32, 128):
        out[f"topk_{kk}"] = Mechanism("topk", top_k=kk, causal=True)
    for kb in (4, 16):
        out[f"block_topk_{kb}x64"] = Mechanism("block_topk", top_k_blocks=kb, block_size=64, causal=True)
    for h in (1, 2, 4, 8):
        out[f"lsh_b64_h{h}"] = Mechanism("lsh", bucket_size=64, n_hashes=h, causal=True, seed=0)
    out["routing"] = Mechanism("routing", causal=True, **routing_sizes(n))
    return out


def make_inputs(kind: str, n: int, heads: int, dim: int, targets: int, strength: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, dim, generator=gen, dtype=torch.float64) for _ in range(3))
    if kind == "planted":
        # each query i: noise + strength * mean of `targets` keys at positions <= i (causal)
        pos = torch.arange(n, dtype=torch.float64)
        picks = (torch.rand(1, heads, n, targets, generator=gen, dtype=torch.float64) * (pos[:, None] + 1)).long()
        index = picks.reshape(1, heads, n * targets, 1).expand(-1, -1, -1, dim)
        chosen = torch.gather(k, 2, index).reshape(1, heads, n, targets, dim)  # the planted keys
        q = 0.5 * q + strength * chosen.mean(3)
    return q, k, v


def dense_rows(q64, k64, v64, start: int, stop: int, scale: float):
    """Dense causal softmax for query rows [start, stop): (out [1, H, R, Dv], probs [1, H, R, N])."""
    s = (q64[:, :, start:stop] @ k64.transpose(-1, -2)) * scale
    rows = torch.arange(start, stop)[:, None]
    s = s.masked_fill(torch.arange(k64.shape[2])[None, :] > rows, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return p @ v64, p


def attended_rows(name: str, mech, q, k, n: int, start: int, stop: int, extra) -> torch.Tensor | None:
    """bool [1 or H, R, N]: the pairs the mechanism attends to for rows [start, stop), or None."""
    if isinstance(mech, P.Pattern):
        return mech.to_dense(stop - start, n, q_offset=start)
    if mech.name == "block_topk":
        selection = extra  # [1, H, NQB, NKB]
        bs = mech.params["block_size"]
        q_blocks = torch.arange(start, stop) // bs
        kv_blocks = torch.arange(n) // bs
        pairs = selection[0][:, q_blocks][:, :, kv_blocks]  # [H, R, N]
        return pairs & (torch.arange(n)[None, :] <= torch.arange(start, stop)[:, None])
    if mech.name in ("lsh", "routing"):
        return None if extra is None else extra[0, :, start:stop]
    return None  # linear / performer attend to everything


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--inputs", nargs="+", default=["random", "planted"], choices=["random", "planted"])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--rows", type=int, default=1024, help="query rows checked (0 = all)")
    ap.add_argument("--targets", type=int, default=4, help="planted keys per query")
    ap.add_argument("--strength", type=float, default=4.0, help="planted signal multiple")
    ap.add_argument("--out", type=Path, default=RESULTS / "fidelity.json")
    ap.add_argument("--plot", type=Path, default=None, help="write a PNG of error and recall against N")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    scale = args.dim ** -0.5
    result = {"env": environment("cpu"), "rows": [],
              "setup": f"causal, B=1, H={args.heads}, D={args.dim}, fp32 mechanisms vs float64 dense causal "
                       f"softmax; {args.rows or 'all'} checked rows; planted: {args.targets} keys per query, "
                       f"strength {args.strength}",
              "formulas": {"rel_err": "||out - ref||_F / ||ref||_F over the checked rows",
                           "recall": "mean over checked rows of the dense softmax mass on the attended pairs"}}
    jobs = [(kind, n) for kind in args.inputs for n in args.lengths]
    for kind, n in progress(jobs, desc="fidelity", unit="setting"):
        q64, k64, v64 = make_inputs(kind, n, args.heads, args.dim, args.targets, args.strength, seed=n)
        q, k, v = (t.float() for t in (q64, k64, v64))
        segments = error_segments(n, args.rows)
        refs = [dense_rows(q64, k64, v64, a, b, scale) for a, b in segments]
        for name, mech in settings(n).items():
            row = {"inputs": kind, "N": n, "mechanism": name, "spec": str(mech) if isinstance(mech, Mechanism)
                   else repr(mech)}
            extra = None
            with torch.no_grad():
                if isinstance(mech, P.Pattern):
                    out = sparse_attn.sparse_attention(q, k, v, mech)
                elif mech.name == "block_topk":
                    out, extra = mech(q, k, v, return_selection=True)
                else:
                    out = mech(q, k, v)
                if isinstance(mech, Mechanism) and mech.name in ("lsh", "routing") and n <= PAIRS_MAX_N:
                    p = {key: val for key, val in mech.params.items() if key not in ("seed",)}
                    if mech.name == "lsh":
                        extra = lsh_attended_pairs(q, k, seed=mech.params["seed"], **p)
                    else:
                        extra = routing_attended_pairs(q, k, **p)
            num = den = 0.0
            recalls = []
            for (a, b), (ref_out, probs) in zip(segments, refs):
                num += float(((out[:, :, a:b].double() - ref_out) ** 2).sum())
                den += float((ref_out ** 2).sum())
                pairs = attended_rows(name, mech, q, k, n, a, b, extra)
                if name.startswith("topk_"):
                    recalls.append(probs.topk(min(mech.params["top_k"], n), dim=-1).values.sum(-1).flatten())
                elif pairs is not None:
                    recalls.append((probs * pairs.to(probs.dtype)).sum(-1).flatten())
            row["rel_err"] = (num / den) ** 0.5
            row["recall"] = float(torch.cat(recalls).mean()) if recalls else None
            result["rows"].append(row)
            recall = "-" if row["recall"] is None else f"{row['recall']:.3f}"
            print(f"{kind:>7} N={n:>6} {name:<18} rel_err {row['rel_err']:.3e}  recall {recall}", file=sys.stderr)
        write_json(args.out, result)
    if args.plot:
        plot(result, args.plot)
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["inputs"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rows = [r for r in result["rows"] if r["inputs"] == kind]
        for name in dict.fromkeys(r["mechanism"] for r in rows):
            pts = sorted((r["N"], r["rel_err"]) for r in rows if r["mechanism"] == name)
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N")
        ax.set_ylabel("relative output error vs dense causal softmax")
        ax.set_title(f"{kind} inputs")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
