"""The Triton kernels as `torch.library` custom ops with fake (meta) implementations and a
registered autograd formula, so `torch.compile` traces a model that calls them without graph
breaks (the op is opaque to the compiler; the fake implementation gives it the shapes).

Layouts are not tensors, so the ops take the layout's plan arrays (`plan.TritonPlan`) and its
block sizes; `triton_attention()` is the Python entry that unpacks a layout.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch

from .configs import TileConfig, tile_config
from .plan import get_plan

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _padded(d: int) -> int:
    return max(16, _pow2(d))


def new_output(shape, dtype, device) -> torch.Tensor:
    """Every tensor the kernels write. Uninitialised: each element is written by exactly one
    program. Tests replace this with a NaN-filled allocation so an unwritten tile fails."""
    return torch.empty(shape, dtype=dtype, device=device)


# Offsets inside one tile are int32 (tile starts are int64), unless a row stride is so large
# that 256 rows of it pass 2^31 elements: then the kernels compile with int64 in-tile offsets.
MAX_ROW_STRIDE = 2**31 // 256


def needs_copy(x: torch.Tensor) -> bool:
    """The kernels need unit stride on the head dim; any other strides are read in place (tile
    starts are int64, in-tile offsets too for very wide rows: no size forces a copy)."""
    return x.stride(-1) != 1


def wide_rows(*tensors: torch.Tensor) -> bool:
    return any(t.stride(-2) >= MAX_ROW_STRIDE for t in tensors)


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous() if needs_copy(x) else x


# TMA (Hopper's tensor memory accelerator) for the tiles the kernels' inner loops read, per
# phase, where `tma_allowed` holds. Measured side by side on the H200 (gpu_patterns, 128K, bf16,
# D=128; benchmarks/results/gpu_patterns_r3_h200_128k.json): the forward is faster with pointer
# loads (causal window 4096: 10.29 vs 10.82 ms; every pattern 1-7%), the backward with TMA
# (forward+backward 41.95 vs 45.02 ms with the forward on TMA; causal 583.8 vs 640.7).
TMA_PHASES = {"fwd": False, "dq": True, "dkdv": True, "fused": True}
# None: TMA_PHASES; False / True: off / on (where allowed) in every phase (benchmarks, tests).
TMA_DEFAULT: bool | None = None


def tma_allowed(*tensors: torch.Tensor) -> bool:
    """TMA descriptors need an sm90+ GPU, a Triton that makes them on the device, 16-byte
    aligned base addresses and row/head/batch strides, and unit stride on the head dim."""
    if interpreting():
        return True  # the interpreter emulates descriptors: CPU tests run the TMA path too
    t = tensors[0]
    if t.device.type != "cuda" or torch.cuda.get_device_capability(t.device)[0] < 9:
        return False
    import triton.language as tl

    if not hasattr(tl, "make_tensor_descriptor"):
        return False
    for x in tensors:
        size = x.element_size()
        if size != 2:  # fp32 (a checking path on GPU) keeps pointer loads
            return False
        if x.stride(-1) != 1 or x.data_ptr() % 16 or any((s * size) % 16 for s in x.stride()[:-1]):
            return False
        if x.shape[-1] * size < 16:
            return False
    return True


def _use_tma(phase: str, *tensors: torch.Tensor) -> bool:
    wanted = TMA_PHASES[phase] if TMA_DEFAULT is None else TMA_DEFAULT
    if not wanted:
        return False
    allowed = tma_allowed(*tensors)
    if allowed:
        _ensure_allocator()
    return allowed


def _ensure_allocator() -> None:
    """Device-made TMA descriptors live in a scratch buffer that Triton asks an allocator for;
    install one (a torch allocation on the launch device) unless the process set its own.
    Checked at every launch: Triton keeps the allocator in a ContextVar, so a thread that did
    not set it (autograd's backward thread on CUDA) starts with none."""
    import triton

    try:
        from triton.runtime import _allocation
        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # another Triton: install ours
        pass

    def allocate(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device="cuda")

    triton.set_allocator(allocate)


def _common(q, k, v, block_q, block_kv, *loop_read, phase: str | None = None):
    """Shapes and the constexpr flags every kernel takes; `loop_read`: the tensors the launch's
    inner loop reads tile by tile (TMA needs all of them aligned), in `phase` (TMA_PHASES)."""
    bsz, hq, nq, d = q.shape
    hkv, nkv, dv = k.shape[1], k.shape[2], v.shape[3]
    flags = dict(LBQ=block_q, LBK=block_kv, BD=_padded(d), BDV=_padded(dv), D=d, DV=dv,
                 WORDS=-(-block_kv // 32), EVEN_Q=nq % block_q == 0, EVEN_KV=nkv % block_kv == 0,
                 IEEE=q.dtype == torch.float32, UPCAST=interpreting() and q.dtype == torch.bfloat16,
                 USE_TMA=_use_tma(phase, *loop_read) if loop_read else False,
                 WIDE_ROWS=wide_rows(q, k, v, *loop_read))
    return bsz, hq, nq, d, hkv, nkv, dv, flags


# CUDA grids hold at most 65535 programs on axes 1 and 2 (2^31 - 1 on axis 0). A module
# constant so CPU tests can make it tiny and run the folded grid under the interpreter.
MAX_GRID_YZ = 65535
MAX_GRID_X = 2**31 - 1


def _grid(tiles: int, heads: int, heads_fastest: bool) -> tuple[int, ...]:
    """(fast, slow) programs, heads or tiles fastest; when `slow` (B * H, or the tiles of a very
    long head) passes MAX_GRID_YZ, the same programs in the same order folded onto axis 0.
    The kernels decode both alike (kernels._launch_index)."""
    fast, slow = (heads, tiles) if heads_fastest else (tiles, heads)
    if slow <= MAX_GRID_YZ:
        return fast, slow
    if fast * slow > MAX_GRID_X:
        raise ValueError(f"the triton kernels would launch {fast} x {slow} programs, more than CUDA's "
                         f"{MAX_GRID_X} on one grid axis; split the batch or the heads")
    return (fast * slow,)


def _on_input_device(fn):
    """Run `fn` with its first tensor argument's CUDA device current: Triton launches on the
    current device, so tensors on cuda:1 with cuda:0 current would be read by the wrong GPU."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        first = next(a for a in args if isinstance(a, torch.Tensor))
        with torch.cuda.device(first.device) if first.is_cuda else contextlib.nullcontext():
            return fn(*args, **kwargs)

    return run


def _launch_opts(cfg):
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if not interpreting():  # compiler options: the interpreter takes none of them
        if cfg.num_ctas != 1:
            opts["num_ctas"] = cfg.num_ctas
        if cfg.maxnreg is not None:
            opts["maxnreg"] = cfg.maxnreg
    return opts


# Programs a persistent grid gets per unit of TileConfig.persistent under the interpreter
# (CPU tests: few, so each program drains several work items).
INTERPRETED_SMS = 2


def _sm_count(device) -> int:
    if device.type != "cuda":
        return INTERPRETED_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _schedule(cfg, tiles: int, heads: int, heads_fastest: bool, device):
    """(grid, Counter, schedule args, schedule constexprs) of one launch over `tiles` x `heads`
    work items: one program per item (the default), or a persistent grid of
    min(items, cfg.persistent x SMs) programs draining them (TileConfig.persistent / queue;
    the QUEUE counter is a zeroed int32 the kernel's atomics hand items out from)."""
    total = tiles * heads
    flags = dict(PERSISTENT=cfg.persistent > 0, QUEUE=cfg.persistent > 0 and cfg.queue,
                 WS=cfg.warp_specialize)
    if cfg.persistent <= 0:
        counter = torch.empty(1, dtype=torch.int32, device=device)  # unread
        return _grid(tiles, heads, heads_fastest), counter, (heads, total), flags
    if total > MAX_GRID_X:
        raise ValueError(f"the triton kernels would drain {total} work items, more than {MAX_GRID_X}")
    counter = (torch.zeros if flags["QUEUE"] else torch.empty)(1, dtype=torch.int32, device=device)
    programs = max(1, min(total, cfg.persistent * _sm_count(device)))
    return (programs,), counter, (heads, total), flags


# ------------------------------------------------------------------------------ forward
@torch.library.custom_op("sparse_attn::block_sparse_attn_fwd", mutates_args=())
@_on_input_device
def block_sparse_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    full_off: torch.Tensor, full_idx: torch.Tensor, part_off: torch.Tensor, part_idx: torch.Tensor,
    bits: torch.Tensor, part_mask: torch.Tensor, q_block_order: torch.Tensor, tfull_off: torch.Tensor,
    tfull_idx: torch.Tensor, tpart_off: torch.Tensor, tpart_idx: torch.Tensor, tpart_mask: torch.Tensor,
    kv_block_order: torch.Tensor,
    scale: float, block_q: int, block_kv: int, per_head: bool, q_heads_fastest: bool, kv_heads_fastest: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, Hq, Nq, Dv] (q's dtype), lse [B, Hq, Nq] float32 (natural log, -inf for empty rows).
    `deterministic` only picks the backward (kept for autograd): three launches, or the fused one."""
    from .kernels import block_sparse_fwd_kernel

    q, k, v = (_rows_contiguous(t) for t in (q, k, v))
    bsz, hq, nq, d, hkv, nkv, dv, flags = _common(q, k, v, block_q, block_kv, k, v, phase="fwd")
    out = new_output((bsz, hq, nq, dv), q.dtype, q.device)
    lse = new_output((bsz, hq, nq), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    cfg = tile_config(max(flags["BD"], flags["BDV"]), "fwd", block_q, block_kv, interpreted=interpreting(),
                      element_size=q.element_size())
    grid, counter, work, sched = _schedule(cfg, -(-nq // block_q) * (block_q // cfg.block_m), bsz * hq,
                                           q_heads_fastest, q.device)
    block_sparse_fwd_kernel[grid](
        q, k, v, out, lse, full_off, full_idx, part_off, part_idx, bits, part_mask, q_block_order, counter,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        scale * LOG2E, nq, nkv, hq, hq // hkv, -(-nq // block_q), *work,
        PER_HEAD=per_head, HEADS_FASTEST=q_heads_fastest, BM=cfg.block_m, BN=cfg.block_n, **flags, **sched,
        **_launch_opts(cfg),
    )
    return out, lse


@block_sparse_attn_fwd.register_fake
def _(q, k, v, *plan_and_args):
    bsz, hq, nq, _ = q.shape
    return q.new_empty(bsz, hq, nq, v.shape[3]), q.new_empty(bsz, hq, nq, dtype=torch.float32)


# ----------------------------------------------------------------------------- backward
@torch.library.custom_op("sparse_attn::block_sparse_attn_bwd", mutates_args=())
@_on_input_device
def block_sparse_attn_bwd(
    dout: torch.Tensor, dlse: Optional[torch.Tensor],
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    full_off: torch.Tensor, full_idx: torch.Tensor, part_off: torch.Tensor, part_idx: torch.Tensor,
    bits: torch.Tensor, part_mask: torch.Tensor, q_block_order: torch.Tensor, tfull_off: torch.Tensor,
    tfull_idx: torch.Tensor, tpart_off: torch.Tensor, tpart_idx: torch.Tensor, tpart_mask: torch.Tensor,
    kv_block_order: torch.Tensor,
    scale: float, block_q: int, block_kv: int, per_head: bool, q_heads_fastest: bool, kv_heads_fastest: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the inputs' dtypes. Deterministic: no atomics (see kernels.py)."""
    from .kernels import block_sparse_bwd_dq_kernel

    q, k, v, out, dout = (_rows_contiguous(t) for t in (q, k, v, out, dout))
    bsz, hq, nq, d, hkv, nkv, dv, flags = _common(q, k, v, block_q, block_kv, k, v, phase="dq")
    dq, dk, dvv = (new_output(t.shape, t.dtype, t.device) for t in (q, k, v))
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dvv.zero_()
    delta, lse2 = _bwd_row_stats(out, dout, lse, dlse, nq, hq, flags["BDV"], dv)  # [B, Hq, Nq] float32
    padded = max(flags["BD"], flags["BDV"])
    common = (scale * LOG2E, scale, nq, nkv)

    cfg = tile_config(padded, "dq", block_q, block_kv, interpreted=interpreting(),
                      element_size=q.element_size())
    if cfg.combined and _launch_combined(cfg, flags, q, k, v, dout, dq, dk, dvv, lse2, delta, full_off, full_idx,
                                              part_off, part_idx, bits, part_mask, q_block_order, tfull_off,
                                              tfull_idx, tpart_off, tpart_idx, tpart_mask, kv_block_order, scale,
                                              block_q, block_kv, per_head, q_heads_fastest, kv_heads_fastest):
        return dq, dk, dvv
    grid, counter, work, sched = _schedule(cfg, -(-nq // block_q) * (block_q // cfg.block_m), bsz * hq,
                                           q_heads_fastest, q.device)
    block_sparse_bwd_dq_kernel[grid](
        q, k, v, dout, dq, lse2, delta, full_off, full_idx, part_off, part_idx, bits, part_mask, q_block_order,
        counter,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), lse2.stride(0), lse2.stride(1),
        *common, hq, hq // hkv, -(-nq // block_q), *work,
        PER_HEAD=per_head, HEADS_FASTEST=q_heads_fastest, BM=cfg.block_m, BN=cfg.block_n, **flags, **sched,
        **_launch_opts(cfg),
    )
    _launch_dkdv("dkdv", None, q, k, v, dout, dk, dvv, lse2, delta, tfull_off, tfull_idx, tpart_off, tpart_idx,
                 tpart_mask, bits, kv_block_order, scale, block_q, block_kv, per_head, kv_heads_fastest)
    return dq, dk, dvv


@block_sparse_attn_bwd.register_fake
def _(dout, dlse, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _launch_combined(dq_cfg, dq_flags, q, k, v, dout, dq, dk, dvv, lse2, delta, full_off, full_idx, part_off, part_idx, bits,
                     part_mask, q_block_order, tfull_off, tfull_idx, tpart_off, tpart_idx, tpart_mask,
                     kv_block_order, scale, block_q, block_kv, per_head, q_heads_fastest, kv_heads_fastest) -> bool:
    """The deterministic backward's dq and dk/dv programs in one launch (TileConfig.combined on
    the dq phase; off in the table until measured on the H200: benchmarks/kernel_variants.py,
    variant dq_combined). False (nothing launched) where one launch cannot carry both phases'
    settings: different warp counts, or a persistent schedule."""
    from .kernels import block_sparse_bwd_combined_kernel

    bsz, hq, nq, d, hkv, nkv, dv, kv_flags = _common(q, k, v, block_q, block_kv, q, dout, phase="dkdv")
    kv_cfg = tile_config(max(dq_flags["BD"], dq_flags["BDV"]), "dkdv", block_q, block_kv,
                         interpreted=interpreting(), element_size=q.element_size())
    if dq_cfg.num_warps != kv_cfg.num_warps or dq_cfg.persistent or kv_cfg.persistent:
        return False
    dq_work = -(-nq // block_q) * (block_q // dq_cfg.block_m) * bsz * hq
    kv_work = -(-nkv // block_kv) * (block_kv // kv_cfg.block_n) * bsz * hkv
    flags = {key: value for key, value in dq_flags.items() if key != "USE_TMA"}
    block_sparse_bwd_combined_kernel[_grid(kv_work + dq_work, 1, False)](
        q, k, v, dout, dq, dk, dvv, lse2, delta, full_off, full_idx, part_off, part_idx, bits, part_mask,
        q_block_order, tfull_off, tfull_idx, tpart_off, tpart_idx, tpart_mask, kv_block_order,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
        dvv.stride(0), dvv.stride(1), dvv.stride(2), lse2.stride(0), lse2.stride(1),
        scale * LOG2E, scale, nq, nkv, hq, hkv, hq // hkv, -(-nq // block_q), -(-nkv // block_kv),
        bsz * hq, bsz * hkv, kv_work,
        PER_HEAD=per_head, Q_HEADS_FASTEST=q_heads_fastest, KV_HEADS_FASTEST=kv_heads_fastest,
        DQ_BM=dq_cfg.block_m, DQ_BN=dq_cfg.block_n, KV_BM=kv_cfg.block_m, KV_BN=kv_cfg.block_n,
        DQ_TMA=dq_flags["USE_TMA"], KV_TMA=kv_flags["USE_TMA"], **flags,
        **_launch_opts(TileConfig(dq_cfg.block_m, dq_cfg.block_n, kv_cfg.num_warps,
                                  max(dq_cfg.num_stages, kv_cfg.num_stages))),
    )
    return True


def _launch_dkdv(phase, dq_acc, q, k, v, dout, dk, dvv, lse2, delta, tfull_off, tfull_idx, tpart_off, tpart_idx,
                 tpart_mask, bits, kv_block_order, scale, block_q, block_kv, per_head, kv_heads_fastest):
    """The dk/dv kernel over the transposed layout; with `dq_acc` (fp32 [B, Hq, Nq, D]) it also
    adds dQ atomically there (phase "fused": the one-pass backward), else phase "dkdv"."""
    from .kernels import block_sparse_bwd_dkdv_kernel

    bsz, hq, nq, d, hkv, nkv, dv, flags = _common(q, k, v, block_q, block_kv, q, dout, phase=phase)
    cfg = tile_config(max(flags["BD"], flags["BDV"]), phase, block_q, block_kv, interpreted=interpreting(),
                      element_size=q.element_size())
    fused = dq_acc is not None
    dq = dq_acc if fused else dk  # unread without FUSED_DQ: any tensor fills the slot
    grid, counter, work, sched = _schedule(cfg, -(-nkv // block_kv) * (block_kv // cfg.block_n), bsz * hkv,
                                           kv_heads_fastest, q.device)
    block_sparse_bwd_dkdv_kernel[grid](
        q, k, v, dout, dq, dk, dvv, lse2, delta, tfull_off, tfull_idx, tpart_off, tpart_idx, tpart_mask, bits,
        kv_block_order, counter,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dvv.stride(0), dvv.stride(1), dvv.stride(2),
        lse2.stride(0), lse2.stride(1),
        scale * LOG2E, scale, nq, nkv, hkv, hq // hkv, -(-nkv // block_kv), *work,
        PER_HEAD=per_head, HEADS_FASTEST=kv_heads_fastest, BM=cfg.block_m, BN=cfg.block_n, FUSED_DQ=fused, **flags,
        **sched, **_launch_opts(cfg),
    )


# ------------------------------------------------------------------ backward, fused (one pass)
def _bwd_row_stats(out, dout, lse, dlse, nq, hq, bdv, dv):
    """(delta, lse2) [B, Hq, Nq] float32 from the preprocess kernel: delta = rowsum(dO * O) - dlse,
    lse2 = lse in log2 units (+inf for empty rows, so their P is 0)."""
    from .kernels import bwd_preprocess_kernel

    # lse, delta and lse2 share one row stride, rounded up to a multiple of 16: the backward
    # kernels' lse2/delta strides then divide by 16 at every length (one specialisation, and
    # the dk/dv loop's async copies of them stay 16 bytes wide; kernels._jit). Rows past Nq are
    # never read (masked by q_len, or Nq is a multiple of the block)
    rows = -(-nq // 16) * 16
    stats = torch.empty(3, lse.shape[0], hq, rows, dtype=torch.float32, device=lse.device)
    lse_rows, delta, lse2 = (t[..., :nq] for t in stats.unbind(0))  # [B, Hq, Nq] each
    lse = lse_rows.copy_(lse)
    pre_m = 16 if interpreting() else 64
    dl = dlse if dlse is not None else lse
    bwd_preprocess_kernel[_grid(-(-nq // pre_m), out.shape[0] * hq, False)](
        out, dout, lse, dl, delta, lse2,
        out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        lse.stride(0), lse.stride(1), dl.stride(0), dl.stride(1), dl.stride(2), nq, hq,
        HAS_DLSE=dlse is not None, BM=pre_m, BDV=bdv, DV=dv,
    )
    return delta, lse2


@torch.library.custom_op("sparse_attn::block_sparse_attn_bwd_fused", mutates_args=())
@_on_input_device
def block_sparse_attn_bwd_fused(
    dout: torch.Tensor, dlse: Optional[torch.Tensor],
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    full_off: torch.Tensor, full_idx: torch.Tensor, part_off: torch.Tensor, part_idx: torch.Tensor,
    bits: torch.Tensor, part_mask: torch.Tensor, q_block_order: torch.Tensor, tfull_off: torch.Tensor,
    tfull_idx: torch.Tensor, tpart_off: torch.Tensor, tpart_idx: torch.Tensor, tpart_mask: torch.Tensor,
    kv_block_order: torch.Tensor,
    scale: float, block_q: int, block_kv: int, per_head: bool, q_heads_fastest: bool, kv_heads_fastest: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the inputs' dtypes, in one pass over the transposed layout: dq's partial
    sums are added atomically into an fp32 buffer (not bitwise reproducible: see kernels.py),
    then converted to q's dtype. Same signature as block_sparse_attn_bwd."""
    q, k, v, out, dout = (_rows_contiguous(t) for t in (q, k, v, out, dout))
    bsz, hq, nq, d, hkv, nkv, dv, flags = _common(q, k, v, block_q, block_kv)
    dk, dvv = (new_output(t.shape, t.dtype, t.device) for t in (k, v))
    # every program adds into it: zero-filled, fp32 whatever q's dtype
    dq_acc = torch.zeros((bsz, hq, nq, d), dtype=torch.float32, device=q.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq_acc.to(q.dtype), dk.zero_(), dvv.zero_()
    delta, lse2 = _bwd_row_stats(out, dout, lse, dlse, nq, hq, flags["BDV"], dv)
    _launch_dkdv("fused", dq_acc, q, k, v, dout, dk, dvv, lse2, delta, tfull_off, tfull_idx, tpart_off, tpart_idx,
                 tpart_mask, bits, kv_block_order, scale, block_q, block_kv, per_head, kv_heads_fastest)
    # the conversion: nothing to do for fp32 inputs (scale is applied in the kernel)
    return (dq_acc if q.dtype == torch.float32 else dq_acc.to(q.dtype)), dk, dvv


@block_sparse_attn_bwd_fused.register_fake
def _(dout, dlse, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# ----------------------------------------------------------------------------- autograd
_N_PLAN = 13  # plan tensors after q, k, v; then scale, block_q, block_kv, per_head, the two schedule flags
_N_ARGS = 7  # and `deterministic`, which picks the backward


def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    plan = inputs[3:3 + _N_PLAN]
    ctx.args = inputs[3 + _N_PLAN:]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *plan)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *plan = ctx.saved_tensors
    *args, deterministic = ctx.args
    backward = block_sparse_attn_bwd if deterministic else block_sparse_attn_bwd_fused
    dq, dk, dv = backward(dout, dlse, q, k, v, out, lse, *plan, *args)
    return (dq, dk, dv) + (None,) * (_N_PLAN + _N_ARGS)


block_sparse_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# Whether `deterministic=None` takes the fused backward. Off: measured on the H200 with each
# backward on its own tuned tiles (benchmarks/results/tune_triton_h200_*.json), the fused one
# is not faster (causal window 4096: 7.96 vs 7.76 ms at 32K, 32.7 vs 33.6 ms at 128K), and the
# three launches are bitwise reproducible, so they stay the default.
FUSED_BACKWARD_DEFAULT = False


def resolve_deterministic(deterministic: bool | None) -> bool:
    """None (the default): the three-launch backward while `FUSED_BACKWARD_DEFAULT` is off; else
    the fused one unless the process asked torch for deterministic algorithms. An explicit
    True / False always wins."""
    if deterministic is None:
        return torch.are_deterministic_algorithms_enabled() or not FUSED_BACKWARD_DEFAULT
    return bool(deterministic)


def triton_attention(q, k, v, layout, scale: float, deterministic: bool | None = None):
    """Block-sparse attention over `layout`: (out [B, Hq, Nq, Dv], lse [B, Hq, Nq] float32).

    deterministic: the backward it records for autograd. True: three launches, no atomics,
    bitwise reproducible; False: one fused pass with fp32 atomics for dQ (faster, reproducible
    only to rounding); None: `resolve_deterministic`."""
    g = layout.grid
    for name, value in (("block_q", g.block_q), ("block_kv", g.block_kv)):
        why = check_block(name, value)
        if why:
            raise ValueError(why)
    if layout.num_heads not in (1, q.shape[1]):
        raise ValueError(f"layout has {layout.num_heads} heads but q has {q.shape[1]} heads")
    if (q.shape[2], k.shape[2]) != (g.q_len, g.kv_len):
        raise ValueError(f"layout is for q_len {g.q_len}, kv_len {g.kv_len}; got q_len {q.shape[2]}, "
                         f"kv_len {k.shape[2]}")
    plan = get_plan(layout)
    # the transposed walk (dk/dv) only when a backward can follow: inference never builds it
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    # copied here, not inside the op: autograd then saves the copies, so the backward does not copy again
    q, k, v = (_rows_contiguous(t) for t in (q, k, v))
    return block_sparse_attn_fwd(q, k, v, *plan.tensors(backward), float(scale), g.block_q, g.block_kv,
                                 layout.num_heads > 1, *plan.flags(backward), resolve_deterministic(deterministic))


def check_block(name: str, value: int) -> str | None:
    if value < 16 or value & (value - 1):
        return f"{name} must be a power of two >= 16 for the triton kernel, got {value}"
    return None


def triton_backward_from_stats(q, k, v, layout, scale: float, out, lse, dout, dlse=None):
    """(dq, dk, dv) of one key part of a split attention from the whole attention's (out, lse):
    the deterministic three-launch backward, which reads only those (`Backend.backward_from_stats`)."""
    g = layout.grid
    if (q.shape[2], k.shape[2]) != (g.q_len, g.kv_len):
        raise ValueError(f"layout is for q_len {g.q_len}, kv_len {g.kv_len}; got q_len {q.shape[2]}, "
                         f"kv_len {k.shape[2]}")
    plan = get_plan(layout)
    dlse = None if dlse is None else dlse.float().contiguous()
    return block_sparse_attn_bwd(dout.contiguous(), dlse, q, k, v, out, lse.float().contiguous(), *plan.tensors(),
                                 float(scale), g.block_q, g.block_kv, layout.num_heads > 1, *plan.flags())
