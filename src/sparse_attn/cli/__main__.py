"""`python -m sparse_attn.cli ...` runs the `sparse-attn` command."""

import sys

from .main import main

sys.exit(main())
