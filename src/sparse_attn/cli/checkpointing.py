"""The checkpoint and time-budget flags of the commands that train (`train`, `eval passkey`,
`eval mqar`, `eval listops`), passed through to `sparse_attn.train.loop.TrainLoop`:

    --checkpoint-dir DIR   checkpoints there (one file per trained model)
    --resume               continue from them (bit for bit: the result equals an uninterrupted run)
    --checkpoint-every N   also every N steps          --checkpoint-minutes M   also every M minutes
    --max-minutes M        stop cleanly (checkpointed) before M minutes; run again with --resume
"""

from __future__ import annotations

import argparse


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _positive_integer(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_checkpoint_flags(p, *, resume: bool = True) -> None:
    """Add the flags to parser (or group) `p`; resume=False when `p` already has --resume."""
    p.add_argument("--checkpoint-dir", metavar="DIR", default=None,
                   help="write checkpoints (model, optimizer, random states, history) into DIR, atomically, at "
                        "every evaluation, at the end and when --max-minutes stops the run")
    if resume:
        p.add_argument("--resume", action="store_true",
                       help="continue from the checkpoints in --checkpoint-dir (finished models are kept)")
    p.add_argument("--checkpoint-every", type=_positive_integer, metavar="N", default=None,
                   help="also checkpoint every N steps")
    p.add_argument("--checkpoint-minutes", type=_positive_number, metavar="M", default=None,
                   help="also checkpoint every M minutes")
    p.add_argument("--max-minutes", type=_positive_number, metavar="M", default=None,
                   help="stop training cleanly (checkpointed) before M minutes; go on later with --resume")


def checkpoint_options(parser: argparse.ArgumentParser, args, where: str | None,
                       needs: str = "--checkpoint-dir DIR") -> dict:
    """The loop's keyword arguments from the flags; `where` is where checkpoints go (None: none).
    Exit 2 when a flag needs checkpoints that were not asked for (`needs`: the flag that asks)."""
    if where is None:
        for flag, value in (("--resume", args.resume), ("--checkpoint-every", args.checkpoint_every),
                            ("--checkpoint-minutes", args.checkpoint_minutes)):
            if value:
                parser.error(f"{flag} needs {needs} (where the checkpoints are)")
    return {"checkpoint_every": args.checkpoint_every, "checkpoint_minutes": args.checkpoint_minutes,
            "max_minutes": args.max_minutes}
