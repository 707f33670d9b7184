"""FAVOR+ random features (Choromanski et al., "Rethinking Attention with Performers", 2021).

Softmax kernel. For w ~ N(0, I_D), E[exp(w·x - |x|^2/2) exp(w·y - |y|^2/2)] = exp(x·y), so with
m rows w_1..w_m of a projection W,

    phi(x) = exp(W x - |x|^2/2) / sqrt(m)            (positive random features)

gives an unbiased estimate phi(x)·phi(y) of exp(x·y). Attention scores exp(scale q·k) use
x = q·sqrt(scale), y = k·sqrt(scale). The features are positive, so attention weights built from
them are never negative (unlike trigonometric random features).

Orthogonal random features: W is made of blocks of D rows that are exactly orthogonal (Q of the
QR decomposition of a Gaussian matrix, sign-corrected so it is Haar-distributed), each row then
rescaled by the norm of an independent D-dim Gaussian vector (chi-distributed, D degrees of
freedom). Each row is still marginally N(0, I_D), so the estimate stays unbiased, and the
variance is lower than with i.i.d. rows.

"relu" kernel (generalised attention in the paper): phi(x) = relu(W x) / sqrt(m).

Exponentials overflow for large inputs: `__call__` subtracts a max before exp (per row for
queries; over all rows for keys), which cancels in attention's normalisation but not in the
raw kernel estimate (`softmax_kernel_estimate` keeps the exact scale).
"""

from __future__ import annotations

import math

import torch

from ..._checks import check_bool

KERNELS = ("softmax", "relu")

__all__ = ["KERNELS", "PerformerFeatures", "draw_projection", "softmax_kernel_estimate"]


