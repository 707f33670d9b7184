"""`sparse-attn eval needle|reach|...`: in-process runs at tiny sizes, outputs, exit codes."""

import json

import pytest
from sa_testing import run_cli

run = run_cli


def test_eval_needle_json_and_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    js, png = tmp_path / "needle.json", tmp_path / "needle.png"
    code, out, err = run(capsys, "eval", "needle", "--mechanisms", "causal", "sliding_window:window=16",
                         "--lengths", "64", "128", "--depths", "0", "1", "--trials", "1", "--no-progress",
                         "--json", str(js), "--plot", str(png))
    assert code == 0, err
    data = json.loads(js.read_text())
    assert data["lengths"] == [64, 128] and png.stat().st_size > 0
    # the window misses the needle at depth 0 and finds it at depth 1; dense finds both
    assert "sliding_window:window=16" in out and "wrote" in out
    masses = data["mass"]
    assert min(min(row) for row in masses["causal"]) > 0.9
    assert [row[0] for row in masses["sliding_window:window=16"]] == [0.0, 0.0]


def test_eval_reach_summary_and_json(capsys, tmp_path):
    js = tmp_path / "reach.json"
    code, out, err = run(capsys, "eval", "reach", "--mechanisms", "sliding_window:window=8", "--layers", "3",
                         "--length", "64", "--max-depth", "20", "--json", str(js))
    assert code == 0, err
    data = json.loads(js.read_text())
    assert data["min_depth_full"] == 9  # 7 keys back per layer: position 63 reaches 0 after 9 layers
    assert "min_depth_full: 9" in out


@pytest.mark.parametrize("argv, message", [
    (["eval", "reach", "--mechanisms", "bogus", "--length", "10"], "unknown mechanism"),
    (["eval", "reach", "--mechanisms", "causal", "full", "--layers", "2", "--length", "10"], "--layers repeats"),
    (["eval", "reach", "--mechanisms", "causal", "--length", "10", "--layers", "3", "--max-depth", "2"], "--max-depth"),
    (["eval", "needle", "--lengths", "64", "64"], "distinct"),
    (["eval", "needle", "--depths", "1.5"], "[0, 1]"),
    (["eval", "needle", "--mechanisms", "sliding_window:windw=3", "--lengths", "64"], "windw"),
    (["eval"], "TASK"),
    (["eval", "needle", "--mechanisms", "topk:top_k=0", "--lengths", "64", "--no-progress"],
     "--mechanisms topk:top_k=0: top_k must be >= 1, got 0"),
    (["eval", "mqar", "--mechanisms", "a=topk:top_k=0,causal=true", "--steps", "1", "--no-progress"],
     "--mechanisms a=topk:top_k=0,causal=true: top_k must be >= 1, got 0"),
    (["eval", "mqar", "--mechanisms", "a=linear", "--steps", "1", "--no-progress"], "must run with causal=true"),
    (["eval", "mqar", "--pairs", "1000", "--steps", "1", "--no-progress"], "--pairs 1000"),
    (["eval", "mqar", "--layers", "1", "--steps", "1", "--no-progress"], "--layers 1: num_layers must be >= 2"),
    (["eval", "mqar", "--pairs", "2", "4", "--batch", "1", "--steps", "1", "--no-progress"], "--batch"),
    (["eval", "passkey", "--train-length", "16", "--steps", "1", "--no-progress"], "--train-length 16"),
    (["eval", "passkey", "--dim", "30", "--heads", "4", "--steps", "1", "--no-progress"], "--dim"),
    (["eval", "listops", "--mechanisms", "a=nope", "--steps", "1", "--no-progress"], "unknown mechanism 'nope'"),
    pytest.param(["eval", "needle", "--device", "cuda", "--lengths", "64"], "--device cuda: CUDA is not available",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is available here")),
])
def test_eval_bad_arguments_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and message in err and out == ""


def test_eval_needle_exits_1_when_a_cell_failed(capsys, tmp_path, monkeypatch):
    # needle_grid records a failure and goes on; the command used to exit 0 with NaN cells
    from sparse_attn.eval import needle

    attention = needle.attention

    def fails_at_128(q, k, v, mechanism, **kw):
        if k.shape[2] == 128:
            raise RuntimeError("out of luck at 128")
        return attention(q, k, v, mechanism, **kw)

    monkeypatch.setattr(needle, "attention", fails_at_128)
    js = tmp_path / "needle.json"
    with pytest.warns(RuntimeWarning, match="out of luck"):
        code, out, err = run(capsys, "eval", "needle", "--mechanisms", "sliding_window:window=16", "--lengths", "64",
                             "128", "--depths", "1", "--trials", "1", "--no-progress", "--json", str(js))
    assert code == 1
    assert "ERROR sliding_window:window=16 at length 128: RuntimeError: out of luck at 128" in out
    assert err.strip().splitlines()[-1] == ("sparse-attn: error: failed: sliding_window:window=16 at length 128 "
                                            "(the ERROR lines above say why)")
    assert json.loads(js.read_text())["mass"]["sliding_window:window=16"][0][0] > 0.5  # what ran is kept


def test_eval_help(capsys):
    code, out, _ = run(capsys, "eval", "--help")
    assert code == 0 and "needle" in out and "listops" in out


def test_eval_listops_tiny(capsys, tmp_path):
    js = tmp_path / "listops.json"
    code, out, err = run(capsys, "eval", "listops", "--mechanisms", "win=sliding_window:window=8,causal=false",
                         "--steps", "3", "--train-examples", "64", "--dim", "16", "--layers", "1", "--no-progress",
                         "--json", str(js))
    assert code == 0, err
    data = json.loads(js.read_text())
    assert "win" in data["runs"] and 0.0 <= data["runs"]["win"]["test_accuracy"] <= 1.0
    assert "majority class" in out


@pytest.mark.parametrize("argv, message", [
    (["eval", "listops", "--mechanisms", "nospec"], "NAME=SPEC"),
    (["eval", "listops", "--min-length", "50", "--max-length", "40"], "--min-length"),
])
def test_eval_listops_bad_arguments(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err


def test_eval_mqar_and_passkey_tiny(capsys, tmp_path):
    js = tmp_path / "mqar.json"
    code, out, err = run(capsys, "eval", "mqar", "--mechanisms", "win=sliding_window:window=4", "--steps", "2",
                         "--dim", "16", "--layers", "1", "--pairs", "2", "4", "--seq-len", "32", "--no-progress",
                         "--vocab-size", "300", "--lr", "0.01", "--init", "model", "--json", str(js))
    assert code == 0, err
    assert js.exists() and "win" in out
    settings = json.loads(js.read_text())["settings"]
    assert (settings["vocab_size"], settings["lr"], settings["init"]) == (300, 0.01, "model")
    code, _, err = run(capsys, "eval", "mqar", "--lr", "0", "--no-progress")
    assert code == 2 and "--lr" in err
    js = tmp_path / "passkey.json"
    code, out, err = run(capsys, "eval", "passkey", "--mechanisms", "dense=causal", "--steps", "2", "--dim", "16",
                         "--layers", "1", "--train-length", "256", "--test-lengths", "256", "--no-progress",
                         "--json", str(js))
    assert code == 0, err
    assert js.exists() and "exact-match accuracy" in out
