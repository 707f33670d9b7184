"""Performer attention (Choromanski et al., 2021): softmax attention approximated by linear
attention with FAVOR+ positive (orthogonal) random features, in O(N) time and memory.

* `performer_attention`: the fast path (favor.py), non-causal and chunked causal, built on
  ops/linear;
* `PerformerFeatures`: the random projection (seeded, `redraw()`), its feature map, and
  `softmax_kernel_estimate` for checking the estimator (features.py);
* `performer_attention_naive`: the dense reference for given features (naive.py).
"""

from .favor import favor_features, performer_attention
from .features import KERNELS, PerformerFeatures, draw_projection, softmax_kernel_estimate
from .naive import performer_attention_naive

__all__ = [
    "KERNELS",
    "PerformerFeatures",
    "draw_projection",
    "favor_features",
    "performer_attention",
    "performer_attention_naive",
    "softmax_kernel_estimate",
]
