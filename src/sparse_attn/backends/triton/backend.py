"""`triton`: our block-sparse flash-attention kernel (forward only for now).

How a pattern reaches the kernel: as data, never as code. The layout's CSR arrays name the
kv blocks of each (head, query block) row; full blocks need no mask; each partial block gets
a bitmask of its BQ x BK elements, computed once per layout from `pattern.allowed` (and
`kv_pos < kv_len`, so the ragged last kv block is handled by the same bits) and cached in
`layout.cache["triton"]`. One kernel serves every pattern, combinator and per-head layout.

Bitmask format: int32 words, [n_partial, BQ, ceil(BK / 32)], bit (col % 32) of word
(col // 32) set when query row r of the block may see key col. Why packed bits rather than
uint8: the masks are the only per-element state the backend keeps, and dense-ish partial
patterns (BigBird, dilated, block-sparse with odd cells, document masks) can make nearly
every touched block partial; at 64x64 blocks a packed block costs 512 B instead of 4 KiB,
8x less memory and 8x less mask traffic, while unpacking is one shift and one AND per score
(the word loads repeat across 32 columns and hit the cache). The partial mask of CSR entry j
lives at `bits[j]`, so the kernel needs no extra index array.

Full blocks in the ragged last kv block (kv_len % BK != 0) are masked by `kv_pos < kv_len`
inside the kernel; that code is compiled in only when kv_len is not a multiple of BK.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from ..registry import Backend, Capabilities, register

# Elements of [chunk, BQ, BK] evaluated at once when building the bitmasks (bounded memory).
_MASK_CHUNK_ELEMENTS = 1 << 22


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


class _Plan:
    """Layout-derived kernel inputs, on the layout's device."""

    def __init__(self, layout) -> None:
        g = layout.grid
        self.words = -(-g.block_kv // 32)
        self.full_off = layout.full.offsets.contiguous()
        self.full_idx = layout.full.indices.contiguous()
        self.part_off = layout.partial.offsets.contiguous()
        self.part_idx = layout.partial.indices.contiguous()
        self.bits = _pack_partial_masks(layout, self.words)


def _pack_partial_masks(layout, words: int) -> torch.Tensor:
    """int32 [max(n_partial, 1), BQ, words]: packed element masks of the partial blocks."""
    g = layout.grid
    csr = layout.partial
    n = csr.indices.numel()
    dev = g.device
    out = torch.zeros(max(n, 1), g.block_q, words, dtype=torch.int32, device=dev)
    if n == 0:
        return out
    layout._require_pattern().prepare(dev)
    bq, bk = g.block_q, g.block_kv
    # weights of the 32 bits of a word, as int64 so the sum does not overflow
    weights = (torch.ones(1, dtype=torch.int64, device=dev) << torch.arange(32, device=dev))
    chunk = max(1, _MASK_CHUNK_ELEMENTS // (bq * bk))
    for e0 in range(0, n, chunk):
        e1 = min(n, e0 + chunk)
        r = csr.rows[e0:e1]
        ok = layout.element_masks(torch.div(r, g.num_q_blocks, rounding_mode="floor"), r % g.num_q_blocks,
                                  csr.indices[e0:e1].long())  # [c, BQ, BK]
        if bk < words * 32:
            ok = torch.nn.functional.pad(ok, (0, words * 32 - bk))
        packed = (ok.reshape(e1 - e0, bq, words, 32).long() * weights).sum(-1)  # [c, BQ, words] in [0, 2^32)
        packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed)  # two's complement int32
        out[e0:e1] = packed.to(torch.int32)
    return out


def get_plan(layout) -> _Plan:
    return layout.cached("triton", lambda: _Plan(layout))


def _check_block(name: str, value: int) -> str | None:
    if value < 16 or value & (value - 1):
        return f"{name} must be a power of two >= 16 for the triton kernel, got {value}"
    return None


def triton_forward(q, k, v, layout, scale: float):
    """out [B, Hq, Nq, Dv] (q's dtype), lse [B, Hq, Nq] float32 (natural log)."""
    from .kernels import LOG2E, block_sparse_fwd_kernel

    g = layout.grid
    for name, value in (("block_q", g.block_q), ("block_kv", g.block_kv)):
        why = _check_block(name, value)
        if why:
            raise ValueError(why)
    bsz, hq, nq, d = q.shape
    hkv, nkv, dv = k.shape[1], k.shape[2], v.shape[3]
    if layout.num_heads not in (1, hq):
        raise ValueError(f"layout has {layout.num_heads} heads but q has {hq} heads")
    if (nq, nkv) != (g.q_len, g.kv_len):
        raise ValueError(f"layout is for q_len {g.q_len}, kv_len {g.kv_len}; got q_len {nq}, kv_len {nkv}")
    out = torch.empty(bsz, hq, nq, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(bsz, hq, nq, dtype=torch.float32, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    plan = get_plan(layout)
    bd, bdv = max(16, _pow2(d)), max(16, _pow2(dv))
    grid = (g.num_q_blocks, bsz * hq)
    num_warps = 4 if max(bd, bdv) <= 64 else 8
    block_sparse_fwd_kernel[grid](
        q, k, v, out, lse,
        plan.full_off, plan.full_idx, plan.part_off, plan.part_idx, plan.bits,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        float(scale) * LOG2E, nq, nkv, hq, hq // hkv, g.num_q_blocks,
        PER_HEAD=layout.num_heads > 1, BQ=g.block_q, BK=g.block_kv, BD=bd, BDV=bdv, D=d, DV=dv,
        WORDS=plan.words, EVEN_KV=nkv % g.block_kv == 0, IEEE=q.dtype == torch.float32,
        UPCAST=_interpreting() and q.dtype == torch.bfloat16,
        num_warps=num_warps,
    )
    return out, lse


_CAPS = Capabilities(
    devices=frozenset({"cuda"}),
    dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
    grads=False,
    gqa=True,
    min_head_dim=16,
    max_head_dim=256,
    deterministic=True,
    notes="block-sparse flash forward in Triton: CSR walk of full then partial blocks, partial blocks "
          "masked by cached packed bitmasks; forward only (no backward yet)",
)


class TritonBackend(Backend):
    name = "triton"

    @property
    def caps(self) -> Capabilities:
        """CUDA only, plus CPU tensors under TRITON_INTERPRET=1 (the interpreter runs the kernel
        in numpy: for tests at tiny shapes). Read per call, so setting the variable later works."""
        if _interpreting():
            return dataclasses.replace(_CAPS, devices=frozenset({"cuda", "cpu"}))
        return _CAPS

    def unavailable_reason(self):
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return f"triton not importable ({e}); install the 'triton' package (pip install 'sparse_attn[gpu]')"
        if not _interpreting() and not torch.cuda.is_available():
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernel on CPU, slowly, for tests)"
        return None

    def block_sizes(self, call):
        return 64, 64

    def extra_reasons(self, call):
        why = []
        if call.v_head_dim < 16 or call.v_head_dim > 256:
            why.append(f"v head dim {call.v_head_dim} outside [16, 256]")
        for name, value in zip(("block_q", "block_kv"), self.block_sizes(call)):
            w = _check_block(name, value)
            if w:
                why.append(w)
        return why

    def forward(self, q, k, v, layout, scale, return_lse):
        out, lse = triton_forward(q, k, v, layout, scale)
        return out, (lse if return_lse else None)


register(TritonBackend())
