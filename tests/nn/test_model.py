"""SparseCausalLM: per-layer schedules, config round trip, decoding through caches equals the
full forward, generation."""

import pytest
import torch

from sparse_attn import register_mechanism, unregister_mechanism
from sparse_attn import patterns as P
from sparse_attn.nn import FullCache, LinearStateCache, ModelConfig, PatternCache, SparseCausalLM, WindowCache
from sparse_attn.ops.registry import DYNAMIC

HYBRID = ["causal", "sliding_window:window=8", "linear:causal=true", "streaming:sinks=2,window=8"]


def model(mechanisms=HYBRID, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, dim=32, num_layers=len(mechanisms) if isinstance(mechanisms, list) else 2,
                      num_heads=4, num_kv_heads=2, mechanisms=mechanisms, **kw)
    return SparseCausalLM(cfg).double().eval()


def test_schedule_builds_one_mechanism_per_layer_and_config_round_trips():
    m = model()
    assert [str(b.attn.mechanism) for b in m.blocks] == HYBRID
    cfg2 = ModelConfig.from_dict(m.cfg.to_dict())
    assert cfg2 == m.cfg
    m2 = SparseCausalLM(cfg2).double().eval()
    m2.load_state_dict(m.state_dict())
    tokens = torch.randint(0, 40, (2, 25))
    torch.testing.assert_close(m2(tokens), m(tokens), rtol=0, atol=0)
    with pytest.raises(ValueError, match="mechanisms lists 2 layers but num_layers is 3"):
        ModelConfig(vocab_size=5, num_layers=3, mechanisms=["causal", "causal"]).layer_mechanisms()


def test_deterministic_reaches_the_block_backend_layers():
    """ModelConfig(deterministic=True) reaches every layer on a block backend (patterns,
    block_topk) and leaves the others (linear) alone; it round-trips with the config."""
    mechs = HYBRID + ["block_topk:top_k_blocks=2,block_size=4,causal=true"]
    m = model(mechs, deterministic=True, leaky_mechanisms=["block_topk"])
    assert [b.attn.deterministic for b in m.blocks] == [True, True, None, True, True]
    assert ModelConfig.from_dict(m.cfg.to_dict()).deterministic is True
    assert all(b.attn.deterministic is None for b in model().blocks)  # default: each call's default
    tokens = torch.randint(0, 40, (2, 25))
    # deterministic=True with gradients skips sdpa for the causal layer: blocked, the same to rounding
    torch.testing.assert_close(m(tokens), model(mechs, leaky_mechanisms=["block_topk"])(tokens), rtol=1e-12,
                               atol=1e-12)


def test_layers_with_one_spec_share_its_layouts():
    """Equal spec strings share one Mechanism (so one Pattern and its layout cache): a new
    length builds one layout for the model, not one per layer, with the same results."""
    spec = "sliding_window:window=8"
    m = model([spec, "causal", spec, spec])
    mechs = [b.attn.mechanism for b in m.blocks]
    assert mechs[0] is mechs[2] is mechs[3] and mechs[1] is not mechs[0]
    pattern = mechs[0].pattern()
    tokens = torch.randint(0, 40, (2, 37))
    logits = m(tokens)
    assert sum(key[0] == 37 for key in pattern._layouts) == 1
    torch.manual_seed(0)
    unshared = SparseCausalLM(m.cfg).double().eval()
    for block in unshared.blocks[1:]:  # each layer its own parse, as before sharing
        block.attn.mechanism = type(block.attn.mechanism).parse(str(block.attn.mechanism))
    unshared.load_state_dict(m.state_dict())
    torch.testing.assert_close(unshared(tokens), logits, rtol=0, atol=0)


def test_auto_caches_pick_the_smallest_exact_cache_per_layer():
    caches = model().make_caches("auto")
    assert [type(c) for c in caches] == [FullCache, WindowCache, LinearStateCache, PatternCache]
    assert caches[1].window == 8


