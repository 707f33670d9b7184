"""The one-page report (sparse_attn.report): sections from a small results folder, links
relative to the report and pointing at files that exist, notes instead of exceptions, the
README renderers' link prefix, HTML."""

import json
import re
import shutil
from pathlib import Path
from urllib.parse import unquote

import pytest

from sparse_attn import report
from sparse_attn.eval.needle import needle_grid
from sparse_attn.eval.reach import receptive_field

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
# The smallest valid PNG (1x1 grey pixel): the report links pictures, it never decodes them.
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010800000000"
                    "3a7e9b550000000a4944415478da63f80f00000101000518d84e0000000049454e44ae426082")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.fixture(scope="module")
def needle_dict():
    res = needle_grid(["causal", "sliding_window:window=8"], [32, 64], [0.0, 0.5, 1.0], heads=1, dim=8, trials=1,
                      progress=False)
    return res.to_dict()


@pytest.fixture
def results(tmp_path, needle_dict):
    folder = tmp_path / "results"
    folder.mkdir()
    for name in ("decode.json", "fidelity.json"):
        shutil.copy(RESULTS / name, folder / name)
    (folder / "decode.png").write_bytes(PNG)
    (folder / "needle.json").write_text(json.dumps(needle_dict))
    (folder / "needle.png").write_bytes(PNG)
    (folder / "reach.json").write_text(json.dumps(receptive_field(["sliding_window:window=4"] * 2, 32).to_dict()))
    (folder / "passkey.json").write_text(json.dumps({
        "task": "passkey", "steps": 20,
        "rows": [{"name": "dense", "length": 256, "accuracy": 1.0, "history": [3.1, 2.0]},
                 {"name": "window|64", "length": 512, "accuracy": 0.25, "history": [3.2, 2.5]}]}))
    (folder / "mqar.json").write_text(json.dumps({"results": {"dense": {"pairs": 8, "accuracy": 0.75},
                                                             "linear": {"pairs": 8, "accuracy": 0.5}}}))
    (folder / "mystery.json").write_text(json.dumps({"foo": 1}))
    (folder / "broken.json").write_text("{not json")
    (folder / "notes.txt").write_text("hello")
    (folder / "stray.png").write_bytes(PNG)
    return folder


def _section(text: str, title: str) -> str:
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _links(text: str) -> list[str]:
    return LINK.findall(text)


def test_report_sections_and_sources(results, tmp_path):
    out = tmp_path / "elsewhere" / "page.md"
    out.parent.mkdir()
    written = report.write_report(results, out, title="My run")
    assert written == [out]
    text = out.read_text()
    assert text.startswith("# My run\n")
    for title in ("Environment", "Speed and memory vs length", "Fidelity", "Decoding", "Training", "Evaluation",
                  "Other files"):
        assert f"\n## {title}\n" in text
        assert f"(#{report.anchor(title)})" in text  # contents

    env = _section(text, "Environment")
    assert "2.13.0+cpu" in env and "`decode.json`" in env and "`needle.json`" in env  # needle: from its config

    # sections without files are one-line notes
    assert _section(text, "Speed and memory vs length").strip().startswith("_Nothing for this section")
    assert _section(text, "Training").strip().startswith("_Nothing for this section")

    fidelity = _section(text, "Fidelity")
    assert "Source: [`fidelity.json`](../results/fidelity.json)." in fidelity
    assert "**Fidelity against dense softmax**" in fidelity and "| mechanism |" in fidelity

    decoding = _section(text, "Decoding")
    assert "Source: [`decode.json`](../results/decode.json)." in decoding
    assert "![decode](../results/decode.png)" in decoding

    evaluation = _section(text, "Evaluation")
    for name in ("needle.json", "reach.json", "passkey.json", "mqar.json"):
        assert f"Source: [`{name}`](../results/{name})." in evaluation
    assert "dense softmax (float64 reference)" in evaluation
    assert "| sliding_window:window=8 |" in evaluation and "| causal |" in evaluation
    assert "needle in a haystack: heads=1" in evaluation  # NeedleResult.summary() in a code block
    assert "![needle heatmaps (needle)](../results/needle.png)" in evaluation
    assert "**Receptive field**" in evaluation and "| 2 | `" in evaluation
    # generic rendering: scalar columns only, cells escaped
    assert "| name | length | accuracy |" in evaluation and "history" not in evaluation.split("passkey")[-1]
    assert "| window\\|64 | 512 | 0.25 |" in evaluation
    assert "| name | pairs | accuracy |" in evaluation and "| linear | 8 | 0.5 |" in evaluation

    others = _section(text, "Other files")
    assert "[`mystery.json`](../results/mystery.json): a JSON file no section knows" in others
    assert "`broken.json`" in others and "not readable as JSON" in others
    assert "[`notes.txt`](../results/notes.txt)" in others
    assert "![stray](../results/stray.png)" in others
    assert "decode.png" not in others and "needle.png" not in others  # shown once, where they belong


def test_links_are_relative_and_exist(results, tmp_path):
    for out in (tmp_path / "a" / "b" / "report.md", results / "report.md", tmp_path / "report.md"):
        out.parent.mkdir(parents=True, exist_ok=True)
        text = report.write_report(results, out)[0].read_text()
        links = [link for link in _links(text) if not link.startswith("#")]
        assert any(link.endswith("needle.png") for link in links)
        for link in links:
            assert not Path(unquote(link)).is_absolute() and "://" not in link
            assert (out.parent / unquote(link)).exists(), link
    inside = (results / "report.md").read_text()
    assert "![decode](decode.png)" in inside  # same folder: bare names


