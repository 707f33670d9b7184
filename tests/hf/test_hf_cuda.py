"""sparse_attn.hf on a CUDA device (pytest -m gpu): the tiny models of tiny_hf moved to the GPU,
left-padded logits equal the model's own (eager, fp32, TF32 off), and a cached generate under a
schedule equals a no-cache recompute, on the GPU backends the dispatcher picks there."""

import warnings

import pytest

pytest.importorskip("transformers.masking_utils")

import torch  # noqa: E402
from tiny_hf import BUILDERS, assert_close, build, left_padded  # noqa: E402

import sparse_attn.hf as H  # noqa: E402
from sparse_attn import patterns as P  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("name", list(BUILDERS))
def test_left_padded_logits_on_cuda_equal_the_models_own(name):
    model = build(name).cuda()
    ids, mask = left_padded([150, 37, 96], seed=3)
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        H.enable(model)
        out = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert_close(out[valid], ref[valid], tol=1e-4)


@pytest.mark.parametrize("name", ["llama", "gpt_oss"])
def test_cached_generate_on_cuda_equals_a_recompute(name):
    model = build(name).cuda()
    H.enable(model, P.streaming(4, 16))
    ids, mask = left_padded([40, 9, 25], seed=4)
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(max_new_tokens=40, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
        cache = H.cache_for(model)
        out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    for a, e in zip(out.logits, ref.logits):
        assert_close(a, e, tol=1e-4)
    assert all(kept == 4 + 16 - 1 for kept in cache.kept_keys())
