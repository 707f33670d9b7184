"""How many compiled variants of each Triton kernel a stream of shapes asks for, and what one
costs to compile: first-visit costs in variable-length training (ListOps) and serving.

Triton compiles a kernel once per *specialisation* of its arguments: besides the constexprs
and launch options, every int argument equal to 1 becomes a constant and every other int is
marked by whether it is divisible by 16 (pointers: whether 16-byte aligned). Lengths, block
and work counts and the lse row strides change with the sequence length and the batch size,
so with every int specialised a stream of new shapes keeps meeting new specialisations, each
a compile of the kernel (seconds) at its first launch in a process (and on a machine whose
Triton cache has not seen it). The kernels leave those arguments unspecialised
(`backends/triton/kernels._jit`); `--fully-specialized` launches them as plain @triton.jit
compiles them, the comparison. This script drives the library's real launches
(`backends/triton/ops.py`) with CPU tensors, catches each launch before it runs (the kernels
never execute), and counts the distinct specialisation keys per kernel as calls accumulate;
`--compile` also compiles each distinct key once for sm90 with Triton's ahead-of-time compiler
and times it (on this machine's CPU; a GPU host's CPU is faster).

    python benchmarks/triton_specializations.py                        # ListOps-like stream, ~1 min
    python benchmarks/triton_specializations.py --calls 300 --compile  # + compile time per variant
    PYTHONPATH=src python3 benchmarks/triton_specializations.py --device cuda [--fully-specialized]

With --device cuda the stream really runs (forward + backward through `sparse_attention(...,
backend="triton")`, from an empty Triton cache) and each call is timed, compiles included; then
the steady-state time of one long call (--steady-len, B=1, H=16, D=128, causal window 4096) so
that the two settings' kernel speed can be compared (run once each, one after the other).

Needs triton (not TRITON_INTERPRET). Writes results/triton_specializations.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, progress, write_json  # noqa: E402

from sparse_attn.ops.mechanisms import Mechanism  # noqa: E402
from sparse_attn.backends.triton import kernels, ops  # noqa: E402
from sparse_attn.backends.triton.plan import get_plan  # noqa: E402

KERNELS = ("block_sparse_fwd_kernel", "bwd_preprocess_kernel", "block_sparse_bwd_dq_kernel",
           "block_sparse_bwd_dkdv_kernel")


def arg_key(value, specialize: bool = True):
    """What Triton's launcher keys an argument by (native_specialize_impl, align=True): ints
    equal to 1 as constants, other ints and pointers by divisibility by 16, unless the kernel
    leaves the argument unspecialised (`specialize` False: its width alone)."""
    if isinstance(value, torch.Tensor):
        return f"*{value.dtype}" + ("D" if value.data_ptr() % 16 == 0 else "")
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        width = "i32" if -2**31 <= value < 2**31 else "i64"
        if not specialize:
            return width
        return "1" if value == 1 else width + ("D" if value % 16 == 0 else "")
    if isinstance(value, float):
        return "fp32"
    return repr(value)


def fresh_triton_cache() -> None:
    """Point Triton at an empty cache: a variant compiled by an earlier run (or by
    compile_for_gpu.py) would otherwise cost nothing to compile."""
    import tempfile

    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_specializations_")


class Recorder:
    """Stands in for a @triton.jit kernel: records each launch's specialisation key (and the
    arguments of its first launch, to compile it), runs nothing."""

    def __init__(self, jit_fn):
        self.jit_fn = jit_fn
        self.keys: dict = {}  # key -> (args, kwargs) of its first launch
        self.calls = 0
        self.varying: dict[str, set] = {}  # int argument -> the keys it took

    def __getitem__(self, grid):
        return self.launch

    def launch(self, *args, **kwargs):
        self.calls += 1
        names = self.jit_fn.arg_names
        key = (tuple(arg_key(a, not p.do_not_specialize) for a, p in zip(args, self.jit_fn.params)),
               tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        self.keys.setdefault(key, (args, kwargs))
        for name, value, param in zip(names, args, self.jit_fn.params):
            if isinstance(value, int) and not isinstance(value, bool):
                self.varying.setdefault(name, set()).add(arg_key(value, not param.do_not_specialize))


def compile_launch(jit_fn, args, kwargs, arch: int = 90):
    """Compile one recorded launch of `jit_fn` for sm`arch` ahead of time, specialised as a
    runtime launch would be (ints == 1 constant, divisibility by 16 of ints and pointers marked,
    except the kernel's do_not_specialize arguments): the compiled kernel (`.asm["ptx"]`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
             torch.int64: "i64", torch.uint8: "u8"}
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "num_ctas", "maxnreg") if k in kwargs}
    signature, consts, attrs = {}, dict(kwargs), {}
    free = {p.name for p in jit_fn.params if p.do_not_specialize}
    for i, (name, value) in enumerate(zip(jit_fn.arg_names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + types[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1 and name not in free:
                signature[name], consts[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and name not in free:  # the mark a runtime launch adds
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    signature.update({name: "constexpr" for name in kwargs})
    return triton.compile(ASTSource(fn=jit_fn, signature=signature, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options=options)


def compile_seconds(recorder: Recorder, arch: int) -> list[float]:
    """Seconds to compile each distinct key of `recorder` for sm`arch` (ahead of time)."""
    seconds = []
    for args, kwargs in recorder.keys.values():
        began = time.perf_counter()
        compile_launch(recorder.jit_fn, args, kwargs, arch)
        seconds.append(time.perf_counter() - began)
    return seconds


@contextlib.contextmanager
def recording(fully_specialized: bool = False):
    """Inside the block the kernels' launches are recorded, not run: yields {kernel name:
    Recorder}, of the kernels as the library has them or as plain @triton.jit compiles them."""
    originals = {name: getattr(kernels, name) for name in KERNELS}
    recorders = {name: Recorder(kernels.fully_specialized(fn) if fully_specialized else fn)
                 for name, fn in originals.items()}
    try:
        for name, recorder in recorders.items():
            setattr(kernels, name, recorder)
        yield recorders
    finally:
        for name, fn in originals.items():
            setattr(kernels, name, fn)


def launch_once(pattern, n, rows, heads, dim) -> None:
    """One forward + backward through ops.py's launches at length n, batch `rows` (CPU tensors:
    only meaningful inside `recording()`)."""
    q, k, v = (torch.empty(rows, heads, n, dim, dtype=torch.bfloat16) for _ in range(3))
    plan = get_plan(pattern.layout(n, block_q=128, block_kv=128))
    fixed = (float(dim ** -0.5), 128, 128, False, *plan.flags())
    out, lse = ops.block_sparse_attn_fwd(q, k, v, *plan.tensors(), *fixed, True)
    ops.block_sparse_attn_bwd(torch.empty_like(out), None, q, k, v, out, lse, *plan.tensors(), *fixed)


def compare_ptx(pattern, lengths, rows, heads, dim) -> list[dict]:
    """For each length: whether each kernel's sm90 PTX as the library launches it equals the
    fully specialised kernel's (the evidence that leaving the length arguments unspecialised
    costs no generated code)."""
    import triton

    rows_out = []
    for n in lengths:
        with recording() as ours:
            launch_once(pattern, n, rows, heads, dim)
        with recording(fully_specialized=True) as full:
            launch_once(pattern, n, rows, heads, dim)
        for name in KERNELS:
            (a_args, a_kw), = ours[name].keys.values()
            (b_args, b_kw), = full[name].keys.values()
            a = compile_launch(ours[name].jit_fn, a_args, a_kw).asm["ptx"]
            b = compile_launch(full[name].jit_fn, b_args, b_kw).asm["ptx"]
            rows_out.append({"N": n, "kernel": name, "triton": triton.__version__, "identical": a == b,
                             "ptx_lines": len(a.splitlines()), "fully_specialized_ptx_lines": len(b.splitlines())})
    return rows_out


def run_on_gpu(args, pattern, device: str = "cuda", repeats: int = 25, warmup: int = 5) -> int:
    """The stream run for real on CUDA from an empty Triton cache, every call timed (compiles
    included), then one long call's steady-state time. (`device` "cpu" under TRITON_INTERPRET=1:
    the tests' dry run of this function at tiny shapes.)"""
    import statistics

    from sparse_attn import patterns as P
    from sparse_attn import sparse_attention

    fresh_triton_cache()
    if args.fully_specialized:
        for name in KERNELS + ("block_sparse_bwd_combined_kernel",):
            setattr(kernels, name, kernels.fully_specialized(getattr(kernels, name)))
    g = torch.Generator().manual_seed(args.seed)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(q, k, v, pat, backward=True):
        sync()
        began = time.perf_counter()
        out = sparse_attention(q, k, v, pat, backend="triton")
        if backward:
            out.float().sum().backward()
        sync()
        return time.perf_counter() - began

    seconds = []
    for _ in progress(range(args.calls), desc="calls"):
        n = int(torch.randint(args.min_len, args.max_len + 1, (), generator=g))
        rows = int(torch.randint(1, args.max_rows + 1, (), generator=g))
        q, k, v = (torch.randn(rows, args.heads, n, args.dim, generator=g).to(device, torch.bfloat16).requires_grad_()
                   for _ in range(3))
        seconds.append(timed(q, k, v, pattern))
    long_pattern = P.sliding_window(4096)
    q, k, v = (torch.randn(1, args.steady_heads, args.steady_len, args.steady_dim, device=device,
                           dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    steady = {}
    for label, backward in (("fwd", False), ("fwd_bwd", True)):
        with torch.set_grad_enabled(backward):
            times = [timed(q, k, v, long_pattern, backward) for _ in range(repeats)][warmup:]
        steady[f"{label}_ms"] = 1e3 * statistics.median(times)
    first = min(30, len(seconds))
    result = {"env": environment(device), "settings": {**vars(args), "out": str(args.out)},
              "stream": {"calls": len(seconds), "total_s": sum(seconds), f"first_{first}_s": sum(seconds[:first]),
                         "rest_mean_ms": 1e3 * statistics.fmean(seconds[first:]) if len(seconds) > first else None,
                         "seconds": seconds},
              "steady": {"setup": f"B=1, H={args.steady_heads}, N={args.steady_len}, D={args.steady_dim}, bf16, "
                                  "causal window 4096", **steady}}
    write_json(args.out, result)
    rest = result["stream"]["rest_mean_ms"]
    print(f"stream: {sum(seconds):.1f} s for {len(seconds)} calls (first {first}: {sum(seconds[:first]):.1f} s"
          + (f", then {rest:.2f} ms per call" if rest is not None else "") + f"); steady {steady['fwd_ms']:.2f} ms "
          f"forward, {steady['fwd_bwd_ms']:.2f} ms forward+backward")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mechanism", default="sliding_window:window=256,causal=false",
                    help="a pattern spec (default: the ListOps window encoder's)")
    ap.add_argument("--calls", type=int, default=1000, help="attention calls (forward + backward) in the stream")
    ap.add_argument("--min-len", type=int, default=500)
    ap.add_argument("--max-len", type=int, default=2000)
    ap.add_argument("--max-rows", type=int, default=32, help="batch rows per call drawn from 1..this (ListOps: "
                    "a sorted batch of 32 split by length)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="also compile each distinct variant for sm90 and time it")
    ap.add_argument("--fully-specialized", action="store_true",
                    help="launch kernels.fully_specialized(...) versions (every int specialised, as before)")
    ap.add_argument("--compare-ptx", type=int, nargs="+", metavar="N", default=None,
                    help="instead of a stream: compile each kernel at these lengths for sm90 as the library "
                         "launches it and fully specialised, and say whether the PTX is identical")
    ap.add_argument("--device", default="cpu", help="cpu: count launches (nothing runs); cuda: run and time them")
    ap.add_argument("--steady-len", type=int, default=32768, help="--device cuda: the long call's length")
    ap.add_argument("--steady-heads", type=int, default=16)
    ap.add_argument("--steady-dim", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None,
                    help="default: results/triton_specializations[_fully_specialized][_cuda].json")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        ap.error("unset TRITON_INTERPRET (the interpreter specialises nothing)")
    for name in ("calls", "min_len", "max_rows", "heads", "dim", "steady_len", "steady_heads", "steady_dim"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_len < args.min_len:
        ap.error(f"--max-len {args.max_len} is below --min-len {args.min_len}")
    try:
        pattern = Mechanism.parse(args.mechanism).pattern()
    except (ValueError, TypeError) as err:
        ap.error(f"--mechanism {args.mechanism!r}: {err}")
    if pattern is None:
        ap.error(f"--mechanism {args.mechanism!r} is not a pattern (the block kernels run patterns)")
    if args.device not in ("cpu", "cuda"):
        ap.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    if args.out is None:
        suffix = ("_fully_specialized" if args.fully_specialized else "") + ("_cuda" if args.device == "cuda" else "")
        args.out = RESULTS / f"triton_specializations{suffix}.json"
    if args.device == "cuda":
        return run_on_gpu(args, pattern)
    ops.tma_allowed = lambda *tensors: True  # what an aligned bf16 input on sm90 gets
    ops._ensure_allocator = lambda: None
    if args.compare_ptx is not None:
        fresh_triton_cache()
        if args.out == RESULTS / "triton_specializations.json":
            args.out = RESULTS / "triton_specializations_ptx.json"
        rows = compare_ptx(pattern, args.compare_ptx, args.max_rows, args.heads, args.dim)
        write_json(args.out, {"env": environment("cpu"), "settings": {**vars(args), "out": str(args.out)},
                              "rows": rows})
        for row in rows:
            print(f"N={row['N']} {row['kernel']}: PTX {'identical' if row['identical'] else 'DIFFERS'} "
                  f"({row['ptx_lines']} / {row['fully_specialized_ptx_lines']} lines, triton {row['triton']})")
        return 0 if all(row["identical"] for row in rows) else 1

    g = torch.Generator().manual_seed(args.seed)
    curve = []
    checkpoints = {c for c in (1, 10, 30, 100, 300, 1000, 3000, 10000) if c <= args.calls} | {args.calls}
    with recording(args.fully_specialized) as recorders:
        for call in progress(range(1, args.calls + 1), desc="calls"):
            n = int(torch.randint(args.min_len, args.max_len + 1, (), generator=g))
            rows = int(torch.randint(1, args.max_rows + 1, (), generator=g))
            launch_once(pattern, n, rows, args.heads, args.dim)
            if call in checkpoints:
                curve.append({"calls": call, **{name: len(r.keys) for name, r in recorders.items()}})

    result = {"env": environment("cpu"), "settings": {**vars(args), "out": str(args.out)}, "curve": curve,
              "kernels": {}}
    for name, r in recorders.items():
        varying = {arg: sorted(keys) for arg, keys in r.varying.items() if len(keys) > 1}
        result["kernels"][name] = {"launches": r.calls, "variants": len(r.keys), "varying_int_arguments": varying}
    if args.compile:
        fresh_triton_cache()
        for name, r in progress(list(recorders.items()), desc="compiling"):
            seconds = compile_seconds(r, 90)
            result["kernels"][name]["compile_seconds"] = {"count": len(seconds), "mean": sum(seconds) / len(seconds),
                                                          "total": sum(seconds)}
    write_json(args.out, result)
    print(f"{'kernel':<32} {'launches':>8} {'variants':>8}  int arguments that varied (keys)")
    for name, row in result["kernels"].items():
        extra = ""
        if "compile_seconds" in row:
            extra = f"  compile {row['compile_seconds']['mean']:.2f} s each, {row['compile_seconds']['total']:.1f} s in all"
        print(f"{name:<32} {row['launches']:>8} {row['variants']:>8}  "
              + ", ".join(f"{a} {'/'.join(k)}" for a, k in row["varying_int_arguments"].items()) + extra)
    print("variants after " + "; ".join(f"{c['calls']} calls: " + " ".join(str(c[n]) for n in KERNELS) for c in curve))
    return 0


if __name__ == "__main__":
    sys.exit(main())
