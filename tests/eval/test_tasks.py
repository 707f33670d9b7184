"""Task generators: ListOps (LRA), MQAR (Zoology), passkey (Landmark Attention).

Labels are checked by evaluators written here, independently of the generators' own.
"""

import math
import random
import re
import statistics

import pytest
import torch

from sparse_attn.eval.tasks import (
    LISTOPS_SPLIT_SIZES,
    LISTOPS_VOCAB,
    MQAR_IGNORE_INDEX,
    ListOpsVocab,
    decode_bytes,
    encode_bytes,
    evaluate_listops,
    generate_listops_tree,
    listops_dataset,
    listops_source,
    listops_tokens,
    mqar_dataset,
    mqar_vocab_ranges,
    passkey_batch,
    passkey_example,
    passkey_min_length,
)
from sparse_attn.eval.tasks import listops as listops_module
from sparse_attn.eval.tasks import passkey as passkey_module

# CPU-sized ListOps: the generator's full spec is 500 < length < 2000, 96K examples. TINY is
# for the tests that need the train split, which comes after the 4K test/val trees of the stream.
SMALL = {"min_length": 50, "max_length": 200}
TINY = {"min_length": 10, "max_length": 40}


# ---- an independent ListOps parser --------------------------------------------------------

def _stack_evaluate(tokens):
    """(value, max leaf depth, argument counts) of prefix ListOps tokens, by a stack machine."""
    stack = []  # each frame: [operator, arguments]
    depth = max_depth = 0
    arg_counts = []
    result = None
    for token in tokens:
        if token.startswith("["):
            stack.append([token, []])
            depth += 1
            continue
        if token == "]":
            operator, args = stack.pop()
            arg_counts.append(len(args))
            depth -= 1
            if operator == "[MIN":
                value = min(args)
            elif operator == "[MAX":
                value = max(args)
            elif operator == "[MED":
                value = math.floor(statistics.median(args))
            elif operator == "[SM":
                value = sum(args) % 10
            else:
                raise AssertionError(f"unknown operator {operator}")
        else:
            value = int(token)
            assert 0 <= value <= 9
            max_depth = max(max_depth, depth + 1)  # the root is depth 1, as in LRA
        if stack:
            stack[-1][1].append(value)
        else:
            assert result is None, "more than one tree in a sequence"
            result = value
    assert not stack and result is not None
    return result, max_depth, arg_counts


def _rows(data):
    return [tuple(row[:n].tolist()) for row, n in zip(data.tokens, data.lengths)]


@pytest.fixture(scope="module")
def small_split():
    return listops_dataset("test", 300, seed=3, **SMALL)


# ---- ListOps ------------------------------------------------------------------------------

def test_listops_labels_agree_with_an_independent_evaluator(small_split):
    tokens, lengths, labels = small_split
    assert tokens.dtype == lengths.dtype == labels.dtype == torch.long
    assert tokens.shape == (300, int(lengths.max())) and labels.shape == lengths.shape == (300,)
    for row, length, label in zip(tokens, lengths, labels):
        value, _, _ = _stack_evaluate(LISTOPS_VOCAB.decode(row[:length]))
        assert value == label
    assert set(labels.tolist()) == set(range(10))


def test_listops_lengths_padding_and_limits(small_split):
    tokens, lengths, _ = small_split
    assert ((lengths > 50) & (lengths < 200)).all()  # LRA's bounds are exclusive
    columns = torch.arange(tokens.shape[1])
    real = columns < lengths[:, None]
    assert (tokens[~real] == LISTOPS_VOCAB.pad_id).all()
    assert (tokens[real] >= 2).all()  # neither pad nor cls inside a sequence
    for row, length in zip(tokens, lengths):
        _, depth, arg_counts = _stack_evaluate(LISTOPS_VOCAB.decode(row[:length]))
        assert depth <= 10 and all(2 <= n <= 10 for n in arg_counts)


def test_listops_tighter_depth_and_argument_limits():
    data = listops_dataset("val", 100, seed=0, min_length=10, max_length=60, max_depth=4, max_args=3)
    depths = []
    for row, length, label in zip(*data):
        value, depth, arg_counts = _stack_evaluate(LISTOPS_VOCAB.decode(row[:length]))
        assert value == label and depth <= 4 and all(2 <= n <= 3 for n in arg_counts)
        depths.append(depth)
    assert max(depths) == 4


