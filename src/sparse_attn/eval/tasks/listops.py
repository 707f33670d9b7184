"""ListOps as in the Long Range Arena (Tay et al., 2021), generated here without downloads.

Source format (google-research/long-range-arena @ ad0ff01):

* `lra_benchmarks/data/listops.py` draws each example with `generate_tree(1, max_depth=10,
  max_args=10)`: a node below the maximum depth is an operator with probability 0.25 (else a
  value 0..9 drawn uniformly); an operator takes `randint(2, max_args)` arguments, drawn
  before the operator itself is chosen from MIN, MAX, MED, SM (FIRST and LAST exist in the
  file but are commented out of the list). A node at depth `max_depth` (the root is depth 1)
  is always a value. The tree's length counts the operator, the values and the closing "]"
  (not the parentheses); a tree is kept when `min_length < length < max_length` (500 and
  2000, both bounds exclusive), and kept trees are de-duplicated (a Python `set`). The
  labels come from `to_value`: MIN/MAX, MED = `int(np.median(args))` (the mean of the two
  middle values for an even count, truncated: a floor since values are >= 0), SM = sum
  mod 10. 96K/2K/2K train/val/test.
* `lra_benchmarks/listops/input_pipeline.py` strips "(" and ")" from the TSV's Source, renames
  "]" to "X" (its tokenizer would drop "]"), splits on whitespace and encodes with a
  `TokenTextEncoder` (id 0 = padding, ids in set order otherwise), then pads each batch to
  `max_length`. A model therefore sees 15 symbols: `[MIN [MAX [MED [SM`, the close bracket,
  and `0`..`9`. We keep the close bracket spelled "]" (one-to-one with LRA's "X").

Example tokens (`listops_tokens`): `[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]` -> 5.

Deviations, all about bookkeeping rather than the task: ids are fixed (pad 0, cls 1, then
the 15 symbols) instead of LRA's set order; batches are padded to the longest example rather
than to `max_length`; and the splits come from one seeded stream (see `listops_dataset`)
instead of the iteration order of an unseeded `set`.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import multiprocessing
import random
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from ..._checks import check_bool, check_int
from ._common import seed_to_int

__all__ = [
    "LISTOPS_OPERATORS",
    "LISTOPS_SPLIT_SIZES",
    "LISTOPS_VOCAB",
    "ListOpsData",
    "ListOpsTree",
    "ListOpsVocab",
    "evaluate_listops",
    "generate_listops_tree",
    "listops_dataset",
    "listops_source",
    "listops_stream_marks",
    "listops_tokens",
]

# Order matters: `random.choice` maps its draw to an index, and LRA's list is in this order.
LISTOPS_OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
CLOSE = "]"
VALUES = range(10)
OPERATOR_PROBABILITY = 0.25  # LRA's VALUE_P: a node is an operator when random() <= 0.25

LISTOPS_SPLIT_SIZES = {"train": 96_000, "val": 2_000, "test": 2_000}
# The order in which one seeded stream fills the splits: the small evaluation splits first,
# so that making `test` or `val` does not require making the 96K training examples.
_STREAM_ORDER = ("test", "val", "train")

# A leaf is an int 0..9; an operator node is (operator, arguments).
ListOpsTree = int | tuple[str, tuple["ListOpsTree", ...]]


class ListOpsVocab:
    """Token <-> id for ListOps: `<pad>` 0, `<cls>` 1, then the 15 symbols LRA's model sees.

    `<cls>` is never produced by the generator; `listops_dataset(prepend_cls=True)` puts it in
    front of each sequence for encoders that pool the first position.
    """

    pad_token = "<pad>"
    cls_token = "<cls>"
    pad_id = 0
    cls_id = 1

    def __init__(self) -> None:
        self.tokens: tuple[str, ...] = (
            self.pad_token, self.cls_token, *LISTOPS_OPERATORS, CLOSE, *(str(v) for v in VALUES)
        )
        self.token_to_id: dict[str, int] = {token: i for i, token in enumerate(self.tokens)}
        self.close_id = self.token_to_id[CLOSE]
        self.operator_ids = {op: self.token_to_id[op] for op in LISTOPS_OPERATORS}
        self.value_offset = self.token_to_id["0"]  # id of value v is value_offset + v

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"ListOpsVocab({list(self.tokens)})"

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Ids of `tokens` (strings such as `"[MIN"`, `"]"`, `"7"`)."""
        if isinstance(tokens, str):
            raise TypeError("tokens must be a sequence of token strings, not one str (split it first)")
        ids = []
        for token in tokens:
            if token not in self.token_to_id:
                raise ValueError(f"tokens contains {token!r}, which is not in {list(self.tokens)}")
            ids.append(self.token_to_id[token])
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> list[str]:
        """Token strings of `ids` (a list or a 1-D tensor); padding is decoded as `<pad>`."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        tokens = []
        for i in ids:
            if not 0 <= i < len(self.tokens):
                raise ValueError(f"ids contains {i}, expected ids in [0, {len(self.tokens)})")
            tokens.append(self.tokens[i])
        return tokens


LISTOPS_VOCAB = ListOpsVocab()


class ListOpsData(NamedTuple):
    tokens: torch.Tensor  # [N, L] long, padded with LISTOPS_VOCAB.pad_id
    lengths: torch.Tensor  # [N] long, real tokens per row
    labels: torch.Tensor  # [N] long, 0..9


# ---- trees -----------------------------------------------------------------------------


def _apply(operator: str, args: list[int]) -> int:
    if operator == "[MIN":
        return min(args)
    if operator == "[MAX":
        return max(args)
    if operator == "[MED":
        # int(np.median(args)) for values >= 0: the mean of the middle two, rounded down
        ordered = sorted(args)
        return (ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) // 2
    if operator == "[SM":
        return sum(args) % 10
    raise ValueError(f"operator must be one of {LISTOPS_OPERATORS}, got {operator!r}")


def _as_random(seed: int | torch.Generator | random.Random) -> random.Random:
    if isinstance(seed, random.Random):
        return seed
    return random.Random(seed_to_int(seed))


def _check_shape_limits(max_depth, max_args) -> tuple[int, int]:
    return check_int("max_depth", max_depth, 1), check_int("max_args", max_args, 2)


def generate_listops_tree(
    seed: int | torch.Generator | random.Random, *, max_depth: int = 10, max_args: int = 10
) -> ListOpsTree:
    """One tree drawn as LRA's `generate_tree(1, max_depth, max_args)` draws it.

    The random calls are the same, in the same order (`random()`, `choice(range(10))`,
    `randint(2, max_args)`, `choice(operators)`), so a `random.Random` in a given state gives
    the tree LRA's function gives from the `random` module in that state. A
    `random.Random` passed in is advanced (to draw many trees from one stream); an int or a
    `torch.Generator` seeds a fresh one. No length filter here: see `listops_dataset`.
    """
    max_depth, max_args = _check_shape_limits(max_depth, max_args)
    rng = _as_random(seed)

    def grow(depth: int) -> ListOpsTree:
        if depth < max_depth and rng.random() <= OPERATOR_PROBABILITY:
            args = tuple(grow(depth + 1) for _ in range(rng.randint(2, max_args)))
            return rng.choice(LISTOPS_OPERATORS), args
        return rng.choice(VALUES)

    return grow(1)


def evaluate_listops(tree: ListOpsTree) -> int:
    """The value of `tree` (0..9), with LRA's `to_value` semantics (MED floors, SM is mod 10)."""
    if isinstance(tree, int):
        return tree
    operator, args = tree
    return _apply(operator, [evaluate_listops(arg) for arg in args])


