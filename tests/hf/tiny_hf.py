"""Tiny random-init transformers models for the hf tests (no downloads), and batch helpers.

Every builder returns a float32 model in eval mode on transformers' "eager" attention (the
reference: it applies the dense mask the model builds, sinks and scaling included)."""

from __future__ import annotations

import torch
import transformers as tf

WINDOW = 6  # sliding window of the windowed models: far shorter than the test sequences
VOCAB = 61
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, attention_dropout=0.0)


def _llama():
    return tf.LlamaForCausalLM, tf.LlamaConfig(num_hidden_layers=2, **_COMMON)


def _mistral():
    return tf.MistralForCausalLM, tf.MistralConfig(num_hidden_layers=2, sliding_window=WINDOW, **_COMMON)


def _qwen2():  # layer 0 full, layers 1, 2 sliding (use_sliding_window, after max_window_layers)
    return tf.Qwen2ForCausalLM, tf.Qwen2Config(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW,
                                               max_window_layers=1, **_COMMON)


def _gemma3():  # sliding, full, sliding; its own query scale (query_pre_attn_scalar), no score softcap
    cfg = tf.Gemma3TextConfig(num_hidden_layers=3, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=20,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"], **_COMMON)
    return tf.Gemma3ForCausalLM, cfg


def _gpt_oss():  # sink logits s_aux; sliding then full layers; a small mixture of experts
    cfg = tf.GptOssConfig(num_hidden_layers=2, head_dim=8, sliding_window=WINDOW, num_local_experts=4,
                          num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
                          **{**_COMMON, "intermediate_size": 16, "max_position_embeddings": 32 * 4096})  # = its YaRN
    return tf.GptOssForCausalLM, cfg


BUILDERS = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "gemma3": _gemma3, "gpt_oss": _gpt_oss}


def build(name: str, seed: int = 0, **overrides):
    cls, config = BUILDERS[name]()
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    if name == "gpt_oss":  # random sinks of either sign, so that they matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 2.0)
    return model


def left_padded(lengths, seed: int = 0, vocab: int = VOCAB):
    """(input_ids, attention_mask) of rows of these real lengths, padded on the left."""
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), n), generator=g)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, length in enumerate(lengths):
        mask[b, n - length:] = 1
        ids[b, :n - length] = 0
    return ids, mask


def labels_at_real_positions(ids, mask):
    """Labels whose loss reads only logits of real positions: transformers shifts them, so the
    label at i is predicted by the logits at i - 1, which must be a real token too."""
    real = mask.bool()
    predicted_from_real = torch.zeros_like(real)
    predicted_from_real[:, 1:] = real[:, 1:] & real[:, :-1]
    return torch.where(predicted_from_real, ids, -100)


def assert_close(actual, expected, tol=1e-5, what="logits"):
    """max |actual - expected| <= tol * max(1, max |expected|)."""
    err = float((actual.double() - expected.double()).abs().max())
    scale = max(1.0, float(expected.double().abs().max()))
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} > {tol:g} * {scale:.3g}"
    return err
