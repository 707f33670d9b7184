"""`sparse-attn compare`: every pattern and mechanism against dense SDPA on the same random q/k/v.

For each row: density (exact fraction of allowed (query, key) pairs; patterns only), the
backend the dispatcher picks (or the mechanism's implementation), time (median of repeats after
a warm-up), peak memory of one call, and the error against a float64 reference on the same
inputs: for a pattern its own masked reference (exactness), for a non-pattern mechanism
(linear, performer, topk, ...) dense softmax attention, causal when it is causal (fidelity).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .. import explain, sparse_attention
from .._env import environment
from .._extras import progress
from .. import patterns as P
from ..eval import measure
from .args import (Formatter, backend_names, check_device, check_output, non_negative_int, one_line, parse_spec,
                   positive_int, require_matplotlib, spec_help)
from . import specs
from .specs import Spec

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class CompareConfig:
    length: int
    specs: list[Spec]
    batch: int = 1
    heads: int = 8
    kv_heads: int | None = None
    dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    backend: str = "auto"
    repeats: int = 3
    seed: int = 0
    max_dense_length: int = 8192
    error_rows: int = 1024
    progress: bool = True


@dataclass
class Row:
    name: str  # what the user asked for ("sliding_window", "sliding_window:window=512", "sdpa")
    spec: str  # the canonical spec that rebuilds the pattern or mechanism
    pattern: str  # repr of the pattern or mechanism
    kind: str  # "dense" (torch SDPA called directly), "sparse" (sparse_attention) or "mechanism"
    density: float
    backend: str
    time_ms: float
    times_ms: list = field(default_factory=list)
    warmup_ms: float = float("nan")
    peak_memory_bytes: int | None = None
    max_abs_err: float | None = None
    mean_abs_err: float | None = None
    error_rows: int = 0


@dataclass
class _Job:
    name: str
    spec: str
    pattern: P.Pattern  # for mechanisms: the dense pattern their error is measured against
    kind: str
    run: Callable  # () -> output tensor
    backend: Callable  # () -> backend name
    description: str = ""


def _settings(cfg: CompareConfig, device: torch.device) -> dict:
    """What the run measured and how: the `environment` record's extra keys."""
    kv_heads = cfg.kv_heads or cfg.heads
    return {
        "dtype": cfg.dtype,
        "q_shape": [cfg.batch, cfg.heads, cfg.length, cfg.dim],
        "kv_shape": [cfg.batch, kv_heads, cfg.length, cfg.dim],
        "backend_requested": cfg.backend,
        "seed": cfg.seed,
        "time": f"median of {cfg.repeats} calls after one warm-up call (time.perf_counter"
                + (", torch.cuda.synchronize" if device.type == "cuda" else "") + ")",
        "peak_memory": measure.PEAK_MEMORY_METHOD.get(device.type, "not measured on this device"),
        "error": "|out - reference| with the reference backend in float64 on the same (rounded) inputs",
    }


def make_inputs(cfg: CompareConfig, device: torch.device):
    gen = torch.Generator().manual_seed(cfg.seed)
    kv_heads = cfg.kv_heads or cfg.heads
    shapes = [(cfg.batch, cfg.heads, cfg.length, cfg.dim)] + [(cfg.batch, kv_heads, cfg.length, cfg.dim)] * 2
    return [torch.randn(s, generator=gen).to(device=device, dtype=DTYPES[cfg.dtype]) for s in shapes]


def _jobs(cfg: CompareConfig, q, k, v) -> list[_Job]:
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}

    def dense(causal: bool):
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)

    jobs = [
        _Job("sdpa", "full", P.full(), "dense", dense(False), lambda: "torch sdpa"),
        _Job("sdpa causal", "causal", P.causal(), "dense", dense(True), lambda: "torch sdpa"),
    ]
    for spec in cfg.specs:
        if spec.mechanism is not None:
            jobs.append(_mechanism_job(cfg, spec, q, k, v))
            continue

        def run(pattern=spec.pattern):
            return sparse_attention(q, k, v, pattern, backend=cfg.backend)

        def chosen(pattern=spec.pattern):
            return explain(q, k, v, pattern, backend=cfg.backend).chosen or "none"

        jobs.append(_Job(spec.text, spec.canonical(), spec.pattern, "sparse", run, chosen, repr(spec.pattern)))
    return jobs


