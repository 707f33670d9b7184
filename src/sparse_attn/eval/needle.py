"""Needle in a haystack at the attention level, for every mechanism.

A haystack is random q, k, v `[B, H, N, D]` (entries N(0, 1), so a random score q.k / sqrt(D) is
N(0, 1)). One key, at position p = round(depth * (N - num_queries)), is the *needle*; the last
`num_queries` positions are *queries* that look for it (retrieval at the end of a context):

    needle key    k_p = sqrt(D) * u                       (u: a random unit vector per trial, head)
    query         q_i = strength * sqrt(D) * u + noise_i  (noise_i ~ N(0, I_D))

so the needle's score is strength * sqrt(D) + N(0, 1) while every other key scores
N(0, 1 + strength^2). Dense softmax then puts on the needle a mass of about
sigmoid(strength * sqrt(D) - (1 + strength^2) / 2 - log(N - 1)): with the defaults
(D = 64, strength = 3) that is > 0.999 up to N = 64K. With one query the needle positions run
from 0 (depth 0) to the query itself (depth 1, p = N - 1), as in the usual needle tests; with
several queries, depth 1 is the first query's position, so every query may see the needle.

Reading the mass off the output (no access to attention weights needed). Value channel
`marker = D - 1` is reserved: it is 1 at the needle and 0 everywhere else. Any mechanism whose
output row is a convex combination of value rows, out_i = sum_j w_ij v_j with w_ij >= 0, then
gives out_i[marker] = w_ip: the weight on the needle, exactly (up to the dtype's rounding).
That holds for every pattern (softmax over the allowed keys; 0 where the needle is not
allowed, exactly), for top-k / block top-k / LSH / routing (softmax over the keys they
select, merged by log-sum-exp, which is again convex), and for the kernelized mechanisms:
linear attention's phi (elu + 1, relu) and Performer's positive random features are
non-negative, so w_ij = phi(q_i).phi(k_j) / sum_l phi(q_i).phi(k_l) is still a convex weight and
the channel reads their "mass" on the needle (their eps in the denominator can make the
weights sum slightly below 1). The other channels carry the needle's content: the cosine
similarity of out_i[:marker] with v_p[:marker] says how much of the output is the needle's
value (1 = only the needle, ~0 = noise).

Metrics of `needle_grid`, per mechanism, per (length, depth), over trials x heads x queries
(trials are batch entries: independent haystacks):

* `mass`: mean attention mass on the needle (the marker channel), in [0, 1];
* `cosine`: mean cosine similarity of the output's content channels with the needle's value;
* `hit_rate`: fraction of (trial, head, query) samples whose mass exceeds `threshold`;
* `retrieved` (bool): mean mass > `threshold` (default 0.5). Mass above one half means the
  needle holds the majority of the weight, so it is also the argmax of the row's weights and
  the largest single term of the output.

The same numbers for dense softmax attention, computed in float64 from the attention
weights themselves (not from the marker channel), are in `result.reference`.

Mechanisms are spec strings ("sliding_window", "topk:top_k=32"), `Mechanism`s, or `Pattern`s.
Parameters a spec or Mechanism does not give take the needle defaults for the length
(`needle_defaults`): every mechanism gets a budget of about N / 16 keys per query.

    from sparse_attn.eval.needle import needle_grid, plot_needle_heatmaps
    res = needle_grid(None, lengths=[512, 2048], depths=[0, .25, .5, .75, 1])  # the defaults
    print(res)                                   # mass tables, errors
    plot_needle_heatmaps(res, "needle.png")      # needs the `viz` extra (matplotlib)
    json.dump(res.to_dict(), open("needle.json", "w"))
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import _extras
from .._checks import check_bool, check_fraction, check_int
from ..ops.mechanisms import Mechanism, attention, mechanism_info
from ..patterns import BlockLayout, Pattern

__all__ = [
    "DEFAULT_MECHANISMS",
    "Haystack",
    "NeedleResult",
    "make_haystack",
    "needle_defaults",
    "needle_grid",
    "needle_mechanism",
    "plot_needle_heatmaps",
]

DEFAULT_STRENGTH = 3.0
DEFAULT_THRESHOLD = 0.5
DEFAULT_DEPTHS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DEFAULT_LENGTHS = (256, 1024, 4096)

# The default grid: the dense baseline, then patterns, kernelized and dynamic mechanisms.
# "causal" becomes "full" when needle_grid(causal=False); streaming is causal whatever the grid.
DEFAULT_MECHANISMS = ("causal", "sliding_window", "longformer", "bigbird", "streaming", "dilated", "linear",
                      "performer", "topk", "block_topk", "lsh", "routing")


# --------------------------------------------------------------------------- defaults per length
def needle_defaults(name: str, length: int, *, causal: bool = True, seed: int = 0) -> dict:
    """The parameters `needle_grid` gives mechanism `name` at sequence length `length` when a
    spec does not set them: its registry entry's `budget` (`ops/mechanisms.py`) at about
    w = N / 16 keys per query (e.g. sliding_window: window w; topk: top_k = w; lsh: buckets of
    N / 128, 4 rounds), plus `causal` for every mechanism that has the argument.

    Randomness (Performer's features, LSH's rotations) is seeded with `seed` so results repeat.
    """
    info = mechanism_info(name)
    n = check_int("length", length, minimum=1)
    params = info.budget_at(n, max(1, n // 16), seed)  # the registry entry's `budget`
    if "causal" in info.parameters():
        params["causal"] = bool(causal)
    return params


def needle_mechanism(mechanism, length: int, *, causal: bool = True, seed: int = 0):
    """What `needle_grid` runs at `length`: a Pattern / BlockLayout as given; a spec string or
    `Mechanism` as a `Mechanism` whose missing parameters come from `needle_defaults`.
    Unknown names or keys and badly typed values raise ValueError / TypeError."""
    if isinstance(mechanism, (Pattern, BlockLayout)):
        return mechanism
    if isinstance(mechanism, Mechanism):
        name, given = mechanism.name, dict(mechanism.params)
    elif isinstance(mechanism, str):
        if not mechanism.strip():
            raise ValueError("a mechanism spec must be a non-empty string like 'topk:top_k=32', got ''")
        parsed = Mechanism.parse(mechanism)
        name, given = parsed.name, dict(parsed.params)
    else:
        raise TypeError(f"mechanisms must be spec strings, Mechanisms or Patterns, got {type(mechanism).__name__}")
    defaults = needle_defaults(name, length, causal=causal, seed=seed)
    # The seeded defaults give way to the caller's own source of randomness (they conflict).
    if "features" in given or "generator" in given:
        defaults.pop("generator", None)
        defaults.pop("seed", None)
    return Mechanism(name, **{**defaults, **given})


def _label(mechanism) -> str:
    if isinstance(mechanism, str):
        return mechanism.strip()
    if isinstance(mechanism, Mechanism):
        return str(mechanism)
    if isinstance(mechanism, Pattern):
        return repr(mechanism)
    return type(mechanism).__name__


def _describe(resolved) -> str:
    return str(resolved) if isinstance(resolved, Mechanism) else repr(resolved)


def _rows_only(resolved) -> bool:
    """True when each output row depends only on its own query (patterns, exact top-k): then
    only the query rows are computed (queries are the last Nq positions), with the same result."""
    if isinstance(resolved, Pattern):
        return True
    return isinstance(resolved, Mechanism) and resolved.info.row_local


# --------------------------------------------------------------------------- the haystack
@dataclass
class Haystack:
    """One batch of haystacks (batch entries are independent trials) with the needle planted.

    `q`, `k`, `v`: [B, H, N, D]; `needle`: its position p; `queries`: int64 [Nq], the query
    positions (the last Nq); `marker`: the value channel that is 1 at the needle, 0 elsewhere
    (D - 1); `strength`: see the module docstring.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    needle: int
    queries: torch.Tensor
    marker: int
    strength: float

    @property
    def length(self) -> int:
        return self.q.shape[2]

    @property
    def depth(self) -> float:
        span = self.length - self.queries.numel()
        return self.needle / span if span else 1.0

    def _query_rows(self, out: torch.Tensor) -> torch.Tensor:
        """[B, H, Nq, D] from an output of all N rows or of the Nq query rows."""
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or tuple(out.shape[:2]) != tuple(self.q.shape[:2]):
            raise ValueError(f"out must be a tensor [B, H, N or Nq, D] = [{self.q.shape[0]}, {self.q.shape[1]}, "
                             f"{self.length} or {self.queries.numel()}, {self.v.shape[3]}], got "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        if out.shape[3] != self.v.shape[3]:
            raise ValueError(f"out has {out.shape[3]} channels, the values {self.v.shape[3]}")
        if out.shape[2] == self.length:
            return out[:, :, self.queries.to(out.device)]
        if out.shape[2] == self.queries.numel():
            return out
        raise ValueError(f"out must have N = {self.length} rows or the {self.queries.numel()} query rows, "
                         f"got {out.shape[2]}")

    def mass(self, out: torch.Tensor) -> torch.Tensor:
        """float64 [B, H, Nq]: attention mass on the needle, read from the marker channel."""
        return self._query_rows(out)[..., self.marker].double().cpu()

    def cosine(self, out: torch.Tensor) -> torch.Tensor:
        """float64 [B, H, Nq]: cosine similarity of the output's content channels (all but the
        marker) with the needle's value; 0 for a zero output row."""
        rows = self._query_rows(out)[..., : self.marker].double().cpu()
        target = self.v[:, :, self.needle, : self.marker].double().cpu()[:, :, None]
        return torch.nn.functional.cosine_similarity(rows, target.expand_as(rows), dim=-1, eps=1e-12)

    def reference_weights(self, causal: bool = True) -> torch.Tensor:
        """float64 [B, H, Nq, N]: dense softmax weights of the query rows (keys <= the query's
        position when causal), computed from q and k in float64."""
        q = self.q[:, :, self.queries.to(self.q.device)].double().cpu()
        scores = q @ self.k.double().cpu().transpose(-1, -2) / math.sqrt(self.q.shape[3])  # [B, H, Nq, N]
        if causal:
            allowed = torch.arange(self.length)[None, :] <= self.queries[:, None]
            scores = scores.masked_fill(~allowed, float("-inf"))
        return torch.softmax(scores, dim=-1)

    def reference(self, causal: bool = True) -> torch.Tensor:
        """float64 [B, H, Nq, D]: dense softmax attention output of the query rows."""
        return self.reference_weights(causal) @ self.v.double().cpu()


def _check_real(value, name: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise TypeError(f"{name} must be a finite number, got {type(value).__name__} {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


def _needle_position(length: int, depth: float, num_queries: int) -> int:
    return round(depth * (length - num_queries))


def _base(length: int, trials: int, heads: int, dim: int, num_queries: int, seed: int, strength: float, device,
          dtype) -> dict:
    """Everything of a haystack but the needle, the same for every depth of one length: random
    q, k, v (drawn in float64 on CPU from (seed, length), then cast), the queries planted, the
    marker channel zeroed, and the needle key to plant."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + length) % (2**63))
    shape = (trials, heads, length, dim)
    q = torch.randn(shape, generator=gen, dtype=torch.float64)
    k = torch.randn(shape, generator=gen, dtype=torch.float64)
    v = torch.randn(shape, generator=gen, dtype=torch.float64)
    u = torch.randn((trials, heads, dim), generator=gen, dtype=torch.float64)
    u = u / u.norm(dim=-1, keepdim=True)  # the needle's direction, per trial and head
    noise = torch.randn((trials, heads, num_queries, dim), generator=gen, dtype=torch.float64)
    root = math.sqrt(dim)
    q[:, :, length - num_queries:] = strength * root * u[:, :, None] + noise
    v[..., dim - 1] = 0.0

    def cast(x):
        return x.to(device=device, dtype=dtype)

    return {"q": cast(q), "k": cast(k), "v": cast(v), "key": cast(root * u), "num_queries": num_queries,
            "strength": strength}


def _at(base: dict, needle: int) -> Haystack:
    """The haystack of `base` with the needle at position `needle` (k and v copied)."""
    k, v = base["k"].clone(), base["v"].clone()
    length, dim = k.shape[2], k.shape[3]
    k[:, :, needle] = base["key"]
    v[:, :, needle, dim - 1] = 1.0
    queries = torch.arange(length - base["num_queries"], length)
    return Haystack(base["q"], k, v, needle, queries, dim - 1, base["strength"])


def _check_common(heads, dim, strength, trials, num_queries, seed) -> tuple:
    heads = check_int("heads", heads, minimum=1)
    dim = check_int("dim", dim, minimum=2)  # one marker channel and at least one content channel
    strength = _check_real(strength, "strength", positive=True)
    trials = check_int("trials", trials, minimum=1)
    num_queries = check_int("num_queries", num_queries, minimum=1)
    return heads, dim, strength, trials, num_queries, check_int("seed", seed, 0)


def _check_dtype(dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return dtype


def make_haystack(length: int, depth: float, *, trials: int = 1, heads: int = 4, dim: int = 64,
                  strength: float = DEFAULT_STRENGTH, num_queries: int = 1, seed: int = 0, device="cpu",
                  dtype: torch.dtype = torch.float32) -> Haystack:
    """A seeded haystack of `length` positions with the needle at round(depth * (length -
    num_queries)) (see the module docstring). The same (length, seed, sizes) give the same
    background at every depth, the one `needle_grid` uses; random numbers are drawn in float64
    on CPU and then cast, so a seed gives the same haystack on every device."""
    heads, dim, strength, trials, num_queries, seed = _check_common(heads, dim, strength, trials, num_queries, seed)
    length = check_int("length", length, minimum=num_queries)
    depth = check_fraction("depth", depth)
    base = _base(length, trials, heads, dim, num_queries, seed, strength, device, _check_dtype(dtype))
    return _at(base, _needle_position(length, depth, num_queries))


# --------------------------------------------------------------------------- the result
def _nan_grid(rows: int, cols: int) -> torch.Tensor:
    return torch.full((rows, cols), float("nan"), dtype=torch.float64)


@dataclass(eq=False)
class NeedleResult:
    """What `needle_grid` measured. Grids are float64 [len(lengths), len(depths)], NaN where the
    mechanism failed (see `errors`). Keys of the dicts are the mechanism labels (the spec string
    as given, str(Mechanism), or repr(Pattern)).

    * `mass`, `cosine`, `hit_rate`: see the module docstring; `retrieved` (derived): mass > threshold;
    * `reference`: {"mass", "cosine", "hit_rate"} of dense softmax in float64 (causal as the grid);
    * `positions`: int [L][Dp] needle positions; `specs`: per label, the resolved spec per length;
    * `seconds`: per label, float64 [L]: mean seconds of one attention call at each length (the
      call covers `rows[label]`: "queries" (patterns, topk: only the query rows are computed,
      which gives them the same output) or "all" (every row; the others need them));
    * `errors`: per label, a list of {"length", "depth", "error"}; `config`: the arguments.
    """

    lengths: list[int]
    depths: list[float]
    positions: list[list[int]]
    mechanisms: list[str]
    specs: dict[str, list[str | None]]
    mass: dict[str, torch.Tensor]
    cosine: dict[str, torch.Tensor]
    hit_rate: dict[str, torch.Tensor]
    seconds: dict[str, torch.Tensor]
    rows: dict[str, str]
    reference: dict[str, torch.Tensor]
    errors: dict[str, list[dict]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def threshold(self) -> float:
        return float(self.config.get("threshold", DEFAULT_THRESHOLD))

    @property
    def retrieved(self) -> dict[str, torch.Tensor]:
        """bool [L, Dp] per label: mean mass on the needle > threshold (False where NaN)."""
        return {name: grid > self.threshold for name, grid in self.mass.items()}

    @property
    def reference_retrieved(self) -> torch.Tensor:
        return self.reference["mass"] > self.threshold

    def to_dict(self) -> dict:
        """JSON-ready (lists, numbers, None for NaN); `NeedleResult.from_dict` reads it back."""
        def grid(t: torch.Tensor):
            return [[None if math.isnan(x) else x for x in row] for row in t.tolist()]

        def line(t: torch.Tensor):
            return [None if math.isnan(x) else x for x in t.tolist()]

        return {
            "lengths": list(self.lengths), "depths": list(self.depths), "positions": [list(r) for r in self.positions],
            "mechanisms": list(self.mechanisms), "specs": {k: list(v) for k, v in self.specs.items()},
            "mass": {k: grid(v) for k, v in self.mass.items()},
            "cosine": {k: grid(v) for k, v in self.cosine.items()},
            "hit_rate": {k: grid(v) for k, v in self.hit_rate.items()},
            "retrieved": {k: v.tolist() for k, v in self.retrieved.items()},
            "seconds": {k: line(v) for k, v in self.seconds.items()},
            "rows": dict(self.rows),
            "reference": {k: grid(v) for k, v in self.reference.items()},
            "errors": {k: [dict(e) for e in v] for k, v in self.errors.items()},
            "config": dict(self.config),
        }

    @classmethod
    def from_dict(cls, data: dict) -> NeedleResult:
        def tensor(x):
            return torch.tensor([[float("nan") if v is None else v for v in row] for row in x], dtype=torch.float64) \
                if x else torch.zeros((0, 0), dtype=torch.float64)

        def line(x):
            return torch.tensor([float("nan") if v is None else v for v in x], dtype=torch.float64)

        try:
            return cls(
                lengths=list(data["lengths"]), depths=list(data["depths"]),
                positions=[list(r) for r in data["positions"]], mechanisms=list(data["mechanisms"]),
                specs={k: list(v) for k, v in data["specs"].items()},
                mass={k: tensor(v) for k, v in data["mass"].items()},
                cosine={k: tensor(v) for k, v in data["cosine"].items()},
                hit_rate={k: tensor(v) for k, v in data["hit_rate"].items()},
                seconds={k: line(v) for k, v in data["seconds"].items()},
                rows=dict(data["rows"]),
                reference={k: tensor(v) for k, v in data["reference"].items()},
                errors={k: [dict(e) for e in v] for k, v in data.get("errors", {}).items()},
                config=dict(data.get("config", {})),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a NeedleResult dict ({type(exc).__name__}: {exc})") from None

    def summary(self) -> str:
        """Mass on the needle per mechanism (rows: lengths, columns: depths), then the errors."""
        cfg = self.config
        lines = [(f"needle in a haystack: heads={cfg.get('heads')}, dim={cfg.get('dim')}, "
                  f"strength={cfg.get('strength')}, trials={cfg.get('trials')}, causal={cfg.get('causal')}, "
                  f"retrieved = mass > {self.threshold}")]
        head = f"{'length':>8} " + " ".join(f"{d:>6.2f}" for d in self.depths) + "   s/call"

        def table(title, grid, secs=None):
            lines.append(title)
            lines.append(head)
            for i, n in enumerate(self.lengths):
                cells = " ".join("   err" if math.isnan(x) else f"{x:>6.3f}" for x in grid[i].tolist())
                tail = "" if secs is None or math.isnan(float(secs[i])) else f"   {float(secs[i]):.2e}"
                lines.append(f"{n:>8} {cells}{tail}")

        table("reference (dense softmax, float64)", self.reference["mass"])
        for name in self.mechanisms:
            table(f"{name}  [rows: {self.rows.get(name)}]", self.mass[name], self.seconds.get(name))
        for name, errs in self.errors.items():
            for e in errs:
                lines.append(f"ERROR {name} at length {e['length']}: {e['error']}")
        return "\n".join(lines)

    __str__ = summary


# --------------------------------------------------------------------------- the grid
def _check_lengths(lengths, num_queries: int) -> list[int]:
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence) and not isinstance(lengths, torch.Tensor):
        raise TypeError(f"lengths must be a sequence of ints, got {type(lengths).__name__}")
    values = lengths.tolist() if isinstance(lengths, torch.Tensor) else list(lengths)
    if not values:
        raise ValueError("lengths must not be empty")
    out = [check_int("each length", n, minimum=max(1, num_queries)) for n in values]
    if len(set(out)) != len(out):
        raise ValueError(f"lengths must be distinct, got {out}")
    return out


def _check_depths(depths) -> list[float]:
    if isinstance(depths, (str, bytes)) or not isinstance(depths, Sequence) and not isinstance(depths, torch.Tensor):
        raise TypeError(f"depths must be a sequence of numbers in [0, 1], got {type(depths).__name__}")
    values = depths.tolist() if isinstance(depths, torch.Tensor) else list(depths)
    if not values:
        raise ValueError("depths must not be empty")
    return [check_fraction("depth", d) for d in values]


def _unique_labels(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def needle_grid(mechanisms=None, lengths: Sequence[int] = DEFAULT_LENGTHS, depths: Sequence[float] = DEFAULT_DEPTHS,
                *, causal: bool = True, heads: int = 4, dim: int = 64, strength: float = DEFAULT_STRENGTH,
                seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32, trials: int = 4,
                num_queries: int = 1, threshold: float = DEFAULT_THRESHOLD, progress: bool = True) -> NeedleResult:
    """Needle retrieval of each mechanism on a grid of lengths x depths (module docstring).

    Args:
        mechanisms: spec strings, `Mechanism`s or `Pattern`s (None: `DEFAULT_MECHANISMS`, with
            "full" for "causal" when causal=False). Missing parameters: `needle_defaults`.
        lengths: sequence lengths N (distinct ints >= num_queries); depths: floats in [0, 1].
        causal: the `causal` argument every mechanism that has one gets unless its spec sets
            it, and the mask of the float64 dense reference.
        heads, dim: H and D of q, k, v; `trials`: independent haystacks (the batch);
        strength: how strongly the queries point at the needle key (module docstring).
        seed: haystacks, Performer features and LSH rotations come from it.
        device, dtype: where and in what the mechanisms run (the reference is float64, CPU).
        num_queries: the last num_queries positions query for the needle.
        threshold: `retrieved` means mean mass > threshold.
        progress: a tqdm bar over (mechanism, length) when tqdm is installed.

    A mechanism that raises at some length is recorded in `errors` (with a warning) and its
    cells stay NaN; spec errors (unknown name or key, bad value type) raise at once.
    """
    check_bool("causal", causal)
    heads, dim, strength, trials, num_queries, seed = _check_common(heads, dim, strength, trials, num_queries, seed)
    threshold = _check_real(threshold, "threshold")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    dtype = _check_dtype(dtype)
    lengths = _check_lengths(lengths, num_queries)
    depths = _check_depths(depths)
    if mechanisms is None:
        mechanisms = [("causal" if causal else "full") if m == "causal" else m for m in DEFAULT_MECHANISMS]
    elif isinstance(mechanisms, (str, Mechanism, Pattern, BlockLayout)):
        mechanisms = [mechanisms]
    else:
        mechanisms = list(mechanisms)
    if not mechanisms:
        raise ValueError("mechanisms must not be empty (None runs the defaults)")
    for m in mechanisms:  # spec errors surface now, not as per-length failures
        needle_mechanism(m, lengths[0], causal=causal, seed=seed)
    labels = _unique_labels([_label(m) for m in mechanisms])

    nl, nd = len(lengths), len(depths)
    positions = [[_needle_position(n, d, num_queries) for d in depths] for n in lengths]
    mass = {name: _nan_grid(nl, nd) for name in labels}
    cosine = {name: _nan_grid(nl, nd) for name in labels}
    hits = {name: _nan_grid(nl, nd) for name in labels}
    seconds = {name: torch.full((nl,), float("nan"), dtype=torch.float64) for name in labels}
    specs: dict[str, list[str | None]] = {name: [None] * nl for name in labels}
    rows: dict[str, str] = {}
    errors: dict[str, list[dict]] = {}
    reference = {"mass": _nan_grid(nl, nd), "cosine": _nan_grid(nl, nd), "hit_rate": _nan_grid(nl, nd)}

    # One length's base haystack at a time (memory: the base plus one needle copy of k and v);
    # the float64 reference is computed when the length is first needed.
    current: dict[str, Any] = {"li": None, "base": None}

    def base_for(li: int) -> dict:
        if current["li"] != li:
            current["base"] = None  # free the previous length first
            base = _base(lengths[li], trials, heads, dim, num_queries, seed, strength, device, dtype)
            for di, p in enumerate(positions[li]):
                hay = _at(base, p)
                weights = hay.reference_weights(causal)  # [B, H, Nq, N] float64
                w_needle = weights[..., p]
                reference["mass"][li, di] = w_needle.mean()
                reference["cosine"][li, di] = hay.cosine(weights @ hay.v.double().cpu()).mean()
                reference["hit_rate"][li, di] = (w_needle > threshold).double().mean()
            current.update(li=li, base=base)
        return current["base"]

    order = [(mi, li) for li in range(nl) for mi in range(len(mechanisms))]
    for mi, li in _extras.progress(order, enabled=progress, desc="needle", total=len(order)):
        name, n = labels[mi], lengths[li]
        base = base_for(li)
        di = 0
        try:
            resolved = needle_mechanism(mechanisms[mi], n, causal=causal, seed=seed)
            specs[name][li] = _describe(resolved)
            only_queries = _rows_only(resolved)
            rows[name] = "queries" if only_queries else "all"
            elapsed = 0.0
            for di, p in enumerate(positions[li]):
                hay = _at(base, p)
                q = hay.q[:, :, n - num_queries:] if only_queries else hay.q
                _sync(device)
                start = time.perf_counter()
                with torch.no_grad():
                    out = attention(q, hay.k, hay.v, resolved)
                _sync(device)
                elapsed += time.perf_counter() - start
                m = hay.mass(out)
                mass[name][li, di] = m.mean()
                cosine[name][li, di] = hay.cosine(out).mean()
                hits[name][li, di] = (m > threshold).double().mean()
                del hay, out
            seconds[name][li] = elapsed / nd
        except Exception as exc:  # noqa: BLE001 - any failure is recorded and warned about, never silent
            message = f"{type(exc).__name__}: {exc}"
            errors.setdefault(name, []).append({"length": n, "depth": depths[di], "error": message})
            warnings.warn(f"needle_grid: {name} failed at length {n}, depth {depths[di]}: {message}",
                          RuntimeWarning, stacklevel=2)
            for grid in (mass[name], cosine[name], hits[name]):
                grid[li, di:] = float("nan")

    config = {"causal": causal, "heads": heads, "dim": dim, "strength": strength, "seed": seed,
              "device": str(device), "dtype": str(dtype).replace("torch.", ""), "trials": trials,
              "num_queries": num_queries, "threshold": threshold, "torch": torch.__version__}
    return NeedleResult(lengths, depths, positions, labels, specs, mass, cosine, hits, seconds, rows, reference,
                        errors, config)


# --------------------------------------------------------------------------- the picture
def plot_needle_heatmaps(result: NeedleResult, path, *, metric: str = "mass", dpi: int = 120):
    """One heatmap per mechanism (rows: lengths, columns: depths, color and number: `metric`,
    "mass" (default), "hit_rate" or "cosine"), red (0) to green (1), NaN cells grey and marked
    "err". Written to `path` through `sparse_attn._extras.figure` (needs matplotlib). Returns path."""
    if not isinstance(result, NeedleResult):
        raise TypeError(f"result must be a NeedleResult, got {type(result).__name__}")
    grids = {"mass": result.mass, "hit_rate": result.hit_rate, "cosine": result.cosine}
    if metric not in grids:
        raise ValueError(f"metric must be one of {', '.join(grids)}, got {metric!r}")
    names = list(result.mechanisms)
    if not names:
        raise ValueError("the result holds no mechanisms to plot")
    nl, nd = len(result.lengths), len(result.depths)
    ncols = min(4, len(names))
    nrows = -(-len(names) // ncols)
    cell_w, cell_h = max(3.0, 0.45 * nd + 1.2), max(2.0, 0.4 * nl + 1.2)
    fig = _extras.figure(figsize=(cell_w * ncols + 1.0, cell_h * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    from matplotlib import colormaps

    cmap = colormaps["RdYlGn"].with_extremes(bad="lightgrey")
    image = None
    for idx, name in enumerate(names):
        ax = axes[idx // ncols][idx % ncols]
        grid = grids[metric][name]
        vmin = -1.0 if metric == "cosine" else 0.0
        image = ax.imshow(grid.numpy() if hasattr(grid, "numpy") else grid, cmap=cmap, vmin=vmin, vmax=1.0,
                          aspect="auto", interpolation="nearest")
        for i in range(nl):
            for j in range(nd):
                x = float(grid[i, j])
                text = "err" if math.isnan(x) else f"{x:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="black" if math.isnan(x) or 0.2 < (x - vmin) / (1 - vmin) < 0.8 else "white")
        ax.set_title(name if len(name) <= 40 else name[:37] + "...", fontsize=9)
        ax.set_xticks(range(nd), [f"{d:.0%}" for d in result.depths], fontsize=7, rotation=90)
        ax.set_yticks(range(nl), [str(n) for n in result.lengths], fontsize=7)
        ax.set_xlabel("needle depth", fontsize=8)
        ax.set_ylabel("length", fontsize=8)
    for idx in range(len(names), nrows * ncols):
        axes[idx // ncols][idx % ncols].set_visible(False)
    fig.colorbar(image, ax=axes, shrink=0.8, label={"mass": "attention mass on the needle",
                                                    "hit_rate": f"fraction with mass > {result.threshold}",
                                                    "cosine": "cosine(out, needle value)"}[metric])
    fig.suptitle(f"needle in a haystack ({metric}), causal={result.config.get('causal')}, "
                 f"strength={result.config.get('strength')}, dim={result.config.get('dim')}")
    fig.savefig(path, dpi=dpi)
    return path
