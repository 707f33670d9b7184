"""Text to train on, with no download: a generated corpus with long-range facts, Python's own
standard library sources, or any file. Tokens are bytes (vocab 256), so every corpus works
with the same model.

The generated corpus (`synthetic_corpus`) is made of "records": a header states facts about a
person (city, pet, a secret code), a body of sentences follows, some made of fresh random
words (learnable only locally: spelling, grammar) and some restating a header fact, and the
record ends with a question whose answer is the code. A model can predict a restated fact
only by looking back to the header, hundreds to thousands of bytes earlier, so the corpus
separates mechanisms that reach far (dense, globals, random blocks, linear state) from ones
that do not (a short window), which a corpus of local text would not.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .._checks import check_int

_CONSONANTS = "bcdfghjklmnprstvz"
_VOWELS = "aeiou"
_ANIMALS = ["heron", "otter", "lynx", "badger", "falcon", "gecko", "marten", "ibis", "newt", "wren"]
_PLACES = ["market", "harbour", "library", "mill", "bridge", "orchard", "station", "chapel", "forge", "garden"]
_ITEMS = ["lamp", "rope", "jar", "coat", "bell", "map", "kettle", "basket", "candle", "saddle"]
_VERBS = ["walked to", "ran past", "painted", "visited", "left", "cleaned", "guarded", "sketched"]
_WEATHER = ["mild", "grey", "windy", "bright", "cold", "damp"]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))


def _name(rng: random.Random) -> str:
    return f"{_word(rng, rng.randint(2, 3)).capitalize()} {_word(rng, 2).capitalize()}"


def _record(rng: random.Random, index: int) -> str:
    name, city = _name(rng), _word(rng, 3).capitalize()
    animal, pet = rng.choice(_ANIMALS), _word(rng, 2).capitalize()
    code = f"{rng.randrange(10000):04d}"
    first = name.split()[0]
    facts = [  # sentences that restate the header: predictable only from it
        lambda: f"Later, {first} went back to {city}.",
        lambda: f"The {animal} of {first} is called {pet}.",
        lambda: f"{first} whispered the code {code} again.",
        lambda: f"{pet} the {animal} slept in {city}.",
    ]
    noise = [  # fresh random words: local structure only
        lambda: f"{_name(rng)} {rng.choice(_VERBS)} the {rng.choice(_PLACES)}.",
        lambda: f"The weather in {_word(rng, 3).capitalize()} was {rng.choice(_WEATHER)}.",
        lambda: f"{_name(rng).split()[0]} bought {rng.randint(2, 9)} {rng.choice(_ITEMS)}s.",
    ]
    body = [rng.choice(facts if rng.random() < 0.35 else noise)() for _ in range(rng.randint(12, 48))]
    return (f"== record {index} ==\n{name} was born in {city}. {first} keeps a {animal} called {pet}. "
            f"The secret code of {first} is {code}.\n" + " ".join(body) +
            f"\nQuestion: what is the secret code of {first}? Answer: {code}.\n\n")


def synthetic_corpus(num_bytes: int = 2_000_000, seed: int = 0) -> bytes:
    """`num_bytes` bytes of records (see the module docstring); the same seed, the same text."""
    check_int("num_bytes", num_bytes, 1)
    rng = random.Random(seed)
    parts, size, index = [], 0, 0
    while size < num_bytes:
        text = _record(rng, index)
        parts.append(text)
        size += len(text)
        index += 1
    return "".join(parts).encode("ascii")[:num_bytes]


def stdlib_corpus(num_bytes: int = 2_000_000) -> bytes:
    """The first `num_bytes` bytes of this Python's standard library sources (the .py files
    under the stdlib folder, in sorted order): real text that is on every machine, though it
    differs between Python versions."""
    check_int("num_bytes", num_bytes, 1)
    root = Path(random.__file__).resolve().parent
    out, size = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        out.append(data)
        size += len(data)
        if size >= num_bytes:
            break
    return b"".join(out)[:num_bytes]


def load_corpus(source: str, num_bytes: int = 2_000_000, seed: int = 0) -> bytes:
    """"synthetic", "stdlib", or a path to a file (its first `num_bytes` bytes)."""
    if source == "synthetic":
        return synthetic_corpus(num_bytes, seed)
    if source == "stdlib":
        return stdlib_corpus(num_bytes)
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"corpus must be 'synthetic', 'stdlib' or a readable file, got {source!r}")
    with path.open("rb") as f:
        return f.read(num_bytes)


@dataclass
class TokenData:
    """Byte tokens split into a training part and a validation part (the last `val_fraction`)."""

    train: torch.Tensor  # [N_train] uint8
    val: torch.Tensor  # [N_val] uint8

    @classmethod
    def from_bytes(cls, data: bytes, val_fraction: float = 0.1) -> "TokenData":
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        cut = int(len(tokens) * (1 - val_fraction))
        return cls(tokens[:cut].clone(), tokens[cut:].clone())

    def windows(self, split: str, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-byte targets, [len(starts), seq_len] long each."""
        data = self.train if split == "train" else self.val
        idx = starts[:, None] + torch.arange(seq_len + 1)  # [B, seq_len + 1]
        chunk = data[idx].long()
        return chunk[:, :-1], chunk[:, 1:]

    def check_length(self, seq_len: int) -> None:
        for split, data in (("train", self.train), ("val", self.val)):
            if len(data) <= seq_len + 1:
                raise ValueError(f"the {split} split has {len(data)} tokens, too few for seq_len {seq_len}: "
                                 "use a longer corpus or a shorter seq_len")


def describe(source: str) -> str:
    """One line for logs and JSON: what the corpus is."""
    if source == "stdlib":
        return f"Python {sys.version_info.major}.{sys.version_info.minor} standard library sources"
    return "generated records (sparse_attn.train.corpus)" if source == "synthetic" else f"file {source}"
