"""sparse_attn.train: the generated corpus, token windows, the learning-rate schedule, the training
loop (loss falls, resume equals an uninterrupted run, atomic checkpoints) and `sparse-attn train`.
Tiny models (dim 32, 2 layers, seq 32) so the whole file runs in seconds."""

import itertools
import json
import math
import re

import pytest
import torch
from sa_testing import run_cli

from sparse_attn.nn import ModelConfig, SparseCausalLM
from sparse_attn.train import (
    TokenData,
    TrainConfig,
    evaluate,
    load_checkpoint,
    lr_at,
    synthetic_corpus,
    train_lm,
)
from sparse_attn.train import lm as lm_module
from sparse_attn.train import loop as loop_module

CORPUS_BYTES = 50_000


@pytest.fixture(scope="module")
def data():
    return TokenData.from_bytes(synthetic_corpus(CORPUS_BYTES, seed=0))


def tiny_model(mechanisms="sliding_window:window=8", **kw):
    return ModelConfig(vocab_size=256, dim=32, num_layers=2, num_heads=2, mechanisms=mechanisms, **kw)


def tiny_train(**kw):
    args = {"seq_len": 32, "batch_size": 4, "steps": 12, "lr": 3e-3, "min_lr": 3e-4, "lr_warmup": 3,
            "eval_every": 6, "eval_batches": 2, "seed": 0, **kw}
    return TrainConfig(**args)


def without_times(history):
    return [{k: v for k, v in h.items() if k != "elapsed_s"} for h in history]


# ------------------------------------------------------------------------------- corpus
def test_synthetic_corpus_is_deterministic_and_exact_length():
    a = synthetic_corpus(20_000, seed=1)
    assert a == synthetic_corpus(20_000, seed=1)
    assert a != synthetic_corpus(20_000, seed=2)
    for n in (1, 999, 12_345):
        assert len(synthetic_corpus(n, seed=3)) == n
    assert synthetic_corpus(999, seed=3) == synthetic_corpus(12_345, seed=3)[:999]  # a prefix, not another text


HEADER = re.compile(r"== record (\d+) ==\n(\w+) (\w+) was born in (\w+)\. (\w+) keeps a (\w+) called (\w+)\. "
                    r"The secret code of (\w+) is (\d{4})\.\n")
QUESTION = re.compile(r"\nQuestion: what is the secret code of (\w+)\? Answer: (\d{4})\.\n\n$")


def test_synthetic_records_answer_with_their_header_code():
    text = synthetic_corpus(60_000, seed=4).decode("ascii")
    records = ["== record " + r for r in text.split("== record ")[1:]][:-1]  # the last one is cut off
    assert len(records) > 20
    for index, record in enumerate(records):
        header = HEADER.match(record)
        assert header, record[:200]
        number, first, _, city, first_again, animal, pet, code_owner, code = header.groups()
        assert int(number) == index and first == first_again == code_owner
        question = QUESTION.search(record)
        assert question, record[-200:]
        assert question.groups() == (first, code)  # the answer is the header's code, far back
        body = record[header.end():question.start()]
        for restated in re.findall(r"whispered the code (\d{4}) again", body):
            assert restated == code
        for place in re.findall(rf"{first} went back to (\w+)\.", body):
            assert place == city
        for name in re.findall(rf"The {animal} of {first} is called (\w+)\.", body):
            assert name == pet


