"""Passkey and MQAR experiments with small trained causal LMs (`eval.recall`): the loss and
the metrics on hand-made tensors, a tiny end-to-end run, the reach bounds, argument errors."""

import json
import time

import pytest
import torch

from sparse_attn.eval.recall import (
    MQARResult,
    PasskeyResult,
    default_schedules,
    mqar_accuracy,
    mqar_experiment,
    passkey_accuracy,
    passkey_experiment,
    passkey_loss,
    plot_mqar,
    plot_passkey,
    scaled_init_,
)
from sparse_attn.eval.tasks import mqar_dataset, passkey_batch, passkey_min_length
from sparse_attn.nn import ModelConfig, SparseCausalLM

TINY = {"steps": 2, "dim": 16, "layers": 2, "heads": 2, "batch": 4, "test_examples": 3, "progress": False}


# ---------------------------------------------------------------- loss and metrics
def test_passkey_loss_masks_all_but_the_answer():
    b = passkey_batch(3, 300, digits=4, seed=1)
    logits = torch.randn(3, 299, 256, requires_grad=True)
    passkey_loss(logits, b.tokens, b.answer_start).backward()
    touched = logits.grad.abs().sum(-1) > 0  # [N, L-1]
    expected = torch.zeros_like(touched)
    expected[:, b.answer_start - 1:] = True  # positions predicting the 4 digits
    assert torch.equal(touched, expected)


