"""`sparse-attn report`: one Markdown page (optionally HTML) with the whole trade-off of a results
folder: speed and memory against length, fidelity, decoding, training and the evaluations.
Thin on purpose: the page is `sparse_attn.eval.report.write_report`."""

from __future__ import annotations

import argparse
import os

from ..eval.report import DEFAULT_TITLE, write_report

DEFAULT_RESULTS = os.path.join("benchmarks", "results")

DESCRIPTION = f"""\
Write one page that shows the whole trade-off, from the JSON and PNG files of a results folder
(what the benchmarks and `sparse-attn eval ... --json/--plot` write):

  Environment                  where each file was measured (its `env` or `config` field)
  Speed and memory vs length   layout_build*, cpu_patterns*, gpu_patterns* (merged), cpu_mechanisms*,
                               gpu_block_topk*, and their pictures
  Fidelity                     fidelity*, peers*
  Decoding                     decode*
  Training                     train_compare*
  Evaluation                   needle* (with its heatmap NAME.png), reach*, passkey*, mqar*, listops*,
                               hf_* (a real transformers model on sparse_attn schedules)
  Other files                  everything else, by name (pictures shown)

Each block names its file; a missing section or an unreadable file is a one-line note. Links are
relative to the report, so keep the report and the folder where they are (or use --html, which
embeds the pictures). Default folder: ./{DEFAULT_RESULTS}.
"""


def add_report_parser(subparsers, formatter=None) -> argparse.ArgumentParser:
    """Register `report` on `subparsers` (handler=cmd_report, parser=the subparser); returns it.
    `formatter`: the help formatter class (default: the one every sparse-attn command uses)."""
    # here, not at the top: main may import this module while it is being loaded
    from .main import _Formatter

    p = subparsers.add_parser("report", help="one Markdown page with every benchmark and evaluation result",
                              description=DESCRIPTION, formatter_class=formatter or _Formatter)
    p.add_argument("--results", metavar="DIR", default=None,
                   help=f"results folder (default: ./{DEFAULT_RESULTS} when it exists)")
    p.add_argument("--out", metavar="FILE.md", default="report.md", help="Markdown file to write (default: %(default)s)")
    p.add_argument("--title", metavar="T", default=DEFAULT_TITLE, help="page title (default: %(default)s)")
    p.add_argument("--html", action="store_true",
                   help="also write FILE.html beside FILE.md: the same page, pictures embedded, no dependencies")
    p.set_defaults(handler=cmd_report, parser=p)
    return p


def html_path(out: str) -> str:
    root, _ = os.path.splitext(out)
    return root + ".html"


def cmd_report(args) -> int:
    from .main import _check_output

    parser = args.parser
    results = args.results
    if results is None:
        if not os.path.isdir(DEFAULT_RESULTS):
            parser.error(f"no ./{DEFAULT_RESULTS} folder here ({os.getcwd()}): pass --results DIR")
        results = DEFAULT_RESULTS
    elif not os.path.isdir(results):
        parser.error(f"--results {results}: not a folder")
    _check_output(parser, "--out", args.out)
    html = html_path(args.out) if args.html else None
    if html is not None and os.path.abspath(html) == os.path.abspath(args.out):
        parser.error(f"--out {args.out}: --html writes {html}, the same file; give --out a .md name")
    write_report(results, args.out, title=args.title, html=html)
    print(f"wrote {args.out}")
    if html is not None:
        print(f"wrote {html}")
    return 0
