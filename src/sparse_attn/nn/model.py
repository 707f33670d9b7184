"""Models whose layers use any mechanism, with a per-layer schedule (e.g. dense attention every
4th layer and a sliding window elsewhere, as hybrid long-context models do):

* `SparseCausalLM`: decoder-only language model, tied head, decoding through per-layer caches;
* `SparseTransformer`: encoder with mean or first-token pooling and a classification head.

Read top to bottom: config -> block (pre-norm attention + MLP) -> models -> caches and generation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .._checks import check_bool, check_int
from ..ops.mechanisms import Mechanism, as_mechanism
from ..patterns import Pattern
from .attention import SparseAttention, takes_deterministic
from .cache import (FullCache, KVCache, LinearStateCache, PatternCache, SinkCache, WindowCache, auto_cache,
                    check_causal, leaky_selection)


@dataclass
class ModelConfig:
    """Everything that defines a model; `to_dict()` / `from_dict()` keep it with a checkpoint.

    `mechanisms` is one spec for every layer ("sliding_window:window=256") or a list with one
    spec per layer (["causal", "sliding_window:window=256", ...]); specs are what
    `sparse_attn.attention` accepts as strings, or Mechanism dicts.

    `leaky_mechanisms` names the mechanisms ("lsh", "routing", "block_topk") a `SparseCausalLM`
    accepts although, with causal=True, they choose which past keys a query gets from later
    positions too (see `cache.check_causal`): the model can then read the future through that
    choice and cannot be decoded step by step. Empty by default: such layers are refused.

    `deterministic` picks the backward of the layers that run on a block backend (patterns,
    block_topk), as `sparse_attention(..., deterministic=)` does: True for bitwise-reproducible
    gradients (triton's three-launch backward), False for the fastest (triton's fused one),
    None (default) for False unless torch.use_deterministic_algorithms(True) is on. Layers with
    other mechanisms (linear, performer, ...) have one backward each and are not affected.
    """

    vocab_size: int
    dim: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    mlp_ratio: float = 4.0
    mechanisms: str | list = "causal"
    rope: bool = True
    dropout: float = 0.0
    norm_eps: float = 1e-5
    warmup_steps: int = 0  # dense-to-sparse: blend from dense to the schedule over this many steps
    extra: dict = field(default_factory=dict)  # free-form notes kept with the config
    leaky_mechanisms: list = field(default_factory=list)  # accepted despite choosing keys from later positions
    deterministic: bool | None = None  # backward of the block-backend layers (see above)

    def layer_mechanisms(self) -> list[Mechanism | Pattern]:
        specs = self.mechanisms if isinstance(self.mechanisms, list) else [self.mechanisms] * self.num_layers
        if len(specs) != self.num_layers:
            raise ValueError(f"mechanisms lists {len(specs)} layers but num_layers is {self.num_layers}")
        # Layers with the same spec string share one Mechanism, hence one Pattern and its cached
        # layouts (and the backends' plans on them): a new sequence length builds one layout for
        # the model instead of one per layer. Mechanisms and patterns are immutable, so sharing
        # them changes nothing else.
        shared: dict[str, Mechanism | Pattern] = {}
        built = []
        for s in specs:
            if isinstance(s, dict):
                built.append(Mechanism.from_dict(s))
            elif isinstance(s, str):
                if s not in shared:
                    shared[s] = as_mechanism(s)
                built.append(shared[s])
            else:
                built.append(as_mechanism(s))
        return built

    def sparse_weight(self, step: int) -> float:
        """Weight of the sparse mechanisms at training step `step` (linear ramp 0 -> 1)."""
        return 1.0 if self.warmup_steps <= 0 else min(1.0, step / self.warmup_steps)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return cls(**data)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, mechanism):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = SparseAttention(cfg.dim, cfg.num_heads, cfg.num_kv_heads, mechanism, rope=cfg.rope,
                                    dropout=cfg.dropout,
                                    deterministic=cfg.deterministic if takes_deterministic(mechanism) else None)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        hidden = int(cfg.mlp_ratio * cfg.dim)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, cfg.dim, bias=False))

    def forward(self, x, cache: KVCache | None = None, padding_mask: torch.Tensor | None = None):
        x = x + self.attn(self.attn_norm(x), cache=cache, padding_mask=padding_mask)
        return x + self.mlp(self.mlp_norm(x))


def _forget_host_train_step(module, incompatible_keys) -> None:
    module._host_train_step = None


class _Stack(nn.Module):
    """What both models share: embeddings, the scheduled blocks, the final norm, and the step
    count of the dense-to-sparse warm-up (a buffer, so it is saved with the state dict)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, m) for m in cfg.layer_mechanisms())
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.register_buffer("train_step", torch.zeros((), dtype=torch.long))
        # the step count on the host too, so a forward never reads the buffer back (a device
        # synchronisation per call on CUDA); None after load_state_dict: read once, lazily
        self._host_train_step: int | None = 0
        self.register_load_state_dict_post_hook(_forget_host_train_step)

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def advance(self, steps: int = 1) -> None:
        """Count optimizer steps (the warm-up schedule reads them). Count them here rather than
        by writing the `train_step` buffer: the forward reads the host copy kept by this method."""
        self.train_step += check_int("steps", steps, 1)
        if self._host_train_step is not None:
            self._host_train_step += steps

    def _apply_warmup(self, dense: str) -> None:
        if self.cfg.warmup_steps <= 0:
            weight = 1.0  # no warm-up: the step count does not matter
        else:
            if self._host_train_step is None:  # loaded from a state dict: one read
                self._host_train_step = int(self.train_step)
            weight = self.cfg.sparse_weight(self._host_train_step)
        for block in self.blocks:
            block.attn.set_warmup(dense, weight)


