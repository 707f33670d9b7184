"""Per-row geometry of a batch: key padding, per-row query offsets and key offsets.

`batch_geometries` reads the small per-row tensors a caller gives (a key padding mask (B, Nkv),
q_offset and kv_offset as ints or (B,) tensors) and returns, for each row, the
`patterns.RowGeometry` its view of the pattern needs and the index of its first query. Positions
are relative to each row's first real key: under left padding a Longformer global or a
StreamingLLM sink is the row's first real token, and a padded batch computes what each row
computes alone. Nothing of size N x N (or B x N x N) is built: a row costs O(N) here.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..patterns.rows import RowGeometry
from .common import check_key_padding_mask


@dataclass(frozen=True)
class RowPlan:
    """One row: its geometry (None: no real key, the row's output is 0 / lse -inf) and the index
    of its first query in the call's index space (the inner call's q_offset)."""

    geometry: RowGeometry | None
    q_index0: int


def _runs(valid: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """Sorted (start, stop) runs of True in a 1-D bool tensor."""
    padded = torch.cat([valid.new_zeros(1), valid, valid.new_zeros(1)]).to(torch.int8)
    edges = (padded[1:] - padded[:-1]).nonzero().squeeze(1).tolist()  # starts (+1) and stops (-1)
    return tuple(zip(edges[0::2], edges[1::2]))


def _per_row_ints(name: str, value, batch: int) -> torch.Tensor | None:
    """An int or a (B,) integer tensor as a CPU int64 tensor [B]; None stays None."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be an int or an integer tensor of shape ({batch},), got dtype {value.dtype}")
        if tuple(value.shape) not in ((batch,), ()):
            raise ValueError(f"{name} must be an int or a tensor of shape ({batch},) (one per batch row), got shape "
                             f"{tuple(value.shape)}")
        out = value.detach().to("cpu", torch.int64).expand(batch)
    elif isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or a ({batch},) integer tensor, got {type(value).__name__} {value!r}")
    else:
        out = torch.full((batch,), value, dtype=torch.int64)
    if (out < 0).any():
        raise ValueError(f"{name} must be >= 0 (positions are relative to each row's first real token), got "
                         f"{out.tolist()}")
    return out


def is_per_row(q_offset, kv_offset, key_padding_mask, document_ids=None) -> bool:
    """Whether the call carries per-row information (anything beyond one int q_offset)."""
    return (key_padding_mask is not None or document_ids is not None or isinstance(q_offset, torch.Tensor)
            or isinstance(kv_offset, torch.Tensor) or (kv_offset is not None and kv_offset != 0))


def _document_runs(ids: torch.Tensor, real: torch.Tensor) -> list[tuple[int, int]]:
    """Runs of equal consecutive ids over the real keys (a pad ends a document)."""
    change = torch.ones_like(real)
    change[1:] = (ids[1:] != ids[:-1]) | (real[1:] != real[:-1])
    starts = change.nonzero().squeeze(1).tolist()
    stops = starts[1:] + [ids.numel()]
    return [(a, z) for a, z in zip(starts, stops) if bool(real[a])]


def _check_documents(document_ids, bsz, nkv, q_offset, kv_offset) -> torch.Tensor:
    if not isinstance(document_ids, torch.Tensor):
        raise TypeError(f"document_ids must be an integer tensor of shape ({bsz}, {nkv}), got "
                        f"{type(document_ids).__name__}")
    if document_ids.dtype.is_floating_point or document_ids.dtype == torch.bool:
        raise TypeError(f"document_ids must be an integer tensor, got dtype {document_ids.dtype}")
    if tuple(document_ids.shape) != (bsz, nkv):
        raise ValueError(f"document_ids must have shape (batch, kv_len) = ({bsz}, {nkv}), got "
                         f"{tuple(document_ids.shape)}")
    if q_offset is not None or isinstance(kv_offset, torch.Tensor) or (kv_offset or 0) != 0:
        raise ValueError("document_ids (packed sequences) take neither q_offset nor kv_offset: every document "
                         "starts at position 0 and the queries are the last key indices")
    return document_ids.detach().to("cpu", torch.int64)


class _LastCall:
    """The plans of the last call, reused while the same mask tensors (same objects, unmodified:
    weak references and `_version`) come back with the same lengths: every layer of a model's
    forward passes the same mask, and reading it costs a device sync and O(B * N) host work."""

    def __init__(self) -> None:
        self.entry = None  # (weak refs, key, plans): replaced whole, so threads never see a mix

    @staticmethod
    def _parts(args):
        refs, key = [], []
        for a in args:
            if isinstance(a, torch.Tensor):
                if a.is_inference():  # no version counter: an in-place edit could not be seen
                    return None, None
                refs.append(weakref.ref(a))
                key.append(("tensor", a._version, tuple(a.shape), str(a.device)))
            else:
                refs.append(None)
                key.append(a)
        return tuple(refs), tuple(key)

    def get(self, args):
        entry = self.entry
        if entry is None:
            return None
        refs, key, plans = entry
        new_key = self._parts(args)[1]
        if new_key is None or key != new_key:
            return None
        for old, arg in zip(refs, args):
            if old is not None and old() is not arg:
                return None
        return plans

    def put(self, args, plans) -> None:
        refs, key = self._parts(args)
        self.entry = None if key is None else (refs, key, plans)


_LAST = _LastCall()


def batch_geometries(q: torch.Tensor, k: torch.Tensor, q_offset, kv_offset, key_padding_mask,
                     document_ids=None) -> list[RowPlan]:
    args = (q.shape[0], q.shape[2], k.shape[2], q_offset, kv_offset, key_padding_mask, document_ids)
    plans = _LAST.get(args)
    if plans is None:
        plans = _batch_geometries(q, k, q_offset, kv_offset, key_padding_mask, document_ids)
        _LAST.put(args, plans)
    return plans