def _mechanism_job(cfg: CompareConfig, spec: Spec, q, k, v) -> _Job:
    m = spec.mechanism
    takes = m.info.parameters()
    # random features / hashes / centroids are drawn from --seed, so rows are reproducible: an op
    # that takes a generator and was given no source of randomness gets one
    seeded = {"generator": torch.Generator(device=q.device).manual_seed(cfg.seed)} \
        if "generator" in takes and not {"generator", "seed", "features"} & set(m.params) else {}
    backend = {"backend": cfg.backend} if "backend" in takes else {}  # runs on the block backends
    mech = type(m)(m.name, **{**m.params, **seeded})

    def run():
        return mech(q, k, v, **backend)

    def chosen():
        return f"{m.name} ({cfg.backend})" if backend else m.name

    dense = P.causal() if m.params.get("causal") else P.full()
    return _Job(spec.text, str(m), dense, "mechanism", run, chosen, repr(m))


def check_config(cfg: CompareConfig) -> None:
    """Refuse, before any row is timed, what no row could run with: raises ValueError, the row's
    spec first. A forced --backend that cannot serve a pattern is found by explain() on stand-ins
    of the real shapes (expanded: nothing is allocated); the checks that only a mechanism's op
    makes (top_k=0, a feature map's name, a forced backend under block_topk) by one call on one
    batch row and one kv head (a fraction of a row)."""
    from ..backends import BackendError

    device = check_device(cfg.device)
    kv_heads = cfg.kv_heads or cfg.heads
    stand_in = torch.empty((), device=device, dtype=DTYPES[cfg.dtype])
    q, kv = (stand_in.expand(cfg.batch, h, cfg.length, cfg.dim) for h in (cfg.heads, kv_heads))
    small = None
    for spec in cfg.specs:
        try:
            if spec.mechanism is None:
                ex = explain(q, kv, kv, spec.pattern, backend=cfg.backend)
                if ex.chosen is None:
                    why = "; ".join(f"{name}: {', '.join(r)}" for name, r in ex.rejected.items()) \
                        if cfg.backend == "auto" else ", ".join(ex.rejected.get(cfg.backend, []))
                    raise BackendError(f"--backend {cfg.backend} cannot run it: {why}")
                continue
            if small is None:
                small = make_inputs(CompareConfig(cfg.length, [], 1, cfg.heads // kv_heads, 1, cfg.dim, cfg.dtype,
                                                  cfg.device, seed=cfg.seed), device)
            with torch.no_grad():
                _mechanism_job(cfg, spec, *small).run()
        except (ValueError, TypeError, BackendError) as exc:
            raise ValueError(f"{spec.text}: {one_line(exc)}") from exc


def _progress(jobs, enabled: bool):
    # one line per row off a terminal: rows take seconds to minutes each
    return progress(jobs, enabled=enabled, desc="compare", unit="row", total=len(jobs), leave=False, lines_every=0)


def run_compare(cfg: CompareConfig) -> tuple[list[Row], dict]:
    """Measure every row. Raises the library's errors (BackendError, ValueError, ...) with the
    row's name prefixed."""
    device = check_device(cfg.device)
    q, k, v = make_inputs(cfg, device)
    env = environment(device, **_settings(cfg, device))
    check = cfg.length <= cfg.max_dense_length
    segments = measure.error_segments(cfg.length, cfg.error_rows) if check else []
    q64, k64, v64 = (t.to(torch.float64) for t in (q, k, v)) if check else (None, None, None)
    references: dict = {}  # (spec, start, stop) -> float64 output rows (sdpa causal reuses causal's)

    rows: list[Row] = []
    bar = _progress(_jobs(cfg, q, k, v), cfg.progress)
    for job in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(job.name)
        try:
            density = float("nan") if job.kind == "mechanism" else job.pattern.layout(cfg.length, block_q=64).density()
            backend = job.backend()
            out, warmup, times = measure.time_call(job.run, device, cfg.repeats)
            peak = measure.peak_memory(job.run, device)
            row = Row(job.name, job.spec, job.description or repr(job.pattern), job.kind, density, backend,
                      measure.median(times) * 1e3, [t * 1e3 for t in times], warmup * 1e3, peak)
            if check:
                def reference(start, stop, job=job):
                    key = (repr(job.pattern), start, stop)  # mechanisms share the dense references
                    if key not in references:
                        references[key] = sparse_attention(q64[:, :, start:stop], k64, v64, job.pattern,
                                                           backend="reference", q_offset=start)
                    return references[key]

                row.max_abs_err, row.mean_abs_err, row.error_rows = measure.reference_error(
                    out, q64, k64, v64, reference, segments)
            del out
        except Exception as exc:
            if _rewrappable(exc):  # say which row failed
                raise type(exc)(f"{job.name}: {exc}") from exc
            raise
        rows.append(row)
    env["error_rows"] = rows[0].error_rows if rows and check else 0
    return rows, env


