"""Measurement and evaluation.

* `registry`: the `Evaluation` protocol and registry (`sparse-attn eval`, the report, benchmarks);
  `evaluations`: the built-in entries; `arguments`: flag types and checks shared with the CLI;
* `measure`: timing, peak memory and error against the reference (CLI `compare`, benchmarks);
* `tasks/`: seeded generators, no downloads: LRA ListOps, Zoology's MQAR, Landmark's passkey;
* `needle`: attention-level needle in a haystack for every mechanism (exact mass on the needle);
* `reach`: receptive field of a per-layer schedule (exact, long sequences without N^2 memory);
* `recall`: passkey retrieval and MQAR with small trained models;
* `listops_train`: ListOps encoders per mechanism;
* `hf_long_context`: a real transformers model (SmolLM2-135M, GGUF, offline) on sparse_attn
  schedules: perplexity on Python's reference docs, peak memory, generation tokens/s.
"""
