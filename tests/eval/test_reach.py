"""Receptive fields of layer schedules, against brute-force reachability (bool matrix powers
of `pattern.to_dense`)."""

import json
import math
import sys

import pytest
import torch

import sparse_attn.patterns as P
from sparse_attn.eval.reach import ReceptiveField, plot_receptive_field, receptive_field
from sparse_attn.nn.model import ModelConfig
from sparse_attn.ops.mechanisms import Mechanism


def brute(patterns, n, depth):
    """[reach after 1 layer, ..., after `depth` layers], bool [n, n] each (schedule repeats)."""
    eye = torch.eye(n, dtype=torch.bool)
    steps = [(p.to_dense(n).any(0) | eye).float() for p in patterns]
    reach, out = eye, []
    for d in range(depth):
        reach = (steps[d % len(steps)] @ reach.float()) > 0
        out.append(reach)
    return out


def brute_stats(patterns, n, max_depth=None):
    L = len(patterns)
    reaches = brute(patterns, n, max_depth or L)
    causal = all(not bool(p.to_dense(n).any(0).triu(1).any()) for p in patterns)
    pos = torch.arange(n)
    possible = pos + 1 if causal else torch.full((n,), n)
    counts = torch.stack([r.sum(1) for r in reaches[:L]])
    back = torch.stack([pos - torch.where(r, pos, n).amin(1) for r in reaches[:L]])
    ahead = torch.stack([torch.where(r, pos, -1).amax(1) - pos for r in reaches[:L]])
    full = [d + 1 for d, r in enumerate(reaches) if bool((r.sum(1) == possible).all())]
    return reaches, counts, back, ahead, (full[0] if full else None), causal


