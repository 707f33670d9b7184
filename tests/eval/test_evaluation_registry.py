"""Adding an evaluation touches one place: a toy evaluation registered from this file (outside
the package) is a `sparse-attn eval` subcommand with its own flags, checks (exit 2), JSON and
picture, and the report renders its result files with its own renderer."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from sparse_attn.cli import main
from sparse_attn.eval.arguments import positive_int
from sparse_attn.eval.registry import (Evaluation, EvaluationResult, evaluations, get_evaluation, register_evaluation,
                                       unregister_evaluation)
from sparse_attn.report import report_markdown


@dataclass
class SquaresResult:
    """The squares of 0..n-1 and their sum: a result any reader can check by hand."""

    n: int
    squares: list[int]

    def to_dict(self) -> dict:
        return {"n": self.n, "squares": self.squares, "total": sum(self.squares)}

    @classmethod
    def from_dict(cls, data: dict) -> SquaresResult:
        return cls(n=data["n"], squares=list(data["squares"]))

    def summary(self) -> str:
        return f"squares of 0..{self.n - 1}: total {sum(self.squares)}"


class Squares(Evaluation):
    name = "toy_squares"
    help = "squares of the first N integers (a toy evaluation of the registry test)"
    device = False

    def add_arguments(self, parser):
        parser.add_argument("--n", type=positive_int, default=4, help="how many squares")
        parser.add_argument("--skip", type=int, default=0)

    def run(self, args, parser):
        if args.skip >= args.n:
            parser.error(f"--skip ({args.skip}) must be below --n ({args.n})")
        return SquaresResult(args.n, [i * i for i in range(args.skip, args.n)])

    def from_dict(self, data):
        return SquaresResult.from_dict(data)

    def render(self, data, name, blocks):
        result = self.from_dict(data)
        return "\n".join([f"**Toy squares** ({name}): total {sum(result.squares)}", "", "| n | square |", "|---|---|"]
                         + [f"| {blocks.cell(i)} | {s} |" for i, s in enumerate(result.squares)]
                         + blocks.image(f"toy ({name})", f"{name}.png"))


@pytest.fixture
def toy():
    evaluation = register_evaluation(Squares())
    try:
        yield evaluation
    finally:
        unregister_evaluation(evaluation.name)


def test_registered_evaluation_is_a_subcommand(toy, capsys, tmp_path):
    assert evaluations()["toy_squares"] is toy and get_evaluation("toy_squares") is toy
    assert list(evaluations())[:5] == ["needle", "reach", "passkey", "mqar", "listops"]  # built-ins first

    assert main(["eval", "--help"]) == 0
    listing = capsys.readouterr().out
    assert "toy_squares" in listing and "squares of the first N integers" in listing

    assert main(["eval", "toy_squares", "--help"]) == 0
    help_text = capsys.readouterr().out
    for flag in ("--n", "--skip", "--seed", "--json", "--no-progress"):
        assert flag in help_text
    assert "--device" not in help_text  # device = False
    assert "--plot" not in help_text  # no plot(): nothing to draw

    out = tmp_path / "toy_squares.json"
    assert main(["eval", "toy_squares", "--n", "5", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert stdout == f"squares of 0..4: total 30\nwrote {out}\n"
    assert json.loads(out.read_text()) == {"n": 5, "squares": [0, 1, 4, 9, 16], "total": 30}

    assert main(["eval", "toy_squares", "--n", "0"]) == 2  # its own argparse type
    assert "--n: expected an int >= 1, got 0" in capsys.readouterr().err
    assert main(["eval", "toy_squares", "--n", "2", "--skip", "2"]) == 2  # its own check
    assert "--skip (2) must be below --n (2)" in capsys.readouterr().err
    assert main(["eval", "toy_squares", "--json", str(tmp_path / "no" / "x.json")]) == 2  # checked for every task
    assert "does not exist" in capsys.readouterr().err


def test_registered_evaluation_is_in_the_report(toy, tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    assert main(["eval", "toy_squares", "--n", "3", "--json", str(folder / "toy_squares.json")]) == 0
    (folder / "toy_squares_b.json").write_text(json.dumps(SquaresResult(2, [0, 1]).to_dict()))
    (folder / "toy_squares.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    text = report_markdown(folder, link_prefix="")
    evaluation = text.split("\n## Evaluation\n", 1)[1].split("\n## ", 1)[0]
    assert "Source: [`toy_squares.json`](toy_squares.json)." in evaluation
    assert "**Toy squares** (toy_squares): total 5" in evaluation and "| 2 | 4 |" in evaluation
    assert "![toy (toy_squares)](toy_squares.png)" in evaluation
    assert "**Toy squares** (toy_squares_b): total 1" in evaluation
    assert "no section knows" not in text  # both files found their evaluation

    assert main(["report", "--help"]) == 0
    assert "toy_squares*" in capsys.readouterr().out

    unregister_evaluation("toy_squares")  # without it, the files are "other files"
    try:
        text = report_markdown(folder, link_prefix="")
        assert "[`toy_squares.json`](toy_squares.json): a JSON file no section knows" in text
    finally:
        register_evaluation(toy)


class _Failing(Squares):
    name = "toy_failing"
    help = "a toy whose run does not do what was asked"

    def failure(self, result):
        return "failed: on purpose"


def test_failure_exits_1_after_writing(tmp_path, capsys):
    register_evaluation(_Failing())
    try:
        out = tmp_path / "f.json"
        assert main(["eval", "toy_failing", "--json", str(out)]) == 1
        assert out.exists()
        assert "sparse-attn: error: failed: on purpose" in capsys.readouterr().err
    finally:
        unregister_evaluation("toy_failing")


def test_registration_errors():
    with pytest.raises(ValueError, match="already registered"):
        register_evaluation(get_evaluation("needle"))
    with pytest.raises(TypeError, match="evaluation must be an Evaluation instance"):
        register_evaluation(Squares)
    nameless = Squares()
    nameless.name = "bad name"
    with pytest.raises(ValueError, match="evaluation.name must be a name"):
        register_evaluation(nameless)
    silent = Squares()
    silent.help = ""
    with pytest.raises(ValueError, match="help must say"):
        register_evaluation(silent)
    with pytest.raises(KeyError, match="no evaluation 'nope'"):
        get_evaluation("nope")
    with pytest.raises(KeyError, match="no evaluation 'nope'"):
        unregister_evaluation("nope")


@pytest.mark.parametrize("name", ["needle", "reach", "passkey", "mqar", "listops", "hf"])
def test_builtin_results_round_trip(name):
    """Every built-in evaluation reads back what its result writes (the report relies on it)."""
    evaluation = get_evaluation(name)
    assert isinstance(evaluation, Evaluation) and evaluation.help
    if name == "reach":
        from sparse_attn.eval.reach import receptive_field

        result = receptive_field(["sliding_window:window=4", "causal"], 24)
        back = evaluation.from_dict(json.loads(json.dumps(result.to_dict())))
        assert isinstance(back, EvaluationResult)
        assert back.to_dict() == result.to_dict() and back.summary() == result.summary()
    elif name == "needle":
        from sparse_attn.eval.needle import needle_grid

        result = needle_grid(["causal"], [16], [0.5], heads=1, dim=8, trials=1, progress=False)
        back = evaluation.from_dict(json.loads(json.dumps(result.to_dict())))
        assert back.summary() == result.summary()
    else:  # the trained ones and hf: the protocol's methods exist (their runs are tested in tests/eval, tests/cli)
        assert type(evaluation).from_dict is not Evaluation.from_dict
        assert type(evaluation).plot is not Evaluation.plot


def test_benchmark_runner_iterates_the_registry(toy, tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        import evaluations as runner
    finally:
        sys.path.pop(0)
    assert runner.main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert "toy_squares" in listing and "needle" in listing and "hf " not in listing  # hf: its own command
    assert runner.main(["--results", str(tmp_path), "toy_squares", "--n", "3"]) == 0
    assert json.loads((tmp_path / "toy_squares.json").read_text())["total"] == 5
    with pytest.raises(SystemExit):
        runner.main(["--results", str(tmp_path), "nope"])
    assert "name must be one of" in capsys.readouterr().err
