"""SparseCausalLM: per-layer schedules, config round trip, decoding through caches equals the
full forward, generation."""

import pytest
import torch

from sparse_attn import patterns as P
from sparse_attn.nn import FullCache, LinearStateCache, ModelConfig, PatternCache, SparseCausalLM, WindowCache

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
    # mean pooling over real tokens only
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[:, 35:] = False
    expected = enc.head(enc(tokens)[:, :35].mean(1))
    torch.testing.assert_close(enc.classify(tokens, mask), expected)
    first = encoder(num_classes=3, pooling="first")
    torch.testing.assert_close(first.classify(tokens), first.head(first(tokens)[:, 0]))


def test_encoder_errors():
    with pytest.raises(ValueError, match="pooling must be"):
        encoder(pooling="max")
    with pytest.raises(ValueError, match="no classification head"):
        encoder().classify(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="padding_mask must be a bool tensor"):
        encoder(num_classes=2).classify(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4))


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
