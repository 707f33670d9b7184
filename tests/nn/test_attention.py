"""SparseAttention and RotaryEmbedding: exact against a hand-written float64 pipeline, causal
where the mechanism is, every way of naming a mechanism, GQA, dropout, torch.compile."""

import math

import pytest
import torch

import sparse_attn
from sparse_attn import Mechanism
from sparse_attn import patterns as P
from sparse_attn.nn import RotaryEmbedding, SparseAttention


def rotate_pairs_reference(x, positions, base=10000.0):
    """Rotary embedding written out pair by pair (rotate-half layout), float64."""
    d = x.shape[-1]
    out = x.clone()
    for i in range(d // 2):
        theta = positions.double() * base ** (-2 * i / d)  # [N]
        c, s = torch.cos(theta), torch.sin(theta)
        a, b = x[..., i], x[..., i + d // 2]
        out[..., i] = a * c - b * s
        out[..., i + d // 2] = b * c + a * s
    return out


def test_rotary_matches_pairwise_rotation_and_is_relative():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 3, 11, 8, dtype=torch.float64)
    pos = torch.arange(11) * 7 + 3
    torch.testing.assert_close(rope(x, pos), rotate_pairs_reference(x, pos))
    torch.testing.assert_close(rope(x, pos).norm(dim=-1), x.norm(dim=-1))  # a rotation
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    dots = [float((rope(q, torch.tensor([m])) * rope(k, torch.tensor([m - 5]))).sum()) for m in (5, 17, 1000)]
    assert max(dots) - min(dots) < 1e-9  # the score depends on m - n only
    batched = torch.stack([torch.arange(11), torch.arange(11) + 100])
    torch.testing.assert_close(rope(x, batched)[1], rope(x[1:], torch.arange(11) + 100)[0])


@pytest.mark.parametrize("call, error, message", [
    (lambda: RotaryEmbedding(7), ValueError, "even int"),
    (lambda: RotaryEmbedding(8, base=1), ValueError, "base must be a number > 1"),
    (lambda: RotaryEmbedding(8)(torch.zeros(1, 1, 4, 8), torch.zeros(4)), TypeError, "integer tensor"),
    (lambda: RotaryEmbedding(8)(torch.zeros(1, 1, 4, 8), torch.arange(5)), ValueError, "5 entries"),
])
def test_rotary_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def manual_forward(layer: SparseAttention, x, pattern):
    """The layer's computation written out: projections, rotary, the reference backend, output."""
    b, n, _ = x.shape
    h, hkv, dh = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = (x @ layer.q_proj.weight.T).view(b, n, h, dh).transpose(1, 2)
    k = (x @ layer.k_proj.weight.T).view(b, n, hkv, dh).transpose(1, 2)
    v = (x @ layer.v_proj.weight.T).view(b, n, hkv, dh).transpose(1, 2)
    pos = torch.arange(n)
    q, k = rotate_pairs_reference(q, pos), rotate_pairs_reference(k, pos)
    out = sparse_attn.sparse_attention(q, k, v, pattern, backend="reference")
    return out.transpose(1, 2).reshape(b, n, h * dh) @ layer.out_proj.weight.T


@pytest.mark.parametrize("mechanism, pattern", [
    ("causal", P.causal()),
    ("sliding_window:window=9", P.sliding_window(9)),
    (P.longformer(8, 2), P.longformer(8, 2)),
    (Mechanism("bigbird", block=8, seed=1), P.bigbird(8, seed=1)),
])
def test_equals_the_written_out_pipeline(mechanism, pattern):
    layer = SparseAttention(48, 6, 2, mechanism).double()
    x = torch.randn(2, 37, 48, dtype=torch.float64)
    torch.testing.assert_close(layer(x), manual_forward(layer, x, pattern), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mechanism", ["causal", "sliding_window:window=5", "performer:causal=true,generator=0",
                                       "topk:top_k=4,causal=true", "linear:causal=true",
                                       "block_topk:top_k_blocks=2,block_size=8,causal=true"])
def test_causal_mechanisms_do_not_see_the_future(mechanism):
    layer = SparseAttention(32, 4, mechanism=mechanism).double()
    x = torch.randn(1, 40, 32, dtype=torch.float64)
    y = x.clone()
    y[:, 25:] += torch.randn_like(y[:, 25:])
    torch.testing.assert_close(layer(x)[:, :25], layer(y)[:, :25], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(layer(x)[:, 25:], layer(y)[:, 25:])


def test_every_way_of_naming_a_mechanism_gives_the_same_layer_output():
    x = torch.randn(2, 30, 32)
    outs = []
    for mech in ("sliding_window:window=7", Mechanism("sliding_window", window=7), P.sliding_window(7)):
        torch.manual_seed(0)
        outs.append(SparseAttention(32, 4, mechanism=mech)(x))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)


def test_gqa_no_rope_bias_and_gradients():
    layer = SparseAttention(32, 8, num_kv_heads=1, mechanism="sliding_window:window=6", rope=False, bias=True,
                           head_dim=12)
    assert layer.k_proj.out_features == 12 and layer.q_proj.out_features == 96 and layer.rotary is None
    x = torch.randn(3, 21, 32, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in layer.parameters())


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer = SparseAttention(32, 4, dropout=0.5)
    x = torch.randn(2, 16, 32)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    plain = SparseAttention(32, 4)
    plain.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), plain.eval()(x))
    layer.train()
    assert not torch.allclose(layer(x), plain(x))


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    layer = SparseAttention(32, 4, 2, "sliding_window:window=8")
    x = torch.randn(2, 24, 32)
    compiled = torch.compile(layer, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))


