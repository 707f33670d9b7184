"""`sparse-attn show`: draw a pattern's mask (ASCII, the block map, or an image)."""

from __future__ import annotations

import argparse

from . import specs
from .args import Formatter, check_output, non_negative_int, parse_spec, positive_int, spec_help


def add_show_parser(subparsers, formatter=Formatter) -> argparse.ArgumentParser:
    """Register `sparse-attn show` on `subparsers`; returns its parser."""
    p = subparsers.add_parser("show", help="draw a pattern's mask (ASCII, or PNG with --png)",
                       description="Draw a pattern: the element mask in ASCII ('#' allowed, '.' not), the block map\n"
                                   "with --block (str(pattern.layout(...))), or an image with --png.",
                       epilog=spec_help(), formatter_class=formatter)
    p.add_argument("pattern", metavar="PATTERN", help="NAME or NAME:KEY=VALUE,...")
    p.add_argument("--length", type=positive_int, default=64, metavar="N",
                   help="query positions (default: %(default)s)")
    p.add_argument("--kv-length", type=positive_int, default=None, metavar="N",
                   help="key positions (default: --length); queries are the last --length of them")
    p.add_argument("--block", type=positive_int, default=None, metavar="B",
                   help="print the block map with B x B blocks instead of the element mask")
    p.add_argument("--png", metavar="FILE", help="write an image of the element mask (needs matplotlib)")
    p.add_argument("--head", type=non_negative_int, default=0,
                   help="head to draw, for per-head patterns (default: %(default)s)")
    p.set_defaults(handler=cmd_show, parser=p)
    return p


# O(N^2) pictures: keep them to sizes a terminal / an image can show.
_MAX_ASCII = 512
_MAX_PNG = 8192


def cmd_show(args) -> int:
    parser = args.parser
    n = args.length
    kv = args.kv_length if args.kv_length is not None else n
    if kv < n:
        parser.error(f"--kv-length ({kv}) must be >= --length ({n}): queries are the last --length key positions")
    spec = parse_spec(parser, args.pattern, kv)
    if spec.pattern is None:
        parser.error(f"{spec.name} is a mechanism with no fixed pattern (its keys depend on q and k): show draws "
                     f"patterns: {', '.join(specs.REGISTRY)}")
    pattern = spec.pattern
    heads = pattern.num_heads
    if heads is None and args.head:
        parser.error(f"--head {args.head}: {spec.canonical()} is the same for every head; only head 0 exists")
    if heads is not None and args.head >= heads:
        parser.error(f"--head {args.head}: {spec.canonical()} has {heads} heads (0..{heads - 1})")
    if args.png and max(n, kv) > _MAX_PNG:
        parser.error(f"--png draws the N x N element mask: at most {_MAX_PNG} positions, got {max(n, kv)}")
    if not args.png and not args.block and max(n, kv) > _MAX_ASCII:
        parser.error(f"the element-level ASCII mask is limited to {_MAX_ASCII} positions (got {max(n, kv)}): "
                     "use --block B for the block map, or --png FILE")
    check_output(parser, "--png", args.png)

    layout = pattern.layout(n, kv, block_q=args.block or 64)
    density = float(layout.allowed_pairs()[min(args.head, layout.num_heads - 1)]) / (n * kv)
    head_note = f" head={args.head}" if heads is not None else ""
    print(f"{spec.canonical()} = {pattern!r}")
    print(f"q_len={n} kv_len={kv} q_offset={kv - n}{head_note} density={density:.4f}")
    if args.block:
        print(str(layout))
    elif not args.png:
        print(pattern.show(n, kv, head=args.head))
    if args.png:
        from .plots import plot_mask

        mask = pattern.to_dense(n, kv, num_heads=heads)[args.head]
        plot_mask(mask, repr(pattern), args.png, q_offset=kv - n)
        print(f"wrote {args.png}")
    return 0
