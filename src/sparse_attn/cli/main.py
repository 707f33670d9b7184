"""The `sparse-attn` command: parse, call the library, print or plot.

    sparse-attn compare --length 8192            # every preset vs dense SDPA: time, memory, error
    sparse-attn show sliding_window:window=8 --length 32
    sparse-attn backends                         # what each backend supports, what auto picks
    sparse-attn train --mechanisms sliding_window:window=64 --steps 300 --plot loss.png --sample 200
                                                 # train a small byte-level LM, plot its loss, sample
    sparse-attn eval needle --plot needle.png       # needle in a haystack, every mechanism, heatmaps
    sparse-attn eval reach --mechanisms sliding_window:window=512 --layers 12 --length 32768
    sparse-attn hf --tokens 4096 --windows 512 1024  # SmolLM2-135M (GGUF, offline) on schedules: perplexity,
                                                     # memory, generation speed
    sparse-attn report --out report.md               # one page: benchmarks, fidelity, evaluations

Exit codes: 0 success, 1 failure at run time (the message says why), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .. import __version__
from .._extras import MissingExtra
from ..backends import BackendError
from . import specs
from .checkpointing import add_checkpoint_flags

PROG = "sparse-attn"

# What a run can fail with and still deserve a one-line message rather than a traceback.
RUNTIME_ERRORS = (BackendError, ValueError, TypeError, MissingExtra, OSError, torch.OutOfMemoryError)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps our line breaks in descriptions and epilogs."""


def _int_at_least(minimum: int):
    """An argparse type: an int >= minimum, worded as `_checks.check_int` words it (argparse puts
    the flag in front: "argument --block: expected an int >= 1, got 0")."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _backend_names() -> list[str]:
    from ..backends import list_backends

    return ["auto"] + [b.name for b in list_backends()]


def spec_help() -> str:
    """The specs epilog, from the mechanism registry as it is now (registered mechanisms included)."""
    return ("A pattern is NAME or NAME:KEY=VALUE,... (e.g. sliding_window:window=512,causal=false).\n"
            f"Defaults below are for --length >= {specs.REFERENCE_LENGTH}; shorter sequences get sizes scaled down\n"
            "in proportion (see sparse_attn.patterns for what each argument means).\n\n"
            "patterns (NAME  default KEY=VALUEs):\n" + specs.describe())

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

TRAIN_DESCRIPTION = """\
Train a small causal language model on bytes (sparse_attn.nn.SparseCausalLM, vocab 256) whose
layers use the attention you name, with sparse_attn.train.train_lm: AdamW, linear warm-up then
cosine decay, validation loss on fixed windows of the last 10% of the corpus. The defaults finish
in a few minutes on a laptop CPU. Runs are reproducible (the batch of step s is seeded by
(--seed, s)), and a run resumed from --checkpoint ends exactly where an uninterrupted one would.

Prints the validation loss at each evaluation, as it happens, and a summary line:
  final val loss L nats/byte (L/ln 2 bits/byte) after S steps, T s, P parameters
"""

TRAIN_EPILOG = """\
examples:
  sparse-attn train                                            # dense causal baseline
  sparse-attn train --mechanisms sliding_window:window=64 --json sw.json --plot sw.png
  sparse-attn train --mechanisms longformer:window=64,global_tokens=4,causal=true --sample 300
  sparse-attn train --layers 4 --mechanisms sliding_window:window=32 sliding_window:window=32 \\
                    sliding_window:window=32 causal            # a hybrid schedule, one spec per layer
  sparse-attn train --mechanisms linear:causal=true --checkpoint lin.pt
  sparse-attn train --mechanisms linear:causal=true --checkpoint lin.pt --resume   # after an interruption

