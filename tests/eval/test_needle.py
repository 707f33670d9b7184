"""Needle in a haystack (sparse_attn.eval.needle): known answers, the exact mass channel, errors."""

import json
import math

import pytest
import torch

import sparse_attn
from sparse_attn import patterns as P
from sparse_attn.eval.needle import (
    DEFAULT_MECHANISMS,
    NeedleResult,
    make_haystack,
    needle_grid,
    needle_mechanism,
    plot_needle_heatmaps,
)
from sparse_attn.ops.mechanisms import Mechanism

SMALL = {"heads": 2, "dim": 32, "trials": 2, "progress": False}


def _grid(mechanisms, lengths, depths, **kw):
    return needle_grid(mechanisms, lengths, depths, **{**SMALL, **kw})


def test_dense_retrieves_at_every_depth():
    depths = [i / 10 for i in range(11)]
    res = _grid(["causal"], [64, 257], depths, threshold=0.9)
    assert res.mass["causal"].min() > 0.9
    assert bool(res.retrieved["causal"].all())
    assert res.hit_rate["causal"].min() == 1.0  # every trial, head and query, not only the mean
    assert res.cosine["causal"].min() > 0.9
    assert res.reference["mass"].min() > 0.9
    torch.testing.assert_close(res.mass["causal"], res.reference["mass"], atol=1e-5, rtol=0)
    assert res.positions[1] == [round(d * 256) for d in depths]
    assert res.positions[1][0] == 0 and res.positions[1][-1] == 256  # depth 1 = the query itself
    assert not res.errors


def test_sliding_window_retrieves_iff_needle_in_last_w_positions():
    # N = 101: depth d puts the needle at p = round(100 d); the query (position 100) sees 91..100.
    depths = [0.0, 0.5, 0.89, 0.90, 0.91, 0.92, 1.0]
    res = _grid(["sliding_window:window=10"], [101], depths)
    positions = res.positions[0]
    assert positions == [0, 50, 89, 90, 91, 92, 100]
    mass = res.mass["sliding_window:window=10"][0]
    for p, m in zip(positions, mass.tolist()):
        if p >= 101 - 10:
            assert m > 0.9, (p, m)
        else:
            assert m == 0.0, (p, m)  # not in the window: exactly no weight
    assert res.retrieved["sliding_window:window=10"][0].tolist() == [p >= 91 for p in positions]
    assert res.specs["sliding_window:window=10"] == ["sliding_window:window=10,causal=true"]


def test_streaming_sees_sinks_and_window_not_between():
    depths = [0.0, 0.03, 0.04, 0.5, 0.90, 0.91, 1.0]
    spec = "streaming:sinks=4,window=10"
    res = _grid([spec], [101], depths)
    positions = res.positions[0]
    assert positions == [0, 3, 4, 50, 90, 91, 100]
    mass = res.mass[spec][0].tolist()
    expect = [p < 4 or p >= 91 for p in positions]
    for p, m, seen in zip(positions, mass, expect):
        assert (m > 0.9) if seen else (m == 0.0), (p, m)
    assert res.retrieved[spec][0].tolist() == expect


def _dense_weights(hay, mask=None):
    """float64 softmax weights of the query rows, written out here independently of the module."""
    q = hay.q.double()[:, :, hay.queries]
    scores = q @ hay.k.double().transpose(-1, -2) / math.sqrt(hay.q.shape[-1])  # [B, H, Nq, N]
    allowed = torch.arange(hay.length)[None, :] <= hay.queries[:, None]
    if mask is not None:
        allowed = allowed & mask
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mass_channel_is_the_attention_weight(dtype):
    # dim 16, strength 1.5: the needle takes part of the mass only, so the check is not 1 == 1.
    hay = make_haystack(77, 0.8, trials=2, heads=3, dim=16, strength=1.5, num_queries=3, seed=5, dtype=dtype)
    assert hay.needle == round(0.8 * 74) and hay.queries.tolist() == [74, 75, 76]
    weights = _dense_weights(hay)
    assert 0.05 < float(weights[..., hay.needle].mean()) < 0.95
    out = sparse_attn.attention(hay.q, hay.k, hay.v, "causal")
    torch.testing.assert_close(hay.mass(out), weights[..., hay.needle], atol=1e-6, rtol=0)
    torch.testing.assert_close(hay.reference_weights(True), weights, atol=1e-12, rtol=0)

    pattern = P.sliding_window(20)  # the needle (59) is inside the window of every query
    out = sparse_attn.attention(hay.q, hay.k, hay.v, pattern)
    mask = pattern.to_dense(77)[0][hay.queries]  # [Nq, N]
    pw = _dense_weights(hay, mask)
    torch.testing.assert_close(hay.mass(out), pw[..., hay.needle], atol=1e-6, rtol=0)
    # only the query rows give the same reading
    short = sparse_attn.attention(hay.q[:, :, -3:], hay.k, hay.v, pattern)
    torch.testing.assert_close(hay.mass(short), pw[..., hay.needle], atol=1e-6, rtol=0)