def test_torch_compile_does_not_recompile_for_every_length():
    """The blocked backend runs eagerly inside a compiled model (a graph break): traced, its plan
    was specialised per length (~100 graphs and a minute of compiling for 5 lengths)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    layer = SparseAttention(32, 4, 2, "sliding_window:window=8")
    compiled = torch.compile(layer, backend="aot_eager")
    for n in (24, 40, 56, 57, 90, 128):
        x = torch.randn(2, n, 32, requires_grad=True)
        out = compiled(x)
        torch.testing.assert_close(out, layer(x))
        out.sum().backward()  # autograd crosses the graph break
        assert x.grad is not None and torch.isfinite(x.grad).all()
    assert counters["stats"]["unique_graphs"] <= 8, dict(counters["stats"])


def test_state_dict_has_only_the_projections():
    layer = SparseAttention(16, 2, mechanism="causal")
    assert sorted(layer.state_dict()) == ["k_proj.weight", "out_proj.weight", "q_proj.weight", "v_proj.weight"]


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(dim=30, num_heads=4), ValueError, "dim \\(30\\) must be a multiple of num_heads \\(4\\)"),
    (dict(dim=32, num_heads=4, num_kv_heads=3), ValueError, "num_kv_heads \\(3\\) must divide num_heads \\(4\\)"),
    (dict(dim=32, num_heads=0), ValueError, "num_heads must be >= 1"),
    (dict(dim=32, num_heads=4, dropout=1.0), ValueError, "dropout must be a probability"),
    (dict(dim=32, num_heads=4, mechanism="nope"), ValueError, "unknown mechanism 'nope'"),
    (dict(dim=32, num_heads=4, mechanism=P.causal().layout(8)), TypeError, "must not be a BlockLayout"),
    (dict(dim=32, num_heads=4, rope="yes"), TypeError, "rope must be a bool"),
    (dict(dim=32, num_heads=4, backend="bogus"), ValueError,
     r"backend must be 'auto' or one of \[.*'blocked'.*\], got 'bogus'"),
    (dict(dim=32, num_heads=4, mechanism="lsh:causal=true", backend="blocked"), ValueError,
     "backend='blocked' picks the block backend of patterns and block_topk; lsh has one implementation"),
    (dict(dim=32, num_heads=4, mechanism="linear", deterministic=True), ValueError,
     "deterministic=True picks the backward of patterns and block_topk; linear has one implementation"),
    (dict(dim=32, num_heads=4, deterministic="yes"), TypeError, "deterministic must be a bool"),
])
def test_constructor_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        SparseAttention(**kwargs)


@pytest.mark.parametrize("deterministic", [None, True, False])
def test_deterministic_reaches_sparse_attention(monkeypatch, deterministic):
    """The layer's `deterministic` goes with every pattern call (the dense warm-up too); None
    passes nothing, so sparse_attention's own default applies."""
    import importlib

    mechanisms = importlib.import_module("sparse_attn.ops.mechanisms")  # the module (ops.mechanisms is a function)
    seen = []
    real = mechanisms.sparse_attention

    def spy(*args, **kw):
        seen.append(kw.get("deterministic", "absent"))
        return real(*args, **kw)

    monkeypatch.setattr(mechanisms, "sparse_attention", spy)
    layer = SparseAttention(32, 4, 2, "sliding_window:window=4", deterministic=deterministic)
    layer.set_warmup("causal", 0.5)
    layer(torch.randn(2, 9, 32)).sum().backward()
    assert seen == ["absent" if deterministic is None else deterministic] * 2
    assert ("deterministic" in repr(layer)) == (deterministic is not None)


