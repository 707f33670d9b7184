"""Issue #20: context parallelism on P GPUs against one GPU, under torchrun. For each row
(pattern, N, scheme): the time of the P-rank call (forward; forward+backward) against the one-GPU
unsplit call on the same total length, the bytes each rank sends against the planner's count,
the analytic minimum and a ring's, how much of the communication the compute hides, and the
output and gradients against the unsplit call's.

    NCCL_NVLS_ENABLE=0 PYTHONPATH=src torchrun --nproc-per-node 2 benchmarks/cp_scaling.py \\
        --out $OUT/cp_scaling.json [--matrix bands|sparse|issue] [--budget-s 480]      # 2 GPUs
    PYTHONPATH=src torchrun --nproc-per-node 2 benchmarks/cp_scaling.py --device cpu --heads 2 \\
        --kv-heads 1 --dim 16 --window 64 --globals 8 --bigbird-block 32 \\
        --rows window:512:auto causal:512:ring --out /tmp/cp_scaling.json              # CPU smoke test (gloo)

benchmarks/cp_gpu2.sh runs it (and the training comparison) on a 2-GPU machine. Rows are
`pattern:N:scheme` (`--rows`, N may be written 256K or 1M) or a preset (`--matrix`, default
"issue": both presets):
  bands   window (causal 4096-window) and longformer (4096 window + 64 global tokens, bidirectional)
          at 256K, 512K, 1M with schemes auto, ring, plain_ring (and torch_cp at 256K: a row that
          records why it does not apply);
  sparse  bigbird (blocks of 128) and causal at 256K with auto, alltoall, ring, plain_ring, and
          torch_cp for causal.
Schemes: those of `context_parallel_attention` (auto, halo, ring, alltoall, ulysses) and
  plain_ring  our ring scheme with a plain ring's traffic (`BenchComm(pad=...)`): every round
              moves, whether or not the plan needs anything from that pair, the whole shard of
              the rank holding the keys (forward k, v: a rank receives the N - N_r keys of the
              others; backward as many dK/dV back), with our block-skipping compute, so ring vs
              plain_ring isolates the bytes and the skipped rounds. Global rows are off (a plain
              ring moves every key to every rank anyway);
  torch_cp    torch.distributed.tensor.experimental.context_parallel around SDPA (flash /
              efficient / cuDNN only, is_causal=True; its head-tail load balancer = our zigzag),
              causal only: SDPA expresses no window, global or random pattern without an N x N
              mask. Its bytes are not counted by us; they are computed from its algorithm
              (`torch_cp_bytes`).
B=1, Hq=16, Hkv=8, D=128, bf16 by default; the backend is the device's preferred layout backend
(triton on CUDA, blocked on CPU), the same for the unsplit and the split calls.

Definitions (JSON `definitions`, per row):
* times: median over --repeats calls after --warmup calls; each call is bracketed by a device
  synchronisation and a barrier, and a call's P-rank time is the slowest rank's (all-reduce max).
  The forward runs under no_grad; forward+backward is out = f(q, k, v) and autograd.grad(out,
  (q, k, v), dout). One-GPU: the unsplit `sparse_attention` call on rank 0 while the others wait
  (skipped with the reason when it does not fit: out of memory). speedup = one-GPU / P-rank.
* bytes (per rank, sent): `measured` = Comm.stats of one call (kinds kv, gq, gout, a2a forward;
  dkv, gdo, gdq, a2a_grad backward; the shape agreement "agree" apart); `planned` = the planner's
  count for the plan the call used (ContextPlan.bytes_sent / bytes_received / global_bytes,
  ulysses_bytes for Ulysses); `analytic_min` = keys some query of another rank may attend, at key
  granularity, from the pattern's definition (windows, causal: the band's reach; Longformer: the
  band of the non-global rows plus the global keys, and the global rows' q out and (out, lse) back
  at row granularity, while the plan moves whole 128-row blocks), None for BigBird (random blocks:
  the planner's key-granular count is the minimum by construction; the gloo tests check it against
  the dense mask at small N); `ring` = a ring's count: received (N - N_r) keys, sent (P - 1) N_r
  keys forward, N - N_r keys of dK/dV backward. `measured_equals_expected`: measured = planned
  (plain_ring: = ring).
* overlap: `compute_alone` = the same call with the transport replaced by zero-filled receive
  buffers (BenchComm(network=False): packing, kernels, merges, no network); `comm_alone` = the
  call's transfers replayed with no compute (the posts and waits it made, in its order, with
  buffers allocated before the clock starts); hidden_share = 1 - (total - compute_alone) /
  comm_alone clipped to [0, 1]: 1 when the transfers cost nothing on top of the compute, 0 when
  all of their time adds to it. When comm_alone is within the spread of the totals the share is
  noise (`below_noise`). `backward_derived`: the same for the backward alone, from the medians
  (forward_backward less forward).
What overlaps in the implementation: the ring posts round t+1 before computing round t (at P=2
its single transfer overlaps the local step); halo and all-to-all wait for every key before their
single launch, and every backward computes first and then sends dK/dV (no overlap), as do the
global-row exchanges. With NCCL the transfers run on NCCL's stream, so a posted transfer does
proceed while the default stream computes; with gloo on a CPU, in gloo's threads.

The JSON (rank 0) is rewritten after every row with the rows so far, the settings and
`environment()`; --budget-s stops starting new rows once that many seconds have passed (rank 0's
clock, broadcast), so a command cut off at its time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, write_json  # noqa: E402

from sparse_attn import patterns as P  # noqa: E402
from sparse_attn import sparse_attention  # noqa: E402
from sparse_attn.backends.registry import AttentionCall  # noqa: E402
from sparse_attn.distributed import Comm, choose_sharding, context_parallel_attention, zigzag  # noqa: E402
from sparse_attn.distributed.attention import _agree, _pick_backend  # noqa: E402
from sparse_attn.distributed.comm import Pending  # noqa: E402
from sparse_attn.distributed.ulysses import ulysses_bytes  # noqa: E402

PATTERNS = {  # name -> expression ({window}, {globals}, {block} from the flags)
    "window": "P.sliding_window({window})",
    "longformer": "P.longformer({window}, {globals})",
    "bigbird": "P.bigbird({block})",
    "causal": "P.causal()",
}
K = 1024
MATRIX = {
    # torch_cp once per band pattern: a row that records why it does not apply (no SDPA mask for it)
    "bands": [(p, n, s) for p in ("window", "longformer") for n in (256 * K, 512 * K, 1024 * K)
              for s in ("auto", "ring", "plain_ring") + (("torch_cp",) if n == 256 * K else ())],
    # BigBird first: its rows are cheap; causal at 256K costs ~1 s a forward+backward on one GPU
    "sparse": [(p, 256 * K, s) for p in ("bigbird", "causal") for s in ("auto", "alltoall", "ring", "plain_ring")]
    + [("causal", 256 * K, "torch_cp")],
}
MATRIX["issue"] = MATRIX["bands"] + MATRIX["sparse"]
SCHEMES = ("auto", "halo", "ring", "alltoall", "ulysses", "plain_ring", "torch_cp")
FORWARD_KINDS = ("kv", "gq", "gout", "a2a")
BACKWARD_KINDS = ("dkv", "gdo", "gdq", "a2a_grad")
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

DEFINITIONS = {
    "time": "median over repeats after warm-up; each call between a device synchronisation and a barrier; P-rank "
            "time = the slowest rank's (all-reduce max); forward under no_grad, forward_backward = forward + "
            "autograd.grad(out, (q, k, v), dout)",
    "one_gpu": "the unsplit sparse_attention call of the whole sequence on rank 0 (same backend); skipped with the "
               "reason when out of memory",
    "speedup": "one_gpu time / P-rank time",
    "bytes": "per rank, sent, per layer (one attention call): measured = Comm.stats (forward kinds kv, gq, gout, a2a; "
             "backward dkv, gdo, gdq, a2a_grad); planned = the planner's count for the plan used; analytic_min = "
             "keys other ranks' queries may attend, at key granularity, from the pattern's definition (Longformer: "
             "plus the global rows' exchange at row granularity; None for BigBird); ring = a ring's k, v: received "
             "(N - N_r) keys, sent (P - 1) N_r keys forward and N - N_r keys of dK, dV backward",
    "overlap": "compute_alone = the call with zero-filled receives instead of transfers; comm_alone = the call's "
               "recorded transfers replayed with no compute; hidden_share = 1 - (total - compute_alone) / comm_alone "
               "clipped to [0, 1]; below_noise when comm_alone < the spread (max - min) of the totals",
    "plain_ring": "our ring scheme where every round moves the whole shard of the keys' holder (kv and dkv), busy "
                  "pair or not (a plain ring's traffic), same block-skipping compute; global rows off",
    "torch_cp": "torch.distributed.tensor.experimental.context_parallel + SDPA(is_causal=True), flash / efficient / "
                "cuDNN kernels only; bytes computed from its algorithm, not measured",
}


# ---------------------------------------------------------------------------- transport
class BenchPending(Pending):
    """A `Pending` with what the benchmark's Comm needs at `wait`: rows to keep per source (plain
    ring padding) and the index of its post in the recording."""

    def __init__(self, pending: Pending, trim: dict | None, event: int | None) -> None:
        super().__init__(pending.requests, pending.received, pending.keep)
        self.trim, self.event = trim, event


class BenchComm(Comm):
    """A `Comm` with three switches, for the measurements:
    network=False: nothing is sent; every receive is a zero-filled buffer of its shape (the bytes
    are counted as if sent): the call's compute alone;
    pad=sharding (with the ring scheme): a plain ring's traffic. Round t of a ring (the ring posts
    its rounds 1 .. P-1 in order, forward "kv" and backward "dkv") sends to rank r+t and receives
    from r-t whether or not the plan has keys for that pair, every message padded to the whole
    shard of the rank holding its keys (zeros where the plan has nothing; the receiver keeps the
    plan's rows and drops a message it did not ask for);
    record=True: every post (shapes, dtype, kind) and wait is kept in `events`, to replay the
    transfers alone (`replay`)."""

    def __init__(self, group, *, network: bool = True, pad=None, message: tuple | None = None,
                 record: bool = False) -> None:
        super().__init__(group)
        self.network, self.pad = network, pad
        self.message = message  # (batch, kv heads, D + Dv) of a kv message
        self.events = [] if record else None
        self._round: dict = {}

    def _whole(self, shape, holder: int) -> tuple:
        # a message [B, Hkv / G, n, D + Dv] carries (group, key) rows: a whole shard is G * N_holder rows
        if shape is None:
            b, h, w = self.message
            return (b, h, self.pad.length(holder), w)
        return (*shape[:2], (self.message[1] // shape[1]) * self.pad.length(holder), shape[3])

    def _padded(self, op, sends, recv_shapes, dtype, device, kind):
        if self.pad is None or op != "p2p" or kind not in ("kv", "dkv"):
            return sends, recv_shapes, None
        p, rank = self.world_size, self.rank
        t = self._round.get(kind, 0) % (p - 1) + 1
        self._round[kind] = t
        dst, src = (rank + t) % p, (rank - t) % p
        if set(sends) - {dst} or set(recv_shapes) - {src}:
            raise ValueError(f"plain-ring padding expects ring round {t} (to {dst}, from {src}), got sends to "
                             f"{sorted(sends)} and receives from {sorted(recv_shapes)}: use scheme='ring'")
        send_holder, recv_holder = (rank, src) if kind == "kv" else (dst, rank)
        t_send = sends.get(dst)
        whole = self._whole(None if t_send is None else t_send.shape, send_holder)
        if t_send is None:
            out_sends = {dst: torch.zeros(whole, dtype=dtype, device=device)} if whole[2] else {}
        else:
            extra = whole[2] - t_send.shape[2]
            out_sends = {dst: torch.cat([t_send, t_send.new_zeros(*whole[:2], extra, whole[3])], 2) if extra > 0
                         else t_send}
        shape = recv_shapes.get(src)
        whole = self._whole(shape, recv_holder)
        out_recv = {src: (*whole[:2], max(whole[2], shape[2] if shape else 0), whole[3])} if whole[2] or shape else {}
        trim = {src: None if shape is None else shape[2]}
        return out_sends, out_recv, trim

    def _post(self, op: str, sends, recv_shapes, dtype, device, kind):
        sends, recv_shapes, trim = self._padded(op, sends, recv_shapes, dtype, device, kind)
        event = None
        if self.events is not None:
            event = len(self.events)
            self.events.append((op, {d: (tuple(t.shape), t.dtype) for d, t in sends.items()},
                                {s: tuple(sh) for s, sh in recv_shapes.items()}, dtype, kind))
        if self.network:
            pending = super().post(sends, recv_shapes, dtype, device, kind) if op == "p2p" else \
                super().post_all_to_all(sends, recv_shapes, dtype, device, kind)
        else:
            for t in sends.values():
                self.stats.add(kind, t.numel() * t.element_size())
            pending = Pending([], {s: torch.zeros(sh, dtype=dtype, device=device) for s, sh in recv_shapes.items()})
        return BenchPending(pending, trim, event)

    def post(self, sends, recv_shapes, dtype, device, kind):
        return self._post("p2p", sends, recv_shapes, dtype, device, kind)

    def post_all_to_all(self, sends, recv_shapes, dtype, device, kind):
        return self._post("a2a", sends, recv_shapes, dtype, device, kind)

    def wait(self, pending):
        got = super().wait(pending)
        if self.events is not None and getattr(pending, "event", None) is not None:
            self.events.append(("wait", pending.event))
        trim = getattr(pending, "trim", None)
        if not trim:
            return got
        out = {}
        for src, t in got.items():
            keep = trim.get(src, t.shape[2])
            if keep is not None:  # None: a plain-ring message the plan did not ask for
                out[src] = t[:, :, :keep]
        return out


def replay(events: list, group, device):
    """A function that makes the recorded transfers again, in their order, with no compute; the
    send buffers are allocated now, not when it runs."""
    comm = Comm(group)
    sends = {i: {d: torch.zeros(shape, dtype=dtype, device=device) for d, (shape, dtype) in ev[1].items()}
             for i, ev in enumerate(events) if ev[0] != "wait"}

    def run():
        pending = {}
        for i, ev in enumerate(events):
            if ev[0] == "wait":
                comm.wait(pending.pop(ev[1]))
            else:
                post = comm.post if ev[0] == "p2p" else comm.post_all_to_all
                pending[i] = post(sends[i], ev[2], ev[3], device, ev[4])
        for p in pending.values():
            comm.wait(p)

    return run


# ---------------------------------------------------------------------------- timing
class Clock:
    def __init__(self, device: torch.device, local_rank: int) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.local_rank = local_rank

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        dist.barrier(device_ids=[self.local_rank]) if self.cuda else dist.barrier()

    def local(self, fn, repeats: int, warmup: int) -> list[float]:
        """One process alone: seconds per call."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return times

    def ranks(self, fn, repeats: int, warmup: int) -> list[float]:
        """Every rank: seconds per call of the slowest rank."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            self.sync()
            self.barrier()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        t = torch.tensor(times, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def from_rank0(self, value: float) -> float:
        t = torch.tensor([value if dist.get_rank() == 0 else 0.0], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())


def summary(times: list[float] | None) -> dict | None:
    if not times:
        return None
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "all_s": times}


def overlap(total: dict, compute: dict, comm: dict) -> dict:
    t, c, m = total["median_s"], compute["median_s"], comm["median_s"]
    exposed = t - c
    share = None if m <= 0 else min(1.0, max(0.0, 1.0 - exposed / m))
    return {"total": total, "compute_alone": compute, "comm_alone": comm, "exposed_comm_s": exposed,
            "hidden_share": share, "below_noise": m < (total["max_s"] - total["min_s"])}


# ---------------------------------------------------------------------------- bytes
def _intersect(a: list, b: list) -> int:
    """Positions in both unions of half-open intervals."""
    return sum(max(0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b)


def _subtract(runs: list, cut: tuple) -> list:
    out = []
    for s, e in runs:
        if e <= cut[0] or s >= cut[1]:
            out.append((s, e))
            continue
        if s < cut[0]:
            out.append((s, cut[0]))
        if e > cut[1]:
            out.append((cut[1], e))
    return out


def analytic_min_sent(name: str, args, n: int, sharding, dims: dict) -> tuple[list | None, str]:
    """Per rank, bytes sent in the forward by the analytic minimum (module docstring), and how."""
    p = sharding.world_size
    runs = [list(sharding.runs[r]) for r in range(p)]
    per_key = dims["batch"] * dims["kv_heads"] * (dims["head_dim"] + dims["v_head_dim"]) * dims["itemsize"]
    if name in ("window", "causal", "longformer"):
        if name == "window":
            lo, hi = 0, args.window - 1
        elif name == "causal":
            lo, hi = 0, n
        else:
            lo, hi = -(args.window // 2), args.window // 2
        g = args.globals if name == "longformer" else 0
        sent = [0] * p
        for r in range(p):
            rows = runs[r] if g == 0 else _subtract(runs[r], (0, g))  # global rows are computed elsewhere
            need = [(max(0, a - hi), min(n, b - lo)) for a, b in rows if b > a]
            if g and rows:
                need.append((0, g))  # everyone attends the global keys
            # the union, without counting twice, in a coarse but exact way: sweep the sorted intervals
            merged = []
            for s, e in sorted(need):
                if merged and s <= merged[-1][1]:
                    merged[-1] = (merged[-1][0], max(merged[-1][1], e))
                else:
                    merged.append((s, e))
            for s in range(p):
                if s != r:
                    sent[s] += _intersect(merged, runs[s]) * per_key
        how = "band reach at key granularity"
        if g:
            # the global rows' exchange: their owner sends g q rows to every other rank holding keys,
            # each of those returns (out, lse) of the rows
            row_q = dims["batch"] * dims["q_heads"] * dims["head_dim"] * dims["itemsize"]
            row_out = dims["batch"] * dims["q_heads"] * (dims["v_head_dim"] * dims["itemsize"] + dims["lse_itemsize"])
            holders = [s for s in range(p) if sharding.length(s)]
            for o in range(p):
                mine = _intersect(runs[o], [(0, g)])
                if not mine:
                    continue
                others = [s for s in holders if s != o]
                sent[o] += mine * row_q * len(others)
                for s in others:
                    sent[s] += mine * row_out
            how += f" for non-global rows, plus the {g} global keys and the global rows' q / (out, lse) at row granularity"
        return sent, how
    return None, ("random blocks: no closed form; the planner's key-granular count is the minimum by construction "
                  "(checked against the dense mask by tests/distributed at small N)")


def planned_sent(setup, dims: dict, sharding) -> tuple[list, list]:
    """Per rank, (forward, backward) bytes sent by the plan the call used."""
    p = sharding.world_size
    if setup.scheme == "ulysses":
        u = ulysses_bytes(sharding, dims["batch"], dims["q_heads"], dims["kv_heads"], dims["head_dim"],
                          dims["v_head_dim"], dims["itemsize"])
        return [u] * p, [u] * p  # the worst rank's (the formula's); the backward sends as many
    plan = setup.plan
    kv = dict(batch=dims["batch"], kv_heads=dims["kv_heads"], head_dim=dims["head_dim"],
              v_head_dim=dims["v_head_dim"], itemsize=dims["itemsize"])
    fwd, bwd = plan.bytes_sent(**kv).clone(), plan.bytes_received(**kv).clone()  # dK/dV return the keys received
    if plan.has_global_rows:
        g = plan.global_bytes(dims["batch"], dims["q_heads"], dims["head_dim"], dims["v_head_dim"], dims["itemsize"],
                              dims["lse_itemsize"])
        fwd += g["gq"][0] + g["gout"][0]
        bwd += g["gdo"][0] + g["gdq"][0]
    return [int(x) for x in fwd], [int(x) for x in bwd]


def ring_bytes(sharding, dims: dict) -> dict:
    """A ring's k, v per rank per forward: received (N - N_r) keys; sent (P - 1) N_r keys (every
    round carries the rank's shard to another rank); its backward returns as many dK / dV: sent
    N - N_r."""
    per_key = dims["batch"] * dims["kv_heads"] * (dims["head_dim"] + dims["v_head_dim"]) * dims["itemsize"]
    p, n = sharding.world_size, sharding.num_tokens
    return {"received_forward": [(n - sharding.length(r)) * per_key for r in range(p)],
            "sent_forward": [(p - 1) * sharding.length(r) * per_key for r in range(p)],
            "sent_backward": [(n - sharding.length(r)) * per_key for r in range(p)]}


def torch_cp_bytes(sharding, dims: dict, kv_heads: int) -> dict:
    """torch's ring (allgather rotation, its default): the forward all-gathers cat(k, v) of every
    shard once (a rank sends its shard to P - 1 others: NCCL's ring all-gather sends (P - 1) / P of
    the whole); the backward all-gathers k, v again and rotates dK / dV in float32 by all-to-all P
    times (`_templated_ring_attention_backward`)."""
    p = sharding.world_size
    shard = [sharding.length(r) * dims["batch"] * kv_heads * (dims["head_dim"] + dims["v_head_dim"])
             for r in range(p)]
    fwd = [(p - 1) * s * dims["itemsize"] for s in shard]
    bwd = [(p - 1) * s * dims["itemsize"] + p * s * 4 for s in shard]
    return {"forward": fwd, "backward": bwd,
            "how": "computed from torch's algorithm (allgather rotation): forward (P-1) x shard of k, v; backward "
                   "the same again plus P x shard of dK, dV in float32"}


# ---------------------------------------------------------------------------- rows
def parse_rows(specs: list[str]) -> list[tuple]:
    rows = []
    for spec in specs:
        try:
            name, n, scheme = spec.split(":")
            n = n.upper()
            n = int(n[:-1]) * K if n.endswith("K") else int(n[:-1]) * K * K if n.endswith("M") else int(n)
        except ValueError:
            raise SystemExit(f"--rows: {spec!r} is not pattern:N:scheme (e.g. window:256K:auto)")
        if name not in PATTERNS or scheme not in SCHEMES:
            raise SystemExit(f"--rows: {spec!r}: pattern must be one of {list(PATTERNS)}, scheme one of {SCHEMES}")
        rows.append((name, n, scheme))
    return rows


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def one_gpu(args, clock, pattern, q, k, v, dout, backend: str) -> tuple[dict, tuple | None]:
    """Rank 0: the unsplit call's times; (record, (out, dq, dk, dv) or None)."""
    record = {"forward": None, "forward_backward": None}
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    try:
        with torch.no_grad():
            record["forward"] = summary(clock.local(lambda: sparse_attention(q, k, v, pattern, backend=backend),
                                                    args.repeats, args.warmup))

        def fb():
            out = sparse_attention(q, k, v, pattern, backend=backend)
            return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))

        if clock.cuda:
            torch.cuda.reset_peak_memory_stats(clock.device)
        ref = fb()
        record["forward_backward"] = summary(clock.local(fb, args.repeats, max(0, args.warmup - 1)))
        if clock.cuda:
            record["peak_memory_bytes"] = torch.cuda.max_memory_allocated(clock.device)
        record["fits"] = True
        return record, ref
    except OOM as e:
        record.update(fits=False, reason=f"out of memory: {str(e).splitlines()[0]}")
        return record, None
    finally:
        free_memory()


