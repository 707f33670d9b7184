"""Measurement and evaluation.

* `measure`: timing, peak memory and error against the reference (CLI `compare`, benchmarks);
* `tasks/`: seeded generators, no downloads: LRA ListOps, Zoology's MQAR, Landmark's passkey;
* `needle`: attention-level needle in a haystack for every mechanism (exact mass on the needle);
* `reach`: receptive field of a per-layer schedule (exact, long sequences without N^2 memory);
* `recall`: passkey retrieval and MQAR with small trained models;
* `listops_train`: ListOps encoders per mechanism;
* `report`: the README tables and the one-page `sparse-attn report`.
"""
