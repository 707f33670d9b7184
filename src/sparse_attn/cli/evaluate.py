"""`sparse-attn eval TASK`: one subcommand per registered evaluation (`sparse_attn.eval.registry`;
the built-in ones and their flags: `sparse_attn/eval/evaluations.py`), with small defaults that
finish on a CPU in minutes and flags for full-size runs.

Each prints a summary, writes --json and --plot on request, and exits 0 / 1 (run-time failure)
/ 2 (bad arguments) like every sparse-attn command. Thin on purpose: the work is in eval/.
"""

from __future__ import annotations

import argparse
import sys
import time

from ..eval.registry import Evaluation, evaluations
from .args import PROG, Formatter, check_device, check_output, require_matplotlib, write_json


def _description() -> str:
    tasks = [e for e in evaluations().values() if e.command]
    width = max(len(e.name) for e in tasks)
    lines = "\n".join(f"    {e.name:<{width}}  {e.help}" for e in tasks)
    return (f"The long-context evaluations of sparse_attn.eval, one subcommand each:\n\n{lines}\n\n"
            "Each prints a summary, writes --json and --plot on request, and exits 0 / 1 (run-time failure)\n"
            "/ 2 (bad arguments) like every sparse-attn command.")


def _common(p: argparse.ArgumentParser, *, device: bool, plot: bool) -> None:
    if device:
        p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything random (default: %(default)s)")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON")
    if plot:
        p.add_argument("--plot", metavar="FILE", help="write a picture (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress on stderr (a bar on a terminal, else a line every 10 s)")


def add_eval_parser(subparsers, formatter=Formatter) -> argparse.ArgumentParser:
    """Register `sparse-attn eval` and a subcommand for every evaluation in the registry now."""
    tasks = [e for e in evaluations().values() if e.command]
    p = subparsers.add_parser("eval", help=f"long-context evaluations: {', '.join(e.name for e in tasks)}",
                              description=_description(), formatter_class=formatter)
    sub = p.add_subparsers(dest="task", required=True, metavar="TASK")
    for evaluation in tasks:
        t = sub.add_parser(evaluation.name, help=evaluation.help, description=evaluation.description,
                           formatter_class=formatter)
        evaluation.add_arguments(t)
        _common(t, device=evaluation.device, plot=evaluation.draws_pictures())
        t.set_defaults(handler=cmd_eval, parser=t, evaluation=evaluation)
    return p


def cmd_eval(args) -> int:
    evaluation: Evaluation = args.evaluation
    parser = args.parser
    if evaluation.device:
        check_device(args.device, parser)
    check_output(parser, "--json", args.json)
    plot = getattr(args, "plot", None)
    check_output(parser, "--plot", plot)
    if plot:
        require_matplotlib()
    started = time.perf_counter()
    result = evaluation.run(args, parser)
    print(evaluation.summary(result, time.perf_counter() - started))
    if args.json:
        write_json(args.json, result.to_dict())
    if plot:
        evaluation.plot(result, plot)
        print(f"wrote {plot}")
    failure = evaluation.failure(result)
    if failure:
        print(f"{PROG}: error: {failure}", file=sys.stderr)
        return 1
    return 0
