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

Each command is one module of this folder (compare.py, show.py, ..., report.py); what they share
is in args.py. Exit codes: 0 success, 1 failure at run time (the message says why), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .. import __version__
from .args import PROG, RUNTIME_ERRORS, Formatter
from .backends import add_backends_parser
from .compare import add_compare_parser
from .evaluate import add_eval_parser
from .hf import add_hf_parser
from .report import add_report_parser
from .show import add_show_parser
from .train import add_train_parser

# One module per command, in the order of `sparse-attn --help`; each registers its parser.
COMMANDS = (add_compare_parser, add_show_parser, add_backends_parser, add_train_parser, add_eval_parser,
            add_hf_parser, add_report_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Sparse attention from the command line: compare patterns, draw them, list backends.",
        formatter_class=Formatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in COMMANDS:
        add_parser(sub, Formatter)
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



if __name__ == "__main__":
    sys.exit(main())
