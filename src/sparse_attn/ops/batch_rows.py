"""Per-row geometry of a batch: key padding, per-row query offsets and key offsets.

`batch_geometries` reads the small per-row tensors a caller gives (a key padding mask (B, Nkv),
q_offset and kv_offset as ints or (B,) tensors) and returns, for each row, the
`patterns.RowGeometry` its view of the pattern needs and the index of its first query. Positions
are relative to each row's first real key: under left padding a Longformer global or a
StreamingLLM sink is the row's first real token, and a padded batch computes what each row
computes alone. Nothing of size N x N (or B x N x N) is built: a row costs O(N) here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..patterns.rows import RowGeometry


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


def _per_row_ints(name: str, value, batch: int, device) -> torch.Tensor | None:
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


def is_per_row(q_offset, kv_offset, key_padding_mask) -> bool:
    """Whether the call carries per-row information (anything beyond one int q_offset)."""
    return (key_padding_mask is not None or isinstance(q_offset, torch.Tensor)
            or isinstance(kv_offset, torch.Tensor) or (kv_offset is not None and kv_offset != 0))


def batch_geometries(q: torch.Tensor, k: torch.Tensor, q_offset, kv_offset, key_padding_mask) -> list[RowPlan]:
    """One `RowPlan` per batch row.

    * key_padding_mask: bool (B, Nkv), True = a real key (transformers' attention_mask
      convention); None = every key is real. Its first True is the row's position kv_offset.
    * kv_offset: position of the row's first real key (an evicted cache head, a context-parallel
      shard); int or (B,), default 0.
    * q_offset: position of the first query row, int or (B,); default: the queries are the last
      Nq key indices (decoding, chunked prefill), whatever the padding.
    A query row whose index is a padded key index is a pad: its output is 0, lse -inf.
    """
    bsz, nq, nkv = q.shape[0], q.shape[2], k.shape[2]
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a bool tensor of shape ({bsz}, {nkv}), got "
                            f"{type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = real key), got dtype "
                            f"{key_padding_mask.dtype}; use mask.bool() for 0/1 masks")
        if tuple(key_padding_mask.shape) != (bsz, nkv):
            raise ValueError(f"key_padding_mask must have shape (batch, kv_len) = ({bsz}, {nkv}), got "
                             f"{tuple(key_padding_mask.shape)}")
        valid = key_padding_mask.detach().to("cpu")
    else:
        valid = torch.ones(bsz, nkv, dtype=torch.bool)
    kv_pos = _per_row_ints("kv_offset", 0 if kv_offset is None else kv_offset, bsz, q.device)
    q_pos = _per_row_ints("q_offset", q_offset, bsz, q.device)
    plans = []
    for b in range(bsz):
        row = valid[b]
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