def listops_tokens(tree: ListOpsTree) -> list[str]:
    """The tokens LRA's model sees: `[OP arg ... ]` in prefix order, no parentheses."""
    if isinstance(tree, int):
        return [str(tree)]
    operator, args = tree
    tokens = [operator]
    for arg in args:
        tokens.extend(listops_tokens(arg))
    tokens.append(CLOSE)
    return tokens


def listops_source(tree: ListOpsTree) -> str:
    """The `Source` column of LRA's TSV files (with LRA's parentheses), for comparing files.

    LRA nests an operator's arguments as left-leaning pairs, `(((OP a) b) ])`, and writes each
    pair as `( left right )`: `[MIN 1 2 ]` is written `( ( ( [MIN 1 ) 2 ) ] )`.
    """
    if isinstance(tree, int):
        return str(tree)
    operator, args = tree
    text = "( " * (len(args) + 1) + operator
    for arg in args:
        text += " " + listops_source(arg) + " )"
    return text + " " + CLOSE + " )"


# ---- dataset ---------------------------------------------------------------------------


class _TooLong(Exception):
    """Raised inside the sampler once a tree has more tokens than any kept tree may have."""


def _sample_token_ids(rng: random.Random, max_depth: int, max_args: int, max_tokens: int):
    """Yield `(token_ids as bytes, label)` per tree, or None for a tree abandoned as too long.

    Fuses generation, tokenisation and evaluation into one pass over the tree (separate
    passes through `generate_listops_tree`, `listops_tokens` and `evaluate_listops` cost
    1.5x as much). Trees are drawn exactly as `generate_listops_tree` draws them, except that
    a tree is abandoned as soon as it has more than `max_tokens` tokens: LRA would reject it
    anyway, so the kept trees have the same distribution while the rare huge trees (the
    depth-10 branching process has 1.5 expected children per node) cost nothing. Ids fit in
    a byte, hence bytes: cheap to hash.
    """
    draw_float, draw_choice, draw_int = rng.random, rng.choice, rng.randint
    operator_ids, close_id = LISTOPS_VOCAB.operator_ids, LISTOPS_VOCAB.close_id
    value_offset = LISTOPS_VOCAB.value_offset
    ids: list[int] = []

    def grow(depth: int) -> int:
        if depth < max_depth and draw_float() <= OPERATOR_PROBABILITY:
            slot = len(ids)
            ids.append(close_id)  # placeholder: LRA picks the operator after its arguments
            args = [grow(depth + 1) for _ in range(draw_int(2, max_args))]
            operator = draw_choice(LISTOPS_OPERATORS)
            ids[slot] = operator_ids[operator]
            ids.append(close_id)
            return _apply(operator, args)
        value = draw_choice(VALUES)
        ids.append(value_offset + value)
        if len(ids) > max_tokens:
            raise _TooLong
        return value

    while True:
        ids.clear()
        try:
            label = grow(1)
        except _TooLong:
            yield None
            continue
        yield bytes(ids), label


