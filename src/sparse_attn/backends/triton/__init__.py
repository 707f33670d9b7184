"""`triton` backend: our own block-sparse flash-attention kernels (forward and backward).

Importing this package needs triton; `registry._ensure_loaded` imports it inside a try so a
missing triton never breaks `import sparse_attn`.
"""

from .backend import TritonBackend
from .ops import triton_attention

__all__ = ["TritonBackend", "triton_attention"]
