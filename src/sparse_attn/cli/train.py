"""`sparse-attn train`: train a small byte-level `SparseCausalLM` with any attention schedule.

Thin on purpose: arguments become a `ModelConfig` and a `TrainConfig`, everything that can be
checked without training is checked first (specs, the causal rule, the corpus, the checkpoint
to resume), then `sparse_attn.train.train_lm` runs, and the results are printed, written as
JSON / a loss plot, and optionally sampled from.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import sys
import time
from dataclasses import asdict

import torch

from .._env import environment
from .._extras import write
from ..nn import ModelConfig, SparseCausalLM
from ..ops.mechanisms import Mechanism, as_mechanism
from ..train import TokenData, TrainConfig, load_corpus, plot_loss_curves, train_lm
from ..eval.arguments import add_checkpoint_flags, checkpoint_options
from ..train.corpus import describe
from .args import (PROG, Formatter, check_device, check_output, non_negative_int, positive_int, require_matplotlib,
                   try_mechanism)

SAMPLE_TEMPERATURE = 0.8
MAX_PROMPT = 128  # bytes of validation text the sample continues
CHECKPOINT_NAME = "train.pt"  # the checkpoint's file in --checkpoint-dir


TRAIN_DESCRIPTION = """\
Train a small causal language model on bytes (sparse_attn.nn.SparseCausalLM, vocab 256) whose
layers use the attention you name, with sparse_attn.train.train_lm: AdamW, linear warm-up then
cosine decay, validation loss on fixed windows of the last 10% of the corpus. The defaults finish
in a few minutes on a laptop CPU. Runs are reproducible (the batch of step s is seeded by
(--seed, s)), and a run resumed from --checkpoint ends exactly where an uninterrupted one would.

Prints the validation loss at each evaluation, as it happens, and a summary line:
  final val loss L nats/byte (L/ln 2 bits/byte) after S steps, T s, P parameters
"""

TRAIN_EPILOG = """\
examples:
  sparse-attn train                                            # dense causal baseline
  sparse-attn train --mechanisms sliding_window:window=64 --json sw.json --plot sw.png
  sparse-attn train --mechanisms longformer:window=64,global_tokens=4,causal=true --sample 300
  sparse-attn train --layers 4 --mechanisms sliding_window:window=32 sliding_window:window=32 \\
                    sliding_window:window=32 causal            # a hybrid schedule, one spec per layer
  sparse-attn train --mechanisms linear:causal=true --checkpoint lin.pt
  sparse-attn train --mechanisms linear:causal=true --checkpoint lin.pt --resume   # after an interruption