Specs are NAME or NAME:KEY=VALUE,... (see `sparse-attn compare --help` and sparse_attn.attention);
a causal LM refuses patterns that see later keys (e.g. sliding_window:causal=false) and
mechanisms without causal=true (e.g. linear, performer, topk).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Sparse attention from the command line: compare patterns, draw them, list backends.",
        formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # compare ----------------------------------------------------------------------------
    p = sub.add_parser("compare", help="time, memory and error of patterns vs dense SDPA",
                       description=COMPARE_DESCRIPTION, epilog=spec_help(), formatter_class=_Formatter)
    p.add_argument("--length", type=_positive_int, required=True, metavar="N", help="sequence length")
    # One list, extended by each flag (action="extend"): with nargs="+" alone the last flag replaced the others.
    p.add_argument("--patterns", "--mechanisms", nargs="+", action="extend", dest="specs", default=None, metavar="SPEC",
                   help=f"patterns and/or mechanisms ({', '.join(specs.MECHANISM_REGISTRY)}) to run, "
                        "NAME or NAME:KEY=VALUE,...; both flags may be given, and more than once: every spec gets "
                        f"a row (default: {' '.join(specs.DEFAULT_PATTERNS)})")
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size (default: %(default)s)")
    p.add_argument("--heads", type=_positive_int, default=8, help="query heads (default: %(default)s)")
    p.add_argument("--kv-heads", type=_positive_int, default=None, help="key/value heads (GQA); default: --heads")
    p.add_argument("--dim", type=_positive_int, default=64, help="head dim (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"],
                   help="dtype of q/k/v (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: %(default)s)")
    p.add_argument("--backend", default="auto",
                   help=f"backend for the patterns: one of {', '.join(_backend_names())} (default: %(default)s)")
    p.add_argument("--repeats", type=_positive_int, default=3,
                   help="timed calls per row, after one warm-up (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random q/k/v (default: %(default)s)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (torch.set_num_threads; default: torch's choice, "
                        f"{torch.get_num_threads()} here). On a busy machine fewer threads give steadier timings")
    p.add_argument("--max-dense-length", type=_non_negative_int, default=8192, metavar="N",
                   help="check errors against the dense reference only up to this length (default: %(default)s)")
    p.add_argument("--error-rows", type=_non_negative_int, default=1024, metavar="R",
                   help="query rows checked against the float64 reference (0: all rows; the check is dense, "
                        "O(R x N) per pattern; default: %(default)s)")
    p.add_argument("--json", metavar="FILE", help="write rows and environment as JSON")
    p.add_argument("--plot", metavar="FILE", help="write a bar chart (time and peak memory); needs matplotlib")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress on stderr (a bar on a terminal, else a line as each row finishes)")
    p.set_defaults(handler=cmd_compare, parser=p)

    # show -------------------------------------------------------------------------------
    p = sub.add_parser("show", help="draw a pattern's mask (ASCII, or PNG with --png)",
                       description="Draw a pattern: the element mask in ASCII ('#' allowed, '.' not), the block map\n"
                                   "with --block (str(pattern.layout(...))), or an image with --png.",
                       epilog=spec_help(), formatter_class=_Formatter)
    p.add_argument("pattern", metavar="PATTERN", help="NAME or NAME:KEY=VALUE,...")
    p.add_argument("--length", type=_positive_int, default=64, metavar="N",
                   help="query positions (default: %(default)s)")
    p.add_argument("--kv-length", type=_positive_int, default=None, metavar="N",
                   help="key positions (default: --length); queries are the last --length of them")
    p.add_argument("--block", type=_positive_int, default=None, metavar="B",
                   help="print the block map with B x B blocks instead of the element mask")
    p.add_argument("--png", metavar="FILE", help="write an image of the element mask (needs matplotlib)")
    p.add_argument("--head", type=_non_negative_int, default=0,
                   help="head to draw, for per-head patterns (default: %(default)s)")
    p.set_defaults(handler=cmd_show, parser=p)

    # backends ---------------------------------------------------------------------------
    p = sub.add_parser("backends", help="list backends, what they support, and what auto picks",
                       description="List every backend: capabilities, whether it can run here, and which one\n"
                                   "backend='auto' picks for a typical call (sparse_attn.explain()).",
                       formatter_class=_Formatter)
    p.set_defaults(handler=cmd_backends, parser=p)

    # train ------------------------------------------------------------------------------
    p = sub.add_parser("train", help="train a small byte-level causal LM with any attention schedule",
                       description=TRAIN_DESCRIPTION, epilog=TRAIN_EPILOG, formatter_class=_Formatter)
    g = p.add_argument_group("model")
    g.add_argument("--mechanisms", nargs="+", default=["causal"], metavar="SPEC",
                   help="attention of every layer (one spec) or of each layer (one spec per layer), as "
                        "sparse_attn.attention accepts them; must be causal (default: causal)")
    g.add_argument("--layers", type=_positive_int, metavar="N", default=4, help="transformer blocks (default: %(default)s)")
    g.add_argument("--dim", type=_positive_int, metavar="N", default=128, help="model width (default: %(default)s)")
    g.add_argument("--heads", type=_positive_int, metavar="N", default=4, help="query heads (default: %(default)s)")
    g.add_argument("--kv-heads", type=_positive_int, metavar="N", default=None, help="key/value heads (GQA); default: --heads")
    g.add_argument("--warmup-steps", type=_non_negative_int, default=0, metavar="N",
                   help="dense-to-sparse warm-up: blend from dense causal attention to the schedule over the "
                        "first N steps (ModelConfig.warmup_steps; default: %(default)s)")
    g = p.add_argument_group("training")
    g.add_argument("--seq-len", type=_positive_int, default=256, metavar="N",
                   help="training sequence length in bytes (default: %(default)s)")
    g.add_argument("--batch", type=_positive_int, metavar="N", default=8, help="sequences per step (default: %(default)s)")
    g.add_argument("--steps", type=_positive_int, metavar="N", default=300,
                   help="optimizer steps in total, those of a resumed checkpoint included (default: %(default)s)")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate, AdamW (default: %(default)s)")
    g.add_argument("--min-lr", type=float, default=3e-4, help="end of the cosine decay (default: %(default)s)")
    g.add_argument("--lr-warmup", type=_non_negative_int, default=30, metavar="N",
                   help="linear learning-rate warm-up steps (default: %(default)s)")
    g.add_argument("--eval-every", type=_positive_int, default=50, metavar="N",
                   help="validation loss (and checkpoint) every N steps and at the end (default: %(default)s)")
    g.add_argument("--eval-batches", type=_positive_int, default=8, metavar="N",
                   help="batches of fixed validation windows per evaluation (default: %(default)s)")
    g.add_argument("--corpus", default="synthetic", metavar="SOURCE",
                   help="synthetic (generated records with long-range facts), stdlib (this Python's standard "
                        "library sources) or a file PATH (default: %(default)s)")
    g.add_argument("--corpus-bytes", type=_positive_int, default=1_000_000, metavar="N",
                   help="bytes of the corpus to use, the last 10%% for validation (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the weights, the batches and the generated corpus (default: %(default)s)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda (default: %(default)s)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16: autocast, weights stay float32 (default: %(default)s)")
    g.add_argument("--threads", type=_positive_int, metavar="N", default=None,
                   help=f"torch CPU threads (default: torch's choice, {torch.get_num_threads()} here)")
    g = p.add_argument_group("output")
    g.add_argument("--checkpoint", metavar="FILE",
                   help="save model, optimizer and history here at every evaluation (written atomically)")
    g.add_argument("--resume", action="store_true",
                   help="continue from --checkpoint up to --steps, with the model flags it was trained with: "
                        "with the same flags the result equals an uninterrupted run; a larger --steps extends "
                        "it (the learning-rate schedule is then stretched to the new length)")
    add_checkpoint_flags(g, resume=False)  # --checkpoint-dir DIR: the checkpoint is DIR/train.pt
    g.add_argument("--json", metavar="FILE",
                   help="write history, final val loss, configs and environment as JSON")
    g.add_argument("--plot", metavar="FILE", help="write the loss curves (needs matplotlib)")
    g.add_argument("--sample", type=_non_negative_int, default=0, metavar="N",
                   help="after training, generate N bytes continuing the start of the validation text")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress on stderr (a bar on a terminal, else a line every 10 s)")
    p.set_defaults(handler=cmd_train, parser=p)
    # eval -------------------------------------------------------------------------------
    from .evaluate import add_eval_parser  # here, not at the top: evaluate imports helpers from this module

    add_eval_parser(sub, _Formatter)

    # hf ---------------------------------------------------------------------------------
    from .hf import add_hf_parser

    add_hf_parser(sub, _Formatter)

    # report -----------------------------------------------------------------------------
    from .report import add_report_parser

    add_report_parser(sub, _Formatter)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 run-time failure, 2 bad arguments)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.handler(args) or 0)
    except SystemExit as exc:  # argparse: --help/--version (0) and bad arguments (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BrokenPipeError:  # `sparse-attn ... | head`: the reader left; say nothing more
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except RUNTIME_ERRORS as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------------------- helpers
def _parse_spec(parser: argparse.ArgumentParser, text: str, length: int) -> specs.Spec:
    try:
        return specs.parse_spec(text, length)
    except specs.SpecError as exc:
        parser.error(str(exc))


