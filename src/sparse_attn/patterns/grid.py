"""Block geometry shared by every pattern's block enumerator.

A `BlockGrid` fixes the question a layout answers: which query rows (at which absolute
positions) and which keys, cut into blocks of which size. A `BlockSet` is the answer in
coordinate form: one entry per non-empty (head, query block, kv block) with a flag saying
whether every element in it is allowed ("full") or only some ("partial").

Everything here costs O(number of blocks touched); nothing builds an N x N tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# An "unbounded" distance: bigger than any sequence we will meet, small enough that
# arithmetic on it cannot overflow int64.
UNBOUNDED = 1 << 48


@dataclass(frozen=True)
class BlockGrid:
    """Query rows [0, q_len) sit at absolute positions q_offset + row; key indices [0, kv_len)
    at positions kv_offset + index. Layouts and kernels work in index space (kv_offset 0);
    a pattern seen through per-row positions (`patterns.Shift`) classifies its blocks on the
    same grid with both offsets moved, so block bounds are positions it understands."""

    q_len: int
    kv_len: int
    q_offset: int
    block_q: int
    block_kv: int
    device: torch.device
    kv_offset: int = 0

    def __post_init__(self) -> None:
        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one device
            device = torch.device("cuda", torch.cuda.current_device())
        object.__setattr__(self, "device", device)

    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_kv)

    @property
    def q_end(self) -> int:
        """One past the last query position."""
        return self.q_offset + self.q_len

    @property
    def kv_end(self) -> int:
        """One past the last key position."""
        return self.kv_offset + self.kv_len

    def shifted(self, shift: int) -> "BlockGrid":
        """The same blocks with every position moved by `shift` (queries and keys alike)."""
        return BlockGrid(self.q_len, self.kv_len, self.q_offset + shift, self.block_q, self.block_kv, self.device,
                         self.kv_offset + shift)

    def arange(self, n: int) -> torch.Tensor:
        return torch.arange(n, device=self.device, dtype=torch.int64)

    def q_block_bounds(self, qb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute positions [P0, P1) covered by query blocks `qb`."""
        start = qb * self.block_q
        end = torch.clamp(start + self.block_q, max=self.q_len)
        return start + self.q_offset, end + self.q_offset

    def kv_block_bounds(self, kb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key positions [K0, K1) covered by kv blocks `kb`."""
        start = kb * self.block_kv
        return start + self.kv_offset, torch.clamp(start + self.block_kv, max=self.kv_len) + self.kv_offset

    def q_blocks_of_positions(self, lo: torch.Tensor, hi: torch.Tensor):
        """Query blocks overlapping absolute positions [lo, hi) (clipped, may be empty)."""
        lo = torch.clamp(lo - self.q_offset, min=0)
        hi = torch.clamp(hi - self.q_offset, max=self.q_len)
        first = torch.div(lo, self.block_q, rounding_mode="floor")
        last = torch.div(hi - 1, self.block_q, rounding_mode="floor")
        return first, torch.where(hi > lo, last, first - 1)

    def kv_blocks_of_positions(self, lo: torch.Tensor, hi: torch.Tensor):
        """Kv blocks overlapping key positions [lo, hi) (clipped, may be empty)."""
        lo = torch.clamp(lo - self.kv_offset, min=0)
        hi = torch.clamp(hi - self.kv_offset, max=self.kv_len)
        first = torch.div(lo, self.block_kv, rounding_mode="floor")
        last = torch.div(hi - 1, self.block_kv, rounding_mode="floor")
        return first, torch.where(hi > lo, last, first - 1)


# Block states.
EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclass
class BlockSet:
    """Non-empty blocks in coordinate form, sorted by (head, q block, kv block), unique.

    head/q_block/kv_block are int64 [nnz]; full is bool [nnz]. num_heads == 1 means the
    pattern is the same for every head.
    """

    num_heads: int
    head: torch.Tensor
    q_block: torch.Tensor
    kv_block: torch.Tensor
    full: torch.Tensor

    def key(self, grid: BlockGrid) -> torch.Tensor:
        return (self.head * grid.num_q_blocks + self.q_block) * grid.num_kv_blocks + self.kv_block

    @staticmethod
    def from_key(key: torch.Tensor, full: torch.Tensor, num_heads: int, grid: BlockGrid) -> "BlockSet":
        nkb, nqb = grid.num_kv_blocks, grid.num_q_blocks
        kv_block = key % nkb
        rest = torch.div(key, nkb, rounding_mode="floor")
        return BlockSet(num_heads, torch.div(rest, nqb, rounding_mode="floor"), rest % nqb, kv_block, full)

    def broadcast_heads(self, num_heads: int, grid: BlockGrid) -> "BlockSet":
        """A head-independent set repeated for `num_heads` heads."""
        if self.num_heads == num_heads:
            return self
        if self.num_heads != 1:
            raise ValueError(f"cannot broadcast a block set of {self.num_heads} heads to {num_heads} heads")
        n = self.q_block.numel()
        head = grid.arange(num_heads).repeat_interleave(n)
        return BlockSet(
            num_heads,
            head,
            self.q_block.repeat(num_heads),
            self.kv_block.repeat(num_heads),
            self.full.repeat(num_heads),
        )

    @staticmethod
    def from_unsorted(
        num_heads: int,
        head: torch.Tensor,
        q_block: torch.Tensor,
        kv_block: torch.Tensor,
        state: torch.Tensor,
        grid: BlockGrid,
    ) -> "BlockSet":
        """Drop EMPTY entries, sort, and check uniqueness of the rest."""
        keep = state != EMPTY
        s = BlockSet(num_heads, head[keep], q_block[keep], kv_block[keep], state[keep] == FULL)
        key = s.key(grid)
        order = torch.argsort(key)
        return BlockSet(num_heads, s.head[order], s.q_block[order], s.kv_block[order], s.full[order])


def expand_ranges(first: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each i, the integers first[i]..last[i] (inclusive; none when last < first).

    Returns (owner, value): owner[j] is the i that produced value[j]. O(total) work.
    """
    counts = torch.clamp(last - first + 1, min=0)
    owner = torch.repeat_interleave(torch.arange(first.numel(), device=first.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    value = first[owner] + (torch.arange(owner.numel(), device=first.device) - starts[owner])
    return owner, value
