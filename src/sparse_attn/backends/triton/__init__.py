"""`triton` backend: our own block-sparse flash-attention kernel (forward only for now).

Importing this package needs triton; `registry._ensure_loaded` imports it inside a try so a
missing triton never breaks `import sparse_attn`.
"""

from .backend import TritonBackend, triton_forward

__all__ = ["TritonBackend", "triton_forward"]