def _rewrappable(exc: Exception) -> bool:
    """Only prefix the message of plain exception types whose constructor takes one message."""
    from ..backends import BackendError

    return type(exc) in (ValueError, TypeError, BackendError, RuntimeError)


# ---------------------------------------------------------------------------- output
def _fmt_err(x: float | None) -> str:
    if x is None:
        return "-"
    return "nan" if math.isnan(x) else f"{x:.1e}"


def _fmt_ratio(base: float, t: float) -> str:
    if not (t > 0 and base > 0):
        return "-"
    r = base / t
    return f"{r:.0f}x" if r >= 100 else f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


def format_table(rows: list[Row], env: dict, cfg: CompareConfig) -> str:
    q_shape, kv_shape = env["q_shape"], env["kv_shape"]
    lines = [
        f"N={cfg.length} B={q_shape[0]} Hq={q_shape[1]} Hkv={kv_shape[1]} D={q_shape[3]} {cfg.dtype} "
        f"{env['device']} ({env['device_name']}, threads={env['threads']}), torch {env['torch']}, "
        f"backend={cfg.backend}",
        "",
    ]
    base = next((r.time_ms for r in rows if r.kind == "dense" and r.spec == "full"), float("nan"))
    header = ["pattern", "density", "backend", "time ms", "vs sdpa", "peak MiB", "max err", "mean err"]
    table = []
    for r in rows:
        peak = "-" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**20:.1f}"
        density = "-" if math.isnan(r.density) else f"{r.density:.4f}"
        table.append([r.name, density, r.backend, f"{r.time_ms:.1f}", _fmt_ratio(base, r.time_ms), peak,
                      _fmt_err(r.max_abs_err), _fmt_err(r.mean_abs_err)])
    widths = [max(len(row[i]) for row in [header] + table) for i in range(len(header))]
    left = {0, 2}

    def fmt(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines.append(fmt(header))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(fmt(row) for row in table)
    lines.append("")
    name_w = max(len(r.name) for r in rows)
    lines.append("rows:")
    for r in rows:
        what = "torch.nn.functional.scaled_dot_product_attention" + (", is_causal=True" if r.spec == "causal" else "") \
            if r.kind == "dense" else r.spec
        lines.append(f"  {r.name:<{name_w}}  {what}")
    lines.append("")
    lines.append(f"time: median of {cfg.repeats} calls after one warm-up; vs sdpa: dense SDPA time / time")
    lines.append(f"peak: {env['peak_memory']}")
    if env.get("error_rows"):
        which = "all" if env["error_rows"] >= cfg.length else f"{env['error_rows']} (evenly spaced) of"
        lines.append(f"err: |out - reference| vs the float64 reference backend, on {which} {cfg.length} query rows")
        if any(r.kind == "mechanism" for r in rows):
            lines.append("     mechanisms (linear, performer, topk, ...): the reference is dense softmax attention "
                         "(causal if causal=true): approximation error, not exactness")
    else:
        lines.append(f"err: not checked (length {cfg.length} > --max-dense-length {cfg.max_dense_length})")
    return "\n".join(lines)


def write_json(path: str, rows: list[Row], env: dict) -> None:
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": [asdict(r) for r in rows]}, f, indent=2)
        f.write("\n")


COMPARE_DESCRIPTION = """\
Run every pattern with sparse_attention() and dense attention (torch SDPA, full and causal)
on the same random q/k/v, and print one row each:

  density   exact fraction of allowed (query, key) pairs (layout.density())
  backend   what the dispatcher picks (sparse_attn.explain(...).chosen)
  time      median of --repeats calls after one warm-up (time.perf_counter; CUDA synchronised)
  peak      most memory torch held at once during one extra call, above what it held before
            the call (output included). CUDA: torch.cuda.max_memory_allocated(). CPU: torch
            keeps no CPU allocator statistics and tracemalloc cannot see torch's allocations,
            so it is the running maximum over torch.profiler's allocation/free events
            (profile_memory=True); scratch that BLAS/OpenMP allocate outside torch is not seen.
  max/mean err
            |out - reference| where the reference is the dense masked `reference` backend in
            float64 on the same inputs; on --error-rows query rows (evenly spaced 64-row
            segments, first and last included; 0 = all), skipped ("-") above --max-dense-length.
"""


def add_compare_parser(subparsers, formatter=Formatter) -> argparse.ArgumentParser:
    """Register `sparse-attn compare` on `subparsers`; returns its parser."""
    p = subparsers.add_parser("compare", help="time, memory and error of patterns vs dense SDPA",
                       description=COMPARE_DESCRIPTION, epilog=spec_help(), formatter_class=formatter)
    p.add_argument("--length", type=positive_int, required=True, metavar="N", help="sequence length")
    # One list, extended by each flag (action="extend"): with nargs="+" alone the last flag replaced the others.
    p.add_argument("--patterns", "--mechanisms", nargs="+", action="extend", dest="specs", default=None, metavar="SPEC",
                   help=f"patterns and/or mechanisms ({', '.join(specs.MECHANISM_REGISTRY)}) to run, "
                        "NAME or NAME:KEY=VALUE,...; both flags may be given, and more than once: every spec gets "
                        f"a row (default: {' '.join(specs.DEFAULT_PATTERNS)})")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size (default: %(default)s)")
    p.add_argument("--heads", type=positive_int, default=8, help="query heads (default: %(default)s)")
    p.add_argument("--kv-heads", type=positive_int, default=None, help="key/value heads (GQA); default: --heads")
    p.add_argument("--dim", type=positive_int, default=64, help="head dim (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"],
                   help="dtype of q/k/v (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: %(default)s)")
    p.add_argument("--backend", default="auto",
                   help=f"backend for the patterns: one of {', '.join(backend_names())} (default: %(default)s)")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="timed calls per row, after one warm-up (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random q/k/v (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (torch.set_num_threads; default: torch's choice, "
                        f"{torch.get_num_threads()} here). On a busy machine fewer threads give steadier timings")
    p.add_argument("--max-dense-length", type=non_negative_int, default=8192, metavar="N",
                   help="check errors against the dense reference only up to this length (default: %(default)s)")
    p.add_argument("--error-rows", type=non_negative_int, default=1024, metavar="R",
                   help="query rows checked against the float64 reference (0: all rows; the check is dense, "
                        "O(R x N) per pattern; default: %(default)s)")
    p.add_argument("--json", metavar="FILE", help="write rows and environment as JSON")
    p.add_argument("--plot", metavar="FILE", help="write a bar chart (time and peak memory); needs matplotlib")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress on stderr (a bar on a terminal, else a line as each row finishes)")
    p.set_defaults(handler=cmd_compare, parser=p)
    return p


