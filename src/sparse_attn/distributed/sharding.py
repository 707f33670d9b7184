"""How a sequence of N tokens is split over P ranks.

A `Sharding` gives each rank an ordered list of runs of global positions `[start, end)`; the
rank's local sequence is their concatenation. Runs are cut at multiples of `unit` (the
planner's block size) so that every block of the attention layout lives on one rank; only the
run that ends at N may be shorter.

    contiguous(N, P)          rank r holds one run: for local patterns (windows, dilated)
    zigzag(N, P)              2P chunks, rank r holds chunks r and 2P-1-r: balances causal work
    balanced(layout, P)       contiguous runs with equal shares of the layout's row costs
    from_order(order, P)      torch's load-balancer index order (`x[order]` split in P equal parts)
    two_level(cp_sharding, U) a 2-D ("ulysses", "cp") mesh: each cp shard split over U ranks
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_int

__all__ = ["Sharding", "TwoLevelSharding", "contiguous", "zigzag", "balanced", "from_order", "two_level"]


@dataclass(frozen=True)
class Sharding:
    """runs[r] = ((start, end), ...): rank r's global positions, in local order."""

    num_tokens: int
    unit: int
    runs: tuple

    def __post_init__(self) -> None:
        seen = torch.zeros(self.num_tokens, dtype=torch.int32)
        for rank, runs in enumerate(self.runs):
            for start, end in runs:
                if not (0 <= start < end <= self.num_tokens):
                    raise ValueError(f"sharding run ({start}, {end}) of rank {rank} is outside [0, {self.num_tokens})")
                if start % self.unit or (end % self.unit and end != self.num_tokens):
                    raise ValueError(f"sharding run ({start}, {end}) of rank {rank} is not cut at multiples of "
                                     f"unit={self.unit} (only a run ending at N={self.num_tokens} may be shorter)")
                seen[start:end] += 1
            # only the last local block may be short: a short run (ending at N) must come last
            if any(end % self.unit for _, end in runs[:-1]):
                raise ValueError(f"rank {rank}: the run ending at N={self.num_tokens} must be its last run")
        if self.num_tokens and not bool((seen == 1).all()):
            raise ValueError("sharding runs must cover every position 0..N-1 exactly once")

    @property
    def world_size(self) -> int:
        return len(self.runs)

    def length(self, rank: int) -> int:
        return sum(end - start for start, end in self.runs[rank])

    def lengths(self) -> list[int]:
        return [self.length(r) for r in range(self.world_size)]

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """[N_r] int64 global positions of rank r's tokens, in local order: the position ids
        a model needs (rotary angles) for its shard."""
        parts = [torch.arange(s, e, device=device) for s, e in self.runs[rank]]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)

    def order(self, device=None) -> torch.Tensor:
        """[N] the global positions of all ranks' tokens, rank after rank (torch's load-balancer
        index order: `x[..., order, ...]` split in equal parts when the shards are equal)."""
        return torch.cat([self.positions(r, device) for r in range(self.world_size)])

    def owner(self) -> torch.Tensor:
        """[N] int64: the rank holding each position."""
        out = torch.empty(self.num_tokens, dtype=torch.int64)
        for rank, runs in enumerate(self.runs):
            for s, e in runs:
                out[s:e] = rank
        return out

    def local_index(self) -> torch.Tensor:
        """[N] int64: each position's index in its owner's local sequence."""
        out = torch.empty(self.num_tokens, dtype=torch.int64)
        for rank in range(self.world_size):
            out[self.positions(rank)] = torch.arange(self.length(rank))
        return out

    def shard(self, x: torch.Tensor, rank: int, dim: int = -2) -> torch.Tensor:
        """Rank r's part of the full-sequence tensor x (sequence along `dim`)."""
        check_int("rank", rank, 0, self.world_size - 1)
        if x.shape[dim] != self.num_tokens:
            raise ValueError(f"x has {x.shape[dim]} positions along dim {dim}, the sharding is for {self.num_tokens}")
        return torch.cat([x.narrow(dim, s, e - s) for s, e in self.runs[rank]], dim) if self.runs[rank] else \
            x.narrow(dim, 0, 0)

    def unshard(self, parts, dim: int = -2) -> torch.Tensor:
        """The full-sequence tensor from every rank's part (in rank order)."""
        if len(parts) != self.world_size:
            raise ValueError(f"parts must hold {self.world_size} tensors (one per rank), got {len(parts)}")
        for r, p in enumerate(parts):
            if p.shape[dim] != self.length(r):
                raise ValueError(f"parts[{r}] has {p.shape[dim]} positions along dim {dim}, rank {r} holds "
                                 f"{self.length(r)}")
        cat = torch.cat(list(parts), dim)
        inverse = torch.empty(self.num_tokens, dtype=torch.int64)
        inverse[self.order()] = torch.arange(self.num_tokens)
        return cat.index_select(dim, inverse.to(cat.device))

    def key(self) -> tuple:
        return (self.num_tokens, self.unit, self.runs)

    def describe(self) -> str:
        return "; ".join(f"rank {r}: " + (", ".join(f"[{s}, {e})" for s, e in runs) or "nothing")
                         for r, runs in enumerate(self.runs))


