"""Render the README's benchmark tables from benchmarks/results/*.json.

    python benchmarks/tables.py                         # print the Markdown
    python benchmarks/tables.py --write-readme          # replace the block between the markers in README.md
    python benchmarks/tables.py --write-readme --plot   # also draw benchmarks/results/gpu_patterns.png

GPU pattern results may be split over several runs: every benchmarks/results/gpu_patterns*.json
(or the files given with --gpu-json) is merged, a later file's row replacing an earlier one for
the same (pattern, N, method) unless only the earlier one has timings.

The renderers live in sparse_attn.report (which also writes the one-page report,
`sparse-attn report`); this script binds them to this repository's results folder and README.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from sparse_attn import report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
LINKS = "benchmarks/results"  # image links in the README, relative to the repository root
START, END = "<!-- tables:start -->", "<!-- tables:end -->"
GPU_PLOT = RESULTS / report.GPU_PLOT


def gpu_files() -> list[Path]:
    return report.gpu_files(RESULTS)


def gpu_plot(paths: Sequence[Path], out: Path = GPU_PLOT) -> Path:
    return report.gpu_plot(paths, out)


def render(gpu_paths: Sequence[Path] = ()) -> str:
    return report.render(RESULTS, gpu_paths=gpu_paths, link_prefix=LINKS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write-readme", action="store_true")
    ap.add_argument("--plot", action="store_true", help=f"draw {GPU_PLOT.relative_to(ROOT)} from the GPU results")
    ap.add_argument("--gpu-json", type=Path, nargs="+", default=None,
                    help="GPU pattern results to merge (default: benchmarks/results/gpu_patterns*.json)")
    args = ap.parse_args(argv)
    gpu_paths = args.gpu_json if args.gpu_json is not None else gpu_files()
    if args.plot:
        if not gpu_paths:
            print("no GPU results to plot (benchmarks/results/gpu_patterns*.json)", file=sys.stderr)
            return 1
        print(f"wrote {gpu_plot(gpu_paths)}", file=sys.stderr)
    text = render(gpu_paths)
    if not args.write_readme:
        print(text)
        return 0
    readme = ROOT / "README.md"
    content = readme.read_text()
    if START not in content or END not in content:
        print(f"README.md has no {START} ... {END} block", file=sys.stderr)
        return 1
    head, rest = content.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