def sdpa_kernels():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])


def gqa_variants(q, k, v):
    """(enable_gqa, k, v, how): SDPA's own GQA first, then k, v repeated to Hq heads (for kernels
    that refuse enable_gqa)."""
    yield True, k, v, "enable_gqa=True"
    g = q.shape[1] // k.shape[1]
    yield False, *(t.repeat_interleave(g, 1) for t in (k, v)), f"k, v repeated to {q.shape[1]} heads"


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


def sdpa_one_gpu(args, clock, q, k, v, dout) -> dict:
    """Rank 0: SDPA (is_causal, flash / efficient / cuDNN) on the whole sequence: torch_cp's baseline."""
    errors = []
    for gqa, kk, vv, how in gqa_variants(q, k, v):
        try:
            return {"gqa": how, **_sdpa_times(args, clock, gqa, q, kk, vv, dout)}
        except Exception as e:  # no kernel for these shapes (GQA, CPU), out of memory
            errors.append(f"{how}: {_first_line(e)}")
        finally:
            free_memory()
    return {"reason": " | ".join(errors)}


def _sdpa_times(args, clock, gqa: bool, q, k, v, dout) -> dict:
    import torch.nn.functional as F

    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with sdpa_kernels():
        def fwd():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

        with torch.no_grad():
            forward = summary(clock.local(fwd, args.repeats, args.warmup))
        both = summary(clock.local(lambda: torch.autograd.grad(fwd(), (q, k, v), dout), args.repeats, args.warmup))
    return {"forward": forward, "forward_backward": both}


