"""`sparse-attn report` through `sparse_attn.cli.report`: a parser built here with
add_report_parser (as main.py registers it), exit codes 0 / 2, the files written."""

import argparse
import json
import shutil
from pathlib import Path

import pytest

from sparse_attn.cli.report import add_report_parser, cmd_report

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-attn")
    sub = parser.add_subparsers(dest="command", required=True)
    p = add_report_parser(sub)
    assert p.get_default("handler") is cmd_report and p.get_default("parser") is p
    return parser


def run(capsys, *argv):
    """What main() does: parse, call the handler; argparse errors exit 2."""
    try:
        args = _parser().parse_args(list(argv))
        code = int(args.handler(args) or 0)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    shutil.copy(RESULTS / "decode.json", folder)
    (folder / "decode.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / "mystery.json").write_text(json.dumps({"x": 1}))
    return folder


def test_report_end_to_end(capsys, results, tmp_path):
    out = tmp_path / "page.md"
    code, stdout, err = run(capsys, "report", "--results", str(results), "--out", str(out), "--title", "Run 7")
    assert code == 0, err
    assert stdout == f"wrote {out}\n" and err == ""
    text = out.read_text()
    assert text.startswith("# Run 7\n")
    assert "Source: [`decode.json`](results/decode.json)." in text
    assert "![decode](results/decode.png)" in text
    assert "[`mystery.json`](results/mystery.json): a JSON file no section knows" in text
    assert not out.with_suffix(".html").exists()


def test_report_html(capsys, results, tmp_path):
    out = tmp_path / "page.md"
    code, stdout, err = run(capsys, "report", "--results", str(results), "--out", str(out), "--html")
    assert code == 0, err
    html = tmp_path / "page.html"
    assert stdout == f"wrote {out}\nwrote {html}\n"
    assert "<table>" in html.read_text() and "data:image/png;base64," in html.read_text()

    code, _, err = run(capsys, "report", "--results", str(results), "--out", str(tmp_path / "page.html"), "--html")
    assert code == 2 and "the same file" in err


def test_default_results_folder(capsys, results, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "report")
    assert code == 2
    assert "no ./benchmarks/results folder here" in err and "pass --results DIR" in err
    assert not (tmp_path / "report.md").exists()

    shutil.copytree(results, tmp_path / "benchmarks" / "results")
    code, stdout, err = run(capsys, "report")
    assert code == 0, err
    assert stdout == "wrote report.md\n"
    assert "![decode](benchmarks/results/decode.png)" in (tmp_path / "report.md").read_text()


def test_bad_arguments_exit_2(capsys, results, tmp_path):
    code, _, err = run(capsys, "report", "--results", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r.md"))
    assert code == 2 and "--results" in err and "not a folder" in err
    (tmp_path / "file.txt").write_text("x")
    code, _, err = run(capsys, "report", "--results", str(tmp_path / "file.txt"), "--out", str(tmp_path / "r.md"))
    assert code == 2 and "not a folder" in err
    code, _, err = run(capsys, "report", "--results", str(results), "--out", str(tmp_path / "no" / "r.md"))
    assert code == 2 and "--out" in err and "does not exist" in err
    assert not (tmp_path / "r.md").exists()


def test_through_main_once_registered(capsys, results, tmp_path):
    from sparse_attn.cli import main

    code = main(["report", "--help"])
    capsys.readouterr()
    if code != 0:
        pytest.skip("sparse-attn main does not register `report` yet")
    out = tmp_path / "r.md"
    assert main(["report", "--results", str(results), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert main(["report", "--results", str(tmp_path / "nowhere")]) == 2
