"""The report page as one self-contained HTML file: Python-Markdown (the `report` extra) turns
the Markdown into HTML (tables, fenced code, headings with the anchors the contents list links
to), and every PNG found beside the page is embedded as a data URI, so the file stands alone."""

from __future__ import annotations

import base64
import html
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from urllib.parse import unquote

from .._extras import markdown_module
from .text import PathLike, anchor

_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;line-height:1.45}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em;display:block;overflow-x:auto}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left}th{background:#f3f3f3}
code{background:#f5f5f5;padding:0 .2em}pre{background:#f5f5f5;padding:.6em;overflow-x:auto;font-size:.85em}
img{max-width:100%}"""


def _embed_pictures(root: ElementTree.Element, base_dir: Path | None) -> None:
    """<img src="x.png"> -> a data URI when base_dir/x.png exists (links are relative to the page)."""
    if base_dir is None:
        return
    for img in root.iter("img"):
        path = base_dir / unquote(img.get("src", ""))
        if path.suffix.lower() == ".png" and path.is_file():
            img.set("src", "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii"))


def markdown_to_html(text: str, *, base_dir: PathLike | None = None, title: str = "") -> str:
    """`text` (Markdown) as one HTML page titled `title`; PNG images found under `base_dir` are
    embedded. Raises MissingExtra when the markdown package is not installed."""
    markdown = markdown_module()
    base = None if base_dir is None else Path(base_dir)

    class EmbedPictures(markdown.treeprocessors.Treeprocessor):
        def run(self, root):
            _embed_pictures(root, base)

    class Extension(markdown.extensions.Extension):
        def extendMarkdown(self, md):  # noqa: N802 (Python-Markdown's name)
            md.treeprocessors.register(EmbedPictures(md), "embed_pictures", 0)

    converter = markdown.Markdown(
        extensions=["tables", "fenced_code", "toc", Extension()],
        extension_configs={"toc": {"slugify": lambda value, separator: anchor(value)}})
    body = converter.convert(text)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>\n{_CSS}\n</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")
