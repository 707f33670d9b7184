"""One page with the whole trade-off: speed and memory against length, fidelity, decoding,
training and the evaluations, from the JSON (and PNG) files of a results folder.

    from sparse_attn.report import write_report
    write_report("benchmarks/results", "report.md")          # sparse-attn report does this
    write_report("benchmarks/results", "report.md", html="report.html")   # + one self-contained HTML file

The page has the sections Environment, Speed and memory vs length, Fidelity, Decoding, Training,
Evaluation (one block per result file of each registered evaluation, `sparse_attn.eval.registry`,
rendered by the evaluation itself) and Other files. Each block says which file it came from; a
section with no file, or a file that cannot be rendered, becomes a one-line note: writing the
report never fails because of what is (not) in the folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..eval.registry import Evaluation, evaluations
from . import tables
from .html import markdown_to_html
from .text import PathLike, anchor, cell, generic_summary, image, is_scalar, link, link_prefix_of, relative_prefix

DEFAULT_TITLE = "sparse_attn report: speed, memory and fidelity"

_Renderer = Callable[..., str]


def _stem_renderer(fn: _Renderer) -> _Renderer:
    return lambda data, path, **kw: fn(data, path.stem, **kw)


def _data_renderer(fn: _Renderer) -> _Renderer:
    return lambda data, path, **kw: fn(data, **kw)


# (section, JSON globs with their renderer, PNG globs that belong to the section); the
# Evaluation section comes from the evaluation registry (`evaluation_section`).
SECTIONS: list[tuple[str, list[tuple[str, _Renderer | None]], list[str]]] = [
    ("Speed and memory vs length", [
        ("layout_build*.json", _data_renderer(tables.layout_table)),
        ("cpu_patterns*.json", _data_renderer(tables.cpu_table)),
        ("gpu_patterns*.json", None),  # merged into one table
        ("cpu_mechanisms*.json", _data_renderer(tables.mechanisms_table)),
        ("gpu_block_topk*.json", _data_renderer(tables.block_topk_gpu_table)),
        ("gpu_padded*.json", _data_renderer(tables.padded_gpu_table)),
    ], ["gpu_patterns*.png", "cpu_*.png", "layout_build*.png", "gpu_block_topk*.png"]),
    ("Fidelity", [
        ("fidelity*.json", _data_renderer(tables.fidelity_table)),
        ("peers*.json", _data_renderer(tables.peers_table)),
    ], ["fidelity*.png", "peers*.png"]),
    ("Decoding", [("decode*.json", _stem_renderer(tables.decode_table))], ["decode*.png"]),
    ("Training", [("train_compare*.json", _stem_renderer(tables.train_compare_table))], ["train_compare*.png"]),
]


class Blocks:
    """What an evaluation's renderer gets (`eval.registry.ReportBlocks`): pictures of this
    results folder linked with this page's prefix, table cells, the generic block."""

    def __init__(self, results_dir: PathLike | None, link_prefix: str | None) -> None:
        self.results_dir, self.link_prefix = results_dir, link_prefix

    def image(self, alt: str, file: str) -> list[str]:
        return image(alt, file, self.results_dir, self.link_prefix)

    def cell(self, value: Any) -> str:
        return cell(value)

    def generic(self, data: Any, name: str, title: str | None = None) -> str:
        return generic_summary(data, name, title=title, results_dir=self.results_dir, link_prefix=self.link_prefix)


def _evaluation_renderer(evaluation: Evaluation) -> _Renderer:
    def render(data, path, *, results_dir=None, link_prefix=None):
        return evaluation.render(data, path.stem, Blocks(results_dir, link_prefix))

    return render


def evaluation_section() -> tuple[list[tuple[str, _Renderer]], list[str]]:
    """The Evaluation section's (JSON glob, renderer) pairs and picture globs, from the registry."""
    globs, pictures = [], []
    for evaluation in evaluations().values():
        globs += [(glob, _evaluation_renderer(evaluation)) for glob in evaluation.json_globs()]
        pictures += evaluation.picture_globs()
    return globs, pictures


_ENV_COLUMNS = ("device", "gpu", "torch", "triton", "cuda", "python", "threads")
_ENV_SKIP = {"platform", "date", "first_run", "gpu_memory_bytes", "cpu_count", "device_name"}  # device_name: gpu or cpu