class SparseTransformer(_Stack):
    """Encoder: tokens (B, N) -> hidden states (B, N, dim), and `classify` -> logits (B, classes)
    from the pooled states. Mechanisms are usually non-causal here ("sliding_window:causal=false",
    "longformer", "bigbird"). `padding_mask` (B, N) bool, True = real token: the attention
    never sees pad keys and counts positions from each row's first real token, and pooling
    ignores the pads, so a padded batch classifies each row as it would alone (every built-in
    mechanism; lsh with a seed; block_topk under right padding only: see `SparseAttention`).

    `check_tokens=False` skips the check that every id is below vocab_size, which reads the
    tokens back (one device synchronisation per call on CUDA): for training loops over data
    validated once. Without it a bad id fails inside the embedding instead (on CUDA a device-side
    assert, which ends the process's CUDA context) rather than with a ValueError."""

    def __init__(self, cfg: ModelConfig, num_classes: int = 0, pooling: str = "mean"):
        if pooling not in ("mean", "first"):
            raise ValueError(f"pooling must be 'mean' or 'first', got {pooling!r}")
        check_int("num_classes", num_classes, minimum=0)
        super().__init__(cfg)
        self.pooling = pooling
        self.head = nn.Linear(cfg.dim, num_classes) if num_classes else None
        self.apply(self._init)

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None, *,
                check_tokens: bool = True) -> torch.Tensor:
        _check_tokens(tokens, self.cfg.vocab_size, self.embed.weight.device, values=check_tokens)
        self._apply_warmup("full")
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, padding_mask=padding_mask)
        return self.norm(x)

    def classify(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None, *,
                 check_tokens: bool = True) -> torch.Tensor:
        if self.head is None:
            raise ValueError("this encoder was built with num_classes=0: it has no classification head")
        h = self(tokens, padding_mask, check_tokens=check_tokens)  # [B, N, dim]
        if self.pooling == "first":
            pooled = h[:, 0]
        elif padding_mask is None:
            pooled = h.mean(1)
        else:
            if padding_mask.shape != tokens.shape or padding_mask.dtype != torch.bool:
                raise ValueError(f"padding_mask must be a bool tensor of shape {tuple(tokens.shape)}")
            w = padding_mask.to(h.dtype)[..., None]
            pooled = (h * w).sum(1) / w.sum(1).clamp_min(1)
        return self.head(pooled)


def _check_tokens(tokens, vocab_size: int, device: torch.device, name: str = "tokens", *, values: bool = True) -> None:
    """Type, shape and device always; with `values`, every id in [0, vocab_size) (a host read)."""
    check_bool("check_tokens", values)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError(f"{name} must be an integer tensor (batch, length), got "
                         f"{tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}")
    if tokens.dtype not in (torch.int64, torch.int32):  # what nn.Embedding takes
        raise ValueError(f"{name} must be an integer tensor (batch, length) of int64 or int32 token ids, got "
                         f"{tokens.dtype}")
    if tokens.device != device:
        raise ValueError(f"{name} are on {tokens.device} but the model is on {device}")
    if not values:
        return
    bad = (tokens < 0) | (tokens >= vocab_size)  # else an IndexError (a device assert on CUDA) in the embedding
    if bad.any():
        raise ValueError(f"{name} must be in [0, {vocab_size}) (vocab_size {vocab_size}), got {int(tokens[bad][0])}")


