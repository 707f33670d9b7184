"""Render the README's benchmark tables from benchmarks/results/*.json.

    python benchmarks/tables.py                 # print the Markdown
    python benchmarks/tables.py --write-readme  # replace the block between the markers in README.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- tables:start -->", "<!-- tables:end -->"


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


def _mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def layout_table(data: dict) -> str:
    env = data["env"]
    lines = [
        f"**Layout construction** (`python benchmarks/layout_build.py`; torch {env['torch']}, {env['threads']} threads). "
        "Median of 5 fresh builds; peak = torch allocations during one build. For scale: a dense bool mask at "
        "1,048,576 tokens is 1 TiB.",
        "",
        "| pattern (W=4096) | N | block | build ms | non-empty blocks | layout MiB | peak MiB during build |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(f"| {r['pattern']} | {r['N']:,} | {r['block']} | {r['build_s'] * 1e3:.0f} | {r['nnz_blocks']:,} | "
                     f"{r['layout_bytes'] / 2**20:.1f} | {_mib(r.get('peak_build_bytes'))} |")
    return "\n".join(lines)


def cpu_table(data: dict) -> str:
    env = data["env"]
    lines = [
        f"**CPU, patterns vs FlexAttention and SDPA** (`python benchmarks/cpu_patterns.py`; B=1, H=8, D=64, fp32; "
        f"torch {env['torch']}, {env['threads']} threads, one process). `blocked` = our CPU backend through "
        "`sparse_attention(q, k, v, pattern)`; `flex` = `torch.compile(flex_attention)` on CPU with a BlockMask of the "
        "same pattern (128-blocks, from our layout); `SDPA+mask` = SDPA with the dense bool mask. Times are medians "
        "(torch.utils.benchmark). 1st call includes layout + plan for `blocked`, compile for `flex`. "
        "Effective TFLOP/s = 4·B·H·D·(allowed pairs) / time. Peak = torch allocations during one forward beyond "
        "the inputs. Error = max abs vs the float64 reference on the first and last 128 queries.",
        "",
        "| N | pattern | density | blocked ms | flex ms | flex / blocked | SDPA+mask ms | blocked fwd+bwd ms | "
        "blocked 1st call ms | flex 1st call s | eff. TFLOP/s | peak MiB | max err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        ratio = f"{r['blocked_vs_flex']:.2f}x" if "blocked_vs_flex" in r else "-"
        first_flex = f"{r['flex_first_call_s']:.1f}" if "flex_first_call_s" in r else "-"
        lines.append(
            f"| {r['N']:,} | {r['pattern']} | {r['density']:.4f} | {_ms(r['blocked_fwd_s'])} | {_ms(r.get('flex_fwd_s'))} | "
            f"{ratio} | {_ms(r.get('sdpa_mask_fwd_s'))} | {_ms(r.get('blocked_fwd_bwd_s'))} | "
            f"{_ms(r['blocked_first_call_s'])} | {first_flex} | {r['effective_tflops']:.3f} | "
            f"{_mib(r.get('blocked_peak_beyond_inputs_bytes'))} | {r['blocked_max_err']:.1e} |")
    return "\n".join(lines)


def render() -> str:
    parts = []
    for name, fn in (("layout_build.json", layout_table), ("cpu_patterns.json", cpu_table)):
        path = RESULTS / name
        if path.exists():
            parts.append(fn(json.loads(path.read_text())))
    return "\n\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write-readme", action="store_true")
    args = ap.parse_args(argv)
    text = render()
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
