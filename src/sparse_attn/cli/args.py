"""What every `sparse-attn` command shares: the program name, the errors that end a run with a
one-line message, the help formatter, output checks and JSON writing. Argument types and checks
(`positive_int`, `check_device`, `try_mechanism`, ...) are in `sparse_attn.eval.arguments`, one
floor down, because the evaluations define their own flags with them; they are imported here
so that a command needs this module only."""

from __future__ import annotations

import argparse
import json

import torch

from .._extras import MissingExtra
from ..backends import BackendError
from ..eval.arguments import (check_device, check_output, fraction, int_at_least, non_negative_int, one_line,
                              parse_schedules, positive_float, positive_int, probability, require_matplotlib,
                              try_mechanism)
from . import specs

__all__ = ["PROG", "RUNTIME_ERRORS", "Formatter", "backend_names", "check_device", "check_output", "fraction",
           "int_at_least", "non_negative_int", "one_line", "parse_schedules", "parse_spec", "positive_float",
           "positive_int", "probability", "require_matplotlib", "spec_help", "try_mechanism", "write_json"]

PROG = "sparse-attn"

# What a run can fail with and still deserve a one-line message rather than a traceback.
RUNTIME_ERRORS = (BackendError, ValueError, TypeError, MissingExtra, OSError, torch.OutOfMemoryError)


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps our line breaks in descriptions and epilogs."""


def backend_names() -> list[str]:
    from ..backends import list_backends

    return ["auto"] + [b.name for b in list_backends()]


def spec_help() -> str:
    """The specs epilog, from the mechanism registry as it is now (registered mechanisms included)."""
    return ("A pattern is NAME or NAME:KEY=VALUE,... (e.g. sliding_window:window=512,causal=false).\n"
            f"Defaults below are for --length >= {specs.REFERENCE_LENGTH}; shorter sequences get sizes scaled down\n"
            "in proportion (see sparse_attn.patterns for what each argument means).\n\n"
            "patterns (NAME  default KEY=VALUEs):\n" + specs.describe())


def parse_spec(parser: argparse.ArgumentParser, text: str, length: int) -> specs.Spec:
    """A spec for `length`, or exit 2 with the parser's message."""
    try:
        return specs.parse_spec(text, length)
    except specs.SpecError as exc:
        parser.error(str(exc))


def write_json(path: str, payload: dict, indent: int = 1) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=indent)
    print(f"wrote {path}")