def test_listops_trees_tokens_source_and_evaluator_agree():
    rng = random.Random(11)
    seen_operator = False
    for _ in range(300):
        tree = generate_listops_tree(rng)
        tokens = listops_tokens(tree)
        value, depth, arg_counts = _stack_evaluate(tokens)
        assert evaluate_listops(tree) == value and depth <= 10 and all(2 <= n <= 10 for n in arg_counts)
        # LRA's TSV Source: the same tokens once its parentheses are stripped
        assert listops_source(tree).replace("(", " ").replace(")", " ").split() == tokens
        seen_operator |= len(tokens) > 1
    assert seen_operator


def test_listops_source_format_and_operator_semantics():
    assert listops_source(("[MIN", (1, 2))) == "( ( ( [MIN 1 ) 2 ) ] )"
    assert listops_source(7) == "7"
    assert evaluate_listops(("[MED", (1, 2))) == 1  # int(np.median([1, 2])) = int(1.5)
    assert evaluate_listops(("[MED", (9, 0, 6, 3))) == 4  # middle 3 and 6
    assert evaluate_listops(("[MED", (5, 1, 9))) == 5
    assert evaluate_listops(("[SM", (9, 9, 5))) == 3
    nested = ("[MAX", (4, 3, ("[MIN", (2, 3)), 1, 0, ("[MED", (1, 5, 8, 9, 2))))
    written = "[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]"
    assert " ".join(listops_tokens(nested)) == written
    assert evaluate_listops(nested) == 5


def test_listops_same_seed_same_data_and_int_or_generator_seeds():
    a = listops_dataset("test", 40, seed=5, **SMALL)
    b = listops_dataset("test", 40, seed=5, **SMALL)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = listops_dataset("test", 40, seed=6, **SMALL)
    assert not torch.equal(a.labels, c.labels) or not torch.equal(a.lengths, c.lengths)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    d, e = listops_dataset("test", 20, seed=g1, **SMALL), listops_dataset("test", 20, seed=g2, **SMALL)
    assert torch.equal(d.tokens, e.tokens)
    assert generate_listops_tree(torch.Generator().manual_seed(4)) == generate_listops_tree(
        torch.Generator().manual_seed(4)
    )


def test_listops_splits_differ_are_disjoint_and_prefix_stable():
    splits = {s: listops_dataset(s, 150, seed=1, **TINY) for s in ("train", "val", "test")}
    rows = {s: set(_rows(d)) for s, d in splits.items()}
    assert all(len(r) == 150 for r in rows.values())  # no duplicates inside a split
    assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"]
    assert not rows["val"] & rows["test"]
    shorter = listops_dataset("val", 60, seed=1, **TINY)
    assert _rows(shorter) == _rows(splits["val"])[:60]


def test_listops_prepend_cls():
    plain = listops_dataset("test", 10, seed=2, **SMALL)
    with_cls = listops_dataset("test", 10, seed=2, prepend_cls=True, **SMALL)
    assert (with_cls.tokens[:, 0] == LISTOPS_VOCAB.cls_id).all()
    assert torch.equal(with_cls.lengths, plain.lengths + 1)
    assert torch.equal(with_cls.tokens[:, 1:], plain.tokens)


def test_listops_vocab_round_trip():
    vocab = ListOpsVocab()
    assert vocab.pad_id == 0 and vocab.tokens[0] == "<pad>" and vocab.tokens[vocab.cls_id] == "<cls>"
    assert len(vocab) == 17  # pad, cls, 4 operators, "]", 10 digits
    assert len(set(vocab.tokens)) == len(vocab)
    assert vocab.decode(vocab.encode(list(vocab.tokens))) == list(vocab.tokens)
    ids = torch.arange(len(vocab))
    assert vocab.encode(vocab.decode(ids)) == ids.tolist()
    assert vocab.encode(["[SM", "1", "2", "]"]) == [5, 8, 9, 6]
    with pytest.raises(ValueError, match="tokens contains '\\)'"):
        vocab.encode(["[MIN", ")"])
    with pytest.raises(TypeError, match="tokens"):
        vocab.encode("[MIN 1 2 ]")
    with pytest.raises(ValueError, match="ids contains 17"):
        vocab.decode([17])


