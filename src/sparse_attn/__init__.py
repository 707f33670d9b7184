"""sparse_attn: every sparse-attention mechanism in one call."""

from . import patterns

__version__ = "0.1.0"