@pytest.mark.parametrize("kind", ["auto", "full", "pattern_where_possible"])
def test_decoding_logits_equal_the_full_forward(kind):
    m = model()
    tokens = torch.randint(0, 40, (2, 120))
    full = m(tokens)
    if kind == "pattern_where_possible":  # every pattern layer through PatternCache
        caches = [LinearStateCache() if i == 2 else PatternCache() for i in range(4)]
    else:
        caches = m.make_caches(kind)
    steps = [m(tokens[:, :30], caches)]  # chunked prefill
    steps += [m(tokens[:, t:t + 1], caches) for t in range(30, 120)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)


def test_generate_greedy_matches_argmax_of_full_forwards_and_streams():
    m = model()
    prompt = torch.randint(0, 40, (1, 12))
    out = m.generate(prompt, 10, temperature=0)
    assert out.shape == (1, 22) and torch.equal(out[:, :12], prompt)
    for t in range(12, 22):  # each generated token is the argmax after the tokens before it
        assert int(m(out[:, :t])[:, -1].argmax()) == int(out[0, t])
    streamed = torch.cat(list(m.generate(prompt, 10, temperature=0, stream=True)), 1)
    torch.testing.assert_close(streamed, out[:, 12:], rtol=0, atol=0)


def test_sampling_is_reproducible_with_a_generator_and_top_k_limits_choices():
    m = model()
    prompt = torch.randint(0, 40, (3, 5))
    a = m.generate(prompt, 8, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(1))
    b = m.generate(prompt, 8, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    top1 = m.generate(prompt, 8, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(top1, m.generate(prompt, 8, temperature=0))


def test_window_cache_memory_is_flat_during_generation():
    m = model(["sliding_window:window=8"] * 2)
    caches = m.make_caches("window", window=8)
    m.generate(torch.randint(0, 40, (1, 4)), 20, caches=caches, temperature=0)
    before = [c.memory_bytes() for c in caches]
    for _ in range(30):
        m(torch.randint(0, 40, (1, 1)), caches)
    assert [c.memory_bytes() for c in caches] == before


@pytest.mark.parametrize("call, error, message", [
    (lambda m: m(torch.zeros(2, 3)), ValueError, "integer tensor"),
    (lambda m: m(torch.zeros(1, 3, dtype=torch.long), [FullCache()]), ValueError, "one cache per layer"),
    (lambda m: m.make_caches("window"), ValueError, "needs window="),
    (lambda m: m.make_caches("nope"), ValueError, "cache kind must be one of"),
    (lambda m: m.generate(torch.zeros(1, 2, dtype=torch.long), -1), ValueError, "max_new_tokens must be >= 0"),
    (lambda m: m.generate(torch.zeros(1, 2, dtype=torch.long), 2, temperature=-1), ValueError, "temperature"),
])
def test_errors(call, error, message):
    with pytest.raises(error, match=message):
        call(model())


def test_pattern_objects_in_a_schedule():
    m = model([P.sliding_window(6), "causal"])
    tokens = torch.randint(0, 40, (1, 20))
    caches = m.make_caches("auto")
    assert isinstance(caches[0], WindowCache) and caches[0].window == 6
    steps = torch.cat([m(tokens[:, t:t + 1], caches) for t in range(20)], 1)
    torch.testing.assert_close(steps, m(tokens), rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------ encoder
def encoder(**kw):
    from sparse_attn.nn import SparseTransformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=30, dim=32, num_layers=2, num_heads=4,
                      mechanisms=["sliding_window:window=6,causal=false", "longformer:window=6,global_tokens=1"])
    return SparseTransformer(cfg, **kw).double().eval()


def test_encoder_sees_both_directions_and_classifies():
    enc = encoder(num_classes=3)
    tokens = torch.randint(0, 30, (2, 40))
    h = enc(tokens)
    assert h.shape == (2, 40, 32)
    changed = tokens.clone()
    changed[:, 30] = (changed[:, 30] + 1) % 30
    assert not torch.allclose(enc(changed)[:, 28], h[:, 28])  # a later token changes an earlier state
    assert torch.allclose(enc(changed)[:, 10], h[:, 10])  # out of reach of both windows (token 0 is global)
    logits = enc.classify(tokens)
    assert logits.shape == (2, 3)
    # a right-padded batch classifies each row as alone: pads are neither attended nor pooled
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[:, 35:] = False
    expected = enc.head(enc(tokens[:, :35]).mean(1))
    torch.testing.assert_close(enc.classify(tokens, mask), expected)
    left = torch.cat([torch.zeros(2, 5, dtype=torch.long), tokens[:, :35]], 1)  # and left padding too
    torch.testing.assert_close(enc.classify(left, mask.flip(1)), expected)
    first = encoder(num_classes=3, pooling="first")
    torch.testing.assert_close(first.classify(tokens), first.head(first(tokens)[:, 0]))


def test_encoder_errors():
    with pytest.raises(ValueError, match="pooling must be"):
        encoder(pooling="max")
    with pytest.raises(ValueError, match="no classification head"):
        encoder().classify(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="padding_mask must be a bool tensor"):
        encoder(num_classes=2).classify(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"tokens must be in \[0, 30\) \(vocab_size 30\), got 30"):  # was an IndexError
        encoder()(torch.tensor([[1, 30]]))
    with pytest.raises(TypeError, match="check_tokens must be a bool"):
        encoder()(torch.tensor([[1, 2]]), check_tokens=1)


def test_check_tokens_false_reads_no_token_back_and_changes_no_result():
    """The id range check is the only host read of the tokens (a device sync per call on
    CUDA); check_tokens=False skips it, keeps the type/device checks, and gives the same logits."""
    from sa_testing import HostReadError, NoHostReads

    from sparse_attn.nn.model import _check_tokens

    tokens = torch.randint(0, 30, (2, 12))
    with NoHostReads():
        _check_tokens(tokens, 30, tokens.device, values=False)
    with pytest.raises(HostReadError), NoHostReads():
        _check_tokens(tokens, 30, tokens.device)
    with pytest.raises(ValueError, match="int64 or int32"):
        _check_tokens(tokens.float().long().to(torch.int16), 30, tokens.device, values=False)
    enc = encoder(num_classes=3)
    torch.testing.assert_close(enc.classify(tokens, check_tokens=False), enc.classify(tokens), rtol=0, atol=0)
    lm = SparseCausalLM(ModelConfig(vocab_size=30, dim=16, num_layers=1, num_heads=2)).eval()
    torch.testing.assert_close(lm(tokens, check_tokens=False), lm(tokens), rtol=0, atol=0)


# ----------------------------------------------------------------- dense-to-sparse warm-up
def test_warmup_blends_from_dense_to_the_schedule_and_is_saved_with_the_state_dict():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, dim=32, num_layers=2, num_heads=4, mechanisms="sliding_window:window=4",
                      warmup_steps=10)
    m = SparseCausalLM(cfg).double().eval()
    dense = SparseCausalLM(ModelConfig(**{**cfg.to_dict(), "mechanisms": "causal", "warmup_steps": 0})).double().eval()
    sparse = SparseCausalLM(ModelConfig(**{**cfg.to_dict(), "warmup_steps": 0})).double().eval()
    dense.load_state_dict(m.state_dict())
    sparse.load_state_dict(m.state_dict())
    tokens = torch.randint(0, 40, (2, 30))
    torch.testing.assert_close(m(tokens), dense(tokens))  # step 0: dense attention
    m.advance(10)
    torch.testing.assert_close(m(tokens), sparse(tokens))  # warm-up done: the schedule
    assert cfg.sparse_weight(5) == 0.5 and cfg.sparse_weight(50) == 1.0
    fresh = SparseCausalLM(cfg).double().eval()
    fresh.load_state_dict(m.state_dict())  # the step count travels with the weights
    assert int(fresh.train_step) == 10
    torch.testing.assert_close(fresh(tokens), sparse(tokens))
    with pytest.raises(ValueError, match="warm-up finished"):
        SparseCausalLM(cfg)(tokens[:, :3], SparseCausalLM(cfg).make_caches("full"))


@pytest.mark.parametrize("warmup", [0, 10])
def test_forward_reads_no_step_count_back(warmup):
    """The warm-up weight comes from a host copy of the step count (the buffer read was a device
    synchronisation per forward on CUDA); after load_state_dict the buffer is read once."""
    from sa_testing import NoHostReads

    # causal linear attention: a mechanism whose CPU path reads nothing back either
    cfg = ModelConfig(vocab_size=40, dim=16, num_layers=1, num_heads=2, mechanisms="linear:causal=true",
                      warmup_steps=warmup)
    m = SparseCausalLM(cfg).double()
    tokens = torch.randint(0, 40, (2, 12))
    m.advance(3)
    with NoHostReads():
        m(tokens, check_tokens=False)
    fresh = SparseCausalLM(cfg).double()
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh(tokens, check_tokens=False), m(tokens, check_tokens=False), rtol=0, atol=0)
    fresh.advance(4)
    assert int(fresh.train_step) == 7
    with NoHostReads():
        fresh(tokens, check_tokens=False)
    if warmup:  # at step 7 of 10 the blend differs from step 3's
        assert not torch.equal(fresh(tokens, check_tokens=False), m(tokens, check_tokens=False))