def cmd_compare(args) -> int:
    parser = args.parser
    if args.backend not in backend_names():
        parser.error(f"--backend must be one of {', '.join(backend_names())}, got {args.backend!r}")
    if args.kv_heads is not None and args.heads % args.kv_heads:
        parser.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    check_device(args.device, parser)
    check_output(parser, "--json", args.json)
    check_output(parser, "--plot", args.plot)
    pattern_specs = [parse_spec(parser, text, args.length) for text in args.specs or specs.DEFAULT_PATTERNS]
    for spec in pattern_specs:
        if spec.pattern is not None and spec.pattern.num_heads not in (None, args.heads):
            parser.error(f"{spec.text}: the pattern has {spec.pattern.num_heads} heads but --heads is {args.heads}")
    if args.plot:
        require_matplotlib()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = CompareConfig(length=args.length, specs=pattern_specs, batch=args.batch, heads=args.heads,
                        kv_heads=args.kv_heads, dim=args.dim, dtype=args.dtype, device=args.device,
                        backend=args.backend, repeats=args.repeats, seed=args.seed,
                        max_dense_length=args.max_dense_length, error_rows=args.error_rows,
                        progress=not args.no_progress)
    try:
        check_config(cfg)
    except ValueError as exc:
        parser.error(str(exc))
    rows, env = run_compare(cfg)
    print(format_table(rows, env, cfg))
    if args.json:
        write_json(args.json, rows, env)
        print(f"wrote {args.json}")
    if args.plot:
        from .plots import plot_compare

        plot_compare(rows, env, args.plot)
        print(f"wrote {args.plot}")
    return 0

