"""The built-in evaluations, one `Evaluation` each (the protocol: `eval/registry.py`): the flags
of `sparse-attn eval NAME`, the checks that exit 2 before a long run, the run, and the block
of `sparse-attn report`. The work itself is in the task's module (needle.py, reach.py,
recall.py, listops_train.py, hf_long_context.py).

    needle    attention-level needle in a haystack, every mechanism, lengths x depths heatmaps
    reach     receptive field of a per-layer schedule: coverage per depth, depth to see everything
    passkey   small trained LMs retrieving a passkey at the train length and longer
    mqar      small trained LMs on multi-query associative recall, accuracy vs pairs
    listops   an encoder trained on LRA ListOps with a chosen mechanism
    hf        a real transformers model on sparse_attn schedules (its command: `sparse-attn hf`)
"""

from __future__ import annotations

import inspect
import math

import torch

from .arguments import (add_checkpoint_flags, checkpoint_options, non_negative_int, parse_schedules, positive_float,
                        positive_int, probability, try_mechanism)
from .registry import Evaluation, register_evaluation


# --------------------------------------------------------------------------------- needle
class Needle(Evaluation):
    name = "needle"
    help = "attention-level needle in a haystack for every mechanism"
    description = ("Plant a key at a depth of a random context, query for it from the last position,\n"
                   "and read the attention mass each mechanism puts on it (exactly: a marked value\n"
                   "channel). Missing mechanism parameters are set per length (about N/16 keys per\n"
                   "query): see sparse_attn.eval.needle.needle_defaults.")

    def add_arguments(self, t):
        t.add_argument("--mechanisms", nargs="+", default=None, metavar="SPEC",
                       help="mechanisms (default: dense causal and every sparse mechanism)")
        t.add_argument("--lengths", nargs="+", type=positive_int, default=[256, 1024, 4096], metavar="N")
        t.add_argument("--depths", nargs="+", type=probability, default=None, metavar="D",
                       help="needle depths in [0, 1] (default: 0, 0.1, ..., 1)")
        t.add_argument("--heads", type=positive_int, default=4)
        t.add_argument("--dim", type=positive_int, default=64)
        t.add_argument("--trials", type=positive_int, default=4, help="independent haystacks (default: %(default)s)")
        t.add_argument("--strength", type=float, default=3.0, help="query-needle match strength (default: %(default)s)")
        t.add_argument("--non-causal", action="store_true", help="bidirectional attention (encoder) instead of causal")

    def run(self, args, parser):
        from .needle import DEFAULT_DEPTHS, needle_grid, needle_mechanism

        if len(set(args.lengths)) != len(args.lengths):
            parser.error(f"--lengths must be distinct, got {args.lengths}")
        for spec in args.mechanisms or []:  # bad specs exit 2 before the grid, which would record them and go on
            for n in sorted(args.lengths):  # the defaults needle_mechanism fills in depend on the length
                try:
                    resolved = needle_mechanism(spec, n, causal=not args.non_causal, seed=args.seed)
                    resolved.pattern()  # a pattern's arguments are checked when it is built
                except (ValueError, TypeError) as exc:
                    parser.error(f"--mechanisms {spec}: {exc}")
                try_mechanism(parser, "--mechanisms", spec, resolved, length=n, head_dim=args.dim, device=args.device)
        return needle_grid(args.mechanisms, args.lengths, args.depths or DEFAULT_DEPTHS, causal=not args.non_causal,
                           heads=args.heads, dim=args.dim, strength=args.strength, seed=args.seed,
                           device=args.device, trials=args.trials, progress=not args.no_progress)

    def summary(self, result, seconds):
        return (f"{result.summary()}\n{len(result.mechanisms)} mechanisms x {len(result.lengths)} lengths x "
                f"{len(result.depths)} depths in {seconds:.1f} s")

    def failure(self, result):
        if not result.errors:  # its cells are NaN ("err"): the run did not do what was asked
            return None
        failed = ", ".join(f"{name} at length {e['length']}" for name, errs in result.errors.items() for e in errs)
        return f"failed: {failed} (the ERROR lines above say why)"

    def from_dict(self, data):
        from .needle import NeedleResult

        return NeedleResult.from_dict(data)

    def plot(self, result, path):
        from .needle import plot_needle_heatmaps

        plot_needle_heatmaps(result, path)

    def render(self, data, name, blocks):
        """One row per mechanism, the full mass grids (`NeedleResult.summary()`), the heatmap."""
        result = self.from_dict(data)
        cfg = result.config
        cells = len(result.lengths) * len(result.depths)
        lines = [
            (f"**Needle in a haystack** (`sparse-attn eval needle`; lengths {', '.join(map(str, result.lengths))}; "
             f"{len(result.depths)} depths; heads {cfg.get('heads')}, dim {cfg.get('dim')}, trials {cfg.get('trials')}, "
             f"strength {cfg.get('strength')}, causal {cfg.get('causal')}, {cfg.get('device', '?')} "
             f"{cfg.get('dtype', '')}, torch {cfg.get('torch', '?')}). Mass = attention the query puts on the needle "
             f"key (mean over trials, heads and queries); retrieved = mass > {result.threshold}."),
            "",
            (f"| mechanism | retrieved cells (of {cells}) | mean mass | lowest mass | s/call at "
             f"N={max(result.lengths):,} | errors |"),
            "|---|---|---|---|---|---|",
        ]

        def row(label, grid, retrieved, secs, errors):
            finite = grid[~torch.isnan(grid)]
            mean = f"{finite.mean().item():.3f}" if finite.numel() else "-"
            low = f"{finite.min().item():.3f}" if finite.numel() else "-"
            last = "-" if secs is None or math.isnan(secs) else f"{secs:.2e}"
            lines.append(f"| {blocks.cell(label)} | {int(retrieved.sum())} | {mean} | {low} | {last} | {errors} |")

        longest = result.lengths.index(max(result.lengths))
        row("dense softmax (float64 reference)", result.reference["mass"], result.reference_retrieved, None, 0)
        for label in result.mechanisms:
            secs = result.seconds.get(label)
            row(label, result.mass[label], result.retrieved[label], None if secs is None else float(secs[longest]),
                len(result.errors.get(label, [])))
        lines += ["", "```", result.summary(), "```"]
        lines += blocks.image(f"needle heatmaps ({name})", f"{name}.png")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- reach