def test_listops_argument_errors(monkeypatch):
    with pytest.raises(ValueError, match="split must be one of"):
        listops_dataset("dev", 10)
    with pytest.raises(ValueError, match="num_examples for split 'val' must be <= 2000"):
        listops_dataset("val", 2001, **SMALL)
    with pytest.raises(ValueError, match="num_examples must be >= 1"):
        listops_dataset("train", 0)
    with pytest.raises(TypeError, match="num_examples must be an int"):
        listops_dataset("train", 1.5)
    with pytest.raises(ValueError, match="max_length must be >= 52"):
        listops_dataset("train", 10, min_length=50, max_length=51)
    with pytest.raises(ValueError, match="min_length must be below 12"):
        listops_dataset("train", 10, min_length=20, max_length=40, max_depth=2)
    with pytest.raises(ValueError, match="max_args must be >= 2"):
        listops_dataset("train", 10, max_args=1)
    with pytest.raises(TypeError, match="seed must be an int or a torch.Generator"):
        listops_dataset("train", 10, seed="0")
    with pytest.raises(ValueError, match="seed must be >= 0"):
        listops_dataset("train", 10, seed=-1)
    with pytest.raises(TypeError, match="prepend_cls must be a bool"):
        listops_dataset("train", 10, prepend_cls=1, **SMALL)
    # with max_depth=2, max_args=2 the only 4-token trees are [OP a b ]: 4 x 10 x 10 of them
    monkeypatch.setattr(listops_module, "_MAX_FRUITLESS_DRAWS", 20_000)
    with pytest.raises(ValueError, match="widen min_length/max_length"):
        listops_dataset("train", 500, min_length=3, max_length=5, max_depth=2, max_args=2)
    assert LISTOPS_SPLIT_SIZES == {"train": 96_000, "val": 2_000, "test": 2_000}


# ---- MQAR ---------------------------------------------------------------------------------

def _check_mqar(inputs, labels, vocab_size, num_kv_pairs):
    keys_range, values_range = mqar_vocab_ranges(vocab_size)
    context = 2 * num_kv_pairs
    for row_inputs, row_labels in zip(inputs.tolist(), labels.tolist()):
        keys, values = row_inputs[0:context:2], row_inputs[1:context:2]
        assert len(set(keys)) == num_kv_pairs and len(set(values)) == num_kv_pairs
        assert all(k in keys_range for k in keys) and all(v in values_range for v in values)
        paired = dict(zip(keys, values))
        queried = [t for t, label in enumerate(row_labels) if label != MQAR_IGNORE_INDEX]
        assert len(queried) == num_kv_pairs and all(t >= context and (t - context) % 2 == 0 for t in queried)
        assert sorted(row_inputs[t] for t in queried) == sorted(keys)  # each key asked once
        for t in queried:
            assert row_labels[t] == paired[row_inputs[t]]


def test_mqar_labels_are_the_paired_values():
    inputs, labels = mqar_dataset(200, vocab_size=512, input_seq_len=128, num_kv_pairs=16, seed=0)
    assert inputs.shape == labels.shape == (200, 128) and inputs.dtype == labels.dtype == torch.long
    assert ((inputs >= 0) & (inputs < 512)).all()
    _check_mqar(inputs, labels, 512, 16)


def test_mqar_zoology_docstring_example_shape():
    # Zoology's example: vocab 12, 2 pairs, length 16, zeros left between queries
    inputs, labels = mqar_dataset(50, vocab_size=12, input_seq_len=16, num_kv_pairs=2,
                                  random_non_queries=False, seed=1)
    _check_mqar(inputs, labels, 12, 2)
    not_query = labels[:, 4:] == MQAR_IGNORE_INDEX
    assert (inputs[:, 4:][not_query] == 0).all()
    # many pairs in a small vocabulary: the other subset sampler
    inputs, labels = mqar_dataset(50, vocab_size=40, input_seq_len=64, num_kv_pairs=16, seed=1)
    _check_mqar(inputs, labels, 40, 16)