def _max_tree_length(max_depth: int, max_args: int) -> int:
    """Tokens in the largest tree: every node above the last level has max_args arguments."""
    length = 1  # a node at depth max_depth is a value
    for _ in range(max_depth - 1):
        length = 2 + max_args * length
    return length


# Consecutive draws without a new example before we conclude the length window is too narrow
# for the number of distinct trees asked for. At the default sizes ~8% of draws are kept.
_MAX_FRUITLESS_DRAWS = 2_000_000


def listops_dataset(
    split: str = "train",
    num_examples: int | None = None,
    *,
    seed: int | torch.Generator = 0,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
    prepend_cls: bool = False,
    marks: Mapping | None = None,
    workers: int = 1,
) -> ListOpsData:
    """ListOps examples of one split: `(tokens [N, L], lengths [N], labels [N])`.

    The defaults are LRA's: `num_examples=None` means the split's LRA size (96K/2K/2K), trees
    of depth <= 10 with 2..10 arguments per operator, `min_length < length < max_length` with
    500 and 2000 (LRA's exclusive bounds). Smaller settings for CPU runs, e.g.
    `listops_dataset("train", 500, min_length=50, max_length=200)`.

    All three splits come from one stream seeded by `seed` and de-duplicated as LRA's `set`
    does: test takes the first 2K distinct trees, val the next 2K, train the rest. So the
    splits never share an example (pass the same int `seed` for each split; a
    `torch.Generator` is advanced by one draw per call), the first n examples of a split do
    not depend on `num_examples`, and `val`/`test` may not ask for more than their 2K.

    Cost: trees are drawn until enough fall in the length window (rejection sampling, as in
    LRA). With the defaults about 8% of draws are kept and each kept example costs about
    1.5 kept-sized trees of sampling, ~1 us per token in pure Python: the 96K training
    split took 3 minutes on one CPU core (2 GB peak, most of it the [96000, 1999] output),
    val/test a few seconds each.

    `tokens` is padded with `LISTOPS_VOCAB.pad_id` (0) to the longest example; with
    `prepend_cls` each row starts with `LISTOPS_VOCAB.cls_id` (counted in `lengths`).

    Faster, same examples: `marks` from `listops_stream_marks` (the random state every so many
    draws of this stream, recorded once) lets `workers` processes draw the stretches between
    marks at once; their trees are then filtered and de-duplicated in stream order as above, and
    the result is checked against the digest the marks carry (ValueError if it differs).
    With workers > 1 the processes are spawned: a script calling this at top level needs the
    usual `if __name__ == "__main__":` guard.
    """
    if not isinstance(split, str) or split not in LISTOPS_SPLIT_SIZES:
        raise ValueError(f"split must be one of {list(LISTOPS_SPLIT_SIZES)}, got {split!r}")
    if num_examples is None:
        num_examples = LISTOPS_SPLIT_SIZES[split]
    num_examples = check_int("num_examples", num_examples, 1)
    if split != "train" and num_examples > LISTOPS_SPLIT_SIZES[split]:
        raise ValueError(
            f"num_examples for split {split!r} must be <= {LISTOPS_SPLIT_SIZES[split]} (the split's "
            f"size: more would overlap the next split of the stream), got {num_examples}"
        )
    max_depth, max_args = _check_shape_limits(max_depth, max_args)
    min_length = check_int("min_length", min_length, 0)
    max_length = check_int("max_length", max_length, min_length + 2)
    if min_length + 1 > _max_tree_length(max_depth, max_args):
        raise ValueError(
            f"min_length must be below {_max_tree_length(max_depth, max_args)} (the longest tree "
            f"with max_depth={max_depth}, max_args={max_args}), got {min_length}"
        )
    check_bool("prepend_cls", prepend_cls)

    offset = 0
    for name in _STREAM_ORDER[: _STREAM_ORDER.index(split)]:
        offset += LISTOPS_SPLIT_SIZES[name]

    check_int("workers", workers, 1)
    if marks is not None:
        return _dataset_from_marks(marks, workers, split, num_examples, offset, seed_to_int(seed), min_length,
                                   max_length, max_depth, max_args, prepend_cls)
    rng = random.Random(seed_to_int(seed))
    seen: set[bytes] = set()
    kept_ids: list[bytes] = []
    kept_labels: list[int] = []
    fruitless_draws = 0
    for sample in _sample_token_ids(rng, max_depth, max_args, max_tokens=max_length - 1):
        fruitless_draws += 1
        if fruitless_draws > _MAX_FRUITLESS_DRAWS:
            raise ValueError(
                f"found only {len(seen)} distinct trees with {min_length} < length < {max_length} "
                f"in the stream, then none in {_MAX_FRUITLESS_DRAWS} draws; {offset + num_examples} "
                "needed: widen min_length/max_length or ask for fewer examples"
            )
        if sample is None:
            continue
        ids, label = sample
        if not min_length < len(ids) < max_length or ids in seen:
            continue
        fruitless_draws = 0
        seen.add(ids)
        if len(seen) > offset:
            kept_ids.append(ids)
            kept_labels.append(label)
            if len(kept_ids) == num_examples:
                break

    prefix = bytes([LISTOPS_VOCAB.cls_id]) if prepend_cls else b""
    return _pad(kept_ids, prefix, torch.tensor(kept_labels, dtype=torch.long))