def gather_to_rank0(t: torch.Tensor, sharding, dim: int = 2):
    """Rank 0: the whole tensor (shards put back in order); others: None."""
    comm = Comm(None)
    rank = comm.rank
    if rank == 0:
        shape = list(t.shape)
        recv = {}
        for r in range(1, comm.world_size):
            shape[dim] = sharding.length(r)
            recv[r] = tuple(shape)
        got = comm.exchange({}, recv, t.dtype, t.device, "check")
        got[0] = t
        return sharding.unshard([got[r] for r in range(comm.world_size)], dim=dim)
    comm.exchange({0: t}, {}, t.dtype, t.device, "check")
    return None


def check(ref, got: tuple, sharding, have_ref: bool) -> dict | None:
    """max |split - unsplit| of out, dq, dk, dv (rank 0; every rank takes part when rank 0 has
    the unsplit results). One tensor at a time, one head at a time: at 1M tokens a float32 copy
    of q's shape is 8 GiB."""
    if not have_ref:
        return None
    diff = {}
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        whole = gather_to_rank0(got[i].detach().contiguous(), sharding)
        if ref is not None:
            a, b = whole, ref[i]
            diff[f"{name}_max_abs_diff"] = max((a[:, h].float() - b[:, h].float()).abs().max().item()
                                               for h in range(a.shape[1]))
            diff[f"{name}_max_abs"] = max(b[:, h].float().abs().max().item() for h in range(b.shape[1]))
        del whole
    return diff if ref is not None else None


