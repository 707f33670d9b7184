"""Our Performer and LSH attention against the implementations users know, on the same inputs
in the same process: performer-pytorch (`FastAttention`) and reformer-pytorch (`LSHAttention`).

    pip install -c <(echo torch==2.13.0) performer-pytorch reformer-pytorch   # the peers (not our deps)
    python benchmarks/peers_cpu.py

B=1, H=4, D=64, fp32, CPU. For each N and setting, both implementations get the same q, k, v
(drawn per seed); error = ||out - ref||_F / ||ref||_F against dense float64 attention with the
same semantics, averaged over --seeds draws (random features / rotations drawn anew per seed
on both sides); time = median of torch.utils.benchmark runs.
* Performer (softmax kernel, 256 orthogonal features): ref = softmax(q k^T / sqrt(D)),
  causal or not.
  `performer_planted*`: the same on fidelity.py's planted inputs (a few keys carry most of each
  query's softmax mass), where attention is far from uniform. performer-pytorch adds 1e-4 to
  every feature before normalising (its `eps`), which pulls its output towards the uniform
  average: close to the truth for random inputs (near-uniform attention), not for peaked ones.
* LSH (shared-QK, bucket 64, 4 rounds): ref = softmax over keys k = q / |q| without the token
  itself (Reformer's attention), i.e. the dense attention LSH approximates; reformer-pytorch
  runs with its defaults (duplicates across rounds not corrected), ours corrects them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, progress, time_cpu, write_json  # noqa: E402

from fidelity import make_inputs as planted_inputs  # noqa: E402

from sparse_attn import lsh_attention, performer_attention  # noqa: E402


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def dense(q, k, v, causal: bool, no_self: bool = False):
    q, k, v = (t.double() for t in (q, k, v))
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    n = q.shape[2]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    masked = (j > i) if causal else torch.zeros(n, n, dtype=torch.bool)
    if no_self:
        alone = masked | (j == i)
        lonely = alone.all(-1, keepdim=True)  # a row with nothing but itself keeps itself (Reformer)
        masked = torch.where(lonely, masked, alone)
    return torch.softmax(s.masked_fill(masked, float("-inf")), -1) @ v


def peers():
    try:
        from performer_pytorch import FastAttention
        from reformer_pytorch import LSHAttention
    except ImportError as exc:
        raise SystemExit(f"peers_cpu.py needs performer-pytorch and reformer-pytorch ({exc}); see the docstring")
    return FastAttention, LSHAttention


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--out", type=Path, default=RESULTS / "peers_cpu.json")
    args = ap.parse_args(argv)
    FastAttention, LSHAttention = peers()
    import performer_pytorch
    import reformer_pytorch

    env = environment("cpu")
    env["performer_pytorch"] = getattr(performer_pytorch, "__version__", None) or _dist_version("performer-pytorch")
    env["reformer_pytorch"] = getattr(reformer_pytorch, "__version__", None) or _dist_version("reformer-pytorch")
    result = {"env": env, "setup": f"B=1, H={args.heads}, D={args.dim}, fp32, CPU, {args.seeds} seeds", "rows": []}
    b, h, d = 1, args.heads, args.dim
    jobs = [(n, what) for n in args.lengths for what in ("performer", "performer_causal", "performer_planted",
                                                          "performer_planted_causal", "lsh", "lsh_causal")]
    for n, what in progress(jobs, desc="peers", unit="setting"):
        causal = what.endswith("causal")
        errs = {"sparse_attn": [], "peer": []}
        calls = {}
        for seed in range(args.seeds):
            gen = torch.Generator().manual_seed(1000 * n + seed)
            q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
            if "planted" in what:  # causal planted keys (every query's targets precede it)
                q, k, v = (t.float() for t in planted_inputs("planted", n, h, d, 4, 4.0, seed=1000 * n + seed))
            if what.startswith("performer"):
                ref = dense(q, k, v, causal)
                torch.manual_seed(seed)
                peer = FastAttention(dim_heads=d, nb_features=256, causal=causal)
                feat_gen = torch.Generator().manual_seed(seed)
                ours_fn = lambda q=q, k=k, v=v, g=feat_gen: performer_attention(  # noqa: E731
                    q, k, v, num_features=256, causal=causal, generator=g)
                peer_fn = lambda q=q, k=k, v=v, peer=peer: peer(q, k, v)  # noqa: E731
            else:
                keys = q / q.norm(dim=-1, keepdim=True)
                ref = dense(q, keys, v, causal, no_self=True)
                torch.manual_seed(seed)
                peer = LSHAttention(bucket_size=64, n_hashes=4, causal=causal)
                ours_fn = lambda q=q, v=v, s=seed: lsh_attention(  # noqa: E731
                    q, None, v, bucket_size=64, n_hashes=4, causal=causal, shared_qk=True, seed=s)
                peer_fn = lambda q=q, v=v, peer=peer: peer(  # noqa: E731
                    q.reshape(b * h, n, d), v.reshape(b * h, n, d))[0].reshape(b, h, n, d)
            with torch.no_grad():
                errs["sparse_attn"].append(rel_err(ours_fn(), ref))
                errs["peer"].append(rel_err(peer_fn(), ref))
                if seed == 0:
                    calls = {"sparse_attn": ours_fn, "peer": peer_fn}
        with torch.no_grad():
            times = {name: time_cpu(fn) for name, fn in calls.items()}
        row = {"N": n, "setting": what, "peer": "performer-pytorch FastAttention" if what.startswith("performer")
               else "reformer-pytorch LSHAttention",
               "rel_err_sparse_attn": statistics.mean(errs["sparse_attn"]), "rel_err_peer": statistics.mean(errs["peer"]),
               "ms_sparse_attn": times["sparse_attn"] * 1e3, "ms_peer": times["peer"] * 1e3}
        print(row, file=sys.stderr)
        result["rows"].append(row)
        write_json(args.out, result)
    return 0


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
