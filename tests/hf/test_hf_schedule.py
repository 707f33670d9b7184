"""sparse_attn.hf with a schedule (exact against a dense-mask reference; a padded row equals the
row alone), the switch itself, what is refused, and `row_mask` on cache geometries."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers.masking_utils")

import torch  # noqa: E402
import transformers as tf  # noqa: E402
import transformers.masking_utils as mu  # noqa: E402
from tiny_hf import WINDOW, assert_close, build, left_padded  # noqa: E402

import sparse_attn.hf as H  # noqa: E402
from sparse_attn import Mechanism  # noqa: E402
from sparse_attn import patterns as P  # noqa: E402
from sparse_attn._extras import MissingExtra  # noqa: E402

LENGTHS = [23, 5, 14]


def _logits(model, ids, mask, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def _dense_mask(mask, pattern):
    """A custom additive 4-D mask for transformers' eager attention: `pattern` at positions
    counted from each row's first real token, real keys only (pad query rows see themselves)."""
    bsz, n = mask.shape
    real = mask.bool()
    allowed = torch.zeros(bsz, 1, n, n, dtype=torch.bool)
    for b in range(bsz):
        first = int(real[b].int().argmax())
        allowed[b, 0, first:, first:] = pattern.to_dense(n - first, n - first)[0] & real[b, first:][None, :]
        pads = (~real[b]).nonzero().squeeze(1)
        allowed[b, 0, pads, pads] = True
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def _dense_reference(model, ids, mask, pattern):
    assert model.config._attn_implementation == "eager"
    return _logits(model, ids, _dense_mask(mask, pattern))


@pytest.mark.parametrize("name", ["llama", "gpt_oss"])
def test_streaming_schedule_equals_a_dense_mask_and_rows_alone(name):
    pattern = P.streaming(4, 8)
    model = build(name)
    ids, mask = left_padded(LENGTHS)
    ref = _dense_reference(model, ids, mask, pattern)
    own = _logits(model, ids, mask)
    H.enable(model, pattern)
    out = _logits(model, ids, mask)
    valid = mask.bool()
    assert_close(out[valid], ref[valid])
    assert float((out[valid] - own[valid]).abs().max()) > 1e-2  # the schedule changed the model
    for b, length in enumerate(LENGTHS):  # a padded row equals the row alone (no padding at all)
        alone = _logits(model, ids[b:b + 1, -length:], None)
        assert_close(out[b, -length:], alone[0], what=f"row {b}")
    H.disable(model)
    assert torch.equal(_logits(model, ids, mask), own)


def test_encoder_layers_keep_their_own_mask_and_take_non_causal_schedules():
    """BERT (is_causal False, bidirectional masks), right padding."""
    torch.manual_seed(0)
    model = tf.BertModel(tf.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=48, attn_implementation="eager")).eval()
    ids, mask = (t.flip(1) for t in left_padded([9, 5, 2]))
    valid = mask.bool()

    def hidden(attention_mask):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=attention_mask).last_hidden_state

    ref = hidden(mask)
    pattern = P.sliding_window(4, causal=False)
    ref_window = hidden(_dense_mask(mask, pattern))
    H.enable(model)
    assert_close(hidden(mask)[valid], ref[valid], what="hidden states")
    H.enable(model, pattern)
    assert_close(hidden(mask)[valid], ref_window[valid], what="hidden states, windowed")



@pytest.mark.parametrize("schedule", ["lsh:bucket_size=4,n_hashes=2,seed=0", "routing:num_clusters=2"])
def test_encoder_with_lsh_or_routing_takes_key_padding(schedule):
    """BERT, right padding: a padded row under a hashing / routing schedule equals the row alone
    (each row is hashed or routed as if alone; pads join no bucket or cluster)."""
    torch.manual_seed(0)
    model = tf.BertModel(tf.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=48, attn_implementation="eager")).eval()
    lengths = [12, 5, 9]
    ids, mask = (t.flip(1) for t in left_padded(lengths))

    def hidden(input_ids, attention_mask):
        with torch.no_grad():
            return model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    own = hidden(ids, mask)
    H.enable(model, schedule)
    out = hidden(ids, mask)
    valid = mask.bool()
    assert torch.isfinite(out[valid]).all() and float((out[valid] - own[valid]).abs().max()) > 1e-3
    for b, length in enumerate(lengths):
        assert_close(out[b, :length], hidden(ids[b:b + 1, :length], None)[0], what=f"row {b} alone")

