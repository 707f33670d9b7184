"""`sparse_attention()`: one call for every pattern, on every backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backends import AttentionCall, Explanation, explain_call, get_backend, select
from ..backends.inputs import check_inputs
from ..patterns import Band, BlockLayout, DisjointUnion, Pattern
from ..patterns.rows import RowGeometry, row_view
from .batch_rows import batch_geometries, is_per_row
from .common import eager_under_compile


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern | BlockLayout, *,
                     scale: float | None = None, backend: str = "auto", return_lse: bool = False,
                     q_offset: int | torch.Tensor | None = None, kv_offset: int | torch.Tensor = 0,
                     key_padding_mask: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                     deterministic: bool | None = None):
    if torch.compiler.is_compiling() and not _in_graph(q, k, v, pattern, backend, q_offset, kv_offset,
                                                       key_padding_mask, document_ids, deterministic):
        # calls whose backend is plain Python over a layout's plan (blocked, reference, flex's own
        # compile) or that carry per-row geometry run eagerly (a graph break): traced, they would
        # be specialised to every length and recompiled for each new one
        return eager_under_compile(_sparse_attention)(
            q, k, v, pattern, scale=scale, backend=backend, return_lse=return_lse, q_offset=q_offset,
            kv_offset=kv_offset, key_padding_mask=key_padding_mask, document_ids=document_ids,
            deterministic=deterministic)
    return _sparse_attention(q, k, v, pattern, scale=scale, backend=backend, return_lse=return_lse,
                             q_offset=q_offset, kv_offset=kv_offset, key_padding_mask=key_padding_mask,
                             document_ids=document_ids, deterministic=deterministic)


def _in_graph(q, k, v, pattern, backend, q_offset, kv_offset, key_padding_mask, document_ids, deterministic) -> bool:
    """Under torch.compile: can this call be traced into the graph? Only when the backend that
    will run it is a custom op / SDPA and no per-row geometry (Python per row) is involved."""
    if is_per_row(q_offset, kv_offset, key_padding_mask, document_ids):
        return False
    if not isinstance(pattern, (Pattern, BlockLayout)):
        return False
    call = AttentionCall.of(q, k, v, pattern.pattern if isinstance(pattern, BlockLayout) else pattern,
                            q_offset if isinstance(q_offset, int) else k.shape[2] - q.shape[2], return_lse=False,
                            deterministic=deterministic)
    try:
        return select(call, backend).caps.graph_traceable
    except Exception:  # let the eager path raise the real, named error
        return False


def _sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | BlockLayout,
    *,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    q_offset: int | torch.Tensor | None = None,
    kv_offset: int | torch.Tensor = 0,
    key_padding_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    deterministic: bool | None = None,
):
    """Attention restricted to `pattern`, in SDPA's shapes.

    Args:
        q: (B, Hq, Nq, D); k: (B, Hkv, Nkv, D); v: (B, Hkv, Nkv, Dv). Hq % Hkv == 0 (GQA).
        pattern: a `Pattern` (e.g. `patterns.sliding_window(256)`) or a prebuilt `BlockLayout`
            (to choose block sizes yourself).
        scale: score scale, default 1/sqrt(D).
        backend: "auto" or a backend name ("blocked", "flex", "sdpa", "reference", ...).
            "auto" never picks a dense O(Nq*Nkv) backend for you; `sparse_attn.explain()` says why
            it picked what it did. A forced backend that cannot serve the call raises
            `BackendError` with the reason.
        return_lse: also return the log-sum-exp of each row's scores, (B, Hq, Nq) (float32 for
            half inputs), -inf for rows with nothing to attend to.
        q_offset: absolute position of the first query; default Nkv - Nq (queries are the last
            positions, as in decoding and chunked prefill). An int, or a (B,) tensor per row.
        kv_offset: position of the first (real) key, int or (B,): keys that do not start at
            position 0 (a cache that evicted its head, a context-parallel shard). Default 0.
        key_padding_mask: bool (B, Nkv), True = a real key (transformers' attention_mask).
            Positions count from each row's first real key, so under left padding a global
            token or an attention sink is the row's first real token; pad keys are never
            attended, and query rows at pad indices return 0 (lse -inf). A padded batch
            computes what each row computes alone.
        document_ids: integer (B, Nkv), packed sequences: each run of equal ids in a row is a
            document that sees the pattern from its own position 0 and never another document
            (a window never crosses a boundary); negative ids are pads. Equals running the
            documents separately. `ops.batch_rows.documents_from_cu_seqlens` converts varlen
            `cu_seqlens`.
        deterministic: what the backward may do. True: bitwise-reproducible gradients (two
            calls give identical bits): backends whose backward sums with atomics (`sdpa`,
            `flex`, `blocked` on CUDA outside torch.use_deterministic_algorithms) are skipped
            by "auto" and refused when forced, and `triton` runs its three-launch backward.
            False: the fastest backward (`triton`'s fused one-pass backward, whose dQ is summed
            with atomics, reproducible only to rounding). None (default): no requirement on
            the backends; `triton` runs its three-launch backward for now
            (`backends.triton.ops.FUSED_BACKWARD_DEFAULT`: the fused one is not yet measured on
            a GPU). Forward outputs are deterministic
            either way; backends with a single backward ignore the choice.

    Returns:
        out (B, Hq, Nq, Dv), or (out, lse) if return_lse. Rows with nothing allowed are 0.

    Two rewrites keep the work to the allowed pairs (not on the reference backend, which always
    evaluates the original predicate): a token-level dilated pattern (dilation r) runs as r
    plain bands, one per residue class of positions mod r; a `DisjointUnion` (e.g. `strided`)
    runs each part on its own and merges the results by log-sum-exp.
    """
    if deterministic is not None and not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be True, False or None, got {type(deterministic).__name__} "
                        f"({deterministic!r})")
    if is_per_row(q_offset, kv_offset, key_padding_mask, document_ids):
        return _per_row(q, k, v, pattern, scale, backend, return_lse, q_offset, kv_offset, key_padding_mask,
                        document_ids, deterministic)
    pattern, q_offset, scale = check_inputs(q, k, v, pattern, scale, q_offset, backend)
    rewrite = _rewrite(pattern, backend)
    if rewrite is not None and rewrite[0] == "residue":
        return _residue_classes(q, k, v, pattern, scale, backend, return_lse, q_offset, deterministic)
    if rewrite is not None:  # "parts"
        parts = [sparse_attention(q, k, v, p, scale=scale, backend=backend, return_lse=True, q_offset=q_offset,
                                  deterministic=deterministic)
                 for p in rewrite[1]]
        out, lse = merge_partial_attention(parts)
        return (out, lse) if return_lse else out
    layout = pattern if isinstance(pattern, BlockLayout) else None
    call = AttentionCall.of(q, k, v, layout.pattern if layout else pattern, q_offset, return_lse, deterministic)
    chosen = select(call, backend)
    if layout is None and not chosen.caps.reads_layout:  # sdpa, reference: no blocks to build
        layout = pattern.at(q.shape[2], k.shape[2], q_offset=q_offset, device=q.device)
    elif layout is None:
        block_q, block_kv = chosen.block_sizes(call)
        layout = pattern.layout(q.shape[2], k.shape[2], block_q=block_q, block_kv=block_kv, q_offset=q_offset,
                                device=q.device)
    elif layout.device != q.device:
        raise ValueError(f"layout is on {layout.device} but q is on {q.device}; build it with device={q.device}")
    if layout.pattern is not None:
        layout.pattern.check_batch(q.shape[0], q.device)
    out, lse = chosen.forward(q, k, v, layout, scale, return_lse, deterministic=deterministic)
    return (out, lse) if return_lse else out


def _rewrite(pattern, backend: str):
    """The rewrite `sparse_attention` applies before dispatch (`explain` shows the same one):
    ("residue", (r, inner band)) for a token-level dilated band, run as r plain bands, one per
    residue class of positions; ("parts", parts) for a `DisjointUnion`, each part run on its own
    and merged by log-sum-exp; None otherwise, for prebuilt layouts, and always on the reference
    backend, which evaluates the original predicate."""
    if backend == "reference":
        return None
    if isinstance(pattern, Band) and pattern.residue_split() is not None:
        return "residue", pattern.residue_split()
    if isinstance(pattern, DisjointUnion):
        return "parts", pattern.parts
    return None


def explain(q, k, v, pattern, *, backend: str = "auto", q_offset: int | None = None, return_lse: bool = False,
            deterministic: bool | None = None) -> Explanation:
    """Which backend `sparse_attention(q, k, v, pattern, ...)` would use, and why each other
    backend was rejected; notes say which rewrite applies first (the same `_rewrite` the call
    takes) and what the chosen backend costs beyond the attention itself (the triton kernels:
    inputs they copy, head dims they pad). Returns an `Explanation` (print it)."""
    pattern, q_offset, _ = check_inputs(q, k, v, pattern, None, q_offset, backend)
    rewrite = _rewrite(pattern, backend)
    notes = []
    if rewrite is not None and rewrite[0] == "parts":
        notes.append(f"disjoint union: its {len(rewrite[1])} parts run one by one (each dispatched like this "
                     "call) and are merged by log-sum-exp")
    if rewrite is not None and rewrite[0] == "residue":  # each residue class runs as a plain band
        r, pattern = rewrite[1]
        notes.append(f"dilation {r}: runs as {r} residue classes of {pattern!r} (about Nq/{r} queries each)")
        q, k, v = q[:, :, ::r], k[:, :, ::r], v[:, :, ::r]
        q_offset = q_offset // r
    call_pattern = pattern.pattern if isinstance(pattern, BlockLayout) else pattern
    # rewritten calls ask their parts for the log-sum-exp (to merge them)
    ex = explain_call(AttentionCall.of(q, k, v, call_pattern, q_offset, return_lse or rewrite is not None,
                                       deterministic), backend)
    ex.notes.extend(notes)
    if ex.chosen is not None:
        ex.notes.extend(get_backend(ex.chosen).input_notes(q, k, v))
    return ex


sparse_attention.__doc__ = _sparse_attention.__doc__ + """
    Inside `torch.compile`, calls on the `triton` and `sdpa` backends are traced into the graph
    (custom ops); the others, and per-row calls, run eagerly (a graph break), so a compiled model
    does not recompile for every new sequence length.
"""


def _per_row(q, k, v, pattern, scale, backend, return_lse, q_offset, kv_offset, key_padding_mask, document_ids,
             deterministic):
    """Rows grouped by geometry, one call per group, outputs put back in row order. A row whose
    real keys are one run (left or right padding) is cut to its real tokens and runs as it runs
    alone (the pattern itself, its cached layouts, no pad tiles); other rows (keys with holes,
    packed documents) run over their full length through their view of the pattern
    (`row_view`, whose layouts are cached per geometry)."""
    # validate shapes and the pattern once, on the whole batch (q_offset is checked per row)
    check_inputs(q, k, v, pattern, scale, None if q.shape[2] <= k.shape[2] else 0, backend)
    if isinstance(pattern, BlockLayout):
        raise TypeError("a prebuilt BlockLayout has one geometry for the whole batch: pass the Pattern itself "
                        "with key_padding_mask / per-row q_offset / kv_offset")
    pattern.check_batch(q.shape[0], q.device)  # a mask_mod reading b would see b = 0 in every group
    groups: dict = {}
    for b, plan in enumerate(batch_geometries(q, k, q_offset, kv_offset, key_padding_mask, document_ids)):
        groups.setdefault(plan, []).append(b)
    bsz, hq, nq = q.shape[:3]
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs: list = [None] * bsz  # per row [1, Hq, Nq, Dv] / [1, Hq, Nq], concatenated once at the end
    lses: list = [None] * bsz
    for plan, rows in groups.items():
        res = _group_attention(plan, pattern, _rows_of(rows, bsz, q, k, v), nq, scale, backend, deterministic)
        if res is None:  # no real key, or no real query row: 0 and -inf
            o = q.new_zeros(len(rows), hq, nq, v.shape[3])
            l = torch.full((len(rows), hq, nq), float("-inf"), dtype=lse_dtype, device=q.device)
        else:
            o, l = res
        if len(rows) == bsz:  # one geometry for the whole batch
            return (o, l.to(lse_dtype)) if return_lse else o
        for i, b in enumerate(rows):
            outs[b], lses[b] = o[i:i + 1], l[i:i + 1].to(lse_dtype)
    out = torch.cat(outs)
    return (out, torch.cat(lses)) if return_lse else out


def _group_attention(plan, pattern, qkv, nq: int, scale, backend, deterministic):
    """(out, lse) over all nq query rows for the rows of one geometry, or None when they have no
    real key or no real query row."""
    g = plan.geometry
    if g is None:
        return None
    qs, ks, vs = qkv
    span = _real_span(g, plan.q_index0, nq, ks.shape[2])
    if span is None:  # keys with holes, packed documents: the full length through the row's view
        return _sparse_attention(qs, ks, vs, row_view(pattern, g), scale=scale, backend=backend, return_lse=True,
                                 q_offset=plan.q_index0, deterministic=deterministic)
    (k0, k1), (r0, r1), kv_pos = span
    if r1 <= r0:
        return None
    # one run of real keys: cut the row to it and run it as it runs alone; in the cut row key index
    # 0 is position kv_pos (an evicted cache head when > 0)
    view = pattern if kv_pos == 0 else row_view(pattern, RowGeometry(kv_pos, g.alone, None, None))
    o, l = _sparse_attention(qs[:, :, r0:r1], ks[:, :, k0:k1], vs[:, :, k0:k1], view, scale=scale, backend=backend,
                             return_lse=True, q_offset=plan.q_index0 + r0 - k0, deterministic=deterministic)
    lse_dtype = torch.float64 if qs.dtype == torch.float64 else torch.float32
    return F.pad(o, (0, 0, r0, nq - r1)), F.pad(l.to(lse_dtype), (r0, nq - r1), value=float("-inf"))  # pad rows


def _rows_of(rows: list[int], bsz: int, *tensors):
    """The batch rows `rows` of each tensor: the tensor itself, a view for one row or a run of
    consecutive rows (the usual padded batch: every row its own geometry), else a gather."""
    if len(rows) == bsz:
        return tensors
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return tuple(t[rows[0]:rows[0] + len(rows)] for t in tensors)
    idx = torch.tensor(rows, device=tensors[0].device)
    return tuple(t.index_select(0, idx) for t in tensors)


def _real_span(g, q_index0: int, nq: int, nkv: int):
    """For a row whose real keys are one run [k0, k1) (left or right padding, no documents):
    ((k0, k1), (r0, r1) its real query rows, position of key k0), else None."""
    if g.documents is not None or (g.key_runs is not None and len(g.key_runs) != 1) or \
            (g.query_runs is not None and len(g.query_runs) != 1):
        return None
    k0, k1 = g.key_runs[0] if g.key_runs is not None else (0, nkv)
    r0, r1 = (g.query_runs[0][0] - q_index0, g.query_runs[0][1] - q_index0) if g.query_runs is not None else (0, nq)
    return (k0, k1), (r0, r1), k0 + g.shift


def _residue_classes(q, k, v, pattern: Band, scale, backend, return_lse, q_offset, deterministic):
    """Dilated band: for each residue c mod r, the queries at positions c + r*a see the keys at
    c + r*b through a plain band in (a, b). Outputs are scattered back to their rows."""
    r, inner = pattern.residue_split()
    bsz, hq, nq, _ = q.shape
    kv_len = k.shape[2]
    if nq % r == 0 and kv_len % r == 0 and q_offset % r == 0:
        # every class has the same lengths and offset: fold the classes into the batch
        def fold(x):  # [B, H, N, E] -> [r * B, H, N / r, E], class c = positions c mod r
            b, h, n, e = x.shape
            return x.reshape(b, h, n // r, r, e).permute(3, 0, 1, 2, 4).reshape(r * b, h, n // r, e)

        o, l = sparse_attention(fold(q), fold(k), fold(v), inner, scale=scale, backend=backend, return_lse=True,
                                q_offset=q_offset // r, deterministic=deterministic)
        dv = v.shape[3]  # explicit: a -1 is ambiguous for empty sequences
        out = o.reshape(r, bsz, hq, nq // r, dv).permute(1, 2, 3, 0, 4).reshape(bsz, hq, nq, dv)
        lse = l.reshape(r, bsz, hq, nq // r).permute(1, 2, 3, 0).reshape(bsz, hq, nq)
        return (out, lse) if return_lse else out
    out = q.new_zeros(bsz, hq, nq, v.shape[3])
    lse = torch.full((bsz, hq, nq), float("-inf"), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                     device=q.device)
    for c in range(r):
        row0 = (c - q_offset) % r  # first query row whose position is = c (mod r)
        if row0 >= nq or c >= kv_len:
            continue  # no queries in this class, or no keys: rows stay 0 / -inf
        inner_offset = (q_offset + row0 - c) // r
        o, l = sparse_attention(q[:, :, row0::r], k[:, :, c::r], v[:, :, c::r], inner, scale=scale, backend=backend,
                                return_lse=True, q_offset=inner_offset, deterministic=deterministic)
        out[:, :, row0::r] = o
        lse[:, :, row0::r] = l.to(lse.dtype)
    return (out, lse) if return_lse else out


def merge_partial_attention(parts):
    """Attention over a disjoint union of key sets, from each set's (out, lse).

    out = sum_i exp(lse_i - lse) * out_i with lse = log(sum_i exp(lse_i)); rows that see no
    key in any part stay 0 with lse -inf. Differentiable (also through lse)."""
    lses = torch.stack([lse for _, lse in parts])  # [P, B, H, N]
    m = lses.amax(0)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    weights = torch.exp(lses - m)  # 0 for parts a row does not see
    total = weights.sum(0)
    seen = total > 0
    safe_total = torch.where(seen, total, torch.ones_like(total))
    # summed in fp32 (fp64 for fp64 parts), not in a half-precision output dtype
    acc = torch.float64 if parts[0][0].dtype == torch.float64 else torch.float32
    out = sum(w[..., None].to(acc) * o.to(acc) for w, (o, _) in zip(weights / safe_total, parts)).to(parts[0][0].dtype)
    lse = torch.where(seen, m + torch.log(safe_total), torch.full_like(m, float("-inf")))
    return out, lse