def test_grid_reference_matches_independent_softmax():
    res = _grid(["causal", P.sliding_window(8)], [50], [0.2, 0.9], strength=1.0, dim=16)
    for di, d in enumerate([0.2, 0.9]):
        hay = make_haystack(50, d, trials=2, heads=2, dim=16, strength=1.0)
        w = _dense_weights(hay)[..., hay.needle]
        assert res.reference["mass"][0, di].item() == pytest.approx(w.mean().item(), abs=1e-12)
        assert res.mass["causal"][0, di].item() == pytest.approx(w.mean().item(), abs=1e-6)
    label = repr(P.sliding_window(8))
    assert res.rows[label] == "queries" and res.mass[label][0, 0] == 0.0


def test_kernelized_mass_is_a_convex_weight():
    res = _grid(["linear", "performer"], [96], [0.0, 0.5, 1.0])
    for name in ("linear", "performer"):
        grid = res.mass[name]
        assert res.rows[name] == "all"
        assert bool(((grid >= -1e-6) & (grid <= 1 + 1e-6)).all()), (name, grid)


def test_every_default_mechanism_runs():
    res = needle_grid(None, [128], [0.0, 0.5, 1.0], heads=2, dim=32, trials=1, progress=False)
    assert res.mechanisms == list(DEFAULT_MECHANISMS)
    assert not res.errors, res.errors
    for name in res.mechanisms:
        grid = res.mass[name]
        assert not bool(grid.isnan().any()), name
        assert bool(((grid >= -1e-5) & (grid <= 1 + 1e-5)).all()), (name, grid)
        assert res.seconds[name][0] > 0
    assert res.mass["causal"].min() > 0.9 and res.mass["topk"].min() > 0.9
    assert res.mass["sliding_window"][0, 1] == 0.0  # the middle is outside a window of N/16
    res = needle_grid(None, [64], [1.0], causal=False, heads=1, dim=16, trials=1, progress=False)
    assert res.mechanisms[0] == "full" and not res.errors
    assert "causal=false" in res.specs["sliding_window"][0]


def test_needle_mechanism_fills_length_defaults():
    assert str(needle_mechanism("sliding_window", 1024)) == "sliding_window:window=64,causal=true"
    assert needle_mechanism("topk:causal=false", 1024).params == {"top_k": 64, "causal": False}
    assert needle_mechanism(Mechanism("topk", top_k=3), 1024).params == {"top_k": 3, "causal": True}
    assert needle_mechanism("lsh", 256, seed=7).params["seed"] == 7
    gen = torch.Generator().manual_seed(1)
    assert "seed" not in needle_mechanism(Mechanism("lsh", generator=gen), 256).params  # not both
    assert needle_mechanism(Mechanism("performer", generator=gen), 256).params["generator"] is gen
    pat = P.causal()
    assert needle_mechanism(pat, 10) is pat


def test_deterministic_with_seed():
    a = make_haystack(40, 0.5, trials=2, heads=2, dim=8, seed=3)
    b = make_haystack(40, 0.5, trials=2, heads=2, dim=8, seed=3)
    c = make_haystack(40, 0.5, trials=2, heads=2, dim=8, seed=4)
    for x, y in ((a.q, b.q), (a.k, b.k), (a.v, b.v)):
        assert torch.equal(x, y)
    assert not torch.equal(a.q, c.q)
    mechs = ["causal", "performer", "lsh", "bigbird"]
    r1 = _grid(mechs, [64], [0.3, 1.0], seed=11)
    r2 = _grid(mechs, [64], [0.3, 1.0], seed=11)
    r3 = _grid(mechs, [64], [0.3, 1.0], seed=12)
    for name in mechs:
        for metric in ("mass", "cosine", "hit_rate"):
            assert torch.equal(getattr(r1, metric)[name], getattr(r2, metric)[name]), (name, metric)
    assert not torch.equal(r1.cosine["causal"], r3.cosine["causal"])
    # the grid's haystacks are make_haystack's
    hay = make_haystack(64, 0.3, trials=2, heads=2, dim=32, seed=11)
    out = sparse_attn.attention(hay.q, hay.k, hay.v, "causal")
    assert r1.mass["causal"][0, 0].item() == pytest.approx(hay.mass(out).mean().item(), abs=1e-12)