def _batch_geometries(q: torch.Tensor, k: torch.Tensor, q_offset, kv_offset, key_padding_mask,
                      document_ids=None) -> list[RowPlan]:
    """One `RowPlan` per batch row.

    * key_padding_mask: bool (B, Nkv), True = a real key (transformers' attention_mask
      convention); None = every key is real. Its first True is the row's position kv_offset.
    * kv_offset: position of the row's first real key (an evicted cache head, a context-parallel
      shard); int or (B,), default 0.
    * q_offset: position of the first query row, int or (B,); default: the queries are the last
      Nq key indices (decoding, chunked prefill), whatever the padding.
    * document_ids: integer (B, Nkv): each run of equal ids in a row is one packed document,
      which sees the pattern from its own position 0 and nothing of the other documents; a
      negative id marks a pad. (`cu_seqlens` of a packed batch: `documents_from_cu_seqlens`.)
    A query row whose index is a padded key index is a pad: its output is 0, lse -inf.
    """
    bsz, nq, nkv = q.shape[0], q.shape[2], k.shape[2]
    if key_padding_mask is not None:
        valid = check_key_padding_mask(key_padding_mask, k, same_device=False).detach().to("cpu")
    else:
        valid = torch.ones(bsz, nkv, dtype=torch.bool)
    kv_pos = _per_row_ints("kv_offset", 0 if kv_offset is None else kv_offset, bsz)
    q_pos = _per_row_ints("q_offset", q_offset, bsz)
    docs = None if document_ids is None else _check_documents(document_ids, bsz, nkv, q_offset, kv_offset)
    if docs is not None:
        valid = valid & (docs >= 0)
    plans = []
    for b in range(bsz):
        row = valid[b]
        if docs is not None:
            plans.append(_packed_plan(row, docs[b], nq, nkv))
            continue
        real = row.nonzero().squeeze(1)
        if real.numel() == 0:
            plans.append(RowPlan(None, 0))
            continue
        pad, last = int(real[0]), int(real[-1])
        shift = int(kv_pos[b]) - pad  # position = index + shift
        if q_pos is None:
            q_index0 = nkv - nq
            if q_index0 < 0:
                raise ValueError(f"q has more positions ({nq}) than k ({nkv}): pass q_offset (the position of the "
                                 "first query) explicitly")
        else:
            q_index0 = int(q_pos[b]) - shift
            if not 0 <= q_index0 <= nkv:
                raise ValueError(f"q_offset={int(q_pos[b])} of row {b} puts its first query at key index {q_index0}, "
                                 f"outside [0, {nkv}] (its first real key, at index {pad}, is position "
                                 f"{int(kv_pos[b])})")
        index = torch.arange(q_index0, q_index0 + nq)
        q_real = (index >= nkv) | row[torch.clamp(index, max=max(nkv - 1, 0))]  # rows past the keys are real
        q_rows = q_real.nonzero().squeeze(1)
        if q_rows.numel():
            first_q, last_q = int(q_rows[0]), int(q_rows[-1])
            alone = (last_q - first_q + 1, last - pad + 1, q_index0 + first_q + shift, int(kv_pos[b]))
        else:
            alone = (0, last - pad + 1, int(kv_pos[b]), int(kv_pos[b]))
        key_runs = None if bool(row.all()) else _runs(row)
        query_runs = None if bool(q_real.all()) else tuple((a + q_index0, z + q_index0) for a, z in _runs(q_real))
        plans.append(RowPlan(RowGeometry(shift, alone, key_runs, query_runs), q_index0))
    return plans


def _packed_plan(row: torch.Tensor, ids: torch.Tensor, nq: int, nkv: int) -> RowPlan:
    """A row of packed documents; queries are the last nq key indices (each in its document)."""
    runs = _document_runs(ids, row)
    if not runs:
        return RowPlan(None, 0)
    q_index0 = nkv - nq
    if q_index0 < 0:
        raise ValueError(f"q has more positions ({nq}) than k ({nkv}) with document_ids")
    documents = []
    for a, z in runs:
        first_q, last_q = max(a, q_index0), z - 1  # the document's query rows, as key indices
        q_len = max(0, last_q - first_q + 1)
        documents.append(((a, z), (q_len, z - a, (first_q - a) if q_len else 0, 0)))
    if len(documents) == 1:  # one document: an ordinary padded row
        (a, z), alone = documents[0]
        key_runs = None if (a, z) == (0, nkv) else ((a, z),)
        q_real = torch.zeros(nq, dtype=torch.bool)
        q_real[max(a - q_index0, 0):max(z - q_index0, 0)] = True
        query_runs = None if bool(q_real.all()) else tuple((s + q_index0, e + q_index0) for s, e in _runs(q_real))
        return RowPlan(RowGeometry(-a, alone, key_runs, query_runs), q_index0)
    return RowPlan(RowGeometry(0, (0, 0, 0, 0), None, None, tuple(documents)), q_index0)


def documents_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """document_ids (1, total) of a packed batch given as cumulative lengths [0, l0, l0+l1, ...]
    (flash-attn's varlen convention); positions past the last document are pads (-1)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D tensor [0, l0, l0 + l1, ...], got {cu_seqlens!r}")
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu.tolist()}")
    total = int(cu[-1]) if total is None else total
    if total < int(cu[-1]):
        raise ValueError(f"total ({total}) is shorter than the packed documents ({int(cu[-1])} tokens)")
    ids = torch.full((total,), -1, dtype=torch.int64)
    for d in range(cu.numel() - 1):
        ids[int(cu[d]):int(cu[d + 1])] = d
    return ids[None].to(cu_seqlens.device)