def _check_generator(generator, name="generator") -> torch.Generator | None:
    """None, a torch.Generator, or an int seed (turned into a CPU generator)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise TypeError(f"{name} must be a torch.Generator, an int seed or None, got {type(generator).__name__}")


def draw_projection(num_features: int, head_dim: int, *, orthogonal: bool = True,
                    generator: torch.Generator | None = None, device=None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A (num_features, head_dim) matrix whose rows are each marginally N(0, I).

    orthogonal=True: blocks of head_dim mutually orthogonal rows (the last block cut to size),
    row norms chi-distributed as those of Gaussian vectors. Drawn in float64 on the generator's
    device (CPU without one), then moved to `device`/`dtype`."""
    draw_device = generator.device if generator is not None else torch.device("cpu")
    kw = dict(generator=generator, device=draw_device, dtype=torch.float64)
    if not orthogonal:
        w = torch.randn(num_features, head_dim, **kw)
    else:
        blocks = -(-num_features // head_dim)
        gaussian = torch.randn(blocks, head_dim, head_dim, **kw)
        q, r = torch.linalg.qr(gaussian)  # [blocks, D, D], orthonormal columns
        # QR's sign convention is not uniform over rotations; fixing diag(R) > 0 makes Q Haar
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[..., None, :]
        rows = q.transpose(-1, -2)  # [blocks, D, D], orthonormal rows
        norms = torch.randn(blocks, head_dim, head_dim, **kw).norm(dim=-1)  # chi(D) per row
        w = (rows * norms[..., None]).reshape(blocks * head_dim, head_dim)[:num_features]
    return w.to(device=device if device is not None else draw_device, dtype=dtype)


class PerformerFeatures:
    """The random projection of a Performer attention, and the feature map it defines.

    Args:
        head_dim: D, the size of q and k vectors.
        num_features: m, rows of the projection (more features: lower variance, more cost).
        kernel: "softmax" (positive random features, FAVOR+) or "relu".
        orthogonal: orthogonal blocks of rows (lower variance) or i.i.d. Gaussian rows.
        generator: torch.Generator or int seed; kept, so `redraw()` continues its stream and the
            whole sequence of draws is reproducible. None uses torch's global generator.
        device, dtype: where the projection is stored (attention casts it to its accumulation
            dtype).

    Attributes: `projection` (num_features, head_dim).
    """

    def __init__(self, head_dim: int, num_features: int = 256, kernel: str = "softmax", orthogonal: bool = True,
                 generator=None, device=None, dtype: torch.dtype = torch.float32):
        for name, value in (("head_dim", head_dim), ("num_features", num_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        check_bool("orthogonal", orthogonal)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.head_dim = head_dim
        self.num_features = num_features
        self.kernel = kernel
        self.orthogonal = orthogonal
        self.generator = _check_generator(generator)
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.projection: torch.Tensor
        self.redraw()

    def redraw(self, generator=None) -> "PerformerFeatures":
        """Draw a new projection, from `generator` if given, else from the one kept at creation
        (else torch's global generator). Returns self."""
        generator = _check_generator(generator) if generator is not None else self.generator
        self.projection = draw_projection(self.num_features, self.head_dim, orthogonal=self.orthogonal,
                                          generator=generator, device=self.device, dtype=self.dtype)
        self.device = self.projection.device
        return self

    def to(self, device=None, dtype=None) -> "PerformerFeatures":
        """Move the projection (in place; returns self)."""
        self.projection = self.projection.to(device=device, dtype=dtype)
        self.device, self.dtype = self.projection.device, self.projection.dtype
        return self

    def _check_input(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dim() < 2 or x.shape[-1] != self.head_dim:
            raise ValueError(f"{name} must have shape (..., N, {self.head_dim}) for these features, got "
                             f"{tuple(x.shape)}")
        if x.device != self.projection.device:
            raise ValueError(f"{name} is on {x.device} but the features' projection is on "
                             f"{self.projection.device}; use features.to({str(x.device)!r})")
        return x

    def projected(self, x: torch.Tensor) -> torch.Tensor:
        """W x: (..., N, D) -> (..., N, m), computed in x's dtype."""
        x = self._check_input(x, "x")
        return x @ self.projection.to(x.dtype).T

    def log_features(self, x: torch.Tensor) -> torch.Tensor:
        """log phi(x) = W x - |x|^2/2 - log(m)/2 for the softmax kernel, unstabilised."""
        if self.kernel != "softmax":
            raise ValueError(f"log_features is defined for the softmax kernel, these features use {self.kernel!r}")
        row_terms = 0.5 * x.square().sum(-1, keepdim=True) + 0.5 * math.log(self.num_features)  # [..., N, 1]
        return self.projected(x) - row_terms  # one pass over the (N, m) features

    def __call__(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        """phi(x) for x (..., N, D) already scaled (by sqrt(scale) for attention), in x's dtype.

        Softmax kernel: stabilised by a max subtracted before exp, per row for queries (cancels
        in each row's normalisation), over all rows and features of the leading dims for keys (a
        constant per head, cancels too). The result is phi(x) up to that positive factor."""
        check_bool("is_query", is_query)
        if self.kernel == "relu":
            return torch.relu(self.projected(x)) / math.sqrt(self.num_features)
        logs = self.log_features(x)
        if logs.numel() == 0:
            return logs.exp()
        dims = (-1,) if is_query else (-2, -1)
        return torch.exp(logs - logs.detach().amax(dim=dims, keepdim=True))

    def feature_map(self, scale: float | None = None, stabilize: bool = True):
        """A callable x -> phi(x * sqrt(scale)) for `linear_attention(feature_map=...)`.

        scale defaults to 1/sqrt(head_dim). stabilize=True subtracts one max over the whole tensor
        it is given (a constant, so it cancels for q and for k within one call); it differs
        between calls, so use stabilize=False to carry a state between calls (inputs must then be
        small enough for exp not to overflow)."""
        root = (1.0 / math.sqrt(self.head_dim) if scale is None else float(scale)) ** 0.5

        def phi(x: torch.Tensor) -> torch.Tensor:
            x = x * root
            if self.kernel == "relu":
                return torch.relu(self.projected(x)) / math.sqrt(self.num_features)
            logs = self.log_features(x)
            if stabilize and logs.numel():
                logs = logs - logs.detach().amax()
            return logs.exp()

        return phi

    def __repr__(self) -> str:
        return (f"PerformerFeatures(head_dim={self.head_dim}, num_features={self.num_features}, "
                f"kernel={self.kernel!r}, orthogonal={self.orthogonal}, device={self.device}, dtype={self.dtype})")


def softmax_kernel_estimate(q: torch.Tensor, k: torch.Tensor, features: PerformerFeatures, *,
                            scale: float | None = None) -> torch.Tensor:
    """phi(q)·phi(k), the FAVOR+ estimate of exp(scale q·k), for every pair: (..., Nq, Nk).

    q (..., Nq, D) and k (..., Nk, D) with the same leading dims; scale defaults to 1/sqrt(D).
    Unstabilised in value (the row maxima are taken out before the matmul and put back after),
    so the mean over draws equals exp(scale q·k)."""
    if not isinstance(features, PerformerFeatures):
        raise TypeError(f"features must be PerformerFeatures, got {type(features).__name__}")
    if features.kernel != "softmax":
        raise ValueError(f"softmax_kernel_estimate needs features with kernel='softmax', got {features.kernel!r}")
    root = (1.0 / math.sqrt(features.head_dim) if scale is None else float(scale)) ** 0.5
    log_q = features.log_features(q * root)  # [..., Nq, m]
    log_k = features.log_features(k * root)  # [..., Nk, m]
    max_q = log_q.amax(-1, keepdim=True)
    max_k = log_k.amax(-1, keepdim=True)
    inner = torch.exp(log_q - max_q) @ torch.exp(log_k - max_k).transpose(-1, -2)
    return inner * torch.exp(max_q + max_k.transpose(-1, -2))
