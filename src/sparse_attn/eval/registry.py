"""The evaluation registry: one `Evaluation` per task, read by `sparse-attn eval` (a subcommand
each), `sparse-attn report` (the Evaluation section) and `benchmarks/evaluations.py`.

An evaluation is a module with its task and one `Evaluation` subclass registered here:

    class Echo(Evaluation):
        name = "echo"                       # sparse-attn eval echo; results echo*.json / echo*.png
        help = "one line for sparse-attn eval --help"

        def add_arguments(self, parser):    # its own flags; --device --seed --json --no-progress
            parser.add_argument("--n", type=positive_int, default=3)  # (and --plot with plot()) are added

        def run(self, args, parser):        # checks (parser.error: exit 2), then the work
            return EchoResult(args.n)       # a result: to_dict / from_dict / summary

        def from_dict(self, data):          # a result file back into a result
            return EchoResult.from_dict(data)

    register_evaluation(Echo())

`plot`, `render` (the report's block, by default the result file's scalars and tables under
`title`), `summary` and `failure` have defaults. The built-in ones are in `eval/evaluations.py`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["Evaluation", "EvaluationResult", "ReportBlocks", "evaluations", "get_evaluation",
           "register_evaluation", "unregister_evaluation"]


@runtime_checkable
class EvaluationResult(Protocol):
    """What `Evaluation.run` returns: JSON in and out, and a text summary."""

    def to_dict(self) -> dict: ...

    def summary(self) -> str: ...


class ReportBlocks(Protocol):
    """What the report gives a renderer (`Evaluation.render`), so that renderers need nothing of
    the report's floor: a picture of the results folder, a table cell, the generic block."""

    def image(self, alt: str, file: str) -> list[str]:
        """["", "![alt](link)"] when the results folder has `file`, else []."""

    def cell(self, value: Any) -> str:
        """`value` as a Markdown table cell (escaped, numbers shortened)."""

    def generic(self, data: Any, name: str, title: str | None = None) -> str:
        """Any result JSON: its scalars, a table of each list of records, then `<name>.png`."""


class Evaluation:
    """One evaluation. Subclass it, set `name` and `help`, write `add_arguments`, `run` and
    `from_dict`; override the rest where the defaults do not fit."""

    name: str = ""
    help: str = ""  # one line in `sparse-attn eval --help`
    description: str | None = None  # `sparse-attn eval NAME --help` (default: help)
    title: str | None = None  # the heading of the default report block (default: name)
    command: bool = True  # False: not a `sparse-attn eval` subcommand (it has a command of its own)
    device: bool = True  # the subcommand takes --device
    files: Sequence[str] = ()  # result files the report renders (default: NAME*.json)
    pictures: Sequence[str] = ()  # pictures the report shows with them (default: NAME*.png)

    def json_globs(self) -> list[str]:
        return list(self.files) or [f"{self.name}*.json"]

    def picture_globs(self) -> list[str]:
        return list(self.pictures) or [f"{self.name}*.png"]

    # the command line ------------------------------------------------------------------
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this evaluation's own flags (the CLI adds --device, --seed, --json, --no-progress, and
        --plot when it overrides `plot`)."""

    def run(self, args: argparse.Namespace, parser: argparse.ArgumentParser) -> EvaluationResult:
        """Check the arguments (a bad one: `parser.error(...)`, exit 2), then run; a failure at
        run time raises (exit 1). --device, --json and --plot are checked before."""
        raise NotImplementedError(f"evaluation {self.name!r} does not define run()")

    def summary(self, result: EvaluationResult, seconds: float) -> str:
        """What `sparse-attn eval NAME` prints when the run is over."""
        return result.summary()

    def failure(self, result: EvaluationResult) -> str | None:
        """Why the run did not do what was asked (exit 1 after writing its files), or None."""
        return None

    # files -----------------------------------------------------------------------------
    def from_dict(self, data: dict) -> EvaluationResult:
        """A result written by `to_dict` (a --json file) back into a result."""
        raise NotImplementedError(f"evaluation {self.name!r} does not define from_dict()")

    def plot(self, result: EvaluationResult, path) -> None:
        """Write the picture of `result` to `path` (needs matplotlib). Not overridden: the
        evaluation draws nothing, and its subcommand has no --plot."""
        raise NotImplementedError(f"evaluation {self.name!r} draws no picture")

    def draws_pictures(self) -> bool:
        return type(self).plot is not Evaluation.plot

    def render(self, data: Any, name: str, blocks: ReportBlocks) -> str:
        """The report's block for one result file (`name`: its stem, whose .png goes with it)."""
        return blocks.generic(data, name, title=self.title)

    def __repr__(self) -> str:
        return f"<Evaluation {self.name}>"


_REGISTRY: dict[str, Evaluation] = {}
_BUILTIN_LOADED = False


def _load_builtin() -> None:
    global _BUILTIN_LOADED
    if not _BUILTIN_LOADED:
        _BUILTIN_LOADED = True
        from . import evaluations  # noqa: F401 (registers the built-in evaluations)


def register_evaluation(evaluation: Evaluation, *, replace: bool = False) -> Evaluation:
    """Add `evaluation` to the registry (after the built-in ones); returns it. A name already
    taken is refused unless `replace`."""
    if not isinstance(evaluation, Evaluation):
        raise TypeError(f"evaluation must be an Evaluation instance, got {type(evaluation).__name__}")
    name = evaluation.name
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"evaluation.name must be a name like 'needle' (letters, digits, _), got {name!r}")
    if not evaluation.help:
        raise ValueError(f"evaluation {name!r}: help must say in one line what it evaluates")
    _load_builtin()
    if name in _REGISTRY and not replace:
        raise ValueError(f"evaluation {name!r} is already registered (pass replace=True to replace it)")
    _REGISTRY[name] = evaluation
    return evaluation


def unregister_evaluation(name: str) -> Evaluation:
    """Remove and return the evaluation called `name` (tests register and remove toy ones)."""
    _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"no evaluation {name!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY.pop(name)


def evaluations() -> dict[str, Evaluation]:
    """Every registered evaluation by name, the built-in ones first, in registration order."""
    _load_builtin()
    return dict(_REGISTRY)


def get_evaluation(name: str) -> Evaluation:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no evaluation {name!r}; registered: {', '.join(_REGISTRY)}") from None

