"""The `sparse-attn` command line (thin: parse, call the library, print/plot).

`sparse-attn compare`, `sparse-attn show`, `sparse-attn backends`; also `python -m sparse_attn.cli`.
"""

from .main import main

__all__ = ["main"]