def test_token_data_split_and_windows():
    raw = bytes(range(256)) * 4  # 1024 bytes
    data = TokenData.from_bytes(raw, val_fraction=0.25)
    assert (len(data.train), len(data.val)) == (768, 256)
    assert data.train.dtype == torch.uint8 and bytes(data.val.tolist()) == raw[768:]
    starts = torch.tensor([0, 5, 700])
    x, y = data.windows("train", starts, 16)
    assert x.shape == y.shape == (3, 16) and x.dtype == y.dtype == torch.long
    for row, s in enumerate(starts.tolist()):
        assert x[row].tolist() == list(raw[s:s + 16])
        assert y[row].tolist() == list(raw[s + 1:s + 17])  # the next byte of every input
    xv, yv = data.windows("val", torch.tensor([3]), 8)
    assert xv[0].tolist() == list(raw[771:779]) and yv[0].tolist() == list(raw[772:780])
    with pytest.raises(ValueError, match="val_fraction"):
        TokenData.from_bytes(raw, val_fraction=1.0)
    with pytest.raises(ValueError, match="too few for seq_len"):
        data.check_length(300)


def test_lr_schedule_endpoints():
    cfg = TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, lr_warmup=10)
    assert lr_at(0, cfg) == pytest.approx(1e-4)  # (0 + 1) / 10 of the peak
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(55, cfg) == pytest.approx((1e-3 + 1e-4) / 2)  # half way down
    assert lr_at(100, cfg) == pytest.approx(1e-4) and lr_at(500, cfg) == pytest.approx(1e-4)
    decay = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert lr_at(0, TrainConfig(steps=10, lr=2e-3, min_lr=0.0, lr_warmup=0)) == pytest.approx(2e-3)


# -------------------------------------------------------------------------------- training
def test_training_reduces_the_loss(data):
    cfg = tiny_train(steps=30, eval_every=30, eval_batches=4)
    torch.manual_seed(0)
    untrained = evaluate(SparseCausalLM(tiny_model()), data, cfg)
    assert untrained == pytest.approx(math.log(256), abs=0.2)  # uniform over bytes at init
    model, result = train_lm(tiny_model(), cfg, data, show_progress=False)
    assert len(result.history) == 30 and result.evals()[-1][0] == 30
    assert result.final_val_loss < untrained - 1.5, result.evals()
    assert result.num_parameters == sum(p.numel() for p in model.parameters())
    assert int(model.train_step) == 30


@pytest.mark.parametrize("kw", [{"checkpoint": "x.pt"}, {"max_minutes": 1.0}])
def test_context_parallel_refuses_checkpoints_and_time_budgets(data, kw):
    """With parallel= every rank must stop at the same step: a per-rank clock (max_minutes) or a
    checkpoint of the wrapped model is refused before any rank trains."""
    with pytest.raises(ValueError, match="not supported with parallel"):
        train_lm(tiny_model(), tiny_train(), data, parallel=object(), show_progress=False, **kw)


