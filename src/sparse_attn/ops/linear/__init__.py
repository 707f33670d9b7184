"""Linear attention (Katharopoulos et al., 2020): softmax(q k^T) replaced by phi(q) phi(k)^T.

* `linear_attention`: non-causal O(N) form and chunked causal form (chunk.py), with states so
  a sequence can be fed in pieces;
* `linear_attention_step`: the recurrent decoding form (recurrent.py);
* `linear_attention_naive`: the quadratic reference the tests compare with (naive.py);
* `linear_attention_features`: the same computation on precomputed features (Performer uses it).
"""

from .chunk import FEATURE_MAPS, LinearState, linear_attention, linear_attention_features
from .naive import linear_attention_naive
from .recurrent import linear_attention_step

__all__ = [
    "FEATURE_MAPS",
    "LinearState",
    "linear_attention",
    "linear_attention_features",
    "linear_attention_naive",
    "linear_attention_step",
]
