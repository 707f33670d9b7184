"""P ranks in one process: the same plan and step kernels as the distributed schemes, with
communication replaced by slicing. For testing the step kernels and the planner at GPU shapes
on one device, and for measuring the compute overhead of the split against one unsplit call."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..backends.registry import AttentionCall, get_backend
from ..patterns import Pattern
from .attention import _accumulation_dtype, _pack, _pick_backend, choose_sharding, merge_step, step_buffers
from .plan import plan_context_parallel
from .sharding import Sharding

__all__ = ["simulate_context_parallel", "Simulation"]


@dataclass
class Simulation:
    out: torch.Tensor  # [B, Hq, N, Dv] in global order
    lse: torch.Tensor  # [B, Hq, N]
    grads: tuple | None  # (dq, dk, dv) when dout was given
    sharding: Sharding
    backend: str
    forward_seconds: list = field(default_factory=list)  # per rank: its steps' compute
    backward_seconds: list = field(default_factory=list)
    steps: list = field(default_factory=list)  # per rank: number of steps
    keys_received: list = field(default_factory=list)  # per rank: keys from other ranks


def _timed(fn, sync):
    sync()
    t0 = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - t0


def simulate_context_parallel(q, k, v, pattern: Pattern, world_size: int, *, sharding: Sharding | None = None,
                              backend: str = "auto", scale: float | None = None, dout=None) -> Simulation:
    """q [B, Hq, N, D], k, v [B, Hkv, N, D/Dv]: the whole sequence. Runs each of `world_size`
    ranks' steps (the backend's forward per step, merged by log-sum-exp in fp32; with `dout`,
    `backward_from_stats` per step and dK/dV summed back in rank order), timing each rank's
    compute (synchronised wall time per step, summed). Returns the unsharded out, lse, grads."""
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a Pattern, got {type(pattern).__name__}")
    n = q.shape[2]
    call = AttentionCall.of(q.detach(), k.detach(), v.detach(), pattern, 0, True)
    chosen, why = _pick_backend(backend, call)
    if why:
        raise ValueError(f"backend={backend!r}: " + "; ".join(why))
    block = chosen.block_sizes(call)
    layout = pattern.layout(n, block_q=block[0], block_kv=block[1], device=q.device)
    if sharding is None:
        sharding = choose_sharding(pattern, layout, n, world_size, math.lcm(*block))
    plan = plan_context_parallel(layout, sharding)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    sync = torch.cuda.synchronize if q.device.type == "cuda" else (lambda: None)
    acc = _accumulation_dtype(q.dtype)
    d = q.shape[3]
    sim = Simulation(None, None, None, sharding, chosen.name)
    outs, lses, dqs = [], [], []
    dkv = torch.zeros(*k.shape[:3], d + v.shape[3], dtype=acc, device=q.device) if dout is not None else None
    positions = [sharding.positions(r, q.device) for r in range(world_size)]
    q, k, v = q.detach(), k.detach(), v.detach()
    for r in range(world_size):
        q_r = q.index_select(2, positions[r])
        acc_out = torch.zeros(*q_r.shape[:3], v.shape[3], dtype=acc, device=q.device)
        acc_lse = torch.full(q_r.shape[:3], float("-inf"), dtype=acc, device=q.device)
        fwd, bufs = 0.0, {}
        for step in plan.steps_of(r):
            # "communication": the source's keys, sliced from the whole sequence
            message = _pack(k, v, step.keys.to(q.device))
            bufs[step.source] = step_buffers(step, message, d)
            (o, l), secs = _timed(lambda: chosen.forward(q_r, *bufs[step.source], step.layout, scale, True), sync)
            fwd += secs
            merge_step(acc_out, acc_lse, o, l)
        out_r, lse_r = acc_out.to(q.dtype), acc_lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
        outs.append(out_r)
        lses.append(lse_r)
        sim.forward_seconds.append(fwd)
        sim.steps.append(len(bufs))
        sim.keys_received.append(sum(s.num_keys for s in plan.steps_of(r) if s.source != r))
        if dout is not None:
            do_r = dout.index_select(2, positions[r])
            dq_r, bwd = torch.zeros(q_r.shape, dtype=acc, device=q.device), 0.0
            for step in plan.steps_of(r):
                (dq_s, dk_s, dv_s), secs = _timed(lambda: chosen.backward_from_stats(
                    q_r, *bufs[step.source], step.layout, scale, out_r, lse_r, do_r), sync)
                bwd += secs
                dq_r += dq_s.to(acc)
                slots = step.slots.to(q.device)
                dkv.index_add_(2, step.keys.to(q.device), torch.cat([dk_s.index_select(2, slots),
                                                                     dv_s.index_select(2, slots)], -1).to(acc))
            dqs.append(dq_r.to(q.dtype))
            sim.backward_seconds.append(bwd)
        del bufs
    sim.out = sharding.unshard(outs, dim=2)
    sim.lse = sharding.unshard([x[..., None] for x in lses], dim=2)[..., 0]
    if dout is not None:
        sim.grads = (sharding.unshard(dqs, dim=2), dkv[..., :d].to(k.dtype), dkv[..., d:].to(v.dtype))
    return sim