def test_passkey_loss_value_and_lm_weight():
    b = passkey_batch(2, 280, digits=2, seed=0)
    logits = torch.randn(2, 279, 256)
    targets = b.tokens[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [N, L-1]
    answer = ce[:, b.answer_start - 1:].mean()
    assert torch.allclose(passkey_loss(logits, b.tokens, b.answer_start), answer)
    got = passkey_loss(logits, b.tokens, b.answer_start, lm_weight=0.5)
    assert torch.allclose(got, answer + 0.5 * ce.mean())
    # logits of model(tokens) (length L) give the same loss: the last position is ignored
    full = torch.cat([logits, torch.randn(2, 1, 256)], 1)
    assert torch.allclose(passkey_loss(full, b.tokens, b.answer_start), answer)


def test_passkey_accuracy_on_hand_made_logits():
    # sequences of length 10, answer = positions 7..9 (3 digits), predicted by logits 6..8
    answer = torch.tensor([[ord("1"), ord("2"), ord("3")], [ord("4"), ord("5"), ord("6")]])
    logits = torch.zeros(2, 9, 256)
    for row in range(2):
        for i in range(3):
            logits[row, 6 + i, answer[row, i]] = 5.0
    logits[1, 7, ord("0")] = 9.0  # row 1 gets its second digit wrong
    logits[:, :6, ord("9")] = 100.0  # positions before the answer do not count
    exact, per_digit = passkey_accuracy(logits, answer, 7)
    assert exact.tolist() == [True, False]
    assert per_digit.tolist() == [[True, True, True], [True, False, True]]
    # the same with logits over the whole sequence (length 10)
    exact2, _ = passkey_accuracy(torch.cat([logits, torch.zeros(2, 1, 256)], 1), answer, 7)
    assert torch.equal(exact, exact2)


def test_mqar_accuracy_on_hand_made_logits():
    labels = torch.full((2, 6), -100)
    labels[0, 3], labels[0, 5], labels[1, 4] = 7, 8, 9
    logits = torch.zeros(2, 6, 10)
    logits[0, 3, 7] = 1  # right
    logits[0, 5, 2] = 1  # wrong
    logits[1, 4, 9] = 1  # right
    logits[1, 0, 3] = 1  # unlabelled: ignored
    assert mqar_accuracy(logits, labels) == (2, 3)


def test_metric_argument_errors():
    with pytest.raises(ValueError, match="logits"):
        passkey_accuracy(torch.zeros(2, 9), torch.zeros(2, 3, dtype=torch.long), 7)
    with pytest.raises(ValueError, match="rows"):
        passkey_accuracy(torch.zeros(3, 9, 256), torch.zeros(2, 3, dtype=torch.long), 7)
    with pytest.raises(ValueError, match="length"):
        passkey_accuracy(torch.zeros(2, 20, 256), torch.zeros(2, 3, dtype=torch.long), 7)
    with pytest.raises(ValueError, match="labels"):
        mqar_accuracy(torch.zeros(2, 6, 10), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="lm_weight"):
        passkey_loss(torch.zeros(1, 9, 256), torch.zeros(1, 10, dtype=torch.long), 7, lm_weight=-1)


# ----------------------------------------------------------------------- end to end
def test_passkey_experiment_end_to_end(tmp_path):
    n0 = passkey_min_length(2)
    lengths = [n0 + 20, n0 + 100]
    res = passkey_experiment({"dense": "causal", "window": "sliding_window:window=8"}, n0 + 20, lengths,
                             digits=2, depths=[0.0, 1.0], **TINY)
    assert isinstance(res, PasskeyResult)
    assert res.lengths == lengths and list(res.accuracy) == ["dense", "window"]
    for name in res.accuracy:
        assert len(res.accuracy[name]) == 2 and all(0 <= a <= 1 for a in res.accuracy[name])
        assert len(res.depth_accuracy[name]) == 2 and all(len(row) == 2 for row in res.depth_accuracy[name])
        assert res.training[name]["loss_curve"][-1][0] == TINY["steps"]
    # reach: dense sees everything; a window of 8 over 2 layers spans 2 * 7 = 14 positions and
    # reaches no key (the key line ends more than 14 positions before the answer)
    assert [r["span"] for r in res.reach["dense"]] == [n - 3 for n in lengths]
    assert all(r["key_reachable"] == 1.0 for r in res.reach["dense"])
    assert [r["span"] for r in res.reach["window"]] == [14, 14]
    assert all(r["key_reachable"] == 0.0 for r in res.reach["window"])
    d = json.loads(json.dumps(res.to_dict()))
    assert d["task"] == "passkey" and d["settings"]["digits"] == 2
    assert PasskeyResult.from_dict(d).to_dict() == d
    text = res.summary()
    assert "dense" in text and str(lengths[1]) in text
    pytest.importorskip("matplotlib")
    plot_passkey(res, tmp_path / "passkey.png")
    assert (tmp_path / "passkey.png").stat().st_size > 0


def test_mqar_experiment_end_to_end(tmp_path):
    res = mqar_experiment({"dense": "causal", "window": "sliding_window:window=4", "linear": "linear:causal=true"},
                          [2, 4], seq_len=32, vocab_size=32, **TINY)
    assert isinstance(res, MQARResult)
    assert res.num_kv_pairs == [2, 4]
    for name in ("dense", "window", "linear"):
        assert len(res.accuracy[name]) == 2 and all(0 <= a <= 1 for a in res.accuracy[name])
    assert res.reach["dense"] == [1.0, 1.0] and res.reach["linear"] == [1.0, 1.0]
    assert all(r < 1.0 for r in res.reach["window"])
    assert res.settings["rows_per_pair_count"] == [2, 2]
    d = json.loads(json.dumps(res.to_dict()))
    assert d["task"] == "mqar"
    assert MQARResult.from_dict(d).to_dict() == d
    assert "pairs" in res.summary()
    pytest.importorskip("matplotlib")
    plot_mqar(res, tmp_path / "mqar.png")
    assert (tmp_path / "mqar.png").stat().st_size > 0


def test_mqar_reach_matches_brute_force():
    """The reach bound counts a query when its value position is within the window's reach."""
    res = mqar_experiment({"w": "sliding_window:window=3"}, [4], seq_len=32, vocab_size=32, steps=1, dim=16,
                          heads=2, batch=4, test_examples=16, progress=False, layers=1)
    from sparse_attn.eval.recall import _seed

    data = mqar_dataset(16, vocab_size=32, input_seq_len=32, num_kv_pairs=4, seed=_seed(0, 4, 4))
    hits = total = 0
    for r, t in (data.labels != -100).nonzero().tolist():
        j = data.inputs[r, 0:8:2].tolist().index(int(data.inputs[r, t]))
        hits += (t - (2 * j + 1)) <= 2  # one causal window of 3: keys t-2..t
        total += 1
    assert res.reach["w"] == [pytest.approx(hits / total)]


def test_default_schedules():
    s = default_schedules(3, 16, sinks=2)
    assert s["dense"] == "causal" and s["sliding_window"] == "sliding_window:window=16"
    assert s["streaming"] == "streaming:sinks=2,window=16" and s["linear"] == "linear:causal=true"
    assert s["hybrid"] == ["sliding_window:window=16"] * 2 + ["causal"]
    assert "hybrid" not in default_schedules(1)


def test_dense_learns_a_short_passkey():
    """A dense model finds a 1-digit key in a short sequence. Skipped when this machine would
    take more than about 20 s to train it (timed on a few steps first); the benchmark
    (benchmarks/recall.py) shows the same at scale."""
    n = passkey_min_length(1) + 24
    args = {"dim": 32, "layers": 2, "heads": 2, "batch": 16, "lr": 3e-3, "digits": 1, "depths": [0.0, 0.5, 1.0],
            "test_examples": 32, "progress": False}
    steps = 200
    probe = {**args, "depths": [0.0], "test_examples": 2}  # time the training steps, little else
    seconds = []
    for probe_steps in (2, 6, 16):  # the first call warms up; the others give the cost of 10 steps
        start = time.perf_counter()
        passkey_experiment({"dense": "causal"}, n, [n], steps=probe_steps, **probe)
        seconds.append(time.perf_counter() - start)
    projected = (seconds[2] - seconds[1]) / 10 * steps
    if projected > 20:
        pytest.skip(f"too slow here to train in time (about {projected:.0f} s projected)")
    res = passkey_experiment({"dense": "causal"}, n, [n], steps=steps, **args)
    assert res.accuracy["dense"][0] >= 0.9


# ------------------------------------------------------------------- argument errors
@pytest.mark.parametrize("kwargs, error, match", [
    ({"schedules": {}}, ValueError, "schedules is empty"),
    ({"schedules": ["causal"]}, TypeError, "schedules must be a dict"),
    ({"schedules": {"bi": "sliding_window:window=8,causal=false"}}, ValueError, "schedule 'bi'"),
    ({"schedules": {"lin": "linear"}}, ValueError, "causal=true"),
    ({"train_length": 100}, ValueError, "train_length"),
    ({"test_lengths": []}, ValueError, "test_lengths"),
    ({"test_lengths": [100]}, ValueError, "test_lengths entry"),
    ({"depths": [1.5]}, ValueError, "depths entry"),
    ({"digits": 0}, ValueError, "digits"),
    ({"steps": 0}, ValueError, "steps"),
    ({"lr": 0}, ValueError, "lr"),
    ({"dim": 30, "heads": 4}, ValueError, "multiple of heads"),
    ({"dtype": "float16"}, ValueError, "dtype"),
    ({"lm_weight": -0.1}, ValueError, "lm_weight"),
])
def test_passkey_argument_errors(kwargs, error, match):
    args = {"schedules": {"dense": "causal"}, "train_length": 300, "test_lengths": [300], "steps": 1, "progress": False}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        passkey_experiment(args.pop("schedules"), args.pop("train_length"), args.pop("test_lengths"), **args)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"num_kv_pairs_list": []}, ValueError, "num_kv_pairs_list"),
    ({"num_kv_pairs_list": [20]}, ValueError, "input_seq_len"),
    ({"vocab_size": 8}, ValueError, "vocab_size"),
    ({"batch": 1}, ValueError, "batch"),
    ({"schedules": {"bi": "full"}}, ValueError, "schedule 'bi'"),
])
def test_mqar_argument_errors(kwargs, error, match):
    args = {"schedules": {"dense": "causal"}, "num_kv_pairs_list": [2, 4], "seq_len": 32, "vocab_size": 32, "steps": 1,
                "progress": False}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        mqar_experiment(args.pop("schedules"), args.pop("num_kv_pairs_list"), **args)


