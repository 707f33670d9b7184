"""Context parallelism simulated on one device: P ranks' kernel launches (the same plan, launches
and backend calls as the distributed scheme: one call per rank for halo / all-to-all, one per
step for the ring; communication replaced by slicing), timed launch by launch, against one
unsplit call. Goal (issue #19): the sum over ranks of their compute <= 1.1x the unsplit call
for windows at 128K, P = 2, 4, 8 (bf16, H=16, Hkv=8, D=128, triton).

    PYTHONPATH=src python3 benchmarks/cp_simulate.py --out $OUT/cp_simulate.json          # H200
    TRITON_INTERPRET=1 python benchmarks/cp_simulate.py --device cpu --lengths 256 --heads 2 \\
        --kv-heads 1 --dim 16 --dtype float32 --window 64 --world-sizes 2 --out /tmp/cp_sim.json   # CPU dry run

Per (pattern, N, P): `forward_ratio` = sum over ranks and launches of the launch forward's time /
the unsplit forward's time (both `backend.forward(..., return_lse=True)` over a layout);
`backward_ratio` likewise for `backward_from_stats` (the unsplit one from its own out/lse);
`max_rank_forward_ratio`: the slowest rank against the unsplit call (ideal 1/P);
`assemble_ratio`: the sum over ranks of filling the launches' kv buffers from the received keys
(memory copies outside the kernels, not in forward_ratio) against the unsplit forward.
With --global-rows (plan and simulation with `global_rows=True`): the global rows' calls (each
source's partial over its own keys, `attention._global_forward` / `_global_backward`) are timed
too and counted on the source that runs them (`rank_global_forward_s`, included in the rank
totals and ratios; `global_forward_ratio` alone).

    PYTHONPATH=src python3 benchmarks/cp_simulate.py --global-rows --patterns "P.longformer({w}, 64)" \
        "P.bigbird(128)" --out $OUT/cp_simulate_global.json                                  # H200 Also the
largest difference of the simulated output from the unsplit one. Timings: `common.time_gpu` on CUDA,
`common.time_cpu` otherwise.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, time_cpu, time_gpu, write_json  # noqa: E402

from sparse_attn import patterns as P  # noqa: E402
from sparse_attn.backends.registry import AttentionCall  # noqa: E402
from sparse_attn.distributed import choose_sharding, plan_context_parallel, simulate_context_parallel  # noqa: E402
from sparse_attn.distributed.attention import _pick_backend, launch_buffers, launches  # noqa: E402
from sparse_attn.distributed.simulate import simulated_messages  # noqa: E402


def global_row_seconds(plan, sharding, backend, q, k, v, out, lse, dout, scale, timer, backward: bool):
    """([P] forward, [P] backward seconds): the global rows' calls of `plan` (none without
    global rows), each (owner, source) step timed on its source, as attention._global_forward
    and _global_backward run them (the owner's rows against the source's own keys; out/lse of
    the unsplit call stand in for the merged ones the backward reads: same shapes, same work)."""
    world = sharding.world_size
    fwd, bwd = [0.0] * world, [0.0] * world
    dev = q.device
    for owner in range(world):
        steps = plan.global_steps_of_owner(owner)
        if not steps:
            continue
        pos = sharding.positions(owner, dev).index_select(0, plan.global_rows[owner].to(dev))
        q_rows, o_rows, do_rows = (t.index_select(2, pos) for t in (q, out, dout))  # [B, Hq, g, D]
        l_rows = lse.index_select(2, pos)
        for st in steps:
            index = sharding.positions(st.source, dev).index_select(0, st.kv_index.to(dev))
            kb, vb = k.index_select(2, index), v.index_select(2, index)
            fwd[st.source] += timer(lambda: backend.forward(q_rows, kb, vb, st.layout, scale, True))
            if backward:
                bwd[st.source] += timer(lambda: backend.backward_from_stats(q_rows, kb, vb, st.layout, scale, o_rows,
                                                                            l_rows, do_rows))
    return fwd, bwd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[131072])
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--patterns", nargs="+", default=["P.sliding_window({w})", "P.sliding_window({w}, causal=False)"],
                    help="pattern expressions ({w} is --window)")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--scheme", default="auto", choices=["auto", "halo", "ring", "alltoall"],
                    help="whose launches to time (auto: the plan's choice, halo for windows)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--global-rows", action="store_true",
                    help="plan with global_rows=True and time the global rows' calls on their sources")
    ap.add_argument("--out", type=Path, default=RESULTS / "cp_simulate.json")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    dev = torch.device(args.device)
    # one untimed call first: a step of a new shape compiles its kernels, which must not be timed
    timer = (lambda fn: (fn(), time_gpu(fn)[0])[1]) if dev.type == "cuda" else (lambda fn: time_cpu(fn, repeats=3))
    rows = []
    for n in args.lengths:
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(1, args.heads, n, args.dim, device=dev, dtype=dtype, generator=g)
        k = torch.randn(1, args.kv_heads, n, args.dim, device=dev, dtype=dtype, generator=g)
        v = torch.randn(1, args.kv_heads, n, args.dim, device=dev, dtype=dtype, generator=g)
        dout = torch.randn_like(q)
        scale = 1 / math.sqrt(args.dim)
        for code in args.patterns:
            code = code.format(w=args.window)
            pattern = eval(code, {"P": P})
            call = AttentionCall.of(q, k, v, pattern, 0, True)
            backend, why = _pick_backend(args.backend, call)
            if why:
                raise SystemExit(f"backend {args.backend}: {why}")
            bq, bk = backend.block_sizes(call)
            layout = pattern.layout(n, block_q=bq, block_kv=bk, device=dev)
            out, lse = backend.forward(q, k, v, layout, scale, True)
            unsplit_fwd = timer(lambda: backend.forward(q, k, v, layout, scale, True))
            unsplit_bwd = None if args.no_backward else \
                timer(lambda: backend.backward_from_stats(q, k, v, layout, scale, out, lse, dout))
            for p in args.world_sizes:
                sharding = choose_sharding(pattern, layout, n, p, math.lcm(bq, bk))
                plan = plan_context_parallel(layout, sharding, args.kv_heads, global_rows=args.global_rows)
                sim = simulate_context_parallel(q, k, v, pattern, p, sharding=sharding, scheme=args.scheme,
                                                backend=backend.name, global_rows=args.global_rows)
                err = (sim.out.float() - out.float()).abs().max().item()
                rank_fwd, rank_bwd, rank_assemble = [], [], []
                for r in range(p):
                    pos = sharding.positions(r, dev)
                    q_r, do_r = q.index_select(2, pos), dout.index_select(2, pos)
                    o_r, l_r = sim.out.index_select(2, pos), sim.lse.index_select(2, pos)
                    messages = simulated_messages(plan, r, k, v)
                    f = b = a = 0.0
                    for launch in launches(plan, r, sim.scheme):  # exactly the scheme's backend calls
                        kb, vb = launch_buffers(launch, messages, args.kv_heads, args.dim, plan.groups)
                        a += timer(lambda: launch_buffers(launch, messages, args.kv_heads, args.dim, plan.groups))
                        f += timer(lambda: backend.forward(q_r, kb, vb, launch.layout, scale, True))
                        if unsplit_bwd is not None:
                            b += timer(lambda: backend.backward_from_stats(q_r, kb, vb, launch.layout, scale, o_r,
                                                                           l_r, do_r))
                    rank_fwd.append(f)
                    rank_bwd.append(b)
                    rank_assemble.append(a)
                global_fwd, global_bwd = global_row_seconds(plan, sharding, backend, q, k, v, out, lse, dout, scale,
                                                            timer, backward=unsplit_bwd is not None)
                rank_fwd = [f + g for f, g in zip(rank_fwd, global_fwd)]
                rank_bwd = [b + g for b, g in zip(rank_bwd, global_bwd)]
                row = dict(pattern=code, n=n, world_size=p, backend=backend.name, scheme=sim.scheme,
                           sharding=sharding.describe(),
                           unsplit_forward_s=unsplit_fwd, rank_forward_s=rank_fwd,
                           forward_ratio=sum(rank_fwd) / unsplit_fwd,
                           max_rank_forward_ratio=max(rank_fwd) / unsplit_fwd,
                           unsplit_backward_s=unsplit_bwd, rank_backward_s=rank_bwd if unsplit_bwd else None,
                           backward_ratio=sum(rank_bwd) / unsplit_bwd if unsplit_bwd else None,
                           rank_assemble_s=rank_assemble, assemble_ratio=sum(rank_assemble) / unsplit_fwd,
                           steps=sim.steps, launches=sim.launches, max_abs_diff_vs_unsplit=err,
                           global_rows=args.global_rows, global_steps=sim.global_steps,
                           rank_global_forward_s=global_fwd, global_forward_ratio=sum(global_fwd) / unsplit_fwd,
                           rank_global_backward_s=global_bwd if unsplit_bwd else None)
                rows.append(row)
                print(f"{code:40s} N={n} P={p} {sim.scheme}" +
                      (f" + {sim.global_steps} global-row steps" if sim.global_steps else "") + f": forward sum/unsplit {row['forward_ratio']:.3f} (slowest "
                      f"rank {row['max_rank_forward_ratio']:.3f})" + (f", backward {row['backward_ratio']:.3f}"
                                                                       if unsplit_bwd else "") +
                      f", buffers {row['assemble_ratio']:.3f}, launches {sim.launches}, max diff {err:.2e}", flush=True)
                write_json(args.out, dict(benchmark="cp_simulate", goal="forward_ratio <= 1.1 for windows at 128K",
                                          shapes=dict(batch=1, heads=args.heads, kv_heads=args.kv_heads,
                                                      head_dim=args.dim, dtype=args.dtype, device=str(dev)),
                                          environment=environment(), rows=rows))


if __name__ == "__main__":
    main()
