"""Markdown pieces shared by the report's pages (`tables.py`, `page.py`): links relative to
the page, pictures that exist, table cells, and the generic block for any result JSON."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

PathLike = str | os.PathLike


def ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


def mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def failure(message: str) -> str:
    return "OOM" if ("OutOfMemory" in message or "out of memory" in message) else "error"


def link(link_prefix: str, name: str) -> str:
    return quote(f"{link_prefix.rstrip('/')}/{name}" if link_prefix else name)


def link_prefix_of(results_dir: PathLike | None, link_prefix: str | None) -> str:
    if link_prefix is not None:
        return link_prefix
    return "" if results_dir is None else Path(results_dir).as_posix()


def image(alt: str, name: str, results_dir: PathLike | None, link_prefix: str | None) -> list[str]:
    """["", "![alt](prefix/name)"] when results_dir/name exists, else []."""
    if results_dir is None or not (Path(results_dir) / name).is_file():
        return []
    return ["", f"![{alt}]({link(link_prefix_of(results_dir, link_prefix), name)})"]


def relative_prefix(results_dir: PathLike, out_path: PathLike) -> str:
    """The link prefix from the folder of `out_path` to `results_dir`, POSIX style ("" if same)."""
    rel = os.path.relpath(os.path.abspath(results_dir), os.path.dirname(os.path.abspath(out_path)))
    return "" if rel == os.curdir else Path(rel).as_posix()


def cell(value: Any) -> str:
    """A Markdown table cell for a scalar."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def markdown_table(rows: Sequence[dict], first: str | None = None) -> list[str]:
    """The scalar fields of `rows` (columns in order of first appearance)."""
    columns = list(dict.fromkeys(k for r in rows for k, v in r.items() if is_scalar(v)))
    if first is not None:
        columns = [first] + [c for c in columns if c != first]
    if not columns:
        return []
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(c)) if is_scalar(r.get(c)) else "..." for c in columns) + " |")
    return lines


def generic_summary(data: Any, name: str, *, title: str | None = None, results_dir: PathLike | None = None,
                    link_prefix: str | None = None) -> str:
    """Any result JSON: its top-level scalars, then a table of the scalar fields of every list
    of dicts ("rows" first) and of every dict of dicts (one row per key), then `<name>.png`."""
    lines = [f"**{title or name}**"]
    if isinstance(data, list):
        data = {"rows": data}
    if not isinstance(data, dict):
        raise TypeError(f"expected a JSON object or list, got {type(data).__name__}")
    scalars = [f"{k} = {cell(v)}" for k, v in data.items() if is_scalar(v)]
    if scalars:
        lines[0] += " (" + ", ".join(scalars) + ")"
    keys = sorted(data, key=lambda k: k != "rows")
    for key in keys:
        value = data[key]
        if key == "env":
            continue
        table: list[str] = []
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            table = markdown_table(value)
        elif isinstance(value, dict) and value and all(isinstance(r, dict) for r in value.values()):
            table = markdown_table([{"name": k, **r} for k, r in value.items()], first="name")
        elif isinstance(value, dict) and value and all(is_scalar(v) for v in value.values()):
            lines += ["", f"`{key}`: " + ", ".join(f"{k} = {cell(v)}" for k, v in value.items())]
        if table:
            lines += ["", f"`{key}`:", ""] + table
    lines += image(name, f"{name}.png", results_dir, link_prefix)
    return "\n".join(lines)


def anchor(title: str) -> str:
    """GitHub's heading anchor."""
    return re.sub(r"[^\w\- ]", "", title.lower()).strip().replace(" ", "-")

