"""Multi-query associative recall (MQAR), as in Zoology (Arora, Eyuboglu et al., 2023).

Source format: HazyResearch/zoology, `zoology/data/associative_recall.py` (`multiquery_ar`,
last seen at a260157; the same function lives on, with an extra `num_passes`, in
`zoology/data/multiquery_ar.py` @ dbcb60d). For each example:

* `num_kv_pairs` distinct keys from `[1, vocab_size // 2)` and as many distinct values from
  `[vocab_size // 2, vocab_size)`, written first as `k0 v0 k1 v1 ...` (the context);
* the rest of the sequence has `space = (input_seq_len - 2 * num_kv_pairs) // 2` even slots;
  `num_kv_pairs` distinct gaps are drawn without replacement with probability proportional
  to `power_a * i ** (power_a - 1)` for `i = 1..space` (a power law: small gaps, i.e. queries
  soon after the context, are likely; `power_a = 1` is uniform), and key j is repeated at
  position `2 * num_kv_pairs + 2 * gap_j`;
* labels are -100 everywhere except at those query positions, where they hold the key's
  value: the label at position t is the target of the model's output at t (already shifted
  for next-token prediction, as Zoology's `labels[:, 1:]` makes it);
* with `random_non_queries` (Zoology's default) every other position after the context is
  filled with a token drawn uniformly from the whole vocabulary, else it stays 0.

    Key   Val  Key  Val            Query                         Query
    2     8    4    7    0    0    4    0    0    0    0    0    2    0    0     (inputs)
    -100 -100 -100 -100 -100 -100  7    -100 -100 -100 -100 -100 8    -100 -100  (labels)

Deviations: draws come from a torch.Generator instead of NumPy's global state (same
distributions: keys and values are uniform subsets in random order, gaps are successive
draws without replacement as `np.random.choice(replace=False, p=p)` makes them), and the
argument checks are the conditions the format needs (enough keys and values in the vocabulary,
`4 * num_kv_pairs <= input_seq_len`) rather than Zoology's `vocab_size > input_seq_len`.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from ..._checks import check_bool, check_int
from ._common import torch_generator

__all__ = ["MQAR_IGNORE_INDEX", "MQARData", "mqar_dataset", "mqar_vocab_ranges"]

MQAR_IGNORE_INDEX = -100  # label of positions that are not queries (cross_entropy's default)

# Rows per chunk so that the [rows, vocab_size // 2] and [rows, space] draws stay ~32 MB.
_CHUNK_ELEMENTS = 1 << 22


class MQARData(NamedTuple):
    inputs: torch.Tensor  # [N, L] long
    labels: torch.Tensor  # [N, L] long: the paired value at query positions, -100 elsewhere


def mqar_vocab_ranges(vocab_size: int) -> tuple[range, range]:
    """(keys, values): the token ranges keys and values are drawn from (0 is never a key)."""
    vocab_size = check_int("vocab_size", vocab_size, 2)
    return range(1, vocab_size // 2), range(vocab_size // 2, vocab_size)


def mqar_dataset(
    num_examples: int,
    *,
    vocab_size: int = 8192,
    input_seq_len: int = 64,
    num_kv_pairs: int = 8,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    seed: int | torch.Generator = 0,
) -> MQARData:
    """`num_examples` MQAR sequences: `(inputs [N, input_seq_len], labels [N, input_seq_len])`.

    Defaults are Zoology's (`vocab_size=8192`, `input_seq_len=64`, `num_kv_pairs=8`,
    `power_a=0.01`); the paper varies the length from 64 to 512 and the pairs from 4 to 64.
    Train with `cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)`.
    """
    num_examples = check_int("num_examples", num_examples, 1)
    num_kv_pairs = check_int("num_kv_pairs", num_kv_pairs, 1)
    input_seq_len = check_int("input_seq_len", input_seq_len, 2)
    if input_seq_len < 4 * num_kv_pairs:
        raise ValueError(
            f"input_seq_len must be >= 4 * num_kv_pairs = {4 * num_kv_pairs} (the pairs, then a distinct "
            f"even slot per query), got {input_seq_len}"
        )
    if input_seq_len % 2:
        raise ValueError(f"input_seq_len must be even (queries sit on even slots), got {input_seq_len}")
    vocab_size = check_int("vocab_size", vocab_size, 2)
    key_range, value_range = mqar_vocab_ranges(vocab_size)
    if len(key_range) < num_kv_pairs:
        raise ValueError(
            f"vocab_size must be >= {2 * (num_kv_pairs + 1)} for {num_kv_pairs} distinct keys in "
            f"[1, vocab_size // 2), got {vocab_size}"
        )
    if isinstance(power_a, bool) or not isinstance(power_a, numbers.Real):
        raise TypeError(f"power_a must be a float, got {type(power_a).__name__}")
    if not power_a > 0:
        raise ValueError(f"power_a must be > 0 (1 means uniform gaps), got {power_a}")
    check_bool("random_non_queries", random_non_queries)
    generator = torch_generator(seed)

    context_len = 2 * num_kv_pairs
    space = (input_seq_len - context_len) // 2  # >= num_kv_pairs since input_seq_len >= 4 * pairs
    ranks = torch.arange(1, space + 1, dtype=torch.float64)
    gap_weights = power_a * ranks ** (power_a - 1)  # [space]; multinomial normalises

    inputs = torch.zeros(num_examples, input_seq_len, dtype=torch.long)  # [N, L]
    labels = torch.full_like(inputs, MQAR_IGNORE_INDEX)  # [N, L]
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(len(key_range), len(value_range), space))
    for start in range(0, num_examples, rows_per_chunk):
        rows = min(rows_per_chunk, num_examples - start)
        keys = key_range.start + _random_subsets(rows, len(key_range), num_kv_pairs, generator)
        values = value_range.start + _random_subsets(rows, len(value_range), num_kv_pairs, generator)
        gaps = torch.multinomial(  # [rows, pairs], in draw order: gap j belongs to key j
            gap_weights.expand(rows, space), num_kv_pairs, replacement=False, generator=generator
        )
        query_positions = context_len + 2 * gaps  # [rows, pairs]

        block_inputs, block_labels = inputs[start : start + rows], labels[start : start + rows]
        block_inputs[:, 0:context_len:2] = keys
        block_inputs[:, 1:context_len:2] = values
        block_inputs.scatter_(1, query_positions, keys)
        block_labels.scatter_(1, query_positions, values)

    if random_non_queries:
        # keys are >= 1, so the zeros are exactly the non-query slots after the context
        filler = inputs == 0  # [N, L]
        inputs[filler] = torch.randint(vocab_size, (int(filler.sum()),), generator=generator)
    return MQARData(inputs, labels)


def _random_subsets(rows: int, population: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, size] distinct draws from range(population) per row, in random order.

    Draws with replacement and redraws the rows that repeat a number: conditioned on being
    distinct, uniform draws are a uniform subset in uniform order, and this costs O(size)
    per row instead of O(population) (8192-token vocabularies, 100K rows). When repeats are
    likely (size**2 > population) the `size` largest of `population` uniform scores are used
    instead: a uniform subset, and `topk` returns it in a random order.
    """
    if size * size > population:
        scores = torch.rand(rows, population, generator=generator)  # [rows, population]
        return scores.topk(size, dim=1).indices
    draws = torch.randint(population, (rows, size), generator=generator)  # [rows, size]
    while True:
        ordered = draws.sort(dim=1).values
        repeats = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)  # [rows]
        redo = int(repeats.sum())
        if redo == 0:
            return draws
        draws[repeats] = torch.randint(population, (redo, size), generator=generator)
