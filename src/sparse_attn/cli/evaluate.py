"""`sparse-attn eval TASK`: the long-context evaluations of `sparse_attn.eval`, one subcommand
each, with small defaults that finish on a CPU in minutes and flags for full-size runs.

    needle    attention-level needle in a haystack, every mechanism, lengths x depths heatmaps
    reach     receptive field of a per-layer schedule: coverage per depth, depth to see everything
    passkey   small trained LMs retrieving a passkey at the train length and longer
    mqar      small trained LMs on multi-query associative recall, accuracy vs pairs
    listops   an encoder trained on LRA ListOps with a chosen mechanism

Each prints a summary, writes --json and --plot on request, and exits 0 / 1 (run-time failure)
/ 2 (bad arguments) like every sparse-attn command. Thin on purpose: the work is in eval/.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time

import torch

from .checkpointing import add_checkpoint_flags, checkpoint_options
from .main import (PROG, _check_output, _non_negative_int, _positive_int, _require_matplotlib, _try_mechanism,
                   check_device)

TASKS = ("needle", "reach", "passkey", "mqar", "listops")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _common(p: argparse.ArgumentParser, *, device: bool = True) -> None:
    if device:
        p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything random (default: %(default)s)")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON")
    p.add_argument("--plot", metavar="FILE", help="write a picture (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress on stderr (a bar on a terminal, else a line every 10 s)")


def add_eval_parser(sub, formatter) -> None:
    p = sub.add_parser("eval", help="long-context evaluations: needle, reach, passkey, mqar, listops",
                       description=__doc__, formatter_class=formatter)
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")

    t = tasks.add_parser("needle", help="attention-level needle in a haystack for every mechanism",
                         description="Plant a key at a depth of a random context, query for it from the last position,\n"
                                     "and read the attention mass each mechanism puts on it (exactly: a marked value\n"
                                     "channel). Missing mechanism parameters are set per length (about N/16 keys per\n"
                                     "query): see sparse_attn.eval.needle.needle_defaults.",
                         formatter_class=formatter)
    t.add_argument("--mechanisms", nargs="+", default=None, metavar="SPEC",
                   help="mechanisms (default: dense causal and every sparse mechanism)")
    t.add_argument("--lengths", nargs="+", type=_positive_int, default=[256, 1024, 4096], metavar="N")
    t.add_argument("--depths", nargs="+", type=_probability, default=None, metavar="D",
                   help="needle depths in [0, 1] (default: 0, 0.1, ..., 1)")
    t.add_argument("--heads", type=_positive_int, default=4)
    t.add_argument("--dim", type=_positive_int, default=64)
    t.add_argument("--trials", type=_positive_int, default=4, help="independent haystacks (default: %(default)s)")
    t.add_argument("--strength", type=float, default=3.0, help="query-needle match strength (default: %(default)s)")
    t.add_argument("--non-causal", action="store_true", help="bidirectional attention (encoder) instead of causal")
    _common(t)
    t.set_defaults(handler=cmd_needle, parser=t)

    t = tasks.add_parser("reach", help="receptive field of a per-layer schedule of patterns",
                         description="Which inputs can influence each output after 1..L layers of a schedule (residual\n"
                                     "paths included), the fraction covered, and the smallest depth at which every\n"
                                     "output sees every input it could. Exact: token level for short sequences, a block\n"
                                     "frontier (memory O(outputs x N / block)) for long ones.",
                         formatter_class=formatter)
    t.add_argument("--mechanisms", nargs="+", required=True, metavar="SPEC",
                   help="one spec per layer, or one spec repeated --layers times")
    t.add_argument("--length", type=_positive_int, required=True, metavar="N")
    t.add_argument("--layers", type=_positive_int, default=None,
                   help="repeat a single spec this many times (default: one layer per spec)")
    t.add_argument("--max-depth", type=_positive_int, default=None,
                   help="search the depth to full coverage up to this many layers, repeating the schedule")
    t.add_argument("--all-queries", action="store_true", help="track every output (default: 9 evenly spaced "
                                                              "for long sequences, all for short ones)")
    _common(t, device=False)
    t.set_defaults(handler=cmd_reach, parser=t)

    for name, help_text in (("passkey", "passkey retrieval with small trained causal LMs"),
                            ("mqar", "multi-query associative recall with small trained models"),
                            ("listops", "LRA ListOps with an encoder")):
        t = tasks.add_parser(name, help=help_text, formatter_class=formatter)
        _task_arguments(name, t)
        _common(t)
        t.set_defaults(handler=cmd_trained_task, parser=t)


def _task_arguments(name: str, t: argparse.ArgumentParser) -> None:
    t.add_argument("--mechanisms", nargs="+", default=None, metavar="NAME=SPEC",
                   help="schedules to train, each NAME=SPEC[;SPEC...] (one spec per layer separated by ';', or one "
                        "for every layer); default: the task's own set")
    t.add_argument("--steps", type=_positive_int, default=None, help="training steps per model (default: task's)")
    t.add_argument("--dim", type=_positive_int, default=None)
    t.add_argument("--layers", type=_positive_int, default=None)
    t.add_argument("--heads", type=_positive_int, default=None)
    t.add_argument("--batch", type=_positive_int, default=None)
    if name in ("passkey", "mqar"):
        t.add_argument("--lr", type=_positive_float, default=None, help="peak learning rate (default: task's)")
        t.add_argument("--init", choices=["fan_in", "scaled", "model"], default=None,
                       help="weight init (eval.recall.scaled_init_; default: fan_in)")
    if name == "passkey":
        t.add_argument("--train-length", type=_positive_int, default=None)
        t.add_argument("--test-lengths", nargs="+", type=_positive_int, default=None)
    elif name == "mqar":
        t.add_argument("--seq-len", type=_positive_int, default=None)
        t.add_argument("--pairs", nargs="+", type=_positive_int, default=None, help="numbers of key-value pairs")
        t.add_argument("--vocab-size", type=_positive_int, default=None,
                       help="token ids, keys and values included (default: task's; Zoology uses 8192)")
    else:
        t.add_argument("--preset", choices=["cpu", "gpu"], default="cpu",
                       help="settings to start from (benchmarks/listops.py explains them; gpu = LRA's data and "
                            "schedule); the flags below override them (default: %(default)s)")
        t.add_argument("--train-examples", type=_positive_int, default=None)
        t.add_argument("--min-length", type=_non_negative_int, default=None)
        t.add_argument("--max-length", type=_positive_int, default=None)
        t.add_argument("--checkpoint", metavar="DIR", default=None, help="the same as --checkpoint-dir")
    add_checkpoint_flags(t)  # per-model checkpoints and a time budget (train.loop)


def _prepare_outputs(args) -> None:
    _check_output(args.parser, "--json", args.json)
    _check_output(args.parser, "--plot", args.plot)
    if args.plot:
        _require_matplotlib()


def _write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {path}")


def cmd_needle(args) -> int:
    from ..eval.needle import DEFAULT_DEPTHS, needle_grid, needle_mechanism, plot_needle_heatmaps

    parser = args.parser
    if len(set(args.lengths)) != len(args.lengths):
        parser.error(f"--lengths must be distinct, got {args.lengths}")
    check_device(args.device, parser)
    _prepare_outputs(args)
    if args.mechanisms:
        for spec in args.mechanisms:  # bad specs exit 2 before the grid, which would record them and go on
            for n in sorted(args.lengths):  # the defaults needle_mechanism fills in depend on the length
                try:
                    resolved = needle_mechanism(spec, n, causal=not args.non_causal, seed=args.seed)
                    resolved.pattern()  # a pattern's arguments are checked when it is built
                except (ValueError, TypeError) as exc:
                    parser.error(f"--mechanisms {spec}: {exc}")
                _try_mechanism(parser, "--mechanisms", spec, resolved, length=n, head_dim=args.dim, device=args.device)
    started = time.perf_counter()
    result = needle_grid(args.mechanisms, args.lengths, args.depths or DEFAULT_DEPTHS, causal=not args.non_causal,
                         heads=args.heads, dim=args.dim, strength=args.strength, seed=args.seed, device=args.device,
                         trials=args.trials, progress=not args.no_progress)
    print(result.summary())
    print(f"{len(result.mechanisms)} mechanisms x {len(result.lengths)} lengths x {len(result.depths)} depths in "
          f"{time.perf_counter() - started:.1f} s")
    if args.json:
        _write_json(args.json, result.to_dict())
    if args.plot:
        plot_needle_heatmaps(result, args.plot)
        print(f"wrote {args.plot}")
    if result.errors:  # its cells are NaN ("err"): the run did not do what was asked
        failed = ", ".join(f"{name} at length {e['length']}" for name, errs in result.errors.items() for e in errs)
        print(f"{PROG}: error: failed: {failed} (the ERROR lines above say why)", file=sys.stderr)
        return 1
    return 0


def cmd_reach(args) -> int:
    from ..eval.reach import plot_receptive_field, receptive_field

    parser = args.parser
    schedule = list(args.mechanisms)
    if args.layers is not None:
        if len(schedule) != 1:
            parser.error(f"--layers repeats a single spec; got {len(schedule)} specs (give one per layer instead)")
        schedule = schedule * args.layers
    if args.max_depth is not None and args.max_depth < len(schedule):
        parser.error(f"--max-depth ({args.max_depth}) must be >= the schedule's {len(schedule)} layers")
    _prepare_outputs(args)
    try:
        result = receptive_field(schedule, args.length, max_depth=args.max_depth,
                                 queries="all" if args.all_queries else None)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    print(result.summary())
    if args.json:
        _write_json(args.json, result.to_dict())
    if args.plot:
        plot_receptive_field(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def parse_schedules(parser, texts: list[str] | None) -> dict | None:
    """NAME=SPEC[;SPEC...] -> {NAME: spec or [spec per layer]}."""
    if texts is None:
        return None
    out = {}
    for text in texts:
        name, sep, specs = text.partition("=")
        if not sep or not name or not specs:
            parser.error(f"--mechanisms takes NAME=SPEC[;SPEC...], got {text!r}")
        parts = [s for s in specs.split(";") if s]
        out[name] = parts[0] if len(parts) == 1 else parts
    return out


def _overrides(args, names: dict[str, str]) -> dict:
    """{setting: value} for the flags given (flag attribute -> setting name)."""
    return {setting: getattr(args, flag) for flag, setting in names.items() if getattr(args, flag, None) is not None}


def cmd_trained_task(args) -> int:
    check_device(args.device, args.parser)
    _prepare_outputs(args)
    schedules = parse_schedules(args.parser, args.mechanisms)
    runner = _run_listops if args.task == "listops" else _run_recall
    return runner(args, schedules)


def _defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def _check_model(parser, args, schedules, *, vocab_size: int, dim: int, layers: int, heads: int, length: int,
                 encoder: bool) -> None:
    """What the experiments would refuse only when they start, or at a schedule's first step
    (several minutes into a run that trains one model per schedule): exit 2 now instead."""
    from ..nn import ModelConfig, SparseCausalLM, SparseTransformer
    from ..ops.mechanisms import as_mechanism

    if dim % heads:
        parser.error(f"--dim ({dim}) must be a multiple of --heads ({heads})")
    if (dim // heads) % 2:
        parser.error(f"--dim // --heads must be even (rotary embeddings), got {dim} // {heads} = {dim // heads}")
    texts = {text.partition("=")[0]: text for text in args.mechanisms or []}
    for name, mechanisms in schedules.items():
        text = texts.get(name, f"{name} (a default schedule)")
        try:  # the causal rule and the per-layer count; on the meta device nothing is allocated
            with torch.device("meta"):
                cfg = ModelConfig(vocab_size=vocab_size, dim=dim, num_layers=layers, num_heads=heads,
                                  mechanisms=mechanisms)
                SparseTransformer(cfg, num_classes=2) if encoder else SparseCausalLM(cfg)
            resolved = [as_mechanism(m) for m in ([mechanisms] if isinstance(mechanisms, str) else mechanisms)]
        except (ValueError, TypeError) as exc:
            parser.error(f"--mechanisms {text}: {exc}")
        for mechanism in dict.fromkeys(resolved):
            _try_mechanism(parser, "--mechanisms", text, mechanism, length=length, head_dim=dim // heads,
                           device=args.device)


def _run_recall(args, schedules) -> int:
    """passkey / mqar: one small model per schedule, trained and tested by eval/recall.py."""
    from ..eval import recall

    common = _overrides(args, {"steps": "steps", "dim": "dim", "layers": "layers", "heads": "heads",
                               "batch": "batch", "lr": "lr", "init": "init"})
    _check_recall(args, schedules, {**_defaults(recall.passkey_experiment if args.task == "passkey"
                                                else recall.mqar_experiment), **common})
    common.update(checkpoint=args.checkpoint_dir, resume=args.resume,
                  **checkpoint_options(args.parser, args, args.checkpoint_dir))
    if args.task == "passkey":
        extra = _overrides(args, {"train_length": "train_length", "test_lengths": "test_lengths"})
        result = recall.passkey_experiment(schedules, **common, **extra, seed=args.seed, device=args.device,
                                           progress=not args.no_progress)
        plot = recall.plot_passkey
    else:
        extra = _overrides(args, {"seq_len": "seq_len", "pairs": "num_kv_pairs_list", "vocab_size": "vocab_size"})
        result = recall.mqar_experiment(schedules, **common, **extra, seed=args.seed, device=args.device,
                                        progress=not args.no_progress)
        plot = recall.plot_mqar
    if result.unfinished:
        print(f"stopped early (--max-minutes {args.max_minutes}): not trained to the end: "
              f"{', '.join(f'{n} ({s} steps)' for n, s in result.unfinished.items())}; checkpointed in "
              f"{args.checkpoint_dir}, run again with --resume to go on")
    print(result.summary())
    if args.json:
        _write_json(args.json, result.to_dict())
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _check_recall(args, schedules, settings: dict) -> None:
    from ..eval import recall
    from ..eval.tasks import mqar_dataset, passkey_min_length

    parser = args.parser
    if args.task == "passkey":
        minimum = passkey_min_length(settings["digits"])
        given = [("--train-length", args.train_length)] + [("--test-lengths", n) for n in args.test_lengths or []]
        for flag, n in given:
            if n is not None and n < minimum:
                parser.error(f"{flag} {n}: the passkey prompt needs at least {minimum} bytes")
        length, vocab_size = max([args.train_length or settings["train_length"]]
                                 + list(args.test_lengths or settings["test_lengths"])), 256
    else:
        length, vocab_size = args.seq_len or settings["seq_len"], args.vocab_size or settings["vocab_size"]
        pairs = args.pairs or list(settings["num_kv_pairs_list"])
        if settings["batch"] < len(pairs):
            parser.error(f"--batch ({settings['batch']}) must be >= the number of --pairs ({len(pairs)}): every "
                         "batch holds every pair count")
        for p in pairs:
            try:  # one example: the generator checks that the pairs fit the sequence and the vocabulary
                mqar_dataset(1, vocab_size=vocab_size, input_seq_len=length, num_kv_pairs=p)
            except ValueError as exc:
                parser.error(f"--pairs {p} (--seq-len {length}, --vocab-size {vocab_size}): {exc}")
    if schedules is None:
        try:
            schedules = recall.default_schedules(settings["layers"], settings["window"],
                                                 first=recall.MQAR_FIRST_LAYER if args.task == "mqar" else None)
        except ValueError as exc:
            parser.error(f"--layers {settings['layers']}: {exc}")
    _check_model(parser, args, schedules, vocab_size=vocab_size, dim=settings["dim"], layers=settings["layers"],
                 heads=settings["heads"], length=length, encoder=False)


def _run_listops(args, schedules) -> int:
    from ..eval.listops_train import LISTOPS_PRESETS, LISTOPS_VOCAB, listops_mechanisms, plot_listops, train_listops

    settings = dict(LISTOPS_PRESETS[args.preset])
    mechanism_args = settings.pop("mechanisms")
    settings.update(_overrides(args, {"steps": "steps", "dim": "dim", "layers": "layers", "heads": "heads",
                                      "batch": "batch", "train_examples": "train_examples",
                                      "min_length": "min_length", "max_length": "max_length"}))
    settings["device"] = args.device
    if torch.device(args.device).type != "cuda":
        settings["dtype"] = "float32"
    if settings["min_length"] >= settings["max_length"] - 1:
        args.parser.error(f"--min-length ({settings['min_length']}) must be below --max-length - 1 "
                          f"({settings['max_length'] - 1}): lengths are strictly between them")
    mechanisms = schedules or listops_mechanisms(**mechanism_args, seed=args.seed)
    _check_model(args.parser, args, mechanisms, vocab_size=len(LISTOPS_VOCAB), dim=settings["dim"],
                 layers=settings["layers"], heads=settings["heads"], length=settings["max_length"], encoder=True)
    if args.checkpoint and args.checkpoint_dir and args.checkpoint != args.checkpoint_dir:
        args.parser.error("give --checkpoint DIR or --checkpoint-dir DIR, not both")
    directory = args.checkpoint_dir or args.checkpoint
    result = train_listops(mechanisms, **settings, seed=args.seed, checkpoint=directory, resume=args.resume,
                           progress=not args.no_progress, **checkpoint_options(args.parser, args, directory))
    unfinished = [name for name, run in result.runs.items() if not run.finished]
    if unfinished or len(result.runs) < len(mechanisms):
        print(f"stopped early (--max-minutes {args.max_minutes}): {', '.join(unfinished)} checkpointed in "
              f"{directory}; run again with --resume to go on")
    print(result.summary())
    if args.json:
        _write_json(args.json, result.to_dict())
    if args.plot:
        plot_listops(result, args.plot)
        print(f"wrote {args.plot}")
    return 0