Specs are NAME or NAME:KEY=VALUE,... (see `sparse-attn compare --help` and sparse_attn.attention);
a causal LM refuses patterns that see later keys (e.g. sliding_window:causal=false) and
mechanisms without causal=true (e.g. linear, performer, topk).
"""



def add_train_parser(subparsers, formatter=Formatter) -> argparse.ArgumentParser:
    """Register `sparse-attn train` on `subparsers`; returns its parser."""
    p = subparsers.add_parser("train", help="train a small byte-level causal LM with any attention schedule",
                       description=TRAIN_DESCRIPTION, epilog=TRAIN_EPILOG, formatter_class=formatter)
    g = p.add_argument_group("model")
    g.add_argument("--mechanisms", nargs="+", default=["causal"], metavar="SPEC",
                   help="attention of every layer (one spec) or of each layer (one spec per layer), as "
                        "sparse_attn.attention accepts them; must be causal (default: causal)")
    g.add_argument("--layers", type=positive_int, metavar="N", default=4, help="transformer blocks (default: %(default)s)")
    g.add_argument("--dim", type=positive_int, metavar="N", default=128, help="model width (default: %(default)s)")
    g.add_argument("--heads", type=positive_int, metavar="N", default=4, help="query heads (default: %(default)s)")
    g.add_argument("--kv-heads", type=positive_int, metavar="N", default=None, help="key/value heads (GQA); default: --heads")
    g.add_argument("--warmup-steps", type=non_negative_int, default=0, metavar="N",
                   help="dense-to-sparse warm-up: blend from dense causal attention to the schedule over the "
                        "first N steps (ModelConfig.warmup_steps; default: %(default)s)")
    g = p.add_argument_group("training")
    g.add_argument("--seq-len", type=positive_int, default=256, metavar="N",
                   help="training sequence length in bytes (default: %(default)s)")
    g.add_argument("--batch", type=positive_int, metavar="N", default=8, help="sequences per step (default: %(default)s)")
    g.add_argument("--steps", type=positive_int, metavar="N", default=300,
                   help="optimizer steps in total, those of a resumed checkpoint included (default: %(default)s)")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate, AdamW (default: %(default)s)")
    g.add_argument("--min-lr", type=float, default=3e-4, help="end of the cosine decay (default: %(default)s)")
    g.add_argument("--lr-warmup", type=non_negative_int, default=30, metavar="N",
                   help="linear learning-rate warm-up steps (default: %(default)s)")
    g.add_argument("--eval-every", type=positive_int, default=50, metavar="N",
                   help="validation loss (and checkpoint) every N steps and at the end (default: %(default)s)")
    g.add_argument("--eval-batches", type=positive_int, default=8, metavar="N",
                   help="batches of fixed validation windows per evaluation (default: %(default)s)")
    g.add_argument("--corpus", default="synthetic", metavar="SOURCE",
                   help="synthetic (generated records with long-range facts), stdlib (this Python's standard "
                        "library sources) or a file PATH (default: %(default)s)")
    g.add_argument("--corpus-bytes", type=positive_int, default=1_000_000, metavar="N",
                   help="bytes of the corpus to use, the last 10%% for validation (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the weights, the batches and the generated corpus (default: %(default)s)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda (default: %(default)s)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="bfloat16: autocast, weights stay float32 (default: %(default)s)")
    g.add_argument("--threads", type=positive_int, metavar="N", default=None,
                   help=f"torch CPU threads (default: torch's choice, {torch.get_num_threads()} here)")
    g = p.add_argument_group("output")
    g.add_argument("--checkpoint", metavar="FILE",
                   help="save model, optimizer and history here at every evaluation (written atomically)")
    g.add_argument("--resume", action="store_true",
                   help="continue from --checkpoint up to --steps, with the model flags it was trained with: "
                        "with the same flags the result equals an uninterrupted run; a larger --steps extends "
                        "it (the learning-rate schedule is then stretched to the new length)")
    add_checkpoint_flags(g, resume=False)  # --checkpoint-dir DIR: the checkpoint is DIR/train.pt
    g.add_argument("--json", metavar="FILE",
                   help="write history, final val loss, configs and environment as JSON")
    g.add_argument("--plot", metavar="FILE", help="write the loss curves (needs matplotlib)")
    g.add_argument("--sample", type=non_negative_int, default=0, metavar="N",
                   help="after training, generate N bytes continuing the start of the validation text")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress on stderr (a bar on a terminal, else a line every 10 s)")
    p.set_defaults(handler=cmd_train, parser=p)
    return p


def _mechanisms(parser, args):
    """One spec for every layer (a string) or one per layer (a list), each checked on its own so
    that the message names the spec that is wrong."""
    texts = args.mechanisms
    if len(texts) not in (1, args.layers):
        parser.error(f"--mechanisms takes one spec for every layer or exactly one per layer (--layers "
                     f"{args.layers}), got {len(texts)}: {' '.join(texts)}")
    for text in dict.fromkeys(texts):
        try:
            mechanism = as_mechanism(text)
            if isinstance(mechanism, Mechanism):
                mechanism.pattern()  # builds the pattern: missing or bad arguments fail here
        except (ValueError, TypeError) as exc:
            parser.error(f"--mechanisms {text}: {exc}")
    return texts[0] if len(texts) == 1 else list(texts)


def _model_config(parser, args) -> ModelConfig:
    if args.dim % args.heads:
        parser.error(f"--dim ({args.dim}) must be a multiple of --heads ({args.heads})")
    if (args.dim // args.heads) % 2:
        parser.error(f"--dim // --heads must be even (rotary embeddings), got {args.dim} // {args.heads} = "
                     f"{args.dim // args.heads}")
    if args.kv_heads is not None and args.heads % args.kv_heads:
        parser.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    cfg = ModelConfig(vocab_size=256, dim=args.dim, num_layers=args.layers, num_heads=args.heads,
                      num_kv_heads=args.kv_heads, mechanisms=_mechanisms(parser, args),
                      warmup_steps=args.warmup_steps)
    try:  # the model refuses non-causal schedules; on the meta device this allocates nothing
        with torch.device("meta"):
            SparseCausalLM(cfg)
    except (ValueError, TypeError) as exc:
        parser.error(f"--mechanisms: {exc}")
    for text in dict.fromkeys(args.mechanisms):
        try_mechanism(parser, "--mechanisms", text, as_mechanism(text), length=args.seq_len,
                       head_dim=args.dim // args.heads, device=args.device,
                       q_heads=args.heads // (args.kv_heads or args.heads))
    return cfg


def _check_resume(parser, args, model_cfg: ModelConfig, train_cfg: TrainConfig) -> int:
    """The checkpoint's step; refuses a checkpoint of another model before any training."""
    if not args.checkpoint:
        parser.error("--resume needs --checkpoint FILE or --checkpoint-dir DIR (the checkpoint to continue from)")
    if not os.path.isfile(args.checkpoint):
        parser.error(f"--resume: checkpoint {args.checkpoint} does not exist")
    try:
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        saved_model, saved_train, step = ckpt["model_config"], ckpt["train_config"], ckpt["step"]
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, KeyError, TypeError, AttributeError) as exc:
        parser.error(f"--resume: {args.checkpoint} is not a checkpoint written by train: {exc}")
    wanted = model_cfg.to_dict()
    diff = [f"{k}: {saved_model.get(k)!r} in the checkpoint, {wanted[k]!r} here" for k in wanted
            if saved_model.get(k) != wanted[k]]
    if diff:
        parser.error(f"--resume: {args.checkpoint} holds a different model ({'; '.join(diff)}); "
                     "pass the model flags it was trained with")
    changed = [f"{k} {saved_train[k]!r} -> {v!r}" for k, v in asdict(train_cfg).items()
               if k in saved_train and k != "device" and saved_train[k] != v]
    if changed:
        print(f"{PROG}: note: resuming with other training settings than the checkpoint's: {', '.join(changed)}",
              file=sys.stderr)
    return int(step)


