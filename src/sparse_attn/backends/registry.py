"""Backends declare what they support as data; the dispatcher picks one and says why.

As in xformers' fmha dispatcher: every backend lists its capabilities (devices, dtypes, head
dims, grads, GQA, q_len != kv_len, ...), `reasons_not_to_use(call)` turns a call into the list
of unmet requirements, and `explain()` shows the verdict for each backend.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..patterns import BlockLayout, Pattern

log = logging.getLogger("sparse_attn.dispatch")

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


class BackendError(RuntimeError):
    """No backend can serve the call (or the forced one cannot); the message says why."""


@dataclass(frozen=True)
class Capabilities:
    devices: frozenset  # device types: "cpu", "cuda"
    dtypes: frozenset
    grads: bool  # backward supported
    gqa: bool  # Hq != Hkv without the caller repeating k/v
    min_head_dim: int = 1
    max_head_dim: int = 1 << 16
    different_lengths: bool = True  # q_len != kv_len, q_offset
    different_v_dim: bool = True  # v's head dim may differ from q/k's
    per_head_patterns: bool = True
    returns_lse: bool = True
    # can give a bitwise-reproducible backward: always, or when the call asks (`deterministic=True`)
    deterministic: bool = True
    dense: bool = False  # costs O(Nq * Nkv) whatever the pattern: never picked automatically
    # torch.compile can put the call in its graph (custom ops, SDPA). Others (Python loops over a
    # layout's plan) run eagerly inside a compiled model: traced, they would be specialised and
    # recompiled for every new length.
    graph_traceable: bool = False
    # reads the blocks of a layout; False (sdpa, reference): `forward` gets a `PatternAt` (the
    # pattern at the call's lengths) and no layout is built for it
    reads_layout: bool = True
    notes: str = ""


@dataclass(frozen=True)
class AttentionCall:
    """What the dispatcher needs to know about one call (no tensors)."""

    device_type: str
    dtype: torch.dtype
    requires_grad: bool
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    v_head_dim: int
    q_offset: int
    pattern: "Pattern"
    return_lse: bool
    pattern_heads: int | None = None
    # True: the backward must be bitwise reproducible; False / None: the backend's fastest
    # (None lets a backend follow torch.are_deterministic_algorithms_enabled())
    deterministic: bool | None = None

    @classmethod
    def of(cls, q, k, v, pattern, q_offset, return_lse, deterministic: bool | None = None) -> "AttentionCall":
        requires_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return cls(q.device.type, q.dtype, requires_grad, q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2],
                   q.shape[3], v.shape[3], q_offset, pattern, return_lse, getattr(pattern, "num_heads", None),
                   deterministic)


class Backend(ABC):
    """One way of computing attention. Subclasses set `name`, `caps` and implement `forward`.

    The contract every backend keeps (checked for each one by tests/backends/conformance.py):

    * inputs: q [B, Hq, Nq, D], k [B, Hkv, Nkv, D], v [B, Hkv, Nkv, Dv] on one device, one
      dtype, Hq % Hkv == 0 (query head h reads kv head h // (Hq / Hkv)); the layout is for
      (Nq, Nkv, q_offset) and has 1 or Hq heads; inputs arrive already checked
      (`backends.inputs.check_inputs`) and the dispatcher has already refused what `caps` /
      `extra_reasons` exclude, so `forward` may assume it is wanted for this call;
    * out: [B, Hq, Nq, Dv] in q's dtype; softmax over exactly the pairs the layout allows
      (full blocks whole, partial blocks through the layout's pattern), scores times `scale`;
    * lse (when return_lse): [B, Hq, Nq] natural-log log-sum-exp of the scaled allowed scores,
      float32 (float64 for float64 inputs);
    * rows that may see no key: out 0 and lse -inf, never NaN, and zero gradients;
    * backward: gradients of out (and of lse, when returned and used) with respect to q, k, v,
      in their dtypes; bitwise reproducible when the call asks for `deterministic=True` and the
      backend declares `caps.deterministic`;
    * accuracy: fp32/fp64 within the fp32 rule of the float64 reference, fp16/bf16 within
      FlashAttention's rule (2x the low-precision reference's error, 3x for gradients).
    """

    name: str = "?"
    caps: Capabilities

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run in this process at all (missing package...), or None."""
        return None

    def block_sizes(self, call: AttentionCall) -> tuple[int, int]:
        return 64, 64

    def extra_reasons(self, call: AttentionCall) -> list[str]:
        """Requirements beyond the capability table (e.g. only some patterns)."""
        return []

    def input_notes(self, q, k, v) -> list[str]:
        """What this backend will do to these tensors that costs time or memory (copies,
        padding): shown by `explain()` when the backend is chosen."""
        return []

    def reasons_not_to_use(self, call: AttentionCall) -> list[str]:
        why = []
        missing = self.unavailable_reason()
        if missing:
            return [missing]
        c = self.caps
        if call.device_type not in c.devices:
            why.append(f"device {call.device_type} not supported (supports {sorted(c.devices)})")
        if call.dtype not in c.dtypes:
            why.append(f"dtype {call.dtype} not supported (supports {sorted(str(d) for d in c.dtypes)})")
        if call.requires_grad and not c.grads:
            why.append("no backward (inputs require grad)")
        if call.q_heads != call.kv_heads and not c.gqa:
            why.append(f"no GQA (q heads {call.q_heads} != kv heads {call.kv_heads})")
        if not c.min_head_dim <= call.head_dim <= c.max_head_dim:
            why.append(f"head dim {call.head_dim} outside [{c.min_head_dim}, {c.max_head_dim}]")
        if (call.q_len != call.kv_len or call.q_offset != 0) and not c.different_lengths:
            why.append(f"q_len {call.q_len} / kv_len {call.kv_len} / q_offset {call.q_offset} not supported "
                       "(needs q_len == kv_len, q_offset 0)")
        if call.v_head_dim != call.head_dim and not c.different_v_dim:
            why.append(f"v head dim {call.v_head_dim} != q/k head dim {call.head_dim}")
        if call.pattern_heads is not None and not c.per_head_patterns:
            why.append("per-head patterns not supported")
        if call.return_lse and not c.returns_lse:
            why.append("cannot return log-sum-exp")
        if call.deterministic and call.requires_grad and not c.deterministic:
            why.append("backward not deterministic (deterministic=True asks for a bitwise-reproducible one)")
        return why + self.extra_reasons(call)

    @abstractmethod
    def forward(self, q, k, v, layout: "BlockLayout", scale: float, return_lse: bool, *,
                deterministic: bool | None = None):
        """Returns (out [B, Hq, Nq, Dv], lse [B, Hq, Nq] float32/float64 or None).

        `deterministic` is the call's wish for the backward (AttentionCall.deterministic). A
        backend with one backward ignores it: the dispatcher has already refused a
        non-deterministic one when it is True and gradients are needed."""

    def backward_from_stats(self, q, k, v, layout: "BlockLayout", scale: float, out, lse, dout, dlse=None):
        """(dq, dk, dv) of one part of an attention split over key sets (a context-parallel step):
        q [B, Hq, Nq, D] against this part's keys k, v under `layout`, where `out` [B, Hq, Nq, Dv]
        and `lse` [B, Hq, Nq] are the *whole* attention's (all parts merged by log-sum-exp) and
        `dout` (and `dlse`, or None) its gradients. Summing the parts' dq (and placing each part's dk, dv) gives
        the gradients of the whole. Rows with lse -inf get zero gradients.

        This default recomputes the part's forward with autograd and pulls the merge's gradient
        through its (out, lse): out = sum_p w_p out_p with w_p = exp(lse_p - lse), so
        d out_p = w_p dout and d lse_p = w_p rowsum(dout * (out_p - out)). Backends whose
        backward reads a saved (out, lse) override it with that backward directly."""
        with torch.enable_grad():
            q_, k_, v_ = (t.detach().requires_grad_(True) for t in (q, k, v))
            out_p, lse_p = self.forward(q_, k_, v_, layout, scale, True)
            acc = torch.float64 if q.dtype == torch.float64 else torch.float32
            lse_w = lse.to(acc)
            w = torch.exp(lse_p.to(acc) - torch.where(torch.isinf(lse_w), torch.zeros_like(lse_w), lse_w))
            w = torch.where(torch.isinf(lse_w) | torch.isinf(lse_p.to(acc)), torch.zeros_like(w), w)  # [B, Hq, Nq]
            d_out_p = (w[..., None] * dout.to(acc)).to(out_p.dtype)
            d_lse_p = w * (dout.to(acc) * (out_p.to(acc) - out.to(acc))).sum(-1)
            if dlse is not None:  # d lse / d lse_p = w_p
                d_lse_p = d_lse_p + w * dlse.to(acc)
            grads = torch.autograd.grad((out_p, lse_p), (q_, k_, v_), (d_out_p, d_lse_p.to(lse_p.dtype)),
                                        allow_unused=True)
        return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q, k, v)))

    def __repr__(self) -> str:
        return f"<backend {self.name}>"


