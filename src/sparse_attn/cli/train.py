"""`sparse-attn train`: train a small byte-level `SparseCausalLM` with any attention schedule.

Thin on purpose: arguments become a `ModelConfig` and a `TrainConfig`, everything that can be
checked without training is checked first (specs, the causal rule, the corpus, the checkpoint
to resume), then `sparse_attn.train.train_lm` runs, and the results are printed, written as
JSON / a loss plot, and optionally sampled from.
"""

from __future__ import annotations

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
from ..train.corpus import describe
from .checkpointing import checkpoint_options
from .main import PROG, _check_output, _require_matplotlib, _try_mechanism, check_device

SAMPLE_TEMPERATURE = 0.8
MAX_PROMPT = 128  # bytes of validation text the sample continues
CHECKPOINT_NAME = "train.pt"  # the checkpoint's file in --checkpoint-dir


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
        _try_mechanism(parser, "--mechanisms", text, as_mechanism(text), length=args.seq_len,
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
        _check_output(parser, flag, path)
    if args.corpus not in ("synthetic", "stdlib") and not os.path.isfile(args.corpus):
        parser.error(f"--corpus must be synthetic, stdlib or a readable file, got {args.corpus!r}")
    start = _check_resume(parser, args, model_cfg, train_cfg) if args.resume else 0
    data = TokenData.from_bytes(load_corpus(args.corpus, args.corpus_bytes, args.seed))
    try:
        data.check_length(args.seq_len)
    except ValueError as exc:
        parser.error(f"--corpus {args.corpus} (--corpus-bytes {args.corpus_bytes}): {exc}")
    if args.plot:
        _require_matplotlib()
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
