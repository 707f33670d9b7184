"""Dynamic sparsity by top-k.

* `topk_attention`: exact per-query top-k over keys, chunked over queries (chunk.py).
* `select_kv_blocks` / `block_topk_attention`: MoBA-style block top-k by mean-pooled scores,
  run on the block-sparse backends (block.py).
* select_kernel.py: block top-k's masks, top-k, selection and ascending picks in one Triton
  kernel (the default on CUDA; bit-equal to the torch ops in block.py it replaces).
* naive.py: O(N^2) dense references for the tests.
"""

from .block import block_topk_attention, select_kv_blocks
from .chunk import topk_attention

__all__ = ["topk_attention", "select_kv_blocks", "block_topk_attention"]
