"""Receptive fields of a per-layer schedule of attention mechanisms.

In a residual transformer, output position i after layers 1..d depends on input j iff there
is a path j = p0 -> p1 -> ... -> pd = i in which every step p(l-1) -> p(l) is the residual
(p(l) == p(l-1)) or allowed by layer l (query p(l) may attend key p(l-1)). As boolean
matrices: reach_d = (I | A_d) o ... o (I | A_1), where A_l is the OR over layer l's heads (a
position reaches through any head). Reach only grows with depth (the residual keeps it).

    from sparse_attn import patterns as P
    from sparse_attn.eval.reach import receptive_field, plot_receptive_field
    rf = receptive_field(["sliding_window:window=512"] * 6 + ["full"], 32768)
    print(rf)                                    # coverage per depth, min_depth_full, ...
    rf = receptive_field([P.sliding_window(64)], 8192, max_depth=200)   # repeat the schedule
    plot_receptive_field(rf, "reach.png")        # needs the `viz` extra (matplotlib)

What each kind of layer contributes:

* Patterns (presets, combinators, per-head patterns, `BlockLayout`s) and pattern mechanism
  specs ("sliding_window:window=64"): exact.
* Other mechanisms, as their registry entry says (`MechanismInfo.receptive_field`):
  kernelized ones (`linear`, `performer`) give every key a weight, so dense attention (causal
  when `causal=true`): exact. Data-dependent ones (`topk`, `block_topk`, `lsh`, `routing`) have
  no fixed receptive field: they count as their upper bound (dense, or causal), and the result
  says so (`upper_bound=True`, with a reason per layer). Then the coverages are upper bounds and
  `min_depth_full` a lower bound. `topk` with `top_k >= length` and `block_topk` keeping every
  block are exact (they keep every key).

Two methods, both exact:

* dense (`exact=True`; the default for length <= 1024): token-level bool matrices, the whole
  reach matrix carried forward layer by layer with one n x n matmul per layer.
  Time O(depth * n^3) (BLAS), memory O(layers * n^2) bytes. Allowed up to n = 4096.
* frontier (`exact=False`; the default for longer sequences): for each tracked output, the set
  of positions feeding it is propagated backwards through the layers, kept per block of
  `block` positions: a bool per (output, block) saying "all of the block", plus an element
  mask of `block` bits only for blocks the set covers in part (usually the edges of the set).
  Full blocks of a layer's `BlockLayout` act at block level (one sparse product); partial
  blocks are resolved element by element (the pattern's predicate on the block, through
  `layout.element_masks`), only for (output, block) pairs whose query block is in the set and
  whose key block is not already covered - so the result is exact, not a block superset.
  Semi-naive: a layer applied again in the same pass looks only at the positions added since
  its last application (what the older ones reach is in the set already), so a window's
  step costs its new edge, not the whole set.
  Memory O(T * n / block) for the block flags, plus `block` bits per partially covered block
  (at most O(T * n) bits, for sets that never fill a block, e.g. one residue class of a
  dilated window), per distinct layer one earlier copy of the set (semi-naive), plus the
  layers' layouts (O(non-empty blocks)); temporaries are bounded (about 2^22 elements).
  Time per layer step: one sparse product over the layout's full blocks, plus O(block^2)
  per (output, partial block) pair whose query block gained positions and whose key block
  is not covered yet (a layout of partial blocks only, such as `strided`, can cost up to
  n^2 / 2 predicate evaluations in one step while the set is wide and sparse, the same as
  one mask pass of the blocked attention). `full()` / `causal()` and the stand-ins for
  non-pattern mechanisms take O(T * n / block), with no layout.
  Per-depth results for depths 1..L (L = schedule length) cost L(L+1)/2 layer steps (one
  backward pass per depth), or L steps when every layer is the same mechanism.

`min_depth_full` is the first depth d at which every tracked output i sees every input it
could in principle (j <= i when every layer is causal at this length, checked element by
element, else all j). It speaks for the tracked outputs: all of them with the dense method
by default, 9 evenly spaced ones (the last included) with the frontier unless `queries`
says otherwise. Beyond the schedule
(`max_depth`) the schedule repeats. In the frontier method it is searched by doubling then
bisection (reach is monotone in depth) or, for a homogeneous schedule, in one pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .._checks import check_int
from ..ops.mechanisms import Mechanism, as_mechanism
from ..ops.registry import EVERY_KEY, KERNELIZED, PATTERN
from ..patterns import BlockLayout, Pattern
from ..patterns.grid import UNBOUNDED, expand_ranges
from ..patterns.primitives import Band

__all__ = ["ReceptiveField", "plot_receptive_field", "receptive_field"]

# Longest sequence the dense method is chosen for by default, and the longest it accepts.
_DENSE_AUTO_MAX = 1024
_DENSE_MAX = 4096
# Elements in one temporary of the frontier method (bool/int/float), to bound its memory.
_BUDGET = 1 << 22
_DEFAULT_BLOCK = 128
_DEFAULT_QUERIES = 9


# --------------------------------------------------------------------------- the result
@dataclass(eq=False, repr=False)
class ReceptiveField:
    """What `receptive_field` found. Depth d means layers 1..d of the schedule.

    Fields (T = number of tracked outputs, L = number of layers in the schedule):

    * `length` n; `layers`: a description of each layer; `queries`: int64 [T], the output
      positions tracked (all of them by default with the dense method);
    * `counts`: int64 [L, T], inputs feeding each tracked output after 1..L layers;
    * `possible`: int64 [T], inputs it could see in principle (i + 1 for a causal schedule, else n);
    * `farthest_back` / `farthest_ahead`: int64 [L, T], i - min(reached j) and max(reached j) - i;
    * `min_depth_full`: first depth at which every tracked output sees all it could (searched
      up to `max_depth`, repeating the schedule), or None if not reached by then;
    * `causal`: every layer is causal; `method`: "dense" or "frontier"; `block`: the
      frontier's block size (None for dense);
    * `upper_bound`: some layer is data-dependent and counted as its upper bound; `reasons`:
      why, one line per such layer. Coverages are then upper bounds, `min_depth_full` a lower
      bound.

    Derived: `coverage` (fraction of (tracked output, input) pairs connected, per depth),
    `coverage_of_possible` (connected / possible pairs), `farthest`, and on request
    `reach(depth, queries)` (bool rows) and `matrix(depth)` (bool [n, n], n <= 4096).
    """

    length: int
    layers: list[str]
    queries: torch.Tensor
    counts: torch.Tensor
    possible: torch.Tensor
    farthest_back: torch.Tensor
    farthest_ahead: torch.Tensor
    min_depth_full: int | None
    max_depth: int
    causal: bool
    method: str
    block: int | None
    upper_bound: bool
    reasons: list[str] = field(default_factory=list)
    _schedule: Any = field(default=None, repr=False, compare=False)

    @property
    def depths(self) -> list[int]:
        return list(range(1, len(self.layers) + 1))

    @property
    def coverage(self) -> torch.Tensor:
        """float64 [L]: connected (tracked output, input) pairs / (T * n)."""
        return self.counts.double().sum(1) / (self.queries.numel() * self.length)

    @property
    def coverage_of_possible(self) -> torch.Tensor:
        """float64 [L]: connected pairs / pairs that could be connected (causal: j <= i)."""
        return self.counts.double().sum(1) / self.possible.double().sum()

    @property
    def farthest(self) -> torch.Tensor:
        """int64 [L, T]: the largest |i - j| over inputs j reaching output i."""
        return torch.maximum(self.farthest_back, self.farthest_ahead)

    def reach(self, depth: int | None = None, queries=None) -> torch.Tensor:
        """bool [T', n]: which inputs feed each output in `queries` (default: the tracked ones)
        after `depth` layers (default: the whole schedule; larger depths repeat it). Exact;
        computed again by this result's method, O(T' * n) memory for the answer."""
        sched: _Schedule = self._schedule
        depth = _check_depth(depth, len(sched.layers))
        q = self.queries if queries is None else _check_queries(queries, self.length)
        if self.method == "dense":
            return sched.dense_reach(depth)[q]
        return sched.frontier(q, depth).dense()

    def matrix(self, depth: int | None = None) -> torch.Tensor:
        """bool [n, n]: reach[i, j] = input j feeds output i after `depth` layers (default: the
        whole schedule). Token level, O(n^2) memory: n <= 4096 only."""
        sched: _Schedule = self._schedule
        depth = _check_depth(depth, len(sched.layers))
        if self.length > _DENSE_MAX:
            raise ValueError(f"matrix() builds an n x n matrix: length must be <= {_DENSE_MAX}, got {self.length}; "
                             "use reach(depth, queries) for a few outputs instead")
        return sched.dense_reach(depth)

    def to_dict(self) -> dict:
        """JSON-ready summary (lists and numbers)."""
        return {
            "length": self.length, "layers": list(self.layers), "queries": self.queries.tolist(),
            "counts": self.counts.tolist(), "possible": self.possible.tolist(),
            "coverage": self.coverage.tolist(), "coverage_of_possible": self.coverage_of_possible.tolist(),
            "farthest_back": self.farthest_back.tolist(), "farthest_ahead": self.farthest_ahead.tolist(),
            "min_depth_full": self.min_depth_full, "max_depth": self.max_depth, "causal": self.causal,
            "method": self.method, "block": self.block, "upper_bound": self.upper_bound,
            "reasons": list(self.reasons),
        }

    @classmethod
    def from_dict(cls, data: dict) -> ReceptiveField:
        """The result back from `to_dict()` (a --json file), without the schedule: `reach()`
        and `matrix()` need a fresh `receptive_field` run."""
        if not isinstance(data, dict) or "counts" not in data or "layers" not in data:
            raise ValueError(f"not a ReceptiveField dict (keys: {sorted(data) if isinstance(data, dict) else data!r})")

        def tensor(key):
            return torch.tensor(data[key], dtype=torch.int64)

        return cls(length=data["length"], layers=list(data["layers"]), queries=tensor("queries"),
                   counts=tensor("counts").reshape(len(data["layers"]), -1), possible=tensor("possible"),
                   farthest_back=tensor("farthest_back").reshape(len(data["layers"]), -1),
                   farthest_ahead=tensor("farthest_ahead").reshape(len(data["layers"]), -1),
                   min_depth_full=data["min_depth_full"], max_depth=data["max_depth"], causal=data["causal"],
                   method=data["method"], block=data["block"], upper_bound=data["upper_bound"],
                   reasons=list(data.get("reasons", [])))

    def summary(self) -> str:
        head = (f"receptive field: n={self.length}, {len(self.layers)} layers, {self.queries.numel()} tracked outputs, "
                f"{'causal' if self.causal else 'non-causal'}, method={self.method}"
                + (f" (block {self.block})" if self.block else ""))
        lines = [head]
        if self.upper_bound:
            lines.append("UPPER BOUND (data-dependent layers counted as their largest reach):")
            lines += [f"  {r}" for r in self.reasons]
        lines.append(f"{'depth':>5}  {'coverage':>9}  {'of possible':>11}  {'max back':>9}  {'max ahead':>9}  layer")
        cov, covp = self.coverage.tolist(), self.coverage_of_possible.tolist()
        back, ahead = self.farthest_back.max(1).values.tolist(), self.farthest_ahead.max(1).values.tolist()
        for d, name in enumerate(self.layers):
            lines.append(f"{d + 1:>5}  {cov[d]:>9.4f}  {covp[d]:>11.4f}  {back[d]:>9}  {ahead[d]:>9}  {name}")
        found = ("not reached" if self.min_depth_full is None else str(self.min_depth_full))
        lines.append(f"min_depth_full: {found} (searched up to depth {self.max_depth})")
        return "\n".join(lines)

    __str__ = summary

    def __repr__(self) -> str:
        cov = self.coverage[-1].item()
        return (f"ReceptiveField(length={self.length}, layers={len(self.layers)}, outputs={self.queries.numel()}, "
                f"coverage={cov:.4f}, min_depth_full={self.min_depth_full}, causal={self.causal}, "
                f"method={self.method!r}, upper_bound={self.upper_bound})")


# -------------------------------------------------------------------- argument checks
def _check_depth(depth, layers: int) -> int:
    return layers if depth is None else check_int("depth", depth, 1)


def _check_queries(queries, n: int) -> torch.Tensor:
    if isinstance(queries, str):
        if queries != "all":
            raise ValueError(f"queries must be 'all', None or a sequence of output positions, got {queries!r}")
        return torch.arange(n)
    bad = TypeError(f"queries must be 'all', None or a sequence/tensor of output positions, got "
                    f"{type(queries).__name__} {queries!r}")
    if isinstance(queries, (bool, int, float)):
        raise bad
    try:
        q = torch.as_tensor(queries).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise bad from None
    if q.numel() == 0:
        raise ValueError("queries must name at least one output position")
    if q.dtype == torch.bool or q.dtype.is_floating_point or q.dtype.is_complex:
        raise TypeError(f"queries must hold integer positions, got dtype {q.dtype}")
    q = q.long().cpu()
    if int(q.min()) < 0 or int(q.max()) >= n:
        raise ValueError(f"queries must lie in [0, {n}) (the length), got values from {int(q.min())} to {int(q.max())}")
    return torch.unique(q)


# ---------------------------------------------------------------------- the schedule
@dataclass
class _Layer:
    name: str
    key: Any  # layers with equal keys attend alike (detects homogeneous schedules)
    pattern: Pattern | None = None
    layout: BlockLayout | None = None
    reason: str | None = None  # set when the layer stands in for a data-dependent mechanism


def _band_kind(pattern) -> tuple[int, int] | None:
    """(lo, hi) for a dilation-1 band with an unbounded side (full, causal, ...): such a layer
    maps a set to an interval, with no layout needed."""
    if isinstance(pattern, Band) and pattern.dilation == 1 and UNBOUNDED in (pattern.hi, -pattern.lo):
        return pattern.lo, pattern.hi
    return None


def _mechanism_layer(m: Mechanism, index: int, n: int) -> _Layer:
    name = str(m)
    if m.kind == PATTERN:
        scalar = all(v is None or isinstance(v, (bool, int, float, str)) for v in m.params.values())
        return _Layer(name, ("spec", name) if scalar else ("object", id(m)), pattern=m.pattern())
    defaults = m.info.parameters()
    causal = m.params.get("causal", defaults["causal"].default if "causal" in defaults else False)
    stand_in = Band(0, None, name="causal()") if causal else Band(None, None, name="full()")
    shape = "causal" if causal else "dense"
    if m.info.receptive_field_at(m.params, n) == EVERY_KEY:
        # kernelized: every key gets a positive weight; dynamic: this one keeps every key here
        label = f"= {shape}" if m.kind == KERNELIZED else f"keeps every key: = {shape}"
        return _Layer(f"{name} ({label})", ("band", causal), pattern=stand_in)
    reason = (f"layer {index + 1} ({name}): {m.name} picks its keys from the data, so it has no fixed receptive "
              f"field; counted as {shape} attention, its largest")
    return _Layer(f"{name} (upper bound: {shape})", ("band", causal), pattern=stand_in, reason=reason)


def _resolve_layer(entry, index: int, n: int) -> _Layer:
    where = f"schedule[{index}]"
    if isinstance(entry, dict):
        try:
            entry = Mechanism.from_dict(entry)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
    if isinstance(entry, str):
        try:
            entry = as_mechanism(entry)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
    if isinstance(entry, Mechanism):
        return _mechanism_layer(entry, index, n)
    if isinstance(entry, Pattern):
        return _Layer(repr(entry), ("pattern", id(entry)), pattern=entry)
    if isinstance(entry, BlockLayout):
        if (entry.q_len, entry.kv_len, entry.q_offset) != (n, n, 0):
            raise ValueError(f"{where}: a BlockLayout must cover self-attention over the length ({n} queries at "
                             f"offset 0, {n} keys), got q_len={entry.q_len}, kv_len={entry.kv_len}, "
                             f"q_offset={entry.q_offset}")
        if entry.block_q != entry.block_kv:
            raise ValueError(f"{where}: a BlockLayout needs square blocks here, got {entry.block_q}x{entry.block_kv}")
        return _Layer(repr(entry), ("layout", id(entry)), layout=entry)
    raise TypeError(f"{where} must be a Pattern, BlockLayout, Mechanism, mechanism dict or spec string like "
                    f"'sliding_window:window=64', got {type(entry).__name__}")


def _schedule_entries(schedule) -> list:
    from ..nn.model import ModelConfig

    if isinstance(schedule, ModelConfig):
        return list(schedule.layer_mechanisms())
    if isinstance(schedule, (Pattern, BlockLayout, Mechanism, str, dict)):
        return [schedule]
    if isinstance(schedule, (list, tuple)):
        if not schedule:
            raise ValueError("schedule is empty: give at least one layer")
        return list(schedule)
    raise TypeError(f"schedule must be a list of Patterns / mechanism specs / Mechanisms, or a ModelConfig, got "
                    f"{type(schedule).__name__}")


class _Plan:
    """One layer at given (n, block): either an analytic band, or its layout split into the
    full-block adjacency (sparse [NKB, NQB]) and the partial blocks (head, q block, kv block)."""

    def __init__(self, layer: _Layer, n: int, block: int) -> None:
        self.band = _band_kind(layer.pattern) if layer.layout is None else None
        self._causal: bool | None = None
        if self.band is not None:
            self._causal = self.band[0] >= 0
            return
        pattern = layer.layout.pattern if layer.layout is not None else layer.pattern
        if pattern is not None and pattern.is_causal():  # provably causal: no need to look
            self._causal = True
        layout = layer.layout if layer.layout is not None else layer.pattern.layout(n, block_q=block, block_kv=block)
        self.layout = layout
        nqb, nkb = layout.num_q_blocks, layout.num_kv_blocks
        self.nqb, self.nkb = nqb, nkb
        f, p = layout.full, layout.partial
        f_qb, f_kb = f.rows % nqb, f.indices.long()
        self.full_qb, self.full_kb = f_qb, f_kb
        self.full_adj = None
        if f_qb.numel():
            self.full_adj = torch.sparse_coo_tensor(torch.stack([f_kb, f_qb]), torch.ones(f_qb.numel()),
                                                    (nkb, nqb), check_invariants=True).coalesce()
        p_head = torch.div(p.rows, nqb, rounding_mode="floor")
        p_qb, p_kb = p.rows % nqb, p.indices.long()
        # a block full in one head is covered whatever the other heads allow in it
        keep = ~torch.isin(p_qb * nkb + p_kb, f_qb * nkb + f_kb)
        order = torch.argsort(p_qb[keep], stable=True)  # grouped by query block: [p_off[b], p_off[b+1])
        self.p_head, self.p_qb, self.p_kb = p_head[keep][order], p_qb[keep][order], p_kb[keep][order]
        self.p_off = torch.cat([torch.zeros(1, dtype=torch.long),
                                torch.cumsum(torch.bincount(self.p_qb, minlength=nqb), 0)])

    def causal(self) -> bool:
        """Does the layer allow only j <= i? (block level, element level on diagonal blocks)."""
        if self._causal is None:
            g = self.layout.grid
            sizes = torch.clamp(g.kv_len - self.full_kb * g.block_kv, max=g.block_kv)
            above = (self.full_kb > self.full_qb) | ((self.full_kb == self.full_qb) & (sizes > 1))
            causal = not bool(above.any()) and not bool((self.p_kb > self.p_qb).any())
            diag = (self.p_kb == self.p_qb).nonzero().squeeze(1)
            upper = torch.ones(g.block_q, g.block_kv, dtype=torch.bool).triu(1)
            step = max(1, _BUDGET // (g.block_q * g.block_kv))
            for s in range(0, diag.numel() if causal else 0, step):
                idx = diag[s:s + step]
                m = self.layout.element_masks(self.p_head[idx], self.p_qb[idx], self.p_kb[idx])
                if bool((m & upper).any()):
                    causal = False
                    break
            self._causal = causal
        return self._causal


class _Schedule:
    def __init__(self, layers: list[_Layer], n: int, block: int) -> None:
        self.layers = layers
        self.n = n
        self.block = block
        self.homogeneous = all(layer.key == layers[0].key for layer in layers)
        self._plans: dict[Any, _Plan] = {}  # per layer key: layers that attend alike share one
        self._dense: dict[Any, torch.Tensor] = {}

    def layer_at(self, depth: int) -> int:
        """Index of the layer used at depth `depth` (1-based; the schedule repeats)."""
        return (depth - 1) % len(self.layers)

    # ---------------------------------------------------------------- dense method
    def dense_mask(self, i: int) -> torch.Tensor:
        """bool [n, n]: I | (OR over heads of layer i's allowed pairs)."""
        key = self.layers[i].key
        if key not in self._dense:
            layer, n = self.layers[i], self.n
            out = torch.zeros(n, n, dtype=torch.bool)
            if layer.layout is not None:
                out |= layer.layout.to_dense().any(0)
            else:
                # validated and bound to the length (BigBird draws its blocks per length) by a
                # one-block layout, then evaluated in bounded row chunks
                pattern = layer.pattern.layout(n, block_q=max(n, 1)).pattern
                heads = pattern.num_heads or 1
                rows = max(1, _BUDGET // max(1, n * heads))
                for s in range(0, n, rows):
                    e = min(n, s + rows)
                    out[s:e] = pattern.to_dense(e - s, n, q_offset=s).any(0)
            out.fill_diagonal_(True)
            self._dense[key] = out
        return self._dense[key]

    def dense_layer_causal(self, i: int) -> bool:
        """Exact at this length (`Pattern.is_causal` is only a proof, False when unknown)."""
        return not bool(self.dense_mask(i).triu(1).any())

    def dense_reach(self, depth: int) -> torch.Tensor:
        reach = torch.eye(self.n, dtype=torch.bool)
        for d in range(1, depth + 1):
            reach = _bool_matmul(self.dense_mask(self.layer_at(d)), reach)
        return reach

    # ------------------------------------------------------------- frontier method
    def plan(self, i: int) -> _Plan:
        key = self.layers[i].key
        if key not in self._plans:
            self._plans[key] = _Plan(self.layers[i], self.n, self.block)
        return self._plans[key]

    def frontier(self, queries: torch.Tensor, depth: int) -> _Frontier:
        """The inputs feeding each of `queries` through layers 1..depth: a backward pass."""
        walk = _Pass(self, queries)
        for d in range(depth, 0, -1):
            if bool(walk.front.full.all()):
                break
            walk.apply(self.layer_at(d))
        return walk.front


class _Pass:
    """A backward pass from some outputs. Semi-naive: a layer applied to a set F that it was
    already applied to as a subset G (the set only grows) adds only the keys of F minus G,
    since what G reaches through the layer is in the set already. So each layer keeps the set
    as it was at its last application, and later applications look at the difference only."""

    def __init__(self, sched: _Schedule, queries: torch.Tensor) -> None:
        self.sched = sched
        self.front = _Frontier.of_positions(sched.n, sched.block, queries)
        self._seen: dict[Any, _Frontier] = {}

    def apply(self, i: int) -> None:
        plan, key = self.sched.plan(i), self.sched.layers[i].key
        if plan.band is not None:
            _band_step(self.front, plan.band)
            return
        before = self.front.copy()
        _step(self.front, plan, self.front.delta(self._seen.get(key)))
        self._seen[key] = before


def _bool_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a @ b) > 0 for bool matrices; float32 counts are exact below 2^24."""
    return (a.float() @ b.float()) > 0


# ------------------------------------------------------------------------ the frontier
class _Frontier:
    """T sets of positions in [0, n), kept per block of B positions: `full` bool [T, NB] marks
    blocks wholly in the set; `cell` int64 [m] (= t * NB + block, sorted, unique) and `mask`
    bool [m, B] hold the blocks the set covers in part (never full, never empty)."""

    def __init__(self, n: int, block: int, full: torch.Tensor, cell: torch.Tensor, mask: torch.Tensor) -> None:
        self.n, self.B = n, block
        self.nb = full.shape[1]
        self.full, self.cell, self.mask = full, cell, mask

    @classmethod
    def of_positions(cls, n: int, block: int, pos: torch.Tensor) -> _Frontier:
        t, nb = pos.numel(), -(-n // block)
        cell = torch.arange(t) * nb + torch.div(pos, block, rounding_mode="floor")
        mask = torch.zeros(t, block, dtype=torch.bool)
        mask[torch.arange(t), pos % block] = True
        front = cls(n, block, torch.zeros(t, nb, dtype=torch.bool), torch.zeros(0, dtype=torch.long),
                    torch.zeros(0, block, dtype=torch.bool))
        front.merge(cell, mask)
        return front

    def copy(self) -> _Frontier:
        return _Frontier(self.n, self.B, self.full.clone(), self.cell, self.mask)

    def delta(self, prev: _Frontier | None):
        """What this set holds beyond `prev` (a subset of it, or None for nothing), per block:
        (new_full bool [T, NB]: blocks wholly new; cell [m] sorted; rows bool [m, B]: the new
        positions of blocks new in part)."""
        if prev is None:
            return self.full.clone(), self.cell, self.mask
        new_full = self.full & ~prev.any_blocks()
        # blocks full now, partial before: the rest of the block is new
        was_part = self.full.view(-1)[prev.cell]
        a_cell, a_rows = prev.cell[was_part], ~prev.mask[was_part] & self._valid(prev.cell[was_part])
        # blocks partial now: positions not in the block's old mask
        old = torch.zeros_like(self.mask)
        if prev.cell.numel() and self.cell.numel():
            at = torch.searchsorted(prev.cell, self.cell).clamp(max=prev.cell.numel() - 1)
            hit = prev.cell[at] == self.cell
            old[hit] = prev.mask[at[hit]]
        b_rows = self.mask & ~old
        some = b_rows.any(1)
        cell = torch.cat([a_cell, self.cell[some]])
        rows = torch.cat([a_rows, b_rows[some]])
        order = torch.argsort(cell)
        return new_full, cell[order], rows[order]

    def _valid(self, cell: torch.Tensor) -> torch.Tensor:
        """bool [m, B]: which slots of each cell's block are positions < n."""
        start = (cell % self.nb) * self.B
        return (start[:, None] + torch.arange(self.B)[None, :]) < self.n

    def block_sizes(self) -> torch.Tensor:
        return torch.clamp(self.n - torch.arange(self.nb) * self.B, max=self.B)

    def any_blocks(self) -> torch.Tensor:
        out = self.full.clone()
        out.view(-1)[self.cell] = True
        return out

    def merge(self, cell: torch.Tensor, mask: torch.Tensor) -> None:
        """OR partial blocks into the set; promote completed blocks, drop covered ones."""
        if cell.numel():
            cell = torch.cat([self.cell, cell])
            mask = torch.cat([self.mask, mask])
            uniq, inv = torch.unique(cell, return_inverse=True)
            hits = torch.zeros(uniq.numel(), self.B, dtype=torch.int32).index_add_(0, inv, mask.to(torch.int32))
            cell, mask = uniq, hits > 0
        else:
            cell, mask = self.cell, self.mask
        keep = mask.any(1) & ~self.full.view(-1)[cell]
        cell, mask = cell[keep], mask[keep]
        complete = (mask | ~self._valid(cell)).all(1)
        if bool(complete.any()):
            self.full.view(-1)[cell[complete]] = True
            cell, mask = cell[~complete], mask[~complete]
        self.cell, self.mask = cell, mask

    def add_interval(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Add positions lo[t]..hi[t] (inclusive, clipped to [0, n)) to set t."""
        lo, hi = torch.clamp(lo, min=0), torch.clamp(hi, max=self.n - 1)
        some = lo <= hi
        first = torch.div(lo, self.B, rounding_mode="floor")
        last = torch.div(hi, self.B, rounding_mode="floor")
        blocks = torch.arange(self.nb)[None, :]
        self.full |= (blocks > first[:, None]) & (blocks < last[:, None]) & some[:, None]
        t = some.nonzero().squeeze(1)
        edges = torch.cat([first[t], last[t]])
        owner = torch.cat([t, t])
        pos = edges[:, None] * self.B + torch.arange(self.B)[None, :]
        mask = (pos >= lo[owner, None]) & (pos <= hi[owner, None])
        self.merge(owner * self.nb + edges, mask)

    def _per_set(self, value_full: torch.Tensor, value_cell: torch.Tensor, reduce: str) -> torch.Tensor:
        """Min or max (`reduce`) per set of a value per full block [T, NB] and per cell [m]."""
        best = value_full.amin(1) if reduce == "amin" else value_full.amax(1)
        owner = torch.div(self.cell, self.nb, rounding_mode="floor")
        return best.scatter_reduce(0, owner, value_cell, reduce=reduce, include_self=True) if owner.numel() else best

    def min_pos(self) -> torch.Tensor:
        big = self.n
        starts = torch.arange(self.nb) * self.B
        value_full = torch.where(self.full, starts[None, :], big)
        slot = torch.where(self.mask, torch.arange(self.B)[None, :], self.B).amin(1)
        return self._per_set(value_full, (self.cell % self.nb) * self.B + slot, "amin")

    def max_pos(self) -> torch.Tensor:
        ends = torch.arange(self.nb) * self.B + self.block_sizes() - 1
        value_full = torch.where(self.full, ends[None, :], -1)
        slot = torch.where(self.mask, torch.arange(self.B)[None, :], -1).amax(1)
        return self._per_set(value_full, (self.cell % self.nb) * self.B + slot, "amax")

    def counts(self) -> torch.Tensor:
        out = (self.full.long() * self.block_sizes()[None, :]).sum(1)
        owner = torch.div(self.cell, self.nb, rounding_mode="floor")
        return out.index_add_(0, owner, self.mask.sum(1))

    def dense(self) -> torch.Tensor:
        out = self.full.repeat_interleave(self.B, 1)
        if self.cell.numel():
            owner = torch.div(self.cell, self.nb, rounding_mode="floor")
            block = self.cell % self.nb
            cols = block[:, None] * self.B + torch.arange(self.B)[None, :]
            out[owner[:, None].expand_as(cols)[self.mask], cols[self.mask]] = True
        return out[:, : self.n]


def _band_step(front: _Frontier, band: tuple[int, int]) -> None:
    """A dilation-1 band with an unbounded side maps a set to an interval of keys."""
    lo, hi = band
    t = front.full.shape[0]
    if lo == -UNBOUNDED and hi == UNBOUNDED:
        a, b = torch.zeros(t, dtype=torch.long), torch.full((t,), front.n - 1)
    elif hi == UNBOUNDED:  # keys j <= i - lo
        a, b = torch.zeros(t, dtype=torch.long), front.max_pos() - lo
    else:  # keys j >= i - hi
        a, b = front.min_pos() - hi, torch.full((t,), front.n - 1)
    front.add_interval(a, b)


def _step(front: _Frontier, plan: _Plan, delta) -> None:
    """front <- front | {keys some query of `delta` (positions of front) may attend in this layer}."""
    new_full, d_cell, d_rows = delta
    B, nb = front.B, front.nb
    touched = new_full.clone()  # [T, NQB] query blocks holding new positions
    touched.view(-1)[d_cell] = True
    if plan.full_adj is not None:  # full blocks of the layout: block level
        hit = torch.sparse.mm(plan.full_adj, touched.T.float().contiguous())  # [NKB, T]
        front.full |= (hit > 0).T
    ti, qb = touched.nonzero(as_tuple=True)
    starts, stops = plan.p_off[qb], plan.p_off[qb + 1]
    # blocks with the most new rows first: they cover key blocks soonest, so later pairs are
    # more often skipped as already covered
    width = torch.where(new_full[ti, qb], B, 0)
    if d_cell.numel():
        at = torch.searchsorted(d_cell, ti * nb + qb).clamp(max=d_cell.numel() - 1)
        in_cell = d_cell[at] == ti * nb + qb
        width = torch.where(in_cell, d_rows[at].sum(1), width)
    order = torch.argsort(width, descending=True, stable=True)
    ti, qb, starts, stops = ti[order], qb[order], starts[order], stops[order]
    n_entries = stops - starts
    pairs_per = max(1, _BUDGET // (B * B))
    nqb, nkb = plan.nqb, plan.nkb
    cum = torch.cumsum(n_entries, 0)
    front.merge(torch.zeros(0, dtype=torch.long), torch.zeros(0, B, dtype=torch.bool))  # drop cells now full
    g0 = 0
    while g0 < qb.numel():  # groups of query blocks whose (block, partial entry) pairs fit the budget
        base = int(cum[g0 - 1]) if g0 else 0
        g1 = max(g0 + 1, int(torch.searchsorted(cum, base + _BUDGET, right=True)))
        owner, entry = expand_ranges(starts[g0:g1], stops[g0:g1] - 1)
        g_t = ti[g0:g1]
        g0 = g1
        t_of, e_of = g_t[owner], entry
        for u in range(0, e_of.numel(), pairs_per):
            tj, ej = t_of[u:u + pairs_per], e_of[u:u + pairs_per]
            k = plan.p_kb[ej]
            open_ = ~front.full[tj, k]  # key blocks already covered need no work
            tj, ej, k = tj[open_], ej[open_], k[open_]
            if not tj.numel():
                continue
            q, h = plan.p_qb[ej], plan.p_head[ej]
            whole = new_full[tj, q]
            # [P, B] the new query rows in block q (a wholly new block: its rows < n)
            rows = whole[:, None] & ((q[:, None] * B + torch.arange(B)[None, :]) < front.n)
            if bool((~whole).any()):
                part = (~whole).nonzero().squeeze(1)
                rows[part] = d_rows[torch.searchsorted(d_cell, tj[part] * nb + q[part])]
            key, inv = torch.unique((h * nqb + q) * nkb + k, return_inverse=True)
            uh = torch.div(key, nqb * nkb, rounding_mode="floor")
            uq = torch.div(key, nkb, rounding_mode="floor") % nqb
            elem = plan.layout.element_masks(uh, uq, key % nkb)  # [U, B, B]
            got = torch.bmm(rows.float()[:, None, :], elem[inv].float())[:, 0] > 0  # [P, B]
            keep = got.any(1)
            front.merge((tj * nb + k)[keep], got[keep])


# ---------------------------------------------------------------------- entry point
def _pick_block(layers: list[_Layer], block) -> int:
    sizes = {layer.layout.block_q for layer in layers if layer.layout is not None}
    if block is not None:
        block = check_int("block", block, 1)
        if sizes and sizes != {block}:
            raise ValueError(f"block={block} differs from the block size of the BlockLayouts in the schedule "
                             f"({sorted(sizes)})")
        return block
    if len(sizes) > 1:
        raise ValueError(f"the BlockLayouts in the schedule have different block sizes {sorted(sizes)}; "
                         "the frontier needs one")
    if sizes:
        return sizes.pop()
    natural = [b for b in (layer.pattern.natural_block() for layer in layers) if b is not None]
    g = math.gcd(*natural) if natural else 0
    return g if 16 <= g <= 512 else _DEFAULT_BLOCK


def receptive_field(schedule, length: int, *, exact: bool | None = None, block: int | None = None,
                    queries=None, max_depth: int | None = None) -> ReceptiveField:
    """Which inputs can reach which outputs through a per-layer schedule of attention layers.

    schedule: a list with one entry per layer: `Pattern`, `BlockLayout` (self-attention over
        `length`), `Mechanism`, mechanism dict, or spec string ("sliding_window:window=64",
        "topk:top_k=32"); a single entry is a one-layer schedule; or a `ModelConfig` (its
        per-layer `mechanisms`; a dense-to-sparse warm-up is ignored: the schedule as trained
        after it).
    length: sequence length n (self-attention, queries at positions 0..n-1).
    exact: True for the dense token-level method (n <= 4096), False for the block frontier
        (exact too), None to pick dense for n <= 1024.
    block: the frontier's block size (default: the patterns' natural block if they share one,
        else 128); ignored by the dense method.
    queries: output positions to track: None (all with the dense method, else 9 evenly
        spaced from 0 to n-1, the last included), "all", or a sequence/tensor of positions.
    max_depth: search `min_depth_full` up to this depth, repeating the schedule (default: the
        schedule's length; must not be smaller).

    Returns a `ReceptiveField`. Data-dependent layers make it an upper bound, flagged in
    `upper_bound` / `reasons`; see the module docstring for methods and costs.
    """
    n = check_int("length", length, 1)
    if exact is not None and not isinstance(exact, bool):
        raise TypeError(f"exact must be True, False or None, got {type(exact).__name__} {exact!r}")
    layers = [_resolve_layer(e, i, n) for i, e in enumerate(_schedule_entries(schedule))]
    L = len(layers)
    max_depth = L if max_depth is None else check_int("max_depth", max_depth, 1)
    if max_depth < L:
        raise ValueError(f"max_depth ({max_depth}) is smaller than the schedule ({L} layers)")
    dense = n <= _DENSE_AUTO_MAX if exact is None else exact
    if dense and n > _DENSE_MAX:
        raise ValueError(f"exact=True builds n x n matrices: length must be <= {_DENSE_MAX}, got {n}; use exact=False "
                         "(the block frontier, exact as well) for longer sequences")
    block_size = _pick_block(layers, block)
    if queries is None:
        q = torch.arange(n) if dense else torch.linspace(0, n - 1, _DEFAULT_QUERIES).round().long().unique()
    else:
        q = _check_queries(queries, n)
    sched = _Schedule(layers, n, block_size)
    reasons = [layer.reason for layer in layers if layer.reason]
    if dense:
        causal = all(sched.dense_layer_causal(i) for i in range(L))
        stats, min_depth = _run_dense(sched, q, causal, max_depth)
    else:
        causal = all(sched.plan(i).causal() for i in range(L))
        stats, min_depth = _run_frontier(sched, q, causal, max_depth)
    counts, back, ahead = stats
    return ReceptiveField(
        length=n, layers=[layer.name for layer in layers], queries=q, counts=counts,
        possible=_possible(q, n, causal), farthest_back=back, farthest_ahead=ahead,
        min_depth_full=min_depth, max_depth=max_depth, causal=causal, method="dense" if dense else "frontier",
        block=None if dense else block_size, upper_bound=bool(reasons), reasons=reasons, _schedule=sched,
    )


def _possible(q: torch.Tensor, n: int, causal: bool) -> torch.Tensor:
    return (q + 1) if causal else torch.full_like(q, n)


def _run_dense(sched: _Schedule, q, causal: bool, max_depth: int):
    n, L = sched.n, len(sched.layers)
    possible = _possible(q, n, causal)
    pos = torch.arange(n)
    reach = torch.eye(n, dtype=torch.bool)
    counts, back, ahead = [], [], []
    min_depth = None
    total, last_change = n, 0
    for d in range(1, max_depth + 1):
        reach = _bool_matmul(sched.dense_mask(sched.layer_at(d)), reach)
        new_total = int(reach.sum())
        if new_total != total:  # reach only grows, so an equal count is an equal set
            total, last_change = new_total, d
        rows = reach[q]  # [T, n]
        c = rows.sum(1)
        if d <= L:
            counts.append(c)
            back.append(q - torch.where(rows, pos, n).amin(1))
            ahead.append(torch.where(rows, pos, -1).amax(1) - q)
        if min_depth is None and bool((c == possible).all()):
            min_depth = d
        if d >= L and (min_depth is not None or d - last_change >= L):
            break  # found, or a whole period of layers changed nothing: it never will
    return (torch.stack(counts), torch.stack(back), torch.stack(ahead)), min_depth


def _run_frontier(sched: _Schedule, q, causal: bool, max_depth: int):
    n, L = sched.n, len(sched.layers)
    possible = _possible(q, n, causal)
    T = q.numel()
    counts = torch.zeros(L, T, dtype=torch.long)
    back = torch.zeros(L, T, dtype=torch.long)
    ahead = torch.zeros(L, T, dtype=torch.long)
    # an output that sees all it could at depth d sees the same at every later depth
    complete_value = (possible, q, (n - 1 - q) if not causal else torch.zeros_like(q))
    done = torch.zeros(T, dtype=torch.bool)
    min_depth = None

    def record(d, idx, front):
        counts[d - 1, idx] = front.counts()
        back[d - 1, idx] = q[idx] - front.min_pos()
        ahead[d - 1, idx] = front.max_pos() - q[idx]

    if sched.homogeneous:  # the same layer everywhere: one backward pass gives every depth
        walk = _Pass(sched, q)
        front = walk.front
        before = front.counts()
        for d in range(1, max_depth + 1):
            walk.apply(0)
            if d <= L:
                record(d, torch.arange(T), front)
            now = front.counts()
            if d >= L and torch.equal(now, before):
                break  # a fixed point: deeper layers add nothing
            before = now
            if bool((now == possible).all()):
                min_depth = d
                for d2 in range(d + 1, L + 1):
                    counts[d2 - 1], back[d2 - 1], ahead[d2 - 1] = complete_value
                break
        return (counts, back, ahead), min_depth

    for d in range(1, L + 1):
        todo = (~done).nonzero().squeeze(1)
        if todo.numel():
            front = sched.frontier(q[todo], d)
            record(d, todo, front)
        for i, v in enumerate(complete_value):
            (counts, back, ahead)[i][d - 1, done] = v[done]
        done = counts[d - 1] == possible
        if min_depth is None and bool(done.all()):
            min_depth = d
    if min_depth is None and max_depth > L:
        min_depth = _search_depth(sched, q[~done], possible[~done], L, max_depth)
    return (counts, back, ahead), min_depth


def _search_depth(sched: _Schedule, q, possible, lo: int, max_depth: int) -> int | None:
    """Smallest depth in (lo, max_depth] at which every output in q sees all it could (some do
    not at depth `lo`, a multiple of the schedule length): doubling, then bisection, since
    reach grows with depth. Equal reach at depths L*k and L*2k is a fixed point (the second
    pass ran a whole number of periods from the first's result and changed nothing)."""
    L = len(sched.layers)

    def counts(d):
        return sched.frontier(q, d).counts()

    prev = counts(lo)
    hi = lo
    while True:
        hi = min(max_depth, hi * 2)
        now = counts(hi)
        if bool((now == possible).all()):
            break
        if hi == max_depth or (hi % L == 0 and torch.equal(now, prev)):
            return None
        lo, prev = hi, now
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if bool((counts(mid) == possible).all()):
            hi = mid
        else:
            lo = mid
    return hi


# -------------------------------------------------------------------------- picture
def plot_receptive_field(result: ReceptiveField, path, *, outputs: int = 4, width: int = 512) -> None:
    """Coverage against depth, and a reach map (depth x input position, shade = fraction of
    the positions in a bin that feed the output, any at all visibly shaded; `width` bins) for
    up to `outputs` tracked outputs, evenly picked. Writes the picture to `path`.

    Needs matplotlib (the `viz` extra); draws on a bare Figure (no pyplot state)."""
    if not isinstance(result, ReceptiveField):
        raise TypeError(f"result must be a ReceptiveField (from receptive_field), got {type(result).__name__}")
    outputs = check_int("outputs", outputs, 1)
    width = check_int("width", width, 1)
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plot_receptive_field needs matplotlib: pip install 'sparse_attn[viz]' "
                          f"(or pip install matplotlib) ({exc})") from None
    n, L = result.length, len(result.layers)
    picks = result.queries[torch.linspace(0, result.queries.numel() - 1, min(outputs, result.queries.numel()))
                           .round().long().unique()]
    bins = min(width, n)
    owner = torch.div(torch.arange(n) * bins, n, rounding_mode="floor")  # bin of each position
    per_bin = torch.bincount(owner, minlength=bins).clamp(min=1).double()
    maps = torch.zeros(picks.numel(), L, bins, dtype=torch.float64)
    for d in range(1, L + 1):
        rows = result.reach(d, picks)  # [P, n]
        for p in range(picks.numel()):
            frac = torch.bincount(owner[rows[p]], minlength=bins).double() / per_bin
            maps[p, d - 1] = torch.where(frac > 0, 0.15 + 0.85 * frac, 0.0)  # a single reached position shows

    fig = Figure(figsize=(5 + 3.2 * picks.numel(), 3.8), layout="constrained")
    axes = fig.subplots(1, 1 + picks.numel(), squeeze=False)[0]
    ax = axes[0]
    depths = result.depths
    ax.plot(depths, result.coverage.tolist(), marker="o", label="of all pairs")
    if result.causal:
        ax.plot(depths, result.coverage_of_possible.tolist(), marker=".", label="of causal pairs")
    if result.min_depth_full is not None and result.min_depth_full <= L:
        ax.axvline(result.min_depth_full, color="gray", ls="--", label=f"full at depth {result.min_depth_full}")
    ax.set_xlabel("depth (layers)")
    ax.set_ylabel("coverage" + (" (upper bound)" if result.upper_bound else ""))
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for a, pos, img in zip(axes[1:], picks.tolist(), maps):
        a.imshow(img.numpy(), aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest",
                 extent=(-0.5, n - 0.5, L + 0.5, 0.5))
        a.axvline(pos, color="tab:red", lw=0.8)
        a.set_title(f"output {pos}", fontsize=9)
        a.set_xlabel("input position")
        a.set_ylabel("depth")
    note = " - UPPER BOUND (data-dependent layers)" if result.upper_bound else ""
    fig.suptitle(f"receptive field, n={n}, {L} layers, {result.method}{note}", fontsize=10)
    fig.savefig(path, dpi=110)
