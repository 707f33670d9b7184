"""GPU benchmark: sparse patterns through our triton and flex backends against FlexAttention
(run as users run it) and SDPA, forward and forward+backward, in one process.

    PYTHONPATH=src python3 benchmarks/gpu_patterns.py --out $OUT/gpu_patterns.json --lengths 8192 32768
    PYTHONPATH=src python3 benchmarks/gpu_patterns.py --lengths 131072 --methods sdpa_causal sparse_attn_triton
    # dry run of the harness on a CPU (triton needs TRITON_INTERPRET=1 there; flex has no CPU backward):
    python benchmarks/gpu_patterns.py --device cpu --lengths 256 --heads 2 --dim 32 --dtype float32

B=1, H=16, D=128, bf16 by default. Per length N and pattern, the methods (--methods):
* sdpa_causal: SDPA is_causal=True, dense; once per length (recorded under the `causal` pattern);
* sdpa_mask: SDPA with the pattern's dense bool mask (N <= --max-dense only; built in row chunks);
* flexattention: the peer as users run it: `create_block_mask(mask_mod, None, None, N, N,
  BLOCK_SIZE=128, _compile=True)` with the layout's bound pattern's `mask_mod(0)` (BigBird's
  random blocks are ours) and `torch.compile(flex_attention)`; create_block_mask is timed apart;
* flexattention_flash: the same with `kernel_options={"BACKEND": "FLASH"}` (FlexAttention's
  FlashAttention-4 / CuTe DSL backend, where the installed torch offers it; it needs the
  `flash-attn` CuTe package: the error is recorded in the row when it is missing);
* sparse_attn_flex: `sparse_attention(q, k, v, layout, backend="flex")`, layout = 128x128 blocks,
  given directly, so the dilated/strided rewrites do not apply;
* sparse_attn_triton: `sparse_attention(q, k, v, pattern, backend="triton")` through the pattern
  (rewrites apply; the backend picks its blocks). A fresh pattern object: its first call
  includes the layout build.
* sparse_attn_triton_pointers: the same with TMA descriptors off (`ops.TMA_DEFAULT = False`:
  the kernels' pointer loads, what GPUs before Hopper and misaligned inputs get).
Forward under no_grad; forward+backward = `torch.autograd.grad(out, (q, k, v), dout)` with
inputs that require grad; backward (pass `bwd`) = the same grad over one kept forward graph
(`retain_graph=True`), the backward alone, for the per-phase table. Timings: `common.time_gpu` (do_bench median, or a few synchronised
calls for slow ones). torch._dynamo.reset() before each (pattern, N), so FlexAttention never
meets torch.compile's recompile limit (past it, create_block_mask falls back to an eager
O(N^2) path). Each method's failure (OOM, compile error, unsupported) is recorded in its row
as `error` / `fwd_error` / `fwd_bwd_error`, and the run goes on; a lost CUDA context ends the
run (JSON kept). Work left when --deadline-s has passed is listed under `not_run`.
The JSON is rewritten after every row; a compact table is printed at the end.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, fmt_mib, progress, time_cpu, time_gpu, write_json  # noqa: E402

import sparse_attn  # noqa: E402
from sparse_attn import patterns as P  # noqa: E402
from sparse_attn.eval.measure import peak_memory  # noqa: E402

B = 1
BLOCK = 128
# name -> the call that makes it (evaluated with `P` in scope, so the JSON records what ran)
PATTERNS = {
    "window4096_causal": "P.sliding_window(4096)",
    "longformer4096_g64": "P.longformer(4096, 64)",  # bidirectional, 4096 total (2048 each side) + 64 globals
    "bigbird128": "P.bigbird(128)",  # 3 window, 2 global, 3 random blocks of 128, seed 0
    "dilated4096_r2_causal": "P.dilated(4096, 2)",  # keys i, i-2, ..., i-8190: 4096 keys over 8191 positions
    "strided512": "P.strided(512)",  # Sparse Transformer strided, l = 512
    "causal": "P.causal()",
}
METHODS = ("sdpa_causal", "sdpa_mask", "flexattention", "flexattention_flash", "sparse_attn_flex", "sparse_attn_triton",
           "sparse_attn_triton_pointers")
PASSES = ("fwd", "fwd_bwd", "bwd")
FORMULAS = {
    "effective_tflops_fwd": "4*D*allowed_pairs_total / fwd_time; allowed_pairs_total = B*H*(allowed (q,k) pairs per head)",
    "effective_tflops_fwd_bwd": "3.5 * 4*D*allowed_pairs_total / fwd_bwd_time (backward = 2.5x forward)",
    "dense_equiv_tflops_fwd": "4*B*H*D*N*N / fwd_time",
    "dense_equiv_tflops_fwd_bwd": "3.5 * 4*B*H*D*N*N / fwd_bwd_time",
}
REF_BUDGET = 1 << 25  # float64 scores per reference call
# torch >= 2.11 suggests torch.compile(create_block_mask) instead; _compile=True is what users run today
warnings.filterwarnings("ignore", message="_compile flag on create_block_mask")


def make_pattern(name: str):
    return eval(PATTERNS[name], {"P": P})  # noqa: S307 - our own table above


def describe(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:500]}"


def cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cuda_alive(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize()
        return torch.ones(1, device=device).add_(1).item() == 2
    except Exception:  # noqa: BLE001 - a sticky CUDA error: the context is gone
        return False


class Runner:
    """Holds the run's settings, the inputs of the current length and the facts of its patterns."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = getattr(torch, args.dtype)
        self.H, self.D = args.heads, args.dim
        self.n = None
        self.inputs = None
        self.facts: dict[str, dict] = {}
        self.current = None  # (N, pattern name) whose compiled functions dynamo holds
        self.flex = None

    # ------------------------------------------------------------------ timing
    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def first_call(self, fn):
        self.sync()
        t = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - t

    def time(self, fn) -> tuple[float, str]:
        a = self.args
        if self.device.type == "cuda":
            return time_gpu(fn, warmup_ms=a.warmup_ms, rep_ms=a.rep_ms, slow_s=a.slow_ms / 1e3)
        return time_cpu(fn, repeats=3), "torch.utils.benchmark.Timer, median of 3"

    # ------------------------------------------------------------------ state
    def release(self) -> None:
        """Drop the current length's inputs and pattern facts."""
        self.inputs, self.facts, self.n = None, {}, None
        cleanup(self.device)

    def set_length(self, n: int) -> None:
        if self.n == n:
            return
        self.release()
        gen = torch.Generator(device=self.device).manual_seed(n)
        shape = (B, self.H, n, self.D)
        self.inputs = [torch.randn(shape, generator=gen, device=self.device, dtype=self.dtype) for _ in range(4)]
        self.n, self.facts = n, {}

    def enter_pattern(self, n: int, name: str) -> None:
        if self.current != (n, name):
            torch._dynamo.reset()  # a fresh compile budget for every (pattern, N): no recompile-limit fallbacks
            self.flex = None
            self.current = (n, name)
            cleanup(self.device)

    def pattern_facts(self, name: str) -> dict:
        """Layout (128x128, on the device), build time, allowed pairs, the reference rows."""
        if name in self.facts:
            return self.facts[name]
        n, dev = self.n, self.device
        make_pattern(name).layout(n, block_q=BLOCK, block_kv=BLOCK, device=dev)  # warm-up (allocator, kernels)
        times = []
        for _ in range(3):  # fresh pattern objects: nothing cached
            fresh = make_pattern(name)
            self.sync()
            t = time.perf_counter()
            fresh.layout(n, block_q=BLOCK, block_kv=BLOCK, device=dev)
            self.sync()
            times.append(time.perf_counter() - t)
        pattern = make_pattern(name)
        layout = pattern.layout(n, block_q=BLOCK, block_kv=BLOCK, device=dev)
        pairs = layout.allowed_pairs()  # [layout heads]; exact
        total = int(pairs.sum()) * (self.H // layout.num_heads) * B
        f = {"pattern": pattern, "layout": layout, "layout_build_ms": statistics.median(times) * 1e3,
             "allowed_pairs_total": total, "density": layout.density(), "nnz_blocks_128": layout.nnz_blocks()}
        self.facts[name] = f
        return f

    def reference_rows(self, name: str, dtype) -> torch.Tensor:
        """Reference output of the last --check-rows queries, computed in `dtype` (float64 for the
        ground truth; the benchmark dtype for the "same precision" baseline), in chunks of heads
        and rows so that fp64 copies of k/v stay near 2 GiB."""
        f = self.pattern_facts(name)
        key = f"ref_{dtype}"
        if key in f:
            return f[key]
        q, k, v, _ = self.inputs
        n, rows = self.n, min(self.args.check_rows, self.n)
        pattern = f["layout"].pattern  # bound (BigBird: the same random blocks as the layout)
        group = self.H if pattern.num_heads else max(1, min(self.H, (1 << 28) // (n * self.D)))
        step = max(1, REF_BUDGET // (group * n))
        heads = []
        for h0 in range(0, self.H, group):
            hs = slice(h0, h0 + group)
            kh, vh = k[:, hs].to(dtype), v[:, hs].to(dtype)
            parts = [sparse_attn.sparse_attention(q[:, hs, s:min(n, s + step)].to(dtype), kh, vh, pattern,
                                                  backend="reference", q_offset=s)
                     for s in range(n - rows, n, step)]
            heads.append(torch.cat(parts, 2).double())
            del kh, vh
        f[key] = torch.cat(heads, 1)
        return f[key]

    def max_err(self, name: str, out: torch.Tensor) -> float:
        ref = self.reference_rows(name, torch.float64)
        return float((out[:, :, -ref.shape[2]:].double() - ref).abs().max())

    # ------------------------------------------------------------------ methods
    def setup(self, method: str, name: str, row: dict):
        """The method's forward `fn(q, k, v) -> out`, after any per-pattern preparation."""
        n, dev = self.n, self.device
        f = self.pattern_facts(name)
        F = torch.nn.functional
        if method == "sdpa_causal":
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if method == "sdpa_mask":
            pattern = f["layout"].pattern
            chunk = max(1, (1 << 27) // n)  # rows per predicate evaluation (int64 temporaries ~1 GiB)
            mask = torch.empty(pattern.num_heads or 1, n, n, dtype=torch.bool, device=dev)
            for r0 in range(0, n, chunk):
                r1 = min(n, r0 + chunk)
                mask[:, r0:r1] = pattern.to_dense(r1 - r0, n, q_offset=r0, device=dev)
            mask = mask[None]  # [1, H or 1, N, N]
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if method in ("flexattention", "flexattention_flash"):
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            pattern = f["layout"].pattern
            pattern.prepare(dev)  # lookup tables on the device before the compiled predicate runs
            mask_mod = pattern.mask_mod(0)

            def build():
                return create_block_mask(mask_mod, None, None, n, n, device=str(dev), BLOCK_SIZE=BLOCK,
                                         _compile=True)

            block_mask, first = self.first_call(build)
            row["create_block_mask_first_call_ms"] = first * 1e3
            seconds, _ = self.time(build)
            row["create_block_mask_ms"] = seconds * 1e3
            if self.flex is None:
                # the `bwd` pass differentiates one kept graph repeatedly (retain_graph=True), which
                # AOTAutograd's donated buffers forbid ("compiled with non-empty donated buffers");
                # off, FlexAttention's backward alone can be timed like ours
                import torch._functorch.config as functorch_config

                functorch_config.donated_buffer = False
                self.flex = torch.compile(flex_attention)
            flex = self.flex
            if method == "flexattention_flash":  # the FlashAttention-4 (CuTe DSL) backend, where torch has it
                options = {"BACKEND": "FLASH"}
                return lambda q, k, v: flex(q, k, v, block_mask=block_mask, kernel_options=options)
            return lambda q, k, v: flex(q, k, v, block_mask=block_mask)
        if method == "sparse_attn_flex":
            layout = f["layout"]
            return lambda q, k, v: sparse_attn.sparse_attention(q, k, v, layout, backend="flex")
        if method in ("sparse_attn_triton", "sparse_attn_triton_pointers"):
            if "triton_pattern" not in f:
                f["triton_pattern"] = make_pattern(name)  # fresh: the first call builds its layout
            pattern = f["triton_pattern"]
            return lambda q, k, v: sparse_attn.sparse_attention(q, k, v, pattern, backend="triton")
        raise ValueError(f"unknown method {method!r}")

    def run_pass(self, row: dict, pass_: str, fwd, name: str) -> None:
        q, k, v, dout = self.inputs
        if pass_ == "fwd":
            def fn():
                with torch.no_grad():
                    return fwd(q, k, v)
        elif pass_ == "bwd":  # the backward alone, over one kept forward graph
            qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))
            kept = fwd(qg, kg, vg)

            def fn():
                return torch.autograd.grad(kept, (qg, kg, vg), dout, retain_graph=True)
        else:
            qg, kg, vg = (x.detach().requires_grad_(True) for x in (q, k, v))

            def fn():
                return torch.autograd.grad(fwd(qg, kg, vg), (qg, kg, vg), dout)
        out, first = self.first_call(fn)
        row[f"{pass_}_first_call_ms"] = first * 1e3
        if pass_ == "fwd":
            row["max_err_last_rows"] = self.max_err(name, out)
        del out
        seconds, how = self.time(fn)
        row[f"{pass_}_ms"] = seconds * 1e3
        row[f"{pass_}_timer"] = how
        work = {"fwd": 1.0, "fwd_bwd": 3.5, "bwd": 2.5}[pass_]  # matmul work relative to the forward
        flops = 4 * self.D * row["allowed_pairs_total"] * work
        dense = 4 * B * self.H * self.D * self.n * self.n * work
        row[f"effective_tflops_{pass_}"] = flops / seconds / 1e12
        row[f"dense_equiv_tflops_{pass_}"] = dense / seconds / 1e12
        if pass_ == "fwd" and self.args.memory:
            row["fwd_peak_bytes"] = peak_memory(fn, self.device)

    def after_failure(self, message: str) -> None:
        cleanup(self.device)
        if not cuda_alive(self.device):
            raise RuntimeError(f"CUDA context lost after: {message}")

    def bench(self, n: int, name: str, method: str) -> dict:
        self.set_length(n)
        self.enter_pattern(n, name)
        a = self.args
        row = {"pattern": name, "pattern_call": PATTERNS[name], "N": n, "method": method, "B": B, "H": self.H,
               "D": self.D, "dtype": a.dtype, "device": str(self.device)}
        if method == "sdpa_mask" and n > a.max_dense:
            row["skipped"] = (f"dense bool mask of N^2 = {n * n / 2**30:.0f} GiB (plus SDPA's additive copy) "
                              f"beyond --max-dense {a.max_dense}")
            return row
        try:
            f = self.pattern_facts(name)
            row.update({k: f[k] for k in ("density", "allowed_pairs_total", "nnz_blocks_128", "layout_build_ms")})
            if method == "sdpa_causal":  # dense causal: every pair j <= i
                row.update(allowed_pairs_total=B * self.H * n * (n + 1) // 2, density=(n + 1) / (2 * n))
            row["ref_same_dtype_max_err"] = float(
                (self.reference_rows(name, self.dtype) - self.reference_rows(name, torch.float64)).abs().max())
            fwd = self.setup(method, name, row)
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            row["error"] = describe(e)
        if "error" in row:  # cleaned up here, once the exception (and the tensors its frames hold) is gone
            self.after_failure(row["error"])
            return row
        from sparse_attn.backends.triton import ops as triton_ops

        triton_ops.TMA_DEFAULT = False if method == "sparse_attn_triton_pointers" else None  # for every pass
        for pass_ in a.passes:
            if pass_ != "fwd" and time.monotonic() > a.deadline_at:
                row[f"{pass_}_skipped"] = "deadline"
                continue
            try:
                self.run_pass(row, pass_, fwd, name)
            except Exception as e:  # noqa: BLE001
                row[f"{pass_}_error"] = describe(e)
            if f"{pass_}_error" in row:
                self.after_failure(row[f"{pass_}_error"])
        del fwd
        triton_ops.TMA_DEFAULT = None
        cleanup(self.device)
        return row


def fits(n: int, args) -> str | None:
    """Why length n cannot run here (None if it can): inputs, grads and outputs need about 10 copies."""
    if args.device != "cuda":
        return None
    need = 10 * B * args.heads * n * args.dim * torch.finfo(getattr(torch, args.dtype)).bits // 8
    free, _ = torch.cuda.mem_get_info()
    return None if need < free else f"needs about {need / 2**30:.0f} GiB for tensors, {free / 2**30:.0f} GiB free"


def table(rows: list[dict]) -> str:
    head = "| pattern | N | method | fwd ms | fwd+bwd ms | eff. TFLOP/s fwd | peak MiB | max err | note |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        def ms(key):
            return "-" if key not in r else f"{r[key]:.2f}"
        note = (r.get("error") or r.get("skipped") or r.get("fwd_error") or r.get("fwd_bwd_error")
                or (f"fwd+bwd: {r['fwd_bwd_skipped']}" if "fwd_bwd_skipped" in r else ""))
        err = "-" if "max_err_last_rows" not in r else f"{r['max_err_last_rows']:.1e}"
        tflops = "-" if "effective_tflops_fwd" not in r else f"{r['effective_tflops_fwd']:.1f}"
        lines.append(f"| {r['pattern']} | {r['N']} | {r['method']} | {ms('fwd_ms')} | {ms('fwd_bwd_ms')} | {tflops} | "
                     f"{fmt_mib(r.get('fwd_peak_bytes'))} | {err} | {note[:80]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--passes", nargs="+", default=list(PASSES), choices=list(PASSES))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--max-dense", type=int, default=32768, help="largest N for SDPA with a dense mask")
    ap.add_argument("--check-rows", type=int, default=256, help="last query rows checked against float64")
    ap.add_argument("--warmup-ms", type=float, default=10)
    ap.add_argument("--rep-ms", type=float, default=50)
    ap.add_argument("--slow-ms", type=float, default=20, help="calls slower than this skip do_bench")
    ap.add_argument("--no-memory", dest="memory", action="store_false")
    ap.add_argument("--deadline-s", type=float, default=480,
                    help="start no new work after this many seconds (listed under not_run)")
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu_patterns.json")
    args = ap.parse_args(argv)
    start = time.monotonic()
    args.deadline_at = start + args.deadline_s
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu for a dry run", file=sys.stderr)
        return 2

    tasks = []
    for n in args.lengths:
        if "sdpa_causal" in args.methods:
            tasks.append((n, "causal", "sdpa_causal"))  # once per length, first: the baseline
        tasks += [(n, name, m) for name in args.patterns for m in args.methods if m != "sdpa_causal"]
    runner = Runner(args)
    rows, not_run, skipped_lengths = [], [], {}
    payload = {
        "benchmark": "gpu_patterns", "command": sys.argv, "env": environment(args.device),
        "config": {"B": B, "H": args.heads, "D": args.dim, "dtype": args.dtype, "layout_block": BLOCK,
                   "lengths": args.lengths, "methods": args.methods, "passes": args.passes,
                   "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "slow_ms": args.slow_ms,
                   "check_rows": args.check_rows, "max_dense": args.max_dense},
        "patterns": {name: PATTERNS[name] for name in args.patterns},
        "formulas": FORMULAS,
        "notes": [
            "torch._dynamo.reset() before each (pattern, N), so every compile starts fresh: FlexAttention's "
            "create_block_mask never reaches torch.compile's recompile limit and its eager O(N^2) fallback",
            "first-call times of the flex methods include torch.compile; inductor's on-disk caches (cold on a "
            "fresh machine) may make later compiles of identical graphs shorter",
            "sdpa_causal is measured once per length and recorded under pattern 'causal' (dense causal pairs)",
            "sparse_attn_flex gets the 128x128 layout itself (no dilated/strided rewrites); sparse_attn_triton "
            "gets the pattern (rewrites apply) as a fresh object, so its fwd first call includes the layout build",
            "flexattention's fwd/fwd_bwd times exclude create_block_mask (create_block_mask_ms, warm; "
            "create_block_mask_first_call_ms includes its compile)",
            "max_err_last_rows: max |out - reference(float64)| over the last check_rows queries; "
            "ref_same_dtype_max_err: the same for the reference run in the benchmark dtype (the 2x rule's baseline)",
            "fwd_peak_bytes: torch.cuda.max_memory_allocated during one warm forward minus memory allocated before it",
            "dilated4096_r2_causal = P.dilated(4096, 2): the window argument counts keys, so each query sees "
            "4096 keys i, i-2, ..., i-8190 (a span of 8191 positions); strided512 = P.strided(512) (l = 512); "
            "longformer4096_g64: 2048 keys each side + 64 global tokens; bigbird128: 3 window, 2 global, 3 random "
            "blocks of 128, seed 0",
            "create_block_mask is called with _compile=True (torch's deprecation warning for it is silenced)",
            "layout_build_ms: median of 3 builds of fresh pattern objects (128x128 blocks, on the device, synchronised)",
        ],
    }

    def save():
        payload.update(rows=rows, not_run=not_run, skipped_lengths=skipped_lengths,
                       elapsed_s=time.monotonic() - start)
        write_json(args.out, payload)

    bar = progress(tasks, desc="gpu_patterns")
    aborted = None
    for n, name, method in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{name} N={n} {method}")
        if aborted or time.monotonic() > args.deadline_at:
            not_run.append(f"{name} N={n} {method}" + (" (CUDA context lost)" if aborted else " (deadline)"))
            continue
        if n not in skipped_lengths and runner.n != n:
            runner.release()  # free the previous length's tensors before asking what fits
            why = fits(n, args)
            if why:
                skipped_lengths[n] = why
        if n in skipped_lengths:
            continue
        t = time.monotonic()
        try:
            rows.append(runner.bench(n, name, method))
        except Exception as e:  # noqa: BLE001 - a lost CUDA context, or inputs that did not fit
            rows.append({"pattern": name, "N": n, "method": method, "error": describe(e)})
        if "error" in rows[-1] and not cuda_alive(runner.device):
            aborted = payload["aborted"] = rows[-1]["error"]
        rows[-1]["wall_s"] = time.monotonic() - t
        print(f"[{time.monotonic() - start:6.0f}s] {name} N={n} {method}: fwd {rows[-1].get('fwd_ms', '-')} ms, "
              f"fwd+bwd {rows[-1].get('fwd_bwd_ms', '-')} ms {rows[-1].get('error', '')}", file=sys.stderr, flush=True)
        save()
    save()
    print(table(rows))
    if not_run:
        print(f"not run: {len(not_run)} (see not_run in {args.out})")
    return 1 if aborted else 0


if __name__ == "__main__":
    sys.exit(main())