def _sample(model: SparseCausalLM, data: TokenData, args) -> dict:
    """Continue the start of the validation text for --sample bytes (caches chosen per layer)."""
    n = min(MAX_PROMPT, max(1, args.seq_len // 2), len(data.val))
    prompt = data.val[:n].long()[None].to(args.device)  # [1, n]
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    model.eval()
    out = model.generate(prompt, args.sample, caches="auto", temperature=SAMPLE_TEMPERATURE, generator=gen)
    text = bytes(out[0, n:].tolist()).decode("utf-8", errors="replace")
    return {"prompt": bytes(data.val[:n].tolist()).decode("utf-8", errors="replace"), "generated": text,
            "prompt_bytes": n, "temperature": SAMPLE_TEMPERATURE, "caches": "auto"}


def _label(mechanisms) -> str:
    return mechanisms if isinstance(mechanisms, str) else " / ".join(mechanisms)


def cmd_train(args) -> int:
    parser = args.parser
    check_device(args.device, parser)
    model_cfg = _model_config(parser, args)
    try:
        train_cfg = TrainConfig(seq_len=args.seq_len, batch_size=args.batch, steps=args.steps, lr=args.lr,
                                min_lr=args.min_lr, lr_warmup=args.lr_warmup, eval_every=args.eval_every,
                                eval_batches=args.eval_batches, seed=args.seed, device=args.device, dtype=args.dtype)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    if args.checkpoint_dir:
        if args.checkpoint:
            parser.error("give --checkpoint FILE or --checkpoint-dir DIR, not both")
        os.makedirs(args.checkpoint_dir, exist_ok=True)
        args.checkpoint = os.path.join(args.checkpoint_dir, CHECKPOINT_NAME)
    loop_options = checkpoint_options(parser, args, args.checkpoint, "--checkpoint FILE or --checkpoint-dir DIR")
    for flag, path in (("--checkpoint", args.checkpoint), ("--json", args.json), ("--plot", args.plot)):
        check_output(parser, flag, path)
    if args.corpus not in ("synthetic", "stdlib") and not os.path.isfile(args.corpus):
        parser.error(f"--corpus must be synthetic, stdlib or a readable file, got {args.corpus!r}")
    start = _check_resume(parser, args, model_cfg, train_cfg) if args.resume else 0
    data = TokenData.from_bytes(load_corpus(args.corpus, args.corpus_bytes, args.seed))
    try:
        data.check_length(args.seq_len)
    except ValueError as exc:
        parser.error(f"--corpus {args.corpus} (--corpus-bytes {args.corpus_bytes}): {exc}")
    if args.plot:
        require_matplotlib()
    if args.threads:
        torch.set_num_threads(args.threads)

    label = _label(model_cfg.mechanisms)
    print(f"model: {args.layers} layers, dim {args.dim}, {args.heads} heads"
          + (f" ({args.kv_heads} kv)" if args.kv_heads else "") + f", mechanisms {label}"
          + (f", dense-to-sparse warm-up {args.warmup_steps} steps" if args.warmup_steps else ""))
    print(f"data: {describe(args.corpus)}, {len(data.train):,} train / {len(data.val):,} val bytes; "
          f"seq {args.seq_len}, batch {args.batch}, {args.steps} steps on {args.device} ({args.dtype})"
          + (f", resuming at step {start}" if args.resume else ""), flush=True)
    if start >= args.steps:
        print(f"the checkpoint is at step {start} >= --steps {args.steps}: nothing to train")

    def report(entry: dict) -> None:  # as each evaluation happens, not after training (output may be a log file)
        write(f"step {entry['step']}/{args.steps}: val loss {entry['val_loss']:.4f} nats/byte, "
              f"train loss {entry['train_loss']:.4f}, {entry['elapsed_s']:.1f} s")

    model, result = train_lm(model_cfg, train_cfg, data, checkpoint=args.checkpoint, resume=args.resume,
                             show_progress=not args.no_progress, label=f"train {label}", on_eval=report,
                             **loop_options)
    if result.stopped_early:
        print(f"stopped at step {result.history[-1]['step'] if result.history else start} of {args.steps}: "
              f"--max-minutes {args.max_minutes} ran out; checkpointed in {args.checkpoint}, go on with --resume")
    done = result.history[-1]["step"] if result.history else 0
    sample = None
    if args.sample:
        sample = _sample(model, data, args)
        print(f"--- prompt ({sample['prompt_bytes']} bytes of validation text) ---")
        print(sample["prompt"])
        print(f"--- sample ({args.sample} generated bytes, temperature {SAMPLE_TEMPERATURE}) ---")
        print(sample["generated"])
        print("---")
    if args.checkpoint and done > start:
        print(f"wrote {args.checkpoint}")
    if args.json:
        record = {"final_val_loss": result.final_val_loss, "steps": done, "seconds": result.seconds,
                  "parameters": result.num_parameters, "resumed_from_step": start if args.resume else None,
                  "model_config": model_cfg.to_dict(), "train_config": asdict(train_cfg),
                  "corpus": {"source": args.corpus, "description": describe(args.corpus), "bytes": args.corpus_bytes,
                             "train_bytes": len(data.train), "val_bytes": len(data.val)},
                  "environment": environment(args.device), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "sample": sample, "stopped_early": result.stopped_early, "history": result.history}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot_loss_curves({label: result.history}, args.plot,
                         title=f"{label}: {args.layers} layers, dim {args.dim}, seq {args.seq_len}, "
                               f"batch {args.batch}, {args.corpus}")
        print(f"wrote {args.plot}")
    print(f"final val loss {result.final_val_loss:.4f} nats/byte ({result.final_val_loss / math.log(2):.3f} "
          f"bits/byte) after {done} steps, {result.seconds:.1f} s, {result.num_parameters:,} parameters")
    return 0