def test_scaled_init_scales_every_weight_by_its_fan_in():
    """Linear N(0, 1/fan_in); the tied embedding N(0, 1/dim) ("fan_in", so the first logits are
    O(1) whatever the vocabulary) or N(0, 1) ("unit", the earlier default)."""
    cfg = ModelConfig(vocab_size=4096, dim=64, num_layers=1, num_heads=4, mechanisms="causal")
    torch.manual_seed(0)
    model = scaled_init_(SparseCausalLM(cfg))
    assert abs(model.embed.weight.std().item() - 64 ** -0.5) < 0.005
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            assert abs(module.weight.std().item() - module.in_features ** -0.5) < 0.1 * module.in_features ** -0.5
    logits = model(torch.randint(0, 4096, (2, 32)))
    assert logits.std().item() < 3  # a unit embedding under the tied head gives ~sqrt(64) = 8
    unit = scaled_init_(SparseCausalLM(cfg), embedding="unit")
    assert abs(unit.embed.weight.std().item() - 1.0) < 0.01
    assert unit(torch.randint(0, 4096, (2, 32))).std().item() > 5
    with pytest.raises(ValueError, match="embedding must be 'fan_in' or 'unit'"):
        scaled_init_(SparseCausalLM(cfg), embedding="normal")


def test_mqar_counts_by_chunks_on_the_device_equal_the_whole_logits():
    """The test set is scored chunk by chunk (its whole logits would be 8.4 GB at Zoology's size):
    the same counts as mqar_accuracy over every logit at once, with a ragged last chunk."""
    from sparse_attn.eval.recall import _logits, _mqar_counts, _train_config

    torch.manual_seed(0)
    model = SparseCausalLM(ModelConfig(vocab_size=32, dim=16, num_layers=1, num_heads=2)).eval()
    data = mqar_dataset(11, vocab_size=32, input_seq_len=24, num_kv_pairs=4, seed=1)
    cfg = _train_config(24, 4, 1, 1e-3, 0.0, 0, "cpu", "float32")
    whole = mqar_accuracy(_logits(model, data.inputs, 4, cfg), data.labels)
    assert _mqar_counts(model, data, 4, cfg) == whole and whole[1] > 0