class Reach(Evaluation):
    name = "reach"
    help = "receptive field of a per-layer schedule of patterns"
    description = ("Which inputs can influence each output after 1..L layers of a schedule (residual\n"
                   "paths included), the fraction covered, and the smallest depth at which every\n"
                   "output sees every input it could. Exact: token level for short sequences, a block\n"
                   "frontier (memory O(outputs x N / block)) for long ones.")
    device = False

    def add_arguments(self, t):
        t.add_argument("--mechanisms", nargs="+", required=True, metavar="SPEC",
                       help="one spec per layer, or one spec repeated --layers times")
        t.add_argument("--length", type=positive_int, required=True, metavar="N")
        t.add_argument("--layers", type=positive_int, default=None,
                       help="repeat a single spec this many times (default: one layer per spec)")
        t.add_argument("--max-depth", type=positive_int, default=None,
                       help="search the depth to full coverage up to this many layers, repeating the schedule")
        t.add_argument("--all-queries", action="store_true", help="track every output (default: 9 evenly spaced "
                                                                  "for long sequences, all for short ones)")

    def run(self, args, parser):
        from .reach import receptive_field

        schedule = list(args.mechanisms)
        if args.layers is not None:
            if len(schedule) != 1:
                parser.error(f"--layers repeats a single spec; got {len(schedule)} specs (give one per layer instead)")
            schedule = schedule * args.layers
        if args.max_depth is not None and args.max_depth < len(schedule):
            parser.error(f"--max-depth ({args.max_depth}) must be >= the schedule's {len(schedule)} layers")
        try:  # the schedule's specs and sizes are checked as it is resolved: a usage error
            return receptive_field(schedule, args.length, max_depth=args.max_depth,
                                   queries="all" if args.all_queries else None)
        except (ValueError, TypeError) as exc:
            parser.error(str(exc))

    def from_dict(self, data):
        from .reach import ReceptiveField

        return ReceptiveField.from_dict(data)

    def plot(self, result, path):
        from .reach import plot_receptive_field

        plot_receptive_field(result, path)

    def render(self, data, name, blocks):
        """Coverage and distance per depth, the depth at which every output sees all it could."""
        layers = list(data["layers"])
        cov, covp = data["coverage"], data["coverage_of_possible"]
        back = [max(r) if r else 0 for r in data["farthest_back"]]
        ahead = [max(r) if r else 0 for r in data["farthest_ahead"]]
        queries = data.get("queries", [])
        block = f", block {data['block']}" if data.get("block") else ""
        found = ("not reached" if data.get("min_depth_full") is None else f"**{data['min_depth_full']}**")
        lines = [
            (f"**Receptive field** (`sparse-attn eval reach`; n={data['length']:,}, {len(layers)} layers, "
             f"{len(queries):,} tracked outputs, {'causal' if data.get('causal') else 'non-causal'}, method "
             f"{data.get('method')}{block}). Coverage = fraction of (tracked output, input) pairs connected after "
             "1..d layers (residual paths included); of possible = the same over the pairs that could be connected. "
             f"Depth at which every tracked output sees all it could: {found} (searched up to depth "
             f"{data.get('max_depth')})."),
            "",
            "| depth | layer | coverage | of possible | max back | max ahead |",
            "|---|---|---|---|---|---|",
        ]
        for d, layer in enumerate(layers):
            lines.append(f"| {d + 1} | `{layer}` | {cov[d]:.4f} | {covp[d]:.4f} | {back[d]:,} | {ahead[d]:,} |")
        if data.get("upper_bound"):
            lines += ["", "Upper bound: data-dependent layers counted as their largest reach ("
                      + "; ".join(map(str, data.get("reasons", []))) + ")."]
        lines += blocks.image(f"receptive field ({name})", f"{name}.png")
        return "\n".join(lines)