def test_resume_equals_an_uninterrupted_run(data, tmp_path, monkeypatch):
    model_cfg = tiny_model(dropout=0.1, warmup_steps=8)  # dropout masks and the warm-up must resume too
    cfg = tiny_train()
    straight, straight_result = train_lm(model_cfg, cfg, data, checkpoint=str(tmp_path / "a.pt"),
                                         show_progress=False)

    class Crash(Exception):
        pass

    save = loop_module.write_checkpoint

    def save_then_crash(path, payload):
        save(path, payload)
        if payload["step"] == 6:
            raise Crash  # the process dies right after the step-6 checkpoint

    ckpt = tmp_path / "b.pt"
    monkeypatch.setattr(loop_module, "write_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        train_lm(model_cfg, cfg, data, checkpoint=str(ckpt), show_progress=False)
    monkeypatch.undo()
    assert torch.load(ckpt, weights_only=True)["step"] == 6
    resumed, resumed_result = train_lm(model_cfg, cfg, data, checkpoint=str(ckpt), resume=True, show_progress=False)

    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert without_times(resumed_result.history) == without_times(straight_result.history)
    assert resumed_result.final_val_loss == straight_result.final_val_loss
    assert [h["step"] for h in resumed_result.history] == list(range(1, 13))

    with pytest.raises(ValueError, match="different model"):
        train_lm(tiny_model(mechanisms="causal"), cfg, data, checkpoint=str(ckpt), resume=True, show_progress=False)
    with pytest.raises(ValueError, match="existing checkpoint"):
        train_lm(model_cfg, cfg, data, checkpoint=str(tmp_path / "none.pt"), resume=True, show_progress=False)


def test_checkpoint_is_atomic_and_loads_back(data, tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    model, result = train_lm(tiny_model(), tiny_train(steps=6, eval_every=3), data, checkpoint=str(path),
                             show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no .tmp left behind

    loaded, ckpt = load_checkpoint(path)
    assert ckpt["step"] == 6 and ckpt["model_config"] == tiny_model().to_dict()
    assert without_times(ckpt["history"]) == without_times(result.history)
    model.eval()
    loaded.eval()
    x = torch.randint(0, 256, (2, 40))
    assert torch.equal(model(x), loaded(x))

    def dies_mid_write(obj, f, *args, **kw):
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(loop_module.torch, "save", dies_mid_write)
    with pytest.raises(OSError, match="disk full"):
        loop_module.write_checkpoint(path, {"step": 99})
    monkeypatch.undo()
    assert load_checkpoint(path)[1]["step"] == 6  # the previous checkpoint is intact


# ------------------------------------------------------------------------------------ CLI
TINY_CLI = ["train", "--layers", "2", "--dim", "32", "--heads", "2", "--seq-len", "32", "--batch", "4",
            "--eval-every", "3", "--eval-batches", "2", "--lr-warmup", "2", "--corpus-bytes", str(CORPUS_BYTES),
            "--no-progress"]


run = run_cli


def test_cli_train_end_to_end_and_resume(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    js, png, ckpt = tmp_path / "run.json", tmp_path / "loss.png", tmp_path / "run.pt"
    outputs = ["--json", str(js), "--plot", str(png), "--checkpoint", str(ckpt)]
    mechanisms = ["--mechanisms", "sliding_window:window=8", "causal"]  # one spec per layer
    code, out, err = run(capsys, *TINY_CLI, *mechanisms, "--steps", "6", "--sample", "20", *outputs)
    assert code == 0, err
    assert "model: 2 layers, dim 32, 2 heads, mechanisms sliding_window:window=8 / causal" in out
    assert "--- sample (20 generated bytes" in out
    for path in (js, png, ckpt):
        assert f"wrote {path}" in out
    summary = out.strip().splitlines()[-1]
    assert re.fullmatch(r"final val loss \d+\.\d{4} nats/byte \(\d+\.\d{3} bits/byte\) after 6 steps, "
                        r"\d+\.\d s, [\d,]+ parameters", summary), summary
    record = json.loads(js.read_text())
    assert record["final_val_loss"] == pytest.approx(float(summary.split()[3]), abs=1e-4)
    assert record["steps"] == 6 and len(record["history"]) == 6
    assert [h["step"] for h in record["history"] if "val_loss" in h] == [3, 6]
    assert record["model_config"]["mechanisms"] == ["sliding_window:window=8", "causal"]
    assert record["train_config"]["seq_len"] == 32
    assert record["environment"]["torch"] == torch.__version__ and record["environment"]["device"] == "cpu"
    assert record["corpus"]["train_bytes"] + record["corpus"]["val_bytes"] == CORPUS_BYTES
    assert len(record["sample"]["generated"]) >= 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp"))

    code, out, err = run(capsys, *TINY_CLI, *mechanisms, "--steps", "9", "--resume", *outputs)
    assert code == 0, err
    assert "resuming at step 6" in out and "after 9 steps" in out
    assert "steps 6 -> 9" in err  # a longer run stretches the schedule: said, not hidden
    record = json.loads(js.read_text())
    assert len(record["history"]) == 9 and record["resumed_from_step"] == 6

    code, out, err = run(capsys, *TINY_CLI, "--mechanisms", "causal", "--steps", "9", "--resume", *outputs)
    assert code == 2 and out == ""
    assert "holds a different model (mechanisms: ['sliding_window:window=8', 'causal'] in the checkpoint" in err


@pytest.mark.parametrize("argv, message", [
    (["--mechanisms", "bogus"], "--mechanisms bogus: unknown mechanism 'bogus'"),
    (["--mechanisms", "sliding_window:window=8,causal=false"], "lets queries see later keys"),
    (["--mechanisms", "linear"], "must run with causal=true"),
    (["--mechanisms", "sliding_window"], "--mechanisms sliding_window: "),
    (["--mechanisms", "causal", "causal", "causal"], "one spec for every layer or exactly one per layer (--layers 2)"),
    (["--dim", "30", "--heads", "4"], "--dim (30) must be a multiple of --heads (4)"),
    (["--resume"], "--resume needs --checkpoint"),
    (["--corpus", "/no/such/corpus.txt"], "--corpus must be synthetic, stdlib or a readable file"),
    (["--corpus-bytes", "30"], "too few for seq_len 32"),
    (["--json", "/no/such/folder/x.json"], "folder /no/such/folder does not exist"),
    (["--steps", "0"], "argument --steps: expected an int >= 1, got 0"),
    (["--mechanisms", "topk:top_k=0,causal=true"], "--mechanisms topk:top_k=0,causal=true: top_k must be >= 1, got 0"),
    (["--mechanisms", "topk:top_k=0,causal=true"], "top_k must be >= 1, got 0"),
    (["--mechanisms", "lsh:causal=true"], "leaky_mechanisms"),  # membership decided from later positions
    (["--dim", "18"], "--dim // --heads must be even (rotary embeddings), got 18 // 2 = 9"),
    pytest.param(["--device", "cuda"], "--device cuda: CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
])
def test_cli_train_bad_arguments_exit_2_before_training(capsys, argv, message):
    code, out, err = run(capsys, *TINY_CLI, "--steps", "2", *argv)
    assert code == 2
    assert message in err
    assert "usage: sparse-attn train" in err
    assert out == ""  # refused before anything ran


def test_cli_train_help(capsys):
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0
    assert "usage: sparse-attn train" in out
    for flag in ("--mechanisms", "--warmup-steps", "--corpus", "--checkpoint", "--resume", "--sample"):
        assert flag in out
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "train" in out


def test_train_lm_reports_each_evaluation_when_it_happens(data):
    seen = []
    _, result = train_lm(tiny_model(), tiny_train(), data, show_progress=False,
                         on_eval=lambda entry: seen.append(dict(entry)))
    assert [(e["step"], e["val_loss"]) for e in seen] == result.evals() == [(6, seen[0]["val_loss"]),
                                                                            (12, seen[1]["val_loss"])]
    assert all("train_loss" in e and "elapsed_s" in e for e in seen)


def test_cli_train_prints_each_evaluation_as_it_happens(capsys, monkeypatch):
    # output to a file (captured: not a terminal): each validation loss is printed when measured, and progress
    # lines go to stderr, instead of everything at the end
    printed_before_eval = []
    evaluate_fn = lm_module.evaluate

    def spy(*args, **kw):
        printed_before_eval.append(capsys.readouterr())
        return evaluate_fn(*args, **kw)

    monkeypatch.setattr(lm_module, "evaluate", spy)
    argv = [a for a in TINY_CLI if a != "--no-progress"]
    code, out, err = run(capsys, *argv, "--steps", "6")
    assert code == 0, err
    assert len(printed_before_eval) == 2  # steps 3 and 6
    assert re.search(r"^step 3/6: val loss \d+\.\d{4} nats/byte, train loss \d+\.\d{4}", printed_before_eval[1].out,
                     re.M), printed_before_eval[1].out
    assert re.search(r"^step 6/6: val loss", out, re.M)
    assert printed_before_eval[0].err.startswith("train causal: 0/6 steps")
    assert "train causal: 6/6 steps" in err and "\r" not in err