def test_schedule_forms_and_per_layer_lists():
    model = build("llama")
    ids, mask = left_padded(LENGTHS, seed=4)
    H.enable(model, P.streaming(4, 8))
    by_pattern = _logits(model, ids, mask)
    H.enable(model, "streaming:sinks=4,window=8")  # re-enable: a spec string, the same pattern
    assert [repr(p) for p in H.schedule_of(model)] == [repr(P.streaming(4, 8))] * 2
    assert torch.equal(_logits(model, ids, mask), by_pattern)
    H.enable(model, [Mechanism("streaming", sinks=4, window=8), None])  # layer 1 keeps its own causal mask
    mixed = _logits(model, ids, mask)
    H.enable(model, [P.streaming(4, 8), P.causal()])
    assert torch.equal(_logits(model, ids, mask), mixed)
    assert not torch.equal(mixed, by_pattern)
    assert H.schedule_of(model)[1].band_bounds()[:2] == P.causal().band_bounds()[:2]
    H.disable(model)
    assert model.config._attn_implementation == "eager"  # the implementation before the first enable
    assert H.schedule_of(model) == [None, None]


@pytest.mark.parametrize("schedule, lengths", [
    (P.streaming(4, 8), [17, 3, 11]),
    ("longformer:window=6,global_tokens=2,causal=true", [17, 3, 11]),
    ("linear:causal=true", [7, 7]),
    ("performer:causal=true,num_features=16,generator=3", [7, 7]),
    ("topk:causal=true,top_k=4", [7, 7]),
])
def test_cached_generate_equals_a_recompute_under_the_schedule(schedule, lengths):
    """DynamicCache decoding (queries after the keys, per-row offsets) against use_cache=False
    (the whole sequence again at every step); non-pattern mechanisms on unpadded rows."""
    model = H.enable(build("llama"), schedule)
    ids, mask = left_padded(lengths, seed=6)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, output_logits=True)
    cached, recomputed = model.generate(use_cache=True, **kw), model.generate(use_cache=False, **kw)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for step, (a, e) in enumerate(zip(cached.logits, recomputed.logits)):
        assert_close(a, e, what=f"logits of generated token {step}")


@pytest.mark.parametrize("schedule", ["linear:causal=true", "performer:causal=true,generator=0",
                                      "topk:top_k=3,causal=true"])
def test_non_pattern_schedules_take_key_padding_and_refuse_packing(schedule):
    model = build("llama")
    ids, mask = left_padded([12, 5, 9])
    # rotary positions counted from each row's first real token (as generate does): these
    # mechanisms are not invariant to a shift of every position, as softmax attention under RoPE is
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    own = _logits(model, ids, mask, position_ids=positions)
    H.enable(model, schedule)
    out = _logits(model, ids, mask, position_ids=positions)
    valid = mask.bool()
    assert torch.isfinite(out).all() and float((out[valid] - own[valid]).abs().max()) > 1e-3
    for b in range(3):  # a padded row equals the row alone
        real = valid[b]
        assert_close(out[b, real], _logits(model, ids[b:b + 1, real], None)[0], what=f"row {b} alone")
    packed = torch.cat([torch.arange(4), torch.arange(6)])[None]
    with pytest.raises(ValueError, match="takes no per-row padding, packing"):
        _logits(model, ids[:1, :10], None, position_ids=packed, use_cache=False)


