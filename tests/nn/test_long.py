"""chunked_forward: with overlap >= the receptive field, stitched chunks equal the full forward."""

import pytest
import torch

from sparse_attn.nn import ModelConfig, SparseCausalLM, SparseTransformer, chunked_forward
from sparse_attn.nn.long import chunk_starts


def encoder(mechanisms):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=30, dim=32, num_layers=len(mechanisms), num_heads=4, mechanisms=mechanisms)
    return SparseTransformer(cfg).double().eval()


@pytest.mark.parametrize("n, chunk_len, overlap", [(200, 40, 6), (201, 33, 8), (64, 64, 6), (50, 80, 6)])
def test_stitched_equals_full_forward_when_overlap_covers_the_receptive_field(n, chunk_len, overlap):
    # two layers of a bidirectional window reaching 3 each side: receptive field 6
    enc = encoder(["sliding_window:window=6,causal=false"] * 2)
    tokens = torch.randint(0, 30, (2, n))
    torch.testing.assert_close(chunked_forward(enc, tokens, chunk_len, overlap), enc(tokens), rtol=1e-10,
                               atol=1e-10)


def test_too_little_overlap_differs_and_causal_models_work_too():
    enc = encoder(["sliding_window:window=6,causal=false"] * 2)
    tokens = torch.randint(0, 30, (1, 120))
    assert not torch.allclose(chunked_forward(enc, tokens, 30, 2), enc(tokens))
    torch.manual_seed(0)
    lm = SparseCausalLM(ModelConfig(vocab_size=30, dim=32, num_layers=2, num_heads=4,
                                    mechanisms="sliding_window:window=5")).double().eval()
    torch.testing.assert_close(chunked_forward(lm, tokens, 40, 8), lm(tokens), rtol=1e-10, atol=1e-10)


def test_chunk_starts_cover_the_sequence():
    for n, c, o in [(100, 30, 5), (31, 30, 5), (1000, 64, 16)]:
        s = chunk_starts(n, c, o)
        assert s[0] == 0 and s[-1] == n - c and all(b - a <= c - 2 * o for a, b in zip(s, s[1:]))


def test_errors():
    enc = encoder(["causal"])
    with pytest.raises(ValueError, match="less than half of chunk_len"):
        chunked_forward(enc, torch.zeros(1, 10, dtype=torch.long), 10, 5)
    with pytest.raises(ValueError, match="chunk_len must be >= 1"):
        chunked_forward(enc, torch.zeros(1, 10, dtype=torch.long), 0, 0)