def run_scheme(args, clock, name, n, scheme, pattern, tensors, ref, have_ref, backend, block, dims) -> dict:
    q, k, v, dout = tensors
    rank, p = dist.get_rank(), dist.get_world_size()
    unit = math.lcm(*block)
    layout = pattern.layout(n, block_q=block[0], block_kv=block[1], device=q.device)
    sharding = choose_sharding(pattern, layout, n, p, unit)
    plain = scheme == "plain_ring"
    cp_scheme = "ring" if plain else scheme
    global_rows = False if plain else "auto"
    q_r, k_r, v_r = (sharding.shard(t, rank).detach().clone().requires_grad_() for t in (q, k, v))
    do_r = sharding.shard(dout, rank).contiguous()
    row = {"sharding": sharding.describe()}

    def comm(**kw):
        return BenchComm(None, pad=sharding if plain else None, message=(q.shape[0], k.shape[1], 2 * q.shape[3]),
                         **kw)

    def call(c):
        return context_parallel_attention(q_r, k_r, v_r, pattern, group=c, sharding=sharding, scheme=cp_scheme,
                                          backend=backend, global_rows=global_rows)

    def fwd(c):
        with torch.no_grad():
            return call(c)

    def fb(c):
        out = call(c)
        return (out, *torch.autograd.grad(out, (q_r, k_r, v_r), do_r))

    setup = _agree(Comm(None), q_r, k_r, v_r, pattern, sharding, cp_scheme, backend, None, global_rows)
    row["scheme_used"] = setup.scheme
    if setup.scheme != "ulysses":
        row["busy_pairs"] = setup.plan.busy_pairs()
        row["global_rows"] = sum(int(x.numel()) for x in setup.plan.global_rows.values())
    # the bytes of one call (also the first calls: kernels compiled, layouts and plans cached)
    real = comm()
    fwd(real)
    sent_f = dict(real.stats.bytes_sent)
    real.stats.reset()
    got = fb(real)
    sent_fb = dict(real.stats.bytes_sent)
    mine = {"forward": sum(sent_f.get(x, 0) for x in FORWARD_KINDS),
            "backward": sum(sent_fb.get(x, 0) for x in BACKWARD_KINDS),
            "agree": sent_f.get("agree", 0), "kinds_forward_backward": sent_fb}
    everyone = [None] * p
    dist.all_gather_object(everyone, mine)
    plan_f, plan_b = planned_sent(setup, dims, sharding)
    amin, how = analytic_min_sent(name, args, n, sharding, dims)
    measured_f = [e["forward"] for e in everyone]
    measured_b = [e["backward"] for e in everyone]
    ring = ring_bytes(sharding, dims)
    # what this row's transport should send: the plan, or for plain_ring a ring's whole shards
    want_f, want_b = (ring["sent_forward"], ring["sent_backward"]) if plain else (plan_f, plan_b)
    row["bytes"] = {
        "measured_forward": measured_f, "measured_backward": measured_b,
        "planned_forward": plan_f, "planned_backward": plan_b,
        "analytic_min_forward": amin, "analytic_min_how": how,
        "ring": ring,
        "agree": [e["agree"] for e in everyone], "kinds": [e["kinds_forward_backward"] for e in everyone],
        "expected": "ring (whole shards)" if plain else "planned",
        "measured_equals_expected": measured_f == want_f and (setup.scheme == "ulysses" or measured_b == want_b),
    }
    row["check"] = check(ref, got, sharding, have_ref)
    del got
    # timings: the call, the call without the network, the network without the call
    rec_f, rec_fb = comm(record=True), comm(record=True)
    fwd(rec_f)
    fb(rec_fb)
    local = comm(network=False)
    for mode, fn, events in (("forward", fwd, rec_f.events), ("forward_backward", fb, rec_fb.events)):
        total = summary(clock.ranks(lambda: fn(real), args.repeats, args.warmup))
        compute = summary(clock.ranks(lambda: fn(local), args.repeats, args.warmup))
        transfers = replay(events, None, q.device)
        comm_alone = summary(clock.ranks(transfers, args.repeats, args.warmup))
        row[mode] = overlap(total, compute, comm_alone)
        row[mode]["transfers"] = sum(1 for ev in events if ev[0] != "wait")
        del transfers
        free_memory()
    # the backward alone: forward_backward's medians less forward's
    f, fb_ = row["forward"], row["forward_backward"]
    t_b, c_b, m_b = (fb_[x]["median_s"] - f[x]["median_s"] for x in ("total", "compute_alone", "comm_alone"))
    row["backward_derived"] = {"total_s": t_b, "compute_alone_s": c_b, "comm_alone_s": m_b,
                               "exposed_comm_s": t_b - c_b,
                               "hidden_share": None if m_b <= 0 else min(1.0, max(0.0, 1.0 - (t_b - c_b) / m_b))}
    return row