def test_argument_errors():
    for bad in (-0.1, 1.01, float("nan")):
        with pytest.raises(ValueError, match="depth"):
            make_haystack(16, bad)
        with pytest.raises(ValueError, match="depth"):
            needle_grid(["causal"], [16], [0.5, bad], progress=False)
    with pytest.raises(TypeError, match="depth"):
        make_haystack(16, "0.5")
    with pytest.raises(ValueError, match="depths"):
        needle_grid(["causal"], [16], [], progress=False)
    for bad, err in (([], ValueError), ([0], ValueError), ([-4], ValueError), ([16, 16], ValueError),
                     ([2.5], TypeError), ([True], TypeError), ("64", TypeError), (64, TypeError)):
        with pytest.raises(err, match="length"):
            needle_grid(["causal"], bad, [0.5], progress=False)
    with pytest.raises(ValueError, match="length"):
        needle_grid(["causal"], [3], [0.5], num_queries=4, progress=False)
    with pytest.raises(ValueError, match="length"):
        make_haystack(0, 0.5)
    with pytest.raises(ValueError, match="dim"):
        make_haystack(16, 0.5, dim=1)
    with pytest.raises(ValueError, match="strength"):
        make_haystack(16, 0.5, strength=0)
    with pytest.raises(ValueError, match="trials"):
        needle_grid(["causal"], [16], [0.5], trials=0, progress=False)
    with pytest.raises(ValueError, match="threshold"):
        needle_grid(["causal"], [16], [0.5], threshold=1.0, progress=False)
    with pytest.raises(ValueError, match="unknown mechanism"):
        needle_grid(["nope"], [16], [0.5], progress=False)
    with pytest.raises(ValueError, match="no parameter"):
        needle_grid(["sliding_window:size=4"], [16], [0.5], progress=False)
    with pytest.raises(TypeError, match="mechanisms"):
        needle_grid([3.5], [16], [0.5], progress=False)
    hay = make_haystack(16, 0.5, heads=2, dim=8)
    with pytest.raises(ValueError, match="rows"):
        hay.mass(torch.zeros(1, 2, 5, 8))


def test_failing_mechanism_is_recorded_not_silent():
    with pytest.warns(RuntimeWarning, match="window"):
        res = _grid(["causal", "sliding_window:window=0"], [32, 48], [0.5, 1.0])
    name = "sliding_window:window=0"
    assert [e["length"] for e in res.errors[name]] == [32, 48]
    assert "window" in res.errors[name][0]["error"]
    assert bool(res.mass[name].isnan().all()) and not bool(res.retrieved[name].any())
    assert not bool(res.mass["causal"].isnan().any())
    assert "ERROR sliding_window:window=0 at length 32" in str(res)


def test_json_round_trip():
    with pytest.warns(RuntimeWarning):
        res = _grid(["causal", "streaming:sinks=2,window=4", "topk:top_k=0"], [24, 40], [0.0, 0.5, 1.0])
    data = json.loads(json.dumps(res.to_dict(), allow_nan=False))  # strict JSON: NaN stored as null
    assert data["mass"]["topk:top_k=0"][0][0] is None
    back = NeedleResult.from_dict(data)
    assert back.to_dict() == res.to_dict()
    assert torch.equal(back.retrieved["causal"], res.retrieved["causal"])
    assert data["config"]["seed"] == 0 and data["config"]["causal"] is True
    with pytest.raises(ValueError, match="NeedleResult"):
        NeedleResult.from_dict({"lengths": [1]})


def test_plot_file_written(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.warns(RuntimeWarning):
        res = _grid(["causal", "sliding_window:window=4", "streaming:sinks=1,window=3", "topk:top_k=0", "linear"],
                    [16, 32], [0.0, 0.5, 1.0])
    path = tmp_path / "needle.png"
    assert plot_needle_heatmaps(res, path) == path
    assert path.stat().st_size > 1000
    plot_needle_heatmaps(res, tmp_path / "cos.png", metric="cosine")
    assert (tmp_path / "cos.png").exists()
    with pytest.raises(ValueError, match="metric"):
        plot_needle_heatmaps(res, tmp_path / "x.png", metric="speed")
