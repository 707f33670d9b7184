"""P ranks in one process: the same plan, launches and step kernels as the distributed schemes
(`attention.launches`: one call per rank for halo / all-to-all, one per step for the ring), with
communication replaced by slicing. For testing the step kernels and the planner at GPU shapes
on one device, and for measuring the compute overhead of the split against one unsplit call."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..backends.registry import AttentionCall
from ..patterns import Pattern
from .attention import (SCHEMES, _Accumulator, _accumulation_dtype, _pack, _pick_backend, _put_rows, choose_scheme,
                        choose_sharding, launch_grads, launches, run_launches)
from .plan import ContextPlan, plan_context_parallel
from .sharding import Sharding

__all__ = ["simulate_context_parallel", "Simulation", "simulated_messages"]


@dataclass
class Simulation:
    out: torch.Tensor  # [B, Hq, N, Dv] in global order
    lse: torch.Tensor  # [B, Hq, N]
    grads: tuple | None  # (dq, dk, dv) when dout was given
    sharding: Sharding
    backend: str
    scheme: str = "halo"
    forward_seconds: list = field(default_factory=list)  # per rank: its launches' compute
    backward_seconds: list = field(default_factory=list)
    steps: list = field(default_factory=list)  # per rank: number of (rank, source) steps
    launches: list = field(default_factory=list)  # per rank: backend calls
    keys_received: list = field(default_factory=list)  # per rank: (group, key) rows from other ranks


def _timed(fn, sync, into: list):
    sync()
    t0 = time.perf_counter()
    result = fn()
    sync()
    into.append(time.perf_counter() - t0)
    return result


def simulated_messages(plan: ContextPlan, rank: int, k, v) -> dict:
    """{source: message}: what rank `rank` receives (and its own keys), sliced from the whole
    sequence's k, v [B, Hkv, N, D] instead of sent."""
    return {st.source: _pack(k, v, st, st.keys.to(k.device), plan.groups) for st in plan.steps_of(rank)}


def simulate_context_parallel(q, k, v, pattern: Pattern, world_size: int, *, sharding: Sharding | None = None,
                              scheme: str = "auto", backend: str = "auto", scale: float | None = None,
                              dout=None) -> Simulation:
    """q [B, Hq, N, D], k, v [B, Hkv, N, D/Dv]: the whole sequence. Runs each of `world_size`
    ranks' launches under `scheme` ("halo" / "alltoall": one backend call per rank; "ring": one
    per step, merged by log-sum-exp in fp32; "auto": `choose_scheme` among these three), with
    `dout` also `backward_from_stats` per launch and dK/dV summed back in rank order, timing
    each launch (synchronised wall time). Returns the unsharded out, lse, grads."""
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a Pattern, got {type(pattern).__name__}")
    if scheme not in SCHEMES or scheme == "ulysses":
        raise ValueError(f"scheme must be one of {tuple(s for s in SCHEMES if s != 'ulysses')} (ulysses runs "
                         f"the ordinary single-process call per head group: nothing to simulate), got {scheme!r}")
    n = q.shape[2]
    call = AttentionCall.of(q.detach(), k.detach(), v.detach(), pattern, 0, True)
    chosen, why = _pick_backend(backend, call)
    if why:
        raise ValueError(f"backend={backend!r}: " + "; ".join(why))
    block = chosen.block_sizes(call)
    layout = pattern.layout(n, block_q=block[0], block_kv=block[1], device=q.device)
    if sharding is None:
        sharding = choose_sharding(pattern, layout, n, world_size, math.lcm(*block))
    plan = plan_context_parallel(layout, sharding, k.shape[1])
    if scheme == "auto":
        scheme = choose_scheme(plan, False, 0, 1)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    sync = torch.cuda.synchronize if q.device.type == "cuda" else (lambda: None)
    acc_dtype = _accumulation_dtype(q.dtype)
    d, hkv, groups = q.shape[3], k.shape[1], plan.groups
    sim = Simulation(None, None, None, sharding, chosen.name, scheme)
    outs, lses, dqs = [], [], []
    dkv = torch.zeros(*k.shape[:3], d + v.shape[3], dtype=acc_dtype, device=q.device) if dout is not None else None
    q, k, v = q.detach(), k.detach(), v.detach()
    for r in range(world_size):
        pos = sharding.positions(r, q.device)
        q_r = q.index_select(2, pos)
        todo = launches(plan, r, scheme)
        sim.launches.append(len(todo))
        acc = _Accumulator(q_r, v.shape[3], len(todo))
        fwd, bwd = [], []
        done = run_launches(chosen, q_r, todo, simulated_messages(plan, r, k, v), hkv, d, groups, scale,
                            on_launch=lambda fn: _timed(fn, sync, fwd))
        for _, _, o, lse in done:
            acc.add(o, lse)
        out_r, lse_r = acc.result()
        outs.append(out_r)
        lses.append(lse_r)
        sim.forward_seconds.append(sum(fwd))
        sim.steps.append(len(plan.steps_of(r)))
        sim.keys_received.append(sum(s.num_keys for s in plan.steps_of(r) if s.source != r))
        if dout is not None:
            do_r = dout.index_select(2, pos)
            dq_r = torch.zeros(q_r.shape, dtype=acc_dtype, device=q.device)
            for launch, (kb, vb), _, _ in done:
                dq_s, dk_s, dv_s = _timed(lambda: chosen.backward_from_stats(
                    q_r, kb, vb, launch.layout, scale, out_r, lse_r, do_r), sync, bwd)
                dq_r += dq_s.to(acc_dtype)
                for source, rows in launch_grads(launch, dk_s, dv_s, groups).items():
                    step = plan.steps[(r, source)]
                    # dK/dV rows "sent back" to their owner: global positions here
                    _put_rows(dkv, step.key_group.to(q.device), step.keys.to(q.device), rows.to(acc_dtype), groups,
                              add=True)
            dqs.append(dq_r.to(q.dtype))
            sim.backward_seconds.append(sum(bwd))
        del done
    sim.out = sharding.unshard(outs, dim=2)
    sim.lse = sharding.unshard([x[..., None] for x in lses], dim=2)[..., 0]
    if dout is not None:
        sim.grads = (sharding.unshard(dqs, dim=2), dkv[..., :d].to(k.dtype), dkv[..., d:].to(v.dtype))
    return sim