def run_torch_cp(args, clock, name, n, tensors, ref) -> dict:
    """torch's context_parallel + SDPA (causal only)."""
    if name != "causal":
        return {"status": "skipped", "reason": "torch's context_parallel patches SDPA, which expresses causal "
                                               "attention or a dense N x N mask only, not this pattern"}
    q, k, v, dout = tensors
    p = dist.get_world_size()
    row = {"sharding": f"torch head-tail load balancer ({2 * p} chunks; = zigzag)"}
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental._attention import set_rotate_method

        mesh = init_device_mesh(clock.device.type, (p,))
        set_rotate_method("allgather")
    except Exception as e:
        return {"status": "failed", "reason": f"torch context_parallel unavailable: {type(e).__name__}: {e}"}
    errors = []
    for gqa, kk, vv, how in gqa_variants(q, k, v):  # enable_gqa where its kernels take it, else repeated k, v
        try:
            row.update(_torch_cp_once(args, clock, mesh, gqa, q, kk, vv, dout, ref), gqa=how)
        except Exception as e:
            errors.append(f"{how}: {_first_line(e)}")
            continue
        finally:
            free_memory()
        nkv = kk.shape[1]
        row["bytes"] = {"torch_cp": torch_cp_bytes(zigzag(n, p, 1), dims_of(args, q), nkv),
                        "ring": ring_bytes(zigzag(n, p, 1), dims_of(args, q))}
        row["overlap"] = "not measured: torch's transfers do not go through our Comm"
        return row
    return {"status": "failed", "reason": " | ".join(errors)}


