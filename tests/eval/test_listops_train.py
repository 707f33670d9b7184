"""sparse_attn.eval.listops_train: ListOps training end to end at tiny sizes, logits that do not
depend on padding (float64, every mechanism), resume = an uninterrupted run, argument errors."""

import json
import math

import pytest
import torch

from sparse_attn.eval import listops_train as lt
from sparse_attn.eval.listops_train import (
    LRA_LISTOPS_ACCURACY,
    LRA_LISTOPS_NAMES,
    ListOpsResult,
    evaluate_listops_model,
    listops_logits,
    listops_mechanisms,
    plot_listops,
    train_listops,
)
from sparse_attn.eval.tasks import LISTOPS_VOCAB, listops_dataset
from sparse_attn.nn import ModelConfig, SparseTransformer
from sparse_attn.train import loop as loop_module

TINY_MECHANISMS = listops_mechanisms(window=8, block=4, num_features=16, bucket_size=8, n_hashes=2)


def tiny_args(**overrides):
    args = {"train_examples": 120, "val_examples": 40, "test_examples": 40, "min_length": 10, "max_length": 40,
            "dim": 16, "layers": 2, "heads": 2, "mlp_ratio": 2.0, "batch": 8, "steps": 6, "lr": 3e-3, "warmup": 2,
            "weight_decay": 0.1, "eval_every": 3, "seed": 0, "device": "cpu", "dtype": "float32", "progress": False}
    args.update(overrides)
    return args


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Generated splits shared by the tests (the train split comes after 4K val/test trees)."""
    return str(tmp_path_factory.mktemp("listops_data"))


def without_times(history):
    return [{k: v for k, v in h.items() if k != "elapsed_s"} for h in history]


def test_tiny_run_end_to_end(cache, tmp_path):
    result = train_listops({"dense": "full", "window": TINY_MECHANISMS["sliding_window"]}, data_cache=cache,
                           **tiny_args())
    assert list(result.runs) == ["dense", "window"]
    maj = result.majority_accuracy
    assert set(maj) == {"train", "val", "test"} and all(0 <= a <= 1 for a in maj.values())
    counts = result.data["train"]["label_counts"]
    assert sum(counts) == 120 and result.data["majority_class"] == counts.index(max(counts))
    assert 12 <= result.data["train"]["min_length"] and result.data["train"]["max_length"] <= 40  # 10 < tree < 40, + <cls>
    for run in result.runs.values():
        assert 0 <= run.val_accuracy <= 1 and 0 <= run.test_accuracy <= 1 and 0 <= run.best_val_accuracy <= 1
        assert [h["step"] for h in run.history] == list(range(1, 7))
        assert [s for s, _ in run.evals()] == [3, 6] and run.val_accuracy == run.evals()[-1][1]
        assert run.best_val_step in (3, 6)
        assert all(math.isfinite(h["train_loss"]) and 0 <= h["train_accuracy"] <= 1 for h in run.history)
        assert run.parameters > 0 and run.train_seconds > 0 and run.steps_per_s > 0 and run.calls_per_step >= 1
    assert result.runs["dense"].lra_name == "Transformer"
    text = json.dumps(result.to_dict())
    again = ListOpsResult.from_dict(json.loads(text))
    assert again.runs["window"].test_accuracy == result.runs["window"].test_accuracy
    summary = result.summary()
    assert "| dense |" in summary and "majority class" in summary
    pytest.importorskip("matplotlib")
    plot_listops(result, tmp_path / "listops.png")
    plot_listops(json.loads(text), tmp_path / "listops_from_dict.png")
    assert (tmp_path / "listops.png").stat().st_size > 0 and (tmp_path / "listops_from_dict.png").stat().st_size > 0


def test_lra_reference_numbers():
    assert LRA_LISTOPS_ACCURACY["Transformer"] == 36.37 and LRA_LISTOPS_ACCURACY["Reformer"] == 37.27
    assert set(LRA_LISTOPS_NAMES.values()) <= set(LRA_LISTOPS_ACCURACY)
    assert set(listops_mechanisms()) == {"dense", "sliding_window", "longformer", "bigbird", "linear", "performer",
                                         "lsh"}


def _padded(rows, width):
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    return tokens, torch.tensor([len(r) for r in rows])


@pytest.mark.parametrize("name", list(TINY_MECHANISMS))
def test_padding_does_not_change_logits(name):
    torch.manual_seed(0)
    model = SparseTransformer(ModelConfig(vocab_size=len(LISTOPS_VOCAB), dim=16, num_layers=2, num_heads=2,
                                          mechanisms=TINY_MECHANISMS[name]), num_classes=10).double().eval()
    data = listops_dataset("test", 6, min_length=10, max_length=40, prepend_cls=True)
    rows = [data.tokens[i, : data.lengths[i]] for i in range(6)]
    example = rows[0]
    alone = model.classify(example[None])[0]
    with torch.no_grad():
        short = listops_logits(model, *_padded([example, rows[1]], len(example) + 1))
        long = listops_logits(model, *_padded([rows[2], rows[3], example, rows[4], rows[5], example], 45), max_batch=1)
    torch.testing.assert_close(short[0], alone, rtol=0, atol=1e-12)
    torch.testing.assert_close(long[2], alone, rtol=0, atol=1e-12)
    torch.testing.assert_close(long[5], alone, rtol=0, atol=1e-12)
    torch.testing.assert_close(long[0], model.classify(rows[2][None])[0], rtol=0, atol=1e-12)


def test_padded_examples_classify_as_alone():
    """With its padding_mask the encoder never attends pad keys (and pools real tokens only), so
    a padded example classifies as it does alone; listops_logits (batches cut per length) too."""
    torch.manual_seed(0)
    model = SparseTransformer(ModelConfig(vocab_size=len(LISTOPS_VOCAB), dim=16, num_layers=1, num_heads=2,
                                          mechanisms="full"), num_classes=10).double().eval()
    example = torch.tensor([1, 2, 9, 10, 6, 6])
    tokens, lengths = _padded([example], 10)
    mask = torch.arange(10)[None] < lengths[:, None]
    torch.testing.assert_close(model.classify(tokens, mask)[0], model.classify(example[None])[0], rtol=0, atol=1e-12)
    assert not torch.allclose(model.classify(tokens)[0], model.classify(example[None])[0], atol=1e-6)  # unmasked
    torch.testing.assert_close(listops_logits(model, tokens, lengths)[0], model.classify(example[None])[0],
                               rtol=0, atol=1e-12)


def test_logits_are_differentiable_and_evaluation_counts(cache):
    torch.manual_seed(0)
    model = SparseTransformer(ModelConfig(vocab_size=len(LISTOPS_VOCAB), dim=16, num_layers=1, num_heads=2,
                                          mechanisms="full"), num_classes=10)
    data = listops_dataset("test", 12, min_length=10, max_length=40, prepend_cls=True)
    logits = listops_logits(model, data.tokens, data.lengths, max_batch=3)
    logits.sum().backward()
    assert model.embed.weight.grad is not None and logits.shape == (12, 10)
    accuracy, loss = evaluate_listops_model(model, data, batch=5)
    expected = float((logits.argmax(-1) == data.labels).double().mean())
    assert accuracy == pytest.approx(expected) and math.isfinite(loss)


def test_batches_cover_each_epoch_sorted_within_chunks():
    lengths = torch.randint(5, 40, (100,))
    batches = lt.SortedBatches(lengths, batch=8, sort_chunk=50, seed=3)
    assert batches.per_epoch == 2 * (50 // 8)
    epoch = [batches(s) for s in range(batches.per_epoch)]
    seen = torch.cat(epoch)
    assert len(seen.unique()) == len(seen) == 96
    again = lt.SortedBatches(lengths, batch=8, sort_chunk=50, seed=3)
    assert all(torch.equal(again(s), b) for s, b in enumerate(epoch))
    assert not torch.equal(batches(batches.per_epoch), epoch[0])  # the next epoch is a new order
    whole = lt.SortedBatches(lengths, batch=8, sort_chunk=100, seed=3)
    spans = [int(lengths[whole(s)].max() - lengths[whole(s)].min()) for s in range(whole.per_epoch)]
    assert sum(spans) <= 35  # sorted whole: batches are contiguous runs of lengths


def test_resume_equals_an_uninterrupted_run(cache, tmp_path, monkeypatch):
    mechanisms = {"performer": TINY_MECHANISMS["performer"]}
    args = tiny_args(data_cache=cache)
    straight = train_listops(mechanisms, checkpoint=tmp_path / "a", **args)

    class Crash(Exception):
        pass

    save = loop_module.write_checkpoint

    def save_then_crash(path, payload):
        save(path, payload)
        if payload["step"] == 3:
            raise Crash  # the process dies right after the step-3 checkpoint

    monkeypatch.setattr(loop_module, "write_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        train_listops(mechanisms, checkpoint=tmp_path / "b", **args)
    monkeypatch.undo()
    assert torch.load(tmp_path / "b" / "performer.pt", weights_only=True)["step"] == 3
    resumed = train_listops(mechanisms, checkpoint=tmp_path / "b", resume=True, **args)

    a, b = straight.runs["performer"], resumed.runs["performer"]
    assert without_times(a.history) == without_times(b.history)
    assert (a.val_accuracy, a.test_accuracy, a.best_val_step) == (b.val_accuracy, b.test_accuracy, b.best_val_step)
    state_a = torch.load(tmp_path / "a" / "performer.pt", weights_only=True)["model"]
    state_b = torch.load(tmp_path / "b" / "performer.pt", weights_only=True)["model"]
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)

    # a finished run is read back, not rerun
    monkeypatch.setattr(loop_module, "write_checkpoint", lambda *a: pytest.fail("a finished run was trained again"))
    again = train_listops(mechanisms, checkpoint=tmp_path / "b", resume=True, **args)
    assert again.runs["performer"].test_accuracy == b.test_accuracy
    monkeypatch.undo()
    with pytest.raises(ValueError, match="other settings"):
        train_listops(mechanisms, checkpoint=tmp_path / "b", resume=True, **tiny_args(data_cache=cache, lr=1e-3))


@pytest.mark.parametrize("overrides, error, match", [
    ({"batch": 500}, ValueError, "batch"),
    ({"dtype": "float16"}, ValueError, "dtype"),
    ({"steps": 0}, ValueError, "steps"),
    ({"dim": 16.0}, TypeError, "dim"),
    ({"lr": -1.0}, ValueError, "lr"),
    ({"pooling": "max"}, ValueError, "pooling"),
    ({"sort_chunk": 4}, ValueError, "sort_chunk"),
    ({"resume": True}, ValueError, "checkpoint"),
    ({"val_examples": 3000}, ValueError, "val_examples"),
])
def test_argument_errors(cache, overrides, error, match):
    with pytest.raises(error, match=match):
        train_listops("full", **tiny_args(data_cache=cache, **overrides))


def test_mechanism_and_logits_errors():
    with pytest.raises(ValueError, match="at least one"):
        train_listops({}, **tiny_args())
    with pytest.raises(TypeError, match="spec strings"):
        train_listops([3], **tiny_args())
    with pytest.raises(ValueError, match="unknown mechanism"):
        train_listops("nonsense", **tiny_args(train_examples=8, val_examples=4, test_examples=4))
    model = SparseTransformer(ModelConfig(vocab_size=len(LISTOPS_VOCAB), dim=16, num_layers=1, num_heads=2,
                                          mechanisms="full"), num_classes=10)
    tokens = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="lengths must be in"):
        listops_logits(model, tokens, torch.tensor([3, 6]))
    with pytest.raises(ValueError, match="lengths must be an integer tensor"):
        listops_logits(model, tokens, torch.tensor([3]))
    with pytest.raises(ValueError, match="tokens must be"):
        listops_logits(model, tokens.float(), torch.tensor([3, 5]))
    with pytest.raises(ValueError, match="window"):
        listops_mechanisms(window=0)
    # ids are checked per split (once, on the host) where the steps skip the per-call check
    bad = listops_dataset("test", 4, min_length=10, max_length=20, prepend_cls=True)
    bad.tokens[1, 0] = len(LISTOPS_VOCAB)
    with pytest.raises(ValueError, match=rf"data.tokens must be token ids in \[0, {len(LISTOPS_VOCAB)}\)"):
        evaluate_listops_model(model, bad, batch=2)
    with pytest.raises(ValueError, match=r"tokens must be in \[0"):
        listops_logits(model, bad.tokens, bad.lengths)