def test_folder_with_spaces_is_quoted(results, tmp_path):
    spaced = tmp_path / "my results"
    shutil.copytree(results, spaced)
    out = tmp_path / "report.md"
    text = report.write_report(spaced, out)[0].read_text()
    assert "![decode](my%20results/decode.png)" in text
    for link in _links(text):
        if not link.startswith("#"):
            assert (out.parent / unquote(link)).exists()


def test_missing_and_broken_files_are_notes(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    text = report.report_markdown(empty)
    assert text.count("_Nothing for this section") == 5
    assert "_No environment recorded" in text
    assert "_None: every file of the results folder is shown above._" in text

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "decode.json").write_text(json.dumps({"rows": []}))  # no env / setup
    (bad / "needle.json").write_text(json.dumps({"lengths": [1]}))
    (bad / "fidelity.json").write_text("[")
    text = report.report_markdown(bad)
    assert "_Skipped `decode.json`: could not render it (KeyError: 'env')._" in text
    assert "_Skipped `needle.json`: could not render it (ValueError: not a NeedleResult dict" in text
    assert "_Skipped `fidelity.json`: not readable as JSON" in text

    with pytest.raises(FileNotFoundError, match="not a folder"):
        report.report_markdown(tmp_path / "nowhere")


def test_renderers_take_the_results_folder_and_link_prefix(results, tmp_path):
    data = json.loads((results / "decode.json").read_text())
    assert "![decode](x/y/decode.png)" in report.decode_table(data, results_dir=results, link_prefix="x/y")
    assert f"![decode]({results.as_posix()}/decode.png)" in report.decode_table(data, results_dir=results)
    assert "![" not in report.decode_table(data)  # no folder: no picture
    assert "![" not in report.decode_table(data, "decode_gpu", results_dir=results)  # no decode_gpu.png there
    fid = json.loads((results / "fidelity.json").read_text())
    assert "![" not in report.fidelity_table(fid, results_dir=results)  # no fidelity.png there
    (results / "fidelity.png").write_bytes(PNG)
    assert report.fidelity_table(fid, results_dir=results, link_prefix="").endswith("![fidelity](fidelity.png)")

    page = report.render(results, link_prefix="benchmarks/results")
    assert "**Decoding with caches**" in page and "**Fidelity against dense softmax**" in page
    assert "![decode](benchmarks/results/decode.png)" in page
    assert "**GPU, patterns" not in page  # no gpu_patterns*.json in the folder


def test_gpu_results_merge_and_plot(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    shutil.copy(RESULTS / "gpu_patterns_32k.json", folder)
    text = report.report_markdown(folder, link_prefix="")
    speed = _section(text, "Speed and memory vs length")
    assert "Source: [`gpu_patterns_32k.json`](gpu_patterns_32k.json)." in speed
    assert "**GPU, patterns vs FlexAttention and SDPA**" in speed and "![" not in speed
    pytest.importorskip("matplotlib")
    out = report.gpu_plot(report.gpu_files(folder), folder / report.GPU_PLOT)
    assert out.read_bytes()[:8] == PNG[:8]
    speed = _section(report.report_markdown(folder, link_prefix=""), "Speed and memory vs length")
    assert "![GPU time against length](gpu_patterns.png)" in speed


def test_gpu_phase_table_appears_with_backward_timings(tmp_path):
    data = json.loads((RESULTS / "gpu_patterns_32k.json").read_text())
    path = tmp_path / "gpu_patterns_32k.json"
    path.write_text(json.dumps(data))
    assert report.gpu_phase_table([path]) == ""  # no run timed the backward alone
    for r in data["rows"]:
        if r["method"] in ("sparse_attn_triton", "flexattention") and "fwd_bwd_ms" in r:
            r["bwd_ms"] = r["fwd_bwd_ms"] - r["fwd_ms"]
    path.write_text(json.dumps(data))
    table = report.gpu_phase_table([path])
    tri = next(r for r in data["rows"] if r["method"] == "sparse_attn_triton" and "bwd_ms" in r)
    fa = next(r for r in data["rows"] if r["method"] == "flexattention" and r["pattern"] == tri["pattern"]
              and r["N"] == tri["N"])
    assert table.startswith("**Per phase: triton against FlexAttention**")
    assert f"{fa['bwd_ms'] / tri['bwd_ms']:.2f}x" in table
    assert "**Per phase" in report.render(tmp_path)


def test_generic_summary():
    text = report.generic_summary([{"a": 1, "b": [1, 2]}, {"a": 2.5, "c": None}], "things", title="Things")
    assert text.splitlines()[0] == "**Things**"
    assert "| a | c |" in text and "| 1 | - |" in text and "| 2.5 | - |" in text
    text = report.generic_summary({"task": "listops", "config": {"steps": 10, "dim": 32}, "rows": []}, "listops")
    assert "(task = listops)" in text and "`config`: steps = 10, dim = 32" in text


def test_html_is_one_self_contained_page(results, tmp_path):
    out, page = tmp_path / "report.md", tmp_path / "report.html"
    assert report.write_report(results, out, title="T <1>", html=page) == [out, page]
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and "<title>T &lt;1&gt;</title>" in html
    assert '<h2 id="fidelity">Fidelity</h2>' in html and "<table>" in html and "<pre><code>" in html
    assert html.count("data:image/png;base64,") == 3  # decode, needle, stray: embedded
    assert "![" not in html and "](" not in html.split("<pre>")[0]  # no Markdown left outside code
    assert '<a href="results/decode.json"><code>decode.json</code></a>' in html
    assert "<td>window|64</td>" in html


def test_html_without_markdown_names_the_extra(results, tmp_path, monkeypatch):
    from sparse_attn._extras import MissingExtra

    monkeypatch.setitem(__import__("sys").modules, "markdown", None)  # as if not installed
    with pytest.raises(MissingExtra, match=r"sparse_attn\[report\]"):
        report.markdown_to_html("# x")