# ------------------------------------------------------------------- trained evaluations
def trained_task_arguments(t, task: str) -> None:
    """The flags of the evaluations that train models (passkey, mqar, listops): one place."""
    t.add_argument("--mechanisms", nargs="+", default=None, metavar="NAME=SPEC",
                   help="schedules to train, each NAME=SPEC[;SPEC...] (one spec per layer separated by ';', or one "
                        "for every layer); default: the task's own set")
    t.add_argument("--steps", type=positive_int, default=None, help="training steps per model (default: task's)")
    t.add_argument("--dim", type=positive_int, default=None)
    t.add_argument("--layers", type=positive_int, default=None)
    t.add_argument("--heads", type=positive_int, default=None)
    t.add_argument("--batch", type=positive_int, default=None)
    if task in ("passkey", "mqar"):
        t.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: task's)")
        t.add_argument("--init", choices=["fan_in", "scaled", "model"], default=None,
                       help="weight init (eval.recall.scaled_init_; default: fan_in)")
    if task == "passkey":
        t.add_argument("--train-length", type=positive_int, default=None)
        t.add_argument("--test-lengths", nargs="+", type=positive_int, default=None)
    elif task == "mqar":
        t.add_argument("--seq-len", type=positive_int, default=None)
        t.add_argument("--pairs", nargs="+", type=positive_int, default=None, help="numbers of key-value pairs")
        t.add_argument("--vocab-size", type=positive_int, default=None,
                       help="token ids, keys and values included (default: task's; Zoology uses 8192)")
    else:
        t.add_argument("--preset", choices=["cpu", "gpu"], default="cpu",
                       help="settings to start from (benchmarks/listops.py explains them; gpu = LRA's data and "
                            "schedule); the flags below override them (default: %(default)s)")
        t.add_argument("--train-examples", type=positive_int, default=None)
        t.add_argument("--min-length", type=non_negative_int, default=None)
        t.add_argument("--max-length", type=positive_int, default=None)
        t.add_argument("--checkpoint", metavar="DIR", default=None, help="the same as --checkpoint-dir")
    add_checkpoint_flags(t)  # per-model checkpoints and a time budget (train.loop)


def _overrides(args, names: dict[str, str]) -> dict:
    """{setting: value} for the flags given (flag attribute -> setting name)."""
    return {setting: getattr(args, flag) for flag, setting in names.items() if getattr(args, flag, None) is not None}


def _defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def check_model(parser, args, schedules, *, vocab_size: int, dim: int, layers: int, heads: int, length: int,
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
            try_mechanism(parser, "--mechanisms", text, mechanism, length=length, head_dim=dim // heads,
                          device=args.device)


class _Recall(Evaluation):
    """passkey / mqar: one small model per schedule, trained and tested by eval/recall.py."""

    def add_arguments(self, t):
        trained_task_arguments(t, self.name)

    def _recall(self, what: str):
        """eval/recall.py's `<name>_experiment`, `<Name>Result` or `plot_<name>` for this task."""
        from . import recall

        return getattr(recall, what.format(name=self.name, Name={"passkey": "Passkey", "mqar": "MQAR"}[self.name]))

    def _experiment(self):
        return self._recall("{name}_experiment")

    def from_dict(self, data):
        return self._recall("{Name}Result").from_dict(data)

    def plot(self, result, path):
        self._recall("plot_{name}")(result, path)

    def run(self, args, parser):
        schedules = parse_schedules(parser, args.mechanisms)
        common = _overrides(args, {"steps": "steps", "dim": "dim", "layers": "layers", "heads": "heads",
                                   "batch": "batch", "lr": "lr", "init": "init"})
        self._check(args, parser, schedules, {**_defaults(self._experiment()), **common})
        if self.name == "passkey":
            extra = _overrides(args, {"train_length": "train_length", "test_lengths": "test_lengths"})
        else:
            extra = _overrides(args, {"seq_len": "seq_len", "pairs": "num_kv_pairs_list", "vocab_size": "vocab_size"})
        common.update(checkpoint=args.checkpoint_dir, resume=args.resume,
                      **checkpoint_options(parser, args, args.checkpoint_dir))
        result = self._experiment()(schedules, **common, **extra, seed=args.seed, device=args.device,
                                    progress=not args.no_progress)
        if result.unfinished:
            print(f"stopped early (--max-minutes {args.max_minutes}): not trained to the end: "
                  f"{', '.join(f'{n} ({s} steps)' for n, s in result.unfinished.items())}; checkpointed in "
                  f"{args.checkpoint_dir}, run again with --resume to go on")
        return result

    def _check(self, args, parser, schedules, settings: dict) -> None:
        from . import recall
        from .tasks import mqar_dataset, passkey_min_length

        if self.name == "passkey":
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
                                                     first=recall.MQAR_FIRST_LAYER if self.name == "mqar" else None)
            except ValueError as exc:
                parser.error(f"--layers {settings['layers']}: {exc}")
        check_model(parser, args, schedules, vocab_size=vocab_size, dim=settings["dim"], layers=settings["layers"],
                    heads=settings["heads"], length=length, encoder=False)