def _marks_settings(seed: int, min_length: int, max_length: int, max_depth: int, max_args: int) -> dict:
    return {"seed": seed, "min_length": min_length, "max_length": max_length, "max_depth": max_depth,
            "max_args": max_args}


def _digest(ids: list[bytes], labels: list[int]) -> str:
    h = hashlib.sha256()
    for row in ids:
        h.update(len(row).to_bytes(4, "little"))
        h.update(row)
    h.update(bytes(labels))
    return h.hexdigest()


def listops_stream_marks(split: str = "train", num_examples: int | None = None, *, seed: int = 0,
                         min_length: int = 500, max_length: int = 2000, max_depth: int = 10, max_args: int = 10,
                         every: int = 100_000) -> dict:
    """Walk the stream of `listops_dataset(split, num_examples, seed=..., ...)` once, as it
    does, and return what lets `listops_dataset(..., marks=, workers=)` draw it in parallel:
    the random state before every `every`-th draw, the number of draws the split needs, and a
    digest of the split (JSON-ready). As slow as one `listops_dataset` call; made once per
    setting and kept (benchmarks/data/)."""
    if split not in LISTOPS_SPLIT_SIZES:
        raise ValueError(f"split must be one of {list(LISTOPS_SPLIT_SIZES)}, got {split!r}")
    num_examples = LISTOPS_SPLIT_SIZES[split] if num_examples is None else check_int("num_examples", num_examples, 1)
    check_int("every", every, 1)
    max_depth, max_args = _check_shape_limits(max_depth, max_args)
    offset = sum(LISTOPS_SPLIT_SIZES[name] for name in _STREAM_ORDER[: _STREAM_ORDER.index(split)])
    rng = random.Random(check_int("seed", seed, 0))
    states, seen, ids, labels, draws = [], set(), [], [], 0
    sampler = _sample_token_ids(rng, max_depth, max_args, max_tokens=max_length - 1)
    while len(ids) < num_examples:
        if draws % every == 0:
            states.append(list(rng.getstate()[1]))  # before draw number `draws`
        sample = next(sampler)
        draws += 1
        if sample is None or not min_length < len(sample[0]) < max_length or sample[0] in seen:
            continue
        seen.add(sample[0])
        if len(seen) > offset:
            ids.append(sample[0])
            labels.append(sample[1])
    return {"settings": _marks_settings(seed, min_length, max_length, max_depth, max_args), "split": split,
            "num_examples": num_examples, "every": every, "draws": draws, "states": states,
            "digest": _digest(ids, labels)}