def test_forward_errors():
    layer = SparseAttention(32, 4)
    with pytest.raises(ValueError, match=r"x must be \(batch, length, 32\)"):
        layer(torch.zeros(2, 5, 31))
    with pytest.raises(ValueError, match="5 entries but x has length 6"):
        layer(torch.zeros(1, 6, 32), positions=torch.arange(5))
    assert math.isfinite(float(layer(torch.zeros(1, 1, 32)).detach().sum()))  # one token


@pytest.mark.parametrize("mechanism", ["lsh:bucket_size=4,n_hashes=2,seed=0", "lsh:bucket_size=3,n_hashes=3,seed=2",
                                       "routing", "routing:num_clusters=3,window=4"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_lsh_and_routing_layers_take_a_padding_mask(mechanism, side):
    """Non-causal lsh / routing layers accept a padding_mask and give each row's real positions
    what the row alone gives (rotary positions from its first real token)."""
    torch.manual_seed(0)
    layer = SparseAttention(32, 4, num_kv_heads=2, mechanism=mechanism).double()
    lengths = (20, 13, 5, 7)
    rows = [torch.randn(1, n, 32, dtype=torch.float64) for n in lengths]
    batch = torch.zeros(4, 20, 32, dtype=torch.float64)
    mask = torch.zeros(4, 20, dtype=torch.bool)
    for b, r in enumerate(rows):
        cols = slice(20 - r.shape[1], 20) if side == "left" else slice(0, r.shape[1])
        batch[b, cols], mask[b, cols] = r[0], True
    out = layer(batch, padding_mask=mask)
    for b, r in enumerate(rows):
        torch.testing.assert_close(out[b:b + 1, mask[b]], layer(r), rtol=1e-10, atol=1e-10)
@pytest.mark.parametrize("mechanism", ["block_topk:top_k_blocks=2,block_size=4",
                                       "block_topk:top_k_blocks=2,block_size=4,causal=true"])
def test_block_topk_layer_takes_a_padding_mask(mechanism):
    """A block_topk layer accepts a padding_mask: under right padding (any real length, here
    off the 4-token blocks too) each row's real positions get what the row alone gets; under
    left padding (blocks cut elsewhere: not the row alone) the pad tokens' inputs change no
    real output, and pad rows are 0 before the output projection (its bias alone)."""
    torch.manual_seed(0)
    layer = SparseAttention(32, 4, num_kv_heads=2, mechanism=mechanism).double()
    lengths = (20, 13, 8, 5)
    rows = [torch.randn(1, n, 32, dtype=torch.float64) for n in lengths]
    batch = torch.zeros(4, 20, 32, dtype=torch.float64)
    mask = torch.arange(20)[None, :] < torch.tensor(lengths)[:, None]
    for b, r in enumerate(rows):
        batch[b, :r.shape[1]] = r[0]
    out = layer(batch, padding_mask=mask)
    for b, r in enumerate(rows):
        torch.testing.assert_close(out[b:b + 1, mask[b]], layer(r), rtol=1e-10, atol=1e-10)
    left = mask.flip(1)
    batch = torch.where(left[..., None], batch.flip(1), 0.0)  # the same rows, left-padded
    out = layer(batch, padding_mask=left)
    noisy = layer(torch.where(left[..., None], batch, 1e3 * torch.randn_like(batch)), padding_mask=left)
    assert torch.equal(out[left], noisy[left])
    bias = layer.out_proj.bias if layer.out_proj.bias is not None else torch.zeros(32, dtype=torch.float64)
    assert torch.equal(out[~left], bias.detach().expand_as(out[~left]))


