"""`sparse-attn report`: one Markdown page (optionally HTML) with the whole trade-off of a results
folder: speed and memory against length, fidelity, decoding, training and the evaluations.
Thin on purpose: the page is `sparse_attn.report.write_report`."""

from __future__ import annotations

import argparse
import os

from .._extras import markdown_module
from ..report import DEFAULT_TITLE, write_report
from .args import Formatter, check_output

DEFAULT_RESULTS = os.path.join("benchmarks", "results")

_DESCRIPTION = """\
Write one page that shows the whole trade-off, from the JSON and PNG files of a results folder
(what the benchmarks and `sparse-attn eval ... --json/--plot` write):

  Environment                  where each file was measured (its `env` or `config` field)
  Speed and memory vs length   layout_build*, cpu_patterns*, gpu_patterns* (merged), cpu_mechanisms*,
                               gpu_block_topk*, and their pictures
  Fidelity                     fidelity*, peers*
  Decoding                     decode*
  Training                     train_compare*
  Evaluation                   {evaluations} (each rendered by its
                               evaluation, sparse_attn.eval.registry, with its picture NAME.png)
  Other files                  everything else, by name (pictures shown)

Each block names its file; a missing section or an unreadable file is a one-line note. Links are
relative to the report, so keep the report and the folder where they are (or use --html, which
embeds the pictures). Default folder: ./{results}.
"""


def _description() -> str:
    """The registry as it is now: evaluations registered later get their files listed too."""
    from ..eval.registry import evaluations

    globs = [glob.removesuffix(".json") for e in evaluations().values() for glob in e.json_globs()]
    return _DESCRIPTION.format(evaluations=", ".join(globs), results=DEFAULT_RESULTS)


def add_report_parser(subparsers, formatter=None) -> argparse.ArgumentParser:
    """Register `report` on `subparsers` (handler=cmd_report, parser=the subparser); returns it.
    `formatter`: the help formatter class (default: the one every sparse-attn command uses)."""
    p = subparsers.add_parser("report", help="one Markdown page with every benchmark and evaluation result",
                              description=_description(), formatter_class=formatter or Formatter)
    p.add_argument("--results", metavar="DIR", default=None,
                   help=f"results folder (default: ./{DEFAULT_RESULTS} when it exists)")
    p.add_argument("--out", metavar="FILE.md", default="report.md", help="Markdown file to write (default: %(default)s)")
    p.add_argument("--title", metavar="T", default=DEFAULT_TITLE, help="page title (default: %(default)s)")
    p.add_argument("--html", action="store_true",
                   help="also write FILE.html beside FILE.md: the same page, pictures embedded (needs the markdown "
                        "package: pip install 'sparse_attn[report]')")
    p.set_defaults(handler=cmd_report, parser=p)
    return p


def html_path(out: str) -> str:
    root, _ = os.path.splitext(out)
    return root + ".html"


def cmd_report(args) -> int:
    parser = args.parser
    results = args.results
    if results is None:
        if not os.path.isdir(DEFAULT_RESULTS):
            parser.error(f"no ./{DEFAULT_RESULTS} folder here ({os.getcwd()}): pass --results DIR")
        results = DEFAULT_RESULTS
    elif not os.path.isdir(results):
        parser.error(f"--results {results}: not a folder")
    check_output(parser, "--out", args.out)
    html = html_path(args.out) if args.html else None
    if html is not None and os.path.abspath(html) == os.path.abspath(args.out):
        parser.error(f"--out {args.out}: --html writes {html}, the same file; give --out a .md name")
    if html is not None:
        markdown_module()  # missing: exit 1 naming the extra, before any file is written
    write_report(results, args.out, title=args.title, html=html)
    print(f"wrote {args.out}")
    if html is not None:
        print(f"wrote {html}")
    return 0