class _Page:
    def __init__(self, results_dir: PathLike, link_prefix: str) -> None:
        self.dir = Path(results_dir)
        self.prefix = link_prefix
        self.files = sorted(p for p in self.dir.iterdir() if p.is_file() and not p.name.startswith("."))
        self.data: dict[str, Any] = {}
        self.unreadable: dict[str, str] = {}
        for p in self.files:
            if p.suffix == ".json":
                try:
                    self.data[p.name] = json.loads(p.read_text())
                except (OSError, ValueError) as exc:
                    self.unreadable[p.name] = f"{type(exc).__name__}: {exc}"
        self.used: set[str] = set()  # JSON files rendered (or tried)
        self.shown: set[str] = set()  # pictures linked

    def link(self, name: str) -> str:
        return link(self.prefix, name)

    def source(self, names: Sequence[str]) -> str:
        return "Source: " + ", ".join(f"[`{n}`]({self.link(n)})" for n in names) + "."

    def matching(self, pattern: str, suffix: str) -> list[Path]:
        return [p for p in self.files if p.suffix == suffix and p.match(pattern)]

    def note_images(self, text: str) -> None:
        for p in self.files:
            if p.suffix == ".png" and f"({self.link(p.name)})" in text:
                self.shown.add(p.name)

    def block(self, names: Sequence[str], render: Callable[[], str]) -> list[str]:
        """A rendered block under its source line, or a one-line note if it fails."""
        self.used.update(names)
        bad = [n for n in names if n in self.unreadable]
        if bad:
            return [f"_Skipped {', '.join(f'`{n}`' for n in bad)}: not readable as JSON ({self.unreadable[bad[0]]})._"]
        try:
            text = render()
        except Exception as exc:  # noqa: BLE001 - a report never fails because of one file
            return [(f"_Skipped {', '.join(f'`{n}`' for n in names)}: could not render it "
                    f"({type(exc).__name__}: {exc})._")]
        self.note_images(text)
        return [self.source(names), "", text]

    def images(self, patterns: Sequence[str]) -> list[str]:
        out = []
        for pattern in patterns:
            for p in self.matching(pattern, ".png"):
                if p.name not in self.shown:
                    self.shown.add(p.name)
                    out += [self.source([p.name]), "", f"![{p.stem}]({self.link(p.name)})"]
        return out

    def environment(self) -> list[str]:
        groups: dict[tuple, dict] = {}
        for name, data in self.data.items():
            env = data.get("env") if isinstance(data, dict) else None
            if not isinstance(env, dict):  # evaluation results record theirs in `config`
                cfg = data.get("config") if isinstance(data, dict) else None
                env = cfg if isinstance(cfg, dict) and "torch" in cfg else None
            if env is None:
                continue
            key = tuple(cell(env.get(c)) if is_scalar(env.get(c)) else "-" for c in _ENV_COLUMNS)
            g = groups.setdefault(key, {"files": [], "dates": [], "other": {}})
            g["files"].append(name)
            if isinstance(env.get("date"), str):
                g["dates"].append(env["date"])
            if "env" in data:
                for k, v in env.items():
                    if k not in _ENV_COLUMNS and k not in _ENV_SKIP and is_scalar(v):
                        g["other"].setdefault(f"{k} {cell(v)}", []).append(name)
        if not groups:
            return ["_No environment recorded: no JSON file with an `env` field._"]
        lines = [("Where each result file was measured (from the `env` field of benchmark results, the "
                 "`config` of evaluation results)."), "",
                 "| " + " | ".join(_ENV_COLUMNS) + " | dates | other | files |",
                 "|" + "---|" * (len(_ENV_COLUMNS) + 3)]
        for key, g in groups.items():
            dates = sorted(g["dates"])
            when = "-" if not dates else dates[0] if dates[0] == dates[-1] else f"{dates[0]} .. {dates[-1]}"
            other = "; ".join(f"{k} (`{'`, `'.join(names)}`)" if len(names) < len(g["files"]) else k
                              for k, names in g["other"].items()) or "-"
            files = ", ".join(f"`{n}`" for n in g["files"])
            lines.append("| " + " | ".join(key) + f" | {when} | {other} | {files} |")
        return lines

    def section(self, patterns: Sequence[tuple[str, _Renderer | None]], pictures: Sequence[str]) -> list[str]:
        kw = {"results_dir": self.dir, "link_prefix": self.prefix}
        parts: list[list[str]] = []
        for pattern, fn in patterns:
            paths = [p for p in self.matching(pattern, ".json") if p.name not in self.used]
            if not paths:
                continue
            if fn is None:  # GPU pattern results: one table merged over every run
                names = [p.name for p in paths]
                parts.append(self.block(names, lambda paths=paths: tables.gpu_table(paths, **kw)))
                continue
            for p in paths:
                parts.append(self.block([p.name], lambda p=p, fn=fn: fn(self.data[p.name], p, **kw)))
        extra = self.images(pictures)
        if extra:
            parts.append(extra)
        if not parts:
            looked = ", ".join(f"`{g}`" for g, _ in patterns)
            return [f"_Nothing for this section in the results folder (looked for {looked})._"]
        out: list[str] = []
        for part in parts:
            out += ([""] if out else []) + part
        return out

    def others(self) -> list[str]:
        lines = []
        for p in self.files:
            if p.suffix == ".json" and p.name not in self.used:
                why = f" (not readable as JSON: {self.unreadable[p.name]})" if p.name in self.unreadable else ""
                lines.append(f"- [`{p.name}`]({self.link(p.name)}): a JSON file no section knows{why}")
            elif p.suffix not in (".json", ".png"):
                lines.append(f"- [`{p.name}`]({self.link(p.name)})")
        pictures = [p for p in self.files if p.suffix == ".png" and p.name not in self.shown]
        for p in pictures:
            lines += ["", self.source([p.name]), "", f"![{p.stem}]({self.link(p.name)})"]
            self.shown.add(p.name)
        return lines or ["_None: every file of the results folder is shown above._"]