@pytest.mark.parametrize("mechanism", ["full", "sliding_window:window=8,causal=false", "bigbird:block=4",
                                       "longformer:window=8", "linear", "topk:top_k=4"])
def test_causal_lm_refuses_mechanisms_that_see_the_future(mechanism):
    with pytest.raises(ValueError, match="layer 1"):
        SparseCausalLM(ModelConfig(vocab_size=16, dim=16, num_layers=2, num_heads=2, mechanisms=["causal", mechanism]))


def test_causal_lm_takes_causal_bigbird_and_longformer():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, dim=16, num_layers=2, num_heads=2,
                      mechanisms=["bigbird:block=4,causal=true", "longformer:window=8,global_tokens=2,causal=true"])
    model = SparseCausalLM(cfg).double()
    tokens = torch.randint(0, 16, (1, 40))
    out = model(tokens)
    changed = tokens.clone()
    changed[0, 30:] = (changed[0, 30:] + 1) % 16
    assert torch.equal(model(changed)[0, :30], out[0, :30])  # no position sees a later token


# -------------------------------------------------------------- caches are one per layer
def test_one_cache_shared_by_two_layers_is_refused():
    """[c, c] used to decode 0.087 off the full forward: the second layer wrote into the first's keys."""
    m = model(["causal", "causal"])
    c = FullCache()
    with pytest.raises(ValueError, match="FullCache is already used by another layer"):
        m(torch.randint(0, 40, (1, 4)), [c, c])
    caches = m.make_caches("full")
    m(torch.randint(0, 40, (2, 4)), caches)
    with pytest.raises(ValueError, match="batch 2.*this call has batch 3"):  # was a raw torch.cat error
        m(torch.randint(0, 40, (3, 1)), caches)


