"""`attention(q, k, v, mechanism, ...)` and `Mechanism`: one entry for every mechanism, by
Pattern, name, spec string or config object; serialisable; clear errors."""

import pytest
import torch

import sparse_attn
from sparse_attn import Mechanism, attention, mechanisms
from sparse_attn import patterns as P
from sparse_attn.ops.linear import linear_attention
from sparse_attn.ops.lsh import lsh_attention
from sparse_attn.ops.performer import PerformerFeatures, performer_attention
from sparse_attn.ops.routing import routing_attention
from sparse_attn.ops.topk import block_topk_attention, topk_attention


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 113, 16, generator=g, dtype=torch.float64) for _ in range(3))
    return q, k[:, :2], v[:, :2]  # GQA 4:2


def test_every_mechanism_is_reachable_by_name_and_equals_its_op(qkv):
    q, k, v = qkv
    feats = PerformerFeatures(16, num_features=32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cases = [
        ("linear", {"causal": True}, lambda: linear_attention(q, k, v, causal=True)),
        ("performer", {"features": feats}, lambda: performer_attention(q, k, v, features=feats)),
        ("topk", {"top_k": 8, "causal": True}, lambda: topk_attention(q, k, v, 8, causal=True)),
        ("block_topk", {"top_k_blocks": 2, "block_size": 16},
         lambda: block_topk_attention(q, k, v, 2, 16)),
        ("lsh", {"bucket_size": 16, "n_hashes": 2, "seed": 3},
         lambda: lsh_attention(q, k, v, bucket_size=16, n_hashes=2, seed=3)),
        ("routing", {"num_clusters": 3, "window": 40, "causal": True},
         lambda: routing_attention(q, k, v, num_clusters=3, window=40, causal=True)),
        ("sliding_window", {"window": 9},
         lambda: sparse_attn.sparse_attention(q, k, v, P.sliding_window(9))),
        ("bigbird", {"block": 16, "seed": 2}, lambda: sparse_attn.sparse_attention(q, k, v, P.bigbird(16, seed=2))),
    ]
    assert {name for name, _, _ in cases} <= set(mechanisms())
    for name, params, direct in cases:
        expected = direct()
        torch.testing.assert_close(attention(q, k, v, name, **params), expected, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(Mechanism(name, **params)(q, k, v), expected, rtol=0, atol=0, msg=name)


def test_patterns_and_layouts_pass_straight_through(qkv):
    q, k, v = qkv
    pattern = P.longformer(8, 2)
    expected = sparse_attn.sparse_attention(q, k, v, pattern)
    torch.testing.assert_close(attention(q, k, v, pattern), expected, rtol=0, atol=0)
    layout = pattern.layout(113, block_q=16)
    torch.testing.assert_close(attention(q, k, v, layout), expected, rtol=1e-12, atol=1e-12)
    out, lse = attention(q, k, v, pattern, return_lse=True)
    assert lse.shape == q.shape[:3]
    with pytest.raises(TypeError, match="takes no mechanism parameters"):
        attention(q, k, v, pattern, window=3)


def test_spec_strings_parse_with_typed_values_and_round_trip():
    m = Mechanism.parse("performer:num_features=64,kernel=relu,causal=true")
    assert m.params == {"num_features": 64, "kernel": "relu", "causal": True}
    assert str(m) == "performer:num_features=64,kernel=relu,causal=true"
    assert Mechanism.parse(str(m)) == m and hash(Mechanism.parse(str(m))) == hash(m)
    lsh = Mechanism.parse("lsh:bucket_size=32,n_hashes=2,seed=none")
    assert lsh.params == {"bucket_size": 32, "n_hashes": 2, "seed": None}
    assert Mechanism.parse("sliding-window:window=16").pattern() == P.sliding_window(16) or \
        repr(Mechanism.parse("sliding_window:window=16").pattern()) == repr(P.sliding_window(16))
    assert Mechanism.parse("linear").params == {}


def test_dict_serialisation_round_trips(qkv):
    q, k, v = qkv
    m = Mechanism("topk", top_k=5, causal=True)
    d = m.to_dict()
    assert d == {"name": "topk", "params": {"top_k": 5, "causal": True}}
    m2 = Mechanism.from_dict(d)
    assert m2 == m
    torch.testing.assert_close(m2(q, k, v), m(q, k, v), rtol=0, atol=0)
    assert Mechanism("sliding_window", window=4).kind == "pattern"
    assert Mechanism("linear").kind == "kernelized" and Mechanism("lsh").kind == "dynamic"


def test_call_time_overrides_and_backend_rules(qkv):
    q, k, v = qkv
    base = Mechanism("topk", top_k=4)
    torch.testing.assert_close(attention(q, k, v, base, top_k=200), attention(q, k, v, "topk", top_k=200))
    # a forced backend goes to patterns and block_topk; the others have one implementation
    torch.testing.assert_close(attention(q, k, v, "sliding_window", window=5, backend="reference"),
                               attention(q, k, v, "sliding_window", window=5), rtol=1e-10, atol=1e-10)
    attention(q, k, v, "block_topk", top_k_blocks=1, block_size=32, backend="blocked")
    with pytest.raises(TypeError, match="'linear' takes no 'backend'"):
        attention(q, k, v, "linear", backend="blocked")
    with pytest.raises(TypeError, match="'linear' takes no 'scale'"):
        attention(q, k, v, "linear", scale=0.5)
    torch.testing.assert_close(attention(q, k, v, "topk", top_k=3, scale=0.5), topk_attention(q, k, v, 3, scale=0.5))


@pytest.mark.parametrize("call, error, message", [
    (lambda: Mechanism("nope"), ValueError, "unknown mechanism 'nope'; valid names: full, causal"),
    (lambda: Mechanism("linear", windw=3), TypeError, r"'linear' takes no parameter\(s\) windw; valid: feature_map"),
    (lambda: Mechanism.parse("topk:top_k"), ValueError, "expected key=value"),
    (lambda: Mechanism.parse("topk:k=3"), ValueError, "topk has no parameter 'k'; valid: top_k"),
    (lambda: Mechanism.parse("linear:causal=maybe"), ValueError, "causal must be true or false"),
    (lambda: Mechanism.parse(""), ValueError, "non-empty string"),
    (lambda: Mechanism.from_dict({"params": {}}), ValueError, "needs a 'name'"),
    (lambda: attention(*[torch.zeros(1, 1, 4, 2)] * 3, 42), TypeError, "mechanism must be a Pattern"),
])
def test_errors_name_what_is_wrong(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_op_errors_come_through(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="top_k"):
        attention(q, k, v, "topk", top_k=0)