def check_device(text: str, parser: argparse.ArgumentParser | None = None) -> torch.device:
    """--device as a device torch understands and this machine has. A bad one is a usage error
    (exit 2) through `parser` when given, else a ValueError naming --device."""
    try:
        device = torch.device(text)
    except RuntimeError as exc:  # a name torch does not know
        problem = f"--device {text!r}: {exc}"
    else:
        if device.type != "cuda" or torch.cuda.is_available():
            return device
        problem = f"--device {text}: CUDA is not available here (torch {torch.__version__})"
    if parser is None:
        raise ValueError(problem)
    parser.error(problem)


def _one_line(exc: Exception) -> str:
    """The message of `exc` on one line; of a BackendError's explanation, its verdicts only."""
    lines = str(exc).splitlines() or [""]
    return " ".join([lines[0]] + [line.strip() for line in lines[1:] if "rejected" in line])


def _try_mechanism(parser: argparse.ArgumentParser, flag: str, text: str, mechanism, *, length: int, head_dim: int,
                   device, q_heads: int = 1) -> None:
    """Exit 2 now if a non-pattern mechanism's op refuses its arguments (top_k=0, an unknown feature
    map, ...): those checks run only in a call, so one call on one batch row and one kv head of the
    real length and head dim, before a run that would fail at its first step (or later)."""
    from ..ops.mechanisms import PATTERN, Mechanism

    if not isinstance(mechanism, Mechanism) or mechanism.kind == PATTERN:
        return  # patterns check their arguments when built
    q = torch.randn(1, q_heads, length, head_dim, device=device)
    k, v = torch.randn(2, 1, 1, length, head_dim, device=device)
    try:
        with torch.no_grad():
            mechanism(q, k, v)
    except (ValueError, TypeError, BackendError) as exc:
        parser.error(f"{flag} {text}: {_one_line(exc)}")