# ------------------------------------- mechanisms that choose keys from later positions
LEAKY = [("lsh", "lsh:causal=true,bucket_size=4,n_hashes=2,seed=0"),
         ("routing", "routing:causal=true,num_clusters=3,window=8"),
         ("block_topk", "block_topk:causal=true,top_k_blocks=2,block_size=8")]


@pytest.mark.parametrize("name, spec", LEAKY)
def test_causal_selection_is_decided_from_later_positions(name, spec):
    """What the refusal below rests on: with causal=True these attend only keys j <= i, but which
    past keys row i gets (LSH's hash sort, routing's balanced clusters, block top-k's query-block
    mean) depends on later tokens, so rows <= p change when only positions > p change."""
    from sparse_attn import attention

    q, k, v = (torch.randn(4, 2, 48, 16, dtype=torch.float64) for _ in range(3))  # 8 rows: a choice flips in some
    out = attention(q, k, v, spec)
    p = 25
    later = [t.clone() for t in (q, k, v)]
    for t in later:
        t[:, :, p + 1:] = torch.randn_like(t[:, :, p + 1:])
    assert not torch.allclose(attention(*later, spec)[:, :, :p + 1], out[:, :, :p + 1])
    # a causal LM built with it (opted in) reads the future through that choice
    m = model(["causal", spec], leaky_mechanisms=[name])
    tokens = torch.randint(0, 40, (4, 48))
    changed = tokens.clone()
    changed[:, p + 1:] = torch.randint(0, 40, (4, 48 - p - 1))
    assert not torch.allclose(m(changed)[:, :p + 1], m(tokens)[:, :p + 1])


