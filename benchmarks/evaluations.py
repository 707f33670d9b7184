"""Run a registered evaluation (`sparse_attn.eval.registry`: the built-in ones and any registered
before `main` is called) into the results folder, where `sparse-attn report` finds it.

    python benchmarks/evaluations.py --list                      # every evaluation, one line each
    python benchmarks/evaluations.py needle --lengths 256 1024   # -> results/needle.json + needle.png
    python benchmarks/evaluations.py reach --mechanisms sliding_window:window=512 --layers 12 --length 32768

Flags after the name are the evaluation's own (`sparse-attn eval NAME --help`); --json and
--plot default to results/NAME.json and results/NAME.png (a picture when the evaluation draws one
and matplotlib is there).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402

from sparse_attn.cli.main import main as sparse_attn_main  # noqa: E402
from sparse_attn.eval.registry import evaluations  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="list the registered evaluations and exit")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the result files (default: %(default)s)")
    ap.add_argument("name", nargs="?", help="the evaluation to run")
    args, flags = ap.parse_known_args(argv)
    tasks = {name: e for name, e in evaluations().items() if e.command}
    if args.list:
        width = max(map(len, tasks))
        print("\n".join(f"{name:<{width}}  {e.help}" for name, e in tasks.items()))
        return 0
    if args.name not in tasks:
        ap.error(f"name must be one of {', '.join(tasks)} (--list), got {args.name!r}")
    args.results.mkdir(parents=True, exist_ok=True)
    if "--json" not in flags:
        flags += ["--json", str(args.results / f"{args.name}.json")]
    drawn = tasks[args.name].draws_pictures() and importlib.util.find_spec("matplotlib") is not None
    if "--plot" not in flags and drawn:
        flags += ["--plot", str(args.results / f"{args.name}.png")]
    return sparse_attn_main(["eval", args.name, *flags])


if __name__ == "__main__":
    sys.exit(main())
