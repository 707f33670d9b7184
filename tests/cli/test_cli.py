"""The `sparse-attn` command line: `main([...])` in-process (exit codes, stdout, stderr), plus one
run of the installed console script."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from sa_testing import run_cli
import torch

from sparse_attn.cli import main
from sparse_attn.eval import measure
from sparse_attn.cli.specs import DEFAULT_PATTERNS, REGISTRY, SpecError, parse_spec


run = run_cli


# ------------------------------------------------------------------------------ compare
def test_compare_table_json_and_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    js, png = tmp_path / "rows.json", tmp_path / "rows.png"
    code, out, err = run(capsys, "compare", "--length", "256", "--patterns", "sliding_window", "longformer:window=32",
                         "--heads", "4", "--kv-heads", "2", "--repeats", "2", "--no-progress",
                         "--json", str(js), "--plot", str(png))
    assert code == 0, err
    assert err == ""
    for word in ("pattern", "density", "backend", "time ms", "peak MiB", "max err", "sliding_window",
                 "longformer:window=32", "sdpa causal", "blocked", f"wrote {js}", f"wrote {png}"):
        assert word in out

    data = json.loads(js.read_text())
    env = data["environment"]
    assert env["torch"] == torch.__version__
    assert env["device"] == "cpu" and env["dtype"] == "float32"
    assert env["q_shape"] == [1, 4, 256, 64] and env["kv_shape"] == [1, 2, 256, 64]
    assert env["error_rows"] == 256  # every row is checked at this length
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == ["sdpa", "sdpa causal", "sliding_window", "longformer:window=32"]
    assert rows["sdpa"]["density"] == 1.0 and rows["sdpa"]["kind"] == "dense"
    assert rows["sdpa causal"]["density"] == pytest.approx(257 / 512)
    sw = rows["sliding_window"]
    assert sw["spec"] == "sliding_window:window=16,causal=true"  # default scaled down for N=256
    assert sw["pattern"] == "sliding_window(16, causal=True)"
    # causal window of 16 over 256 positions: row i sees min(i + 1, 16) keys
    assert sw["density"] == pytest.approx(sum(min(i + 1, 16) for i in range(256)) / 256**2)
    lf = rows["longformer:window=32"]
    assert lf["spec"] == "longformer:window=32,global_tokens=1,causal=false"
    for r in rows.values():
        assert r["backend"] in ("blocked", "torch sdpa")
        assert len(r["times_ms"]) == 2 and r["time_ms"] > 0
        assert r["peak_memory_bytes"] >= 256 * 4 * 64 * 4  # at least the fp32 output
        assert r["max_abs_err"] < 1e-5 and 0 <= r["mean_abs_err"] <= r["max_abs_err"]
        assert r["error_rows"] == 256

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_skips_errors_above_max_dense_length(capsys):
    code, out, err = run(capsys, "compare", "--length", "200", "--patterns", "causal", "--heads", "2",
                         "--repeats", "1", "--no-progress", "--max-dense-length", "100")
    assert code == 0, err
    causal_row = next(line for line in out.splitlines() if line.startswith("causal "))
    assert causal_row.split()[2] == "sdpa"  # the dispatcher sends plain causal to SDPA
    assert causal_row.split()[-2:] == ["-", "-"]
    assert "not checked" in out


@pytest.mark.parametrize("argv, message", [
    (["--patterns", "nope"], "unknown pattern 'nope'; valid names: full, causal, sliding_window"),
    (["--patterns", "sliding_window:windw=3"], "sliding_window has no parameter 'windw'; valid keys: window, causal"),
    (["--patterns", "sliding_window:window=0"], "window must be >= 1, got 0"),
    (["--patterns", "strided:causal=maybe"], "causal must be true or false, got 'maybe'"),
    (["--patterns", "bigbird:num_heads=4"], "the pattern has 4 heads but --heads is 8"),
    (["--backend", "nope"], "--backend must be one of auto, "),
    (["--kv-heads", "3"], "--heads (8) must be a multiple of --kv-heads (3)"),
    (["--repeats", "0"], "argument --repeats: expected an int >= 1, got 0"),
    (["--json", "/no/such/folder/x.json"], "folder /no/such/folder does not exist"),
])
def test_compare_bad_arguments_exit_2(capsys, argv, message):
    code, out, err = run(capsys, "compare", "--length", "64", *argv)
    assert code == 2
    assert message in err
    assert "usage: sparse-attn compare" in err
    assert out == ""


def test_missing_matplotlib_is_a_clear_run_time_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    code, out, err = run(capsys, "show", "causal", "--length", "8", "--png", str(tmp_path / "m.png"))
    assert code == 1
    assert "sparse_attn[viz]" in err
    assert not (tmp_path / "m.png").exists()


def test_progress_bar_only_on_a_terminal(monkeypatch):
    tqdm = pytest.importorskip("tqdm")
    from sparse_attn.cli.compare import _progress

    jobs = [1, 2]
    assert _progress(jobs, enabled=False) is jobs
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not isinstance(_progress(jobs, enabled=True), tqdm.tqdm)  # plain lines instead (tests below)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = _progress(jobs, enabled=True)
    assert isinstance(bar, tqdm.tqdm)
    bar.close()


# ---------------------------------------------------------------------------------- show
def test_show_ascii(capsys):
    code, out, err = run(capsys, "show", "sliding_window:window=3", "--length", "6")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "sliding_window:window=3,causal=true = sliding_window(3, causal=True)"
    assert lines[1] == f"q_len=6 kv_len=6 q_offset=0 density={15 / 36:.4f}"
    assert lines[2:] == ["#.....", "##....", "###...", ".###..", "..###.", "...###"]


def test_show_fewer_queries_than_keys(capsys):
    code, out, err = run(capsys, "show", "causal", "--length", "2", "--kv-length", "4")
    assert code == 0, err
    assert out.splitlines()[-2:] == ["###.", "####"]


def test_show_block_map(capsys):
    code, out, err = run(capsys, "show", "causal", "--length", "256", "--block", "64")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[2].startswith("BlockLayout(q_len=256, kv_len=256")
    assert lines[3:] == ["░···", "█░··", "██░·", "███░"]


def test_show_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "mask.png"
    code, out, err = run(capsys, "show", "bigbird:num_heads=2", "--length", "48", "--head", "1", "--png", str(png))
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "head=1" in out and f"wrote {png}" in out
    assert "#" not in out  # no ASCII when an image is asked for


@pytest.mark.parametrize("argv, message", [
    (["nope"], "unknown pattern 'nope'"),
    (["causal:window=3"], "causal has no parameter 'window'; valid keys: (none"),
    (["causal", "--length", "8", "--kv-length", "4"], "--kv-length (4) must be >= --length (8)"),
    (["causal", "--length", "1000"], "use --block B"),
    (["causal", "--head", "1"], "only head 0 exists"),
    (["bigbird:num_heads=2", "--head", "2"], "has 2 heads (0..1)"),
    (["causal", "--block", "0"], "argument --block: expected an int >= 1, got 0"),  # was the element mask
])
def test_show_bad_arguments_exit_2(capsys, argv, message):
    code, out, err = run(capsys, "show", *argv)
    assert code == 2
    assert message in err


# ------------------------------------------------------------------------------ backends
def test_backends(capsys):
    code, out, err = run(capsys, "backends")
    assert code == 0, err
    for name in ("blocked", "reference", "sdpa", "flex"):
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    assert "devices=" in out and "dtypes=" in out and "grads=" in out
    assert "backend='auto' for a typical call (cpu float32" in out
    assert "chosen: blocked" in out
    assert "sdpa: rejected - only full and causal patterns" in out


# ------------------------------------------------------------------------ top level
def test_version_and_help(capsys):
    import sparse_attn

    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip().startswith(f"sparse-attn {sparse_attn.__version__}")
    for argv in ([], ["compare"], ["bogus"]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "error" in err
    for sub in ("compare", "show", "backends"):
        code, out, _ = run(capsys, sub, "--help")
        assert code == 0 and f"usage: sparse-attn {sub}" in out
    code, out, _ = run(capsys, "compare", "--help")
    assert "sliding_window  window=256,causal=true" in out  # the pattern registry is in the help


def test_console_script_help():
    exe = shutil.which("sparse-attn") or os.path.join(os.path.dirname(sys.executable), "sparse-attn")
    if not os.path.exists(exe):
        pytest.skip("sparse-attn console script is not installed (pip install -e .)")
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "usage: sparse-attn" in res.stdout
    for sub in ("compare", "show", "backends"):
        assert sub in res.stdout


# ------------------------------------------------------------------------------- specs
def test_default_specs_at_long_lengths():
    got = {name: parse_spec(name, 8192).canonical() for name in DEFAULT_PATTERNS}
    assert got == {
        "causal": "causal",
        "sliding_window": "sliding_window:window=256,causal=true",
        "longformer": "longformer:window=256,global_tokens=16,causal=false",
        "bigbird": "bigbird:block=64,num_window_blocks=3,num_global_blocks=2,num_random_blocks=3,seed=0,"
                   "num_heads=none",
        "dilated": "dilated:window=128,dilation=2,causal=true",
        "strided": "strided:stride=128,causal=true",
        "streaming": "streaming:sinks=4,window=252",
    }


@pytest.mark.parametrize("length", [1, 7, 64, 1000])
def test_every_registered_pattern_builds_at_short_lengths(length):
    for name in REGISTRY:
        spec = parse_spec(name, length)
        assert spec.pattern.layout(length, block_q=16).density() > 0
        again = parse_spec(spec.canonical(), 10**6)  # canonical specs pin every value
        assert again.params == spec.params


def test_spec_values_and_errors():
    s = parse_spec(" sliding-window : window = 512 , causal = FALSE ", 64)
    assert s.name == "sliding_window" and s.params == {"window": 512, "causal": False}
    assert repr(s.pattern) == "sliding_window(512, causal=False)"
    assert parse_spec("bigbird:num_heads=none", 64).params["num_heads"] is None
    with pytest.raises(SpecError, match="window must be an int, got '1.5'"):
        parse_spec("sliding_window:window=1.5", 64)
    with pytest.raises(SpecError, match="expected key=value, got 'window'"):
        parse_spec("sliding_window:window", 64)
    with pytest.raises(SpecError, match="empty pattern spec"):
        parse_spec("  ", 64)


# ----------------------------------------------------------------------------- measure
def test_cpu_peak_memory_sees_temporaries():
    mib = 1 << 20

    def fn():
        a = torch.empty(4 * mib, dtype=torch.uint8)
        b = torch.empty(2 * mib, dtype=torch.uint8)
        del a, b
        return torch.empty(1 * mib, dtype=torch.uint8)

    peak = measure.peak_memory(fn, torch.device("cpu"))
    assert 6 * mib <= peak < 6 * mib + 64 * 1024


def test_error_segments():
    assert measure.error_segments(100, 0) == [(0, 100)]
    assert measure.error_segments(100, 100) == [(0, 100)]
    segs = measure.error_segments(8192, 1024)
    assert segs[0][0] == 0 and segs[-1][1] == 8192
    assert sum(b - a for a, b in segs) == 1024
    assert all(b - a == 64 for a, b in segs)
    assert measure.error_segments(100, 90) == [(0, 100)]  # overlapping segments merge


# ---------------------------------------------------------------------- mechanisms (issue #5)
def test_compare_runs_mechanisms_against_dense(capsys, tmp_path):
    js = tmp_path / "rows.json"
    code, out, err = run(capsys, "compare", "--length", "128", "--mechanisms", "linear:causal=true",
                         "performer:num_features=64", "topk:top_k=128,causal=true", "lsh:bucket_size=16",
                         "routing", "block_topk:block_size=32", "--heads", "2", "--repeats", "1", "--no-progress",
                         "--json", str(js))
    assert code == 0, err
    assert "approximation error, not exactness" in out
    rows = {r["name"]: r for r in json.loads(js.read_text())["rows"]}
    assert rows["linear:causal=true"]["spec"] == "linear:feature_map=elu,causal=true"
    assert rows["linear:causal=true"]["kind"] == "mechanism" and rows["linear:causal=true"]["backend"] == "linear"
    assert rows["block_topk:block_size=32"]["backend"] == "block_topk (auto)"
    # top_k covering every key is dense causal attention: error vs the dense reference is rounding only
    assert rows["topk:top_k=128,causal=true"]["max_abs_err"] < 1e-5
    for name in ("linear:causal=true", "performer:num_features=64", "lsh:bucket_size=16", "routing"):
        assert rows[name]["max_abs_err"] > 1e-3  # approximations: measured against dense, not themselves


def test_compare_mechanism_rows_are_reproducible(capsys, tmp_path):
    outs = []
    for i in range(2):
        js = tmp_path / f"r{i}.json"
        code, _, err = run(capsys, "compare", "--length", "64", "--mechanisms", "performer:num_features=16",
                           "--heads", "1", "--repeats", "1", "--no-progress", "--json", str(js))
        assert code == 0, err
        outs.append(json.loads(js.read_text())["rows"][-1]["max_abs_err"])
    assert outs[0] == outs[1]


@pytest.mark.parametrize("argv, message", [
    (["compare", "--length", "64", "--mechanisms", "linear:feature_map"], "expected key=value"),
    (["compare", "--length", "64", "--mechanisms", "topk:k=3"], "topk has no parameter 'k'"),
    (["compare", "--length", "64", "--mechanisms", "lsh:n_hashes=two"], "n_hashes must be a number"),
    (["show", "performer", "--length", "16"], "performer is a mechanism with no fixed pattern"),
])
def test_mechanism_spec_errors_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert message in err


def test_help_lists_mechanisms(capsys):
    code, out, _ = run(capsys, "compare", "--help")
    assert code == 0
    for name in ("linear", "performer", "topk", "block_topk", "lsh", "routing"):
        assert f"  {name}" in out


# ------------------------------------------------------------- issue 14: found by a new user
def test_compare_runs_both_patterns_and_mechanisms(capsys, tmp_path):
    # the README's example: --patterns and --mechanisms used to share one argparse destination (the last won)
    js = tmp_path / "rows.json"
    code, out, err = run(capsys, "compare", "--length", "128", "--patterns", "sliding_window:window=32,causal=false",
                         "bigbird", "--mechanisms", "linear:causal=true", "--heads", "2", "--repeats", "1",
                         "--no-progress", "--json", str(js))
    assert code == 0, err
    names = [r["name"] for r in json.loads(js.read_text())["rows"]]
    assert names == ["sdpa", "sdpa causal", "sliding_window:window=32,causal=false", "bigbird", "linear:causal=true"]
    assert all(name in out for name in names)
    # in either order, and a flag given twice adds up too
    code, _, err = run(capsys, "compare", "--length", "64", "--mechanisms", "topk", "--patterns", "causal",
                       "--patterns", "full", "--heads", "1", "--repeats", "1", "--no-progress", "--json", str(js))
    assert code == 0, err
    assert [r["name"] for r in json.loads(js.read_text())["rows"]][2:] == ["topk", "causal", "full"]


@pytest.mark.parametrize("argv, message", [
    (["--mechanisms", "topk:top_k=0"], "topk:top_k=0: top_k must be >= 1, got 0"),
    (["--mechanisms", "lsh:bucket_size=0"], "lsh:bucket_size=0: bucket_size must be >= 1, got 0"),
    (["--mechanisms", "linear:feature_map=nope"], "feature_map must be one of ['elu', 'relu']"),
    (["--patterns", "sliding_window", "--backend", "sdpa"],
     "sliding_window: --backend sdpa cannot run it: only full and causal patterns"),
    (["--patterns", "causal", "bigbird:num_heads=2", "--heads", "2", "--backend", "sdpa"],
     "bigbird:num_heads=2: --backend sdpa cannot run it: per-head patterns not supported"),
    (["--mechanisms", "block_topk", "--backend", "sdpa"], "block_topk: no backend can run this call"),
    pytest.param(["--device", "cuda"], "--device cuda: CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
])
def test_compare_arguments_the_library_refuses_exit_2_before_any_row_runs(capsys, monkeypatch, argv, message):
    monkeypatch.setattr(measure, "time_call", lambda *a, **kw: pytest.fail("a row was timed before the check"))
    code, out, err = run(capsys, "compare", "--length", "64", "--repeats", "1", *argv)
    assert code == 2, err
    assert out == ""
    last = err.strip().splitlines()[-1]  # argparse's usage, then the message on one line
    assert last.startswith("sparse-attn compare: error: ") and message in last, err


def test_compare_progress_off_a_terminal_is_a_line_per_row_as_it_runs(capsys, monkeypatch):
    # captured stderr is not a terminal: plain lines as rows finish, not a tqdm bar (nor nothing for minutes)
    before_each_row = []  # what stderr had received when each row started
    time_call = measure.time_call

    def spy(*args, **kw):
        before_each_row.append(capsys.readouterr().err)
        return time_call(*args, **kw)

    monkeypatch.setattr(measure, "time_call", spy)
    code, out, err = run(capsys, "compare", "--length", "64", "--patterns", "causal", "sliding_window",
                         "--heads", "1", "--repeats", "1")
    assert code == 0, err
    assert len(before_each_row) == 4  # sdpa, sdpa causal, causal, sliding_window
    assert before_each_row[0].startswith("compare: 0/4 rows")
    for i in range(1, 4):
        assert f"compare: {i}/4 rows" in before_each_row[i] and f"compare: {i + 1}/4" not in before_each_row[i]
    assert "compare: 4/4 rows" in err and "sliding_window" in err
    assert "\r" not in "".join(before_each_row) + err


def test_progress_lines_off_a_terminal(capsys, monkeypatch):
    from sparse_attn._extras import progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    seen = []
    bar = progress(range(3), desc="work", unit="item", total=3, lines_every=0)
    for i in bar:
        seen.append(capsys.readouterr().err)  # each line is out before the next item starts
        bar.set_postfix_str(f"item {i}")
    err = capsys.readouterr().err
    assert seen[0].startswith("work: 0/3 items (")
    assert [text.split(" (")[0] for text in seen[1:] + [err]] == \
        ["work: 1/3 items, item 0", "work: 2/3 items, item 1", "work: 3/3 items, item 2"]
    quiet = progress(range(3), desc="work", total=3)  # the default: a line at the start, then at most every 10 s
    assert list(quiet) == [0, 1, 2]
    assert [line.split(" (")[0] for line in capsys.readouterr().err.splitlines()] == ["work: 0/3", "work: 3/3"]