def _torch_cp_once(args, clock, mesh, gqa: bool, q, k, v, dout, ref) -> dict:
    import torch.nn.functional as F
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import context_parallel_unshard

    row = {}
    bufs = [t.detach().clone() for t in (q, k, v, dout)]  # context_parallel shards them in place
    with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2] * 4, no_restore_buffers=set(bufs)), sdpa_kernels():
        ql, kl, vl = (t.detach().requires_grad_() for t in bufs[:3])

        def fwd():
            return F.scaled_dot_product_attention(ql, kl, vl, is_causal=True, enable_gqa=gqa)

        def fb():
            out = fwd()
            return (out, *torch.autograd.grad(out, (ql, kl, vl), bufs[3]))

        with torch.no_grad():
            row["forward"] = {"total": summary(clock.ranks(fwd, args.repeats, args.warmup))}
        row["forward_backward"] = {"total": summary(clock.ranks(fb, args.repeats, args.warmup))}
        with torch.no_grad():
            whole = context_parallel_unshard(mesh, [fwd()], [2])[0]
    if ref is not None and dist.get_rank() == 0:
        row["check"] = {"out_max_abs_diff": (whole.float() - ref[0].float()).abs().max().item(),
                        "out_max_abs": ref[0].float().abs().max().item(), "vs": "our unsplit call"}
    return row


