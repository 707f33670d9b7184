"""Adding a mechanism is one registry entry: a toy mechanism registered from outside the package
(here, in the test file) shows up in `sparse_attn.mechanisms()`, the CLI (listing, spec parsing,
`compare`), the needle grid, `reach`, and the nn caches, and leaves no trace once unregistered."""

import math

import pytest
import torch
from sa_testing import run_cli

import sparse_attn
from sparse_attn import Mechanism, MechanismInfo, register_mechanism, unregister_mechanism
from sparse_attn import patterns as P
from sparse_attn.cli import specs
from sparse_attn.eval.needle import needle_defaults, needle_grid
from sparse_attn.eval.reach import receptive_field
from sparse_attn.nn.cache import FullCache, WindowCache, auto_cache
from sparse_attn.ops.registry import DYNAMIC, EVERY_KEY, PATTERN, UPPER_BOUND


# ------------------------------------------------------------------ the toy mechanisms, made here
def keep_strongest(q, k, v, *, keep: int = 8, causal: bool = False, scale: float | None = None):
    """Dense softmax over each query's `keep` highest-scoring keys (the last Nq key positions
    are the queries'): a data-dependent mechanism in ten lines."""
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))  # GQA
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)  # [B, H, Nq, Nkv]
    if causal:
        rows = torch.arange(q.shape[2], device=q.device)[:, None] + (k.shape[2] - q.shape[2])
        scores = scores.masked_fill(torch.arange(k.shape[2], device=q.device) > rows, float("-inf"))
    kth = scores.topk(min(keep, k.shape[2]), dim=-1).values[..., -1:]
    scores = scores.masked_fill(scores < kth, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def keeps_every_key(params, length):
    keep = params.get("keep")
    return EVERY_KEY if isinstance(keep, int) and keep >= length else UPPER_BOUND


TOY = MechanismInfo(
    name="keep_strongest", kind=DYNAMIC, op=keep_strongest, summary="toy: softmax over the strongest keys",
    defaults=lambda n: {"keep": max(1, n // 8), "causal": False},  # what a spec gets at length n
    budget=lambda n, keys, seed: {"keep": keys},  # about `keys` keys per query (needle grid)
    receptive_field=keeps_every_key,  # cache: every key (the default for non-pattern kinds)
)

TOY_BAND = MechanismInfo(  # a pattern mechanism: the op builds a Pattern
    name="toy_band", kind=PATTERN, op=lambda width, causal=True: P.sliding_window(width, causal=causal),
    summary="toy: a sliding window under another name", defaults=lambda n: {"width": max(1, n // 4), "causal": True},
    budget=lambda n, keys, seed: {"width": keys},
)


@pytest.fixture
def toys():
    infos = [register_mechanism(TOY), register_mechanism(TOY_BAND)]
    try:
        yield infos
    finally:
        for info in infos:
            unregister_mechanism(info.name)
    assert not {"keep_strongest", "toy_band"} & set(sparse_attn.mechanisms())


def qkv(n=48, heads=2, dim=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, heads, n, dim, generator=g, dtype=torch.float64) for _ in range(3)]


# ------------------------------------------------------------------------------------- tests
def test_registered_mechanism_is_public_and_callable_by_name_and_spec(toys):
    assert sparse_attn.mechanisms()["keep_strongest"] is toys[0]
    q, k, v = qkv()
    expected = keep_strongest(q, k, v, keep=5, causal=True)
    torch.testing.assert_close(sparse_attn.attention(q, k, v, "keep_strongest", keep=5, causal=True), expected)
    torch.testing.assert_close(sparse_attn.attention(q, k, v, "keep_strongest:keep=5,causal=true"), expected)
    m = Mechanism.parse("keep_strongest:keep=5")
    assert m.params == {"keep": 5} and Mechanism.parse(str(m)) == m
    torch.testing.assert_close(sparse_attn.attention(q, k, v, "toy_band:width=6"),
                               sparse_attn.sparse_attention(q, k, v, P.sliding_window(6)))
    with pytest.raises(ValueError, match="keep_strongest has no parameter 'kept'"):
        Mechanism.parse("keep_strongest:kept=5")
    with pytest.raises(ValueError, match="already registered"):
        register_mechanism(TOY)


def test_cli_lists_and_parses_it(toys, capsys):
    assert "keep_strongest" in specs.MECHANISM_REGISTRY and "toy_band" in specs.REGISTRY
    text = specs.describe(64)
    assert "keep_strongest  keep=8,causal=false" in text and "toy: softmax over the strongest keys" in text
    spec = specs.parse_spec("keep_strongest:causal=true", 64)
    assert spec.params == {"keep": 8, "causal": True} and spec.mechanism.name == "keep_strongest"
    band = specs.parse_spec("toy_band", 64)
    assert repr(band.pattern) == repr(P.sliding_window(16))
    code, out, err = run_cli(capsys, "compare", "--help")
    assert code == 0 and "keep_strongest" in out and "toy_band" in out
    code, out, err = run_cli(capsys, "show", "toy_band:width=3", "--length", "8")
    assert code == 0, err
    assert "toy_band:width=3,causal=true" in out


def test_compare_runs_it(toys, capsys):
    code, out, err = run_cli(capsys, "compare", "--length", "64", "--mechanisms", "keep_strongest:keep=64",
                             "toy_band", "--heads", "2", "--dim", "16", "--repeats", "1", "--no-progress")
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.startswith(("keep_strongest", "toy_band"))}
    assert float(rows["keep_strongest:keep=64"][-2]) < 1e-5  # keeping every key is dense attention
    assert float(rows["toy_band"][-2]) < 1e-5  # a pattern is exact against its own reference


def test_needle_grid_sizes_it_by_its_budget(toys):
    assert needle_defaults("keep_strongest", 256, causal=True) == {"keep": 16, "causal": True}
    res = needle_grid(["keep_strongest", "toy_band"], lengths=[64], depths=[0.0, 1.0], heads=1, trials=1,
                      progress=False)
    assert res.mechanisms == ["keep_strongest", "toy_band"] and not res.errors
    assert res.specs["keep_strongest"] == ["keep_strongest:keep=4,causal=true"]
    assert res.rows["keep_strongest"] == "all" and res.rows["toy_band"] == "queries"
    assert all(not math.isnan(x) for x in res.mass["keep_strongest"].flatten().tolist())
    assert float(res.mass["keep_strongest"][0, 1]) > 0.5  # the needle is among the strongest keys


def test_reach_reads_its_receptive_field(toys):
    bound = receptive_field(["keep_strongest:keep=4,causal=true"] * 2, 32)
    assert bound.upper_bound and "picks its keys from the data" in bound.reasons[0]
    exact = receptive_field(["keep_strongest:keep=32"], 32)
    assert not exact.upper_bound and "keeps every key" in exact.layers[0]
    band = receptive_field(["toy_band:width=4"] * 3, 32)
    assert not band.upper_bound
    assert torch.equal(band.counts, receptive_field([P.sliding_window(4)] * 3, 32).counts)


def test_nn_caches_follow_the_entry(toys):
    assert isinstance(auto_cache(Mechanism("keep_strongest", keep=4, causal=True)), FullCache)
    window = auto_cache(Mechanism("toy_band", width=5))
    assert isinstance(window, WindowCache) and window.window == 5


def test_registration_is_checked():
    with pytest.raises(ValueError, match="built in"):
        unregister_mechanism("linear")
    with pytest.raises(ValueError, match="kind must be one of"):
        register_mechanism(name="bad", kind="magic", op=keep_strongest, summary="")
    with pytest.raises(ValueError, match="receptive_field"):
        register_mechanism(name="bad", kind=DYNAMIC, op=keep_strongest, summary="", receptive_field="exact")
    assert "bad" not in sparse_attn.mechanisms()