def _draw_stretch(state: list[int], count: int, max_depth: int, max_args: int, min_length: int,
                  max_length: int) -> list[tuple[bytes, int]]:
    """The trees of `count` draws from `state` whose length is in the window (in draw order)."""
    rng = random.Random()
    rng.setstate((3, tuple(state), None))
    sampler = _sample_token_ids(rng, max_depth, max_args, max_tokens=max_length - 1)
    return [s for s in itertools.islice(sampler, count) if s is not None and min_length < len(s[0]) < max_length]


def _dataset_from_marks(marks, workers, split, num_examples, offset, seed, min_length, max_length, max_depth,
                        max_args, prepend_cls) -> ListOpsData:
    wanted = _marks_settings(seed, min_length, max_length, max_depth, max_args)
    if not isinstance(marks, Mapping) or marks.get("settings") != wanted or marks.get("split") != split or \
            marks.get("num_examples") != num_examples:
        got = {k: marks.get(k) for k in ("settings", "split", "num_examples")} if isinstance(marks, Mapping) else marks
        raise ValueError(f"marks were made for {got}, not for split {split!r} of {num_examples} examples with "
                         f"{wanted}: make them with listops_stream_marks for these settings")
    every, draws, states = marks["every"], marks["draws"], marks["states"]
    jobs = [(state, min(every, draws - i * every), max_depth, max_args, min_length, max_length)
            for i, state in enumerate(states)]
    if workers == 1 or len(jobs) == 1:
        stretches = [_draw_stretch(*job) for job in jobs]
    else:  # spawn: the workers run pure Python, and fork beside torch's threads is not safe
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)),
                                                    mp_context=multiprocessing.get_context("spawn")) as pool:
            stretches = list(pool.map(_draw_stretch, *zip(*jobs)))
    seen: set[bytes] = set()
    ids: list[bytes] = []
    labels: list[int] = []
    for row, label in itertools.chain.from_iterable(stretches):
        if row in seen:
            continue
        seen.add(row)
        if len(seen) > offset:
            ids.append(row)
            labels.append(label)
            if len(ids) == num_examples:
                break
    if len(ids) != num_examples or _digest(ids, labels) != marks["digest"]:
        raise ValueError(f"the marked stream gave other examples than the sequential one ({len(ids)} of "
                         f"{num_examples}, digest mismatch): the marks do not belong to this generator")
    prefix = bytes([LISTOPS_VOCAB.cls_id]) if prepend_cls else b""
    return _pad(ids, prefix, torch.tensor(labels, dtype=torch.long))


def _pad(rows: list[bytes], prefix: bytes, labels: torch.Tensor) -> ListOpsData:
    """Stack byte rows into a zero-padded long tensor, a chunk of rows at a time.

    One flat boolean-mask assignment per chunk (instead of a Python loop over rows) keeps
    this a small part of the cost, and chunking keeps the temporaries small next to the output.
    """
    lengths = torch.tensor([len(prefix) + len(row) for row in rows], dtype=torch.long)  # [N]
    longest = int(lengths.max())
    tokens = torch.zeros(len(rows), longest, dtype=torch.long)  # [N, L]
    columns = torch.arange(longest)
    chunk = 4096
    for start in range(0, len(rows), chunk):
        stop = min(start + chunk, len(rows))
        flat = bytearray(b"".join(prefix + row for row in rows[start:stop]))
        values = torch.frombuffer(flat, dtype=torch.uint8).long()  # [sum of lengths]
        real = columns < lengths[start:stop, None]  # [chunk, L]
        tokens[start:stop][real] = values
    return ListOpsData(tokens, lengths, labels)
