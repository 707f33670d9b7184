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
                        choose_sharding, launch_grads, launches, merge_step, run_launches)
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
    global_steps: int = 0  # (owner, source) steps of the global-row exchange (global_rows=True)


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
                              dout=None, global_rows: bool = False) -> Simulation:
    """q [B, Hq, N, D], k, v [B, Hkv, N, D/Dv]: the whole sequence. Runs each of `world_size`
    ranks' launches under `scheme` ("halo" / "alltoall": one backend call per rank; "ring": one
    per step, merged by log-sum-exp in fp32; "auto": `choose_scheme` among these three), with
    `dout` also `backward_from_stats` per launch and dK/dV summed back in rank order, timing
    each launch (synchronised wall time). global_rows=True: the plan's global query rows are
    computed where their keys live, as `context_parallel_attention(global_rows=True)` does (each
    source's partial over its own keys merged in source order at the owner; the time counted on
    the source); "auto" is not simulated (it compares bytes the ranks agree on). Returns the
    unsharded out, lse, grads."""
    if not isinstance(global_rows, bool):
        raise ValueError(f"global_rows must be True or False here, got {global_rows!r}")
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
    plan = plan_context_parallel(layout, sharding, k.shape[1], global_rows=global_rows)
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
            dqs.append(dq_r)
            sim.backward_seconds.append(sum(bwd))
        del done
    if plan.has_global_rows:
        _simulate_global_rows(sim, plan, chosen, q, k, v, dout, outs, lses, dqs, dkv, scale, sync)
    sim.out = sharding.unshard(outs, dim=2)
    sim.lse = sharding.unshard([x[..., None] for x in lses], dim=2)[..., 0]
    if dout is not None:
        sim.grads = (sharding.unshard([x.to(q.dtype) for x in dqs], dim=2), dkv[..., :d].to(k.dtype),
                     dkv[..., d:].to(v.dtype))
    return sim


def _simulate_global_rows(sim, plan, backend, q, k, v, dout, outs, lses, dqs, dkv, scale, sync) -> None:
    """The global rows' exchange (attention._global_forward / _global_backward) with slicing for
    messages: each (owner, source) step runs on the source over its own keys; the owner's rows
    of `outs` / `lses` are replaced by the merge in source order, `dqs` and `dkv` added into."""
    sharding, acc = sim.sharding, _accumulation_dtype(q.dtype)
    bsz, hq, _, d = q.shape
    dv = v.shape[3]
    for owner in range(len(outs)):
        steps = plan.global_steps_of_owner(owner)
        if not steps:
            continue
        rows = plan.global_rows[owner].to(q.device)  # local indices of the owner's global rows
        q_rows = q.index_select(2, sharding.positions(owner, q.device).index_select(0, rows))
        acc_out = torch.zeros(bsz, hq, rows.numel(), dv, dtype=acc, device=q.device)
        acc_lse = torch.full((bsz, hq, rows.numel()), float("-inf"), dtype=acc, device=q.device)
        keys = []
        sim.global_steps += len(steps)
        for st in steps:  # source order: the merge's fixed order
            index = sharding.positions(st.source, q.device).index_select(0, st.kv_index.to(q.device))
            kb, vb = k.index_select(2, index), v.index_select(2, index)
            timed = []
            o, lse = _timed(lambda: backend.forward(q_rows, kb, vb, st.layout, scale, True), sync, timed)
            sim.forward_seconds[st.source] += timed[0]
            merge_step(acc_out, acc_lse, o.to(q.dtype), lse)
            keys.append((st, index, kb, vb))
        outs[owner] = outs[owner].index_copy(2, rows, acc_out.to(outs[owner].dtype))
        lses[owner] = lses[owner].index_copy(2, rows, acc_lse.to(lses[owner].dtype))
        if dout is None:
            continue
        out_rows, lse_rows = outs[owner].index_select(2, rows), lses[owner].index_select(2, rows)
        do_rows = dout.index_select(2, sharding.positions(owner, q.device).index_select(0, rows))
        total = torch.zeros(bsz, hq, rows.numel(), d, dtype=acc, device=q.device)
        for st, index, kb, vb in keys:  # source order: the dQ sum's fixed order
            timed = []
            dq_s, dk_s, dv_s = _timed(lambda: backend.backward_from_stats(q_rows, kb, vb, st.layout, scale, out_rows,
                                                                           lse_rows, do_rows), sync, timed)
            sim.backward_seconds[st.source] += timed[0]
            total += dq_s.to(acc)
            dkv[..., :d].index_add_(2, index, dk_s.to(acc))
            dkv[..., d:].index_add_(2, index, dv_s.to(acc))
        dqs[owner] = dqs[owner].index_add(2, rows, total.to(dqs[owner].dtype))
