"""Fixtures shared by every test; helpers live in sa_testing.py (same folder)."""

import os
import sys
import zlib

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # `from sa_testing import ...` works whatever pytest's import mode
    sys.path.insert(0, _HERE)


@pytest.fixture(autouse=True)
def _seed(request):
    """A fixed, per-test seed: reproducible, but not the same random numbers in every test."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) % (2**31))


# Two cores shared with other processes: torch's default of one OpenMP thread per core makes
# small ops spin against each other (100x slowdowns measured), so the tests run single-threaded
# unless SPARSE_ATTN_TEST_THREADS says otherwise.
torch.set_num_threads(int(os.environ.get("SPARSE_ATTN_TEST_THREADS", "1")))