def test_mqar_power_law_puts_queries_early():
    args = {"vocab_size": 256, "input_seq_len": 256, "num_kv_pairs": 4, "seed": 0}
    skewed = mqar_dataset(500, power_a=0.01, **args).labels != MQAR_IGNORE_INDEX
    uniform = mqar_dataset(500, power_a=1.0, **args).labels != MQAR_IGNORE_INDEX
    positions = torch.arange(256).float()
    mean_skewed = positions[skewed.nonzero()[:, 1]].mean()
    mean_uniform = positions[uniform.nonzero()[:, 1]].mean()
    assert mean_skewed < 0.5 * mean_uniform


def test_mqar_determinism():
    a = mqar_dataset(30, vocab_size=100, input_seq_len=32, num_kv_pairs=4, seed=7)
    b = mqar_dataset(30, vocab_size=100, input_seq_len=32, num_kv_pairs=4, seed=7)
    c = mqar_dataset(30, vocab_size=100, input_seq_len=32, num_kv_pairs=4, seed=8)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, c.inputs)
    g = torch.Generator().manual_seed(7)
    d = mqar_dataset(30, vocab_size=100, input_seq_len=32, num_kv_pairs=4, seed=g)
    e = mqar_dataset(30, vocab_size=100, input_seq_len=32, num_kv_pairs=4, seed=g)
    assert not torch.equal(d.inputs, e.inputs)  # the generator advanced


def test_mqar_argument_errors():
    with pytest.raises(ValueError, match="input_seq_len must be >= 4 \\* num_kv_pairs = 40"):
        mqar_dataset(4, vocab_size=1000, input_seq_len=32, num_kv_pairs=10)
    with pytest.raises(ValueError, match="input_seq_len must be even"):
        mqar_dataset(4, vocab_size=1000, input_seq_len=33, num_kv_pairs=4)
    with pytest.raises(ValueError, match="vocab_size must be >= 34"):
        mqar_dataset(4, vocab_size=32, input_seq_len=128, num_kv_pairs=16)
    with pytest.raises(ValueError, match="power_a must be > 0"):
        mqar_dataset(4, power_a=0.0)
    with pytest.raises(TypeError, match="power_a must be a float"):
        mqar_dataset(4, power_a="0.01")
    with pytest.raises(ValueError, match="num_examples must be >= 1"):
        mqar_dataset(0)
    with pytest.raises(TypeError, match="num_kv_pairs must be an int"):
        mqar_dataset(4, num_kv_pairs=2.0)
    with pytest.raises(TypeError, match="random_non_queries must be a bool"):
        mqar_dataset(4, random_non_queries=None)
    with pytest.raises(TypeError, match="seed must be an int or a torch.Generator"):
        mqar_dataset(4, seed=1.0)


# ---- passkey ------------------------------------------------------------------------------

TASK = passkey_module.TASK_DESCRIPTION
FILLER = passkey_module.FILLER_SENTENCES
QUESTION = "What is the pass key? The pass key is"