def _check_output(parser: argparse.ArgumentParser, flag: str, path: str | None) -> None:
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        parser.error(f"{flag} {path}: folder {folder} does not exist")


def _require_matplotlib() -> None:
    """Fail before a long run, not after it."""
    from .._extras import figure

    figure()


# ------------------------------------------------------------------------------- commands
def cmd_compare(args) -> int:
    from .compare import CompareConfig, check_config, format_table, run_compare, write_json

    parser = args.parser
    if args.backend not in _backend_names():
        parser.error(f"--backend must be one of {', '.join(_backend_names())}, got {args.backend!r}")
    if args.kv_heads is not None and args.heads % args.kv_heads:
        parser.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    check_device(args.device, parser)
    _check_output(parser, "--json", args.json)
    _check_output(parser, "--plot", args.plot)
    pattern_specs = [_parse_spec(parser, text, args.length) for text in args.specs or specs.DEFAULT_PATTERNS]
    for spec in pattern_specs:
        if spec.pattern is not None and spec.pattern.num_heads not in (None, args.heads):
            parser.error(f"{spec.text}: the pattern has {spec.pattern.num_heads} heads but --heads is {args.heads}")
    if args.plot:
        _require_matplotlib()
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


# O(N^2) pictures: keep them to sizes a terminal / an image can show.
_MAX_ASCII = 512
_MAX_PNG = 8192