CASES = {
    "window": ([P.sliding_window(5)] * 3, 97),
    "window-bidirectional": ([P.sliding_window(6, causal=False)] * 2, 90),
    "dilated": ([P.dilated(3, 4)] * 2, 80),
    "dilated-bidirectional": ([P.dilated(4, 3, causal=False), P.sliding_window(3)], 75),
    "strided": ([P.strided(7)] * 2, 100),
    "strided-bidirectional": ([P.strided(5, causal=False)], 60),
    "longformer": ([P.longformer(8, global_tokens=[0, 37])] * 2, 90),
    "longformer-causal": ([P.longformer(6, global_tokens=2, causal=True)] * 2, 70),
    "bigbird": ([P.bigbird(8, num_random_blocks=1, seed=3)] * 2, 100),
    "bigbird-per-head": ([P.bigbird(8, num_random_blocks=1, num_heads=2)], 88),
    "bigbird-causal": ([P.bigbird(8, num_random_blocks=2, causal=True)] * 2, 96),
    "predicate": ([P.predicate(lambda b, h, q, k: (q - k) % 7 == 3) | P.sliding_window(2)] * 2, 60),
    "streaming": ([P.streaming(2, 6)] * 3, 90),
    "per-head": ([P.per_head([P.sliding_window(4), P.dilated(3, 5)])] * 2, 100),
    "union": ([P.sliding_window(4) | P.dilated(2, 9)] * 2, 110),
    "fixed": ([P.fixed(8)] * 2, 70),
    "mixed": ([P.sliding_window(5), P.dilated(3, 4), P.strided(6), P.causal()], 113),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_brute_force(name):
    patterns, n = CASES[name]
    reaches, counts, back, ahead, min_depth, causal = brute_stats(patterns, n)
    results = [receptive_field(patterns, n, exact=True)]
    results += [receptive_field(patterns, n, exact=False, block=b, queries="all") for b in (16, 7)]
    for r in results:
        assert r.causal == causal and not r.upper_bound
        assert torch.equal(r.queries, torch.arange(n))
        assert torch.equal(r.counts, counts), r.method
        assert torch.equal(r.farthest_back, back) and torch.equal(r.farthest_ahead, ahead)
        assert r.min_depth_full == min_depth
        assert torch.equal(r.possible, torch.arange(1, n + 1) if causal else torch.full((n,), n))
        assert torch.allclose(r.coverage, counts.double().sum(1) / (n * n))
        assert torch.equal(r.reach(), reaches[-1])
        assert torch.equal(r.reach(1, [0, n - 1]), reaches[0][[0, n - 1]])


def test_frontier_equals_dense_on_default_queries():
    patterns = [P.sliding_window(9), P.dilated(4, 6), P.longformer(10, global_tokens=[50], causal=True)]
    n = 300
    dense = receptive_field(patterns, n, exact=True)
    long = receptive_field(patterns, n, exact=False)  # default: 9 evenly spaced outputs, the last included
    assert long.method == "frontier" and dense.method == "dense"
    assert long.queries.tolist() == torch.linspace(0, n - 1, 9).round().long().tolist()
    assert torch.equal(long.counts, dense.counts[:, long.queries])
    assert torch.equal(long.farthest_back, dense.farthest_back[:, long.queries])
    assert torch.equal(long.reach(), dense.reach(queries=long.queries))


@pytest.mark.parametrize("layers", [1, 3, 5])
def test_causal_window_reaches_layers_times_w_minus_1(layers):
    w = 16  # query i sees i-15 .. i: one layer reaches w-1 back
    for n, exact in ((200, True), (50_000, False)):
        r = receptive_field([P.sliding_window(w)] * layers, n, exact=exact)
        i = r.queries
        for d in range(1, layers + 1):
            assert torch.equal(r.farthest_back[d - 1], torch.clamp(i, max=d * (w - 1)))
            assert torch.equal(r.counts[d - 1], torch.clamp(i, max=d * (w - 1)) + 1)
        assert int(r.farthest_ahead.max()) == 0


def test_bidirectional_and_dilated_window_distances():
    n, L = 40_000, 4
    r = receptive_field([P.sliding_window(10, causal=False)] * L, n, exact=False)
    i = r.queries
    assert torch.equal(r.farthest_back[-1], torch.clamp(i, max=L * 5))  # W//2 each side per layer
    assert torch.equal(r.farthest_ahead[-1], torch.clamp(n - 1 - i, max=L * 5))
    r = receptive_field([P.dilated(8, 5)] * L, n, exact=False)  # keys i, i-5, ..., i-35: 7 steps of 5 per layer
    i = r.queries
    steps = torch.clamp(i // 5, max=7 * L)
    assert torch.equal(r.farthest_back[-1], 5 * steps)
    assert torch.equal(r.counts[-1], steps + 1)  # one residue class mod 5
    assert r.min_depth_full is None


def test_min_depth_full_known_cases():
    n = 100
    for exact in (True, False):
        kw = {"exact": exact, "max_depth": 40}
        # causal window 10: 9 back per layer, the last output needs 99: ceil(99/9) = 11 layers
        assert receptive_field([P.sliding_window(10)], n, **kw).min_depth_full == 11
        # bidirectional window 10: 5 each way per layer, output 0 needs 99 ahead: 20 layers
        assert receptive_field([P.sliding_window(10, causal=False)], n, **kw).min_depth_full == 20
        # two alternating layers, not one repeated: found by doubling + bisection in the frontier
        mixed = [P.sliding_window(10), P.dilated(2, 3)]  # 9 + 3 back per pair of layers
        expected = brute_stats(mixed, n, max_depth=40)[4]
        assert receptive_field(mixed, n, **kw).min_depth_full == expected
        assert receptive_field(["full"], n, exact=exact).min_depth_full == 1
        assert receptive_field(["causal"], n, exact=exact).min_depth_full == 1
        assert receptive_field([P.longformer(4, global_tokens=1)] * 2, n, exact=exact).min_depth_full == 2
        assert receptive_field([P.strided(8)] * 3, n, exact=exact).min_depth_full == 2
        assert receptive_field([P.dilated(3, 4)], n, **kw).min_depth_full is None  # one residue class forever
        assert receptive_field([P.sliding_window(10)], n, exact=exact).min_depth_full is None  # not within 1 layer


def test_min_depth_full_long_sequence():
    # 4095 back at 63 per layer: 65 layers; the last output is tracked by default
    r = receptive_field([P.sliding_window(64)], 4096, exact=False, max_depth=100)
    assert r.min_depth_full == 65 and r.block == 128


def test_upper_bound_for_data_dependent_mechanisms():
    n = 64
    r = receptive_field(["sliding_window:window=8", "topk:top_k=4"], n)
    assert r.upper_bound and len(r.reasons) == 1
    assert "layer 2" in r.reasons[0] and "topk" in r.reasons[0] and "upper bound" in r.layers[1]
    assert "UPPER BOUND" in str(r)
    dense = receptive_field([P.sliding_window(8), P.full()], n)
    assert torch.equal(r.counts, dense.counts) and r.min_depth_full == dense.min_depth_full == 2
    r = receptive_field(["lsh:causal=true", "routing:num_clusters=4,window=8", "block_topk:top_k_blocks=1,block_size=16"], n,
                        exact=False)
    assert r.upper_bound and len(r.reasons) == 3 and not r.causal
    r = receptive_field(["lsh:causal=true"], n)
    assert r.upper_bound and r.causal and r.min_depth_full == 1
    # kernelized attention gives every key a weight: exact, dense or causal
    for spec, causal in (("linear:causal=true", True), ("performer", False)):
        r = receptive_field([spec], n)
        assert not r.upper_bound and r.causal == causal and r.min_depth_full == 1
    # top-k keeping every key is plain attention
    r = receptive_field([Mechanism("topk", top_k=n, causal=True), "block_topk:top_k_blocks=4,block_size=16"], n)
    assert not r.upper_bound and not r.causal and r.min_depth_full == 2  # causal first: the future at depth 2


def test_model_config_schedule():
    specs = ["sliding_window:window=4", "dilated:window=3,dilation=4", "sliding_window:window=4"]
    cfg = ModelConfig(vocab_size=11, num_layers=3, mechanisms=specs)
    n = 80
    patterns = [P.sliding_window(4), P.dilated(3, 4), P.sliding_window(4)]
    expected = brute_stats(patterns, n)[1]
    for exact in (True, False):
        r = receptive_field(cfg, n, exact=exact, queries="all")
        assert torch.equal(r.counts, expected)
        assert r.layers[0] == "sliding_window:window=4"
    homogeneous = ModelConfig(vocab_size=11, num_layers=4, mechanisms="sliding_window:window=4")
    r = receptive_field(homogeneous, n, exact=False, queries="all", max_depth=40)
    assert torch.equal(r.counts, brute_stats([P.sliding_window(4)] * 4, n)[1])
    assert r.min_depth_full == math.ceil((n - 1) / 3)


def test_block_layout_entries_and_block_choice():
    n = 90
    layout = P.sliding_window(5).layout(n, block_q=8)
    r = receptive_field([layout, P.dilated(2, 7)], n, exact=False, queries="all")
    assert r.block == 8
    assert torch.equal(r.counts, brute_stats([P.sliding_window(5), P.dilated(2, 7)], n)[1])
    assert torch.equal(receptive_field([layout], n, exact=True).counts, brute_stats([P.sliding_window(5)], n)[1])
    assert receptive_field([P.bigbird(32)], 256, exact=False).block == 32  # the pattern's own block
    assert receptive_field([P.sliding_window(5)], 256, exact=False).block == 128


def test_matrix_and_single_entry_schedule():
    n = 50
    r = receptive_field(P.sliding_window(3), n)  # one entry: a one-layer schedule
    assert len(r.layers) == 1 and r.depths == [1]
    reaches = brute([P.sliding_window(3)], n, 4)
    assert torch.equal(r.matrix(), reaches[0]) and torch.equal(r.matrix(4), reaches[3])
    long = receptive_field(P.sliding_window(3), n, exact=False)
    assert torch.equal(long.matrix(2), reaches[1])
    assert torch.equal(long.reach(4, [10, 49]), reaches[3][[10, 49]])
    assert json.loads(json.dumps(r.to_dict()))["min_depth_full"] is None
    assert isinstance(r, ReceptiveField)


def test_argument_errors():
    w = [P.sliding_window(4)]
    with pytest.raises(ValueError, match="length"):
        receptive_field(w, 0)
    with pytest.raises(TypeError, match="length"):
        receptive_field(w, 10.0)
    with pytest.raises(TypeError, match="length"):
        receptive_field(w, True)
    with pytest.raises(ValueError, match="empty"):
        receptive_field([], 10)
    with pytest.raises(TypeError, match=r"schedule\[1\]"):
        receptive_field([P.causal(), 3], 10)
    with pytest.raises(TypeError, match="schedule must be"):
        receptive_field(42, 10)
    with pytest.raises(ValueError, match=r"schedule\[0\].*unknown mechanism"):
        receptive_field(["no_such_thing"], 10)
    with pytest.raises(ValueError, match=r"schedule\[0\]"):
        receptive_field(["sliding_window:windw=4"], 10)
    with pytest.raises(TypeError, match="exact"):
        receptive_field(w, 10, exact="yes")
    with pytest.raises(ValueError, match="exact=True.*4096"):
        receptive_field(w, 5000, exact=True)
    with pytest.raises(ValueError, match="block"):
        receptive_field(w, 10, block=0)
    with pytest.raises(ValueError, match="max_depth"):
        receptive_field(w * 3, 10, max_depth=2)
    with pytest.raises(ValueError, match="queries"):
        receptive_field(w, 10, queries=[3, 10])
    with pytest.raises(ValueError, match="queries"):
        receptive_field(w, 10, queries=[])
    with pytest.raises(ValueError, match="queries"):
        receptive_field(w, 10, queries="some")
    with pytest.raises(TypeError, match="queries"):
        receptive_field(w, 10, queries=3)
    with pytest.raises(TypeError, match="queries"):
        receptive_field(w, 10, queries=[0.5])
    with pytest.raises(ValueError, match="BlockLayout"):
        receptive_field([P.causal().layout(20, block_q=4)], 30)
    with pytest.raises(ValueError, match="block=8 differs"):
        receptive_field([P.causal().layout(20, block_q=4)], 20, block=8)
    r = receptive_field(w, 5000)
    assert r.method == "frontier"
    with pytest.raises(ValueError, match="matrix"):
        r.matrix()
    with pytest.raises(ValueError, match="depth"):
        r.reach(0)
    with pytest.raises(TypeError, match="ReceptiveField"):
        plot_receptive_field("not a result", "x.png")


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    r = receptive_field(["sliding_window:window=16", "topk:top_k=2,causal=true", "dilated:window=4,dilation=8"],
                       3000, exact=False)
    path = tmp_path / "reach.png"
    plot_receptive_field(r, path)
    assert path.stat().st_size > 1000


def test_plot_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    r = receptive_field([P.sliding_window(4)], 20)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"sparse_attn\[viz\]"):
        plot_receptive_field(r, tmp_path / "x.png")