def dims_of(args, q) -> dict:
    return dict(batch=args.batch, q_heads=args.heads, kv_heads=args.kv_heads, head_dim=args.dim,
                v_head_dim=args.dim, itemsize=q.element_size(), lse_itemsize=4 if q.dtype != torch.float64 else 8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=None, help="pattern:N:scheme ... (default: --matrix)")
    ap.add_argument("--matrix", choices=sorted(MATRIX), default="issue")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--globals", type=int, default=64, help="Longformer's global tokens (the first ones)")
    ap.add_argument("--bigbird-block", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="auto", help="the layout backend of both calls (auto: the device's)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=0.0, help="start no new row after this many seconds (0: none)")
    ap.add_argument("--no-one-gpu", action="store_true", help="skip the unsplit one-GPU calls (and the checks)")
    ap.add_argument("--collective-timeout-s", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "cp_scaling.json")
    args = ap.parse_args()
    began = time.time()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if "RANK" not in os.environ:
        raise SystemExit("run under torchrun: torchrun --nproc-per-node P benchmarks/cp_scaling.py ...")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=timedelta(seconds=args.collective_timeout_s),
                            **({"device_id": device} if device.type == "cuda" else {}))
    rank, world = dist.get_rank(), dist.get_world_size()
    clock = Clock(device, local_rank)
    dtype = getattr(torch, args.dtype)
    rows = parse_rows(args.rows) if args.rows else MATRIX[args.matrix]
    groups: dict = {}
    for name, n, scheme in rows:
        groups.setdefault((name, n), []).append(scheme)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"benchmark": "cp_scaling", "issue": 20, "world_size": world, "definitions": DEFINITIONS,
              "settings": settings, "rows_requested": [f"{a}:{b}:{c}" for a, b, c in rows],
              "environment": environment(device, nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"),
                                         backend_dist=dist.get_backend()),
              "rows": [], "stopped_by_budget": False, "complete": False}
    bar = None
    if rank == 0:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(rows), desc="cp_scaling", file=sys.stderr)
        except ImportError:
            pass

    def emit(row):
        row["elapsed_s"] = round(time.time() - began, 1)
        if rank == 0:
            result["rows"].append(row)
            write_json(args.out, result)
            if bar is not None:
                bar.update(1)
            line = f"{row['pattern']:10s} N={row['n']:>8d} {row['scheme']:10s} {row.get('status', 'ok'):7s}"
            for mode in ("forward", "forward_backward"):
                if isinstance(row.get(mode), dict) and row[mode].get("total"):
                    line += f" {mode} {row[mode]['total']['median_s'] * 1e3:.1f} ms"
                    if row.get(f"speedup_{mode}"):
                        line += f" (x{row[f'speedup_{mode}']:.2f})"
                    if row[mode].get("hidden_share") is not None:
                        line += f" hidden {row[mode]['hidden_share']:.2f}"
            if row.get("reason"):
                line += f"  [{row['reason'][:160]}]"
            print(line, flush=True)

    def out_of_budget() -> bool:
        over = args.budget_s > 0 and time.time() - began > args.budget_s
        return clock.from_rank0(float(over)) > 0

    for (name, n), schemes in groups.items():
        code = PATTERNS[name].format(window=args.window, globals=args.globals, block=args.bigbird_block)
        base = {"pattern": name, "code": code, "n": n}
        if out_of_budget():
            result["stopped_by_budget"] = True
            for s in schemes:
                emit({**base, "scheme": s, "status": "skipped", "reason": f"budget of {args.budget_s} s spent"})
            continue
        pattern = eval(code, {"P": P})
        g = torch.Generator(device=device).manual_seed(args.seed)
        shape_q, shape_kv = (args.batch, args.heads, n, args.dim), (args.batch, args.kv_heads, n, args.dim)
        q = torch.randn(shape_q, generator=g, device=device, dtype=dtype)
        k = torch.randn(shape_kv, generator=g, device=device, dtype=dtype)
        v = torch.randn(shape_kv, generator=g, device=device, dtype=dtype)
        dout = torch.randn(shape_q, generator=g, device=device, dtype=dtype)
        chosen, why = _pick_backend(args.backend, AttentionCall.of(q, k, v, pattern, 0, True))
        if why:
            raise SystemExit(f"backend {args.backend}: {why}")
        block = chosen.block_sizes(AttentionCall.of(q, k, v, pattern, 0, True))
        dims = dims_of(args, q)
        ref, one, sdpa = None, None, None
        if rank == 0 and not args.no_one_gpu:
            one, ref = one_gpu(args, clock, pattern, q, k, v, dout, chosen.name)
            if "torch_cp" in schemes and name == "causal":
                sdpa = sdpa_one_gpu(args, clock, q, k, v, dout)
        have_ref = clock.from_rank0(float(ref is not None)) > 0
        clock.barrier()
        for scheme in schemes:
            row = {**base, "scheme": scheme, "backend": chosen.name, "block": list(block)}
            if out_of_budget():
                result["stopped_by_budget"] = True
                emit({**row, "status": "skipped", "reason": f"budget of {args.budget_s} s spent"})
                continue
            t0 = time.time()
            try:
                if scheme == "torch_cp":
                    row.update(run_torch_cp(args, clock, name, n, (q, k, v, dout), ref if have_ref else None))
                    row["one_gpu_sdpa"] = sdpa
                    # the speedup compares like with like: the same GQA handling on one GPU
                    base_times = sdpa if sdpa and sdpa.get("gqa") == row.get("gqa") else None
                else:
                    row.update(run_scheme(args, clock, name, n, scheme, pattern, (q, k, v, dout), ref, have_ref,
                                          chosen.name, block, dims))
                    row["one_gpu"] = one
                    base_times = one
                row.setdefault("status", "ok")
                for mode in ("forward", "forward_backward"):
                    mine = row.get(mode, {}).get("total") if isinstance(row.get(mode), dict) else None
                    single = (base_times or {}).get(mode)
                    if mine and single:
                        row[f"speedup_{mode}"] = single["median_s"] / mine["median_s"]
            except Exception as e:  # recorded; the ranks fail together (inputs are checked on all of them)
                row.update(status="failed", reason=f"{type(e).__name__}: {str(e)[:500]}",
                           traceback=traceback.format_exc()[-2000:])
            row["row_seconds"] = round(time.time() - t0, 1)
            free_memory()
            emit(row)
        del q, k, v, dout, ref
        free_memory()
    result["complete"] = not result["stopped_by_budget"]
    if rank == 0:
        write_json(args.out, result)
        if bar is not None:
            bar.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