class Passkey(_Recall):
    name = "passkey"
    help = "passkey retrieval with small trained causal LMs"
    title = "Passkey retrieval"


class MQAR(_Recall):
    name = "mqar"
    help = "multi-query associative recall with small trained models"
    title = "Multi-query associative recall"


class ListOps(Evaluation):
    name = "listops"
    help = "LRA ListOps with an encoder"
    title = "ListOps"

    def add_arguments(self, t):
        trained_task_arguments(t, self.name)

    def run(self, args, parser):
        from .listops_train import LISTOPS_PRESETS, LISTOPS_VOCAB, listops_mechanisms, train_listops

        schedules = parse_schedules(parser, args.mechanisms)
        settings = dict(LISTOPS_PRESETS[args.preset])
        mechanism_args = settings.pop("mechanisms")
        settings.update(_overrides(args, {"steps": "steps", "dim": "dim", "layers": "layers", "heads": "heads",
                                          "batch": "batch", "train_examples": "train_examples",
                                          "min_length": "min_length", "max_length": "max_length"}))
        settings["device"] = args.device
        if torch.device(args.device).type != "cuda":
            settings["dtype"] = "float32"
        if settings["min_length"] >= settings["max_length"] - 1:
            parser.error(f"--min-length ({settings['min_length']}) must be below --max-length - 1 "
                         f"({settings['max_length'] - 1}): lengths are strictly between them")
        mechanisms = schedules or listops_mechanisms(**mechanism_args, seed=args.seed)
        check_model(parser, args, mechanisms, vocab_size=len(LISTOPS_VOCAB), dim=settings["dim"],
                    layers=settings["layers"], heads=settings["heads"], length=settings["max_length"], encoder=True)
        if args.checkpoint and args.checkpoint_dir and args.checkpoint != args.checkpoint_dir:
            parser.error("give --checkpoint DIR or --checkpoint-dir DIR, not both")
        directory = args.checkpoint_dir or args.checkpoint
        result = train_listops(mechanisms, **settings, seed=args.seed, checkpoint=directory, resume=args.resume,
                               progress=not args.no_progress, **checkpoint_options(parser, args, directory))
        unfinished = [name for name, run in result.runs.items() if not run.finished]
        if unfinished or len(result.runs) < len(mechanisms):
            print(f"stopped early (--max-minutes {args.max_minutes}): {', '.join(unfinished)} checkpointed in "
                  f"{directory}; run again with --resume to go on")
        return result

    def from_dict(self, data):
        from .listops_train import ListOpsResult

        return ListOpsResult.from_dict(data)

    def plot(self, result, path):
        from .listops_train import plot_listops

        plot_listops(result, path)


# ------------------------------------------------------------------------------------- hf
class HFLongContext(Evaluation):
    """A real transformers model on sparse_attn schedules. Its command is `sparse-attn hf`
    (cli/hf.py: model files and text to load); here for its report block and result files."""

    name = "hf"
    help = "a real model (SmolLM2-135M, GGUF) on sparse_attn schedules: perplexity, memory, generation speed"
    command = False
    files = ("hf_*.json",)
    pictures = ("hf_*.png",)

    def from_dict(self, data):
        from .hf_long_context import HFLongContextResult

        return HFLongContextResult.from_dict(data)

    def plot(self, result, path):
        from .hf_long_context import plot_hf_long_context

        plot_hf_long_context(result, path)

    def render(self, data, name, blocks):
        """Its summary (table, correctness lines) and `<name>.png`."""
        lines = [self.from_dict(data).summary()]
        lines += blocks.image(f"real model ({name})", f"{name}.png")
        return "\n".join(lines)


for _evaluation in (Needle(), Reach(), Passkey(), MQAR(), ListOps(), HFLongContext()):
    register_evaluation(_evaluation)