@pytest.mark.parametrize("schedule, error, match", [
    ([P.causal()] * 3, ValueError, "3 entries but LlamaForCausalLM has 2 attention layers"),
    (P.sliding_window(4, causal=False), ValueError, r"not causal \(Pattern.is_causal\(\) is False\)"),
    ("longformer:window=4,global_tokens=1", ValueError, "not causal"),
    ("nonsense:x=1", ValueError, "unknown mechanism 'nonsense'"),
    ("streaming:sinks=4,windo=3", ValueError, "no parameter 'windo'"),
    ("linear", ValueError, "not causal .pass causal=true."),
    ("lsh:causal=true,seed=0", ValueError, "later positions"),
    ("performer:causal=true", ValueError, "without a seed"),
    (P.causal().layout(16, block_q=8), TypeError, "BlockLayout"),
    (42, TypeError, "schedule must be"),
])
def test_bad_schedules_are_refused_and_leave_the_model_alone(schedule, error, match):
    model = build("llama")
    with pytest.raises(error, match=match):
        H.enable(model, schedule)
    assert model.config._attn_implementation == "eager"
    assert H.schedule_of(model) == [None, None]
    with pytest.raises(ValueError, match="was not switched"):
        H.disable(model)


def test_refused_features():
    ids, mask = left_padded([10, 4])
    # Gemma2 caps its scores with tanh: refused when switching, and by the attention function
    cfg = tf.Gemma2Config(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, head_dim=8,
                          num_attention_heads=4, num_key_value_heads=2, attn_logit_softcapping=50.0)
    with pytest.raises(ValueError, match="attn_logit_softcapping=50.0"):
        H.enable(tf.Gemma2ForCausalLM(cfg))
    q = k = v = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="softcap=50.0"):
        H.attention_forward(torch.nn.Module(), q, k, v, None, softcap=50.0)
    # attention dropout in training
    model = H.enable(build("llama", attention_dropout=0.1))
    model.train()
    with pytest.raises(ValueError, match="dropout=0.1"):
        model(input_ids=ids, attention_mask=mask)
    model.eval()
    _logits(model, ids, mask)  # evaluation has no dropout: runs
    # a dense 4-D mask handed to the model is not dropped silently
    with pytest.raises(TypeError, match="dense mask"):
        _logits(model, ids, torch.zeros(2, 1, 10, 10))
    # a schedule that needs keys a sliding-window cache layer evicted (Mistral's cache keeps WINDOW - 1)
    model = H.enable(build("mistral"), P.streaming(2, 3))
    with pytest.raises(ValueError, match="evicted"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=WINDOW, do_sample=False, pad_token_id=0)
    # a schedule inside the cache's window is fine
    H.enable(model, P.sliding_window(3))
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=WINDOW, do_sample=False, pad_token_id=0)


def test_flash_style_packed_kwargs_must_match_the_documents():
    model = H.enable(build("llama"))
    lengths = [5, 7]
    ids = torch.randint(1, 61, (1, 12))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    packed = dict(position_ids=position_ids, use_cache=False, max_length_q=7, max_length_k=7)
    out = _logits(model, ids, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, **packed)
    assert_close(out, _logits(model, ids, None, position_ids=position_ids, use_cache=False))
    wrong = torch.tensor([0, 6, 12], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens_k"):
        _logits(model, ids, None, cu_seq_lens_q=wrong, cu_seq_lens_k=wrong, **packed)


def test_composite_models_switch_through_their_language_model():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        H.enable(torch.nn.Linear(2, 2))
    text = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, head_dim=8,
                num_attention_heads=4, num_key_value_heads=2, sliding_window=WINDOW)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    model = tf.Gemma3ForConditionalGeneration(tf.Gemma3Config(text_config=text, vision_config=vision,
                                                              mm_tokens_per_image=4)).eval()
    with pytest.raises(ValueError, match="composite model"):
        H.enable(model)
    ids, mask = left_padded([9, 5])
    ref = _logits(model, ids, mask)
    H.enable(model.model.language_model)  # text only; the vision tower keeps its own attention
    assert model.config.vision_config._attn_implementation != "sparse_attn"
    valid = mask.bool()
    assert_close(_logits(model, ids, mask)[valid], ref[valid])


# ------------------------------------------------------------------------- row_mask
def _row_mask(mask2d, q_length, kv_length, q_offset, kv_offset, fn=mu.causal_mask_function, **kw):
    return H.row_mask(batch_size=mask2d.shape[0] if mask2d is not None else 1, q_length=q_length,
                      kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset, mask_function=fn,
                      attention_mask=mask2d, **kw)


