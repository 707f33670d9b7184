"""Command-line argument types and checks, one wording for each, shared by the `sparse-attn`
commands (`cli/`) and the evaluations' own arguments (`Evaluation.add_arguments`, which live on
this floor so that an evaluation is one module; the CLI floor above imports them from here).

argparse types raise `argparse.ArgumentTypeError`, which argparse words as
"argument --block: expected an int >= 1, got 0" (exit 2). The checks take the parser and exit
2 through `parser.error` with a message that names the flag.
"""

from __future__ import annotations

import argparse
import os

import torch

from ..backends import BackendError

__all__ = ["add_checkpoint_flags", "check_device", "check_output", "checkpoint_options", "fraction", "int_at_least",
           "non_negative_int", "one_line", "parse_schedules", "positive_float", "positive_int", "probability",
           "require_matplotlib", "try_mechanism"]


def int_at_least(minimum: int):
    """An argparse type: an int >= minimum, worded as `_checks.check_int` words it."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def _real(text: str, expected: str, accept) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not accept(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def positive_float(text: str) -> float:
    return _real(text, "a positive number", lambda v: v > 0)


def probability(text: str) -> float:
    return _real(text, "a number in [0, 1]", lambda v: 0.0 <= v <= 1.0)


def fraction(text: str) -> float:
    return _real(text, "a number in (0, 1)", lambda v: 0.0 < v < 1.0)


def check_device(text: str, parser: argparse.ArgumentParser | None = None) -> torch.device:
    """--device as a device torch understands and this machine has. A bad one is a usage error
    (exit 2) through `parser` when given, else a ValueError naming --device."""
    try:
        device = torch.device(text)
    except RuntimeError as exc:  # a name torch does not know
        problem = f"--device {text!r}: {exc}"
    else:
        if device.type != "cuda" or torch.cuda.is_available():
            return device
        problem = f"--device {text}: CUDA is not available here (torch {torch.__version__})"
    if parser is None:
        raise ValueError(problem)
    parser.error(problem)


def check_output(parser: argparse.ArgumentParser, flag: str, path: str | None) -> None:
    """Exit 2 if the folder of an output file does not exist (before a run, not after it)."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        parser.error(f"{flag} {path}: folder {folder} does not exist")


def require_matplotlib() -> None:
    """Fail before a long run, not after it."""
    from .._extras import figure

    figure()


def one_line(exc: Exception) -> str:
    """The message of `exc` on one line; of a BackendError's explanation, its verdicts only."""
    lines = str(exc).splitlines() or [""]
    return " ".join([lines[0]] + [line.strip() for line in lines[1:] if "rejected" in line])


def try_mechanism(parser: argparse.ArgumentParser, flag: str, text: str, mechanism, *, length: int, head_dim: int,
                  device, q_heads: int = 1) -> None:
    """Exit 2 now if a non-pattern mechanism's op refuses its arguments (top_k=0, an unknown feature
    map, ...): those checks run only in a call, so one call on one batch row and one kv head of the
    real length and head dim, before a run that would fail at its first step (or later)."""
    from ..ops.mechanisms import PATTERN, Mechanism

    if not isinstance(mechanism, Mechanism) or mechanism.kind == PATTERN:
        return  # patterns check their arguments when built
    q = torch.randn(1, q_heads, length, head_dim, device=device)
    k, v = torch.randn(2, 1, 1, length, head_dim, device=device)
    try:
        with torch.no_grad():
            mechanism(q, k, v)
    except (ValueError, TypeError, BackendError) as exc:
        parser.error(f"{flag} {text}: {one_line(exc)}")


def parse_schedules(parser: argparse.ArgumentParser, texts: list[str] | None,
                    flag: str = "--mechanisms") -> dict | None:
    """NAME=SPEC[;SPEC...] -> {NAME: spec or [spec per layer]} (None for None)."""
    if texts is None:
        return None
    out = {}
    for text in texts:
        name, sep, specs = text.partition("=")
        if not sep or not name or not specs:
            parser.error(f"{flag} takes NAME=SPEC[;SPEC...], got {text!r}")
        parts = [s for s in specs.split(";") if s]
        out[name] = parts[0] if len(parts) == 1 else parts
    return out


# ------------------------------------------------------------- checkpoints and time budget
# The flags of the commands that train (`train`, `eval passkey|mqar|listops`), passed through
# to `sparse_attn.train.loop.TrainLoop`.
def add_checkpoint_flags(p, *, resume: bool = True) -> None:
    """--checkpoint-dir, --resume, --checkpoint-every, --checkpoint-minutes, --max-minutes on
    parser (or group) `p`; resume=False when `p` already has --resume."""
    p.add_argument("--checkpoint-dir", metavar="DIR", default=None,
                   help="write checkpoints (model, optimizer, random states, history) into DIR, atomically, at "
                        "every evaluation, at the end and when --max-minutes stops the run")
    if resume:
        p.add_argument("--resume", action="store_true",
                       help="continue from the checkpoints in --checkpoint-dir (finished models are kept)")
    p.add_argument("--checkpoint-every", type=positive_int, metavar="N", default=None,
                   help="also checkpoint every N steps")
    p.add_argument("--checkpoint-minutes", type=positive_float, metavar="M", default=None,
                   help="also checkpoint every M minutes")
    p.add_argument("--max-minutes", type=positive_float, metavar="M", default=None,
                   help="stop training cleanly (checkpointed) before M minutes; go on later with --resume")


def checkpoint_options(parser: argparse.ArgumentParser, args, where: str | None,
                       needs: str = "--checkpoint-dir DIR", *, resume_needs_checkpoints: bool = True) -> dict:
    """The loop's keyword arguments from the flags; `where` is where checkpoints go (None: none).
    Exit 2 when a flag needs checkpoints that were not asked for (`needs`: the flag that asks);
    resume_needs_checkpoints=False for a command whose --resume also means something without them."""
    if where is None:
        resume = args.resume if resume_needs_checkpoints else False
        for flag, value in (("--resume", resume), ("--checkpoint-every", args.checkpoint_every),
                            ("--checkpoint-minutes", args.checkpoint_minutes)):
            if value:
                parser.error(f"{flag} needs {needs} (where the checkpoints are)")
    return {"checkpoint_every": args.checkpoint_every, "checkpoint_minutes": args.checkpoint_minutes,
            "max_minutes": args.max_minutes}