_REGISTRY: dict[str, Backend] = {}
# Preference order per device type when backend="auto". On CUDA our triton kernels come first
# (issue #4): they serve every call flex serves plus fp32 grads, need no per-layout compile
# (flex compiles for each new layout, seconds each) and their backward can be deterministic.
# Measured against flex in benchmarks/results/gpu_patterns*.json: README, "GPU".
_PREFERENCE = {"cuda": ["sdpa", "triton", "flex", "blocked"], "cpu": ["sdpa", "blocked", "flex"]}


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    _ensure_loaded()
    if name not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {sorted(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def list_backends() -> list[Backend]:
    _ensure_loaded()
    return list(_REGISTRY.values())


_loaded = False


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:  # importing one backend module directly must not hide the others
        _loaded = True
        from . import blocked, flex, reference, sdpa  # noqa: F401  (registration side effect)

        try:  # optional: without triton the other backends still load
            from . import triton  # noqa: F401
        except ImportError as e:
            log.debug("triton backend not loaded: %s", e)


@dataclass
class Explanation:
    """The dispatcher's verdict: which backend runs the call and why the others do not."""

    call: AttentionCall
    requested: str
    chosen: str | None
    rejected: dict = field(default_factory=dict)  # name -> list of reasons
    notes: list = field(default_factory=list)  # rewrites applied before dispatch; the chosen backend's input costs

    def __str__(self) -> str:
        c = self.call
        head = (f"call: {c.device_type} {str(c.dtype).replace('torch.', '')} B={c.batch} Hq={c.q_heads} "
                f"Hkv={c.kv_heads} Nq={c.q_len} Nkv={c.kv_len} D={c.head_dim} Dv={c.v_head_dim} "
                f"q_offset={c.q_offset} grad={c.requires_grad} pattern={c.pattern!r}")
        lines = [head, *(f"note: {n}" for n in self.notes), f"requested: {self.requested}",
                 f"chosen: {self.chosen or 'none'}"]
        for name, why in self.rejected.items():
            lines.append(f"  {name}: rejected - " + "; ".join(why))
        return "\n".join(lines)


def explain_call(call: AttentionCall, backend: str = "auto") -> Explanation:
    _ensure_loaded()
    if backend != "auto":
        chosen = get_backend(backend)
        why = chosen.reasons_not_to_use(call)
        rejected = {chosen.name: why} if why else {}
        return Explanation(call, backend, None if why else chosen.name, rejected)
    rejected = {}
    order = _PREFERENCE.get(call.device_type, ["blocked"])
    order = order + [n for n in _REGISTRY if n not in order]
    chosen = None
    for name in order:
        b = _REGISTRY.get(name)
        if b is None:
            continue
        why = b.reasons_not_to_use(call)
        if not why and b.caps.dense:
            why = ["dense O(Nq*Nkv) computation: used only when asked for by name"]
        if why:
            rejected[name] = why
        elif chosen is None:
            chosen = name
        else:
            rejected[name] = [f"usable, but {chosen} is preferred on {call.device_type}"]
    return Explanation(call, backend, chosen, rejected)


def select(call: AttentionCall, backend: str = "auto") -> Backend:
    ex = explain_call(call, backend)
    if ex.chosen is None:
        raise BackendError(f"no backend can run this call:\n{ex}")
    if backend == "auto" and ex.rejected and not torch.compiler.is_compiling():  # dynamo cannot trace logging
        log.debug("dispatch: %s", ex)
    return _REGISTRY[ex.chosen]