@pytest.mark.parametrize("name, spec", LEAKY)
def test_causal_lm_refuses_leaky_selection_unless_listed(name, spec):
    with pytest.raises(ValueError, match=f"layer 1: {name}:causal=true.*decided from later positions too.*"
                                         fr"leaky_mechanisms=\['{name}'\]"):
        model(["causal", spec])
    m = model(["causal", spec], leaky_mechanisms=[name])  # the explicit opt-in
    assert m(torch.randint(0, 40, (2, 16))).shape == (2, 16, 40)
    assert ModelConfig.from_dict(m.cfg.to_dict()).leaky_mechanisms == [name]
    with pytest.raises(ValueError, match="no cache decodes it"):  # decoding can never equal the forward
        m.generate(torch.randint(0, 40, (1, 16)), 2)


@pytest.mark.parametrize("value, error, message", [
    (["topk"], ValueError, r"leaky_mechanisms lists 'topk'; only .*block_topk, lsh, routing"),
    ("lsh", TypeError, "leaky_mechanisms must be a list of mechanism names"),
])
def test_leaky_mechanisms_errors(value, error, message):
    with pytest.raises(error, match=message):
        model(["causal", "causal"], leaky_mechanisms=value)


# --------------------------------------------------------------------------- padding
def test_right_padded_batch_gives_each_row_its_own_logits_at_its_real_positions():
    """Every layer is causal, so pads after a row's tokens are never seen by its real positions,
    even without a padding_mask (left padding needs one: see the test below)."""
    m = model()
    rows = [torch.randint(0, 40, (1, n)) for n in (20, 13, 7)]
    batch = torch.zeros(3, 20, dtype=torch.long)
    for b, r in enumerate(rows):
        batch[b, :r.shape[1]] = r
    logits = m(batch)
    for b, r in enumerate(rows):
        torch.testing.assert_close(logits[b:b + 1, :r.shape[1]], m(r), rtol=1e-10, atol=1e-10)


PATTERN_LAYERS = ["causal", "sliding_window:window=5", "streaming:sinks=2,window=4",
                  "longformer:window=6,global_tokens=2,causal=true", "dilated:window=3,dilation=2", "linear:causal=true",
                  "topk:top_k=3,causal=true", "performer:causal=true,generator=0"]


DYNAMIC_LAYERS = ["lsh:causal=true,bucket_size=4,n_hashes=2,seed=0", "routing:causal=true",
                  "routing:causal=true,num_clusters=2", "lsh:causal=true,bucket_size=16,n_hashes=3,seed=1"]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("layers, leaky", [(PATTERN_LAYERS, []), (DYNAMIC_LAYERS, ["lsh", "routing"])],
                         ids=["patterns", "lsh_routing"])
def test_padded_batch_with_a_padding_mask_equals_each_row_alone(side, layers, leaky):
    """Positions (pattern and rotary) count from each row's first real token, pad keys unseen;
    LSH hashes and routing routes each row with the sizes of its real length (bucket count,
    default clusters and window), pads in no chunk's or cluster's place: each row alone."""
    m = model(layers, leaky_mechanisms=leaky)
    lengths = (20, 13, 1, 7)
    rows = [torch.randint(0, 40, (1, n)) for n in lengths]
    batch = torch.zeros(4, 20, dtype=torch.long)
    mask = torch.zeros(4, 20, dtype=torch.bool)
    for b, r in enumerate(rows):
        cols = slice(20 - r.shape[1], 20) if side == "left" else slice(0, r.shape[1])
        batch[b, cols], mask[b, cols] = r, True
    logits = m(batch, padding_mask=mask)
    for b, r in enumerate(rows):
        torch.testing.assert_close(logits[b:b + 1, mask[b]], m(r), rtol=1e-10, atol=1e-10)


