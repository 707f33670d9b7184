"""Kernel tile configurations per padded head dim, chosen by measurement.

Each phase (forward, backward dq, backward dk/dv, fused backward) gets (BM, BN, num_warps,
num_stages): BM query rows x BN keys per tile. Tiles divide the layout's blocks (128 x 128 on
CUDA), so one layout serves every phase. The D=128 entries come from `benchmarks/tune_triton.py`
on the H200 (torch 2.11, triton 3.6, bf16, causal window 4096, B=1, H=16) at 32K and 128K
tokens (`benchmarks/results/tune_triton_h200_32k.json`, `..._128k.json`: every candidate's
time, FlexAttention's own tiles among them); D=64 and D=256 from the same script on an H100
(`tune_triton.json`). Where 32K and 128K disagreed by a few percent (dq: 64 x 64 at 32K,
128 x 64 at 128K) the entry is the 32K winner. Head dims that were not measured take the
nearest measured entry's tiles, shrunk so the tiles fit shared memory. Phases without an
entry of their own (the fused backward at D=64/256) borrow another phase's (`BORROWED`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int
    # Scheduling and compiler variants (issue #16), each off by default: today's kernels.
    # persistent: 0 launches one program per tile; k > 0 launches min(tiles, k x SM count)
    # programs, each draining the busiest-first work list (plan.q_block_order / kv_block_order)
    # by a static stride, or with `queue` from an atomic counter (a longest-first queue).
    persistent: int = 0
    queue: bool = False
    # the inner kv / q loops as tl.range(..., warp_specialize=True) (see kernels.py for what
    # Triton 3.6 makes of it on sm90)
    warp_specialize: bool = False
    num_ctas: int = 1  # CTAs per cluster (sm90+): a launch option
    maxnreg: int | None = None  # registers per thread cap (ptxas .maxnreg): a launch option
    # phase "dq" only: the dq and dk/dv programs of the deterministic backward in one grid
    # (kernels.block_sparse_bwd_combined_kernel, FlexAttention's arrangement), where both
    # phases' tiles have the same warp count and neither is persistent
    combined: bool = False


# padded head dim -> phase -> config
TUNED: dict[int, dict[str, TileConfig]] = {
    64: {"fwd": TileConfig(128, 64, 4, 3), "dq": TileConfig(64, 64, 4, 3), "dkdv": TileConfig(64, 64, 4, 3)},
    128: {"fwd": TileConfig(128, 128, 8, 3), "dq": TileConfig(64, 64, 4, 3), "dkdv": TileConfig(64, 64, 4, 4),
          "fused": TileConfig(64, 128, 8, 3)},
    256: {"fwd": TileConfig(128, 64, 8, 2), "dq": TileConfig(128, 32, 8, 2), "dkdv": TileConfig(64, 64, 8, 2)},
}

# Phases without a measured entry of their own borrow another phase's tiles.
BORROWED = {"fused": "dkdv"}

# Per-phase field overrides applied on top of the chosen tiles (TileConfig's field names):
# how benchmarks/kernel_variants.py and the tests select a variant without changing the table.
# Empty: every launch runs the tuned entry as is.
OVERRIDES: dict[str, dict] = {}

# Named variants measured against the table by benchmarks/kernel_variants.py (issue #16):
# variant -> phase -> OVERRIDES entry. Compiled for sm90 by tests/backends/compile_for_gpu.py
# --variants. Not measured here: warp_specialize (Triton 3.6 and 3.9 form no producer/consumer
# warps for these kernels on sm90: see kernels.py) and num_ctas > 1 (Triton 3.6's CTA planner
# asserts on them).
_PERSISTENT = {"persistent1": {"persistent": 1}, "persistent2": {"persistent": 2},
               "queue1": {"persistent": 1, "queue": True}, "queue2": {"persistent": 2, "queue": True}}
VARIANTS: dict[str, dict[str, dict]] = {
    **{f"{ph}_{name}": {ph: over} for ph in ("fwd", "dq", "dkdv", "fused") for name, over in _PERSISTENT.items()},
    # dq on wider kv tiles with 8 warps (dq's loop does 3 GEMMs per tile: fewer, larger ones; 128 x 128 x 8
    # warps x 2 stages needs 262 KB of shared memory with TMA, more than the H200's 227 KB)
    "dq_64x128_w8_s2": {"dq": dict(block_m=64, block_n=128, num_warps=8, num_stages=2)},
    "dq_64x128_w8_s3": {"dq": dict(block_m=64, block_n=128, num_warps=8, num_stages=3)},
    "dq_128x64_w8_s2": {"dq": dict(block_m=128, block_n=64, num_warps=8, num_stages=2)},
    # the dq and dk/dv programs in one launch (each phase keeps its tiles; stages: the larger)
    "dq_combined": {"dq": dict(combined=True)},
    # the fused backward's 8-warp kernel with a register cap (spills vs occupancy)
    "fused_maxnreg128": {"fused": dict(maxnreg=128)},
}

# Tiles used under TRITON_INTERPRET=1 (CPU tests): small, so the numpy interpreter stays fast.
INTERPRETED = TileConfig(16, 16, 1, 1)


def tile_config(padded_head_dim: int, phase: str, block_q: int, block_kv: int, *, interpreted: bool,
                element_size: int = 2) -> TileConfig:
    """The tiles for one launch, clipped to the layout's blocks (tiles must divide them).

    The table is for 2-byte inputs; fp32 inputs (4 bytes, rare on GPU: accepted for checks)
    take tiles of at most 64 x 64 and 2 stages so the operands fit shared memory (measured:
    D=128 fp32 with 128 x 128 tiles asks for 256 KiB, the H100 has 227 KiB)."""
    if interpreted:
        c = INTERPRETED
    else:
        key = min(TUNED, key=lambda d: (abs(d - padded_head_dim), -d))
        c = TUNED[key].get(phase) or TUNED[key][BORROWED[phase]]
        if element_size > 2:
            c = TileConfig(min(c.block_m, 64), min(c.block_n, 64 if padded_head_dim <= 128 else 32), c.num_warps,
                           min(c.num_stages, 2))
    over = OVERRIDES.get(phase, {})
    if interpreted:  # under the interpreter only the scheduling switches apply; tiles stay tiny
        over = {k: v for k, v in over.items() if k in ("persistent", "queue", "warp_specialize", "combined")}
    c = replace(c, **over)
    return replace(c, block_m=min(c.block_m, block_q), block_n=min(c.block_n, block_kv))