def report_markdown(results_dir: PathLike, *, link_prefix: str | None = None, title: str = DEFAULT_TITLE,
                    source_label: str | None = None) -> str:
    """The report page as Markdown. Image and file links are `link_prefix/NAME` (default: the
    folder as given); `source_label` names the folder in the introduction (default: the same)."""
    results = Path(results_dir)
    if not results.is_dir():
        raise FileNotFoundError(f"results_dir {str(results_dir)!r}: not a folder")
    prefix = link_prefix_of(results, link_prefix)
    page = _Page(results, prefix)
    label = source_label if source_label is not None else results.as_posix()
    sections: list[tuple[str, list[str]]] = [("Environment", page.environment())]
    for name, patterns, pictures in SECTIONS + [("Evaluation", *evaluation_section())]:
        sections.append((name, page.section(patterns, pictures)))
    sections.append(("Other files", page.others()))
    lines = [
        f"# {title}",
        "",
        (f"Made by `sparse-attn report` from the {len(page.files)} files of `{label}`: the benchmark results "
         "(time and peak memory against length, error against dense attention), decoding and training runs, and the "
         "long-context evaluations, so the whole trade-off between speed, memory and fidelity is on one page. "
         "Each block names the file it comes from."),
        "",
    ]
    lines += [f"- [{name}](#{anchor(name)})" for name, _ in sections]
    for name, body in sections:
        lines += ["", f"## {name}", ""] + body
    return "\n".join(lines) + "\n"


def write_report(results_dir: PathLike, out_path: PathLike, *, title: str = DEFAULT_TITLE,
                 html: PathLike | None = None) -> list[Path]:
    """Write the report of `results_dir` to `out_path` (Markdown, links relative to its folder)
    and, when `html` is a path, the same page as one self-contained HTML file (pictures
    embedded). Returns the paths written. Raises FileNotFoundError if `results_dir` is not a
    folder; anything missing or unreadable inside it is a note on the page, not an error."""
    out = Path(out_path)
    text = report_markdown(results_dir, link_prefix=relative_prefix(results_dir, out), title=title)
    out.write_text(text)
    written = [out]
    if html is not None:
        html_path = Path(html)
        html_path.write_text(markdown_to_html(text, base_dir=out.parent, title=title))
        written.append(html_path)
    return written