def cmd_show(args) -> int:
    parser = args.parser
    n = args.length
    kv = args.kv_length if args.kv_length is not None else n
    if kv < n:
        parser.error(f"--kv-length ({kv}) must be >= --length ({n}): queries are the last --length key positions")
    spec = _parse_spec(parser, args.pattern, kv)
    if spec.pattern is None:
        parser.error(f"{spec.name} is a mechanism with no fixed pattern (its keys depend on q and k): show draws "
                     f"patterns: {', '.join(specs.REGISTRY)}")
    pattern = spec.pattern
    heads = pattern.num_heads
    if heads is None and args.head:
        parser.error(f"--head {args.head}: {spec.canonical()} is the same for every head; only head 0 exists")
    if heads is not None and args.head >= heads:
        parser.error(f"--head {args.head}: {spec.canonical()} has {heads} heads (0..{heads - 1})")
    if args.png and max(n, kv) > _MAX_PNG:
        parser.error(f"--png draws the N x N element mask: at most {_MAX_PNG} positions, got {max(n, kv)}")
    if not args.png and not args.block and max(n, kv) > _MAX_ASCII:
        parser.error(f"the element-level ASCII mask is limited to {_MAX_ASCII} positions (got {max(n, kv)}): "
                     "use --block B for the block map, or --png FILE")
    _check_output(parser, "--png", args.png)

    layout = pattern.layout(n, kv, block_q=args.block or 64)
    density = float(layout.allowed_pairs()[min(args.head, layout.num_heads - 1)]) / (n * kv)
    head_note = f" head={args.head}" if heads is not None else ""
    print(f"{spec.canonical()} = {pattern!r}")
    print(f"q_len={n} kv_len={kv} q_offset={kv - n}{head_note} density={density:.4f}")
    if args.block:
        print(str(layout))
    elif not args.png:
        print(pattern.show(n, kv, head=args.head))
    if args.png:
        from .plots import plot_mask

        mask = pattern.to_dense(n, kv, num_heads=heads)[args.head]
        plot_mask(mask, repr(pattern), args.png, q_offset=kv - n)
        print(f"wrote {args.png}")
    return 0


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def cmd_backends(args) -> int:
    from .. import explain
    from .. import patterns as P
    from ..backends import list_backends

    backends = list_backends()
    width = max(len(b.name) for b in backends)
    for b in backends:
        c = b.caps
        reason = b.unavailable_reason()
        dtypes = ",".join(sorted(str(d).replace("torch.", "") for d in c.dtypes))
        print(f"{b.name:<{width}}  {'usable here' if reason is None else 'NOT usable here: ' + reason}")
        pad = " " * (width + 2)
        print(f"{pad}devices={','.join(sorted(c.devices))}  dtypes={dtypes}  "
              f"head_dim={c.min_head_dim}..{c.max_head_dim}")
        print(f"{pad}grads={_yes(c.grads)}  gqa={_yes(c.gqa)}  q_len!=kv_len={_yes(c.different_lengths)}  "
              f"per_head={_yes(c.per_head_patterns)}  lse={_yes(c.returns_lse)}  "
              f"deterministic={_yes(c.deterministic)}  auto={'no (dense)' if c.dense else 'yes'}")
        if c.notes:
            print(f"{pad}{c.notes}")
    calls = [("cpu", torch.float32)]
    if torch.cuda.is_available():
        calls.append(("cuda", torch.float16))
    shape = (1, 8, 4096, 64)
    pattern = P.sliding_window(256)
    for device, dtype in calls:
        q = torch.empty(shape, device=device, dtype=dtype)
        print()
        print(f"backend='auto' for a typical call ({device} {str(dtype).replace('torch.', '')}, "
              f"q/k/v {shape}, {pattern!r}):")
        print("  " + str(explain(q, q, q, pattern)).replace("\n", "\n  "))
    return 0


def cmd_train(args) -> int:
    from .train import cmd_train as run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