def test_row_mask_positions_under_an_evicting_cache():
    """A sliding-window cache layer kept keys 10..15 of 16 tokens (kv_offset 10), decoding one:
    each row's first kept real key sits at its distance from the row's first real token."""
    pads = [0, 3, 12]
    mask2d = torch.ones(3, 16, dtype=torch.bool)
    for b, p in enumerate(pads):
        mask2d[b, :p] = False
    rm = _row_mask(mask2d, 1, 6, 15, 10, fn=mu.sliding_window_causal_mask_function(7), local_size=7)
    assert rm.pattern.band_bounds()[:2] == (0, 6) and rm.causal
    assert rm.kv_start == 10 and rm.kv_used == 6
    assert rm.kv_offset.tolist() == [10, 7, 0]  # row 2's first kept key (index 12) is its first real token
    assert rm.key_padding_mask.tolist() == [[True] * 6, [True] * 6, [False, False] + [True] * 4]
    assert rm.query_position.tolist() == [15, 12, 3]
    assert "kv_start=10" in repr(rm)


def test_row_mask_drops_an_unwritten_static_cache_tail():
    rm = _row_mask(torch.ones(2, 5, dtype=torch.bool), 2, 32, 3, 0)  # 5 tokens seen, 32 slots
    assert rm.kv_used == 5 and rm.key_padding_mask is None and rm.is_plain
    with pytest.raises(ValueError, match="do not lie within the keys"):
        _row_mask(None, 4, 3, 0, 0)


def test_row_mask_names_the_band_and_the_documents():
    full = _row_mask(None, 6, 6, 0, 0, fn=mu.bidirectional_mask_function)
    assert not full.causal and full.pattern.band_bounds()[:2] == P.full().band_bounds()[:2]
    # Gemma3's bidirectional sliding layers: |q - kv| < W
    gemma = mu.or_masks(mu.and_masks(mu.sliding_window_overlay(4), mu.causal_mask_function),
                        lambda b, h, q, kv: (q - kv).abs() < 4)
    rm = _row_mask(None, 12, 12, 0, 0, fn=gemma, local_size=4)
    assert rm.pattern.band_bounds()[:2] == (-3, 3)
    # packed: documents where position_ids restart
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
    packed = mu.and_masks(mu.causal_mask_function, mu.packed_sequence_mask_function(docs))
    rm = _row_mask(None, 8, 8, 0, 0, fn=packed)
    assert torch.equal(rm.document_ids, docs) and rm.pattern.band_bounds()[:2] == (0, P.causal().band_bounds()[1])


@pytest.mark.parametrize("fn, local", [
    (mu.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long)), 4),  # Llama4's chunks
    (mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(torch.tensor([[-1, 0, 0, 0, -1, -1, 1, 1, -1, -1]]))),
     None),  # image tokens that see each other both ways
])
def test_row_mask_refuses_masks_it_cannot_describe(fn, local):
    mask2d = torch.ones(1, 10, dtype=torch.bool)
    with pytest.raises(ValueError, match="not one sparse_attn can run without a dense mask"):
        _row_mask(mask2d, 10, 10, 0, 0, fn=fn, local_size=local)


def test_the_readme_recipe_runs():
    """The README's "Use it in a transformers model" snippet runs as written (tests/test_readme.py
    runs it too); here also what it promises: the switch, the schedule, a (2, 48) generation."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## Use it in a transformers model", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(code, scope)
    model, out, ids = scope["model"], scope["out"], scope["ids"]
    assert model.config._attn_implementation == "sparse_attn"
    expected = P.streaming(4, 28).to_dense(64)
    assert all(torch.equal(m.to_dense(64), expected) for m in H.schedule_of(model))  # the spec, as a Pattern
    assert out.shape == (2, 48) and torch.equal(out[:, :40], ids)


def test_the_package_imports_without_transformers(monkeypatch):
    code = "import sys; sys.modules['transformers'] = None; import sparse_attn, sparse_attn.hf; print('ok')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtra, match=r"sparse_attn\[hf\]"):
        H.register()
