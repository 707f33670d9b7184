"""Running a model over a document longer than it was trained on: overlapping chunks, stitched.

`chunked_forward(model, tokens, chunk_len, overlap)` cuts the sequence into chunks of
`chunk_len` tokens that overlap by at least `2 * overlap`, runs the model on each, and gives each
token the output of the chunk where it sits most centrally (the most context on its poorer side).
With a shift-invariant pattern (sliding / dilated windows, whose scores with rotary embeddings
depend on relative positions only) and `overlap` >= the model's receptive field on each side
(layers x the window's reach), every kept output saw exactly the keys the full forward would
have: the stitched result equals the full sparse forward. Patterns tied to absolute positions
(global tokens, sinks, BigBird's random blocks) are re-anchored in each chunk and do not.
"""

from __future__ import annotations

import torch

from .._checks import check_int


def chunk_starts(length: int, chunk_len: int, overlap: int) -> list[int]:
    """First positions of the chunks: stride chunk_len - 2 * overlap, the last chunk flush with
    the end (so every chunk is full when length >= chunk_len)."""
    if length <= chunk_len:
        return [0]
    stride = chunk_len - 2 * overlap
    starts = list(range(0, length - chunk_len, stride))
    return starts + [length - chunk_len]


def chunked_forward(model, tokens: torch.Tensor, chunk_len: int, overlap: int) -> torch.Tensor:
    """model(tokens (B, n)) -> (B, n, ...) on chunks; returns (B, N, ...) stitched (see module docstring)."""
    check_int("chunk_len", chunk_len, 1)
    check_int("overlap", overlap, minimum=0)
    if 2 * overlap >= chunk_len:
        raise ValueError(f"overlap ({overlap}) must be less than half of chunk_len ({chunk_len})")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens must be (batch, length), got {getattr(tokens, 'shape', type(tokens).__name__)}")
    n = tokens.shape[1]
    starts = chunk_starts(n, chunk_len, overlap)
    outs = [model(tokens[:, s:s + chunk_len]) for s in starts]
    # for every token, the chunk where it has the most context on its poorer side
    pos = torch.arange(n)
    start = torch.tensor(starts)[:, None]  # [C, 1]
    end = torch.clamp(start + chunk_len, max=n)
    inside = (pos >= start) & (pos < end)
    # the sequence's own ends are not chunk edges: no context is missing there
    left = torch.where(start == 0, n, pos - start)
    right = torch.where(end == n, n, end - 1 - pos)
    margin = torch.where(inside, torch.minimum(left, right), -1)  # [C, N]
    best = margin.argmax(0)  # [N]
    result = outs[0].new_empty(tokens.shape[0], n, *outs[0].shape[2:])
    for c, s in enumerate(starts):
        rows = (best == c).nonzero().flatten()
        if rows.numel():
            result[:, rows] = outs[c][:, rows - s]
    return result