def _dense_without_padding(q, k, v, *, causal: bool = False, scale: float | None = None):
    """A non-pattern mechanism that takes no key_padding_mask (dense softmax attention)."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)


def test_padding_mask_errors():
    m = model(PATTERN_LAYERS)
    tokens = torch.randint(0, 40, (2, 6))
    with pytest.raises(ValueError, match=r"padding_mask must be a bool tensor of shape \(2, 6\)"):
        m(tokens, padding_mask=torch.ones(2, 6))
    # every built-in non-pattern mechanism takes a mask now: a registered one without key_padding_mask
    register_mechanism(name="no_padding_toy", kind=DYNAMIC, op=_dense_without_padding, summary="test: no mask")
    try:
        with pytest.raises(ValueError, match="mechanism no_padding_toy:causal=true takes no padding_mask"):
            model(["causal", "no_padding_toy:causal=true"])(tokens, padding_mask=torch.ones(2, 6, dtype=torch.bool))
    finally:
        unregister_mechanism("no_padding_toy")
    # block_topk takes one: right padding gives each row its logits alone
    m = model(["causal", "block_topk:block_size=2,top_k_blocks=2,causal=true"], leaky_mechanisms=["block_topk"])
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    logits = m(tokens, padding_mask=mask)
    torch.testing.assert_close(logits[1:, :3], m(tokens[1:, :3]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="padding_mask and cache exclude each other"):
        m(tokens, m.make_caches("full"), padding_mask=torch.ones(2, 6, dtype=torch.bool))


def test_generate_with_lengths_equals_each_row_alone():
    """Without `lengths` the model cannot tell pads from tokens (it has no pad token) and would
    continue after them; with it each row continues from its last real token, overwriting its
    pads, and equals the row generated alone."""
    m = model()
    rows = [torch.randint(0, 40, (1, n)) for n in (9, 4, 1)]
    prompt = torch.full((3, 9), 39)
    for b, r in enumerate(rows):
        prompt[b, :r.shape[1]] = r
    out = m.generate(prompt, 5, temperature=0, lengths=[9, 4, 1])
    assert out.shape == (3, 14)
    for b, r in enumerate(rows):
        alone = m.generate(r, 14 - r.shape[1], temperature=0)
        assert torch.equal(out[b:b + 1], alone)
    streamed = list(m.generate(prompt, 5, temperature=0, lengths=torch.tensor([9, 4, 1]), stream=True))
    assert torch.equal(torch.cat([prompt[:, :1]] + streamed, 1), out)  # columns after the shortest prompt
    assert not torch.equal(m.generate(prompt, 5, temperature=0), out)  # the pads read as tokens


@pytest.mark.parametrize("lengths, error, message", [
    ([3, 2], ValueError, r"lengths must hold one length per prompt row \(3\), got 2"),
    ([3, 0, 1], ValueError, r"lengths must be in \[1, 3\] \(the prompt's width\), got \[3, 0, 1\]"),
    ([3, 4, 1], ValueError, r"lengths must be in \[1, 3\]"),
    (torch.tensor([1.0, 2.0, 3.0]), TypeError, "lengths must be integers"),
])
def test_generate_lengths_errors(lengths, error, message):
    with pytest.raises(error, match=message):
        model().generate(torch.zeros(3, 3, dtype=torch.long), 2, lengths=lengths)


@pytest.mark.parametrize("call, message", [
    (lambda m: m.generate(torch.zeros(1, 0, dtype=torch.long), 2), r"prompt must hold at least one token"),
    (lambda m: m.generate(torch.full((1, 3), 40), 2), r"prompt must be in \[0, 40\) \(vocab_size 40\), got 40"),
    (lambda m: m.generate(torch.full((1, 3), -1), 2), r"prompt must be in \[0, 40\).*got -1"),
    (lambda m: m(torch.tensor([[1, 2, 45]])), r"tokens must be in \[0, 40\).*got 45"),
    (lambda m: m(torch.tensor([1, 2, 3])), r"tokens must be an integer tensor \(batch, length\), got \(3,\)"),
    (lambda m: m(torch.ones(1, 3, dtype=torch.bool)), "integer tensor .* of int64 or int32 token ids, got torch.bool"),
    (lambda m: m(torch.zeros(1, 3, dtype=torch.long, device="meta")), "tokens are on meta but the model is on cpu"),
    (lambda m: m.generate(torch.zeros(1, 2, dtype=torch.long), 2, temperature=float("nan")), "temperature must be"),
    (lambda m: m.generate(torch.zeros(1, 2, dtype=torch.long), 2, temperature=float("inf")), "temperature must be"),
])
def test_named_errors_instead_of_raw_ones(call, message):
    with pytest.raises(ValueError, match=message):
        call(model())
