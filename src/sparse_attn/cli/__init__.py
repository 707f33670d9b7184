"""The `sparse-attn` command line (thin: parse, call the library, print/plot).

`sparse-attn compare | show | backends | train | eval | report`; also `python -m sparse_attn.cli`.
"""

from .main import main

__all__ = ["main"]
