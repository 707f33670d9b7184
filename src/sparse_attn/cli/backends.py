"""`sparse-attn backends`: every backend, what it supports, and what `auto` picks here."""

from __future__ import annotations

import argparse

import torch

from .args import Formatter


def add_backends_parser(subparsers, formatter=Formatter) -> argparse.ArgumentParser:
    """Register `sparse-attn backends` on `subparsers`; returns its parser."""
    p = subparsers.add_parser("backends", help="list backends, what they support, and what auto picks",
                       description="List every backend: capabilities, whether it can run here, and which one\n"
                                   "backend='auto' picks for a typical call (sparse_attn.explain()).",
                       formatter_class=formatter)
    p.set_defaults(handler=cmd_backends, parser=p)
    return p


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def cmd_backends(args) -> int:
    from .. import explain
    from .. import patterns as P
    from ..backends import list_backends

    backends = list_backends()
    width = max(len(b.name) for b in backends)
    for b in backends:
        c = b.caps
        reason = b.unavailable_reason()
        dtypes = ",".join(sorted(str(d).replace("torch.", "") for d in c.dtypes))
        print(f"{b.name:<{width}}  {'usable here' if reason is None else 'NOT usable here: ' + reason}")
        pad = " " * (width + 2)
        print(f"{pad}devices={','.join(sorted(c.devices))}  dtypes={dtypes}  "
              f"head_dim={c.min_head_dim}..{c.max_head_dim}")
        print(f"{pad}grads={_yes(c.grads)}  gqa={_yes(c.gqa)}  q_len!=kv_len={_yes(c.different_lengths)}  "
              f"per_head={_yes(c.per_head_patterns)}  lse={_yes(c.returns_lse)}  "
              f"deterministic={_yes(c.deterministic)}  auto={'no (dense)' if c.dense else 'yes'}")
        if c.notes:
            print(f"{pad}{c.notes}")
    calls = [("cpu", torch.float32)]
    if torch.cuda.is_available():
        calls.append(("cuda", torch.float16))
    shape = (1, 8, 4096, 64)
    pattern = P.sliding_window(256)
    for device, dtype in calls:
        q = torch.empty(shape, device=device, dtype=dtype)
        print()
        print(f"backend='auto' for a typical call ({device} {str(dtype).replace('torch.', '')}, "
              f"q/k/v {shape}, {pattern!r}):")
        print("  " + str(explain(q, q, q, pattern)).replace("\n", "\n  "))
    return 0