def _units(num_tokens: int, unit: int) -> int:
    return -(-num_tokens // unit)


def _run(first_unit: int, last_unit: int, num_tokens: int, unit: int) -> tuple[int, int]:
    return first_unit * unit, min(last_unit * unit, num_tokens)


def _check(num_tokens, world_size, unit):
    return (check_int("num_tokens", num_tokens, 0), check_int("world_size", world_size, 1),
            check_int("unit", unit, 1))


def contiguous(num_tokens: int, world_size: int, unit: int = 128) -> Sharding:
    """One run per rank, equal numbers of units (the first ranks take one more); ranks past the
    number of units hold nothing."""
    num_tokens, world_size, unit = _check(num_tokens, world_size, unit)
    n = _units(num_tokens, unit)
    bounds = [r * n // world_size for r in range(world_size + 1)]
    runs = tuple((_run(a, b, num_tokens, unit),) if b > a else () for a, b in zip(bounds, bounds[1:]))
    return Sharding(num_tokens, unit, runs)


def zigzag(num_tokens: int, world_size: int, unit: int = 128) -> Sharding:
    """Head-tail: 2P chunks of (nearly) equal units; rank r holds chunks r and 2P-1-r, so each
    rank has as many early (cheap under a causal mask) as late (dear) queries."""
    num_tokens, world_size, unit = _check(num_tokens, world_size, unit)
    n = _units(num_tokens, unit)
    chunks = 2 * world_size
    bounds = [c * n // chunks for c in range(chunks + 1)]
    runs = []
    for r in range(world_size):
        mine = []
        for c in (r, chunks - 1 - r):
            if bounds[c + 1] > bounds[c]:
                run = _run(bounds[c], bounds[c + 1], num_tokens, unit)
                if mine and mine[-1][1] == run[0]:  # the middle rank's two chunks touch: one run
                    run = (mine.pop()[0], run[1])
                mine.append(run)
        runs.append(tuple(mine))
    return Sharding(num_tokens, unit, tuple(runs))


def balanced(layout, world_size: int, unit: int | None = None) -> Sharding:
    """Contiguous runs with (greedily) equal shares of the layout's row costs: the allowed blocks
    of each query block summed over heads, cut where the running cost crosses r/P of the total
    (for patterns whose rows cost unequal work: globals, BigBird, causal without zigzag)."""
    world_size = check_int("world_size", world_size, 1)
    unit = layout.block_q if unit is None else check_int("unit", unit, 1)
    if unit % layout.block_q or unit % layout.block_kv:
        raise ValueError(f"unit ({unit}) must be a multiple of the layout's blocks ({layout.block_q}, "
                         f"{layout.block_kv})")
    per_unit = unit // layout.block_q
    rows = layout.full.counts + layout.partial.counts  # [H * NQB]
    cost = rows.reshape(layout.num_heads, layout.num_q_blocks).sum(0).double()  # [NQB]
    n = _units(layout.q_len, unit)
    cost = torch.nn.functional.pad(cost, (0, n * per_unit - cost.numel())).reshape(n, per_unit).sum(1) + 1e-9
    cum = torch.cumsum(cost, 0)
    total = float(cum[-1]) if n else 0.0
    bounds = [0]
    for r in range(1, world_size):
        # the unit boundary whose running cost is nearest r/P of the total, never going back
        target = total * r / world_size
        cut = int(torch.searchsorted(cum, torch.tensor(target, dtype=cum.dtype)))
        if cut < n and (cut == 0 or abs(float(cum[cut]) - target) < abs(float(cum[cut - 1]) - target)):
            cut += 1
        bounds.append(min(max(cut, bounds[-1]), n))
    bounds.append(n)
    runs = tuple((_run(a, b, layout.q_len, unit),) if b > a else () for a, b in zip(bounds, bounds[1:]))
    return Sharding(layout.q_len, unit, runs)


def from_order(order, world_size: int, unit: int = 128) -> Sharding:
    """The sharding torch's context-parallel load balancers describe: `order` [N] (or [1, N]) is a
    permutation, rank r holding `order[r*N/P:(r+1)*N/P]` (N divisible by P), as from
    `torch.distributed.tensor.experimental._context_parallel._load_balancer`'s `_generate_indices()`.
    Each rank's positions must form runs cut at multiples of `unit`."""
    world_size = check_int("world_size", world_size, 1)
    unit = check_int("unit", unit, 1)
    order = torch.as_tensor(order).reshape(-1).long().cpu()
    n = order.numel()
    if n % world_size:
        raise ValueError(f"order has {n} positions, not divisible by world_size={world_size}")
    if not torch.equal(torch.sort(order).values, torch.arange(n)):
        raise ValueError("order must be a permutation of 0..N-1")
    per = n // world_size
    runs = []
    for r in range(world_size):
        part = order[r * per:(r + 1) * per]
        breaks = (torch.nonzero(part[1:] != part[:-1] + 1).reshape(-1) + 1).tolist()
        edges = [0, *breaks, per]
        runs.append(tuple((int(part[a]), int(part[b - 1]) + 1) for a, b in zip(edges, edges[1:]) if b > a))
    return Sharding(n, unit, tuple(runs))


@dataclass(frozen=True)
class TwoLevelSharding(Sharding):
    """The sharding of a 2-D ("ulysses", "cp") mesh of U x C ranks: `cp` (a sharding over C ranks)
    gives each ulysses group its cp-level shard, and the group's U ranks split that shard's local
    sequence into U contiguous pieces of whole units (`pieces(c)`, the first pieces one unit longer).
    As a `Sharding` it has C * U ranks, index `c * U + u` (`index(c, u)`) holding piece u of cp
    shard c: `shard`, `unshard`, `positions` work with that index. Build it with `two_level`."""

    cp: Sharding = None
    ulysses_size: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.runs != _two_level_runs(self.cp, self.ulysses_size):
            raise ValueError("TwoLevelSharding runs do not split its cp sharding in contiguous pieces: build it "
                             "with two_level(cp_sharding, ulysses_size)")

    @property
    def cp_size(self) -> int:
        return self.cp.world_size

    def index(self, cp_rank: int, ulysses_rank: int) -> int:
        """The shard index of the rank at (cp_rank, ulysses_rank) of the mesh."""
        check_int("cp_rank", cp_rank, 0, self.cp_size - 1)
        check_int("ulysses_rank", ulysses_rank, 0, self.ulysses_size - 1)
        return cp_rank * self.ulysses_size + ulysses_rank

    def pieces(self, cp_rank: int) -> Sharding:
        """How the U ranks of ulysses group `cp_rank` split its cp shard, as a sharding of the cp
        shard's local sequence (0..L_c-1): the sharding of the head all-to-all."""
        return contiguous(self.cp.length(cp_rank), self.ulysses_size, self.unit)

    def key(self) -> tuple:
        return super().key() + (self.cp.key(), self.ulysses_size)

    def describe(self) -> str:
        c_of = lambda i: divmod(i, self.ulysses_size)  # noqa: E731
        return "; ".join(f"cp {c_of(i)[0]} ulysses {c_of(i)[1]}: " +
                         (", ".join(f"[{s}, {e})" for s, e in runs) or "nothing") for i, runs in enumerate(self.runs))


def _two_level_runs(cp: Sharding, ulysses_size: int) -> tuple:
    """runs[c * U + u]: piece u of cp shard c, cut from the shard's runs at whole units."""
    out = []
    for c in range(cp.world_size):
        runs, pieces = cp.runs[c], contiguous(cp.length(c), ulysses_size, cp.unit)
        for u in range(ulysses_size):
            mine, offset = [], 0  # offset: local index of the current run's start
            for a, b in pieces.runs[u]:  # at most one local range
                for start, end in runs:
                    lo, hi = max(a, offset), min(b, offset + end - start)
                    if lo < hi:
                        mine.append((start + lo - offset, start + hi - offset))
                    offset += end - start
            out.append(tuple(mine))
    return tuple(out)


def two_level(cp_sharding: Sharding, ulysses_size: int) -> TwoLevelSharding:
    """The sharding of a 2-D ("ulysses", "cp") mesh: cp shard c (of `cp_sharding`, over the C
    ranks of the "cp" dimension) split over the `ulysses_size` ranks of the "ulysses" dimension
    in contiguous pieces of its local sequence (`TwoLevelSharding`)."""
    if not isinstance(cp_sharding, Sharding) or isinstance(cp_sharding, TwoLevelSharding):
        raise TypeError(f"cp_sharding must be a (one-level) Sharding, got {type(cp_sharding).__name__}")
    ulysses_size = check_int("ulysses_size", ulysses_size, 1)
    return TwoLevelSharding(cp_sharding.num_tokens, cp_sharding.unit, _two_level_runs(cp_sharding, ulysses_size),
                            cp_sharding, ulysses_size)