def _check_passkey_row(tokens, answer_start, answer, key_position, length, digits):
    text = decode_bytes(tokens)
    prompt, answer_text = text[:answer_start], decode_bytes(answer)
    assert tokens.shape == (length,) and answer.shape == (digits,)
    assert text[answer_start:] == answer_text and re.fullmatch(rf"[1-9]\d{{{digits - 1}}}", answer_text)
    assert prompt.startswith(TASK + "\n") and prompt.endswith("\n" + QUESTION + " ")
    key_text = f"The pass key is {answer_text}. Remember it. {answer_text} is the pass key."
    assert prompt.count(key_text) == 1 and prompt.count(answer_text) == 2
    assert prompt.index(key_text) == key_position
    # the filler before and after the key is Landmark's: both cut from the filler's start
    before = prompt[len(TASK) + 1 : key_position - 1]
    after = prompt[key_position + len(key_text) + 1 : -len(QUESTION) - 2]
    endless = " ".join([FILLER] * (length // len(FILLER) + 2))
    assert endless.startswith(before) and endless.startswith(after)
    return len(before), len(before) + len(after)


@pytest.mark.parametrize("length", [passkey_min_length(), 300, 1001, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_passkey_format_length_and_depth(length, depth):
    batch = passkey_batch(3, length, depth=depth, seed=4)
    assert batch.tokens.shape == (3, length) and batch.answer.shape == (3, 5)
    assert batch.answer_start == length - 5 and batch.tokens.dtype == torch.long
    for row in range(3):
        before, filler = _check_passkey_row(batch.tokens[row], batch.answer_start, batch.answer[row],
                                            int(batch.key_positions[row]), length, 5)
        assert abs(before - depth * filler) <= len(FILLER) + 1  # within one filler sentence
        if depth == 0.0:
            assert before == 0
        if depth == 1.0:
            assert before == filler


def test_passkey_random_depth_digits_and_example():
    batch = passkey_batch(20, 2000, digits=3, seed=0)
    for row in range(20):
        _check_passkey_row(batch.tokens[row], batch.answer_start, batch.answer[row],
                           int(batch.key_positions[row]), 2000, 3)
    assert len(set(batch.key_positions.tolist())) > 10  # depth drawn per example
    example = passkey_example(2000, digits=3, seed=0)
    assert torch.equal(example.tokens, batch.tokens[0]) and example.key_position == batch.key_positions[0]
    assert example.answer_start == 1997 and torch.equal(example.answer, batch.answer[0])
    one_digit = passkey_example(passkey_min_length(1) + 10, digits=1, seed=3)
    _check_passkey_row(*one_digit, passkey_min_length(1) + 10, 1)


def test_passkey_determinism():
    a, b = passkey_batch(4, 500, seed=1), passkey_batch(4, 500, seed=1)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.key_positions, b.key_positions)
    c = passkey_batch(4, 500, seed=2)
    assert not torch.equal(a.answer, c.answer)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(passkey_batch(2, 500, seed=g1).tokens, passkey_batch(2, 500, seed=g2).tokens)


def test_passkey_argument_errors_and_bytes():
    with pytest.raises(ValueError, match=f"length_tokens must be >= {passkey_min_length()}"):
        passkey_batch(1, passkey_min_length() - 1)
    with pytest.raises(ValueError, match="depth must be <= 1, got 1.5"):
        passkey_batch(1, 500, depth=1.5)
    with pytest.raises(TypeError, match="depth must be a float"):
        passkey_batch(1, 500, depth="middle")
    with pytest.raises(ValueError, match="digits must be >= 1"):
        passkey_example(500, digits=0)
    with pytest.raises(ValueError, match="digits must be <= 18"):
        passkey_example(500, digits=19)
    with pytest.raises(TypeError, match="seed must be an int or a torch.Generator"):
        passkey_example(500, seed=True)
    text = "The pass key is 42. Épée"
    assert decode_bytes(encode_bytes(text)) == text
    assert encode_bytes("A\n").tolist() == [65, 10]
    with pytest.raises(TypeError, match="tokens must be a torch.Tensor"):
        decode_bytes([65])


def test_listops_from_stream_marks_equals_the_sequential_stream():
    from sparse_attn.eval.tasks import listops_stream_marks

    settings = {"seed": 3, "min_length": 20, "max_length": 60}
    # test: the stream's first split; val: after test's 2,000 trees (offset); the stretches drawn in
    # this process (the test below draws them in two processes)
    for split, n, workers in (("test", 150, 1), ("val", 10, 1)):
        sequential = listops_dataset(split, n, **settings, prepend_cls=True)
        marks = listops_stream_marks(split, n, **settings, every=97 if split == "test" else 4000)
        assert len(marks["states"]) == -(-marks["draws"] // marks["every"]) >= 2
        fast = listops_dataset(split, n, **settings, prepend_cls=True, marks=marks, workers=workers)
        assert all(torch.equal(a, b) for a, b in zip(fast, sequential))
    with pytest.raises(ValueError, match="marks were made for"):
        listops_dataset("val", 10, seed=4, min_length=20, max_length=60, marks=marks)
    broken = {**marks, "states": marks["states"][1:] + marks["states"][:1]}
    with pytest.raises(ValueError, match="digest"):
        listops_dataset("val", 10, **settings, marks=broken)


@pytest.mark.slow
def test_listops_from_stream_marks_in_processes():
    from sparse_attn.eval.tasks import listops_stream_marks

    settings = {"seed": 3, "min_length": 20, "max_length": 60}
    marks = listops_stream_marks("test", 150, **settings, every=97)
    fast = listops_dataset("test", 150, **settings, marks=marks, workers=2)
    assert all(torch.equal(a, b) for a, b in zip(fast, listops_dataset("test", 150, **settings)))
