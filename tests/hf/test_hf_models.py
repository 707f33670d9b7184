"""sparse_attn.hf without a schedule computes what each model computes itself (transformers'
"eager" attention with its dense mask): left-padded batches, gradients, greedy generation past
the sliding window, packed sequences; and no dense mask is built on our path."""

import pytest

pytest.importorskip("transformers.masking_utils")

import torch  # noqa: E402
import transformers.masking_utils as mu  # noqa: E402
from tiny_hf import BUILDERS, WINDOW, assert_close, build, labels_at_real_positions, left_padded  # noqa: E402

import sparse_attn.hf as H  # noqa: E402

MODELS = list(BUILDERS)
LENGTHS = [23, 5, 14]  # very different real lengths, all but the shortest past the window


def _logits(model, ids, mask, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


@pytest.mark.parametrize("name", MODELS)
def test_left_padded_logits_equal_the_models_own(name):
    model = build(name)
    ids, mask = left_padded(LENGTHS)
    ref = _logits(model, ids, mask)
    H.enable(model)
    assert model.config._attn_implementation == "sparse_attn"
    out = _logits(model, ids, mask)
    valid = mask.bool()
    assert_close(out[valid], ref[valid])
    H.disable(model)
    assert model.config._attn_implementation == "eager"
    assert torch.equal(_logits(model, ids, mask), ref)  # disable restores the model bit for bit


@pytest.mark.parametrize("name", MODELS)
def test_left_padded_gradients_equal_the_models_own(name):
    ids, mask = left_padded(LENGTHS, seed=1)
    labels = labels_at_real_positions(ids, mask)  # pad query rows differ (ours are 0): out of the loss
    grads = []
    for switch in (False, True):
        model = build(name)
        if switch:
            H.enable(model)
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert_close(grads[1][n], grads[0][n], tol=1e-5, what=f"grad {n}")


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generate_past_the_window_equals_the_models_own(name):
    model = build(name)
    ids, mask = left_padded([9, 3, 6], seed=2)
    kw = dict(max_new_tokens=2 * WINDOW, do_sample=False, return_dict_in_generate=True, output_logits=True,
              pad_token_id=0)
    ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
    H.enable(model)
    out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    for step, (a, e) in enumerate(zip(out.logits, ref.logits)):
        assert_close(a, e, what=f"logits of generated token {step}")


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("how", [dict(cache_implementation="static"), dict(prefill_chunk_size=4)],
                         ids=["static_cache", "chunked_prefill"])
def test_generate_with_a_static_cache_or_chunked_prefill_equals_the_models_own(name, how):
    model = build(name)
    ids, mask = left_padded([17, 3, 11], seed=5)
    kw = dict(max_new_tokens=WINDOW + 2, do_sample=False, pad_token_id=0, **how)
    ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
    H.enable(model)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **kw), ref)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_packed_sequences_equal_the_models_own_and_documents_alone(name):
    """position_ids that restart, no attention_mask, no cache (training): transformers' packed-sequence mask."""
    model = build(name)
    lengths = [9, 4, 11]
    ids = torch.randint(1, 61, (1, sum(lengths)))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    ref = _logits(model, ids, None, position_ids=position_ids, use_cache=False)
    H.enable(model)
    out = _logits(model, ids, None, position_ids=position_ids, use_cache=False)
    assert_close(out, ref)
    start = 0
    for n in lengths:
        alone = _logits(model, ids[:, start:start + n], None)
        assert_close(out[:, start:start + n], alone, what=f"document at {start}")
        start += n


class _DenseProbe(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on any aten result whose last two dims are (n, n): a dense mask or score matrix."""

    def __init__(self, n):
        super().__init__()
        self.n, self.seen = n, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and tuple(t.shape[-2:]) == (self.n, self.n):
                self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("name", ["qwen2", "gpt_oss"])
def test_no_dense_mask_is_built(name, monkeypatch):
    """The guard: transformers' dense mask builders raise, SDPA with a mask raises, and no
    (n, n) tensor appears in the forward or backward of a padded batch, nor in generation."""
    model = build(name)
    H.enable(model)

    def refuse(*args, **kwargs):
        raise AssertionError("a dense mask builder ran")

    for key in ("sdpa", "eager", "flex_attention", "flash_attention_2"):
        monkeypatch.setitem(mu.AttentionMaskInterface._global_mapping, key, refuse)
    for fn in ("sdpa_mask", "eager_mask", "flex_attention_mask", "flash_attention_mask", "padding_mask_function"):
        monkeypatch.setattr(mu, fn, refuse)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def sdpa_without_mask(*args, attn_mask=None, **kwargs):
        assert attn_mask is None, "SDPA was called with a mask"
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa_without_mask)
    n = 150  # not a block size of any backend: a (150, 150) tensor can only be a dense mask / score matrix
    ids, mask = left_padded([n, 40, 97], seed=3)
    with _DenseProbe(n) as probe:
        model(input_ids=ids, attention_mask=mask, labels=labels_at_real_positions(ids, mask)).loss.backward()
        model.generate(input_ids=ids[:, -30:], attention_mask=mask[:, -30:], max_new_tokens=3, do_sample=False,
                       pad_token_id=0)
    assert probe.seen == []
    H.disable(model)
    with pytest.raises(AssertionError, match="dense mask builder"):  # the guard itself works
        _logits(model, ids, mask)
