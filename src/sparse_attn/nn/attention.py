"""`SparseAttention`: a multi-head self-attention layer whose attention is any mechanism.

    layer = SparseAttention(dim=512, num_heads=8, num_kv_heads=2, mechanism="sliding_window:window=256")
    y = layer(x)                      # x, y: (B, N, dim)

q/k/v/out projections, grouped-query attention (num_kv_heads divides num_heads; k/v are never
repeated), rotary embeddings on q and k, and the attention itself through
`sparse_attn.attention`, so the mechanism can be a Pattern (exact block-sparse attention on the
`blocked` / `triton` / `flex` backends), a name with parameters, a spec string or a `Mechanism`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backends import get_backend
from .._checks import check_bool, check_int
from ..ops.mechanisms import PATTERN, Mechanism, as_mechanism, attention
from ..patterns import BlockLayout
from .cache import KVCache
from .rotary import RotaryEmbedding


def takes_deterministic(mechanism) -> bool:
    """Whether `mechanism` (Pattern, Mechanism, name or spec) runs on a block backend, so
    `deterministic=` chooses its backward: patterns and mechanisms with that parameter."""
    m = as_mechanism(mechanism)
    return not isinstance(m, Mechanism) or m.kind == PATTERN or "deterministic" in m.info.parameters()


class SparseAttention(nn.Module):
    """Multi-head self-attention with a chosen mechanism.

    Args:
        dim: model width (input and output features).
        num_heads: query heads.
        num_kv_heads: key/value heads (GQA), dividing num_heads; default num_heads.
        mechanism: what `sparse_attn.attention` accepts except a BlockLayout (it is tied to one
            length): a Pattern, "name", "name:key=value,...", or a Mechanism. Default "causal".
        head_dim: per-head width; default dim // num_heads.
        rope: rotary embeddings on q and k (positions 0..N-1 unless `positions` is given).
        rope_base: the rotary base (10000 as in RoFormer / Llama).
        dropout: dropout probability on the attention output of each head, before the output
            projection, in training mode. (The sparse kernels do not drop individual attention
            weights, so this is the attention-path dropout that works for every mechanism.)
        bias: biases in the four projections.
        backend: block backend for patterns and block_topk ("auto" picks per device); a name
            `backends.list_backends()` knows, checked here.
        deterministic: the backward of patterns and block_topk, as in `sparse_attention`: True
            for bitwise-reproducible gradients (triton's three-launch backward; atomics-based
            backends are skipped), False for the fastest (triton's fused backward), None
            (default) as `sparse_attention`'s None. Other
            mechanisms have one implementation each: giving it to them is an error
            (`takes_deterministic` says whether a mechanism takes it).

    Padded batches: `forward(x, padding_mask=mask)` with mask (B, N) bool, True = real token.
    Pattern mechanisms then attend only real keys, with positions (the pattern's and the rotary angles) counted from each row's
    first real token, so left and right padding give each row what it gives alone; pad rows'
    outputs are 0 before the output projection. `linear` and `performer` mask pad keys out of
    their sums (they have no positions) and `topk` never picks them. `lsh` and `routing` hash
    or route each row as it is alone (LSH's bucket count and routing's default sizes from its
    real length; pads sort after every real token and join no cluster), so each row gets what it gets alone
    too; for `lsh` give a `seed` (without one, every call draws its rotations from torch's
    global generator, so a row matches its lone run only from the same generator state).
    `block_topk` never selects or attends pad keys (block means over real tokens only) but
    cuts blocks at absolute indices: right padding gives each row what it gives alone, left
    padding does not (its tokens fall into other blocks); see `block_topk_attention`.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, mechanism="causal", *,
                 head_dim: int | None = None, rope: bool = True, rope_base: float = 10000.0, dropout: float = 0.0,
                 bias: bool = False, backend: str = "auto", deterministic: bool | None = None):
        super().__init__()
        check_int("dim", dim, 1)
        check_int("num_heads", num_heads, 1)
        num_kv_heads = num_heads if num_kv_heads is None else check_int("num_kv_heads", num_kv_heads, 1)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim ({dim}) must be a multiple of num_heads ({num_heads}), or pass head_dim")
            head_dim = dim // num_heads
        check_int("head_dim", head_dim, 1)
        check_bool("rope", rope)
        check_bool("bias", bias)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        if backend != "auto":
            get_backend(backend)  # an unknown name fails here, not at the first forward
        if deterministic is not None:
            check_bool("deterministic", deterministic)
        mechanism = as_mechanism(mechanism)
        if isinstance(mechanism, BlockLayout):
            raise TypeError("mechanism must not be a BlockLayout here (a layout is built for one length); pass its "
                            "pattern (layout.pattern) or a mechanism name")
        if (backend != "auto" and isinstance(mechanism, Mechanism) and mechanism.kind != PATTERN
                and "backend" not in mechanism.info.parameters()):
            raise ValueError(f"backend={backend!r} picks the block backend of patterns and block_topk; "
                             f"{mechanism.name} has one implementation: leave backend='auto'")
        if deterministic is not None and not takes_deterministic(mechanism):
            raise ValueError(f"deterministic={deterministic!r} picks the backward of patterns and block_topk; "
                             f"{mechanism.name} has one implementation: leave deterministic=None")
        self.dim, self.num_heads, self.num_kv_heads, self.head_dim = dim, num_heads, num_kv_heads, head_dim
        self.mechanism = mechanism
        self.dropout = float(dropout)
        self.backend = backend
        self.deterministic = deterministic
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * head_dim, dim, bias=bias)
        self.rotary = RotaryEmbedding(head_dim, rope_base) if rope else None
        # dense-to-sparse warm-up (set by the models' schedule): out = w * sparse + (1 - w) * dense
        self.dense_mechanism = None
        self.sparse_weight = 1.0

    def set_warmup(self, dense, sparse_weight: float) -> None:
        """Blend this layer's output with `dense` attention ("causal" or "full"): weight
        `sparse_weight` in [0, 1] on the layer's own mechanism. 1 turns the blend off."""
        if isinstance(sparse_weight, bool) or not isinstance(sparse_weight, (int, float)) or \
                not 0.0 <= sparse_weight <= 1.0:
            raise ValueError(f"sparse_weight must be in [0, 1], got {sparse_weight!r}")
        self.dense_mechanism = as_mechanism(dense)
        self.sparse_weight = float(sparse_weight)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, dim) -> (B, N, dim). positions: (N,) or (B, N) ints for the rotary angles
        (default 0..N-1, or per row from its first real token with a padding_mask); the
        mechanism itself sees the tokens as positions 0..N-1 (from each row's first real token).

        padding_mask: (B, N) bool, True = a real token (see the class docstring).

        cache: a `KVCache` (nn/cache.py) for decoding: x holds the next tokens after those the
        cache has seen (one at a time, or a chunk of a prefill); the cache stores their keys and
        values, applies the rotary positions by its own rule and attends over what it keeps."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (batch, length, {self.dim}), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        bsz, n, _ = x.shape
        call_kw = {} if self.deterministic is None else {"deterministic": self.deterministic}
        if padding_mask is not None:
            if cache is not None:
                raise ValueError("padding_mask and cache exclude each other: a cache holds one sequence per row "
                                 "(give generate() the lengths of right-padded prompts instead)")
            if not isinstance(padding_mask, torch.Tensor) or padding_mask.dtype != torch.bool or \
                    tuple(padding_mask.shape) != (bsz, n):
                raise ValueError(f"padding_mask must be a bool tensor of shape ({bsz}, {n}) (True = real token), got "
                                 f"{padding_mask.dtype if isinstance(padding_mask, torch.Tensor) else padding_mask!r}"
                                 f"{' ' + str(tuple(padding_mask.shape)) if isinstance(padding_mask, torch.Tensor) else ''}")
            for m in (self.mechanism, self.dense_mechanism if self.sparse_weight < 1.0 else None):
                if isinstance(m, Mechanism) and m.kind != PATTERN and "key_padding_mask" not in m.info.parameters():
                    raise ValueError(f"mechanism {m} takes no padding_mask (no per-row support): batch rows of equal "
                                     "length, or use a pattern mechanism, linear, performer, topk, block_topk, lsh or "
                                     "routing")
            call_kw["key_padding_mask"] = padding_mask
            if positions is None:  # rotary positions from each row's first real token
                positions = torch.clamp(padding_mask.long().cumsum(1) - 1, min=0)
        q = self.q_proj(x).view(bsz, n, self.num_heads, self.head_dim).transpose(1, 2)  # [B, Hq, N, Dh]
        k = self.k_proj(x).view(bsz, n, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, N, Dh]
        v = self.v_proj(x).view(bsz, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise TypeError(f"cache must be a KVCache (FullCache(), WindowCache(w), ...), got "
                                f"{type(cache).__name__}")
            if positions is not None:
                raise ValueError("positions and cache exclude each other: the cache assigns the positions")
            if self.sparse_weight < 1.0:
                raise ValueError("decoding with a cache needs the dense-to-sparse warm-up finished (sparse_weight 1)")
            out = cache.attend(q, k, v, self)  # [B, Hq, N, Dh]
        else:
            if self.rotary is not None:
                if positions is None:
                    positions = torch.arange(n, device=x.device)
                q, k = self.rotary(q, positions), self.rotary(k, positions)
            out = attention(q, k, v, self.mechanism, backend=self.backend, **call_kw)  # [B, Hq, N, Dh]
            if self.sparse_weight < 1.0:
                dense = attention(q, k, v, self.dense_mechanism, backend=self.backend, **call_kw)
                out = self.sparse_weight * out + (1.0 - self.sparse_weight) * dense
        out = nn.functional.dropout(out, self.dropout, self.training)
        return self.out_proj(out.transpose(1, 2).reshape(bsz, n, self.num_heads * self.head_dim))

    def extra_repr(self) -> str:
        m = str(self.mechanism) if isinstance(self.mechanism, Mechanism) else repr(self.mechanism)
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, mechanism={m}, rope={self.rotary is not None}, dropout={self.dropout}, "
                f"backend={self.backend!r}" + ("" if self.deterministic is None else
                                               f", deterministic={self.deterministic}"))