class SparseCausalLM(_Stack):
    """tokens (B, N) -> logits (B, N, vocab). The output head shares the embedding matrix.

    Every layer must be causal (`cache.check_causal`; `ModelConfig.leaky_mechanisms` for LSH,
    routing and block top-k). `forward(tokens, padding_mask=mask)` (B, N) bool, True = real
    token: left or right padding, each row gets the logits it gets alone at its real positions
    (every built-in mechanism; lsh with a seed; block_topk under right padding only: see
    `SparseAttention`; pads' logits mean nothing). Decoding with caches
    holds one sequence per row: give `generate` right-padded prompts and their `lengths`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        leaky = cfg.leaky_mechanisms
        if not isinstance(leaky, (list, tuple)) or not all(isinstance(name, str) for name in leaky):
            raise TypeError(f"leaky_mechanisms must be a list of mechanism names, got {type(leaky).__name__} "
                            f"({leaky!r})")
        known = leaky_selection()
        for name in leaky:
            if name not in known:
                raise ValueError(f"leaky_mechanisms lists {name!r}; only {', '.join(sorted(known))} choose "
                                 "keys from later positions")
        for i, block in enumerate(self.blocks):
            check_causal(block.attn.mechanism, f"layer {i}", leaky)
        self.apply(self._init)

    def forward(self, tokens: torch.Tensor, caches: list[KVCache] | None = None,
                padding_mask: torch.Tensor | None = None, *, check_tokens: bool = True) -> torch.Tensor:
        """Logits (B, N, vocab). check_tokens: as in `SparseTransformer`."""
        _check_tokens(tokens, self.cfg.vocab_size, self.embed.weight.device, values=check_tokens)
        self._apply_warmup("causal")
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"caches must hold one cache per layer ({len(self.blocks)}), got {len(caches)}")
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, cache=None if caches is None else caches[i], padding_mask=padding_mask)
        return self.norm(x) @ self.embed.weight.T  # tied head

    def make_caches(self, kind: str = "full", *, window: int | None = None, sinks: int = 4) -> list[KVCache]:
        """One cache per layer: "full" (FullCache), "window" (WindowCache(window)), "sink"
        (SinkCache(sinks, window)), "linear" (LinearStateCache), "pattern" (PatternCache), or
        "auto": per layer, the smallest exact cache for its mechanism (linear state, a window
        ring, the pattern's reachable keys, else full)."""
        makers = {"full": FullCache, "window": lambda: WindowCache(_need(window, "window")),
                  "sink": lambda: SinkCache(sinks, _need(window, "window")), "linear": LinearStateCache,
                  "pattern": PatternCache}
        if kind == "auto":
            return [auto_cache(block.attn.mechanism) for block in self.blocks]
        if kind not in makers:
            raise ValueError(f"cache kind must be one of {', '.join(list(makers) + ['auto'])}, got {kind!r}")
        return [makers[kind]() for _ in self.blocks]

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, caches: list[KVCache] | str = "auto",
                 temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None,
                 stream: bool = False, lengths=None):
        """Sample `max_new_tokens` after `prompt` (B, N): prefill once, then one token per step
        through the caches. temperature 0 = greedy. Returns (B, N + max_new_tokens), or with
        stream=True an iterator over the new tokens (B, 1) as they are made.

        The model has no pad token: every prompt token is taken as real, so a right-padded row
        would continue after its pads. Give such a batch `lengths` (B ints, each row's real
        prompt length): each row then continues from its own last token, its pads overwritten by
        generated tokens, exactly as the row run alone (greedy; sampling draws once per step for
        the batch), and a row of length L gets N - L + max_new_tokens new tokens. With lengths
        the stream starts after the shortest prompt (rows still in their prompt yield its tokens).
        Left-padded prompts are not supported (see the class docstring)."""
        _check_tokens(prompt, self.cfg.vocab_size, self.embed.weight.device, "prompt")
        if prompt.shape[1] == 0:
            raise ValueError(f"prompt must hold at least one token per row, got shape {tuple(prompt.shape)}")
        check_int("max_new_tokens", max_new_tokens, minimum=0)
        if (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature)
                or temperature < 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if top_k is not None:
            check_int("top_k", top_k, 1)
        if lengths is not None:
            lengths = torch.tensor(_check_lengths(lengths, prompt), device=prompt.device)[:, None]  # [B, 1]
        start = prompt.shape[1] if lengths is None else int(lengths.min())
        steps = self._generate(prompt, start, lengths, max_new_tokens, caches, temperature, top_k, generator)
        if stream:
            return steps
        return torch.cat([prompt[:, :start]] + list(steps), dim=1)

    @torch.no_grad()  # the generator body runs when iterated, outside generate()'s own no_grad
    def _generate(self, prompt, start, lengths, max_new_tokens, caches, temperature, top_k, generator):
        if isinstance(caches, str):
            caches = self.make_caches(caches)
        n = prompt.shape[1]
        logits = self(prompt[:, :start], caches)[:, -1]
        for t in range(start, n + max_new_tokens):
            token = _sample(logits, temperature, top_k, generator)  # [B, 1]
            if t < n:  # rows whose prompt goes on take their own next token (no pad is ever fed)
                token = torch.where(t < lengths, prompt[:, t:t + 1], token)
            yield token
            logits = self(token, caches)[:, -1]


def _check_lengths(lengths, prompt) -> list[int]:
    if isinstance(lengths, torch.Tensor):
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must be integers (one per prompt row), got a {lengths.dtype} tensor")
        lengths = lengths.tolist()
    if not isinstance(lengths, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, int) for x in lengths):
        raise TypeError(f"lengths must be integers (one per prompt row): a list or a 1-D tensor, got {lengths!r}")
    bsz, n = prompt.shape
    if len(lengths) != bsz:
        raise ValueError(f"lengths must hold one length per prompt row ({bsz}), got {len(lengths)}")
    if any(not 1 <= x <= n for x in lengths):
        raise ValueError(f"lengths must be in [1, {n}] (the prompt's width), got {list(lengths)}")
    return list(lengths)


def _need(value, name):
    if value is None:
        raise ValueError(f"this cache kind needs {name}=")
    return value


def _sample(logits, temperature, top_k, generator):
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)
