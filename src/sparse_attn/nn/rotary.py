"""Rotary position embeddings (RoFormer, Su et al. 2021), in the "rotate half" layout that Llama,
Mistral and the HuggingFace models use: the head dim is split into two halves (x1, x2) and each
pair (x1[i], x2[i]) is rotated by the angle position * base^(-2i / head_dim).

Scores between a query at position m and a key at position n then depend on m - n only, which
is what lets a cache re-index positions (StreamingLLM) without touching the stored keys' content.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """`rope(x, positions)` rotates x (B, H, N, D) by the positions (N,) or (B, N) (ints)."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim must be an even int >= 2 for rotary embeddings, got {head_dim!r}")
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 1:
            raise ValueError(f"base must be a number > 1, got {base!r}")
        self.head_dim = head_dim
        self.base = float(base)
        # the frequencies are recomputed per call (D/2 numbers) rather than kept in a buffer, which
        # model.half() / .bfloat16() would round: angles of positions in the millions need fp32+

    def inv_freq(self, dtype: torch.dtype, device) -> torch.Tensor:
        """base^(-2i / head_dim) for i < head_dim / 2: [D/2]."""
        return self.base ** (-torch.arange(0, self.head_dim, 2, dtype=dtype, device=device) / self.head_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(f"x must be (batch, heads, length, {self.head_dim}), got {tuple(x.shape)}")
        if not isinstance(positions, torch.Tensor) or positions.dtype.is_floating_point or positions.dim() not in (1, 2):
            raise TypeError(f"positions must be an integer tensor of shape (length,) or (batch, length), got "
                            f"{positions.dtype if isinstance(positions, torch.Tensor) else type(positions).__name__}")
        if positions.shape[-1] != x.shape[2]:
            raise ValueError(f"positions has {positions.shape[-1]} entries but x has length {x.shape[2]}")
        # angles in float32 (float64 for float64 inputs): positions up to millions keep their precision
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        angles = positions.to(dtype)[..., None] * self.inv_freq(dtype, x.device)  # [(B,) N, D/2]
        if angles.dim() == 3:
            angles = angles[:, None]  # [B, 1, N, D/2]
        cos, sin = angles.cos(), angles.sin()
        x1, x2 = x.to(dtype).chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return rotated.to(x.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base:g}"
