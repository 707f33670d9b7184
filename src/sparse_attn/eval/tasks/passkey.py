"""Passkey retrieval in Landmark Attention's format (Mohtashami & Jaggi, 2023), as bytes.

Source format: epfml/landmark-attention, `llama/run_test.py` @ 9f13a60 (`generate_prompt`):

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there.
    <filler prefix>
    The pass key is 12345. Remember it. 12345 is the pass key.
    <filler suffix>
    What is the pass key? The pass key is

The five parts are joined by "\\n". The filler is "The grass is green. The sky is blue. The sun
is yellow. Here we go. There and back again." repeated and joined by spaces; the prefix and
the suffix are both cut from its start, at any character (so they may end mid-word), with
`n_garbage` characters in all and a uniformly random share `randint(0, n_garbage)` before the
key. The model answers by continuing the text; Landmark reads the first integer it writes.

Here the text is byte-level (token id = UTF-8 byte, vocabulary 256) so that character-level
models can take it, and each sequence is the prompt, one space, then the passkey's digits:
`tokens[:, answer_start:]` is the answer, scored by teacher forcing or by generating from
`tokens[:, :answer_start]`. A length is hit exactly by the amount of filler; the instruction,
key line and question are always whole.

Deviations: the passkey has a fixed number of digits (`digits`, default 5, first digit
non-zero) so that answers stack into one tensor (Landmark: `randint(1, 50000)`, 1 to 5
digits); the space before the answer belongs to the prompt (Landmark lets the model write it);
`depth` may fix the key's place instead of drawing it (`depth=None` draws it as Landmark does).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..._checks import check_fraction, check_int
from ._common import torch_generator

__all__ = [
    "PASSKEY_VOCAB_SIZE",
    "PasskeyBatch",
    "PasskeyExample",
    "decode_bytes",
    "encode_bytes",
    "passkey_batch",
    "passkey_example",
    "passkey_min_length",
]

PASSKEY_VOCAB_SIZE = 256
TASK_DESCRIPTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "them. I will quiz you about the important information there."
)
FILLER_SENTENCES = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
_MAX_DIGITS = 18  # the largest passkey still fits in int64


def key_line(passkey: int) -> str:
    return f"The pass key is {passkey}. Remember it. {passkey} is the pass key."


class PasskeyExample(NamedTuple):
    tokens: torch.Tensor  # [L] long: prompt, " ", answer digits
    answer_start: int  # index of the answer's first digit: L - digits
    answer: torch.Tensor  # [digits] long, the passkey's digits as bytes
    key_position: int  # index of the first byte of the key line ("The pass key is N. ...")


class PasskeyBatch(NamedTuple):
    tokens: torch.Tensor  # [N, L] long
    answer_start: int  # the same for every row: L - digits
    answer: torch.Tensor  # [N, digits] long
    key_positions: torch.Tensor  # [N] long


def encode_bytes(text: str) -> torch.Tensor:
    """[len(bytes)] long: the UTF-8 bytes of `text`, the token ids of the byte-level tasks."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def decode_bytes(tokens: torch.Tensor) -> str:
    """The text of a 1-D tensor of byte ids (invalid UTF-8 is replaced, not raised)."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


def passkey_min_length(digits: int = 5) -> int:
    """The shortest sequence with a `digits`-digit passkey: the prompt with no filler at all."""
    digits = check_int("digits", digits, 1, _MAX_DIGITS)
    return _fixed_length(digits)


def _fixed_length(digits: int) -> int:
    # four "\n" between the five parts, " " before the answer, then the answer
    return len(TASK_DESCRIPTION) + len(key_line(10 ** (digits - 1))) + len(QUESTION) + 4 + 1 + digits


def _filler(num_chars: int) -> str:
    """The first `num_chars` characters of the endless filler (Landmark's `garbage_inf`)."""
    repeats = num_chars // (len(FILLER_SENTENCES) + 1) + 1
    return " ".join([FILLER_SENTENCES] * repeats)[:num_chars]


def passkey_batch(
    num_examples: int,
    length_tokens: int,
    *,
    depth: float | None = None,
    digits: int = 5,
    seed: int | torch.Generator = 0,
) -> PasskeyBatch:
    """`num_examples` passkey sequences of exactly `length_tokens` bytes each.

    `depth` in [0, 1] is the share of the filler placed before the key line (0: the key follows
    the instruction, 1: it precedes the question); `None` draws it per example as Landmark does
    (`randint(0, n_filler)` characters). Passkeys are uniform over the `digits`-digit numbers.
    Returns `(tokens [N, L], answer_start, answer [N, digits], key_positions [N])`.
    """
    num_examples = check_int("num_examples", num_examples, 1)
    digits = check_int("digits", digits, 1, _MAX_DIGITS)
    length_tokens = check_int("length_tokens", length_tokens, 1)
    if length_tokens < _fixed_length(digits):
        raise ValueError(
            f"length_tokens must be >= {_fixed_length(digits)} (the prompt with no filler and a "
            f"{digits}-digit answer), got {length_tokens}"
        )
    if depth is not None:
        depth = check_fraction("depth", depth)
    generator = torch_generator(seed)
    filler_chars = length_tokens - _fixed_length(digits)
    filler = _filler(filler_chars)

    tokens = torch.empty(num_examples, length_tokens, dtype=torch.long)  # [N, L]
    key_positions = torch.empty(num_examples, dtype=torch.long)  # [N]
    for row in range(num_examples):
        # drawn row by row, so that the first rows do not depend on num_examples
        passkey = int(torch.randint(10 ** (digits - 1), 10**digits, (1,), generator=generator))
        if depth is None:
            before = int(torch.randint(filler_chars + 1, (1,), generator=generator))
        else:
            before = round(depth * filler_chars)
        prompt = "\n".join(
            [TASK_DESCRIPTION, filler[:before], key_line(passkey), filler[: filler_chars - before], QUESTION]
        )
        tokens[row] = encode_bytes(f"{prompt} {passkey}")
        key_positions[row] = len(TASK_DESCRIPTION) + 1 + before + 1  # a "\n" each side of the prefix
    answer_start = length_tokens - digits
    return PasskeyBatch(tokens, answer_start, tokens[:, answer_start:].clone(), key_positions)


def passkey_example(
    length_tokens: int,
    *,
    depth: float | None = None,
    digits: int = 5,
    seed: int | torch.Generator = 0,
) -> PasskeyExample:
    """One passkey sequence of exactly `length_tokens` bytes: the first row of any
    `passkey_batch` with the same arguments.

    Returns `(tokens [L], answer_start, answer [digits], key_position)`.
    """
    batch = passkey_batch(1, length_tokens, depth=depth, digits=digits, seed=seed)
    return PasskeyExample(batch.tokens[0], batch.answer_start, batch.answer[0], int(batch.key_positions[0]))
